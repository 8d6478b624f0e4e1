"""``train_teq_scales`` — TEQ: train one per-channel scale per group against fake-quantized weights.

TEQ (Cheng et al., 2023; METHODS.md §1) inserts ``y = linear(x ⊘ s, FQ(W · diag(s)))`` at every place the
structure analysis found (norm -> {q,k,v}, norm -> {gate,up}, v -> o with grouped-query sharing, up -> down) and
trains only ``s``. This pass does the training; :class:`~fxquant.passes.fold_equivalent_scales.FoldEquivalentScales`
then folds the result into the weights. Analysis/training and rewriting are separate passes so that the graph a
dump shows after ``train_teq_scales`` is still the float one, and so that FSBR reuses the same fold.

How it trains
-------------
The float function is unchanged by any ``s``, so ``linear(x ⊘ s, FQ(W · diag(s)))`` is the same as running the
model with the *folded* weights — producer ``⊘ s``, consumer ``· s`` — and then fake-quantizing every quantized
linear weight. That is what each step does, through :meth:`ScalePlan.apply` (the very function the fold uses)
and ``torch.func.functional_call`` on the eager model (fast, no graph surgery, no hooks left behind). Weights
read from ``cg.tensors``, so an earlier pass's rewrite is seen. The fake quantizer is the recipe's: integer
``fake_quantize(w, spec, ste=True)`` or minifloat ``fp_fake_quantize`` — a straight-through estimator, so the
gradient reaches ``s`` through ``W · diag(s)`` and through the producer's ``1/s``.

* init: by default AWQ's activation-aware scales (:func:`awq_init`: per group, the exponent of ``mean|x|`` that
  minimises the quantized consumers' output error), which on SmolLM2 alone close 33 % (W4g128) and 51 %
  (W3g128) of RTN's perplexity gap to FP32 before any training; ``init: ones`` starts from the identity as the
  paper does;
* loss: causal-LM cross-entropy on calibration windows (the original recipe), plus optionally
  ``distill`` × KL(float logits ‖ quantized logits) — the float model's own predictions as soft targets;
* Adam, lr 1e-3, linear warm-up over the first 5 % of steps then linear decay to 0, default 1000 steps;
  ``s`` is clamped to ≥ 1e-5 after every step;
* deterministic for a seed (the windows are drawn from a seeded generator; CPU kernels are deterministic);
* a NaN/Inf loss stops training with an error naming the step (:func:`fxquant.guards.check_finite_loss`);
* resumable: with ``checkpoint_dir`` it writes a checkpoint (:mod:`fxquant.train_state`: the scales, Adam's
  moments, the scheduler, the data generator, the step and the loss curve) every ``save_every`` steps and at the
  end; ``resume`` continues from one and ends with the same scales, bit for bit, as the uninterrupted run.

Options (recipe ``options``, all optional): ``steps`` (1000), ``lr`` (1e-3), ``warmup`` (0.05), ``seq_len`` (512),
``batch_size`` (4), ``seed`` (0), ``distill`` (0.0: pure causal-LM loss; 1.0: pure distillation), ``progress``
(True), ``tokenizer`` (to tokenize text calibration; found from the model's name otherwise), ``save_every`` (0: no
intermediate checkpoints), ``checkpoint_dir`` (None: no checkpoints; ``step-<N>/`` folders inside), ``resume``
(None; a checkpoint folder, or true / "auto": the latest complete one in ``checkpoint_dir``, if any), ``holdout``
(8: calibration windows kept out of training; if the trained scales give a higher loss on them than the initial
scales, the initial scales are kept and a warning says so; 0 turns the check off), ``init`` ("awq", the
default: :func:`awq_init`'s activation-aware search with ``init_grid`` (20) exponents per family on
``init_windows`` (8) calibration windows, or "ones": the paper's identity start; a searched init must also beat
the identity on the held-out windows), ``check_every`` (100: the held-out loss is also measured every N steps and
the best scales seen are returned when they beat both the end of training and the init — a long schedule that
drifts keeps its best point, not only its start; 0: the end only; checks and the best scales are in checkpoints).
``steps: 0`` trains nothing: with ``init: awq`` that is AWQ's scales alone.

``objective`` ("model", the paper's: the whole model's next-token loss, the options above) or "block"
(:func:`train_blocks`: one decoder layer at a time, the output error of the quantized layer against the float
layer, FSBR's schedule; it reads ``block_samples`` (32 calibration windows), ``block_epochs`` (4), ``block_lr``
(5e-3, Adam on ``log s``) and ``block_loss`` ("mse" or "relative": :func:`block_error`) and ignores ``steps``,
``lr``, ``batch_size``, ``warmup``, ``distill`` and
``check_every``). The block objective's quantizer is the recipe's with the gradient of its range added
(:func:`range_aware_quantizer`); it ends with the same held-out guard, and does not checkpoint (one pass over the
layers: about 30 minutes for SmolLM2 on 2 CPU cores, against hours for the default end-to-end budget).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from fxquant.calibration import (calibration_ids, calibration_windows, model_logits, run_windows,  # noqa: F401
                                 spread_windows, split_holdout)  # (re-exported: TEQ's public helpers before)
from fxquant.capture import CapturedGraph
from fxquant import train_state
from fxquant.errors import PassError, TrainingError
from fxquant.guards import check_finite_loss
from fxquant.passes.fold_equivalent_scales import (MIN_SCALE, EquivalentScales, ScalePlan, ScaleSite,
                                                   linear_weights, plan_scales)
from fxquant.passes.quantize_weights_rtn import matches
from fxquant.pipeline import Pass, PassContext, PassResult

log = logging.getLogger("fxquant")

__all__ = ["TrainTEQScales", "TEQConfig", "train_scales", "train_blocks", "block_error", "range_aware_quantizer",
           "awq_init", "quantized_loss", "teq_objective",
           "weight_quantizer", "calibration_ids", "calibration_windows", "spread_windows", "run_windows",
           "linear_warmup_decay"]

#: a weight fake-quantizer with a straight-through estimator: [out, in] float -> same shape, same dtype
Quantizer = Callable[[torch.Tensor], torch.Tensor]

#: how TEQ's scales start (option ``init``)
INITS = ("ones", "awq")
#: what TEQ's scales are trained to minimise (option ``objective``)
OBJECTIVES = ("model", "block")
#: the block objective's error measure (option ``block_loss``, :func:`block_error`)
BLOCK_LOSSES = ("mse", "relative")


@dataclass
class TEQConfig:
    """TEQ's training settings (the defaults are the paper's / METHODS.md §1)."""

    steps: int = 1000
    lr: float = 1e-3
    warmup: float = 0.05
    seq_len: int = 512
    batch_size: int = 4
    seed: int = 0
    distill: float = 0.0
    progress: bool = True
    save_every: int = 0                 # checkpoint every N steps (0: only at the end, when checkpoint_dir is set)
    checkpoint_dir: str | None = None   # where step-<N>/ checkpoints go (None: no checkpoints)
    resume: Any = None                  # a checkpoint folder, or True / "auto": the latest in checkpoint_dir
    keep_last: int = 0                  # keep only the newest N checkpoints (0: keep every one)
    holdout: int = 8                    # calibration windows never trained on, to check the result (0: no check)
    init: str = "awq"                   # "awq": searched activation-aware scales | "ones" (the paper's identity)
    init_grid: int = 20                 # "awq": exponents alpha = 0, 1/grid, ..., (grid - 1)/grid tried per group
    init_windows: int = 8               # "awq": calibration windows whose activations the search uses
    check_every: int = 100              # held-out loss every N steps; the best scales seen are kept (0: end only)
    objective: str = "model"            # "model": next-token loss of the whole model | "block": layer by layer
    block_samples: int = 32             # "block": calibration windows whose layer inputs are cached
    block_epochs: int = 4               # "block": epochs over them per decoder layer
    block_lr: float = 5e-3              # "block": Adam lr of the log-scales (a relative step per scale)
    block_loss: str = "mse"             # "block": "mse" over all elements | "relative": per-token relative error

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "TEQConfig":
        known = set(cls.__dataclass_fields__)
        cfg = cls(**{k: v for k, v in options.items() if k in known})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise PassError(f"TEQ steps must be a non-negative integer, got {self.steps!r}",
                            "e.g. options: {steps: 1000}; 0 keeps the init (with init: awq, AWQ's searched scales)")
        if not self.lr > 0:
            raise PassError(f"TEQ lr must be positive, got {self.lr!r}", "e.g. options: {lr: 0.001}")
        if not 0 <= self.warmup < 1:
            raise PassError(f"TEQ warmup is a fraction of the steps in [0, 1), got {self.warmup!r}")
        if self.seq_len < 2 or self.batch_size < 1:
            raise PassError(f"TEQ needs seq_len >= 2 and batch_size >= 1, got {self.seq_len}, {self.batch_size}")
        if not isinstance(self.holdout, int) or isinstance(self.holdout, bool) or self.holdout < 0:
            raise PassError(f"TEQ holdout is a number of calibration windows (>= 0), got {self.holdout!r}",
                            "e.g. options: {holdout: 4}; 0 turns the held-out check off")
        if not 0 <= self.distill <= 1:
            raise PassError(f"TEQ distill weight must lie in [0, 1], got {self.distill!r}",
                            "0: causal-LM loss only (the paper), 1: distillation only")
        if self.init not in INITS:
            raise PassError(f"TEQ init must be one of {', '.join(INITS)}, got {self.init!r}",
                            "ones: start from the identity (the paper); awq: searched activation-aware scales")
        if not isinstance(self.check_every, int) or isinstance(self.check_every, bool) or self.check_every < 0:
            raise PassError(f"TEQ check_every is a number of steps (>= 0), got {self.check_every!r}",
                            "e.g. options: {check_every: 20}; 0 checks the held-out loss at the end only")
        if self.objective not in OBJECTIVES:
            raise PassError(f"TEQ objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}",
                            "model: the whole model's next-token loss (the paper); block: each decoder layer's output "
                            "error against the float layer, one layer at a time")
        if isinstance(self.block_lr, bool) or not isinstance(self.block_lr, (int, float)) or not self.block_lr > 0:
            raise PassError(f"TEQ block_lr must be a positive number, got {self.block_lr!r}",
                            "e.g. options: {block_lr: 5.0e-3}")
        if self.block_loss not in BLOCK_LOSSES:
            raise PassError(f"TEQ block_loss must be one of {', '.join(BLOCK_LOSSES)}, got {self.block_loss!r}",
                            "mse: squared error over all elements; relative: per-token error over the token's norm")
        if self.objective == "block" and (self.checkpoint_dir is not None or self.resume not in (None, False)):
            raise PassError("TEQ's block objective does not checkpoint (one pass over the layers: ~30 min for SmolLM2 "
                            "on 2 CPU cores)",
                            "drop checkpoint_dir / resume, or use objective: model")
        if not isinstance(self.block_epochs, int) or isinstance(self.block_epochs, bool) or self.block_epochs < 0:
            raise PassError(f"TEQ block_epochs must be a non-negative integer, got {self.block_epochs!r}",
                            "e.g. options: {block_epochs: 4}; 0 keeps the init")
        for key in ("init_grid", "init_windows", "block_samples"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PassError(f"TEQ {key} must be a positive integer, got {value!r}", f"e.g. options: {{{key}: 4}}")
        train_state.check_checkpoint_options(self.save_every, self.checkpoint_dir, self.resume, "TEQ", self.keep_last)


def weight_quantizer(spec: Any) -> Quantizer:
    """The STE fake quantizer of a weight spec: integer :class:`QuantSpec` or minifloat :class:`FPQuantSpec`."""
    from fxquant.fpformats import FPQuantSpec, fp_fake_quantize
    from fxquant.quant import QuantSpec, fake_quantize
    if isinstance(spec, QuantSpec):
        return lambda w: fake_quantize(w, spec, ste=True)
    if isinstance(spec, FPQuantSpec):
        return lambda w: fp_fake_quantize(w, spec, ste=True)
    raise PassError(f"TEQ has no fake quantizer for a {type(spec).__name__}",
                    "use fxquant.quant.QuantSpec (integer) or fxquant.fpformats.FPQuantSpec (FP6 and siblings)")


def linear_warmup_decay(steps: int, warmup: float) -> Callable[[int], float]:
    """LR multiplier: linear from ~0 to 1 over ``warmup · steps`` steps, then linear down to 0 at ``steps``."""
    n_warm = max(1, int(round(warmup * steps))) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return max(0.0, (steps - step) / max(1, steps - n_warm))
    return factor


# ---- the training loop ------------------------------------------------------------------------------------
def teq_objective(logits: torch.Tensor, batch: torch.Tensor, distill: float,
                  teacher: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """TEQ's training loss ``(1 - distill) · CE(next token) + distill · KL(float ‖ quantized)`` of one batch.

    ``logits``: the quantized model's, cut to the predicting positions (``[:, :-1]``); ``teacher()``: the float
    model's logits cut the same way, called (under no_grad) only when ``distill > 0``. Also the loss the
    ``examples/bench_teq.py`` loop gives Neural Compressor's model, so both TEQs optimise the same objective."""
    vocab = logits.shape[-1]
    loss = torch.zeros((), device=logits.device)
    if distill < 1:
        loss = loss + (1 - distill) * F.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))
    if distill > 0:
        if teacher is None:
            raise PassError("a distillation weight needs the float model's logits", "pass teacher=, or distill: 0")
        with torch.no_grad():
            target = teacher().float()
        kl = F.kl_div(F.log_softmax(logits, -1).reshape(-1, vocab), F.log_softmax(target, -1).reshape(-1, vocab),
                      log_target=True, reduction="batchmean")
        loss = loss + distill * kl
    return loss


def _loss(model: torch.nn.Module, params: dict[str, torch.Tensor], batch: torch.Tensor, distill: float) -> torch.Tensor:
    """:func:`teq_objective` of ``model`` with ``params`` (the float model itself, no params, is the teacher)."""
    return teq_objective(model_logits(model, params, batch)[:, :-1].float(), batch, distill,
                         lambda: model_logits(model, {}, batch)[:, :-1])


def _quantized_params(cg: CapturedGraph, plan: ScalePlan, quantizer: Quantizer, scales: Mapping[str, torch.Tensor],
                      exclude: Sequence[str]) -> dict[str, torch.Tensor]:
    base = {fqn: cg.tensors[ph] for ph, fqn in cg.fqn.items() if ph in cg.tensors}
    qlin = quantized_linears(cg, exclude)
    dtype = next(t.dtype for t in base.values() if t.is_floating_point())
    typed = {k: v.to(dtype) for k, v in scales.items()}
    out = {}
    for fqn in sorted(set(qlin) | plan.fqns()):
        w = plan.apply_one(fqn, base[fqn], typed)
        if fqn in qlin:
            w = quantizer(w.t()).t() if qlin[fqn] == "in_out" else quantizer(w)
        out[fqn] = w
    return out


@torch.no_grad()
def quantized_loss(cg: CapturedGraph, plan: ScalePlan, quantizer: Quantizer, scales: Mapping[str, torch.Tensor],
                   input_ids: torch.Tensor, *, distill: float = 0.0, exclude: Sequence[str] = ("lm_head*",)) -> float:
    """The training loss of the model with ``scales`` folded and its weights fake-quantized, on ``input_ids``
    (a fixed batch): what TEQ minimises, for checking that training lowered it."""
    params = _quantized_params(cg, plan, quantizer, scales, exclude)
    return float(_loss(cg.model, params, input_ids, distill))


def quantized_linears(cg: CapturedGraph, exclude: Sequence[str]) -> dict[str, str]:
    """FQN -> layout of the linear weights the later quantization pass will quantize (not excluded, not tied to a
    non-linear tensor such as the token embedding)."""
    layouts = linear_weights(cg)
    owners: dict[tuple, set[str]] = {}
    for ph, fqn in cg.fqn.items():
        t = cg.tensors.get(ph)
        if t is not None:
            owners.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), set()).add(fqn)
    out = {}
    for fqn, layout in layouts.items():
        if any(matches(fqn, p) for p in exclude):
            continue
        t = next(cg.tensors[ph] for ph, f in cg.fqn.items() if f == fqn)
        sharers = owners.get((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), set())
        if any(s not in layouts for s in sharers):
            continue
        out[fqn] = layout
    return out


@torch.no_grad()
def awq_init(cg: CapturedGraph, plan: ScalePlan, quantizer: Quantizer, windows: torch.Tensor, *,
             exclude: Sequence[str] = ("lm_head*",), grid: int = 20) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Activation-aware initial scales (AWQ's search, Lin et al. 2024, as TEQ's init — METHODS.md §1 allows "an
    AWQ/SmoothQuant statistic"). Per group, two families of candidates, each normalised to ``sqrt(max·min) = 1``:
    ``s = x̄^α`` (AWQ) and ``s = x̄^α / w̄^(1-α)`` (AWQ's "duo" form), α in ``0, 1/grid, … (grid-1)/grid``, where
    ``x̄`` is the mean ``|x|`` of the group's input channel on the activations of ``windows`` and ``w̄`` the mean over
    the consumers' rows of ``|W|`` relative to its row's maximum. The candidate kept minimises the squared error of
    the group's quantized consumer outputs, ``Σ ‖(x ⊘ s) FQ(W·diag(s))ᵀ − x Wᵀ‖²``, computed exactly as
    ``Σ_rows ΔW H ΔWᵀ`` with ``ΔW = FQ(W·diag(s))·diag(1/s) − W`` and ``H = Σ xᵀx`` (one K×K matrix per group, so
    the search costs no pass over the tokens per candidate and no activation is stored).

    ``s = 1`` (plain RTN, α = 0 of the first family) is a candidate, so no group's error is above RTN's on these
    activations. A group whose consumers are not quantized, or whose input was not seen, keeps ``s = 1``.
    Returns ``(scales, {group: {"alpha": α, "form": "x" | "duo", "gain": error(s=1) / error(s)}})``.
    """
    model = cg.model
    base = {fqn: cg.tensors[ph] for ph, fqn in cg.fqn.items() if ph in cg.tensors}
    qlin = quantized_linears(cg, exclude)
    dtype = next((t.dtype for t in base.values() if t.is_floating_point()), torch.float32)
    gram: dict[str, torch.Tensor] = {}
    absum: dict[str, torch.Tensor] = {}
    hooks = []
    reader: dict[str, str] = {}   # the consumer whose module input is the group's input (the first one found)
    for g in plan.groups:
        for fqn in g.consumers:
            try:
                module = model.get_submodule(fqn.rsplit(".", 1)[0])
            except AttributeError:
                continue
            reader[g.name] = fqn

            def hook(mod, args, name=g.name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                h, a = x.t() @ x, x.abs().sum(dim=0)
                if name in gram:
                    gram[name] += h
                    absum[name] += a
                else:
                    gram[name], absum[name] = h, a
            hooks.append(module.register_forward_pre_hook(hook))
            break
    run_windows(model, base, windows, hooks)

    def out_in(fqn: str, w: torch.Tensor) -> torch.Tensor:   # [out, in] whatever the stored layout
        return w.t() if qlin[fqn] == "in_out" else w

    def fq(fqn: str, w: torch.Tensor) -> torch.Tensor:
        return quantizer(w.t()).t() if qlin[fqn] == "in_out" else quantizer(w)

    scales: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}
    tokens = windows.numel()
    for g in plan.groups:
        scales[g.name] = torch.ones(g.size)
        sites = [site for site in g.sites if site.power > 0 and site.fqn in qlin]
        if g.name not in gram or not sites:
            continue
        h = gram.pop(g.name)
        if not bool(torch.isfinite(h).all()):
            # NaN/Inf activations: no statistic to search with; training (or quantization) reports the cause
            log.warning("teq: awq init: non-finite activations into %s; its scale starts at 1", g.name)
            absum.pop(g.name, None)
            continue
        first = next(site for site in g.sites if site.fqn == reader[g.name] and site.power > 0)
        dev = h.device

        def per_entry(values: torch.Tensor, site: ScaleSite) -> tuple[torch.Tensor, torch.Tensor]:
            """(sum, count) of an input-channel statistic over the positions that take each scale entry."""
            idx = site.index.to(dev)
            total = torch.zeros(g.size, device=dev).index_add_(0, idx, values[site.positions.to(dev)])
            return total, torch.zeros(g.size, device=dev).index_add_(0, idx, torch.ones(idx.numel(), device=dev))
        # x̄: a GQA-shared entry is the mean over the query heads that read it
        xs, xc = per_entry(absum.pop(g.name) / tokens, first)
        xbar = (xs / xc.clamp(min=1)).clamp(min=1e-4)
        ws = torch.zeros(g.size, device=dev)
        wc = torch.zeros(g.size, device=dev)
        for site in sites:
            w = out_in(site.fqn, base[site.fqn]).detach().float().abs()
            rel = (w / w.amax(dim=1, keepdim=True).clamp(min=1e-12)).mean(dim=0)
            a, c = per_entry(rel, site)
            ws, wc = ws + a, wc + c
        wbar = (ws / wc.clamp(min=1)).clamp(min=1e-4)

        def error(s: torch.Tensor) -> float:
            typed = {g.name: s.to(dtype)}
            total = 0.0
            for site in sites:
                w = base[site.fqn]
                divide = torch.ones(h.shape[0], device=dev)
                divide[site.positions.to(dev)] = s[site.index.to(dev)]
                delta = out_in(site.fqn, fq(site.fqn, plan.apply_one(site.fqn, w, typed))).float() / divide \
                    - out_in(site.fqn, w).float()
                total += float(((delta @ h) * delta).sum())
            return total

        baseline = error(torch.ones(g.size, device=dev))
        best = (baseline, 0.0, "x", torch.ones(g.size, device=dev))
        for form in ("x", "duo"):
            for k in range(grid):
                alpha = k / grid
                if form == "x" and k == 0:
                    continue                      # s = 1: the baseline above
                cand = xbar ** alpha if form == "x" else xbar ** alpha / wbar ** (1 - alpha)
                cand = cand / (cand.max() * cand.min()).sqrt()
                if g.tie_half:
                    cand = cand.view(-1, 2, g.tie_half).mean(dim=1, keepdim=True).expand(-1, 2, -1).reshape(-1)
                cand = cand.clamp(min=MIN_SCALE)
                err = error(cand)
                if err < best[0]:
                    best = (err, alpha, form, cand)
        scales[g.name] = best[3].float().cpu()
        info[g.name] = {"alpha": best[1], "form": best[2], "gain": baseline / max(best[0], 1e-30)}
    return scales, info


def range_aware_quantizer(quantizer: Quantizer, spec: Any) -> Quantizer:
    """``quantizer`` (a straight-through fake quantizer) with the gradient of its *range* added, for the formats
    whose scale is proportional to the row's (group's) ``max |w|``: FP formats (absmax, or a searched ratio of it)
    and symmetric integers. The value is ``quantizer(w)`` bit for bit; the gradient is the identity plus, through
    the element that sets each row's range, ``Σ (FQ(w) - w)`` weighted by the upstream gradient over ``amax`` — so
    stretching one channel is seen to coarsen the step of every other in its row (LSQ's point; FSBR's clipping
    quantizer keeps it the same way). Any other spec (asymmetric integers, none) gets ``quantizer`` unchanged."""
    from fxquant.fpformats import FPQuantSpec, _expand, _group_amax
    from fxquant.quant import QuantSpec
    if isinstance(spec, FPQuantSpec):
        group = spec.group_size
    elif isinstance(spec, QuantSpec) and spec.symmetric and not spec.per_tensor:
        group = spec.group_size
    else:
        return quantizer

    def fq(w: torch.Tensor) -> torch.Tensor:
        out = quantizer(w)
        if not w.requires_grad:
            return out
        size = None if group is None or group >= w.shape[1] else group
        amax = _group_amax(w, size)
        ratio = _expand(amax / amax.detach().clamp(min=1e-30), w.shape[1], size)  # value 1, gradient 1 / amax
        return out + (ratio - ratio.detach()) * (out - w).detach()
    return fq


def block_error(out: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """The block objective: ``mse`` — mean squared error over every element; ``relative`` — each token's squared
    error over its float output's squared norm, averaged over tokens, so the few massive-activation tokens of a
    model such as SmolLM2 (residual norms hundreds of times the rest) do not decide every scale."""
    out, target = out.float(), target.float()
    if kind == "mse":
        return F.mse_loss(out, target)
    err = (out - target).pow(2).sum(dim=-1)
    return (err / target.pow(2).sum(dim=-1).clamp(min=1e-12)).mean()


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def train_blocks(model: torch.nn.Module, plan: ScalePlan, fq: Callable[[str, torch.Tensor], torch.Tensor],
                 base: Mapping[str, torch.Tensor], qlin: Mapping[str, str], start: Mapping[str, torch.Tensor],
                 windows: torch.Tensor, cfg: TEQConfig) -> tuple[dict[str, torch.Tensor], list[float], list[dict]]:
    """TEQ's scales trained block by block (option ``objective: block``): for each decoder layer in order, the
    scales of the groups inside it minimise the error (:func:`block_error`, option ``block_loss``) between the
    layer's output with its weights folded and fake-quantized (``fq(fqn, w)``), run on the *quantized* chain's input
    (the output of the layers already done), and the float layer's output on the float chain's input — FSBR's
    schedule (I-LLM, OmniQuant),
    here for TEQ's weight-only scales. Per layer: the inputs of ``block_samples`` calibration windows are cached,
    ``block_epochs`` epochs of Adam (lr ``block_lr``) on ``log s`` (one parameter per RoPE pair of a tied group), and
    the block objective, measured on all the samples for the init and after every epoch, picks the scales kept: no
    layer ends worse than its init on its own objective. Returns ``(scales, mean loss of each epoch, per-layer
    records {"layer", "init", "epochs", "best", "trained"})``; groups outside the decoder layers keep ``start``."""
    from fxquant.calibration import layer_inputs
    from fxquant.passes.fsbr import _decoder_layers, step_log_scales
    prefix, layers = _decoder_layers(model, plan, "TEQ's block objective")
    device = next(iter(base.values())).device
    dtype = next((t.dtype for t in base.values() if t.is_floating_point()), torch.float32)
    batches = spread_windows(windows, cfg.block_samples).to(device)
    n = batches.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed)
    result = {k: v.detach().clone() for k, v in start.items()}
    losses: list[float] = []
    records: list[dict] = []
    float_in = layer_inputs(model, layers[0], batches)
    quant_in = [(h.clone(), kw) for h, kw in float_in]
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(layers) * cfg.block_epochs, desc="teq blocks", unit="epoch", leave=False)
    try:
        for i, layer in enumerate(layers):
            local = f"{prefix}.{i}."
            groups = [g for g in plan.groups
                      if g.producer.startswith(local) and all(site.fqn.startswith(local) for site in g.sites)]
            mine = sorted({site.fqn for g in groups for site in g.sites} | {f for f in qlin if f.startswith(local)})

            def effective(sc: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
                typed = {k: v.to(dtype) for k, v in sc.items()}
                out = {}
                for fqn in mine:
                    w = plan.apply_one(fqn, base[fqn], typed)
                    out[fqn[len(local):]] = fq(fqn, w) if fqn in qlin else w
                return out

            def run(params: Mapping[str, torch.Tensor], h: torch.Tensor, kw: Mapping[str, Any]) -> torch.Tensor:
                return _block_output(torch.func.functional_call(layer, dict(params), args=(h,), kwargs=dict(kw),
                                                                strict=False))

            def expand(log_s: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
                out = {}
                for g in groups:
                    t = log_s[g.name]
                    if g.tie_half:
                        t = t.view(-1, 1, g.tie_half).expand(-1, 2, g.tie_half).reshape(-1)
                    out[g.name] = t.exp()
                return out

            with torch.no_grad():
                targets = [_block_output(layer(h, **kw)) for h, kw in float_in]

                def objective(sc: Mapping[str, torch.Tensor]) -> float:
                    params = effective(sc)
                    return sum(float(block_error(run(params, h, kw), t, cfg.block_loss))
                               for (h, kw), t in zip(quant_in, targets)) / n

                kept = {g.name: result[g.name] for g in groups}
                best_loss = objective(kept)
            record: dict[str, Any] = {"layer": i, "init": best_loss, "epochs": [], "best": "init"}
            if groups and cfg.block_epochs:
                log_s = {}
                for g in groups:
                    t = result[g.name].clamp(min=MIN_SCALE).log()
                    if g.tie_half:
                        t = t.view(-1, 2, g.tie_half)[:, 0, :].reshape(-1)
                    log_s[g.name] = torch.nn.Parameter(t.clone())
                opt = torch.optim.Adam(list(log_s.values()), lr=cfg.block_lr)
                for epoch in range(cfg.block_epochs):
                    running = 0.0
                    for b in torch.randperm(n, generator=gen).tolist():
                        h, kw = quant_in[b]
                        loss = block_error(run(effective(expand(log_s)), h, kw), targets[b], cfg.block_loss)
                        running += check_finite_loss(loss, epoch * n + b + 1, f"TEQ block {i}")
                        step_log_scales(opt, loss, log_s.values())
                    losses.append(running / n)
                    with torch.no_grad():
                        now = {k: v.detach().clone() for k, v in expand(log_s).items()}
                        score = objective(now)
                    record["epochs"].append(score)
                    if score < best_loss:
                        best_loss, kept, record["best"] = score, now, f"epoch {epoch + 1}"
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(layer=i, error=f"{score:.3g}", init=f"{record['init']:.3g}")
            elif bar is not None:
                bar.update(cfg.block_epochs)
            record["trained"] = best_loss
            records.append(record)
            result.update(kept)
            with torch.no_grad():
                params = effective(kept)
                quant_in = [(run(params, h, kw), kw) for h, kw in quant_in]
            float_in = [(t, kw) for t, (_, kw) in zip(targets, float_in)]
            log.info("teq: block %d: output error (%s) %.4g -> %.4g (%s)", i, cfg.block_loss, record["init"], best_loss,
                     record["best"])
    finally:
        if bar is not None:
            bar.close()
    return result, losses, records


def train_scales(cg: CapturedGraph, plan: ScalePlan, quantizer: Quantizer, calibration: Any, cfg: TEQConfig, *,
                 exclude: Sequence[str] = ("lm_head*",), tokenizer: Any = None,
                 init: Mapping[str, torch.Tensor] | None = None, quantizer_name: str | None = None,
                 on_step: Callable[[int, float], None] | None = None, spec: Any = None) -> EquivalentScales:
    """Train the plan's scales on ``cg.model`` (see the module docstring) and return them with the loss curve.

    ``quantizer_name`` identifies the quantizer in checkpoint fingerprints (the pass gives its spec), so a run
    resumed with another weight format is refused; ``on_step(step, loss)`` is called after every step (after that
    step's checkpoint, if one is due), ``step`` counting from 1.
    """
    model = cg.model
    if model is None:
        raise PassError("TEQ trains on the eager model, but the captured graph has none",
                        "capture with fxquant.capture(model) (which keeps the model), not from a bare graph")
    cfg.validate()
    base = {fqn: cg.tensors[ph] for ph, fqn in cg.fqn.items() if ph in cg.tensors}
    qlin = quantized_linears(cg, exclude)
    if not qlin:
        raise PassError("TEQ found no linear weight to quantize", "check the recipe's exclude patterns")
    param = next(iter(base.values()))
    device, dtype = param.device, next((t.dtype for t in base.values() if t.is_floating_point()), torch.float32)
    ids = calibration_ids(calibration, model, tokenizer)
    windows = calibration_windows(ids, cfg.seq_len)
    train_windows, held = split_holdout(windows, cfg.holdout)
    gen = torch.Generator().manual_seed(cfg.seed)
    alphas: dict[str, dict] = {}
    if init is None and cfg.init == "awq":
        picked = spread_windows(train_windows, cfg.init_windows)
        init, alphas = awq_init(cg, plan, quantizer, picked.to(device), exclude=exclude, grid=cfg.init_grid)
        moved = [v for v in alphas.values() if v["form"] == "duo" or v["alpha"] > 0]
        log.info("teq: awq init on %d windows: %d of %d groups moved (%d in the duo form); output error / RTN's: "
                 "median %.3f", picked.shape[0], len(moved), len(plan.groups), sum(v["form"] == "duo" for v in moved),
                 float(torch.tensor([1 / v["gain"] for v in alphas.values()] or [1.0]).median()))

    def fq(fqn: str, w: torch.Tensor) -> torch.Tensor:
        if qlin[fqn] == "in_out":  # Conv1D stores [in, out]: quantize along the input dim of the transpose
            return quantizer(w.t()).t()
        return quantizer(w)

    # a fixed order (not a set's, which changes with the process's string hashing): the order in which the
    # weights are built is the order in which autograd sums each scale's gradient contributions
    scaled = sorted(plan.fqns())
    # weights that are quantized but not rescaled do not depend on s: quantize them once
    with torch.no_grad():
        fixed = {fqn: fq(fqn, base[fqn]) for fqn in qlin if fqn not in scaled}
    start = {k: v.detach().to(device=device, dtype=torch.float32).clone() for k, v in (init or {}).items()}
    scales = {g.name: torch.nn.Parameter(start.get(g.name, torch.ones(g.size, device=device)).clone())
              for g in plan.groups}
    init_copy = {k: v.detach().clone() for k, v in scales.items()}
    # the best scales of the periodic held-out checks (``check_every``; meaningful once ``checks`` holds one)
    best = {k: v.detach().clone() for k, v in scales.items()}
    checks: list[list[float]] = []            # [step, held-out loss] of every periodic check

    def build(sc: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's linear weights with scales ``sc`` folded in and the quantized ones fake-quantized."""
        params = dict(fixed)
        typed = {k: v.to(dtype) for k, v in sc.items()}
        for fqn in scaled:
            w = plan.apply_one(fqn, base[fqn], typed)
            params[fqn] = fq(fqn, w) if fqn in qlin else w
        return params
    opt = torch.optim.Adam(list(scales.values()), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(cfg.steps, cfg.warmup))
    losses: list[float] = []

    # ---- checkpoints: what identifies the run, what is saved, where to resume from
    fp = train_state.fingerprint(
        "teq", cfg, {f: base[f] for f in sorted(set(qlin) | set(scaled))}, quantizer=quantizer_name,
        groups={g.name: [g.kind, g.size, g.tie_half] for g in plan.groups}, exclude=list(exclude),
        calibration=train_state.tensor_digest(windows), init=train_state.tensor_digest(start) if start else None)

    def state_tensors() -> dict[str, torch.Tensor]:
        return {**{f"scale.{k}": v for k, v in scales.items()}, **{f"init.{k}": v for k, v in init_copy.items()},
                **{f"best.{k}": v for k, v in best.items()}}

    def save(step: int) -> None:
        train_state.save_train_state(train_state.step_dir(cfg.checkpoint_dir, step), kind="teq", step=step,
                                     tensors=state_tensors(), optimizer=opt, scheduler=sched, generators={"data": gen},
                                     extras={"losses": losses, "checks": checks}, fingerprint=fp,
                                     keep_last=cfg.keep_last)

    first = 0
    resume_from = train_state.resolve_resume(cfg.resume, cfg.checkpoint_dir, "TEQ")
    if resume_from is not None:
        state = train_state.load_train_state(resume_from, kind="teq", fingerprint=fp)
        n_losses = len(state.extras.get("losses", []))
        if not 0 <= state.step <= cfg.steps or n_losses != state.step:
            raise TrainingError(f"TEQ checkpoint {resume_from} is at step {state.step} of a {cfg.steps}-step run "
                                f"and holds {n_losses} losses", "resume from a checkpoint of this run, or start again")
        train_state.copy_tensors(state_tensors(), state.tensors, f"TEQ checkpoint {resume_from}")
        state.restore(optimizer=opt, scheduler=sched, generators={"data": gen})
        losses = [float(v) for v in state.extras["losses"]]
        checks = [[int(a), float(b)] for a, b in state.extras.get("checks", [])]
        first = state.step
        log.info("teq: resumed from %s at step %d of %d", resume_from, first, cfg.steps)

    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in frozen:
        p.requires_grad_(False)
    model.eval()
    bar = None
    if cfg.progress and cfg.objective == "model":
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=first, desc="teq", unit="step", leave=False)
    block_mse: list[dict] = []
    try:
        if cfg.objective == "block":
            ranged = range_aware_quantizer(quantizer, spec)
            trained, losses, block_mse = train_blocks(
                model, plan, lambda fqn, w: ranged(w.t()).t() if qlin[fqn] == "in_out" else ranged(w),
                base, qlin, init_copy, train_windows, cfg)
            with torch.no_grad():
                for k, v in scales.items():
                    v.copy_(trained[k])
        else:
            for step in range(first, cfg.steps):
                pick = torch.randint(0, train_windows.shape[0], (cfg.batch_size,), generator=gen)
                batch = train_windows[pick].to(device)
                loss = _loss(model, build(scales), batch, cfg.distill)
                value = check_finite_loss(loss, step + 1, "TEQ")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    for g in plan.groups:
                        s = scales[g.name]
                        s.clamp_(min=MIN_SCALE)
                        if g.tie_half:  # keep RoPE pairs tied: average the two halves' updates
                            blocks = s.view(-1, 2, g.tie_half)
                            blocks.copy_(blocks.mean(dim=1, keepdim=True).expand_as(blocks))
                losses.append(value)
                done = step + 1
                if held is not None and cfg.check_every and done % cfg.check_every == 0 and done < cfg.steps:
                    with torch.no_grad():
                        check = _heldout_loss(model, build(scales), held, cfg, device)
                    if not checks or check < min(c[1] for c in checks):
                        with torch.no_grad():
                            for k, v in scales.items():
                                best[k].copy_(v)
                    checks.append([done, check])
                    log.info("teq: step %d: held-out loss %.4f", done, check)
                if cfg.checkpoint_dir is not None and (
                        (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps):
                    save(done)
                if on_step is not None:
                    on_step(done, value)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
    finally:
        if bar is not None:
            bar.close()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    result = {k: v.detach().clone() for k, v in scales.items()}
    extra: dict[str, Any] = {"kept": "trained"}
    if alphas:
        extra["awq"] = dict(alphas)
    if block_mse:
        extra["block_mse"] = block_mse
    if held is not None:
        # the guard: training must not make the quantized model worse on text it never saw (too high a learning
        # rate does: SmolLM2 W4g128 at lr 5e-3 went from 44.2 to 60.7 perplexity); if it did, keep the init —
        # and a searched init must itself beat the identity there, else the identity is kept
        was_training = model.training
        model.eval()
        ones = {k: torch.ones_like(v) for k, v in init_copy.items()}
        searched = any(not torch.equal(v, ones[k]) for k, v in init_copy.items())
        try:
            with torch.no_grad():
                before = _heldout_loss(model, build(init_copy), held, cfg, device)
                after = _heldout_loss(model, build(result), held, cfg, device)
                identity = _heldout_loss(model, build(ones), held, cfg, device) if searched else before
        finally:
            model.train(was_training)
        extra.update(heldout_windows=int(held.shape[0]), heldout_loss_init=before, heldout_loss_trained=after)
        if searched:
            extra["heldout_loss_ones"] = identity
        if checks:
            extra["heldout_checks"] = [list(c) for c in checks]
            step_best, loss_best = min(checks, key=lambda c: (c[1], c[0]))
            if loss_best < after and loss_best <= before:
                log.info("teq: keeping the scales of step %d (held-out loss %.4f; at the end %.4f)",
                         step_best, loss_best, after)
                result = {k: v.detach().clone() for k, v in best.items()}
                after = loss_best
                extra.update(kept_step=int(step_best), heldout_loss_kept=loss_best)
        if not after <= before:
            log.warning("teq: the trained scales raise the loss on %d held-out calibration windows (%.4f -> %.4f); "
                        "keeping the initial scales (try a lower lr or more steps)", held.shape[0], before, after)
            result = {k: v.clone() for k, v in init_copy.items()}
            extra["kept"] = "init"
        if searched and identity < min(before, after):
            log.warning("teq: the identity scales beat both the %s init and the trained scales on the held-out "
                        "windows (%.4f vs %.4f, %.4f); keeping the identity", cfg.init, identity, before, after)
            result = ones
            extra["kept"] = "ones"
    return EquivalentScales(plan=plan, scales=result, losses=losses, method="teq", init=init_copy, extra=extra)


def _heldout_loss(model: torch.nn.Module, params: dict[str, torch.Tensor], held: torch.Tensor, cfg: "TEQConfig",
                  device: torch.device) -> float:
    """Mean training loss over the held-out windows (batches of ``cfg.batch_size``, weighted by size)."""
    total = 0.0
    for i in range(0, held.shape[0], cfg.batch_size):
        batch = held[i: i + cfg.batch_size].to(device)
        total += float(_loss(model, params, batch, cfg.distill)) * batch.shape[0]
    return total / held.shape[0]


class TrainTEQScales(Pass):
    """Train TEQ's per-channel scales against the recipe's fake-quantized weights (the graph is not changed)."""

    name = "train_teq_scales"
    description = "TEQ: train one per-channel scale per norm group / linear pair against fake-quantized weights"

    def __init__(self, spec: Any, *, exclude: Sequence[str] = ("lm_head*",), options: Mapping[str, Any] | None = None,
                 quantizer: Quantizer | None = None):
        self.spec = spec
        self.quantizer = quantizer or weight_quantizer(spec)
        self.exclude = tuple(exclude)
        self.options = dict(options or {})
        self.config = TEQConfig.from_options(self.options)

    def requires(self, cg: CapturedGraph, ctx: PassContext) -> None:
        if "structure" not in ctx.artifacts:
            raise PassError("train_teq_scales needs the structure analysis",
                            "run analyze_structure first (every recipe pipeline starts with it)")
        if ctx.calibration is None:
            raise PassError("train_teq_scales needs calibration data",
                            "pass calibration=<text or token ids> to fxquant.quantize")

    def call(self, cg: CapturedGraph, ctx: PassContext) -> PassResult:
        plan = plan_scales(cg, ctx.artifacts["structure"], exclude=self.exclude)
        if not plan.groups:
            raise PassError("TEQ found no place to put a scale (no norm group or linear pair the analysis accepted)",
                            "check ctx.artifacts['structure'].render(); use an RTN recipe for this model")
        for what, why in plan.skipped:
            log.info("teq: skipped %s: %s", what, why)
        tokenizer = self.options.get("tokenizer") or ctx.options.get("tokenizer")
        record = train_scales(cg, plan, self.quantizer, ctx.calibration, self.config, exclude=self.exclude,
                              tokenizer=tokenizer, quantizer_name=repr(self.spec), spec=self.spec)
        ctx.artifacts["teq"] = record
        n = len(record.losses)
        k = max(1, n // 20)
        # "steps": optimizer steps (objective model) or epochs over all the layers (objective block)
        stats = {"groups": len(plan.groups), "skipped": len(plan.skipped), "objective": self.config.objective,
                 "steps": n, "init": self.config.init,
                 "max_scale_change": round(record.moved(), 5), "kept": record.extra.get("kept", "trained")}
        if n:
            stats.update(loss_first=round(sum(record.losses[:k]) / k, 5), loss_last=round(sum(record.losses[-k:]) / k, 5))
        if "awq" in record.extra:
            chosen = list(record.extra["awq"].values())
            stats["awq_duo_groups"] = sum(c["form"] == "duo" for c in chosen)
            stats["awq_alpha_mean"] = round(sum(c["alpha"] for c in chosen) / max(1, len(chosen)), 3)
        for key in ("heldout_loss_ones", "heldout_loss_init", "heldout_loss_trained"):
            if key in record.extra:
                stats[key] = round(record.extra[key], 5)
        log.info("train_teq_scales: %s", stats)
        return PassResult(modified=False, stats=stats)

    def ensures(self, cg: CapturedGraph, ctx: PassContext) -> None:
        record = ctx.artifacts.get("teq")
        if not isinstance(record, EquivalentScales):
            raise PassError("train_teq_scales left no scales in ctx.artifacts['teq']", "report a bug")
        record.plan.check_scales(record.scales)
