"""Triton kernels for ParetoQ's packed low-bit weights: ``y = x @ dequant(W)^T (+ bias)``.

Formats (laid out by :mod:`fxquant.backends.lowbit`): 1 bit (8 codes a byte), ternary (5 codes a byte, base 3),
2 bit (4 a byte), 3 bit (a 2-bit plane and a 1-bit plane), 4 bit (2 a byte); float32 scales per output row or per
group of input columns. A weight element is ``float32((A·u − B) · STEP) · scale`` — the integer ``A·u − B`` is
exact, ``· STEP`` is exact except for ternary (one rounding to float32(2/3), the same one the fake-quant forward
makes), ``· scale`` is the single rounding of fxquant's one numerics. :func:`dequantize` writes these values out
with the kernels' own tile helper, so a test compares them bit for bit with the reference.

Two paths, picked by the row count ``M``:

* **GEMV** (``M ≤ 16``, decode): one program per (row, ``BLOCK_N`` outputs). It streams the packed bytes of its
  outputs along ``K``, unpacks them in registers and reduces ``w · x`` with FMAs. At 2 bits a weight costs an
  eighth of FP16's bytes, which is what decode is bound by.
* **tiled GEMM** (``M > 16``, prefill): ``BLOCK_M × BLOCK_N`` output tiles; each ``BLOCK_N × BLOCK_K`` weight tile
  is dequantized into registers in the activation dtype and fed to ``tl.dot`` (tensor cores).

Unpacking gathers byte ``k // PER_BYTE`` for every column ``k`` of the tile: the repeated addresses of one byte
hit the same cache line, and the shift/mask (or base-3 digit) is plain integer ALU work. Under
``TRITON_INTERPRET=1`` (CPU tests) the same code runs in numpy.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import triton
import triton.language as tl

__all__ = ["lowbit_linear", "dequantize", "aot_variants", "FMT_CODES", "GEMV_CONFIG", "TILED_CONFIG", "kernel_path",
           "GEMV_MAX_M"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: bits -> the kernel's FMT constant (ternary is 15: "1.5-ish", an int for a constexpr)
FMT_CODES: dict[float, int] = {1: 1, 1.58: 15, 2: 2, 3: 3, 4: 4}
#: rows up to which the GEMV path runs
# the GEMV grid is (N blocks, M): each row re-streams and re-unpacks the weight, so on the H100 M = 16 cost 12-14x
# M = 1 (examples/results/paretoq_nvidia_h100.md); only single-row decode takes it
GEMV_MAX_M = 1


@triton.jit
def _unpack_tile(q_ptr, q2_ptr, offs_n, n_mask, offs_k, k_mask, stride_qn, stride_q2n, FMT: tl.constexpr):
    """Unsigned codes (int32) of the ``[BLOCK_N, BLOCK_K]`` weight tile at rows ``offs_n``, columns ``offs_k``."""
    mask = n_mask[:, None] & k_mask[None, :]
    row = offs_n[:, None] * stride_qn
    if FMT == 1:
        b = tl.load(q_ptr + row + (offs_k // 8)[None, :], mask=mask, other=0).to(tl.int32)
        u = (b >> (offs_k % 8)[None, :]) & 1
    elif FMT == 2:
        b = tl.load(q_ptr + row + (offs_k // 4)[None, :], mask=mask, other=0).to(tl.int32)
        u = (b >> (2 * (offs_k % 4))[None, :]) & 3
    elif FMT == 4:
        b = tl.load(q_ptr + row + (offs_k // 2)[None, :], mask=mask, other=0).to(tl.int32)
        u = (b >> (4 * (offs_k % 2))[None, :]) & 15
    elif FMT == 15:
        # base 3: digit d of the byte is (byte // 3^d) % 3; 3^d picked by the column's position in its byte
        b = tl.load(q_ptr + row + (offs_k // 5)[None, :], mask=mask, other=0).to(tl.int32)
        d = offs_k % 5
        p = tl.where(d == 0, 1, tl.where(d == 1, 3, tl.where(d == 2, 9, tl.where(d == 3, 27, 81))))
        u = (b // p[None, :]) % 3
    else:
        # 3 bit: the low two bits from the 2-bit plane, the high bit from the 1-bit plane
        lo = tl.load(q_ptr + row + (offs_k // 4)[None, :], mask=mask, other=0).to(tl.int32)
        hi = tl.load(q2_ptr + offs_n[:, None] * stride_q2n + (offs_k // 8)[None, :], mask=mask, other=0).to(tl.int32)
        u = ((lo >> (2 * (offs_k % 4))[None, :]) & 3) | (((hi >> (offs_k % 8)[None, :]) & 1) << 2)
    return u


@triton.jit
def _weight_tile(q_ptr, q2_ptr, s_ptr, offs_n, n_mask, offs_k, k_mask, stride_qn, stride_q2n, stride_sn,
                 FMT: tl.constexpr, LA: tl.constexpr, LB: tl.constexpr, STEP: tl.constexpr, GROUP: tl.constexpr):
    """The dequantized float32 tile: ``((A·u − B) · STEP) · scale`` — fxquant's one numerics."""
    u = _unpack_tile(q_ptr, q2_ptr, offs_n, n_mask, offs_k, k_mask, stride_qn, stride_q2n, FMT)
    level = (u * LA - LB).to(tl.float32) * STEP
    if GROUP == 0:
        s = tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)[:, None]
    else:
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + (offs_k // GROUP)[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)
    return level * s


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, q2_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                 stride_xm, stride_qn, stride_q2n, stride_sn, stride_ym,
                 FMT: tl.constexpr, LA: tl.constexpr, LB: tl.constexpr, STEP: tl.constexpr, GROUP: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # -- one activation row, BLOCK_N outputs --------------------------------------------------------------------
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_mask, other=0.0)
        w = _weight_tile(q_ptr, q2_ptr, s_ptr, offs_n, n_mask, offs_k, k_mask, stride_qn, stride_q2n, stride_sn,
                         FMT, LA, LB, STEP, GROUP)
        # the weight rounded to the activation dtype, as the eager (reference) model holds it; fp32 FMAs
        w = w.to(x.dtype).to(tl.float32)
        acc += tl.sum(w * x.to(tl.float32)[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _tiled_kernel(x_ptr, q_ptr, q2_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                  stride_xm, stride_qn, stride_q2n, stride_sn, stride_ym,
                  FMT: tl.constexpr, LA: tl.constexpr, LB: tl.constexpr, STEP: tl.constexpr, GROUP: tl.constexpr,
                  HAS_BIAS: tl.constexpr, DOT_IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # -- one BLOCK_M x BLOCK_N output tile ------------------------------------------------------------------------
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        # -- dequantize the weight tile in registers, in the activation dtype, and feed the tensor cores --------
        w = _weight_tile(q_ptr, q2_ptr, s_ptr, offs_n, n_mask, offs_k, k_mask, stride_qn, stride_q2n, stride_sn,
                         FMT, LA, LB, STEP, GROUP).to(x.dtype)
        if DOT_IEEE:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dequant_kernel(q_ptr, q2_ptr, s_ptr, w_ptr, N, K, stride_qn, stride_q2n, stride_sn, stride_wn,
                    FMT: tl.constexpr, LA: tl.constexpr, LB: tl.constexpr, STEP: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Write the dequantized weight with the GEMMs' own tile helper: the bit-exactness witness."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    w = _weight_tile(q_ptr, q2_ptr, s_ptr, offs_n, n_mask, offs_k, k_mask, stride_qn, stride_q2n, stride_sn,
                     FMT, LA, LB, STEP, GROUP)
    tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=n_mask[:, None] & k_mask[None, :])


#: (BLOCK_N, BLOCK_K, num_warps, num_stages) of the GEMV path
GEMV_CONFIG = (16, 128, 4, 2)
#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the tiled path. The per-column gathers hold one pointer
#: per tile element: 32x64x64 tiles spill on sm_80/sm_90 (checked by the AOT test), 16x32x64 tiles do not.
TILED_CONFIG = (16, 32, 64, 4, 2)


def kernel_path(m: int) -> str:
    return "gemv" if m <= GEMV_MAX_M else "tiled"


def _consts(bits: float, group_size: int, in_features: int) -> dict[str, Any]:
    from fxquant.paretoq import LEVELS, ParetoQSpec
    bits = ParetoQSpec(bits).bits
    lv = LEVELS[bits]
    return dict(FMT=FMT_CODES[bits], LA=lv.a, LB=lv.b, STEP=float(lv.step),
                GROUP=0 if group_size >= in_features else int(group_size))


def _planes(planes: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    q = planes[0]
    q2 = planes[1] if len(planes) > 1 else planes[0]
    for p in planes:
        if p.dtype != torch.uint8 or not p.is_contiguous():
            raise ValueError("the ParetoQ kernels take contiguous uint8 planes from fxquant.backends.lowbit")
    return q, q2, q.stride(0), q2.stride(0)


def dequantize(planes: Sequence[torch.Tensor], scale: torch.Tensor, *, bits: float, out_features: int,
               in_features: int, group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantized weight ``[N, K]`` computed by the kernels' tile helper (for the bit-exactness test)."""
    q, q2, sq, sq2 = _planes(planes)
    n, k = out_features, in_features
    w = torch.empty((n, k), device=q.device, dtype=dtype)
    grid = (triton.cdiv(n, 16), triton.cdiv(k, 32))
    _dequant_kernel[grid](q, q2, scale, w, n, k, sq, sq2, scale.stride(0), w.stride(0),
                          **_consts(bits, group_size, in_features), BLOCK_N=16, BLOCK_K=32)
    return w


def lowbit_linear(x: torch.Tensor, planes: Sequence[torch.Tensor], scale: torch.Tensor, bias: torch.Tensor | None, *,
                  bits: float, out_features: int, in_features: int, group_size: int,
                  path: str | None = None) -> torch.Tensor:
    """``x[..., K] @ dequant(W)^T (+ bias)`` in ``x.dtype`` (CUDA, or the interpreter). ``path`` forces
    ``"gemv"`` or ``"tiled"`` (tests cover both); by default ``M ≤ 16`` rows take the GEMV."""
    if scale.dtype != torch.float32:
        raise ValueError(f"the ParetoQ kernels take float32 scales, got {scale.dtype}")
    k, n = in_features, out_features
    if x.shape[-1] != k:
        raise ValueError(f"lowbit_linear: x has {x.shape[-1]} features, the weight {k}")
    q, q2, sq, sq2 = _planes(planes)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return y.reshape(*lead, n)
    consts = _consts(bits, group_size, in_features)
    b = bias.to(x.dtype) if bias is not None else scale
    args = (x2, q, q2, scale, b, y, m, n, k, x2.stride(0), sq, sq2, scale.stride(0), y.stride(0))
    if (path or kernel_path(m)) == "gemv":
        bn, bk, warps, stages = GEMV_CONFIG
        _gemv_kernel[(triton.cdiv(n, bn), m)](*args, **consts, HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_K=bk,
                                              num_warps=warps, num_stages=stages)
    else:
        bm, bn, bk, warps, stages = TILED_CONFIG
        dot_ieee = x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16)
        _tiled_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](*args, **consts, HAS_BIAS=bias is not None,
                                                                DOT_IEEE=dot_ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                                                num_warps=warps, num_stages=stages)
    return y.reshape(*lead, n)


# ---- ahead-of-time compilation (no GPU needed): reuses triton_int's helper -------------------------------------------
def aot_variants() -> list:
    """One specialisation per distinct unpack path, fp16 activations: GEMV for ternary (base 3, per channel),
    2 bit (shift/mask, groups of 128) and 3 bit (two planes); the tiled GEMM for 2 and 3 bit (groups of 128)."""
    from .triton_int import KernelVariant

    sig = {"x_ptr": "*fp16", "q_ptr": "*u8", "q2_ptr": "*u8", "s_ptr": "*fp32", "b_ptr": "*fp16", "y_ptr": "*fp16",
           "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_qn": "i32", "stride_q2n": "i32",
           "stride_sn": "i32", "stride_ym": "i32"}
    bn, bk, warps, stages = GEMV_CONFIG
    out = []
    for label, bits, group in (("w1_58_gemv_perchan", 1.58, 4096), ("w2_gemv_g128", 2, 128),
                               ("w3_gemv_perchan", 3, 4096)):
        consts = dict(_consts(bits, group, 4096), HAS_BIAS=False, BLOCK_N=bn, BLOCK_K=bk)
        out.append(KernelVariant(f"pq_{label}", _gemv_kernel, dict(sig), consts, warps, stages, False))
    bm, bn, bk, warps, stages = TILED_CONFIG
    for label, bits in (("w2_tiled_g128", 2), ("w3_tiled_g128", 3)):
        consts = dict(_consts(bits, 128, 4096), HAS_BIAS=True, DOT_IEEE=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        out.append(KernelVariant(f"pq_{label}", _tiled_kernel, dict(sig), consts, warps, stages, True))
    return out


if __name__ == "__main__":  # python -m fxquant.backends.triton_lowbit 80 90 -> AOT rows as JSON
    import json
    import sys

    from .triton_int import aot_compile

    if INTERPRET:
        sys.exit("unset TRITON_INTERPRET: ahead-of-time compilation needs Triton's real compiler")
    archs = [int(a) for a in sys.argv[1:]] or [80, 90]
    print(json.dumps([aot_compile(v, arch) for v in aot_variants() for arch in archs]))
