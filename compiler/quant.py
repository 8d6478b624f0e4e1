"""Integer weight quantization: the spec, round-to-nearest quantization and the one dequantization formula.

Everything else in fxquant that quantizes or dequantizes integer weights (the RTN pass, TEQ/QAT fake-quant,
packing, the reference ops and the Triton kernels) goes through, or must agree bit for bit with, this module.

Conventions (those of Intel Neural Compressor's weight-only RTN, which the reference perplexities were made with):

* **Layout.** A weight is ``W[O, C]`` in ``nn.Linear`` layout (``O`` output channels, ``C`` input channels).
  Scales run per output row and, with a group size ``g``, per group of ``g`` consecutive *input* columns:
  column ``j`` belongs to group ``j // g`` and there are ``ceil(C / g)`` groups. When ``g`` does not divide ``C``
  the **last group is shorter** (SmolLM2: ``C = 576``, ``g = 128`` gives 4 groups of 128 and one of 64); the layer
  is never skipped or padded in a way that changes the numbers (torchao refuses or skips such layers).
  Per-channel is one group of width ``C``; per-tensor is one scale for the whole tensor, stored broadcast as
  ``[O, 1]`` so that every granularity has the same ``[O, n_groups]`` scale layout.
* **Symmetric** ``b`` bits: ``scale = absmax / (2^(b-1) - 1)``, ``q = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1)``.
  The code ``-2^(b-1)`` is in the clamp range but never produced by rounding (so 4-bit uses 15 levels); this is
  Neural Compressor's choice, not the "absmax / 2^(b-1)" variant, and perplexities differ between the two.
  One bit symmetric would divide by ``2^0 - 1 = 0``, so symmetric needs ``b >= 2``.
* **Asymmetric** ``b`` bits: ``min' = min(wmin, 0)``, ``max' = max(wmax, 0)`` (the range always holds 0, so a zero
  weight is exact), ``scale = (max' - min') / (2^b - 1)``, ``zero = clamp(round(-min' / scale), 0, 2^b - 1)``,
  ``q = clamp(round(w / scale) + zero, 0, 2^b - 1)``. Codes are unsigned and stored in ``uint8``.
* **Zero groups.** A group whose scale comes out as 0 (all weights 0, or an absmax so small that the division
  underflows) gets ``scale = 1``: its codes are 0 and it dequantizes to exactly 0 — no NaN from 0/0.
* **Rounding** is ``torch.round``: round half to *even* (2.5 -> 2, 3.5 -> 4), like Neural Compressor, numpy and
  the IEEE default. Kernels must do the same (``rint``, not ``floor(x + 0.5)``).
* **Arithmetic** is float32 whatever the weight's dtype, and dequantization is exactly
  ``(codes.float() - zero) * scale`` (``codes.float() * scale`` when symmetric) in float32, then a cast to the
  requested dtype. Both factors of the product are exact in float32 (small integers, a float32 scale), so there
  is a single rounding: this is the "one numerics" a Triton kernel reproduces bit for bit.

Float formats (FP6 E3M2 ...) and activation specs will get their own ``kind``; today only ``kind="int"`` exists.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import QuantSpecError, WeightError

__all__ = [
    "QuantSpec", "QuantizedWeight", "quantize_weight", "fake_quantize", "FakeQuantizeSTE", "check_weight",
]

Granularity = Literal["tensor", "channel", "group"]

_SPEC_RE = re.compile(r"w(?P<bits>\d+)(?:g(?P<group>\d+)|(?P<tensor>t))?(?P<asym>a)?")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a weight: integer bit width, symmetric or not, and the scale granularity.

    ``group_size=None`` and ``per_tensor=False`` means per output channel. Invalid combinations raise
    :class:`QuantSpecError` at construction, with a one-line message that says what is allowed, so a bad
    recipe fails before any model is loaded.
    """

    bits: int
    symmetric: bool = True
    group_size: int | None = None
    per_tensor: bool = False
    #: number format; only "int" today (room for "fp" formats such as FP6 E3M2 later)
    kind: str = "int"

    def __post_init__(self) -> None:
        if self.kind != "int":
            raise QuantSpecError(f"quantization kind must be 'int' (float formats are not part of QuantSpec yet), "
                                 f"got {self.kind!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, numbers.Integral):
            raise QuantSpecError(f"bits must be an integer from 1 to 8, got {self.bits!r}")
        object.__setattr__(self, "bits", int(self.bits))
        if not 1 <= self.bits <= 8:
            raise QuantSpecError(f"bits must be an integer from 1 to 8 (symmetric needs at least 2), got {self.bits}")
        if not isinstance(self.symmetric, bool):
            raise QuantSpecError(f"symmetric must be True or False, got {self.symmetric!r}")
        if not isinstance(self.per_tensor, bool):
            raise QuantSpecError(f"per_tensor must be True or False, got {self.per_tensor!r}")
        if self.symmetric and self.bits < 2:
            raise QuantSpecError("symmetric integer quantization needs bits >= 2 (scale = absmax / (2^(b-1) - 1) "
                                 "divides by 0 at 1 bit); use 2..8 bits, or bits=1 with symmetric=False")
        if self.group_size is not None:
            if (isinstance(self.group_size, bool) or not isinstance(self.group_size, numbers.Integral)
                    or self.group_size <= 0):
                raise QuantSpecError("group size must be a positive integer (e.g. 32, 64, 128), or None for "
                                     f"per-channel, got {self.group_size!r}")
            object.__setattr__(self, "group_size", int(self.group_size))
            if self.per_tensor:
                raise QuantSpecError(f"per_tensor=True and group_size={self.group_size} are exclusive: choose one "
                                     "scale per tensor, per group (group_size=N), or per channel (neither)")

    # ---- derived -------------------------------------------------------------------------------
    @property
    def granularity(self) -> Granularity:
        if self.per_tensor:
            return "tensor"
        return "channel" if self.group_size is None else "group"

    @property
    def qmin(self) -> int:
        """Smallest code: ``-2^(b-1)`` symmetric, 0 asymmetric."""
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest code: ``2^(b-1) - 1`` symmetric, ``2^b - 1`` asymmetric."""
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    def describe(self) -> str:
        """Compact name used in recipes and reports: ``w8``, ``w4g128``, ``w4g128a``, ``w8t`` (per-tensor).

        :meth:`parse` reads it back.
        """
        text = f"w{self.bits}"
        if self.group_size is not None:
            text += f"g{self.group_size}"
        elif self.per_tensor:
            text += "t"
        return text + ("" if self.symmetric else "a")

    @classmethod
    def parse(cls, text: str) -> QuantSpec:
        """The inverse of :meth:`describe` (``"w4g128a"`` -> 4 bits, group 128, asymmetric)."""
        m = _SPEC_RE.fullmatch(text.strip().lower())
        if m is None:
            raise QuantSpecError(f"cannot read quantization spec {text!r}: write w<bits>[g<group>|t][a], "
                                 "e.g. w8, w4g128, w4g128a, w8t (per-tensor)")
        return cls(bits=int(m["bits"]), symmetric=m["asym"] is None,
                   group_size=int(m["group"]) if m["group"] is not None else None,
                   per_tensor=m["tensor"] is not None)

    def effective_group_size(self, in_features: int) -> int:
        """Width of a (full) group for a weight with ``in_features`` input columns.

        A group size at least as wide as the weight is per-channel, and reported as such (``in_features``).
        """
        if self.group_size is None:
            return in_features
        return min(self.group_size, in_features)

    def __str__(self) -> str:
        return self.describe()


@dataclass
class QuantizedWeight:
    """A quantized ``[O, C]`` weight: integer codes plus per-(row, group) scales and zero points.

    ``codes`` are int8 (symmetric, signed) or uint8 (asymmetric, ``0 .. 2^b - 1``); ``scale`` is float32
    ``[O, n_groups]``; ``zero`` is int32 ``[O, n_groups]`` for asymmetric specs and None otherwise;
    ``group_size`` is the effective group width (``C`` for per-channel and per-tensor). Group ``k`` covers
    columns ``k * group_size .. min((k + 1) * group_size, C) - 1``, so the last group may be shorter.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec
    group_size: int

    def __post_init__(self) -> None:
        # cheap structural checks: catches a foreign or corrupted checkpoint before it dequantizes to garbage
        if self.codes.dim() != 2:
            raise WeightError(f"quantized codes must be 2-D [out, in], got shape {tuple(self.codes.shape)}")
        want = torch.int8 if self.spec.symmetric else torch.uint8
        if self.codes.dtype != want:
            raise WeightError(f"{self.spec.describe()} codes must be {want}, got {self.codes.dtype}")
        rows, cols = self.codes.shape
        if self.group_size <= 0:
            raise WeightError(f"group_size must be positive, got {self.group_size}")
        n_groups = -(-cols // self.group_size) if cols else 0
        if tuple(self.scale.shape) != (rows, n_groups) or self.scale.dtype != torch.float32:
            raise WeightError(f"scale must be float32 {[rows, n_groups]} for codes {[rows, cols]} with group size "
                              f"{self.group_size}, got {self.scale.dtype} {list(self.scale.shape)}")
        if self.spec.symmetric:
            if self.zero is not None:
                raise WeightError(f"symmetric spec {self.spec.describe()} has no zero point, but one was given")
        elif self.zero is None or tuple(self.zero.shape) != (rows, n_groups) or self.zero.dtype != torch.int32:
            got = None if self.zero is None else f"{self.zero.dtype} {list(self.zero.shape)}"
            raise WeightError(f"asymmetric spec {self.spec.describe()} needs an int32 zero point of shape "
                              f"{[rows, n_groups]}, got {got}")

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def n_groups(self) -> int:
        return int(self.scale.shape[1])

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        """Expand a per-(row, group) tensor ``[O, n_groups]`` to ``[O, C]``, honouring a shorter last group."""
        return t.repeat_interleave(self.group_size, dim=1)[:, : self.codes.shape[1]]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(codes - zero) * scale`` in float32, then cast to ``dtype``: the one reference numerics."""
        scale = self.expand(self.scale)
        if self.zero is None:
            values = self.codes.float() * scale
        else:
            values = (self.codes.float() - self.expand(self.zero).float()) * scale
        return values.to(dtype)

    def code_range_error(self) -> str | None:
        """None if every code lies in the spec's range, else a sentence saying what is out of range."""
        if self.codes.numel() == 0:
            return None
        lo, hi = int(self.codes.min()), int(self.codes.max())
        if lo < self.spec.qmin or hi > self.spec.qmax:
            return (f"codes span [{lo}, {hi}] but {self.spec.describe()} allows "
                    f"[{self.spec.qmin}, {self.spec.qmax}]")
        if self.zero is not None and self.zero.numel():
            zlo, zhi = int(self.zero.min()), int(self.zero.max())
            if zlo < 0 or zhi > self.spec.qmax:
                return f"zero points span [{zlo}, {zhi}] but must lie in [0, {self.spec.qmax}]"
        return None

    def packed_nbytes(self) -> int:
        """Bytes the weight takes when packed: ``bits`` per code, fp16 scales, ``bits`` per zero point.

        A per-tensor weight counts one scale (it is stored broadcast as ``[O, 1]`` only for a uniform layout).
        """
        rows, cols = self.codes.shape
        bits = self.spec.bits
        n_scales = 1 if self.spec.per_tensor else self.scale.numel()
        nbytes = math.ceil(rows * cols * bits / 8) + 2 * n_scales
        if self.zero is not None:
            n_zero = 1 if self.spec.per_tensor else self.zero.numel()
            nbytes += math.ceil(n_zero * bits / 8)
        return nbytes


def check_weight(w: torch.Tensor, name: str | None = None) -> None:
    """Raise :class:`WeightError` unless ``w`` is a finite, non-empty, floating-point 2-D ``[out, in]`` tensor."""
    what = f"weight {name!r}" if name else "weight"
    if not isinstance(w, torch.Tensor):
        raise WeightError(f"{what} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise WeightError(f"{what} must be 2-D [out_features, in_features], got shape {tuple(w.shape)}",
                          "quantize linear weights; reshape convolution or fused weights to [out, in] first")
    if not w.is_floating_point():
        raise WeightError(f"{what} must be a floating-point tensor, got {w.dtype}",
                          "it looks already quantized; dequantize it or load the float checkpoint")
    if w.numel() == 0:
        raise WeightError(f"{what} is empty (shape {tuple(w.shape)})", "there is nothing to quantize; exclude it")
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        bad = ~finite
        n_bad = int(bad.sum())
        n_nan = int(torch.isnan(w).sum())
        first = [int(i) for i in bad.nonzero()[0]]
        raise WeightError(
            f"{what} has {n_bad} non-finite value(s) ({n_nan} NaN, {n_bad - n_nan} Inf) of {w.numel()}, "
            f"first at index {first}",
            "the checkpoint is corrupted or a training/folding step diverged: reload the float weights "
            "(or exclude this layer); fxquant does not quantize NaN/Inf")


def _check_explicit(scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec, rows: int, n_groups: int,
                    what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate scales (and zero points) given to :func:`quantize_weight` instead of computed; float32 / int32."""
    if tuple(scale.shape) != (rows, n_groups):
        raise WeightError(f"{what}: explicit scales have shape {tuple(scale.shape)}, the weight needs "
                          f"{(rows, n_groups)} (rows, groups)", "give one scale per row and group")
    scale = scale.detach().to(torch.float32).contiguous()
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise WeightError(f"{what}: explicit scales must be finite and positive", "derive them from the weight's range")
    if spec.symmetric:
        if zero is not None:
            raise WeightError(f"{what}: symmetric spec {spec.describe()} takes no zero point", "drop zero=")
        return scale, None
    if zero is None or tuple(zero.shape) != (rows, n_groups):
        raise WeightError(f"{what}: asymmetric spec {spec.describe()} needs explicit zero points of shape "
                          f"{(rows, n_groups)} with its explicit scales", "pass zero= beside scale=")
    zero = zero.detach().to(torch.int32).contiguous()
    if int(zero.min()) < 0 or int(zero.max()) > spec.qmax:
        raise WeightError(f"{what}: zero points must lie in [0, {spec.qmax}]")
    return scale, zero


def quantize_weight(w: torch.Tensor, spec: QuantSpec, *, name: str | None = None, scale: torch.Tensor | None = None,
                    zero: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w[O, C]`` per ``spec`` (see the module docstring for the formulas).

    ``name`` (e.g. the parameter FQN) is used in error messages. The input is never modified. ``scale`` (float32
    ``[O, n_groups]``) and, for an asymmetric spec, ``zero`` (int ``[O, n_groups]``) replace the scales and zero
    points computed from the weight's range: the codes are then ``clamp(round(w / scale) [+ zero])`` with them
    (``round_weights_gptq`` fixes its scales before it rounds, and the weights it leaves lie on that grid, not
    necessarily reaching the grid's ends).
    """
    if not isinstance(spec, QuantSpec):
        raise QuantSpecError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    check_weight(w, name)
    w32 = w.detach().to(torch.float32)
    rows, cols = w32.shape
    g = spec.effective_group_size(cols)
    n_groups = -(-cols // g)
    if scale is not None:
        zero = None if zero is None else zero.to(w32.device)
        scale, zero = _check_explicit(scale.to(w32.device), zero, spec, rows, n_groups, f"weight {name!r}" if name else "weight")
        full = scale.repeat_interleave(g, dim=1)[:, :cols]
        if zero is None:
            codes = torch.clamp(torch.round(w32 / full), spec.qmin, spec.qmax).to(torch.int8)
        else:
            full_zero = zero.float().repeat_interleave(g, dim=1)[:, :cols]
            codes = torch.clamp(torch.round(w32 / full) + full_zero, 0, spec.qmax).to(torch.uint8)
        return QuantizedWeight(codes=codes, scale=scale, zero=zero, spec=spec, group_size=g)
    if zero is not None:
        raise WeightError("quantize_weight: zero points were given without scales", "pass scale= with zero=")
    # pad to whole groups with zeros: zeros change neither absmax nor min(.,0)/max(.,0), so the shorter last
    # group gets exactly the statistics of its own columns
    pad = n_groups * g - cols
    grouped = torch.nn.functional.pad(w32, (0, pad)).reshape(rows, n_groups, g)
    one = torch.ones((), dtype=torch.float32, device=w32.device)

    if spec.symmetric:
        absmax = grouped.abs().amax(dim=2)
        if spec.per_tensor:
            absmax = absmax.amax().expand(rows, 1)
        scale = absmax / float(spec.qmax)
        scale = torch.where(scale == 0, one, scale).contiguous()
        full = scale.repeat_interleave(g, dim=1)[:, :cols]
        codes = torch.clamp(torch.round(w32 / full), spec.qmin, spec.qmax).to(torch.int8)
        return QuantizedWeight(codes=codes, scale=scale, zero=None, spec=spec, group_size=g)

    lo = torch.clamp(grouped.amin(dim=2), max=0.0)
    hi = torch.clamp(grouped.amax(dim=2), min=0.0)
    if spec.per_tensor:
        lo = lo.amin().expand(rows, 1)
        hi = hi.amax().expand(rows, 1)
    scale = (hi - lo) / float(spec.qmax)
    scale = torch.where(scale == 0, one, scale).contiguous()
    zero = torch.clamp(torch.round(-lo / scale), 0, spec.qmax)
    full_scale = scale.repeat_interleave(g, dim=1)[:, :cols]
    full_zero = zero.repeat_interleave(g, dim=1)[:, :cols]
    codes = torch.clamp(torch.round(w32 / full_scale) + full_zero, 0, spec.qmax).to(torch.uint8)
    return QuantizedWeight(codes=codes, scale=scale, zero=zero.to(torch.int32).contiguous(), spec=spec,
                           group_size=g)


class FakeQuantizeSTE(torch.autograd.Function):
    """Fake quantization with a straight-through estimator: forward quantizes and dequantizes, backward passes
    the gradient through unchanged (the RTN scale is a function of ``w`` but, as in TEQ, it is not trained)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:  # noqa: D102
        return quantize_weight(w, spec).dequantize(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return grad, None


def fake_quantize(w: torch.Tensor, spec: QuantSpec, *, ste: bool = False) -> torch.Tensor:
    """``quantize_weight(w, spec).dequantize(w.dtype)``; with ``ste=True`` differentiable (straight-through)."""
    if ste:
        return FakeQuantizeSTE.apply(w, spec)
    return quantize_weight(w, spec).dequantize(w.dtype)
