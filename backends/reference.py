"""Reference implementations of the packed integer weight formats, in plain torch (any device).

These define what every faster kernel must compute:

* ``pack_*`` turn a :class:`fxquant.quant.QuantizedWeight` into the tensors a kernel reads (done once, at
  compile or quantize time, never per call);
* ``dequantize_*`` unpack them and apply fxquant's one numerics, ``float32(code - zero) * scale`` then a cast:
  the result equals :meth:`QuantizedWeight.dequantize` bit for bit (a test checks it for every format);
* ``linear_*`` are the reference matmuls: exact dequantization, then ``F.linear`` in the activation dtype,
  which accumulates in float32 for fp16/bf16 on every torch backend. With the weight cast to the activation
  dtype this is exactly what the eager quantized model computes, so a lowered graph matches eager.

Packed layouts (shared with :mod:`fxquant.backends.triton_int`):

* int8: ``qweight`` int8 ``[N, K]``. Asymmetric codes (uint8, 0..255) are stored as ``code - 128`` and their
  zero points as ``zero - 128``: ``(code - 128) - (zero - 128) == code - zero`` exactly, and one signed kernel
  serves both.
* int4: ``qweight`` uint8 ``[N, ceil(K / 2)]``, column ``k`` in byte ``k // 2``, even columns in the low nibble.
  Nibbles are unsigned: symmetric codes (-8..7) are stored as ``code + 8`` with an implicit zero point of 8;
  asymmetric codes (0..15) as they are, with their int32 zero points. An odd ``K`` leaves the last high nibble 0.
* ``scale`` float32 ``[N, n_groups]`` (contiguous), ``zero`` int32 ``[N, n_groups]`` or None.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxquant.quant import QuantizedWeight

__all__ = ["pack_int8", "pack_int4", "dequantize_int8", "dequantize_int4", "linear_int8", "linear_int4",
           "expand_groups"]


def expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """``[N, n_groups]`` -> ``[N, K]``, the last group shorter when ``group_size`` does not divide ``K``."""
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def _attrs(qw: QuantizedWeight) -> dict[str, int]:
    rows, cols = qw.codes.shape
    return {"out_features": int(rows), "in_features": int(cols), "group_size": int(qw.group_size)}


# ---- int8 ---------------------------------------------------------------------------------------------------
def pack_int8(qw: QuantizedWeight) -> tuple[dict[str, torch.Tensor | None], dict[str, int]]:
    """Pack ``qw`` (any bit width <= 8) as int8 codes; see the module docstring for the asymmetric shift."""
    if qw.zero is None:
        qweight = qw.codes.to(torch.int8).contiguous()
        zero = None
    else:
        qweight = (qw.codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        zero = (qw.zero.to(torch.int32) - 128).contiguous()
    return {"qweight": qweight, "scale": qw.scale.to(torch.float32).contiguous(), "zero": zero}, _attrs(qw)


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, group_size: int,
                    in_features: int, dtype: torch.dtype = torch.float32, **_: int) -> torch.Tensor:
    """``float32(code - zero) * scale`` then ``dtype``: bit-exact with ``QuantizedWeight.dequantize``."""
    s = expand_groups(scale, group_size, in_features)
    if zero is None:
        values = qweight.float() * s
    else:
        values = (qweight.float() - expand_groups(zero, group_size, in_features).float()) * s
    return values.to(dtype)


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                bias: torch.Tensor | None, *, out_features: int, in_features: int, group_size: int) -> torch.Tensor:
    w = dequantize_int8(qweight, scale, zero, group_size=group_size, in_features=in_features, dtype=x.dtype)
    return F.linear(x, w, bias)


# ---- int4 (two codes per byte) --------------------------------------------------------------------------------
def pack_int4(qw: QuantizedWeight) -> tuple[dict[str, torch.Tensor | None], dict[str, int]]:
    """Pack 4-bit (or narrower) codes two per byte, unsigned nibbles; see the module docstring."""
    if qw.spec.bits > 4:
        raise ValueError(f"int4 packing holds at most 4-bit codes, got a {qw.spec.bits}-bit weight")
    rows, cols = qw.codes.shape
    nib = qw.codes.to(torch.int16) + (8 if qw.zero is None else 0)  # unsigned 0..15
    if cols % 2:
        nib = F.pad(nib, (0, 1))
    nib = nib.to(torch.uint8).reshape(rows, -1, 2)
    qweight = (nib[..., 0] | (nib[..., 1] << 4)).contiguous()
    zero = None if qw.zero is None else qw.zero.to(torch.int32).contiguous()
    return {"qweight": qweight, "scale": qw.scale.to(torch.float32).contiguous(), "zero": zero}, _attrs(qw)


def unpack_int4(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 ``[N, ceil(K/2)]`` -> unsigned nibbles as int32 ``[N, K]``."""
    lo = (qweight & 0xF).to(torch.int32)
    hi = (qweight >> 4).to(torch.int32)
    return torch.stack((lo, hi), dim=-1).reshape(qweight.shape[0], -1)[:, :in_features]


def dequantize_int4(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, group_size: int,
                    in_features: int, dtype: torch.dtype = torch.float32, **_: int) -> torch.Tensor:
    """``float32(nibble - zero) * scale`` (zero 8 when symmetric) then ``dtype``: bit-exact with the original."""
    nib = unpack_int4(qweight, in_features)
    s = expand_groups(scale, group_size, in_features)
    if zero is None:
        values = (nib - 8).float() * s
    else:
        values = (nib.float() - expand_groups(zero, group_size, in_features).float()) * s
    return values.to(dtype)


def linear_int4(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                bias: torch.Tensor | None, *, out_features: int, in_features: int, group_size: int) -> torch.Tensor:
    w = dequantize_int4(qweight, scale, zero, group_size=group_size, in_features=in_features, dtype=x.dtype)
    return F.linear(x, w, bias)
