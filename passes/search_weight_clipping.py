"""``search_weight_clipping``: activation-aware weight clipping before quantization.

AWQ's clip search (Lin et al. 2024), run on the graph's weights after any folded equivalent scales.

Round-to-nearest takes each group's range from its largest weight, so one outlier weight stretches the step of
every other weight in its group. Clipping the group to a fraction ``r`` of its range trades a larger error on the
few clipped weights for a finer step on the rest. This pass picks ``r`` per output row and group, from
``1, 1 − shrink/grid, …`` down to ``1 − shrink·(grid − 1)/grid``, as the one whose quantized weights give the
least output error on calibration activations:

    err(r) = ‖X_g (Q(clamp(W_g, r)) − W_g)ᵀ‖² = Σ_rows ΔW_g H_g ΔW_gᵀ,   H_g = X_gᵀ X_g,

with ``X_g`` the input channels of group ``g`` (one ``H_g`` per group, accumulated over the windows; the error
of a candidate then costs no pass over the tokens). ``Q`` is the recipe's own weight quantizer, so the error is
exactly what quantization will do (symmetric or not, integer or minifloat, absmax or searched scale). ``r = 1``
is a candidate, so no group's output error is above plain round-to-nearest's on these activations. The chosen
clamp is written into the float weights; the quantization pass that follows then derives its scales from the
clipped range, as usual.

**Minifloat weights** (FP6 and siblings) with ``clip_scale_up: true`` also try scale ratios above 1, from just above
1 up to where the row's largest weight lands on the bottom of the top binade (E3M2: 28/16 = 1.75), another
``clip_grid`` candidates. A minifloat's values are spaced relative to its top value, so such a scale moves every
weight of the group against the grid without clipping any; it cannot be written into the weight, so the ratios
go to the FP quantization pass through ``ctx.artifacts["weight_scale_ratios"]`` (``{fqn: [out, groups]}``,
1 where the group was clipped or kept) and end up in the packed weight's stored scales. Off by default: on
SmolLM2 ``teq-fp6`` most rows pick a ratio above 1 and the searched output error drops, but the perplexity does
not follow (README, "Measured").

Contract
--------
* **requires** calibration data, the eager model behind the captured graph, and a weight spec with groups or
  per-channel scales (a per-tensor scale has no group to clip: refused with a hint).
* **call** runs ``windows`` calibration windows through the model with the graph's current weights (after any
  folded equivalent scales), hooks the input of every linear the quantization pass will quantize, searches each
  weight's clip ratios and replaces the weight by its clamped copy. With ``clip_qk: false`` the attention's
  q/k projections are left alone, as AWQ does (their output error ignores what the softmax does with it); on
  SmolLM2 clipping them too is better (W4g128, 40 windows: 38.171 with, 40.442 without, from RTN's 44.248).
  A weight it cannot clip (its module's input was never seen) is logged and listed in
  ``ctx.artifacts["clip_search_skipped"]``.
* **ensures** every clipped weight lies inside its original groups' ranges, every chosen ratio inside
  ``[1 − shrink, 1]`` (or the scale-up range), the kept scale ratios are the search's; ``ctx.artifacts["clip_search"]`` holds per weight the ratios ``[out, groups]`` and the
  per-group output error (as :func:`clip_search` sums it) before and after, on the calibration activations.

Memory: the search keeps, per linear, the diagonal blocks of its input's Gram matrix until the windows have
run — ``in × group`` floats with groups, ``in × in`` per channel (SmolLM2: ≈ 0.5 GB per channel, 80 MB with
groups of 128).

Options (recipe ``options:``, method ``teq``): ``clip`` (true/false), ``clip_grid`` (40), ``clip_shrink`` (0.5),
``clip_windows`` (32), ``clip_qk`` (true), ``clip_scale_up`` (false; minifloat weights only). On SmolLM2 W4g128 from the searched TEQ init (40 test windows), grid
20 / 8 windows gave 38.124, grid 40 37.546, 32 windows 37.507, both 37.150 (RTN 44.248, FP32 28.738).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from fxquant.calibration import (calibration_ids, calibration_windows, run_windows, split_holdout,
                                 spread_windows)
from fxquant.capture import CapturedGraph
from fxquant.errors import PassError
from fxquant.pipeline import Pass, PassContext, PassOptions, PassResult, replace_weight

log = logging.getLogger("fxquant")

__all__ = ["SearchWeightClipping", "ClipConfig", "clip_search"]


@dataclass
class ClipConfig(PassOptions):
    """The clip search's settings (option names carry a ``clip_`` prefix, except ``clip`` itself)."""

    clip: bool = True          # run the search (false: the pass is left out of the pipeline)
    clip_grid: int = 40        # ratios tried per group
    clip_shrink: float = 0.5   # the smallest ratio is 1 - shrink * (grid - 1) / grid
    clip_windows: int = 32     # calibration windows whose activations the search uses
    clip_qk: bool = True       # also clip the attention's q and k projections (AWQ skips them)
    clip_scale_up: bool = False  # minifloat weights: also try scales that put the top weight inside the top binade

    positive_ints = ("clip_grid", "clip_windows")
    bools = ("clip", "clip_qk", "clip_scale_up")

    def check(self) -> None:
        if isinstance(self.clip_shrink, bool) or not 0 < self.clip_shrink < 1:
            raise PassError(f"clip_shrink is the largest fraction of a group's range that may be cut, in (0, 1); "
                            f"got {self.clip_shrink!r}", "e.g. options: {clip_shrink: 0.5} (AWQ's)")

    def ratios(self) -> list[float]:
        return [1.0 - self.clip_shrink * i / self.clip_grid for i in range(self.clip_grid)]

    def up_ratios(self, spec: Any) -> list[float]:
        """Scale ratios above 1 for a minifloat ``spec`` (none for integer weights, whose levels are uniform): from
        just above 1 to ``top = max_value / 2^⌊log2 max_value⌋`` (E3M2: 28 / 16 = 1.75), where the largest weight
        lands on the bottom of the top binade; past it the top binade would go unused."""
        fmt = getattr(spec, "format", None)
        if not self.clip_scale_up or fmt is None or not hasattr(fmt, "max_value"):
            return []
        top = fmt.max_value / 2.0 ** math.floor(math.log2(fmt.max_value))
        return [1.0 + (top - 1.0) * i / self.clip_grid for i in range(1, self.clip_grid + 1)] if top > 1 else []


def statistics_problem(h: torch.Tensor | None) -> str | None:
    """Why a weight's input statistics (a Gram matrix, or its blocks) cannot be used, or None."""
    if h is None:
        return "its module's input was never seen on the calibration windows"
    if not bool(torch.isfinite(h).all()):
        return "non-finite activations on the calibration windows"
    return None


def _grouping(spec: Any, in_features: int) -> tuple[int, int]:
    """(group size, number of groups) along the input dimension, the last group possibly shorter."""
    g = getattr(spec, "group_size", None) or in_features
    g = min(g, in_features)
    return g, math.ceil(in_features / g)


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))


@torch.no_grad()
def clip_search(w: torch.Tensor, blocks: torch.Tensor, quantizer: Any, group: int,
                ratios: Sequence[float], up_ratios: Sequence[float] = (),
                scaled_quantizer: Any = None) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Search one weight's clip ratios (and, with ``up_ratios``, scale ratios above 1).

    ``w``: ``[out, in]`` float weight; ``blocks``: ``[groups, group, group]``, the diagonal blocks of ``XᵀX`` over
    the calibration inputs (the input zero-padded to ``groups · group`` channels); ``quantizer``: ``[out, in] ->
    [out, in]`` fake quantizer. ``up_ratios`` (all > 1) are tried through ``scaled_quantizer(w, ratio [out,
    groups])``, the quantizer with its scales multiplied by the ratios: a minifloat's values are spaced
    relative to its top value, so a scale that puts the group's largest weight inside the top binade rather than
    on the top value moves every other weight against the grid too — without clipping anything. Returns
    ``(clipped weight, ratios [out, groups], error before, error after)``: the weight is clamped where the ratio
    is below 1 and untouched where it is 1 or more (those ratios go to the quantizer as ``scale_ratio``); the
    errors are ``Σ_g ‖X_g (Q(·)_g − W_g)ᵀ‖²``: each group's own share of the output error, summed (the cross
    terms between groups of a row are what a per-group choice cannot see, and are left out, as in AWQ).
    """
    out, k = w.shape
    ng = blocks.shape[0]
    w32 = w.float()
    wp = _pad(w32, ng * group).view(out, ng, group)
    hi = wp.amax(dim=2).clamp(min=0)          # zero padding never widens a range that the quantizer sees
    lo = wp.amin(dim=2).clamp(max=0)

    def expand(v: torch.Tensor) -> torch.Tensor:           # [out, groups] -> [out, in]
        return v.repeat_interleave(group, dim=1)[:, :k]

    def error(deq: torch.Tensor) -> torch.Tensor:          # [out, groups], of a quantize-dequantized weight
        delta = _pad(deq.float() - w32, ng * group).view(out, ng, group).transpose(0, 1)
        return ((delta @ blocks) * delta).sum(dim=2).t()

    if up_ratios and scaled_quantizer is None:
        raise ValueError("clip_search: up_ratios need a scaled_quantizer")
    best_err = error(quantizer(w))
    before = float(best_err.sum())
    best_r = torch.ones(out, ng, dtype=torch.float32, device=w.device)
    for r in [*ratios[1:], *up_ratios]:
        if r <= 1:   # clip the group to r of its range; the quantizer takes its scale from the clipped range
            deq = quantizer(torch.minimum(torch.maximum(w32, expand(lo * r)), expand(hi * r)).to(w.dtype))
        else:        # keep the weight, multiply the quantizer's scales by r
            deq = scaled_quantizer(w, torch.full_like(best_r, r))
        err = error(deq)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    cut = best_r.clamp(max=1)
    clipped = torch.minimum(torch.maximum(w32, expand(lo * cut)), expand(hi * cut)).to(w.dtype)
    return clipped, best_r, before, float(best_err.sum())


class SearchWeightClipping(Pass):
    """Clip every quantized linear weight to the per-group range that minimises its quantized output error."""

    name = "search_weight_clipping"
    description = "activation-aware weight clipping: per row and group, the clip ratio with the least output error"

    def __init__(self, spec: Any, *, exclude: Sequence[str] = ("lm_head*",), options: Mapping[str, Any] | None = None):
        from fxquant.passes.train_teq_scales import weight_quantizer
        self.spec = spec
        self.exclude = tuple(exclude)
        self.options = dict(options or {})
        self.config = ClipConfig.from_options(self.options)
        self.quantizer = weight_quantizer(spec)
        self.up_ratios = self.config.up_ratios(spec)
        self.scaled_quantizer = None
        if self.up_ratios:
            from fxquant.fpformats import fp_fake_quantize
            self.scaled_quantizer = lambda w, r: fp_fake_quantize(w, spec, ste=False, scale_ratio=r)

    def requires(self, cg: CapturedGraph, ctx: PassContext) -> None:
        if ctx.calibration is None:
            raise PassError("search_weight_clipping needs calibration data (it scores clip ratios on real activations)",
                            "pass calibration=<text or token ids> to fxquant.quantize, or options: {clip: false}")
        if getattr(cg, "model", None) is None:
            raise PassError("search_weight_clipping runs the eager model, but the captured graph has none",
                            "capture with fxquant.capture(model) (which keeps the model)")
        if getattr(self.spec, "per_tensor", False):
            raise PassError("search_weight_clipping clips per row and group, "
                            "but the weight spec has one scale per tensor",
                            "use per-channel or group scales, or options: {clip: false}")

    def _skip_qk(self, ctx: PassContext) -> set[str]:
        if self.config.clip_qk:
            return set()
        structure = ctx.artifacts.get("structure")
        return {fqn for att in getattr(structure, "attentions", []) for fqn in (att.q, att.k) if fqn}

    @torch.no_grad()
    def call(self, cg: CapturedGraph, ctx: PassContext) -> PassResult:
        from fxquant.passes.train_teq_scales import TEQConfig, quantized_linears
        cfg = self.config
        model = cg.model
        qlin = quantized_linears(cg, self.exclude)
        skipped: dict[str, str] = {fqn: "attention q/k (clip_qk: false)" for fqn in self._skip_qk(ctx) if fqn in qlin}
        todo = {fqn: layout for fqn, layout in qlin.items() if fqn not in skipped}
        params = {fqn: cg.tensors[ph] for ph, fqn in cg.fqn.items() if ph in cg.tensors}
        # TEQ's windows (its seq_len, its held-out windows left out), so the search never scores on held-out text
        seq_len = int(self.options.get("seq_len", TEQConfig.seq_len))
        tokenizer = self.options.get("tokenizer") or ctx.options.get("tokenizer")
        windows, _ = split_holdout(calibration_windows(calibration_ids(ctx.calibration, model, tokenizer), seq_len),
                                   int(self.options.get("holdout", TEQConfig.holdout)))
        picked = spread_windows(windows, cfg.clip_windows)
        device = next(iter(params.values())).device

        blocks: dict[str, torch.Tensor] = {}
        hooks = []
        for fqn in todo:
            try:
                module = model.get_submodule(fqn.rsplit(".", 1)[0])
            except AttributeError:
                skipped[fqn] = "no module of that name to read its input from"
                continue
            w = params[fqn]
            in_features = w.shape[1] if todo[fqn] == "out_in" else w.shape[0]
            group, ng = _grouping(self.spec, in_features)

            def hook(mod, args, fqn=fqn, group=group, ng=ng, k=in_features):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                if x.shape[-1] != k:
                    return
                xb = _pad(x, ng * group).view(-1, ng, group).transpose(0, 1)     # [groups, tokens, group]
                h = xb.transpose(1, 2) @ xb
                blocks[fqn] = blocks[fqn] + h if fqn in blocks else h
            hooks.append(module.register_forward_pre_hook(hook))
        run_windows(model, params, picked.to(device), hooks)

        names_of: dict[str, list[str]] = {}
        for ph, fqn in cg.fqn.items():
            names_of.setdefault(fqn, []).append(ph)
        record: dict[str, dict] = {}
        scale_ratios: dict[str, torch.Tensor] = {}
        ratios = cfg.ratios()
        total_before = total_after = 0.0
        for fqn, layout in todo.items():
            if fqn in skipped:
                continue
            h = blocks.pop(fqn, None)
            why = statistics_problem(h)
            if why is not None:
                skipped[fqn] = why
                continue
            w = params[fqn]
            w_oi = w.t() if layout == "in_out" else w
            group = h.shape[1]
            # the row ranges before clipping (replace_weight may overwrite the tensor in place)
            rng = (w_oi.float().amin(dim=1).cpu(), w_oi.float().amax(dim=1).cpu())
            clipped, r, before, after = clip_search(w_oi, h, self.quantizer, group, ratios, self.up_ratios,
                                                    self.scaled_quantizer)
            new = clipped.t().contiguous() if layout == "in_out" else clipped
            replace_weight(cg, ctx, names_of[fqn], new)
            if bool((r > 1).any()):
                scale_ratios[fqn] = r.clamp(min=1).cpu()
            record[fqn] = {"ratios": r.cpu(), "error_before": before, "error_after": after, "range": rng}
            total_before += before
            total_after += after
        for fqn, why in skipped.items():
            log.info("search_weight_clipping: left %s unclipped: %s", fqn, why)
        ctx.artifacts["clip_search"] = record
        ctx.artifacts["weight_scale_ratios"] = scale_ratios
        ctx.artifacts["clip_search_skipped"] = dict(skipped)
        all_r = torch.cat([v["ratios"].reshape(-1) for v in record.values()]) if record else torch.ones(1)
        stats = {"clipped": len(record), "skipped": len(skipped), "windows": int(picked.shape[0]),
                 "groups_clipped": round(float((all_r < 1).float().mean()), 4),
                 "groups_scaled_up": round(float((all_r > 1).float().mean()), 4),
                 "mean_ratio": round(float(all_r.mean()), 4),
                 "output_error_ratio": round(total_after / total_before, 4) if total_before > 0 else 1.0}
        log.info("search_weight_clipping: %s", stats)
        return PassResult(modified=bool(record), stats=stats)

    def ensures(self, cg: CapturedGraph, ctx: PassContext) -> None:
        low = 1.0 - self.config.clip_shrink - 1e-6
        high = max(self.up_ratios, default=1.0) + 1e-6
        tensors = {fqn: cg.tensors[ph] for ph, fqn in cg.fqn.items() if ph in cg.tensors}
        from fxquant.passes.train_teq_scales import quantized_linears
        layouts = quantized_linears(cg, self.exclude)
        for fqn, rec in ctx.artifacts.get("clip_search", {}).items():
            r = rec["ratios"]
            if not bool(((r >= low) & (r <= high)).all()):
                raise PassError(f"search_weight_clipping chose a ratio outside [{low:.3f}, {high:.3f}] for {fqn}",
                                "report a bug")
            up = ctx.artifacts.get("weight_scale_ratios", {}).get(fqn)
            if not torch.equal(up if up is not None else torch.ones_like(r), r.clamp(min=1)):
                raise PassError(f"search_weight_clipping: the scale ratios kept for {fqn} are not its search's",
                                "report a bug")
            w = tensors[fqn]
            w = (w.t() if layouts.get(fqn) == "in_out" else w).float()
            lo, hi = rec["range"]
            if bool((w.amin(dim=1).cpu() < lo - 1e-6).any() or (w.amax(dim=1).cpu() > hi + 1e-6).any()):
                raise PassError(f"search_weight_clipping widened the range of {fqn}", "report a bug")
