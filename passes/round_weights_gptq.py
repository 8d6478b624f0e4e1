"""``round_weights_gptq``: error-compensated rounding of linear weights (GPTQ, Frantar et al. 2023).

Round-to-nearest rounds every weight on its own. GPTQ rounds the input columns of a weight one at a time and,
after each, moves the columns not yet rounded to cancel the output error it made, weighted by how the layer's
inputs correlate. With ``H = Σ xᵀx`` over calibration inputs, the output error of a rounded weight ``Q`` is

    err(Q) = ‖X (Q − W)ᵀ‖² = Σ_rows (Q − W) H (Q − W)ᵀ,

and rounding column ``j`` to ``q_j`` is followed by ``W[:, j+1:] −= (w_j − q_j) / U_jj · U_j,j+1:``, with ``U`` the
upper Cholesky factor of ``H⁻¹`` (the update of Optimal Brain Quantization, done in blocks of ``gptq_block``
columns so that the work is matrix products). ``H`` gets ``gptq_damp · mean(diag H)`` added to its diagonal
before it is inverted.

The grid is the recipe's own: integer weights (symmetric or with zero points, per channel or per group) or a
minifloat (FP6 E3M2, E2M3, FP5, FP4) with its absmax or searched scales, times the scale ratios a preceding
``search_weight_clipping`` chose (``clip_scale_up``). The scales are fixed before rounding, from the weights as
they come in (after any folded equivalent scales and clipping): GPTQ's "static groups", which keeps act-order
(``gptq_act_order``: columns in order of decreasing ``diag H``) compatible with group scales. The rounded
weights lie on that grid but need not reach its top value, so the scales are handed to the quantization pass
that follows (``quantize_weights_rtn`` or ``split_fp6_weights``) through ``ctx.artifacts["weight_scales"]``
(``{fqn: {"scale": [out, groups] float32, "zero": [out, groups] int32 or None}}``); it stores exactly these
weights, packed, with exactly these scales.

**Token cap** (``gptq_token_cap``, default 10): ``H`` weighs each token by its energy ``‖x_t‖²``, and LLMs have
massive-activation tokens (the attention sink: on SmolLM2 one token per window carries 99.8 % of ``trace H`` at
``layers.11.mlp.down_proj`` and 80 % at ``layers.28``). Left alone, such a token decides ``H`` by itself and GPTQ
cancels the error on it by moving that error onto every other token — its absolute error is large but, after the
next RMSNorm divides by its norm, it matters little. Each token whose energy exceeds ``gptq_token_cap`` times its
window's median token's is scaled down to exactly that (its direction kept; 0.06 % of SmolLM2's tokens at 10)
before it enters ``H``; ``null`` turns the cap off (GPTQ's plain ``H``). On SmolLM2 (40 windows) INT4 g128 goes
from 45.52 without the cap (worse than round-to-nearest's 44.25) to 42.35, FP6 E3M2 from 29.75 to 29.65; caps of
3 and 30 gave 43.34 and 42.64 at INT4 g128.

A weight whose GPTQ output error on the calibration inputs would be above round-to-nearest's (GPTQ is greedy;
it happens rarely) keeps round-to-nearest with the same scales; so does one whose ``H`` cannot be factored
even with ten and a hundred times the damping. Both are counted in the stats.

Contract
--------
* **requires** calibration data and the eager model behind the captured graph (the inputs of each linear are
  read with forward hooks, as ``search_weight_clipping`` does).
* **call** runs ``gptq_windows`` calibration windows (TEQ's windows of ``seq_len`` tokens, spread evenly over the
  calibration text; in a ``teq`` recipe it runs after TEQ's held-out guard, so those windows count too) with the
  graph's current weights, accumulates ``H`` once per distinct input tensor (q/k/v and gate/up share theirs),
  then rounds every weight the quantization pass will quantize (``exclude`` as the
  recipe's; tied weights and weights read by non-linear ops are left to that pass, which refuses them) and
  writes the rounded weight into ``cg.tensors``. A weight it cannot round (its module's input was never seen) is
  logged and listed in ``ctx.artifacts["gptq_skipped"]``; the quantization pass then rounds it to nearest.
* **ensures** every rounded weight is on its recorded grid: quantizing it with the recorded scales gives it back
  bit for bit; ``ctx.artifacts["gptq"]`` holds per weight the output error of round-to-nearest and of the
  weights kept, on the calibration inputs (after the token cap below).

**Sequential mode** (``gptq_sequential: true``, the default; GPTQ's own schedule): the weights are rounded block
by block (``model.layers.0``, ``model.layers.1``, …, then any weight outside a numbered block), and each block's
``H`` is read with the blocks before it already rounded, so a block compensates for the error its inputs carry.
When the blocks are the entries of one ``nn.ModuleList`` (every Hugging Face decoder), the first layer's inputs
are cached once and each layer then runs alone on its predecessor's rounded outputs: about one pass over the
windows in all (SmolLM2: 2.7 min with the rounding). Otherwise each block costs a forward of the whole model,
stopped once the block has run (18 min on SmolLM2; both paths round bit-identically). ``gptq_sequential: false``
reads every ``H`` from the float model in one pass.

Memory: one ``in × in`` float32 matrix per distinct linear input of the layer being rounded (all layers' at once
with ``gptq_sequential: false``: ≈ 0.4 GB on SmolLM2), plus the cached layer inputs in sequential mode
(windows × seq_len × hidden floats: 38 MB on SmolLM2).

Options (recipe ``options:``; method ``gptq``, and methods ``teq``, ``fsbr``, ``illm`` with ``gptq: true``): ``gptq_windows`` (32),
``gptq_damp`` (0.01), ``gptq_block`` (128), ``gptq_act_order`` (false), ``gptq_sequential`` (true),
``gptq_token_cap`` (10; null: off); ``seq_len``
and ``tokenizer`` as TEQ's.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from fxquant.calibration import calibration_ids, calibration_windows, layer_inputs, run_windows, spread_windows
from fxquant.capture import CapturedGraph
from fxquant.errors import PassError
from fxquant.passes.search_weight_clipping import statistics_problem
from fxquant.pipeline import Pass, PassContext, PassOptions, PassResult, replace_weight

log = logging.getLogger("fxquant")

__all__ = ["RoundWeightsGPTQ", "GPTQConfig", "gptq_round", "grid_of", "output_error"]

#: a weight inside a numbered block (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``)
_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def _first(out: Any) -> torch.Tensor:
    """A decoder layer's hidden-state output (Hugging Face layers return it alone or first in a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class GPTQConfig(PassOptions):
    """GPTQ's settings (recipe options, all with a ``gptq_`` prefix)."""

    gptq_windows: int = 32       # calibration windows whose inputs make H
    gptq_damp: float = 0.01      # added to H's diagonal, as a fraction of its mean
    gptq_block: int = 128        # columns rounded between two matrix-product updates (the result does not depend on it)
    gptq_act_order: bool = False  # round columns in order of decreasing diag(H)
    gptq_sequential: bool = True   # block by block, each block's H from the already rounded blocks before it
    gptq_token_cap: float | None = 10.0  # a token's weight in H at most this many times its window's median token's

    positive_ints = ("gptq_windows", "gptq_block")
    bools = ("gptq_act_order", "gptq_sequential")

    def check(self) -> None:
        if isinstance(self.gptq_token_cap, int) and not isinstance(self.gptq_token_cap, bool):
            self.gptq_token_cap = float(self.gptq_token_cap)
        cap = self.gptq_token_cap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap >= 1):
            raise PassError(f"gptq_token_cap caps a token's energy in H at that many times the median token's, so it "
                            f"is a number >= 1 (or null: no cap); got {cap!r}", "e.g. options: {gptq_token_cap: 10}")
        if isinstance(self.gptq_damp, bool) or not isinstance(self.gptq_damp, (int, float)) or not 0 < self.gptq_damp < 1:
            raise PassError(f"gptq_damp is the fraction of mean(diag H) added to H's diagonal, in (0, 1); got "
                            f"{self.gptq_damp!r}", "e.g. options: {gptq_damp: 0.01} (GPTQ's)")


# ---- the grid ------------------------------------------------------------------------------------------------

@dataclass
class Grid:
    """A weight's quantization grid with fixed scales; ``rounder(x, scale, zero)`` rounds values to it elementwise."""

    scale: torch.Tensor            # [out, groups] float32
    zero: torch.Tensor | None      # [out, groups] int32 (asymmetric integer) or None
    group: int                     # columns per group (the last may be shorter)
    rounder: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

    def columns(self, in_features: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scales (and zero points) expanded to ``[out, in]``."""
        s = self.scale.repeat_interleave(self.group, dim=1)[:, :in_features]
        z = None if self.zero is None else self.zero.float().repeat_interleave(self.group, dim=1)[:, :in_features]
        return s, z

    def round(self, w: torch.Tensor) -> torch.Tensor:
        s, z = self.columns(w.shape[1])
        return self.rounder(w.float(), s, z)


def grid_of(w: torch.Tensor, spec: Any, scale_ratio: torch.Tensor | None = None) -> Grid:
    """The grid the recipe's quantizer puts ``w`` ``[out, in]`` on: its scales as that quantizer computes them
    from ``w`` (times ``scale_ratio`` for a minifloat), and the elementwise rounding, equal bit for bit to the
    quantizer's own dequantized values for those scales."""
    from fxquant.fpformats import FPQuantSpec, compute_scales, round_to_format
    from fxquant.quant import QuantSpec, quantize_weight
    w32 = w.detach().float()
    if isinstance(spec, FPQuantSpec):
        scale = compute_scales(w32, spec.format, spec.group_size, spec.scale_search)
        if scale_ratio is not None:
            scale = scale * scale_ratio.to(device=scale.device, dtype=torch.float32)
        fmt = spec.format

        def fp(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
            return round_to_format(x / s, fmt) * s
        return Grid(scale.contiguous(), None, spec.group_size or w32.shape[1], fp)
    if isinstance(spec, QuantSpec):
        if scale_ratio is not None:
            raise PassError("scale ratios apply to minifloat weights only", "report a bug")
        qw = quantize_weight(w32, spec)
        lo, hi = float(spec.qmin), float(spec.qmax)

        def integer(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
            if z is None:
                return torch.clamp(torch.round(x / s), lo, hi) * s
            return (torch.clamp(torch.round(x / s) + z, 0.0, hi) - z) * s
        return Grid(qw.scale, qw.zero, qw.group_size, integer)
    raise PassError(f"round_weights_gptq has no grid for a {type(spec).__name__}",
                    "use fxquant.quant.QuantSpec (integer) or fxquant.fpformats.FPQuantSpec (FP6 and siblings)")


def cap_tokens(x: torch.Tensor, cap: float) -> tuple[torch.Tensor, int]:
    """``x`` ``[tokens, in]`` with every token whose energy ``‖x_t‖²`` exceeds ``cap`` times the median token's
    scaled down to exactly that (its direction kept), and how many were. ``H = Σ x_tᵀ x_t`` weighs each token by
    its energy; a massive-activation token (an attention sink: on SmolLM2 one token per window carries 99.8 % of
    ``trace H`` at ``layers.11.mlp.down_proj``) otherwise decides ``H`` alone, and GPTQ then cancels the error on
    that token by moving it onto every other."""
    energy = (x * x).sum(dim=1)
    limit = cap * float(energy.median())
    over = energy > limit
    n = int(over.sum())
    if n == 0 or limit <= 0:
        return x, 0
    factor = torch.ones_like(energy)
    factor[over] = torch.sqrt(limit / energy[over])
    return x * factor[:, None], n


def output_error(delta: torch.Tensor, h: torch.Tensor) -> float:
    """``Σ_rows δ H δᵀ``: the squared output error of a weight change ``δ`` ``[out, in]`` on the inputs behind ``H``."""
    d = delta.to(h.dtype)
    return float(((d @ h) * d).sum())


# ---- the rounding --------------------------------------------------------------------------------------------

def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp·mean(diag H)·I)⁻¹`` in float64 (dead inputs, ``H_jj = 0``, get 1 on the
    diagonal: their columns then pass no error on). Raises ``torch.linalg.LinAlgError`` if ``H`` is not positive
    definite even so."""
    h = h.double().clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    diag += damp * float(diag.mean())
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


@torch.no_grad()
def gptq_round(w: torch.Tensor, h: torch.Tensor, grid: Grid, *, damp: float = 0.01, block: int = 128,
               act_order: bool = False) -> tuple[torch.Tensor, float, float]:
    """GPTQ-round ``w`` ``[out, in]`` onto ``grid`` with the input statistics ``h`` ``[in, in]`` (``Σ xᵀx``).

    Returns ``(rounded weight, float32; output error of round-to-nearest; output error of the rounded weight)``,
    both errors as :func:`output_error` on the undamped ``h``. The damping is raised ten- and a hundredfold if
    ``H`` cannot be factored; after that ``torch.linalg.LinAlgError`` propagates.
    """
    out, k = w.shape
    if h.shape != (k, k):
        raise PassError(f"gptq_round: H has shape {tuple(h.shape)}, the weight {tuple(w.shape)} needs {(k, k)}",
                        "report a bug")
    w32 = w.detach().float()
    s_full, z_full = grid.columns(k)
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    hh = h if perm is None else h[perm][:, perm]
    for attempt, d in enumerate((damp, damp * 10, damp * 100)):
        try:
            u = _inverse_factor(hh, d).float()
            break
        except torch.linalg.LinAlgError:
            if attempt == 2:
                raise
            log.info("round_weights_gptq: H not positive definite with damp %g; trying %g", d, d * 10)
    work = w32.clone()
    s, z = s_full, z_full
    if perm is not None:
        work, s = work[:, perm], s[:, perm]
        z = None if z is None else z[:, perm]
    q = torch.empty_like(work)
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        cols = work[:, b0:b1].clone()
        errs = torch.empty_like(cols)
        ub = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            zi = None if z is None else z[:, b0 + i]
            qi = grid.rounder(cols[:, i], s[:, b0 + i], zi)
            q[:, b0 + i] = qi
            e = (cols[:, i] - qi) / ub[i, i]
            cols[:, i:] -= e.unsqueeze(1) * ub[i, i:].unsqueeze(0)
            errs[:, i] = e
        if b1 < k:
            work[:, b1:] -= errs @ u[b0:b1, b1:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    rtn = grid.rounder(w32, s_full, z_full)
    return q, output_error(rtn - w32, h), output_error(q - w32, h)


# ---- the pass ------------------------------------------------------------------------------------------------

class RoundWeightsGPTQ(Pass):
    """Round every quantized linear weight with GPTQ onto the recipe's grid, scales fixed first."""

    name = "round_weights_gptq"
    description = "GPTQ: error-compensated rounding onto the recipe's grid, on calibration inputs"

    def __init__(self, spec: Any, *, exclude: Sequence[str] = ("lm_head*",), options: Mapping[str, Any] | None = None):
        self.spec = spec
        self.exclude = tuple(exclude)
        self.options = dict(options or {})
        self.config = GPTQConfig.from_options(self.options)
        grid_of(torch.zeros(1, 1), spec)  # refuses a spec with no grid before any model loads

    def __repr__(self) -> str:
        return f"<pass {self.name} {self.spec.describe()} windows={self.config.gptq_windows}>"

    def requires(self, cg: CapturedGraph, ctx: PassContext) -> None:
        if ctx.calibration is None:
            raise PassError("round_weights_gptq needs calibration data (it reads each linear's inputs)",
                            "pass calibration=<text or token ids> to fxquant.quantize, or use a round-to-nearest "
                            "recipe (rtn-*, fp6) that needs none")
        if getattr(cg, "model", None) is None:
            raise PassError("round_weights_gptq runs the eager model, but the captured graph has none",
                            "capture with fxquant.capture(model) (which keeps the model)")

    def _windows(self, cg: CapturedGraph, ctx: PassContext) -> torch.Tensor:
        """TEQ's calibration windows of ``seq_len`` tokens, ``gptq_windows`` of them spread evenly."""
        from fxquant.passes.train_teq_scales import TEQConfig
        seq_len = int(self.options.get("seq_len", TEQConfig.seq_len))
        tokenizer = self.options.get("tokenizer") or ctx.options.get("tokenizer")
        windows = calibration_windows(calibration_ids(ctx.calibration, cg.model, tokenizer), seq_len)
        return spread_windows(windows, self.config.gptq_windows)

    def _stages(self, fqns: Sequence[str]) -> list[tuple[str | None, list[str]]]:
        """The weights in the order they are rounded: one stage, or (``gptq_sequential``) one per numbered block
        (``model.layers.3``), in the graph's order, then the weights outside any numbered block."""
        if not self.config.gptq_sequential:
            return [(None, list(fqns))]
        stages: dict[str | None, list[str]] = {}
        for fqn in fqns:
            m = _BLOCK.match(fqn)
            stages.setdefault(m.group(1) if m else None, []).append(fqn)
        rest = stages.pop(None, [])
        return [*stages.items(), *([(None, rest)] if rest else [])]

    @staticmethod
    @torch.no_grad()
    def _hessians(root: torch.nn.Module, rel: Callable[[str], str], todo: Mapping[str, str],
                  params: Mapping[str, torch.Tensor], skipped: dict[str, str], run: Callable[[], None],
                  cap: float | None = None, capped: dict[str, list[int]] | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """``H`` per distinct input of the weights ``todo`` (FQNs; ``rel(fqn)`` is the weight's path inside
        ``root``) while ``run()`` runs ``root``'s forwards, and which weight's ``H`` each weight reads
        (``{fqn: owner fqn}``). With ``cap`` (:func:`cap_tokens`), ``capped[owner]`` counts ``[capped, tokens]``."""
        hess: dict[str, torch.Tensor] = {}
        owner: dict[str, str] = {}
        last: dict[str, Any] = {"x": None, "fqn": None}
        hooks = []
        for fqn in todo:
            try:
                module = root.get_submodule(rel(fqn).rsplit(".", 1)[0])
            except AttributeError:
                skipped[fqn] = "no module of that name to read its input from"
                continue
            w = params[fqn]
            k = w.shape[1] if todo[fqn] == "out_in" else w.shape[0]

            def hook(mod, args, fqn=fqn, k=k):
                x = args[0]
                if x.shape[-1] != k:
                    return
                if x is last["x"]:      # q/k/v, gate/up: the same input tensor, one H
                    owner[fqn] = last["fqn"]
                    return
                x2 = x.detach().reshape(-1, k).float()
                if cap is not None:
                    x2, n = cap_tokens(x2, cap)
                    if capped is not None:
                        c = capped.setdefault(fqn, [0, 0])
                        c[0] += n
                        c[1] += x2.shape[0]
                h = x2.t() @ x2
                hess[fqn] = hess[fqn] + h if fqn in hess else h
                owner[fqn] = fqn
                last["x"], last["fqn"] = x, fqn
            hooks.append(module.register_forward_pre_hook(hook))
        try:
            run()
        finally:
            for h in hooks:
                h.remove()
            last.clear()
        return hess, owner

    @staticmethod
    def _layer_list(model: torch.nn.Module, stages: Sequence[tuple[str | None, list[str]]]
                    ) -> tuple[str, torch.nn.ModuleList] | None:
        """The ``nn.ModuleList`` every numbered stage is an entry of (``model.layers``), or None."""
        parents = {p.rsplit(".", 1)[0] for p, _ in stages if p is not None}
        if len(parents) != 1:
            return None
        parent = parents.pop()
        try:
            layers = model.get_submodule(parent)
        except AttributeError:
            return None
        return (parent, layers) if isinstance(layers, torch.nn.ModuleList) and len(layers) else None

    def call(self, cg: CapturedGraph, ctx: PassContext) -> PassResult:
        from fxquant.passes.train_teq_scales import quantized_linears
        cfg = self.config
        model = cg.model
        qlin = quantized_linears(cg, self.exclude)
        skipped: dict[str, str] = {}
        windows = self._windows(cg, ctx)
        names_of: dict[str, list[str]] = {}
        for ph, fqn in cg.fqn.items():
            names_of.setdefault(fqn, []).append(ph)
        ratios = ctx.artifacts.get("weight_scale_ratios", {})
        scales: dict[str, dict] = ctx.artifacts.setdefault("weight_scales", {})
        record: dict[str, dict] = {}
        totals = {"kept_nearest": 0, "rtn": 0.0, "kept": 0.0}
        bar = None
        if self.options.get("progress", True) and qlin:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(qlin), desc="gptq", unit="weight", leave=False)

        def current() -> dict[str, torch.Tensor]:
            """The graph's tensors by FQN now (rounded weights replace the float ones as the pass goes)."""
            return {fqn: cg.tensors[ph] for ph, fqn in cg.fqn.items() if ph in cg.tensors}

        def round_weights(fqns: Sequence[str], hess: dict[str, torch.Tensor], owner: dict[str, str],
                          params: Mapping[str, torch.Tensor]) -> None:
            for fqn in fqns:
                if bar is not None:
                    bar.update(1)
                if fqn in skipped:
                    continue
                h = hess.get(owner.get(fqn, fqn))
                why = statistics_problem(h)
                if why is not None:
                    skipped[fqn] = why
                    continue
                layout = qlin[fqn]
                w = params[fqn]
                w_oi = (w.t() if layout == "in_out" else w).float()
                grid = grid_of(w_oi, self.spec, ratios.get(fqn))
                try:
                    q, err_rtn, err_q = gptq_round(w_oi, h, grid, damp=cfg.gptq_damp, block=cfg.gptq_block,
                                                   act_order=cfg.gptq_act_order)
                except torch.linalg.LinAlgError:
                    log.warning("round_weights_gptq: %s: H is not positive definite even with 100x damping; "
                                "rounded to nearest", fqn)
                    q, err_q = None, float("inf")
                    err_rtn = output_error(grid.round(w_oi) - w_oi, h)
                if q is None or not err_q <= err_rtn:   # greedy GPTQ did worse here, or could not run
                    q, err_q = grid.round(w_oi), err_rtn
                    totals["kept_nearest"] += 1
                new = (q.t() if layout == "in_out" else q).to(w.dtype).contiguous()
                replace_weight(cg, ctx, names_of[fqn], new)
                scales[fqn] = {"scale": grid.scale.cpu(), "zero": None if grid.zero is None else grid.zero.cpu()}
                record[fqn] = {"error_rtn": err_rtn, "error": err_q}
                totals["rtn"] += err_rtn
                totals["kept"] += err_q
            hess.clear()

        capped: dict[str, list[int]] = {}
        whole = lambda fqn: fqn   # noqa: E731 - a weight's path inside the whole model is its FQN
        stages = self._stages(list(qlin))
        layered = self._layer_list(model, stages) if cfg.gptq_sequential else None
        was_training = model.training
        model.eval()
        try:
            if layered is not None:
                # sequential: each decoder layer runs alone on the inputs the rounded layers before it produce
                parent, layers = layered
                by_prefix = {p: f for p, f in stages if p is not None}
                inputs = layer_inputs(model, layers[0], windows, current())
                for i, layer in enumerate(layers):
                    prefix = f"{parent}.{i}"
                    fqns = by_prefix.get(prefix, [])
                    own = lambda fqn, n=len(prefix) + 1: fqn[n:]   # noqa: E731
                    local = lambda: {own(f): t for f, t in current().items() if f.startswith(prefix + ".")}  # noqa: E731

                    def run_layer(lp: Mapping[str, torch.Tensor], keep: bool) -> list:
                        outs = []
                        with torch.no_grad():
                            for h, kw in inputs:
                                out = _first(torch.func.functional_call(layer, dict(lp), args=(h,), kwargs=dict(kw),
                                                                        strict=False))
                                outs.append((out.detach() if keep else None, kw))
                        return outs
                    if fqns:
                        params = current()
                        lp = local()
                        hess, owner = self._hessians(layer, own, {f: qlin[f] for f in fqns}, params, skipped,
                                                     lambda: run_layer(lp, False), cfg.gptq_token_cap, capped)
                        round_weights(fqns, hess, owner, params)
                    if i + 1 < len(layers):
                        inputs = run_layer(local(), True)
                inputs = []
                rest = dict(stages).get(None, [])
                if rest:   # weights outside the decoder layers: the whole model, with every layer rounded
                    params = current()
                    hess, owner = self._hessians(model, whole, {f: qlin[f] for f in rest}, params, skipped,
                                                 lambda: run_windows(model, params, windows), cfg.gptq_token_cap, capped)
                    round_weights(rest, hess, owner, params)
            else:
                for stop_after, fqns in stages:
                    # in sequential mode without a layer list the earlier blocks are already rounded here
                    params = current()
                    stop = model.get_submodule(stop_after) if stop_after is not None else None
                    hess, owner = self._hessians(model, whole, {f: qlin[f] for f in fqns}, params, skipped,
                                                 lambda: run_windows(model, params, windows, stop_at=stop),
                                                 cfg.gptq_token_cap, capped)
                    round_weights(fqns, hess, owner, params)
        finally:
            model.train(was_training)
            if bar is not None:
                bar.close()
        for fqn, why in skipped.items():
            log.info("round_weights_gptq: left %s to round-to-nearest: %s", fqn, why)
        ctx.artifacts["gptq"] = record
        ctx.artifacts["gptq_skipped"] = dict(skipped)
        stats = {"rounded": len(record), "kept_nearest": totals["kept_nearest"], "skipped": len(skipped),
                 "windows": int(windows.shape[0]), "sequential": cfg.gptq_sequential,
                 "token_cap": cfg.gptq_token_cap,
                 "capped_token_share": (round(sum(c[0] for c in capped.values()) / max(1, sum(c[1] for c in capped.values())), 5)
                                        if cfg.gptq_token_cap is not None else 0.0),
                 "output_error_ratio": round(totals["kept"] / totals["rtn"], 4) if totals["rtn"] > 0 else 1.0}
        log.info("round_weights_gptq: %s", stats)
        return PassResult(modified=bool(record), stats=stats)

    def ensures(self, cg: CapturedGraph, ctx: PassContext) -> None:
        from fxquant.passes.train_teq_scales import quantized_linears
        layouts = quantized_linears(cg, self.exclude)
        tensors = {fqn: cg.tensors[ph] for ph, fqn in cg.fqn.items() if ph in cg.tensors}
        scales = ctx.artifacts.get("weight_scales", {})
        for fqn in ctx.artifacts.get("gptq", {}):
            w = tensors[fqn]
            w = w.t() if layouts.get(fqn) == "in_out" else w
            entry = scales.get(fqn)
            if entry is None:
                raise PassError(f"round_weights_gptq rounded {fqn} but recorded no scales for it", "report a bug")
            grid = grid_of(w.float(), self.spec)
            grid.scale = entry["scale"].to(w.device)
            grid.zero = None if entry["zero"] is None else entry["zero"].to(w.device)
            # in the weight's dtype: a bf16/fp16 weight holds the grid value rounded to it, which requantizes to
            # the same codes (the grid's values are far apart compared to a bf16 ulp)
            if not torch.equal(grid.round(w.float()).to(w.dtype), w):
                raise PassError(f"round_weights_gptq: {fqn} is not on the grid of its recorded scales",
                                "report a bug")
