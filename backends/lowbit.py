"""ParetoQ's packed low-bit weight formats (1, 1.58, 2, 3, 4 bit) in the weight-format registry.

Importing this module registers five formats (:func:`fxquant.backends.registry.register_format`), each with
its custom op ``fxquant::linear_<name>``:

========  ======  =====================================================================  ================
format    bits    tensors                                                                bits per weight
========  ======  =====================================================================  ================
pq_w1     1       ``qweight`` uint8 ``[N, ceil(K/8)]``: column k is bit ``k % 8`` of byte ``k // 8``   1
pq_w1_58  1.58    ``qweight`` uint8 ``[N, ceil(K/5)]``: byte = Σ code_i · 3^i over 5 columns (≤ 242)  1.6
pq_w2     2       ``qweight`` uint8 ``[N, ceil(K/4)]``: column k in bits ``2(k % 4) ..`` of byte k // 4  2
pq_w3     3       ``lo2`` = the 2-bit packing of ``code & 3``, ``hi1`` = the 1-bit packing of ``code >> 2``  3
pq_w4     4       ``qweight`` uint8 ``[N, ceil(K/2)]``: even columns in the low nibble             4
========  ======  =====================================================================  ================

plus ``scale`` float32 ``[N, G]`` (one per output channel, or per group of ``group_size`` inputs) and the integer
attributes ``out_features, in_features, group_size`` (``group_size = in_features`` for per channel). Codes are
the *unsigned* codes of :func:`fxquant.paretoq.quantize_codes`; a weight is ``float32(level(code)) · scale``
with ``level(u) = (A·u − B) · step`` (:data:`fxquant.paretoq.LEVELS`) — exactly the fake-quant forward, so the
dequantized packed weight equals the QAT model's weight bit for bit. The 3-bit planes mirror FP6's 4+2 split:
each plane is a whole number of codes per byte, so both load with aligned accesses. Columns past ``K`` in the
last byte are zero codes and never read.

The reference implementations here (plain torch, any device) are the semantics; the Triton kernels in
:mod:`fxquant.backends.triton_lowbit` run on CUDA (and under ``TRITON_INTERPRET=1`` in the CPU tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxquant.paretoq import ParetoQSpec, ParetoQWeight, dequantize_codes

from .registry import WeightFormat, register_format

__all__ = ["FORMAT_NAMES", "pack_codes", "unpack_codes", "pack_lowbit", "dequantize_lowbit", "linear_lowbit_reference",
           "format_for_bits", "LOWBIT_FORMATS"]

#: bits -> registered format name
FORMAT_NAMES: dict[float, str] = {1: "pq_w1", 1.58: "pq_w1_58", 2: "pq_w2", 3: "pq_w3", 4: "pq_w4"}
#: bits -> (bits per field, fields per byte) of the single-plane formats
_FIELDS = {1: (1, 8), 2: (2, 4), 4: (4, 2)}


def _pack_fields(codes: torch.Tensor, width: int, per_byte: int) -> torch.Tensor:
    """Unsigned ``width``-bit fields, ``per_byte`` to a byte, the lowest column in the lowest bits."""
    rows, cols = codes.shape
    pad = (-cols) % per_byte
    c = F.pad(codes.to(torch.int32), (0, pad)).reshape(rows, -1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=codes.device) * width
    return (c << shifts).sum(dim=2).to(torch.uint8).contiguous()


def _unpack_fields(packed: torch.Tensor, width: int, per_byte: int, in_features: int) -> torch.Tensor:
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * width
    fields = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << width) - 1)
    return fields.reshape(packed.shape[0], -1)[:, :in_features].to(torch.uint8)


def _pack_base3(codes: torch.Tensor) -> torch.Tensor:
    rows, cols = codes.shape
    pad = (-cols) % 5
    c = F.pad(codes.to(torch.int32), (0, pad)).reshape(rows, -1, 5)
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=codes.device)
    return (c * powers).sum(dim=2).to(torch.uint8).contiguous()


def _unpack_base3(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=packed.device)
    digits = torch.div(packed.to(torch.int32)[..., None], powers, rounding_mode="floor") % 3
    return digits.reshape(packed.shape[0], -1)[:, :in_features].to(torch.uint8)


def pack_codes(bits: float, codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The packed planes of unsigned ``codes`` (uint8 ``[N, K]``) for a ``bits``-bit format (see the table)."""
    n_codes = ParetoQSpec(bits).levels.n_codes
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) >= n_codes:
        raise ValueError(f"{bits}-bit codes must lie in 0..{n_codes - 1}, got {int(codes.max())}")
    bits = ParetoQSpec(bits).bits
    if bits == 1.58:
        return (_pack_base3(codes),)
    if bits == 3:
        return (_pack_fields(codes & 3, 2, 4), _pack_fields(codes >> 2, 1, 8))
    return (_pack_fields(codes, *_FIELDS[int(bits)]),)


def unpack_codes(bits: float, *planes: torch.Tensor, in_features: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: uint8 codes ``[N, in_features]``."""
    bits = ParetoQSpec(bits).bits
    if bits == 1.58:
        return _unpack_base3(planes[0], in_features)
    if bits == 3:
        lo = _unpack_fields(planes[0], 2, 4, in_features)
        hi = _unpack_fields(planes[1], 1, 8, in_features)
        return lo | (hi << 2)
    return _unpack_fields(planes[0], *_FIELDS[int(bits)], in_features)


def _spec(bits: float, group_size: int, in_features: int) -> ParetoQSpec:
    return ParetoQSpec(bits, None if group_size >= in_features else group_size)


def format_for_bits(bits: float) -> WeightFormat:
    return LOWBIT_FORMATS[ParetoQSpec(bits).bits]


# ---- per-format entry points, generated for each width ------------------------------------------------------------
def _make(bits: float) -> WeightFormat:
    name = FORMAT_NAMES[bits]
    planes = ("lo2", "hi1") if bits == 3 else ("qweight",)

    def supports(spec: object) -> str | None:
        if getattr(spec, "kind", "int") != "paretoq":
            return f"holds ParetoQ codes, not {getattr(spec, 'kind', 'int')} codes"
        if spec.bits != bits:  # type: ignore[attr-defined]
            return f"holds {bits}-bit ParetoQ codes, the spec has {spec.bits}"  # type: ignore[attr-defined]
        return None

    def pack(qw: ParetoQWeight) -> tuple[dict[str, torch.Tensor | None], dict[str, int]]:
        if not isinstance(qw, ParetoQWeight) or qw.spec.bits != bits:
            raise ValueError(f"format {name} packs {bits}-bit ParetoQWeight objects, got {type(qw).__name__}")
        rows, cols = qw.codes.shape
        tensors: dict[str, torch.Tensor | None] = dict(zip(planes, pack_codes(bits, qw.codes)))
        tensors["scale"] = qw.scale.to(torch.float32).contiguous()
        return tensors, {"out_features": int(rows), "in_features": int(cols), "group_size": int(qw.group_size)}

    def dequantize(*tensors: torch.Tensor, out_features: int, in_features: int, group_size: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        *code_planes, scale = tensors
        codes = unpack_codes(bits, *code_planes, in_features=in_features)
        if codes.shape[0] != out_features:
            raise ValueError(f"{name}: packed weight has {codes.shape[0]} rows, out_features is {out_features}")
        return dequantize_codes(codes, scale, _spec(bits, group_size, in_features), dtype=dtype)

    def reference(x: torch.Tensor, *args: torch.Tensor | None, out_features: int, in_features: int,
                  group_size: int) -> torch.Tensor:
        *tensors, bias = args
        w = dequantize(*tensors, out_features=out_features, in_features=in_features, group_size=group_size,
                       dtype=x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    dequantize.__name__ = f"dequantize_{name}"
    reference.__name__ = f"linear_{name}_reference"
    return WeightFormat(
        name=name,
        description=f"ParetoQ {bits}-bit codes ("
                    + {1: "8 per byte", 1.58: "ternary, 5 per byte in base 3", 2: "4 per byte",
                       3: "2-bit + 1-bit planes", 4: "2 per byte"}[bits]
                    + "); fp32 scales per channel or group",
        supports=supports, pack=pack, dequantize=dequantize, reference=reference,
        tensor_args=(*planes, "scale"), attr_args=("out_features", "in_features", "group_size"),
        triton=f"fxquant.backends.lowbit:triton_linear_{name}",
        triton_dequant=f"fxquant.backends.lowbit:triton_dequant_{name}",
        aot_variants="fxquant.backends.lowbit:aot_variants_lowbit" if bits == 2 else None,
        priority=40)


def _triton_entry(bits: float):
    def linear(x: torch.Tensor, *args: torch.Tensor | None, out_features: int, in_features: int,
               group_size: int) -> torch.Tensor:
        from . import triton_lowbit  # noqa: PLC0415 - Triton loads only when a kernel runs
        *planes, scale, bias = args
        return triton_lowbit.lowbit_linear(x, planes, scale, bias, bits=bits, out_features=out_features,
                                           in_features=in_features, group_size=group_size)

    def dequant(*tensors: torch.Tensor, out_features: int, in_features: int, group_size: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from . import triton_lowbit  # noqa: PLC0415
        *planes, scale = tensors
        return triton_lowbit.dequantize(planes, scale, bits=bits, out_features=out_features,
                                        in_features=in_features, group_size=group_size, dtype=dtype)
    return linear, dequant


def aot_variants_lowbit() -> list:
    """Kernel specialisations of every ParetoQ width (listed once, under the 2-bit format)."""
    from . import triton_lowbit  # noqa: PLC0415
    return triton_lowbit.aot_variants()


LOWBIT_FORMATS: dict[float, WeightFormat] = {}
for _bits, _name in FORMAT_NAMES.items():
    globals()[f"triton_linear_{_name}"], globals()[f"triton_dequant_{_name}"] = _triton_entry(_bits)
    LOWBIT_FORMATS[_bits] = register_format(_make(_bits))


def pack_lowbit(qw: ParetoQWeight):
    """Pack ``qw`` in its format: a :class:`fxquant.backends.registry.PackedWeight`."""
    from .registry import pack
    return pack(qw, format_for_bits(qw.spec.bits))


def dequantize_lowbit(packed) -> torch.Tensor:
    return packed.dequantize()


def linear_lowbit_reference(x: torch.Tensor, packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    fmt = packed.fmt
    return fmt.reference(x, *[packed.tensors[n] for n in fmt.tensor_names], bias, **packed.attrs)
