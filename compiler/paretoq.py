"""ParetoQ weight quantizers (1, 1.58, 2, 3 and 4 bit) with learnable scales, QAT hooks and conversion.

The numerics are METHODS.md §3. With ``x = W / α`` (``α`` per output row, or per row and group of input
columns) and ``g = ∂L/∂W_q``:

=========  ==========================================================  ====================  =====================
bits       forward ``W_q``                                             levels (× α)          α init (per row)
=========  ==========================================================  ====================  =====================
1          ``α · sign(W)``                                             ±1                    mean |W|
1.58       ``α · round(clip(x, ±0.99) · 1.5) / 1.5``  (SEQ)            {−2/3, 0, 2/3}        max |W|
2          ``α · (round(clip(x, ±0.99) · 2 − 0.5) + 0.5) / 2``  (SEQ)  {±0.25, ±0.75}        max |W|
3, 4       ``α · clamp(round(x), −2^(b−1), 2^(b−1) − 1)``  (LSQ)       integers              max |W| / (2^(b−1)−1)
=========  ==========================================================  ====================  =====================

Why the clip is ±0.99 and not ±1: ``round(1 · 1.5) = 2`` (half to even) would give ternary a fourth level
``4/3``, and ``round(1 · 2 − 0.5) = 2`` a fifth 2-bit level ``1.25`` — codes the packed formats cannot hold.

Backward (straight-through estimator):

* ``∂L/∂W = g`` where ``x`` lies inside the clip range (``|x| ≤ 1`` for 1 bit, ``|x| ≤ 0.99`` for SEQ,
  ``−2^(b−1) ≤ x ≤ 2^(b−1)−1`` for LSQ), 0 outside;
* ``∂L/∂α = grad_scale · Σ_row-or-group g · d``, ``grad_scale = 1/√(numel(W) · Qp)`` (``Qp = 2^(b−1)−1``, 1
  for b ≤ 2), with ``d = Q(x) − x`` inside the clip range and ``d = Q(x)`` (the level the clip produces:
  ``±2/3``, ``±0.75``, ``−2^(b−1)`` / ``2^(b−1)−1``) outside. This is the exact derivative of the forward once
  ``round`` is replaced by the identity (LSQ's rule, applied to SEQ too). For 1 bit, ``sign(W)`` does not
  depend on ``α``, so ``d = sign(W)`` exactly.

Conventions fixed here (and tested):

* ``sign(0) = +1``: ``torch.sign(0) = 0`` would be a third level that 1-bit storage cannot hold.
* ``α`` is clamped to ``≥ 1e-5`` in the forward pass (a scale trained to 0 or below would divide by 0), and
  the clamped value is what conversion stores, so the packed model is the fake-quant model.
* Every weight becomes an *unsigned code* ``u`` and a level ``(A·u − B) · STEP`` (:data:`LEVELS`), and the
  quantized weight is ``float32(level) · float32(α)`` — one rounding. The fake-quant forward computes the same
  levels in floating point (no integer codes, fewer passes over the weight while training) and equals the
  dequantized packed weight bit for bit, sign of zero included (tested for every width).
* Arithmetic is float32 for float32/fp16/bf16 weights (float64 stays float64, for gradient checks).
* Groups run along the input dimension; a group size that does not divide the width leaves a shorter last
  group, as everywhere in fxquant.

QAT in eager mode: :func:`prepare_qat` replaces each selected ``nn.Linear`` by a :class:`QATLinear` whose
scale ``weight_alpha`` is an ``nn.Parameter`` (state-dict key ``<module>.weight_alpha`` = ``<weight fqn>_alpha``,
the same name the FX pass ``insert_fake_quant`` gives its placeholder); train with any loop or the Hugging Face
``Trainer``; :func:`convert` then packs every weight into its registered low-bit format
(:mod:`fxquant.backends.lowbit`) and swaps in :class:`PackedLinear`, which calls the format's custom op.
"""
from __future__ import annotations

import fnmatch
import logging
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import QuantSpecError, RecipeError, WeightError
from .quant import check_weight

__all__ = [
    "ParetoQSpec", "ParetoQWeight", "LEVELS", "ALPHA_EPS", "CLIP", "quantize_codes", "levels_of", "dequantize_codes",
    "init_alpha", "paretoq_fake_quant", "ParetoQFakeQuant", "quantize_paretoq", "QATLinear", "PackedLinear",
    "is_conv1d", "prepare_qat", "convert", "paretoq_weights", "qat_modules", "grad_scale", "expand_groups", "group_sum",
]

log = logging.getLogger("fxquant")

#: the bit widths ParetoQ defines (1.58 = ternary)
ALLOWED_BITS = (1, 1.58, 2, 3, 4)
#: smallest scale the forward pass uses (the public ParetoQ code's eps)
ALPHA_EPS = 1e-5
#: stretched-elastic clip: inside ±1 so that no extra level appears at the boundary
CLIP = 0.99


@dataclass(frozen=True)
class _Levels:
    """Level of unsigned code ``u``: ``(A·u − B) · step`` (integers exact in float32, one rounding for ternary)."""

    a: int
    b: int
    step: float
    n_codes: int


#: bits -> code-to-level map. ``step`` for ternary is float32(2/3), the value ``1 / 1.5`` rounds to.
LEVELS: dict[float, _Levels] = {
    1: _Levels(2, 1, 1.0, 2),                                   # u ∈ {0,1}   -> {−1, +1}
    1.58: _Levels(1, 1, float(torch.tensor(2 / 3, dtype=torch.float32)), 3),  # u ∈ {0,1,2} -> {−2/3, 0, 2/3}
    2: _Levels(2, 3, 0.25, 4),                                  # u ∈ 0..3    -> {−0.75, −0.25, 0.25, 0.75}
    3: _Levels(1, 4, 1.0, 8),                                   # u ∈ 0..7    -> −4 .. 3
    4: _Levels(1, 8, 1.0, 16),                                  # u ∈ 0..15   -> −8 .. 7
}


def _normalize_bits(bits: object) -> float:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Real):
        raise QuantSpecError(f"ParetoQ bits must be one of 1, 1.58, 2, 3, 4, got {bits!r}",
                             "use 1.58 for ternary; wider weights: use an rtn-w<b> or fp6 recipe")
    for allowed in ALLOWED_BITS:
        if abs(float(bits) - allowed) < 1e-9:
            return allowed
    raise QuantSpecError(f"ParetoQ bits must be one of 1, 1.58, 2, 3, 4, got {bits!r}",
                         "use 1.58 for ternary; wider weights: use an rtn-w<b> or fp6 recipe")


@dataclass(frozen=True)
class ParetoQSpec:
    """ParetoQ weight quantization: ``bits`` in {1, 1.58, 2, 3, 4}, one learnable scale per output channel
    (``group_size=None``) or per group of ``group_size`` input columns (the last group may be shorter)."""

    bits: float
    group_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", _normalize_bits(self.bits))
        if self.group_size is not None:
            if (isinstance(self.group_size, bool) or not isinstance(self.group_size, numbers.Integral)
                    or self.group_size <= 0):
                raise QuantSpecError(f"ParetoQ group size must be a positive integer or None (per channel), "
                                     f"got {self.group_size!r}", "e.g. group_size=64, or None")
            object.__setattr__(self, "group_size", int(self.group_size))

    #: read by the registry's formats and by reports (integer formats use "int", FP6 "fp")
    kind = "paretoq"
    symmetric = True
    per_tensor = False

    @property
    def method(self) -> str:
        """``binary``, ``seq`` (ternary, 2 bit) or ``lsq`` (3, 4 bit)."""
        return "binary" if self.bits == 1 else ("seq" if self.bits <= 2 else "lsq")

    @property
    def levels(self) -> _Levels:
        return LEVELS[self.bits]

    @property
    def qp(self) -> int:
        """``Qp`` of the gradient scale: ``2^(b−1) − 1``, and 1 for b ≤ 2."""
        return 1 if self.bits <= 2 else (1 << (int(self.bits) - 1)) - 1

    @property
    def qn(self) -> int:
        return -(1 << (int(self.bits) - 1)) if self.method == "lsq" else -1

    @property
    def storage_bits(self) -> float:
        """Bits per weight in the packed format (ternary packs 5 codes per byte: 1.6 bits)."""
        return 1.6 if self.bits == 1.58 else float(self.bits)

    @property
    def label(self) -> str:
        return "1.58" if self.bits == 1.58 else str(int(self.bits))

    def describe(self) -> str:
        """``pq-w2``, ``pq-w1.58g64``: used in cache keys, checkpoints and reports."""
        return f"pq-w{self.label}" + (f"g{self.group_size}" if self.group_size else "")

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size is None else min(self.group_size, in_features)

    def __str__(self) -> str:
        return self.describe()


# ---- shared helpers -----------------------------------------------------------------------------------------------
def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """``[O, G]`` -> ``[O, C]``: column ``j`` takes group ``j // group_size`` (the last group may be shorter)."""
    if t.shape[1] == 1:
        return t.expand(-1, in_features)
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def group_sum(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[O, C]`` -> ``[O, G]``: the sum over each group of columns (zero-padding the shorter last group)."""
    rows, cols = t.shape
    if group_size >= cols:
        return t.sum(dim=1, keepdim=True)
    n_groups = -(-cols // group_size)
    pad = n_groups * group_size - cols
    return (F.pad(t, (0, pad)) if pad else t).reshape(rows, n_groups, group_size).sum(dim=2)


def grad_scale(spec: ParetoQSpec, numel: int) -> float:
    """LSQ's gradient scale ``1 / √(numel(W) · Qp)``."""
    return 1.0 / math.sqrt(numel * spec.qp)


def _check_alpha(alpha: torch.Tensor, rows: int, cols: int, group: int) -> None:
    n_groups = -(-cols // group)
    if alpha.dim() != 2 or tuple(alpha.shape) != (rows, n_groups):
        raise QuantSpecError(f"ParetoQ scale must have shape [{rows}, {n_groups}] for a [{rows}, {cols}] weight "
                             f"with group size {group}, got {tuple(alpha.shape)}",
                             "initialise it with fxquant.paretoq.init_alpha(weight, spec)")


def quantize_codes(w: torch.Tensor, alpha: torch.Tensor, spec: ParetoQSpec) -> torch.Tensor:
    """Unsigned codes (uint8 ``[O, C]``) of ``w`` under scales ``alpha`` (``[O, G]``, clamped to ≥ ALPHA_EPS).

    This is the single quantization function: the fake-quant forward, :func:`quantize_paretoq` (conversion)
    and the tests all call it, so the packed codes are the fake-quant codes.
    """
    dt = _compute_dtype(w)
    rows, cols = w.shape
    group = spec.effective_group_size(cols)
    _check_alpha(alpha, rows, cols, group)
    a = expand_groups(alpha.detach().to(dt).clamp_min(ALPHA_EPS), group, cols)
    w = w.detach().to(dt)
    if spec.method == "binary":
        return (w >= 0).to(torch.uint8)  # sign(0) = +1: 1-bit storage has no zero level
    x = w / a
    if spec.bits == 1.58:
        n = torch.round(x.clamp(-CLIP, CLIP) * 1.5)            # {-1, 0, 1}
        return (n + 1).to(torch.uint8)
    if spec.bits == 2:
        n = torch.round(x.clamp(-CLIP, CLIP) * 2 - 0.5)        # {-2, -1, 0, 1}; level (n + 0.5) / 2
        return (n + 2).to(torch.uint8)
    n = torch.round(x).clamp(spec.qn, spec.qp)                 # LSQ: -2^(b-1) .. 2^(b-1) - 1
    return (n - spec.qn).to(torch.uint8)


def levels_of(codes: torch.Tensor, spec: ParetoQSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The level (in units of α) of every unsigned code: ``(A·u − B) · step`` in ``dtype``."""
    lv = spec.levels
    return (codes.to(torch.int32) * lv.a - lv.b).to(dtype) * lv.step


def dequantize_codes(codes: torch.Tensor, alpha: torch.Tensor, spec: ParetoQSpec,
                     dtype: torch.dtype = torch.float32, compute: torch.dtype = torch.float32) -> torch.Tensor:
    """``(level(code) · α)`` in ``compute`` precision (float32), then a cast to ``dtype``: the one numerics."""
    rows, cols = codes.shape
    group = spec.effective_group_size(cols)
    a = expand_groups(alpha.detach().to(compute).clamp_min(ALPHA_EPS), group, cols)
    return (levels_of(codes, spec, compute) * a).to(dtype)


def init_alpha(w: torch.Tensor, spec: ParetoQSpec) -> torch.Tensor:
    """METHODS.md's initial scales, float32 ``[O, G]``: mean|W| (1 bit), max|W| (SEQ), max|W|/Qp (LSQ).

    A group of zeros gets ``ALPHA_EPS`` (the forward pass's floor): its weights quantize to (almost) 0.
    """
    check_weight(w)
    rows, cols = w.shape
    group = spec.effective_group_size(cols)
    n_groups = -(-cols // group)
    a = w.detach().abs().to(torch.float32)
    pad = n_groups * group - cols
    grouped = F.pad(a, (0, pad)).reshape(rows, n_groups, group)
    if spec.method == "binary":
        counts = torch.full((n_groups,), float(group), device=w.device)
        counts[-1] = cols - (n_groups - 1) * group  # the shorter last group averages over its own columns
        stat = grouped.sum(dim=2) / counts
    elif spec.method == "seq":
        stat = grouped.amax(dim=2)
    else:
        stat = grouped.amax(dim=2) / spec.qp
    return stat.clamp_min(ALPHA_EPS).contiguous()


# ---- the autograd function -----------------------------------------------------------------------------------------
def _levels_float(w: torch.Tensor, a: torch.Tensor, spec: ParetoQSpec) -> torch.Tensor:
    """The level of every weight computed in floating point, without codes (the fast training path).

    Equal bit for bit to ``levels_of(quantize_codes(w, a, spec))``: the integers are exact, ``n · step`` is the
    table's single rounding, and ``+ 0.0`` turns a ``-0.0`` (``round(-0.3)``) into the table's ``+0.0``.
    The tests check the equality for every width through the packed formats.
    """
    if spec.method == "binary":
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    x = w / a
    if spec.bits == 1.58:
        return torch.round(x.clamp(-CLIP, CLIP) * 1.5) * spec.levels.step + 0.0
    if spec.bits == 2:
        return (torch.round(x.clamp(-CLIP, CLIP) * 2 - 0.5) + 0.5) * 0.5
    return torch.round(x).clamp(spec.qn, spec.qp) + 0.0


class ParetoQFakeQuant(torch.autograd.Function):
    """``W_q = level(W / α) · α`` with the straight-through and LSQ gradients of the module docstring."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, alpha: torch.Tensor, spec: ParetoQSpec) -> torch.Tensor:  # type: ignore[override]
        dt = _compute_dtype(w)
        rows, cols = w.shape
        group = spec.effective_group_size(cols)
        _check_alpha(alpha, rows, cols, group)
        a = expand_groups(alpha.detach().to(dt).clamp_min(ALPHA_EPS), group, cols)
        w_c = w.detach().to(dt)
        out = _levels_float(w_c, a, spec) * a
        ctx.spec = spec
        ctx.w_dtype = w.dtype
        ctx.alpha_dtype = alpha.dtype
        ctx.save_for_backward(w, alpha)
        return out.to(w.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        w, alpha = ctx.saved_tensors
        spec: ParetoQSpec = ctx.spec
        dt = _compute_dtype(w)
        rows, cols = w.shape
        group = spec.effective_group_size(cols)
        a = expand_groups(alpha.detach().to(dt).clamp_min(ALPHA_EPS), group, cols)
        w_c = w.detach().to(dt)
        x = w_c / a
        g = grad.to(dt)
        q = _levels_float(w_c, a, spec)
        if spec.method == "binary":
            inside = x.abs() <= 1.0
            d = q                                         # ∂(α·sign W)/∂α = sign W
        elif spec.method == "seq":
            inside = x.abs() <= CLIP
            d = torch.where(inside, q - x, q)
        else:
            inside = (x >= spec.qn) & (x <= spec.qp)
            d = torch.where(inside, q - x, q)
        grad_w = (g * inside).to(ctx.w_dtype)
        grad_alpha = group_sum(g * d, group) * grad_scale(spec, w.numel())
        # a scale held at the floor ALPHA_EPS does not move the output: no gradient flows into it below the floor
        grad_alpha = torch.where(alpha.detach().to(dt) > ALPHA_EPS, grad_alpha, torch.zeros((), dtype=dt))
        return grad_w, grad_alpha.to(ctx.alpha_dtype), None


def paretoq_fake_quant(w: torch.Tensor, alpha: torch.Tensor, bits: float, group_size: int = 0) -> torch.Tensor:
    """Fake-quantize ``w`` with scales ``alpha`` (the call the FX pass inserts; ``group_size`` 0 = per channel)."""
    spec = ParetoQSpec(bits, group_size or None)
    if w.dim() != 2:
        raise WeightError(f"ParetoQ fake-quant takes a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    return ParetoQFakeQuant.apply(w, alpha, spec)


# ---- quantized weights ----------------------------------------------------------------------------------------------
@dataclass
class ParetoQWeight:
    """A ParetoQ-quantized ``[O, C]`` weight: unsigned codes (uint8 ``[O, C]``) and float32 scales ``[O, G]``.

    ``dequantize`` is :func:`dequantize_codes`; the packed formats of :mod:`fxquant.backends.lowbit` reproduce
    it bit for bit. Shaped like :class:`fxquant.quant.QuantizedWeight` (``codes``, ``scale``, ``zero``,
    ``spec``, ``group_size``) so that checkpoints and size reports treat both alike.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    spec: ParetoQSpec
    group_size: int
    zero: None = None

    def __post_init__(self) -> None:
        if self.codes.dim() != 2 or self.codes.dtype != torch.uint8:
            raise WeightError(f"ParetoQ codes must be uint8 [out, in], got {self.codes.dtype} {tuple(self.codes.shape)}")
        rows, cols = self.codes.shape
        n_groups = -(-cols // self.group_size)
        if tuple(self.scale.shape) != (rows, n_groups) or self.scale.dtype != torch.float32:
            raise WeightError(f"ParetoQ scale must be float32 [{rows}, {n_groups}], got {self.scale.dtype} "
                              f"{list(self.scale.shape)}")
        if self.codes.numel() and int(self.codes.max()) >= self.spec.levels.n_codes:
            raise WeightError(f"{self.spec.describe()} codes must lie in 0..{self.spec.levels.n_codes - 1}, "
                              f"got a {int(self.codes.max())}", "the checkpoint is corrupted or of another format")

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scale, self.spec, dtype=dtype)

    def packed_nbytes(self) -> int:
        """Bytes of the packed format: the code planes plus float32 scales (what :mod:`lowbit` stores)."""
        rows, cols = self.codes.shape
        per_row = {1: -(-cols // 8), 1.58: -(-cols // 5), 2: -(-cols // 4), 3: -(-cols // 4) + -(-cols // 8),
                   4: -(-cols // 2)}[self.spec.bits]
        return rows * per_row + 4 * self.scale.numel()


def quantize_paretoq(w: torch.Tensor, alpha: torch.Tensor, spec: ParetoQSpec, name: str | None = None) -> ParetoQWeight:
    """Codes and (clamped, float32) scales of ``w``: what :func:`convert` packs."""
    check_weight(w, name)
    group = spec.effective_group_size(w.shape[1])
    scale = alpha.detach().to(torch.float32).clamp_min(ALPHA_EPS).contiguous()
    return ParetoQWeight(quantize_codes(w, scale, spec), scale, spec, group)


# ---- eager QAT modules ----------------------------------------------------------------------------------------------
def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``x @ W + b`` with the weight stored ``[in, out]``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


class QATLinear(nn.Module):
    """An ``nn.Linear`` (or transformers' ``Conv1D``) whose weight is fake-quantized with ParetoQ on every forward.

    It keeps the original ``weight`` and ``bias`` Parameters (same objects, same state-dict keys) and adds the
    trainable scale ``weight_alpha`` (float32 ``[out, groups]``), so an optimizer built after
    :func:`prepare_qat` trains both and a state dict saved mid-training restores both. A ``Conv1D`` weight is
    stored ``[in, out]`` (``in_out``): the quantizer sees its ``[out, in]`` transpose, so scales, levels and
    codes are per output channel as for every other linear.
    """

    def __init__(self, linear: nn.Module, spec: ParetoQSpec, alpha: torch.Tensor | None = None):
        super().__init__()
        self.in_out = is_conv1d(linear)
        self.weight = linear.weight
        self.bias = linear.bias
        self.out_features, self.in_features = self._oi().shape
        self.spec = spec
        init = init_alpha(self._oi(), spec) if alpha is None else alpha.detach().to(torch.float32).clone()
        _check_alpha(init, self.out_features, self.in_features, spec.effective_group_size(self.in_features))
        self.weight_alpha = nn.Parameter(init.to(linear.weight.device))
        # an nn.Linear subclass (Falcon's FalconLinear: x @ W.T + b) or a Conv1D comes back as itself after QAT,
        # not as nn.Linear; kept in a tuple so that it is no submodule (no second copy of the parameters)
        self._subclass_module = (linear,) if type(linear) is not nn.Linear else ()

    def _oi(self) -> torch.Tensor:
        """The weight as ``[out, in]`` (a view for Conv1D)."""
        return self.weight.t() if self.in_out else self.weight

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight, ``[out, in]``."""
        return ParetoQFakeQuant.apply(self._oi(), self.weight_alpha, self.spec)

    def quantized(self) -> ParetoQWeight:
        """Codes and scales of the ``[out, in]`` weight."""
        return quantize_paretoq(self._oi(), self.weight_alpha, self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def to_linear(self, dequantized: bool = False) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this module's Parameters (``dequantized``: holding the quantized values);
        the original module for an ``nn.Linear`` subclass or a ``Conv1D`` (its weight back in ``[in, out]``)."""
        if self._subclass_module:
            if dequantized:
                with torch.no_grad():
                    w = self.quantized_weight()
                    self.weight.copy_(w.t() if self.in_out else w)
            return self._subclass_module[0]
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        if dequantized:
            with torch.no_grad():
                self.weight.copy_(self.quantized_weight())
        return lin

    def extra_repr(self) -> str:
        layout = ", layout=[in, out] (Conv1D)" if self.in_out else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.describe()}{layout}"


class PackedLinear(nn.Module):
    """Inference linear over a packed low-bit weight: calls ``fxquant::linear_<format>`` (Triton on CUDA, the
    exact reference elsewhere). The packed tensors are buffers, so ``.to(device)`` and ``state_dict`` see them."""

    def __init__(self, qw: ParetoQWeight, bias: torch.Tensor | None = None):
        super().__init__()
        from fxquant.backends import registry
        fmt, why = registry.select_format(qw.spec)
        if fmt is None:
            raise QuantSpecError(f"no packed format holds {qw.spec.describe()}: {why}",
                                 "import fxquant.backends.lowbit (it registers the ParetoQ formats)")
        packed = registry.pack(qw, fmt)
        self.format = fmt.name
        self.spec = qw.spec
        self.in_features = int(qw.codes.shape[1])
        self.out_features = int(qw.codes.shape[0])
        self._tensor_names = fmt.tensor_names
        self._attrs = dict(packed.attrs)
        for name in fmt.tensor_names:
            self.register_buffer(name, packed.tensors[name])
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def fmt(self) -> Any:
        from fxquant.backends import registry
        return registry.get_format(self.format)

    def packed_args(self) -> tuple:
        return tuple(getattr(self, n) for n in self._tensor_names)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.fmt.dequantize(*self.packed_args(), dtype=dtype, **self._attrs)

    def quantized(self) -> ParetoQWeight:
        """The codes and scales back from the packed tensors."""
        from fxquant.backends import lowbit
        codes = lowbit.unpack_codes(self.spec.bits, *self.packed_args()[:-1], in_features=self.in_features)
        return ParetoQWeight(codes, self.packed_args()[-1].float(), self.spec, self._attrs["group_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmt = self.fmt
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return fmt.op(x, *self.packed_args(), bias, *[self._attrs[a] for a in fmt.attr_args])

    def packed_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.packed_args())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


# ---- prepare / convert ------------------------------------------------------------------------------------------------
def _matches(fqn: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], fqn) is not None
    parts = fqn.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def _resolve_spec(recipe: Any) -> tuple[ParetoQSpec, tuple[str, ...]]:
    if isinstance(recipe, ParetoQSpec):
        return recipe, ("lm_head*",)
    if isinstance(recipe, (int, float)) and not isinstance(recipe, bool):
        return ParetoQSpec(recipe), ("lm_head*",)
    from .recipes import get_recipe
    r = get_recipe(recipe)
    if not isinstance(r.weight, ParetoQSpec):
        raise RecipeError(f"recipe {r.name!r} is not a ParetoQ recipe (method {r.method!r})",
                          "use paretoq-w1, paretoq-w1.58, paretoq-w2, paretoq-w3 or paretoq-w4")
    return r.weight, tuple(r.exclude)


def _tied_weight_ids(model: nn.Module) -> set[int]:
    """Parameters that some non-Linear module also holds (tied embeddings): quantizing them would change it."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, n in seen.items() if n > 1}


def prepare_qat(model: nn.Module, recipe: Any = "paretoq-w2", *, exclude: Sequence[str] | None = None,
                include: Sequence[str] | None = None, alphas: dict[str, torch.Tensor] | None = None,
                linear_subclasses: bool = False) -> nn.Module:
    """Replace every selected ``nn.Linear`` (and transformers' ``Conv1D``, GPT-2's ``[in, out]`` linears) of
    ``model`` (in place) by a :class:`QATLinear`; return ``model``.

    ``recipe`` is a ParetoQ recipe name (``paretoq-w2``), a :class:`~fxquant.recipes.Recipe`, a
    :class:`ParetoQSpec` or a bit width. ``exclude``/``include`` are glob patterns over module names (default:
    the recipe's ``exclude``, i.e. ``lm_head`` stays float); embeddings and norms are never linears, and a
    linear whose weight is tied to another module is skipped with a warning (untie it to quantize it).
    ``alphas`` maps ``<weight fqn>`` to initial scales (the FX pass's trained or initial scales).
    Build the optimizer *after* this call so it sees the scales. ``linear_subclasses``: also take subclasses of
    ``nn.Linear`` (their forward is not checked here: the FX path passes True for the modules its graph shows
    computing ``x @ Wᵀ (+ b)``).
    """
    spec, default_exclude = _resolve_spec(recipe)
    exclude = tuple(default_exclude if exclude is None else exclude)
    if any(isinstance(m, QATLinear) for m in model.modules()):
        raise RecipeError("the model is already prepared for QAT", "call prepare_qat once, then train, then convert")
    tied = _tied_weight_ids(model)
    targets = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear and not (linear_subclasses and isinstance(module, nn.Linear)) \
                and not is_conv1d(module):
            continue
        if include is not None and not any(_matches(name, p) for p in include):
            continue
        if any(_matches(name, p) for p in exclude):
            continue
        if id(module.weight) in tied:
            log.warning("prepare_qat: not quantizing %s: its weight is tied to another module (untie it first)", name)
            continue
        targets.append(name)
    if not targets:
        raise RecipeError(f"prepare_qat found no nn.Linear to quantize in {type(model).__name__}",
                          "check include/exclude; fxquant's ParetoQ QAT replaces torch.nn.Linear modules")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        init = None if alphas is None else alphas.get(f"{name}.weight")
        setattr(parent, child, QATLinear(lin, spec, init))
    model._fxquant_paretoq = {"spec": spec.describe(), "bits": spec.bits, "group_size": spec.group_size}
    return model


def qat_modules(model: nn.Module) -> dict[str, QATLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QATLinear)}


def convert(model: nn.Module, *, packed: bool = True) -> nn.Module:
    """Finish QAT: every :class:`QATLinear` becomes a packed :class:`PackedLinear` (``packed=True``) or a plain
    ``nn.Linear`` holding the exactly dequantized weight (``packed=False``, for ``save_pretrained`` checkpoints;
    the codes are remembered with :func:`fxquant.backends.registry.remember_quantized`). Returns ``model``.

    Both forms compute the fake-quant model's weights bit for bit; :func:`paretoq_weights` returns the codes.
    """
    from fxquant.backends import lowbit  # noqa: F401 - registers the formats
    from fxquant.backends import registry
    modules = qat_modules(model)
    if not modules:
        raise RecipeError(f"{type(model).__name__} has no QATLinear to convert", "call prepare_qat(model, recipe) first")
    for name, m in modules.items():
        qw = quantize_paretoq(m._oi(), m.weight_alpha, m.spec, name=f"{name}.weight")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if packed:                       # x @ Wᵀ + b over the [out, in] codes: a Conv1D's x @ W + b too
            new: nn.Module = PackedLinear(qw, m.bias).to(m.weight.device)
        else:
            new = m.to_linear()
            deq = qw.dequantize(new.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(deq.t() if m.in_out else deq)
            new.weight.requires_grad_(False)
            registry.remember_quantized(new.weight, qw, in_out=m.in_out)
        setattr(parent, child, new)
    return model


def paretoq_weights(model: nn.Module) -> dict[str, ParetoQWeight]:
    """``<weight fqn> -> ParetoQWeight`` of a prepared, converted (packed) or converted (float) model."""
    from fxquant.backends import registry
    out: dict[str, ParetoQWeight] = {}
    for name, m in model.named_modules():
        if isinstance(m, QATLinear):
            out[f"{name}.weight"] = m.quantized()
        elif isinstance(m, PackedLinear):
            out[f"{name}.weight"] = m.quantized()
        elif isinstance(m, nn.Linear) or is_conv1d(m):
            rec = registry.recorded_quantization(m.weight, in_out=is_conv1d(m))
            if isinstance(rec, ParetoQWeight):
                out[f"{name}.weight"] = rec
    return out


def scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """The current scales of a prepared model, ``<weight fqn>_alpha -> tensor`` (detached copies)."""
    return {f"{n}.weight_alpha": m.weight_alpha.detach().clone() for n, m in qat_modules(model).items()}


def trainable_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    """Every parameter that requires grad (latent weights, scales, and the float parts): ParetoQ trains all."""
    seen: set[int] = set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            yield p
