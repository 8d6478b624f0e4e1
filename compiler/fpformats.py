"""Minifloat weight formats: the exact codec behind FP6 (E3M2, E2M3), FP5 (E2M2, E3M1) and FP4 (E2M1).

A format has 1 sign bit, ``exp_bits`` exponent bits with ``bias`` and ``man_bits`` mantissa bits, and — like
the OCP MX / FP6-LLM formats — no Inf and no NaN: every exponent field is a finite binade, so E3M2 reaches
``1.75 * 2**(7-3) = 28``. Exponent field 0 holds the subnormals ``0.m * 2**(1-bias)``. A code is the integer
``S E.. M..`` (sign in the top bit), stored in a ``uint8``.

One numerics for every consumer (fake-quant, the split pass, the reference op, the Triton kernel):

* ``scale = amax / max_value`` per output row (or per group of ``group_size`` input columns; a last group is
  shorter when ``group_size`` does not divide the width); an all-zero row or group gets scale 1;
* ``codes = encode(w_f32 / scale)`` — round to nearest, ties to even, saturating at ``±max_value``;
* ``w_hat = (decode(codes) * scale).to(dtype)`` — the float32 product is rounded once, then cast.

:meth:`FPQuantizedWeight.dequantize` is that last line; the Triton kernel computes
``(fp16_bits_of(code) * 2**(15-bias)) * scale`` in float32, which is the same number because
``fp16_bits_of(code) * 2**(15-bias) == decode(code)`` exactly (METHODS.md §4, the bias-shift trick).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch

from .errors import QuantSpecError, WeightError

__all__ = [
    "FloatFormat", "E3M2", "E2M3", "E2M2", "E3M1", "E2M1", "FORMATS", "get_format",
    "FPQuantSpec", "FPQuantizedWeight", "encode", "decode", "compute_scales", "quantize_fp", "fp_fake_quantize",
    "format_label", "round_to_format", "MSE_RATIOS", "container_format", "FP6_K_ALIGN", "FP6PackedWeight",
    "pack_fp6_planes", "unpack_fp6_planes", "pack_fp6",
]


@dataclass(frozen=True)
class FloatFormat:
    """A sign + ``exp_bits`` + ``man_bits`` minifloat without Inf/NaN (all exponent fields finite)."""

    exp_bits: int
    man_bits: int
    bias: int

    def __post_init__(self) -> None:
        if not (1 <= self.exp_bits <= 5 and 0 <= self.man_bits <= 5 and 3 <= self.bits <= 8):
            raise QuantSpecError(
                f"minifloat E{self.exp_bits}M{self.man_bits} is out of range",
                "use 1-5 exponent bits and 0-5 mantissa bits, 3-8 bits in total (e.g. E3M2 for FP6)")

    # ---- derived constants -------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def name(self) -> str:
        return f"e{self.exp_bits}m{self.man_bits}"

    @property
    def num_codes(self) -> int:
        return 1 << self.bits

    @property
    def max_value(self) -> float:
        """Largest finite magnitude: the top exponent field is a normal binade (no Inf/NaN)."""
        top = (1 << self.exp_bits) - 1 - self.bias
        return (2.0 - 2.0 ** -self.man_bits) * 2.0 ** top

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    @property
    def subnormal_step(self) -> float:
        """Spacing of the subnormals (and of the first normal binade): ``2**(1 - bias - man_bits)``."""
        return 2.0 ** (1 - self.bias - self.man_bits)

    @cached_property
    def table(self) -> torch.Tensor:
        """float32 value of every code, indexed by code (``decode`` is a lookup in it)."""
        values = []
        for code in range(self.num_codes):
            sign = -1.0 if code >> (self.bits - 1) else 1.0
            e = (code >> self.man_bits) & ((1 << self.exp_bits) - 1)
            m = code & ((1 << self.man_bits) - 1)
            if e == 0:
                mag = m * self.subnormal_step
            else:
                mag = (1.0 + m / (1 << self.man_bits)) * 2.0 ** (e - self.bias)
            values.append(math.copysign(mag, sign))
        return torch.tensor(values, dtype=torch.float32)

    def __str__(self) -> str:
        return f"E{self.exp_bits}M{self.man_bits}(bias {self.bias}, max {self.max_value:g})"


E3M2 = FloatFormat(3, 2, 3)  #: FP6 of FP6-LLM / ZeroQuant(4+2): max 28, min normal 0.25
E2M3 = FloatFormat(2, 3, 1)  #: FP6 with more mantissa: max 7.5
E2M2 = FloatFormat(2, 2, 1)  #: FP5: max 7
E3M1 = FloatFormat(3, 1, 3)  #: FP5: max 24
E2M1 = FloatFormat(2, 1, 1)  #: FP4 (OCP MXFP4 element): max 6

FORMATS: dict[str, FloatFormat] = {
    "e3m2": E3M2, "fp6": E3M2, "fp6_e3m2": E3M2,
    "e2m3": E2M3, "fp6_e2m3": E2M3,
    "e2m2": E2M2, "fp5": E2M2, "fp5_e2m2": E2M2,
    "e3m1": E3M1, "fp5_e3m1": E3M1,
    "e2m1": E2M1, "fp4": E2M1, "fp4_e2m1": E2M1,
}


def get_format(fmt: str | FloatFormat) -> FloatFormat:
    """A format by name (``"e3m2"``, ``"fp6"``, ``"fp6_e2m3"``, ``"fp5"``, ``"fp4"``, ...) or as given."""
    if isinstance(fmt, FloatFormat):
        return fmt
    key = str(fmt).lower().replace("-", "_")
    if key not in FORMATS:
        raise QuantSpecError(f"unknown minifloat format {fmt!r}",
                             f"use one of {', '.join(sorted(FORMATS))}, or FloatFormat(exp_bits, man_bits, bias)")
    return FORMATS[key]


def format_label(fmt: FloatFormat) -> str:
    """The annotation name of a format: ``fp6_e3m2``, ``fp5_e2m2``, ``fp4_e2m1``."""
    return f"fp{fmt.bits}_{fmt.name}"


# ---- the codec ---------------------------------------------------------------------------------------

def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).nonzero()
        first = tuple(int(i) for i in bad[0]) if bad.numel() else ()
        raise WeightError(f"{what} holds {int((~torch.isfinite(x)).sum())} NaN/Inf value(s) (first at index {first})",
                          "a minifloat has no NaN/Inf; fix the checkpoint (or the training run that produced it) "
                          "before quantizing, or exclude this layer")


def encode(x: torch.Tensor, fmt: FloatFormat = E3M2) -> torch.Tensor:
    """Round ``x`` (already divided by its scale) to the nearest ``fmt`` value, ties to even; return uint8 codes.

    Magnitudes above ``fmt.max_value`` saturate (±Inf too); NaN is refused. The rounding is exact:
    the quantum of ``|x|``'s binade is a power of two, so ``|x| / q`` is exact in float32/float64 and
    ``torch.round`` (half to even) picks the neighbour; a round-up into the next binade is still a value of
    the format. Inputs narrower than float32 are widened (exactly); float64 stays float64, so no double rounding.
    """
    if not x.is_floating_point():
        raise WeightError(f"encode expects a floating tensor, got {x.dtype}", "cast the weight to float first")
    if torch.isnan(x).any():
        raise WeightError("encode got NaN values", "a minifloat has no NaN; fix or exclude the weight")
    work = x if x.dtype == torch.float64 else x.float()
    sign = torch.signbit(work)
    mag = work.abs().clamp(max=fmt.max_value)  # saturate (values in (max, max + ulp/2) round to max anyway)
    # binade exponent of |x|, floored at the subnormal binade: frexp gives |x| = f * 2**k with f in [0.5, 1)
    _, k = torch.frexp(mag)
    e_unb = torch.clamp(k.to(torch.int32) - 1, min=1 - fmt.bias)
    quantum = torch.ldexp(torch.ones_like(mag), (e_unb - fmt.man_bits).to(mag.dtype))
    steps = torch.round(mag / quantum)  # integer multiple of the quantum, half to even
    val = steps * quantum  # exact, and <= max_value because mag <= max_value is itself on the grid's range
    # code the rounded value: subnormal if below min normal, else exponent field + mantissa
    _, k2 = torch.frexp(val)
    e2 = (k2.to(torch.int32) - 1)
    normal = val >= fmt.min_normal
    exp_field = torch.where(normal, e2 + fmt.bias, torch.zeros_like(e2))
    sub_steps = (val / fmt.subnormal_step).to(torch.int32)
    frac = torch.where(normal, torch.ldexp(val, (-e2).to(val.dtype)) - 1.0, torch.zeros_like(val))
    man = torch.where(normal, (frac * (1 << fmt.man_bits)).to(torch.int32), sub_steps)
    code = (sign.to(torch.int32) << (fmt.bits - 1)) | (exp_field << fmt.man_bits) | man
    return code.to(torch.uint8)


def decode(codes: torch.Tensor, fmt: FloatFormat = E3M2) -> torch.Tensor:
    """float32 value of each code (a table lookup: exact). Codes must be below ``2**fmt.bits``."""
    if codes.dtype != torch.uint8:
        raise WeightError(f"decode expects uint8 codes, got {codes.dtype}", "pass the output of encode()")
    if codes.numel() and int(codes.max()) >= fmt.num_codes:
        raise WeightError(f"code {int(codes.max())} does not exist in {fmt} ({fmt.num_codes} codes)",
                          "the codes were produced for another format; decode with that one")
    return fmt.table.to(codes.device)[codes.long()]


# ---- scales ------------------------------------------------------------------------------------------

def _num_groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-in_features // group_size)


def _check_group_size(group_size: int | None) -> None:
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1):
        raise QuantSpecError(f"group size {group_size!r} is invalid",
                             "use a positive integer (e.g. 128) or None for one scale per output channel")


def _expand(scale: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """[O, G] scales -> [O, C] (each group's scale over its columns; the last group may be shorter)."""
    if group_size is None:
        return scale[:, :1].expand(-1, in_features)
    return scale.repeat_interleave(group_size, dim=1)[:, :in_features]


def _group_amax(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """max |w| per row ([O, 1]) or per group along the input dim ([O, G], zero-padded last group)."""
    a = w.abs()
    if group_size is None:
        return a.amax(dim=1, keepdim=True)
    out_f, in_f = a.shape
    pad = _num_groups(in_f, group_size) * group_size - in_f
    if pad:
        a = torch.nn.functional.pad(a, (0, pad))
    return a.view(out_f, -1, group_size).amax(dim=2)


#: clipping ratios the ``mse`` scale search tries, largest first: ``amax * r / max_value`` for r = 1.00, 0.99, ...,
#: 0.70 (31 candidates). Ratio 1 is the absmax scale, so the search can only lower the squared error (ties keep the
#: larger ratio, i.e. absmax). Lower weight error is not lower perplexity: on SmolLM2 (40 windows) E2M3 g64 scored
#: 28.951 with absmax and 29.302 with this search, which clips the largest weight of a group — the ones that matter
#: most — so absmax stays the default (examples/results/smollm2_quality.md).
MSE_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.01 * i, 2) for i in range(31))


def compute_scales(w: torch.Tensor, fmt: FloatFormat = E3M2, group_size: int | None = None,
                   scale_search: Literal["absmax", "mse"] = "absmax") -> torch.Tensor:
    """float32 scales, shape [O, 1] (per channel) or [O, ceil(C / group_size)].

    ``absmax``: ``amax / max_value`` so the largest weight lands on the format's top value. ``mse``: per row
    (group), try the clipping ratios :data:`MSE_RATIOS` (1.00 down to 0.70) of ``amax`` and keep the scale with the
    lowest squared weight error ``sum((dequant(quant(w)) - w)**2)`` — weights above the clip saturate. The search is
    data-free and vectorised over rows and groups (one pass over the weight per candidate), it never does worse than
    absmax on that error (ratio 1 is a candidate; ties keep the larger ratio) and it is deterministic. Zero rows
    (groups) get scale 1 (their codes are all zero either way).
    """
    _check_group_size(group_size)
    w = w.detach().float()
    amax = _group_amax(w, group_size)
    scale = _absmax_scale(amax, fmt)
    if scale_search == "absmax":
        return scale
    if scale_search != "mse":
        raise QuantSpecError(f"unknown scale search {scale_search!r}", "use 'absmax' or 'mse'")
    wg = _grouped(w, group_size)  # [O, G, gs] (zero-padded last group: zeros quantize to zero, no error)
    best = scale
    best_err = _group_sq_error(wg, best, fmt)
    for ratio in MSE_RATIOS[1:]:
        cand = _absmax_scale(amax * ratio, fmt)
        err = _group_sq_error(wg, cand, fmt)
        better = err < best_err
        best = torch.where(better, cand, best)
        best_err = torch.where(better, err, best_err)
    return best


def _absmax_scale(amax: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    scale = amax / fmt.max_value
    # zero rows -> 1; a nonzero amax so tiny that amax / max underflows keeps the smallest normal float32
    scale = torch.where(amax == 0, torch.ones_like(scale), scale.clamp(min=torch.finfo(torch.float32).tiny))
    return scale.float()


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """float32 ``[O, C]`` -> ``[O, G, gs]`` (``G = 1, gs = C`` per channel; the last group zero-padded)."""
    out_f, in_f = w.shape
    if group_size is None:
        return w.view(out_f, 1, in_f)
    pad = _num_groups(in_f, group_size) * group_size - in_f
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.view(out_f, -1, group_size)


def round_to_format(x: torch.Tensor, fmt: FloatFormat = E3M2) -> torch.Tensor:
    """``decode(encode(x))`` without building codes: the nearest ``fmt`` value (ties to even, saturating), float32.

    The scale search calls it once per candidate, so it is the cheap form of :func:`encode`'s rounding (about 10x
    faster): with ``quantum`` the spacing of ``fmt``'s values in the binade of ``|x|`` (the subnormal step below the
    smallest normal), ``c = quantum * 2**23`` is a float32 whose ulp is ``quantum``, so the float32 sum ``|x| + c``
    rounds ``|x|`` to a multiple of ``quantum``, ties to even, and ``(|x| + c) - c`` is exact. ``quantum`` is built
    from the exponent bits of ``|x|``. The values equal ``decode(encode(x))`` bit for bit (tested, ties included);
    NaN is not checked here.
    """
    x = x.float()
    mag = x.abs().clamp_(max=fmt.max_value)
    e = mag.view(torch.int32) >> 23  # biased float32 exponent of |x| (0 for zero and float32 subnormals)
    c = ((e.clamp_(min=127 + 1 - fmt.bias).add_(23 - fmt.man_bits)) << 23).view(torch.float32)
    return torch.copysign(mag.add_(c).sub_(c), x)


def _group_sq_error(wg: torch.Tensor, scale: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Squared error of quantizing ``wg`` ``[O, G, gs]`` with ``scale`` ``[O, G]``, summed per group: ``[O, G]``."""
    s = scale.unsqueeze(-1)
    deq = round_to_format(wg / s, fmt).mul_(s)
    return deq.sub_(wg).square_().sum(dim=-1)


# ---- quantized weights -------------------------------------------------------------------------------

@dataclass(frozen=True)
class FPQuantSpec:
    """How to quantize weights to a minifloat: the format, per-channel or group scales, the scale search."""

    format: FloatFormat = E3M2
    group_size: int | None = None
    scale_search: Literal["absmax", "mse"] = "absmax"

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", get_format(self.format))
        _check_group_size(self.group_size)
        if self.scale_search not in ("absmax", "mse"):
            raise QuantSpecError(f"unknown scale search {self.scale_search!r}", "use 'absmax' or 'mse'")

    @property
    def label(self) -> str:
        return format_label(self.format)

    #: what the weight-format registry (fxquant.backends.registry) dispatches on: integer specs say "int"
    kind = "fp"

    @property
    def bits(self) -> int:
        return self.format.bits

    def describe(self) -> str:
        """One line, also the registry's cache key: ``fp6_e3m2 per-channel``, ``fp6_e2m3 g128 mse``."""
        gran = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"{self.label} {gran}" + (" mse" if self.scale_search == "mse" else "")


@dataclass
class FPQuantizedWeight:
    """A weight as minifloat codes plus float32 scales.

    ``codes``: uint8 ``[O, C]``; ``scale``: float32 ``[O, G]`` (``G = 1`` per channel, else ``ceil(C / group_size)``);
    ``dtype``: the original weight dtype, which :meth:`dequantize` returns by default.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    format: FloatFormat
    group_size: int | None
    dtype: torch.dtype = torch.float32
    #: how the scales were chosen (``absmax`` or ``mse``): kept so that :attr:`spec` is the spec that made them
    scale_search: Literal["absmax", "mse"] = "absmax"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def spec(self) -> FPQuantSpec:
        return FPQuantSpec(format=self.format, group_size=self.group_size, scale_search=self.scale_search)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The one numerics: ``(decode(codes) * scale_expanded).to(dtype)``, the product in float32.

        The Triton kernel rebuilds ``decode(codes)`` exactly and multiplies by the same float32 scale, so its
        dequantized weight equals this bit for bit.
        """
        full = _expand(self.scale, self.codes.shape[1], self.group_size)
        return (decode(self.codes, self.format) * full).to(dtype or self.dtype)

    def nbytes_packed(self) -> int:
        """Bytes of the bit-packed codes plus the scales (what a packed checkpoint stores)."""
        return (self.codes.numel() * self.format.bits + 7) // 8 + self.scale.numel() * 4


def quantize_fp(w: torch.Tensor, spec: FPQuantSpec | FloatFormat | str = E3M2, group_size: int | None = None,
                *, name: str = "weight", scale_ratio: torch.Tensor | None = None,
                scale: torch.Tensor | None = None) -> FPQuantizedWeight:
    """Quantize a 2-D weight ``[out_features, in_features]`` to ``spec``'s minifloat with row or group scales.

    ``spec`` may be a :class:`FPQuantSpec` or just a format (then ``group_size`` applies). ``scale_ratio``
    (``[O, G]``, the scales' shape, values >= 1) multiplies the spec's scales: a searched scale that puts a row's
    largest weight below the format's top value (``search_weight_clipping`` picks it from calibration
    activations; ratios below 1 are clipping, which that pass writes into the weight instead). ``scale``
    (float32 ``[O, G]``, positive) replaces the computed scales altogether (``round_weights_gptq`` fixes its
    scales before it rounds; its weights lie on that grid without necessarily reaching its top value); it cannot
    be combined with ``scale_ratio``. Raises :class:`WeightError` for NaN/Inf values or a weight that is not 2-D.
    """
    if not isinstance(spec, FPQuantSpec):
        spec = FPQuantSpec(format=get_format(spec), group_size=group_size)
    if w.dim() != 2:
        raise WeightError(f"{name} has shape {tuple(w.shape)}; minifloat quantization takes a 2-D "
                          "[out_features, in_features] weight", "quantize linear weights (reshape conv weights first)")
    if not w.is_floating_point():
        raise WeightError(f"{name} has dtype {w.dtype}", "quantize a floating-point weight")
    _check_finite(w, name)
    w32 = w.detach().float()
    if scale is not None:
        scale = _explicit_scale(scale.to(w32.device), w32.shape[0], _num_groups(w32.shape[1], spec.group_size), scale_ratio, name)
    else:
        scale = _ratioed(compute_scales(w32, spec.format, spec.group_size, spec.scale_search), scale_ratio, name)
    codes = encode(w32 / _expand(scale, w32.shape[1], spec.group_size), spec.format)
    return FPQuantizedWeight(codes=codes, scale=scale, format=spec.format, group_size=spec.group_size, dtype=w.dtype,
                             scale_search=spec.scale_search)


class _FPFakeQuantSTE(torch.autograd.Function):
    """Forward: the quantize-dequantize value (bit-exact with the packed weight). Backward: identity (STE)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, spec: FPQuantSpec, scale_ratio: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        return _quantize_dequantize(w, spec, scale_ratio)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # the plain straight-through estimator for every weight: absmax scales (times ratios >= 1) clip none;
        # the few an ``mse`` scale saturates get the identity gradient too
        return grad, None, None


def fp_fake_quantize(w: torch.Tensor, fmt: FloatFormat | str | FPQuantSpec = E3M2, group_size: int | None = None,
                     ste: bool = True, scale_ratio: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize ``w`` through a minifloat, equal bit for bit to ``quantize_fp(w).dequantize()``.

    With ``ste`` the gradient passes straight through (identity), so a minifloat can be a QAT/TEQ target:
    ``fp_fake_quantize(W * s)`` trains ``s``. Without it, the result carries no gradient. ``scale_ratio`` as in
    :func:`quantize_fp`.
    """
    spec = fmt if isinstance(fmt, FPQuantSpec) else FPQuantSpec(format=get_format(fmt), group_size=group_size)
    if ste and w.requires_grad:
        return _FPFakeQuantSTE.apply(w, spec, scale_ratio)
    with torch.no_grad():
        return _quantize_dequantize(w, spec, scale_ratio)


def _explicit_scale(scale: torch.Tensor, rows: int, groups: int, ratio: torch.Tensor | None, name: str) -> torch.Tensor:
    if ratio is not None:
        raise WeightError(f"{name}: explicit scales and scale ratios were both given",
                          "fold the ratios into the explicit scales")
    if tuple(scale.shape) != (rows, groups):
        raise WeightError(f"{name}: explicit scales have shape {tuple(scale.shape)}, the weight needs {(rows, groups)}",
                          "give one scale per row (per channel) or per row and group, [out_features, groups]")
    scale = scale.detach().to(torch.float32).contiguous()
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise WeightError(f"{name}: explicit scales must be finite and positive", "derive them from the weight's range")
    return scale


def _ratioed(scale: torch.Tensor, ratio: torch.Tensor | None, name: str) -> torch.Tensor:
    """``scale * ratio`` (float32), after checking that ``ratio`` has the scales' shape and lies in [1, 2)."""
    if ratio is None:
        return scale
    if tuple(ratio.shape) != tuple(scale.shape):
        raise WeightError(f"{name}: scale_ratio has shape {tuple(ratio.shape)}, its scales {tuple(scale.shape)}",
                          "give one ratio per row (per channel) or per row and group, [out_features, groups]")
    ratio = ratio.to(device=scale.device, dtype=torch.float32)
    if not bool(((ratio >= 1) & (ratio < 2)).all()):
        raise WeightError(f"{name}: scale ratios must lie in [1, 2) (a ratio below 1 is clipping: clamp the weight; "
                          f"one of 2 or more skips a whole binade), got {float(ratio.min())} .. {float(ratio.max())}")
    return scale * ratio


def _quantize_dequantize(w: torch.Tensor, spec: FPQuantSpec, scale_ratio: torch.Tensor | None = None) -> torch.Tensor:
    """``quantize_fp(w, spec).dequantize(w.dtype)`` without building codes: the same checks and scales, the
    rounding through :func:`round_to_format` (equal to ``decode(encode(·))`` bit for bit, sign of zero included),
    about 10x faster — TEQ's init and clip searches fake-quantize every weight dozens of times."""
    if w.dim() != 2 or not w.is_floating_point():
        return quantize_fp(w, spec).dequantize(w.dtype)  # raises the codec's error
    _check_finite(w, "weight")
    w32 = w.detach().float()
    scale = _ratioed(compute_scales(w32, spec.format, spec.group_size, spec.scale_search), scale_ratio, "weight")
    full = _expand(scale, w32.shape[1], spec.group_size)
    return (round_to_format(w32 / full, spec.format) * full).to(w.dtype)


# ---- the 4+2 split (ZeroQuant(4+2) / FP6-LLM) ---------------------------------------------------------

#: the packed K dimension is padded with zero codes to a multiple of this, so that every row of both planes
#: starts 16-byte aligned (4-bit plane: K_pad/2 bytes, a multiple of 32; 2-bit plane: K_pad/4, a multiple of 16)
FP6_K_ALIGN = 64


def container_format(fmt: FloatFormat) -> FloatFormat:
    """The 6-bit format whose codes are ``fmt``'s codes shifted left to fill 6 bits.

    Appending zero mantissa bits keeps the value, so FP5/FP4 codes ride in the FP6 planes (and the FP6 kernel)
    unchanged: E3M1 in E3M2, E2M2 and E2M1 in E2M3. The kernel's bias-shift needs at most 4 exponent bits
    (a 5-bit exponent field of 31 would be an FP16 Inf).
    """
    if fmt.bits > 6 or fmt.exp_bits > 4:
        raise QuantSpecError(f"{fmt} does not fit the 6-bit 4+2 planes",
                             "use a format of at most 6 bits and 4 exponent bits (E3M2, E2M3, E2M2, E3M1, E2M1)")
    return FloatFormat(fmt.exp_bits, 5 - fmt.exp_bits, fmt.bias)


@dataclass
class FP6PackedWeight:
    """A minifloat weight in the 4+2 layout the FP6 kernel reads.

    Layout (one function packs, :func:`unpack_fp6_planes` unpacks; round-trip tested):

    * codes are 6-bit container codes ``S E.. M..`` (``container_format``), the K dimension padded with zero codes
      to ``k_pad = ceil(K / 64) * 64``;
    * ``hi2``: uint8 ``[N, k_pad / 4]``, the two high bits ``[S, E2]`` (for E3M2): byte ``j`` of row ``n`` holds
      codes ``k = 4j + t`` at bits ``2t+1 .. 2t`` (t = 0..3, little-endian inside the byte);
    * ``lo4``: uint8 ``[N, k_pad / 2]``, the four low bits ``[E1 E0 M1 M0]``: byte ``j`` holds code ``2j`` in its
      low nibble and ``2j + 1`` in its high nibble.

    Both planes are row-major and contiguous, so a ``BLOCK_K`` slice of a row is ``BLOCK_K/4`` and ``BLOCK_K/2``
    consecutive, 16-byte aligned bytes: the kernel loads them with wide vector loads and rebuilds the codes in
    registers (a join of the nibbles / 2-bit fields in the order above). ``scale`` is float32 ``[N, G]``.
    """

    hi2: torch.Tensor
    lo4: torch.Tensor
    scale: torch.Tensor
    format: FloatFormat  # the element format (E3M2, E2M3, FP5, FP4); the planes hold container_format(format)
    in_features: int
    group_size: int | None
    dtype: torch.dtype = torch.float32
    scale_search: Literal["absmax", "mse"] = "absmax"  # as in FPQuantizedWeight

    @property
    def out_features(self) -> int:
        return int(self.hi2.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def k_pad(self) -> int:
        return int(self.lo4.shape[1]) * 2

    @property
    def container(self) -> FloatFormat:
        return container_format(self.format)

    @property
    def label(self) -> str:
        return format_label(self.format)

    @property
    def spec(self) -> FPQuantSpec:
        return FPQuantSpec(format=self.format, group_size=self.group_size, scale_search=self.scale_search)

    @property
    def codes(self) -> torch.Tensor:
        """The element format's uint8 codes ``[N, K]``, unpacked on each access (inverse of :func:`pack_fp6`).

        A property so that code written for :class:`FPQuantizedWeight` (``qw.codes.device``) works on both.
        """
        return unpack_fp6_planes(self.hi2, self.lo4, self.in_features) >> (6 - self.format.bits)

    def to_quantized(self) -> FPQuantizedWeight:
        return FPQuantizedWeight(self.codes, self.scale, self.format, self.group_size, self.dtype,
                                 self.scale_search)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Same numerics as :meth:`FPQuantizedWeight.dequantize` (and the kernel), bit for bit."""
        return self.to_quantized().dequantize(dtype)

    def to(self, device: torch.device | str) -> "FP6PackedWeight":
        return FP6PackedWeight(self.hi2.to(device), self.lo4.to(device), self.scale.to(device), self.format,
                               self.in_features, self.group_size, self.dtype, self.scale_search)

    def nbytes(self) -> int:
        return self.hi2.numel() + self.lo4.numel() + self.scale.numel() * self.scale.element_size()

    def __repr__(self) -> str:
        gran = f"groups of {self.group_size}" if self.group_size else "per channel"
        return (f"FP6PackedWeight({self.label}, [{self.out_features}, {self.in_features}], {gran}, "
                f"{self.nbytes() / 1024:.1f} KiB)")


def pack_fp6_planes(codes6: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split 6-bit codes ``[N, K]`` (uint8, < 64) into the ``(hi2, lo4)`` planes of :class:`FP6PackedWeight`."""
    if codes6.dtype != torch.uint8 or codes6.dim() != 2:
        raise WeightError(f"pack_fp6_planes takes 2-D uint8 codes, got {codes6.dtype} {tuple(codes6.shape)}",
                          "pass encode()'s output for a [out_features, in_features] weight")
    if codes6.numel() and int(codes6.max()) >= 64:
        raise WeightError(f"code {int(codes6.max())} does not fit 6 bits", "shift narrower codes to 6 bits first")
    n, k = codes6.shape
    k_pad = -(-k // FP6_K_ALIGN) * FP6_K_ALIGN
    c = torch.zeros(n, k_pad, dtype=torch.uint8, device=codes6.device)
    c[:, :k] = codes6
    lo = (c & 0xF).view(n, k_pad // 2, 2)
    lo4 = lo[..., 0] | (lo[..., 1] << 4)
    hi = (c >> 4).view(n, k_pad // 4, 4)
    hi2 = hi[..., 0] | (hi[..., 1] << 2) | (hi[..., 2] << 4) | (hi[..., 3] << 6)
    return hi2.contiguous(), lo4.contiguous()


def unpack_fp6_planes(hi2: torch.Tensor, lo4: torch.Tensor, in_features: int) -> torch.Tensor:
    """The 6-bit codes ``[N, in_features]`` back from the two planes (padding dropped)."""
    n = hi2.shape[0]
    if lo4.shape != (n, hi2.shape[1] * 2) or hi2.dtype != torch.uint8 or lo4.dtype != torch.uint8:
        raise WeightError(f"FP6 planes do not match: hi2 {hi2.dtype} {tuple(hi2.shape)}, "
                          f"lo4 {lo4.dtype} {tuple(lo4.shape)}", "pass the planes pack_fp6_planes returned")
    if in_features > lo4.shape[1] * 2:
        raise WeightError(f"in_features {in_features} exceeds the packed width {lo4.shape[1] * 2}",
                          "the planes belong to another weight")
    lo = torch.stack([lo4 & 0xF, lo4 >> 4], dim=-1).view(n, -1)
    hi = torch.stack([(hi2 >> s) & 0x3 for s in (0, 2, 4, 6)], dim=-1).view(n, -1)
    return ((hi << 4) | lo)[:, :in_features].contiguous()


def pack_fp6(q: FPQuantizedWeight) -> FP6PackedWeight:
    """Pack a quantized weight into the 4+2 planes (narrower formats ride in a 6-bit container)."""
    container_format(q.format)  # raises for formats that do not fit
    hi2, lo4 = pack_fp6_planes(q.codes << (6 - q.format.bits))
    return FP6PackedWeight(hi2, lo4, q.scale, q.format, int(q.codes.shape[1]), q.group_size, q.dtype,
                          q.scale_search)
