"""The FP6 weight format (4+2 bit planes) in the weight-format registry, with its reference implementation.

Importing this module registers the format ``fp6`` (:func:`fxquant.backends.registry.register_format`), which
defines the custom op::

    fxquant::linear_fp6(Tensor x, Tensor hi2, Tensor lo4, Tensor scale, Tensor? bias,
                        int out_features, int in_features, int exp_bits, int exp_bias, int group_size) -> Tensor

* ``hi2`` / ``lo4`` / ``scale``: the planes and float32 ``[N, G]`` scales of
  :class:`fxquant.fpformats.FP6PackedWeight` (layout documented there);
* ``exp_bits`` / ``exp_bias``: the 6-bit *container* format (E3M2: 3 / 3; E2M3 and the FP5/FP4 formats that ride
  in an E2M3 or E3M2 container: their exponent bits and bias) — the kernel's bias shift needs nothing else;
* ``group_size``: the effective group width, ``in_features`` for one scale per output channel (the integer
  formats' convention).

On CUDA the op runs :func:`fxquant.backends.triton_fp6.fp6_linear` (GEMV / split-K / tiled paths, and FP16
``torch.matmul`` on a once-dequantized weight for ``M >= TORCH_MATMUL_MIN_M``); elsewhere the reference below:
unpack -> decode -> scale (float32, the one numerics) -> cast to ``x.dtype`` -> ``F.linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxquant.fpformats import FloatFormat, FP6PackedWeight, FPQuantizedWeight, decode, pack_fp6, unpack_fp6_planes

from .registry import WeightFormat, register_format

__all__ = ["FP6_FORMAT", "supports_fp6", "pack_fp6_tensors", "dequantize_fp6", "linear_fp6_reference",
           "triton_linear_fp6", "triton_dequant_fp6", "aot_variants_fp6", "linear_fp6"]


def supports_fp6(spec: object) -> str | None:
    """``None`` for a minifloat spec that fits the 6-bit planes, else why not."""
    if getattr(spec, "kind", "int") != "fp":
        return f"holds minifloat codes, not {getattr(spec, 'kind', 'int')} codes"
    fmt: FloatFormat = spec.format  # type: ignore[attr-defined]
    if fmt.bits > 6 or fmt.exp_bits > 4:
        return f"holds at most 6-bit minifloats with at most 4 exponent bits, not {fmt}"
    return None


def pack_fp6_tensors(qw: FPQuantizedWeight | FP6PackedWeight) -> tuple[dict[str, torch.Tensor | None], dict[str, int]]:
    """The op's packed tensors and attributes (accepts codes, or an already split weight from the pass)."""
    packed = qw if isinstance(qw, FP6PackedWeight) else pack_fp6(qw)
    c = packed.container
    tensors = {"hi2": packed.hi2.contiguous(), "lo4": packed.lo4.contiguous(),
               "scale": packed.scale.to(torch.float32).contiguous()}
    attrs = {"out_features": packed.out_features, "in_features": packed.in_features, "exp_bits": c.exp_bits,
             "exp_bias": c.bias, "group_size": packed.group_size or packed.in_features}
    return tensors, attrs


def _expand(scale: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    return scale.repeat_interleave(group_size, dim=1)[:, :in_features] if scale.shape[1] > 1 else \
        scale[:, :1].expand(-1, in_features)


def dequantize_fp6(hi2: torch.Tensor, lo4: torch.Tensor, scale: torch.Tensor, *, out_features: int,
                   in_features: int, exp_bits: int, exp_bias: int, group_size: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(decode(codes) * scale).to(dtype)`` with the product in float32: bit for bit ``FPQuantizedWeight``'s."""
    container = FloatFormat(exp_bits, 5 - exp_bits, exp_bias)
    codes = unpack_fp6_planes(hi2, lo4, in_features)
    if codes.shape[0] != out_features:
        raise ValueError(f"FP6 planes have {codes.shape[0]} rows, out_features is {out_features}")
    return (decode(codes, container) * _expand(scale, group_size, in_features)).to(dtype)


def linear_fp6_reference(x: torch.Tensor, hi2: torch.Tensor, lo4: torch.Tensor, scale: torch.Tensor,
                         bias: torch.Tensor | None, *, out_features: int, in_features: int, exp_bits: int,
                         exp_bias: int, group_size: int) -> torch.Tensor:
    """The semantics: the exact dequantized weight in ``x``'s dtype, then ``F.linear`` (what eager computes)."""
    w = dequantize_fp6(hi2, lo4, scale, out_features=out_features, in_features=in_features, exp_bits=exp_bits,
                       exp_bias=exp_bias, group_size=group_size, dtype=x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# ---- Triton entry points (imported lazily: Triton loads only when they run) --------------------------------------
def triton_linear_fp6(x: torch.Tensor, hi2: torch.Tensor, lo4: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None, *, out_features: int, in_features: int, exp_bits: int,
                      exp_bias: int, group_size: int) -> torch.Tensor:
    from . import triton_fp6  # noqa: PLC0415
    del out_features  # the planes' rows
    return triton_fp6.fp6_linear(x, hi2, lo4, scale, bias, in_features=in_features, exp_bits=exp_bits, bias=exp_bias,
                                 group_size=group_size)


def triton_dequant_fp6(hi2: torch.Tensor, lo4: torch.Tensor, scale: torch.Tensor, *, out_features: int,
                       in_features: int, exp_bits: int, exp_bias: int, group_size: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from . import triton_fp6  # noqa: PLC0415
    del out_features
    return triton_fp6.dequantize(hi2, lo4, scale, in_features=in_features, exp_bits=exp_bits, bias=exp_bias,
                                 group_size=group_size, dtype=dtype)


def aot_variants_fp6() -> list:
    from . import triton_fp6  # noqa: PLC0415
    return triton_fp6.aot_variants()


FP6_FORMAT = register_format(WeightFormat(
    name="fp6",
    description="minifloat codes (FP6 E3M2/E2M3; FP5/FP4 in a 6-bit container) split into a 2-bit and a 4-bit "
                "plane; fp32 scales per channel or group; FP16 rebuilt in registers by the bias shift",
    supports=supports_fp6, pack=pack_fp6_tensors, dequantize=dequantize_fp6, reference=linear_fp6_reference,
    tensor_args=("hi2", "lo4", "scale"),
    attr_args=("out_features", "in_features", "exp_bits", "exp_bias", "group_size"),
    triton="fxquant.backends.fp6:triton_linear_fp6", triton_dequant="fxquant.backends.fp6:triton_dequant_fp6",
    aot_variants="fxquant.backends.fp6:aot_variants_fp6", priority=30))


def linear_fp6(x: torch.Tensor, packed: FP6PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Call ``fxquant::linear_fp6`` on a packed weight (Triton on CUDA, the reference elsewhere)."""
    tensors, attrs = pack_fp6_tensors(packed)
    return FP6_FORMAT.op(x, tensors["hi2"], tensors["lo4"], tensors["scale"], bias, *[attrs[a] for a in
                                                                                     FP6_FORMAT.attr_args])
