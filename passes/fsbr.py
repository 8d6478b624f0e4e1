"""FSBR — I-LLM's fully-smooth block reconstruction (Hu et al., 2024; METHODS.md §2), as passes.

FSBR smooths activations as well as weights so that both quantize (W8A8 ... W4A4). It extends TEQ's scale groups
and trains them block by block:

* **groups** (:func:`plan_fsbr`): every TEQ group (norm -> {q,k,v}, norm -> {gate,up}, v -> o with grouped-query
  sharing, up -> down) plus **q/k smoothing**: ``W_q ← diag(1/s) W_q``, ``W_k ← diag(s) W_k`` (``s`` over k's
  channels; query head ``h`` uses kv head ``h // n_rep``'s scale). Rotary embeddings rotate channel ``i`` with
  ``i + d/2``, so the fold is exact only when ``s_i = s_{i+d/2}``: the scale is *tied* across each RoPE pair
  (the public I-LLM code does not tie them; an untied fold changes the model — a test shows it);
* **SwiGLU act-smooth** (kind ``swiglu``): ``gate' = s ⊙ gate`` (rows of ``W_gate`` times ``s``), ``up' = up ⊘ s``
  (rows of ``W_up`` over ``s``) and the SiLU becomes ``g · σ(g ⊘ s)`` at run time, so ``silu(gate) · up`` is
  unchanged; it balances the product's two quantized operands (:mod:`fxquant.actquant`);
* **init** (:func:`smoothquant_init`): SmoothQuant ``s_j = max|x_j|^α / max_i |W_ij|^{1-α}`` (α = 0.5) for the
  norm/linear groups from calibration activations, 1 for q/k, and for the act-smooth 1 or (``act_smooth_alpha``)
  the scale that gives ``gate'`` and ``up'`` the same per-channel range;
* **learnable weight clipping**: per (row, group) bounds ``σ(l) · max`` (``l`` starts at 4, σ(4) ≈ 0.982); the
  quantizer clamps the weight to its bounds and quantizes with RTN's own formulas, so training sees bit for bit
  what the later RTN pass produces from the clamped weight;
* **activation fake-quant at I-LLM's positions** (:class:`~fxquant.actquant.ActAllocation`): dynamic per-token on
  every quantized linear's input (``act_bits``), and 8-bit on the norm inputs, the SwiGLU operands, Q/K/V (per
  token and head, after RoPE) and the softmax output (options ``norm_bits``, ``swiglu_bits``, ``attn_bits``,
  ``softmax_bits``; 16 keeps a position float); straight-through rounding, gradient to the ranges;
* **training** (:class:`TrainFSBRScales`): one decoder layer at a time; the float model's inputs to the layer
  are cached (memory bounded to one block's activations), the target is the float layer's output on the float
  input, the quantized layer runs on the quantized chain's input (the outputs of already-trained quantized
  blocks feed the next); MSE; AdamW without weight decay, lr 5e-3 for the scales and 1e-2 for the clipping
  logits, ``epochs`` epochs. Three details decide whether it helps or harms (measured on SmolLM2,
  ``examples/results/fsbr_smollm2.md``):

  - the scales are trained as ``log s`` (one parameter per rotary pair for a RoPE-tied group), so a step moves
    each scale by a relative amount; raw scales with an absolute lr let the smallest SmoothQuant scales (~0.02)
    hit their ``MIN_SCALE`` clamp in a few steps and wrecked the block (layer 0 of SmolLM2 W8A8: block MSE
    0.0025 at init, 0.85 after one epoch, and every later block inherited it);
  - the quantizers' ranges are not detached (per-token ``absmax`` of the activations, per-row ``max|w|`` of the
    weights), so the gradient sees that stretching one channel coarsens the step of all the others;
  - "keep the best": the block objective is *evaluated* (no grad, all samples) for the SmoothQuant init without
    clipping (exactly the untrained baseline), the init with the initial clipping, and after every epoch, and
    the best of these is kept — a block never ends worse than its init on its objective. The per-layer record
    is ``record.extra["block_mse"]``;
  - a model-level guard: the block objective on SmolLM2 is dominated by a few massive-activation tokens, so a
    better block MSE does not promise a better model. After the last layer, the whole quantized model's
    next-token loss on ``holdout`` calibration windows that share no token with the trained ones is compared
    for the trained parameters and the untrained SmoothQuant baseline; the better is kept
    (``record.extra["kept"]``, ``heldout_loss_init`` / ``heldout_loss_trained``).

  Per-channel weight quantization commutes with scaling a weight row, so the q/k scales (rows of ``W_q`` and
  ``W_k``) and the act-smooth scales (rows of ``W_gate`` and ``W_up``) only matter where Q/K and the SwiGLU
  operands are quantized; with those positions float the groups are left out of the plan;
* **resumable**: options ``checkpoint_dir``, ``save_every`` (optimizer steps) and ``resume`` (a checkpoint folder,
  or true / "auto") checkpoint the finished layers and the layer in progress (:mod:`fxquant.train_state`); a
  resumed run recomputes the cached block inputs and ends with the uninterrupted run's parameters bit for bit.

Then :class:`~fxquant.passes.fold_equivalent_scales.FoldEquivalentScales` (``source="fsbr"``) folds the scales
(and rewrites each act-smoothed SiLU), :class:`ClipWeights` clamps the folded weights to the learned bounds, RTN
quantizes them, and :class:`QuantizeActivations` adds the activation fake-quant the training used: as graph nodes
(``fxquant::``-free ATen ops, so the graph stays exportable; attention decomposed) and as hooks plus a fake-quant
attention on the eager model, so ``model(...)`` and ``model.generate()`` run W·A· as trained, and a saved
checkpoint re-installs them.

Not done (stated, not hidden): the residual stream stays float in fake-quant (I-LLM carries it in 16 bits; the
integer-only lowering does), and the integer-only lowering has no rule for the act-smoothed SiLU, so ``illm-*``
recipes train without it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from fxquant.actquant import (ActAllocation, EagerActQuant, SwiGLUSmooth, act_fake_quantize, channel_absmax,
                              find_sites, insert_graph_quantizers, module_path, norm_align_from_absmax,
                              remember_runtime,
                              round_ste as _round_ste)
from fxquant.calibration import calibration_ids, calibration_windows, layer_inputs
from fxquant.capture import CapturedGraph
from fxquant import train_state
from fxquant.errors import PassError, TrainingError
from fxquant.guards import check_finite_loss
from fxquant.passes.fold_equivalent_scales import (MIN_SCALE, EquivalentScales, ScaleGroup, ScalePlan, ScaleSite,
                                                   _gqa_index, _linears_by_name, plan_scales)
from fxquant.passes.train_teq_scales import _loss, quantized_linears
from fxquant.pipeline import Pass, PassContext, PassResult
from fxquant.quant import QuantSpec

log = logging.getLogger("fxquant")

__all__ = ["plan_fsbr", "smoothquant_init", "lwc_fake_quantize", "act_fake_quantize", "FSBRConfig",
           "TrainFSBRScales", "ClipWeights", "QuantizeActivations", "train_fsbr", "ActAllocation"]

#: initial clipping logit: σ(4) ≈ 0.982 of the group's range (METHODS.md §2)
CLIP_INIT = 4.0
#: a clipping logit with σ = 1.0 exactly in float32: no clipping (the untrained SmoothQuant baseline's quantizer)
NO_CLIP = 30.0
LOG_MIN_SCALE = math.log(MIN_SCALE)


# ---- the plan: TEQ's groups plus q/k ------------------------------------------------------------------------
def plan_fsbr(cg: CapturedGraph, structure: Any, *, exclude: Sequence[str] = ("lm_head*",),
              act_smooth: bool = True, qk: bool = True) -> ScalePlan:
    """TEQ's groups plus, with ``qk``, one q/k group per attention (RoPE-tied where the attention is rotary) and,
    with ``act_smooth``, one SwiGLU act-smooth group per gated MLP.

    Both are row scales of weights that per-channel quantization commutes with: they matter only where Q/K (q/k)
    or the SwiGLU operands (act-smooth) are quantized. :class:`TrainFSBRScales` leaves them out otherwise — their
    gradient would be float noise (~1e-12) that AdamW's normalised step turns into a random walk."""
    plan = plan_scales(cg, structure, exclude=exclude)
    linears = _linears_by_name(cg)
    if act_smooth:
        _plan_swiglu(cg, structure, plan, linears, exclude)
    ropes = {r.attention: r for r in structure.ropes}
    for a in structure.attentions if qk else ():
        what = f"q/k of {a.q}"
        if not (a.q and a.k and a.q_node and a.k_node and a.head_dim and a.n_rep):
            plan.skipped.append((what, "attention without separate q and k projections and known head size"))
            continue
        if a.q == a.k:
            plan.skipped.append((what, "fused qkv projection: q/k smoothing of one weight is not built"))
            continue
        ql, kl = linears[a.q_node], linears[a.k_node]
        if ql.layout != "out_in" or kl.layout != "out_in":
            plan.skipped.append((what, "q/k smoothing needs nn.Linear ([out, in]) weights"))
            continue
        size = kl.out_features
        index = _gqa_index(ql.out_features, size, a.n_rep, a.head_dim)
        if index is None:
            plan.skipped.append((what, f"q width {ql.out_features} does not map onto k width {size}"))
            continue
        rope = ropes.get(a.core)
        tie = None
        if rope is not None:
            if set(rope.targets) != {"q", "k"} or (rope.rotary_dim or 0) != a.head_dim or a.head_dim % 2:
                plan.skipped.append((what, f"RoPE on {rope.targets} with rotary dim {rope.rotary_dim} of "
                                           f"head dim {a.head_dim}: tying is only built for full rotary q and k"))
                continue
            tie = a.head_dim // 2
        sites = [ScaleSite(a.k, 0, torch.arange(size), torch.arange(size), +1),
                 ScaleSite(a.q, 0, torch.arange(ql.out_features), index, -1)]
        for lin, power, idx in ((kl, +1, torch.arange(size)), (ql, -1, index)):
            if lin.bias is not None:
                bias = cg.fqn_of(lin.bias)
                if bias is None:
                    break
                sites.append(ScaleSite(bias, 0, torch.arange(idx.numel()), idx, power))
        else:
            name = f"{a.k.rsplit('.', 2)[0]}.q_k"
            plan.groups.append(ScaleGroup(name, "qk", size, a.k, [a.q, a.k], sites, a.layer, (0, size), tie_half=tie))
            continue
        plan.skipped.append((what, "a q/k bias is computed in the graph, not a parameter"))
    return plan


def _plan_swiglu(cg: CapturedGraph, structure: Any, plan: ScalePlan, linears: Mapping[str, Any],
                 exclude: Sequence[str]) -> None:
    """One act-smooth group per SwiGLU: ``gate' = s ⊙ gate`` (rows of ``W_gate`` times ``s``), ``up' = up ⊘ s``
    (rows of ``W_up`` over ``s``); the SiLU then reads ``gate' ⊘ s`` (``fxquant.actquant``)."""
    import fnmatch
    nodes = {n.name: n for n in cg.gm.graph.nodes}
    for sw in structure.swiglus:
        what = f"SwiGLU act-smooth of {sw.gate}"
        act = nodes.get(sw.act_node or "")
        gate, up = linears.get(sw.gate_node), linears.get(sw.up_node)
        if act is None or act.target not in (torch.ops.aten.silu.default, torch.ops.aten.silu_.default):
            plan.skipped.append((what, f"the activation is {getattr(act, 'target', None)}, not SiLU: "
                                       "g·σ(g ⊘ s) is exact only for SiLU"))
            continue
        if gate is None or up is None:
            plan.skipped.append((what, "gate or up is not a linear of the graph"))
            continue
        if any(fnmatch.fnmatch(f, pat) for f in (sw.gate, sw.up) for pat in exclude):
            plan.skipped.append((what, "gate or up is excluded from quantization"))
            continue
        (g_lo, g_hi), (u_lo, u_hi) = sw.gate_channels, sw.up_channels
        fused = gate.node is up.node              # Phi-3: one gate_up linear, gate and up are its two halves
        if gate.layout != "out_in" or up.layout != "out_in" or g_hi - g_lo != u_hi - u_lo:
            plan.skipped.append((what, "the act-smooth needs nn.Linear ([out, in]) gate and up of one width"))
            continue
        if not fused and ((g_lo, g_hi) != (0, gate.out_features) or (u_lo, u_hi) != (0, up.out_features)):
            plan.skipped.append((what, "gate and up are slices of wider outputs"))
            continue
        if fused and (max(g_lo, u_lo) < min(g_hi, u_hi) or max(g_hi, u_hi) > gate.out_features):
            plan.skipped.append((what, f"the fused projection's gate {sw.gate_channels} and up {sw.up_channels} "
                                       "rows overlap or exceed it"))
            continue
        if cg.model is not None and module_path(cg, act) is None:
            plan.skipped.append((what, "the SiLU is not a module of its own in the eager model (a hook applies "
                                       "σ(g ⊘ s) there)"))
            continue
        size = g_hi - g_lo
        idx = torch.arange(size)
        rows = {+1: torch.arange(g_lo, g_hi), -1: torch.arange(u_lo, u_hi)}
        sites = [ScaleSite(sw.gate, 0, rows[+1], idx, +1), ScaleSite(sw.up, 0, rows[-1], idx, -1)]
        ok = True
        for lin, power in ((gate, +1), (up, -1)):
            if lin.bias is not None:
                bias = cg.fqn_of(lin.bias)
                if bias is None:
                    ok = False
                    break
                sites.append(ScaleSite(bias, 0, rows[power], idx, power))
        if not ok:
            plan.skipped.append((what, "a gate/up bias is computed in the graph, not a parameter"))
            continue
        name = f"{sw.gate.rsplit('.', 2)[0]}.act_smooth"
        plan.groups.append(ScaleGroup(name, "swiglu", size, sw.gate, [sw.gate, sw.up], sites, sw.layer, (0, size),
                                      act_node=sw.act_node))


# ---- quantizers --------------------------------------------------------------------------------------------
def lwc_fake_quantize(w: torch.Tensor, spec: QuantSpec, lo_logit: torch.Tensor | None,
                      hi_logit: torch.Tensor) -> torch.Tensor:
    """Fake-quantize ``w[O, C]`` with learnable clipping, equal in the forward to RTN of the clamped weight.

    ``hi_logit`` / ``lo_logit`` are ``[O, n_groups]``; the bounds are ``σ(hi) · max`` and ``σ(lo) · min`` per
    group (symmetric: ``±σ(hi) · absmax``). The weight is clamped to its bounds and quantized with
    :func:`fxquant.quant.quantize_weight`'s formulas (float32, round half to even, the same zero-group rule), with
    straight-through rounding so both the weight and the bounds get gradients. The range (``max|w|`` of each
    group) is *not* detached: the quantization step depends on the weight, and a smoothing scale that stretches a
    row's largest entry coarsens every other entry of the row — with a detached range the gradient cannot see that
    (OmniQuant's quantizer does not detach it either). :class:`ClipWeights` then clamps the folded weight to the
    same bounds, and the RTN pass reproduces this forward exactly.
    """
    rows, cols = w.shape
    g = spec.effective_group_size(cols)
    n = -(-cols // g)
    pad = n * g - cols
    w32 = F.pad(w.float(), (0, pad)).reshape(rows, n, g)
    if spec.symmetric:
        c = (torch.sigmoid(hi_logit) * w32.abs().amax(dim=2)).unsqueeze(-1)
        wc = torch.maximum(torch.minimum(w32, c), -c)
        scale = c / float(spec.qmax)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(_round_ste(wc / scale), spec.qmin, spec.qmax) * scale
    else:
        hi = (torch.sigmoid(hi_logit) * w32.amax(dim=2).clamp(min=0)).unsqueeze(-1)
        lo = (torch.sigmoid(lo_logit) * w32.amin(dim=2).clamp(max=0)).unsqueeze(-1)
        wc = torch.maximum(torch.minimum(w32, hi), lo)
        scale = (hi - lo) / float(spec.qmax)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.clamp(torch.round(-lo / scale), 0, spec.qmax).detach()
        q = (torch.clamp(_round_ste(wc / scale) + zero, 0, spec.qmax) - zero) * scale
    return q.reshape(rows, n * g)[:, :cols].to(w.dtype)


def clip_bounds(w: torch.Tensor, spec: QuantSpec, lo_logit: torch.Tensor | None,
                hi_logit: torch.Tensor) -> torch.Tensor:
    """``w`` clamped to its learned bounds (what :class:`ClipWeights` folds)."""
    rows, cols = w.shape
    g = spec.effective_group_size(cols)
    n = -(-cols // g)
    w32 = F.pad(w.float(), (0, n * g - cols)).reshape(rows, n, g)
    if spec.symmetric:
        c = (torch.sigmoid(hi_logit.float()) * w32.abs().amax(dim=2)).unsqueeze(-1)
        wc = torch.maximum(torch.minimum(w32, c), -c)
    else:
        hi = (torch.sigmoid(hi_logit.float()) * w32.amax(dim=2).clamp(min=0)).unsqueeze(-1)
        lo = (torch.sigmoid(lo_logit.float()) * w32.amin(dim=2).clamp(max=0)).unsqueeze(-1)
        wc = torch.maximum(torch.minimum(w32, hi), lo)
    return wc.reshape(rows, n * g)[:, :cols].to(w.dtype)


# ---- SmoothQuant initialisation ------------------------------------------------------------------------------
def _module_of(model: torch.nn.Module, fqn: str) -> torch.nn.Module:
    return model.get_submodule(fqn.rsplit(".", 1)[0])


def _smoothquant_sites(plan: ScalePlan, act_smooth_alpha: float
                       ) -> tuple[dict[str, list[tuple[str, ScaleSite]]], list[ScaleGroup]]:
    """(consumer weight fqn -> the (group, site) pairs it reads for, the act-smooth groups that need gate/up
    output statistics)."""
    consumer_of: dict[str, list[tuple[str, ScaleSite]]] = {}
    for g in plan.groups:
        if g.kind in ("qk", "swiglu"):
            continue
        for site in g.sites:
            if site.power > 0:
                consumer_of.setdefault(site.fqn, []).append((g.name, site))
    smooth = [g for g in plan.groups if g.kind == "swiglu"] if act_smooth_alpha > 0 else []
    return consumer_of, smooth


def smoothquant_modules(plan: ScalePlan, act_smooth_alpha: float = 0.5) -> tuple[list[str], list[str]]:
    """The module paths whose inputs and outputs :func:`smoothquant_init` reads (for one shared
    :func:`~fxquant.actquant.channel_absmax` pass)."""
    consumer_of, smooth = _smoothquant_sites(plan, act_smooth_alpha)
    return ([f.rsplit(".", 1)[0] for f in consumer_of],
            list(dict.fromkeys(f.rsplit(".", 1)[0] for g in smooth for f in g.consumers)))   # gate, up (or gate_up)


@torch.no_grad()
def smoothquant_init(model: torch.nn.Module, plan: ScalePlan, tensors: Mapping[str, torch.Tensor],
                     batches: torch.Tensor, alpha: float = 0.5, act_smooth_alpha: float = 0.5, *,
                     absmax: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
                     ) -> dict[str, torch.Tensor]:
    """``s_j = max|x_j|^α / max_i |W_ij|^{1-α}`` per group (q/k: 1), from the consumers' inputs on ``batches``.

    A GQA-expanded consumer channel counts for the producer channel it reads (the max over the query heads sharing
    it). ``absmax``: the (inputs, outputs) statistics of :func:`smoothquant_modules` already taken (by
    :func:`~fxquant.actquant.channel_absmax` with ``tensors`` as ``params``); None: taken here.

    The act-smooth (kind ``swiglu``) starts at ``s_j = (max|up'_j| / max|gate'_j|)^γ`` with ``γ =
    act_smooth_alpha``, where ``gate'``/``up'`` are the gate/up outputs after the other groups' row scales (the
    up → down group divides up's rows): ``γ = 0.5`` gives the product's two 8-bit operands the same per-channel
    range, ``γ = 0`` is METHODS.md's init of 1.
    """
    consumer_of, smooth = _smoothquant_sites(plan, act_smooth_alpha)
    if absmax is None:
        ins, outs = smoothquant_modules(plan, act_smooth_alpha)
        absmax = channel_absmax(model, batches, inputs=ins, outputs=outs, params=dict(tensors))
    in_amax, out_amax = absmax
    stats: dict[str, torch.Tensor] = {}
    for fqn, pairs in consumer_of.items():
        x = in_amax[fqn.rsplit(".", 1)[0]]
        for name, site in pairs:
            per = torch.zeros(plan.group(name).size, device=x.device).scatter_reduce(
                0, site.index.to(x.device), x[site.positions.to(x.device)], reduce="amax")
            stats[name] = torch.maximum(stats[name], per) if name in stats else per
    out = {}
    for g in plan.groups:
        if g.kind in ("qk", "swiglu") or g.name not in stats:
            out[g.name] = torch.ones(g.size)
            continue
        wmax = torch.zeros(g.size)
        for site in g.sites:
            if site.power > 0:
                w = tensors[site.fqn].detach().float().abs()
                col = w.amax(dim=0) if site.axis == 1 else w.amax(dim=1)
                wmax = torch.maximum(wmax, torch.zeros(g.size).scatter_reduce(0, site.index, col[site.positions],
                                                                               reduce="amax"))
        s = stats[g.name].cpu().clamp(min=1e-5) ** alpha / wmax.clamp(min=1e-5) ** (1 - alpha)
        out[g.name] = s.clamp(min=MIN_SCALE, max=1e4)
    for g in smooth:
        eff = {}
        for power, fqn in ((+1, g.consumers[0]), (-1, g.consumers[1])):
            # gate's (+1) or up's (-1) rows of its weight: all of it, or a half of a fused gate_up projection
            mine = next(site for site in g.sites if site.fqn == fqn and site.power == power and site.axis == 0)
            amax = out_amax[fqn.rsplit(".", 1)[0]].cpu()
            f = torch.ones(amax.shape[-1])   # the rows' factor from every other group: Π s^power of their sites
            for h in plan.groups:
                if h.kind == "swiglu" or h.name not in out:
                    continue
                for site in h.sites:
                    if site.fqn == fqn and site.axis == 0:
                        f[site.positions] *= out[h.name][site.index] ** site.power
            eff[power] = (amax * f)[mine.positions]
        s = (eff[-1].clamp(min=1e-5) / eff[+1].clamp(min=1e-5)) ** act_smooth_alpha
        out[g.name] = s.clamp(min=MIN_SCALE, max=1e4)
    return out


# ---- block-by-block training --------------------------------------------------------------------------------
@dataclass
class FSBRConfig:
    """FSBR's settings (METHODS.md §2); ``samples`` sequences of ``seq_len`` tokens, ``epochs`` over them."""

    act_bits: int = 8                  # linear inputs
    norm_bits: int = 8                 # norm inputs (I-LLM: 8; 16 keeps them float)
    norm_align: float = 0.5            # norm inputs quantized as x ⊘ a per token, a = amax_c^β (β here; 0: plain)
    norm_align_train: bool = False     # also train each decoder layer's alignments with its block (measured: no gain)
    swiglu_bits: int = 8               # the SwiGLU product's operands gate' and up'
    attn_bits: int = 8                 # Q, K (after RoPE), V per token and head
    softmax_bits: int = 8              # the softmax output (unsigned, step 1/(2^b - 1))
    act_smooth: bool = True            # the SwiGLU act-smooth group (gate' = s ⊙ gate, up' = up ⊘ s)
    act_smooth_alpha: float = 0.5      # its init (max|up'| / max|gate'|)^γ: 0.5 balances the operands, 0 is s = 1
    epochs: int = 10
    samples: int = 128
    seq_len: int = 512
    batch_size: int = 1
    lr_scale: float = 5e-3             # AdamW lr of the log-scales (a relative step: 5e-3 moves s by ~0.5%)
    lr_clip: float = 1e-2              # AdamW lr of the clipping logits
    clip_init: float = CLIP_INIT       # initial clipping logit (σ(4) ≈ 0.982)
    alpha: float = 0.5
    seed: int = 0
    holdout: int = 4                   # calibration windows (never trained on) for the model-level guard; 0: none
    progress: bool = True
    save_every: int = 0                 # checkpoint every N steps (0: only at the end, when checkpoint_dir is set)
    checkpoint_dir: str | None = None   # where step-<N>/ checkpoints go (None: no checkpoints)
    resume: Any = None                  # a checkpoint folder, or True / "auto": the latest in checkpoint_dir
    keep_last: int = 0                  # keep only the newest N checkpoints (0: keep every one)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "FSBRConfig":
        cfg = cls(**{k: v for k, v in options.items() if k in cls.__dataclass_fields__})
        if not isinstance(cfg.holdout, int) or isinstance(cfg.holdout, bool) or cfg.holdout < 0:
            raise PassError(f"FSBR holdout is a number of calibration windows >= 0, got {cfg.holdout!r}",
                            "e.g. options: {holdout: 4}; 0 turns the held-out guard off")
        if cfg.epochs < 0 or cfg.samples < 1 or cfg.seq_len < 2 or cfg.batch_size < 1:
            raise PassError(f"FSBR needs epochs >= 0 (0: SmoothQuant scales, no training, no clipping), samples and "
                            f"batch_size >= 1 and seq_len >= 2, got {cfg}")
        if not 2 <= cfg.act_bits <= 16:
            raise PassError(f"FSBR activation bits must lie in 2..16, got {cfg.act_bits}", "e.g. act_bits: 8")
        if isinstance(cfg.norm_align, bool) or not isinstance(cfg.norm_align, (int, float)) \
                or not 0.0 <= cfg.norm_align <= 1.0:
            raise PassError(f"FSBR norm_align is the exponent β of the norm-input alignment amax^β, in [0, 1]; got "
                            f"{cfg.norm_align!r}", "e.g. norm_align: 0.5 (0: plain per-token norm inputs)")
        if isinstance(cfg.act_smooth_alpha, bool) or not isinstance(cfg.act_smooth_alpha, (int, float)) \
                or not 0.0 <= cfg.act_smooth_alpha <= 1.0:
            raise PassError(f"FSBR act_smooth_alpha is the exponent γ of the act-smooth init, in [0, 1]; got "
                            f"{cfg.act_smooth_alpha!r}", "e.g. act_smooth_alpha: 0.5 (0: s = 1)")
        if not isinstance(cfg.act_smooth, bool):
            raise PassError(f"FSBR act_smooth is true or false, got {cfg.act_smooth!r}", "e.g. act_smooth: true")
        if not isinstance(cfg.norm_align_train, bool):
            raise PassError(f"FSBR norm_align_train is true or false, got {cfg.norm_align_train!r}",
                            "e.g. norm_align_train: true")
        cfg.allocation()
        train_state.check_checkpoint_options(cfg.save_every, cfg.checkpoint_dir, cfg.resume, "FSBR", cfg.keep_last)
        return cfg

    def allocation(self) -> ActAllocation:
        """The activation quantizers' widths (``fxquant.actquant``): I-LLM's allocation by default."""
        return ActAllocation(linear=self.act_bits, norm=self.norm_bits, swiglu=self.swiglu_bits, attn=self.attn_bits,
                             softmax=self.softmax_bits)


def step_log_scales(opt: torch.optim.Optimizer, loss: torch.Tensor, log_scales: Any) -> None:
    """One optimizer step on ``loss``, then every log-scale clamped to ``log(MIN_SCALE)`` (FSBR's and TEQ's block
    training both keep their scales as ``log s``)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        for t in log_scales:
            t.clamp_(min=LOG_MIN_SCALE)


def _decoder_layers(model: torch.nn.Module, plan: ScalePlan, who: str = "FSBR") -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of decoder layers (found from a grouped parameter's name ``<prefix>.<i>.<rest>``)."""
    for g in plan.groups:
        parts = g.producer.split(".")
        for i in range(len(parts) - 1, 0, -1):
            if parts[i].isdigit():
                prefix = ".".join(parts[:i])
                mod = model.get_submodule(prefix)
                if isinstance(mod, torch.nn.ModuleList):
                    return prefix, mod
    raise PassError(f"{who} found no list of decoder layers to train block by block",
                    f"{who} supports models whose layers live in an nn.ModuleList (LLaMA, Mistral, Qwen, ...)")


def _structure_of(cg: CapturedGraph) -> Any:
    """The structure analysis of ``cg`` (for callers of :func:`train_fsbr` that did not run it)."""
    from fxquant.passes.analyze_structure import AnalyzeStructure
    from fxquant.pipeline import PassContext
    ctx = PassContext()
    AnalyzeStructure().call(cg, ctx)
    return ctx.artifacts["structure"]


def _act_path(cg: CapturedGraph, group: ScaleGroup) -> str:
    node = next((n for n in cg.gm.graph.nodes if n.name == group.act_node), None)
    path = module_path(cg, node) if node is not None else None
    if path is None:
        raise PassError(f"the SwiGLU act-smooth group {group.name} has no activation module in the eager model",
                        "set act_smooth: false")
    return path


class _Block:
    """One decoder layer under reconstruction: its scale groups, the weights it owns and the linears it clips.

    The model-wide activation quantizers ``aq`` are switched on by :meth:`quantized` and off by
    :meth:`float_outputs` (and on leaving ``with``); :meth:`effective` hands this block's SwiGLU act-smooth
    scales to their ``smoothers`` (the SiLU then reads ``gate' ⊘ s``), :meth:`float_outputs` takes them back."""

    def __init__(self, plan: ScalePlan, prefix: str, index: int, layer: torch.nn.Module, model: torch.nn.Module,
                 qlin: Mapping[str, str], base: Mapping[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype,
                 aq: EagerActQuant | None = None, smoothers: Mapping[str, SwiGLUSmooth] | None = None,
                 aligns: Mapping[str, str] | None = None):
        self.plan, self.layer, self.model, self.base, self.spec, self.dtype = plan, layer, model, base, spec, dtype
        self.local = local = f"{prefix}.{index}."
        self.groups = [g for g in plan.groups if g.producer.startswith(local)]
        # sorted, not a set's order (which changes with the process's string hashing): the order the weights are
        # built in is the order autograd sums each scale's gradient contributions, so it must not change on resume
        self.mine = sorted({s.fqn for g in self.groups for s in g.sites} | {f for f in qlin if f.startswith(local)})
        self.clipped = sorted(f for f in qlin if f.startswith(local))
        self.aq = aq
        self.smoothers = {g.name: smoothers[g.name] for g in self.groups
                          if g.kind == "swiglu" and smoothers and g.name in smoothers}
        # this layer's norm-input alignments (group name -> norm path): effective() hands them to the quantizers
        self.aligns = {g.name: aligns[g.name] for g in self.groups if g.kind == "norm_align" and aligns
                       and g.name in aligns}
        if self.aligns and aq is None:
            raise PassError("norm-input alignment groups need the activation quantizers", "report a bug")

    def set_quantized(self, on: bool) -> None:
        """Activation fake-quant on (the quantized block) or off (the float target)."""
        if self.aq is not None:
            self.aq.enabled = on

    def __enter__(self) -> "_Block":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.set_quantized(False)
        for sm in self.smoothers.values():
            sm.scale = None

    def initial_clips(self, logit: float = CLIP_INIT) -> dict[str, tuple[torch.nn.Parameter | None, torch.nn.Parameter]]:
        """Clipping logits, all ``logit`` (:data:`NO_CLIP`: σ = 1 exactly, i.e. plain RTN)."""
        out = {}
        for fqn in self.clipped:
            rows, cols = self.base[fqn].shape
            n = -(-cols // self.spec.effective_group_size(cols))
            hi = torch.nn.Parameter(torch.full((rows, n), float(logit)))
            lo = None if self.spec.symmetric else torch.nn.Parameter(torch.full((rows, n), float(logit)))
            out[fqn] = (lo, hi)
        return out

    def effective(self, scales: Mapping[str, torch.Tensor],
                  clips: Mapping[str, tuple[torch.Tensor | None, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The block's weights with ``scales`` folded and clipped fake-quant applied, keyed relative to the layer."""
        typed = {k: v.to(self.dtype) for k, v in scales.items()}
        for name, sm in self.smoothers.items():
            sm.scale = typed[name]
        for name, path in self.aligns.items():
            self.aq.norm_align[path] = typed[name]
        out = {}
        for fqn in self.mine:
            w = self.plan.apply_one(fqn, self.base[fqn], typed)
            if fqn in clips:
                lo, hi = clips[fqn]
                w = lwc_fake_quantize(w, self.spec, lo, hi)
            out[fqn[len(self.local):]] = w
        return out

    def quantized(self, params: Mapping[str, torch.Tensor], h: torch.Tensor, kw: Mapping[str, Any]) -> torch.Tensor:
        self.set_quantized(True)
        return _hidden(torch.func.functional_call(self.layer, dict(params), args=(h,), kwargs=dict(kw), strict=False))

    def free(self, group: ScaleGroup, full: torch.Tensor) -> torch.Tensor:
        """The trainable part of a group's vector: all of it, or one entry per rotary pair of a tied group."""
        if group.tie_half:
            return full.view(-1, 2, group.tie_half)[:, 0, :].reshape(-1).clone()
        return full.clone()

    def scales(self, log_params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scale vectors from the trained log-parameters (tied groups expanded to both halves of each pair)."""
        out = {}
        for g in self.groups:
            t = log_params[g.name]
            if g.tie_half:
                t = t.view(-1, 1, g.tie_half).expand(-1, 2, g.tie_half).reshape(-1)
            out[g.name] = t.exp()
        return out

    @torch.no_grad()
    def loss(self, scales: Mapping[str, torch.Tensor], clips: Mapping[str, tuple[torch.Tensor | None, torch.Tensor]],
             inputs: list[tuple[torch.Tensor, dict]], targets: list[torch.Tensor]) -> float:
        """The block objective (mean MSE over the samples) of fixed parameters — what "keep the best" compares."""
        params = self.effective(scales, clips)
        total = 0.0
        for (h, kw), t in zip(inputs, targets):
            total += float(F.mse_loss(self.quantized(params, h, kw).float(), t.float()))
        return total / max(1, len(inputs))

    @torch.no_grad()
    def float_outputs(self, inputs: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
        self.set_quantized(False)
        for sm in self.smoothers.values():
            sm.scale = None
        return [_hidden(self.layer(h, **kw)) for h, kw in inputs]

    @torch.no_grad()
    def quantized_outputs(self, inputs: list[tuple[torch.Tensor, dict]], scales: Mapping[str, torch.Tensor],
                          clips: Mapping[str, tuple[torch.Tensor | None, torch.Tensor]]
                          ) -> list[tuple[torch.Tensor, dict]]:
        params = self.effective(scales, clips)
        return [(self.quantized(params, h, kw), kw) for h, kw in inputs]


def _hidden(out: Any) -> torch.Tensor:
    """A decoder layer's hidden states: the output itself, or its first element where the layer returns a tuple
    (Falcon, older transformers layers: ``(hidden, attention weights, ...)``)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _snapshot(scales: Mapping[str, torch.Tensor], clips: Mapping[str, tuple[torch.Tensor | None, torch.Tensor]]):
    return ({k: v.detach().clone() for k, v in scales.items()},
            {k: tuple(None if p is None else p.detach().clone() for p in v) for k, v in clips.items()})


def _flatten(prefix: str, scales: Mapping[str, torch.Tensor],
             clips: Mapping[str, tuple[torch.Tensor | None, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Checkpoint names: ``<prefix>.scale.<group>``, ``<prefix>.hi.<weight>``, ``<prefix>.lo.<weight>``."""
    out = {f"{prefix}.scale.{k}": v for k, v in scales.items()}
    for fqn, (lo, hi) in clips.items():
        out[f"{prefix}.hi.{fqn}"] = hi
        if lo is not None:
            out[f"{prefix}.lo.{fqn}"] = lo
    return out


def _unflatten(prefix: str, tensors: Mapping[str, torch.Tensor], groups: Sequence[ScaleGroup],
               clipped: Sequence[str], where: str):
    try:
        scales = {g.name: tensors[f"{prefix}.scale.{g.name}"] for g in groups}
        clips = {f: (tensors.get(f"{prefix}.lo.{f}"), tensors[f"{prefix}.hi.{f}"]) for f in clipped}
    except KeyError as exc:
        raise TrainingError(f"{where} lacks the tensor {exc.args[0]}",
                            "resume from another checkpoint, or start again") from None
    return scales, clips


def train_fsbr(cg: CapturedGraph, plan: ScalePlan, spec: QuantSpec, calibration: Any, cfg: FSBRConfig, *,
               exclude: Sequence[str] = ("lm_head*",), tokenizer: Any = None,
               init: Mapping[str, torch.Tensor] | None = None,
               on_step: Callable[[int, float], None] | None = None, structure: Any = None) -> EquivalentScales:
    """Train FSBR's scales and clipping block by block (see the module docstring). ``init`` replaces the
    SmoothQuant initialisation (tests use it).

    A step is one optimizer step (one calibration sample of one layer): ``layers × epochs × samples`` in all.
    With ``cfg.checkpoint_dir`` a checkpoint is written every ``cfg.save_every`` steps and at the end; it holds the
    initial scales, the finished layers' best scales and clipping logits, and the layer in progress (its current
    parameters, AdamW state, epoch, sample, best epoch so far). On ``cfg.resume`` the cached block inputs are
    recomputed by replaying the finished layers with exactly the operations of the uninterrupted run, so the final
    parameters are the same bit for bit. ``on_step(step, loss)`` runs after each step (and its checkpoint).
    """
    model = cg.model
    if model is None:
        raise PassError("FSBR trains on the eager model, but the captured graph has none", "capture with fxquant.capture(model)")
    train_state.check_checkpoint_options(cfg.save_every, cfg.checkpoint_dir, cfg.resume, "FSBR", cfg.keep_last)
    base = {fqn: cg.tensors[ph] for ph, fqn in cg.fqn.items() if ph in cg.tensors}
    qlin = {f: lay for f, lay in quantized_linears(cg, exclude).items() if lay == "out_in"}
    ids = calibration_ids(calibration, model, tokenizer)
    windows = calibration_windows(ids, cfg.seq_len)
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(windows.shape[0], generator=gen)
    pick = perm[: cfg.samples]
    batches = windows[pick]
    held = heldout_windows(windows, perm, cfg.samples, cfg.holdout)
    dtype = next(t.dtype for t in base.values() if t.is_floating_point())

    if structure is None:
        structure = _structure_of(cg)
    sites = find_sites(cg, structure, qlin)
    # the norm inputs' channel alignment (fxquant.actquant): the residual stream is not changed by any fold, so the
    # float model's statistics hold for the quantized one. Trained, each decoder layer's alignments are groups of
    # their own (kind "norm_align", no sites: nothing is folded) in a copy of the plan, so they train, are kept at
    # their best epoch and are checkpointed like the scales; the final norm's (outside every layer) stays calibrated
    norms = [p for _, p in sites.norms if p is not None] if cfg.norm_bits < 16 and cfg.norm_align > 0 else []
    # one calibration pass for the SmoothQuant init and the alignment (none when both come from elsewhere)
    sq_in, sq_out = smoothquant_modules(plan, cfg.act_smooth_alpha) if init is None else ([], [])
    absmax = (channel_absmax(model, batches, inputs=sq_in + norms, outputs=sq_out, params=base)
              if sq_in or sq_out or norms else ({}, {}))
    align = norm_align_from_absmax({p: absmax[0][p] for p in norms}, cfg.norm_align)
    align_groups: dict[str, str] = {}     # group name -> norm module path
    if align and cfg.norm_align_train and cfg.epochs > 0:
        extra_groups = []
        for path, a in align.items():
            extra_groups.append(ScaleGroup(f"{path}.align", "norm_align", a.numel(), f"{path}.weight", [], [],
                                           channels=(0, a.numel())))
            align_groups[extra_groups[-1].name] = path
        plan = ScalePlan(groups=list(plan.groups) + extra_groups, skipped=list(plan.skipped))

    def initial_scales() -> dict[str, torch.Tensor]:
        start = dict(init) if init is not None else smoothquant_init(model, plan, base, batches, cfg.alpha,
                                                                                cfg.act_smooth_alpha, absmax=absmax)
        for name, path in align_groups.items():   # the calibrated alignment, unless ``init`` brings one
            if init is None or name not in start:
                start[name] = align[path]
        start = {k: v.detach().float().clone() for k, v in start.items()}
        for g in plan.groups:  # tied groups start tied
            if g.tie_half:
                blocks = start[g.name].view(-1, 2, g.tie_half)
                start[g.name] = blocks.mean(dim=1, keepdim=True).expand_as(blocks).reshape(-1).clone()
        return start

    if cfg.epochs == 0:        # SmoothQuant alone: the initial scales, no reconstruction, no weight clipping
        start = initial_scales()
        return EquivalentScales(plan=plan, scales=start, losses=[], method="fsbr", init=start,
                                extra={"clip": {}, "spec": spec, "act_bits": cfg.act_bits, "norm_align": align})
    prefix, layers = _decoder_layers(model, plan)
    # the activation quantizers of the whole model (off outside the quantized forwards) and the act-smooth hooks
    aq = EagerActQuant(model, sites, cfg.allocation(), range_grad=True, enabled=False, norm_align=align)
    smoothers: dict[str, SwiGLUSmooth] = {}
    try:
        for g in plan.groups:
            if g.kind == "swiglu":
                smoothers[g.name] = SwiGLUSmooth(model, _act_path(cg, g))
    except BaseException:
        aq.remove()
        for sm in smoothers.values():
            sm.remove()
        raise
    blocks = [_Block(plan, prefix, i, layer, model, qlin, base, spec, dtype, aq, smoothers, align_groups)
              for i, layer in enumerate(layers)]

    def release() -> None:  # the training hooks come off the model (idempotent)
        aq.remove()
        for sm in smoothers.values():
            sm.remove()
        smoothers.clear()

    n = batches.shape[0]
    per_layer = cfg.epochs * n
    total_steps = len(layers) * per_layer

    # ---- checkpoints
    fp = train_state.fingerprint(
        "fsbr", cfg, {f: base[f] for f in sorted(set(qlin) | plan.fqns())}, spec=spec, exclude=list(exclude),
        groups={g.name: [g.kind, g.size, g.tie_half] for g in plan.groups}, layers=len(layers), samples=n,
        calibration=train_state.tensor_digest(batches),
        init=None if init is None else train_state.tensor_digest({k: v.detach().float() for k, v in init.items()}))
    step = 0
    losses: list[float] = []
    block_mse: list[dict[str, Any]] = []   # per layer: the block objective at init, after each epoch, and the pick
    scales: dict[str, torch.Tensor] = {}
    clips: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
    state = None
    resume_from = train_state.resolve_resume(cfg.resume, cfg.checkpoint_dir, "FSBR")
    if resume_from is not None:
        state = train_state.load_train_state(resume_from, kind="fsbr", fingerprint=fp)
        where = f"FSBR checkpoint {resume_from}"
        step = state.step
        if not 0 <= step <= total_steps or len(state.extras.get("losses", [])) != step // n:
            raise TrainingError(f"{where} is at step {step} of {total_steps} and holds "
                                f"{len(state.extras.get('losses', []))} epoch losses",
                                "resume from a checkpoint of this run, or start again")
        start = {g.name: state.tensors[f"start.{g.name}"] for g in plan.groups if f"start.{g.name}" in state.tensors}
        if set(start) != {g.name for g in plan.groups}:
            raise TrainingError(f"{where} lacks initial scales", "resume from another checkpoint, or start again")
        losses = [float(v) for v in state.extras["losses"]]
        block_mse = [dict(r) for r in state.extras.get("block_mse", [])][: step // per_layer]
        for block in blocks[: step // per_layer]:
            s, c = _unflatten("done", state.tensors, block.groups, block.clipped, where)
            scales.update(s)
            clips.update(c)
        state.restore(generators={"data": gen})
        log.info("fsbr: resumed from %s at step %d of %d (layer %d)", resume_from, step, total_steps, step // per_layer)
    else:
        start = initial_scales()

    def save(at: int, live: dict[str, Any] | None) -> None:
        """Checkpoint after ``at`` steps; ``live``: the layer in progress (None at a layer boundary)."""
        tensors = {**{f"start.{k}": v for k, v in start.items()}, **_flatten("done", scales, clips)}
        extras: dict[str, Any] = {"losses": losses, "layer": at // per_layer, "epoch": at % per_layer // n,
                                  "sample": at % n, "layers": len(layers), "epochs": cfg.epochs, "samples": n,
                                  "block_mse": block_mse}
        opt = None
        if live is not None:
            # the trained parameters are log-scales; "cur.scale" holds the scales for readers, "cur.logscale" the
            # parameters a resume restores (exp/log would not round-trip bit for bit)
            tensors.update(_flatten("cur", live["scales"](live["s"]), live["c"]))
            tensors.update({f"cur.logscale.{k}": v for k, v in live["s"].items()})
            if live["best"] is not None:
                tensors.update(_flatten("best", *live["best"]))
            extras.update(epoch_total=live["running"], best_loss=None if live["best"] is None else live["best_loss"],
                          block_mse=block_mse + [live["mse"]])
            opt = live["opt"]
        train_state.save_train_state(train_state.step_dir(cfg.checkpoint_dir, at), kind="fsbr", step=at,
                                     tensors=tensors, optimizer=opt, generators={"data": gen}, extras=extras,
                                     fingerprint=fp, keep_last=cfg.keep_last)

    def save_due(at: int) -> bool:
        return cfg.checkpoint_dir is not None and ((cfg.save_every > 0 and at % cfg.save_every == 0)
                                                   or at == total_steps)

    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(layers) * cfg.epochs, initial=step // n, desc="fsbr", unit="epoch", leave=False)
    finished = False
    try:
        first = step // per_layer
        if first < len(layers):
            float_in = layer_inputs(model, layers[0], batches)
            quant_in = [(h.clone(), kw) for h, kw in float_in]
            for block in blocks[:first]:  # resumed: rebuild the next layer's inputs from the finished layers
                with block:
                    targets = block.float_outputs(float_in)
                    quant_in = block.quantized_outputs(quant_in, *_unflatten("done", state.tensors, block.groups,
                                                                            block.clipped, "FSBR checkpoint"))
                float_in = [(t, kw) for t, (_, kw) in zip(targets, float_in)]
        for i in range(first, len(layers)):
            block = blocks[i]
            # scales are trained in log space (s = exp(θ)): an AdamW step then moves every scale by about the same
            # *relative* amount, whatever its size (SmoothQuant's scales span 0.02 ... 10 on SmolLM2; an absolute step
            # of 5e-3 is a 25% jump for the smallest, which ran them into MIN_SCALE and wrecked the block)
            # a RoPE-tied group trains one parameter per rotary pair (the pair's gradients add up): projecting an
            # AdamW step back onto the tie instead averages two sign-normalised steps that, for q/k, point in
            # opposite directions (the untied gradient is dominated by the RoPE-breaking part) and cancel, so the
            # q/k scales never moved
            log_s = {g.name: torch.nn.Parameter(block.free(g, start[g.name].clamp(min=MIN_SCALE).log()))
                     for g in block.groups}
            c_params = block.initial_clips(cfg.clip_init)
            clip_list = [p for pair in c_params.values() for p in pair if p is not None]
            opt = torch.optim.AdamW([{"params": list(log_s.values()), "lr": cfg.lr_scale},
                                     {"params": clip_list, "lr": cfg.lr_clip}], weight_decay=0.0)
            live: dict[str, Any] = {"s": log_s, "c": c_params, "opt": opt, "best": None, "best_loss": math.inf,
                                    "running": 0.0, "mse": None, "scales": block.scales}
            e0 = b0 = 0
            resumed = state is not None and i == first and step % per_layer
            if resumed:  # resumed in the middle of this layer
                where = f"FSBR checkpoint {state.path}"
                _, cur_c = _unflatten("cur", state.tensors, block.groups, block.clipped, where)
                try:
                    cur_s = {k: state.tensors[f"cur.logscale.{k}"] for k in log_s}
                except KeyError as exc:
                    raise TrainingError(f"{where} lacks the tensor {exc.args[0]}",
                                        "resume from another checkpoint, or start again") from None
                train_state.copy_tensors({**log_s, **{f"{k}.hi": v[1] for k, v in c_params.items()},
                                          **{f"{k}.lo": v[0] for k, v in c_params.items() if v[0] is not None}},
                                         {**cur_s, **{f"{k}.hi": v[1] for k, v in cur_c.items()},
                                          **{f"{k}.lo": v[0] for k, v in cur_c.items() if v[0] is not None}}, where)
                state.restore(optimizer=opt)
                if state.extras.get("best_loss") is not None:
                    live["best"] = _unflatten("best", state.tensors, block.groups, block.clipped, where)
                    live["best_loss"] = float(state.extras["best_loss"])
                live["running"] = float(state.extras["epoch_total"])
                records = state.extras.get("block_mse", [])
                if len(records) != i + 1:
                    raise TrainingError(f"{where} holds {len(records)} block records for layer {i}",
                                        "resume from a checkpoint of this run, or start again")
                live["mse"] = dict(records[i])
                e0, b0 = divmod(step % per_layer, n)
            with block:
                targets = block.float_outputs(float_in)
                if not resumed:
                    # the candidates before any step: SmoothQuant scales with no clipping (exactly the untrained
                    # baseline) and with the initial clipping (where training starts). Keeping the best of these and
                    # of every epoch means a block never ends worse than its init on the block objective.
                    s0 = {g.name: start[g.name].clone() for g in block.groups}
                    none = {k: (None if lo is None else torch.full_like(lo, NO_CLIP), torch.full_like(hi, NO_CLIP))
                            for k, (lo, hi) in c_params.items()}
                    init_clip = _snapshot({}, c_params)[1]
                    l_none = block.loss(s0, none, quant_in, targets)
                    l_clip = block.loss(s0, init_clip, quant_in, targets)
                    live["mse"] = {"layer": i, "init": l_none, "init_clipped": l_clip, "epochs": [], "best": "init"}
                    live["best_loss"], live["best"] = l_none, (s0, none)
                    if l_clip < l_none:
                        live["best_loss"], live["best"] = l_clip, (s0, init_clip)
                        live["mse"]["best"] = "init_clipped"
                last = None
                for epoch in range(e0, cfg.epochs):
                    for b in range(b0 if epoch == e0 else 0, n):
                        h, kw = quant_in[b]
                        out = block.quantized(block.effective(block.scales(log_s), c_params), h, kw)
                        loss = F.mse_loss(out.float(), targets[b].float())
                        value = check_finite_loss(loss, epoch * n + b + 1, f"FSBR layer {i}")
                        step_log_scales(opt, loss, log_s.values())
                        live["running"] += value
                        step += 1
                        if b == n - 1:  # end of an epoch: score it on the block objective, keep the best
                            losses.append(live["running"] / n)
                            live["running"] = 0.0
                            now = block.scales(log_s)
                            score = block.loss(now, c_params, quant_in, targets)
                            live["mse"]["epochs"].append(score)
                            if score < live["best_loss"]:
                                live["best_loss"], live["best"] = score, _snapshot(now, c_params)
                                live["mse"]["best"] = f"epoch {epoch + 1}"
                            if bar is not None:
                                bar.update(1)
                                bar.set_postfix(layer=i, mse=f"{score:.3g}", init=f"{live['mse']['init']:.3g}")
                        if step % per_layer == 0:  # the layer's last step: saved below, once the layer is final
                            last = value
                            continue
                        if save_due(step):
                            save(step, live)
                        if on_step is not None:
                            on_step(step, value)
                best_s, best_c = live["best"]
                live["mse"]["trained"] = live["best_loss"]
                block_mse.append(live["mse"])
                # the next block's inputs: the float chain and the quantized chain (through the kept parameters)
                quant_in = block.quantized_outputs(quant_in, best_s, best_c)
                float_in = [(t, kw) for t, (_, kw) in zip(targets, float_in)]
            scales.update(best_s)
            clips.update(best_c)
            if save_due(step):
                save(step, None)
            if on_step is not None and last is not None:
                on_step(step, last)
        finished = True
    finally:
        if bar is not None:
            bar.close()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
        if held is None or not finished:
            release()
    for g in plan.groups:  # groups outside the decoder layers (none today) keep their init
        scales.setdefault(g.name, start[g.name])
    extra: dict[str, Any] = {"clip": clips, "spec": spec, "act_bits": cfg.act_bits, "block_mse": block_mse,
                             "kept": "trained", "norm_align": align, "norm_align_init": align}
    if held is not None:
        # the model-level guard: each block kept its best parameters on its own objective (MSE to the float block,
        # which on SmolLM2 is dominated by a few massive-activation tokens), but that does not promise a better
        # *model*; on held-out calibration windows the trained parameters must beat the untrained SmoothQuant
        # baseline (init scales, no clipping) in next-token loss, else the baseline is kept
        untrained = ({g.name: start[g.name].clone() for g in plan.groups},
                     {k: (None if lo is None else torch.full_like(lo, NO_CLIP), torch.full_like(hi, NO_CLIP))
                      for k, (lo, hi) in clips.items()})
        was_training = model.training
        model.eval()
        try:
            before = _model_loss(model, blocks, *untrained, held)
            after = _model_loss(model, blocks, scales, clips, held)
        finally:
            model.train(was_training)
            release()
        extra.update(heldout_windows=int(held.shape[0]), heldout_loss_init=before, heldout_loss_trained=after)
        if not after <= before:
            log.warning("fsbr: the trained parameters raise the next-token loss on %d held-out calibration windows "
                        "(%.4f -> %.4f); keeping the SmoothQuant init without clipping", held.shape[0], before, after)
            scales, clips = untrained
            extra.update(kept="init", clip=clips)
    # the alignments the quantizers keep: each layer's as trained (or kept by the guard), the rest calibrated
    extra["norm_align"] = {**align, **{path: scales[name].detach().float().clone()
                                       for name, path in align_groups.items()}}
    return EquivalentScales(plan=plan, scales=scales, losses=losses, method="fsbr", init=start, extra=extra)


def heldout_windows(windows: torch.Tensor, perm: torch.Tensor, samples: int, holdout: int) -> torch.Tensor | None:
    """Up to ``holdout`` calibration windows that share no token with the ``samples`` trained ones (``perm[:samples]``)
    nor with each other: windows overlap by half (:func:`calibration_windows`), so a window's neighbours are out.
    None when ``holdout`` is 0 or no window is left."""
    if holdout <= 0:
        return None
    taken = {int(j) for j in perm[:samples]}
    out: list[int] = []
    for j in perm[samples:].tolist():
        if len(out) == holdout:
            break
        if not ({j - 1, j, j + 1} & taken):
            out.append(j)
            taken.add(j)
    return windows[sorted(out)] if out else None


@torch.no_grad()
def _model_loss(model: torch.nn.Module, blocks: Sequence["_Block"], scales: Mapping[str, torch.Tensor],
                clips: Mapping[str, tuple[torch.Tensor | None, torch.Tensor]], windows: torch.Tensor) -> float:
    """Mean next-token cross-entropy of the whole model with every decoder layer quantized as trained (``scales``
    folded, ``clips`` applied to its weights, its linears' inputs fake-quantized per token), on ``windows``."""
    params: dict[str, torch.Tensor] = {}
    for block in blocks:
        eff = block.effective({g.name: scales[g.name] for g in block.groups},
                              {f: clips[f] for f in block.clipped if f in clips})
        params.update({block.local + k: v for k, v in eff.items()})
    entered: list[_Block] = []
    try:
        for block in blocks:
            block.__enter__()
            entered.append(block)
            block.set_quantized(True)
        # one window at a time (the logits of a 512-token window are 100 MB on a 49k vocabulary); equal lengths,
        # so the mean of the windows' means is the mean over all tokens
        return sum(float(_loss(model, params, windows[b:b + 1], 0.0)) for b in range(windows.shape[0])) \
            / max(1, windows.shape[0])
    finally:
        for block in entered:
            block.__exit__(None, None, None)


class TrainFSBRScales(Pass):
    """FSBR: SmoothQuant-initialised scales (incl. RoPE-tied q/k) and weight clipping, trained block by block."""

    name = "train_fsbr_scales"
    description = "FSBR: train smoothing scales and weight clipping per decoder layer against the float block output"

    def __init__(self, spec: QuantSpec, *, act_bits: int = 8, exclude: Sequence[str] = ("lm_head*",),
                 options: Mapping[str, Any] | None = None):
        if not isinstance(spec, QuantSpec):
            raise PassError(f"FSBR needs an integer QuantSpec for the weights, got {type(spec).__name__}")
        self.spec = spec
        self.exclude = tuple(exclude)
        self.options = dict(options or {})
        self.config = FSBRConfig.from_options({"act_bits": act_bits, **self.options})

    def requires(self, cg: CapturedGraph, ctx: PassContext) -> None:
        if "structure" not in ctx.artifacts:
            raise PassError("train_fsbr_scales needs the structure analysis", "run analyze_structure first")
        if ctx.calibration is None:
            raise PassError("train_fsbr_scales needs calibration data", "pass calibration=<text or token ids>")

    def call(self, cg: CapturedGraph, ctx: PassContext) -> PassResult:
        structure = ctx.artifacts["structure"]
        cfg = self.config
        plan = plan_fsbr(cg, structure, exclude=self.exclude, act_smooth=cfg.act_smooth and cfg.swiglu_bits < 16,
                         qk=cfg.attn_bits < 16)
        if cfg.act_smooth and cfg.swiglu_bits >= 16:
            plan.skipped.append(("SwiGLU act-smooth", "the SwiGLU operands are float (swiglu_bits 16): it would change "
                                                      "no quantized value"))
        if cfg.attn_bits >= 16:
            plan.skipped.append(("q/k smoothing", "Q and K are float (attn_bits 16): it would change no quantized value"))
        if not plan.groups:
            raise PassError("FSBR found no place to put a scale", "check ctx.artifacts['structure'].render()")
        tokenizer = self.options.get("tokenizer") or ctx.options.get("tokenizer")
        record = train_fsbr(cg, plan, self.spec, ctx.calibration, self.config, exclude=self.exclude, tokenizer=tokenizer,
                            structure=structure)
        ctx.artifacts["fsbr"] = record
        ctx.artifacts["norm_align"] = record.extra.get("norm_align", {})   # read by quantize_activations
        stats = {"groups": len(plan.groups), "qk_groups": sum(g.kind == "qk" for g in plan.groups),
                 "swiglu_groups": sum(g.kind == "swiglu" for g in plan.groups),
                 "norm_align_trained": sum(g.kind == "norm_align" for g in record.plan.groups),
                 "skipped": len(plan.skipped), "epochs": len(record.losses),
                 "max_scale_change": round(record.moved(), 5)}
        return PassResult(modified=False, stats=stats)

    def ensures(self, cg: CapturedGraph, ctx: PassContext) -> None:
        record = ctx.artifacts.get("fsbr")
        if not isinstance(record, EquivalentScales):
            raise PassError("train_fsbr_scales left no scales in ctx.artifacts['fsbr']", "report a bug")
        record.plan.check_scales(record.scales)


class ClipWeights(Pass):
    """Clamp each folded weight to its learned clipping bounds, so RTN reproduces FSBR's trained quantizer."""

    name = "clip_weights"
    description = "clamp folded weights to FSBR's learned per-group clipping bounds (before RTN)"

    def __init__(self, source: str = "fsbr"):
        self.source = source

    def call(self, cg: CapturedGraph, ctx: PassContext) -> PassResult:
        record = ctx.artifacts.get(self.source)
        if not isinstance(record, EquivalentScales) or "clip" not in record.extra:
            raise PassError(f"clip_weights found no learned clipping in ctx.artifacts[{self.source!r}]",
                            "run train_fsbr_scales and fold_equivalent_scales before it")
        spec, clips = record.extra["spec"], record.extra["clip"]
        n = 0
        with torch.no_grad():
            for ph, fqn in cg.fqn.items():
                if fqn in clips and ph in cg.tensors:
                    lo, hi = clips[fqn]
                    cg.tensors[ph] = clip_bounds(cg.tensors[ph], spec, lo, hi)
                    n += 1
        return PassResult(modified=False, stats={"clipped": n})


class QuantizeActivations(Pass):
    """Dynamic activation fake-quant at the allocation's positions (``fxquant.actquant``): graph nodes + eager hooks.

    ``QuantizeActivations(bits)`` quantizes the quantized linears' inputs only; ``allocation=`` adds I-LLM's
    8-bit positions (norm inputs, the SwiGLU operands, Q/K/V, the softmax output), which need the structure
    analysis. On a captured Hugging Face model the eager model gets the same quantizers as hooks (and the
    fake-quant attention), so ``model(...)`` and ``generate()`` run what the graph computes."""

    name = "quantize_activations"
    description = "dynamic per-token activation fake-quant (linear inputs; with an allocation also norm, SwiGLU, Q/K/V, softmax)"

    def __init__(self, bits: int, allocation: ActAllocation | None = None):
        if not 2 <= bits <= 16:
            raise PassError(f"activation bits must lie in 2..16, got {bits}")
        if allocation is not None and allocation.linear != bits:
            raise PassError(f"quantize_activations: bits {bits} and the allocation's linear width {allocation.linear} "
                            "disagree", "pass one of them")
        self.bits = bits
        self.allocation = allocation or ActAllocation.linear_only(bits)

    def call(self, cg: CapturedGraph, ctx: PassContext) -> PassResult:
        quantized = dict(ctx.artifacts.get("quantized_weights", {}))
        if not quantized:
            raise PassError("quantize_activations found no quantized weights", "run quantize_weights_rtn before it")
        structure = ctx.artifacts.get("structure")
        beyond = {k: v for k, v in self.allocation.active().items() if k != "linear"}
        if beyond and structure is None:
            raise PassError(f"quantize_activations needs the structure analysis to find {', '.join(beyond)} inputs",
                            "run analyze_structure first (every fsbr recipe does)")
        sites = find_sites(cg, structure if beyond else None, quantized)
        # the norm inputs' channel alignment FSBR calibrated (and trained against), when the norms are quantized
        align = dict(ctx.artifacts.get("norm_align") or {}) if self.allocation.norm < 16 else {}
        counts = insert_graph_quantizers(cg, sites, self.allocation, norm_align=align)
        if cg.model is not None:
            hooks = EagerActQuant(cg.model, sites, self.allocation, norm_align=align)
            ctx.artifacts.setdefault("activation_hooks", []).append(hooks)
            remember_runtime(cg.model, activations=(sites, self.allocation), norm_align=align)   # a checkpoint re-installs them
        for what, why in sites.skipped:
            log.warning("quantize_activations: %s left float: %s", what, why)
        return PassResult(modified=True, stats={"act_quantized": counts["linear"], "bits": self.bits,
                                                "norm_aligned": len(align),
                                                **{f"{k}_quantized": v for k, v in counts.items() if k != "linear"},
                                                "skipped": len(sites.skipped)})
