"""Triton kernels for I-LLM's integer-only operators, bit for bit equal to :mod:`fxquant.backends.intops`.

Every public function here has the signature and the return values of the function of the same name in
:mod:`fxquant.backends.intops` (the reference): same ``(q, m, k)`` triples, same dtypes, same shapes, same bits.
The reference is the specification; this module is how it runs on a GPU (and, under ``TRITON_INTERPRET=1``, how
the CPU tests check it). The small per-row or per-column *scale* bookkeeping that is not worth a kernel
(``_align_exponents``, broadcasting a scale to one value per row, the GELU constant folded into a scale) runs as
torch integer ops in the wrappers, with the reference's own helpers; everything proportional to the number of
elements runs in Triton, in integer arithmetic (int64, int32 where the bounds allow) with the reference's
rounding. No kernel touches a floating-point value. Scales must be per row (``[..., 1]``), per tensor or ints
(``di_matmul``'s ``b`` may also be per column or per reduction index, as in the reference).

Kernels
=======

* :func:`_igemm_kernel` — the int8 x int8 -> int32 tensor-core GEMM of DI-MatMul (``tl.dot``: ``mma.sync ... s8``
  on sm_80, ``wgmma ... s8`` on sm_90), batched, with an unsigned-``a`` path (``a - 128`` and a column-sum
  correction, exact). Its epilogue stores the int32 product ``P`` and folds the *per-row maximum*
  ``max_j |P_ij · mult_j|`` into a row buffer with an int64 atomic max — from the registers, the tile cut into
  column quarters (``EPILOGUE=3``), or, with a bias (a per-element division), from ``P`` read back in column
  slices (``EPILOGUE=2``) — so that the requantization that follows is one read of ``P`` (no int64
  intermediate goes through memory). Autotuned per (M bucket, N, K) over small config sets per row-count class
  and architecture; non-int8 codes take an exact float64/CPU integer product instead (:func:`_matmul_exact`).
* :func:`_ew_rowmax_kernel` / :func:`_ew_requant_kernel` — the per-row requantization, fused with the
  element-wise op that produces the int64 value (``OP``): identity (:func:`requantize_rows`), column multiply
  and bias (DI-MatMul's epilogue, the fold of ``b``'s scale into ``a``), residual add, product, ``x · σ(x)``
  (SiLU, GELU) and ``g · σ(g) · u`` (SwiGLU). The first computes the row maxima, the second recomputes the value
  (cheap integer math instead of an int64 round trip through memory) and quantizes it; its programs own a row
  block and a long column span, so the per-row work is done once per program (autotuned tile).
* :func:`_softmax_kernel` — DI-ClippedSoftmax, one program per row, DI-Exp inside, the row in registers when it
  fits (``SINGLE``, up to 4096 columns) or streamed in blocks (three passes) for longer rows.
* :func:`_norm_kernel` — DI-Norm (RMSNorm and LayerNorm), one program per row, integer sqrt inside.

Exact integer division without division routines
================================================

A 64-bit integer division is a long software routine on a GPU (and its call makes ptxas keep a stack frame), so
the kernels avoid ``//`` on int64 wherever an element count of them would run:

* the requantization ``q = round(x · qmax / a)`` (``bits <= 16``): with ``N >= 0`` the (offset) numerator,
  ``D = 2a`` and ``Q = floor(N / D) < 2^bits``, take the top ``W = 60 - 2·bits`` bits of ``D``
  (``Dh = D >> sh``) and ``R = floor(2^T / Dh)``, ``T = 61 - bits`` (a per-row restoring long division); then
  ``Qe = ((N >> sh) · R) >> T`` satisfies ``Q - 2 <= Qe <= Q + 1`` and never overflows (``(N >> sh) · R <
  2^(bits + T + 1)``), and one exact remainder ``r = N - Qe · D`` (wrapping arithmetic is exact here, ``r`` lies
  in ``[-D, 3D)``) gives ``Q``. Wider codes take the plain int64 division;
* the norms divide every element by the row's ``2r``: Granlund-Montgomery's multiply-high division
  (:func:`_udiv_magic` per row, :func:`_udiv` per element, ``tl.umulhi`` on 64 bits), exact for every
  ``0 <= n < 2^63``; the divisions by ``2C`` use the same multiplier computed on the host (:func:`udiv_magic`),
  and the integer square root is the digit-by-digit method (no division);
* the sigmoid's ``div_round(num << 15, 2^15 + e)`` fits a 32-bit unsigned division.

The remaining int64 floor divisions (:func:`_floor_div`: the bias term, the softmax's per-row scale and
``normalize_to="sum"``) give ``floor`` under both truncating (GPU) and flooring semantics.

This module imports Triton at import time; fxquant imports it lazily. ``python -m fxquant.backends.triton_intops``
compiles every kernel variant ahead of time for sm_80 and sm_90 and prints one JSON line of their resources
(registers, spills, shared memory, int8 tensor-core use).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from . import intops as ref
from .dyadic import constants
from .triton_int import KernelVariant, autotune, m_bucket

__all__ = ["requantize_rows", "quantize_rows", "dequantize", "di_linear", "di_matmul", "di_clipped_softmax",
           "di_rmsnorm", "di_layernorm", "di_swiglu", "di_gelu", "di_silu", "di_add", "di_mul",
           "linear_gemm", "aot_variants", "aot_compile", "aot_report", "INTERPRET", "GEMM_CONFIGS"]

#: kernels run under ``TRITON_INTERPRET=1`` (CPU tests): no autotuning, small fixed blocks
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# the float boundary ops stay in torch
quantize_rows = ref.quantize_rows
dequantize = ref.dequantize

_C = constants()
#: DI-Exp's constants (15-bit dyadics), as compile-time constants of the kernels
LG_M = tl.constexpr(_C.log2e.m)
LG_K = tl.constexpr(_C.log2e.k)
C1_M = tl.constexpr(_C.exp2_c1.m)
C1_K = tl.constexpr(_C.exp2_c1.k)
C2_M = tl.constexpr(_C.exp2_c2.m)
C2_K = tl.constexpr(_C.exp2_c2.k)
#: fractional bits of the integer sigmoid (``intops.SIGMOID_BITS``) and of its DI-Exp (di_sigmoid's default)
SIG_BITS = tl.constexpr(ref.SIGMOID_BITS)
SIG_F = tl.constexpr(15)
TANH_F = tl.constexpr(ref.TANH_BITS)
#: torch.iinfo(int64).min // 4: the "minus infinity" of masked scores
LOWEST = tl.constexpr(-(1 << 61))
EPS_UNITS_MAX = tl.constexpr(ref.EPS_UNITS_MAX)
ONE = tl.constexpr(1)

# element-wise producers of the fused requantization
OP_IDENT = 0     # v = x
OP_COLMUL = 1    # v = x · c[batch, col] (+ bias term)      (DI-MatMul epilogue, fold of b's scale into a)
OP_ADD = 2       # v = shift_round(a·am, ak-kc) + shift_round(b·bm, bk-kc)
OP_MUL = 3       # v = a · b
OP_SIG = 4       # v = x · σ(x)                              (SiLU, GELU with the 1.702 folded in the scale)
OP_SWIGLU = 5    # v = g · σ(g) · u
OP_TANH = 6      # v = tanh(x) in Q30: 2σ(2|x|) - 1 (the 2 folded in the row's k), a series below 1/4
_SIGMOID_OPS = (OP_SIG, OP_SWIGLU, OP_TANH)


def _py_shift_round(v: int, s: int) -> int:
    """``intops.shift_round`` on Python ints (for compile-time constants)."""
    if s > 0:
        s = min(s, 62)
        return (v + (1 << (s - 1))) >> s
    return v << min(-s, 62)


@functools.lru_cache(maxsize=64)
def _exp_limit(clip_value: float, frac_bits: int) -> int:
    """DI-Exp's clip ``-clip · log2 e`` in units of ``2^-frac_bits`` (as ``intops.di_exp`` computes it)."""
    c = _C.dyadic(clip_value)
    return _py_shift_round(c.m * _C.log2e.m, c.k + _C.log2e.k - frac_bits)


SIG_LIMIT = tl.constexpr(_exp_limit(float(15 + 2), 15))


def _qparams(bits: int, unsigned: bool) -> dict[str, Any]:
    """Compile-time constants of a requantization to ``bits``: the code range and the fast-division widths."""
    lo, qmax = ref.qrange(bits, unsigned)
    return dict(BITS=bits, QMAX=qmax, LO=lo, UNSIGNED=unsigned, FAST=bits <= 16,
                W=max(60 - 2 * bits, 1), T=61 - bits)


# ---------------------------------------------------------------------------------------------------------------
# Integer device helpers (the reference's helpers, element for element)
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _bitlen(v):
    """Bits of a non-negative int64 (``bitlen(0) = 0``): binary search with shifts and compares."""
    n = tl.zeros_like(v)
    big = v >= 4294967296
    n = tl.where(big, n + 32, n)
    v = tl.where(big, v >> 32, v)
    big = v >= 65536
    n = tl.where(big, n + 16, n)
    v = tl.where(big, v >> 16, v)
    big = v >= 256
    n = tl.where(big, n + 8, n)
    v = tl.where(big, v >> 8, v)
    big = v >= 16
    n = tl.where(big, n + 4, n)
    v = tl.where(big, v >> 4, v)
    big = v >= 4
    n = tl.where(big, n + 2, n)
    v = tl.where(big, v >> 2, v)
    big = v >= 2
    n = tl.where(big, n + 1, n)
    v = tl.where(big, v >> 1, v)
    return n + (v > 0).to(tl.int64)


@triton.jit
def _bitlen32(v):
    """:func:`_bitlen` of a non-negative int32."""
    n = tl.zeros_like(v)
    big = v >= 65536
    n = tl.where(big, n + 16, n)
    v = tl.where(big, v >> 16, v)
    big = v >= 256
    n = tl.where(big, n + 8, n)
    v = tl.where(big, v >> 8, v)
    big = v >= 16
    n = tl.where(big, n + 4, n)
    v = tl.where(big, v >> 4, v)
    big = v >= 4
    n = tl.where(big, n + 2, n)
    v = tl.where(big, v >> 2, v)
    big = v >= 2
    n = tl.where(big, n + 1, n)
    v = tl.where(big, v >> 1, v)
    return n + (v > 0).to(tl.int32)


@triton.jit
def _shift_round(x, s):
    """``round(x · 2^-s)`` half up for int64 ``x`` and an int64 tensor ``s`` (``s <= 0``: exact left shift);
    shifts clamped to 62 like the reference."""
    right = tl.minimum(tl.maximum(s, 0), 62)
    left = tl.minimum(tl.maximum(-s, 0), 62)
    half = tl.where(right > 0, (right * 0 + 1) << tl.maximum(right - 1, 0), 0)
    r = (x + half) >> right
    return tl.where(s > 0, r, x << left)


@triton.jit
def _shr_c(x, S: tl.constexpr):
    """:func:`_shift_round` by a compile-time shift."""
    if S > 0:
        return (x + (ONE << (S - 1))) >> S
    else:
        return x << (-S)


@triton.jit
def _floor_div(a, b):
    """``floor(a / b)`` for ``b > 0``, whatever the rounding of ``//`` (truncation on the GPU)."""
    q = a // b
    r = a - q * b
    return tl.where(r < 0, q - 1, q)


@triton.jit
def _div_round(a, b):
    """``div_round(a, b) = floor((2a + b) / 2b)``, ``b > 0``."""
    return _floor_div(2 * a + b, 2 * b)


@triton.jit
def _udiv_magic(d):
    """Granlund-Montgomery's multiplier for dividing by ``d`` (``1 <= d < 2^62``, any shape): returns
    ``(m', s1, s2)`` with ``m' = floor(2^64 · (2^l - d) / d) + 1`` (a 64-bit pattern in an int64),
    ``l = ceil(log2 d)``, ``s1 = min(l, 1)``, ``s2 = max(l - 1, 0)``. The 128-bit quotient is a 64-step restoring
    long division (per row, not per element)."""
    l = _bitlen(d - 1)
    rem = ((d * 0 + 1) << l) - d                    # < d: the high word of (2^l - d) · 2^64
    m = d * 0
    for _ in range(64):
        rem = rem * 2                               # < 2d < 2^63
        bit = rem >= d
        rem = tl.where(bit, rem - d, rem)
        m = m * 2 + bit.to(tl.int64)                # wraps: m is the unsigned 64-bit quotient's bit pattern
    return m + 1, tl.minimum(l, 1), tl.maximum(l - 1, 0)


@triton.jit
def _udiv(n, m, s1, s2):
    """``floor(n / d)`` for ``0 <= n < 2^63`` with ``(m, s1, s2) = _udiv_magic(d)``: exact, one 64-bit
    high multiply instead of a division routine."""
    t = tl.umulhi(n, m)
    return (t + ((n - t) >> s1)) >> s2


@triton.jit
def _normalize(num, k):
    """``intops.normalize``: ``num · 2^-k`` as a 15-bit mantissa ``(m, k')``, ``(0, 0)`` for ``num = 0``."""
    sh = _bitlen(num) - 15
    m = _shift_round(num, sh)
    over = m >= 32768
    m = tl.where(over, m >> 1, m)
    sh = sh + over.to(tl.int64)
    zero = num == 0
    return tl.where(zero, 0, m), tl.where(zero, 0, k - sh)


@triton.jit
def _isqrt(n):
    """``floor(sqrt(n))`` for any int64 ``n >= 0``, exactly — the value ``intops.isqrt``'s Newton iteration reaches
    (its tests check ``r² <= n < (r+1)²``) — digit by digit (32 steps of shifts and compares, no division)."""
    rem = n
    res = n * 0
    bit = n * 0 + (ONE << 62)
    for _ in range(32):
        take = rem >= res + bit
        rem = tl.where(take, rem - (res + bit), rem)
        res = tl.where(take, (res >> 1) + bit, res >> 1)
        bit = bit >> 2
    return res


@triton.jit
def _di_exp(x, m, k, F: tl.constexpr, ORDER: tl.constexpr, LIMIT: tl.constexpr):
    """``intops.di_exp`` with a clip (``LIMIT`` in units of ``2^-F``), ``x <= 0``, ``m``/``k`` broadcast."""
    xm = x * m
    pre = _bitlen32((tl.abs(xm) >> 46).to(tl.int32)).to(tl.int64)     # = max(bitlen(|xm|) - 46, 0)
    t = _shift_round(_shift_round(xm, pre) * LG_M, k + (LG_K - F) - pre)
    t = tl.minimum(t, 0)
    u = tl.minimum(-t, LIMIT)
    whole = u >> F
    f = u & ((ONE << F) - 1)
    if ORDER == 1:
        e = (ONE << F) - (f >> 1)
    else:
        t1 = _shr_c(f * C1_M, C1_K)
        f2 = _shr_c(f * f, F)
        t2 = _shr_c(f2 * C2_M, C2_K)
        e = (ONE << F) - t1 + t2
    e = e >> tl.minimum(whole, 62)
    return tl.where(u >= LIMIT, 0, e)


@triton.jit
def _sigmoid(x, m, k, ORDER: tl.constexpr):
    """``intops.di_sigmoid`` (``SIG_BITS`` fractional bits)."""
    e = _di_exp(-tl.abs(x), m, k, SIG_F, ORDER, SIG_LIMIT)
    one = ONE << SIG_F
    num = tl.where(x >= 0, one, e)
    den = one + e
    # div_round(num << 15, den): 2·num·2^15 + den < 2^32 and 2·den < 2^17, so a 32-bit unsigned division is exact
    q = (2 * (num << SIG_BITS) + den).to(tl.uint32) // (2 * den).to(tl.uint32)
    return q.to(tl.int64)


@triton.jit
def _tanh_q30(x, m, k1, ORDER: tl.constexpr):
    """``intops.tanh_q30`` (``k1 = k - 1``: the sigmoid's scale of ``2|x|``). The series' divisions by 3 and 15 run
    in 32 bits (|u³|, |u⁵| < 2^25 below 1/4)."""
    ax = tl.abs(x)
    big = (2 * _sigmoid(ax, m, k1, ORDER) - (ONE << SIG_BITS)) << (TANH_F - SIG_BITS)
    xm = ax * m
    kk = k1 + 1
    small = tl.where(kk >= 2, (xm >> tl.minimum(tl.maximum(kk - 2, 0), 62)) == 0, xm == 0)
    u = _shift_round(tl.where(small, xm, 0), kk - TANH_F)
    u2 = _shr_c(u * u, TANH_F)
    u3 = _shr_c(u2 * u, TANH_F)
    u5 = _shr_c(u3 * u2, TANH_F)
    d3 = ((2 * u3 + 3).to(tl.int32) // 6).to(tl.int64)
    d15 = ((4 * u5 + 15).to(tl.int32) // 30).to(tl.int64)
    t = tl.where(small, u - d3 + d15, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _bias_term(bias, bsh, xm):
    """DI-MatMul's bias in accumulator units: ``div_round(shift_round(b, bsh), xm)`` where ``xm > 0``."""
    b = _shift_round(bias, bsh)
    return tl.where(xm > 0, _div_round(b, tl.maximum(xm, 1)), 0)


# ---- requantization ---------------------------------------------------------------------------------------------
@triton.jit
def _rq_rowparams(a, m_in, k_in, BITS: tl.constexpr, QMAX: tl.constexpr, W: tl.constexpr, T: tl.constexpr):
    """Per-row part of ``intops.requantize_rows`` given the row maximum ``a = max |x|``: the pre-shift, the
    shifted maximum, the output scale ``(mo, ko)`` and the divisor ``D = 2a`` with its reciprocal."""
    mn, kn = _normalize(m_in, k_in)
    pre = tl.maximum(_bitlen(a) - (62 - BITS), 0)
    a2 = _shift_round(a, pre)
    am, ak = _normalize(a2, -pre)
    num = am * mn
    mo, ko = _normalize((2 * (num << 17) + QMAX) // (2 * QMAX), kn + ak + 17)
    zero = (a == 0) | (mn == 0)
    mo = tl.where(zero, 0, mo)
    ko = tl.where(zero, 0, ko)
    d = 2 * tl.maximum(a2, 1)
    sh = tl.maximum(_bitlen(d) - W, 0)
    dh = d >> sh
    # rcp = floor(2^T / dh) by restoring long division (T + 1 steps per row; no 64-bit division routine)
    rem = d * 0
    rcp = d * 0
    for i in range(T + 1):
        rem = 2 * rem + (i == 0)
        bit = rem >= dh
        rem = tl.where(bit, rem - dh, rem)
        rcp = 2 * rcp + bit.to(tl.int64)
    return pre, a2, mo, ko, d, sh, rcp


@triton.jit
def _rq_quant(v, pre, a2, d, sh, rcp, QMAX: tl.constexpr, LO: tl.constexpr, UNSIGNED: tl.constexpr,
              FAST: tl.constexpr, T: tl.constexpr, GENERIC: tl.constexpr):
    """Per-element part: ``clamp(div_round(shift_round(v, pre) · qmax, a2), lo, qmax)`` (0 on a zero row).
    ``GENERIC=False`` is the common case where no row of the block needs the pre-shift (rows above
    2^(62 - bits)) or a narrowed divisor (``D >= 2^W``): callers check that per block, outside their loops."""
    if GENERIC:
        x = _shift_round(v, pre)
    else:
        x = v
    if UNSIGNED:
        # negative x (outside the contract) round to <= 0 and clamp to 0 in the reference: same as x = 0
        num = (2 * QMAX) * tl.maximum(x, 0) + a2
        off = 0
    else:
        num = (2 * QMAX) * x + (2 * QMAX + 1) * a2          # 2 qmax (x + a2) + a2: >= a2 > 0, < 2^63
        off = QMAX
    if FAST:
        if GENERIC:
            qe = ((num >> sh) * rcp) >> T
        else:
            qe = (num * rcp) >> T
        r = num - qe * d
        # Q is in [qe - 1, qe + 2] (module docstring); from here on the quotient fits 32 bits
        q = qe.to(tl.int32) + (r >= d).to(tl.int32) + (r >= 2 * d).to(tl.int32) - (r < 0).to(tl.int32)
    else:
        q = num // d
    q = tl.minimum(tl.maximum(q - off, LO), QMAX)
    return tl.where(a2 > 0, q, 0)


# ---------------------------------------------------------------------------------------------------------------
# Element-wise producers + per-row requantization
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _produce(x0_ptr, x1_ptr, c0_ptr, c1_ptr, rows, cols, cmask, mask, stride_x0, stride_x1, stride_c, bat,
             r0, r1, r2, r3, OP: tl.constexpr, HAS_BIAS: tl.constexpr, ORDER: tl.constexpr,
             ONE_BATCH: tl.constexpr):
    """The int64 value of the fused element-wise op at ``[rows, cols]`` (``r0..r3``: per-row params [R, 1];
    ``bat``: the batch of each row, for the per-(batch, column) multipliers of ``OP_COLMUL``; ``ONE_BATCH``: all
    rows share batch 0, the multipliers are one row)."""
    x = tl.load(x0_ptr + rows[:, None] * stride_x0 + cols[None, :], mask=mask, other=0).to(tl.int64)
    if OP == 0:
        v = x
    elif OP == 1:
        if ONE_BATCH:
            c = tl.load(c0_ptr + cols, mask=cmask, other=0).to(tl.int64)[None, :]
        else:
            c = tl.load(c0_ptr + bat[:, None] * stride_c + cols[None, :], mask=mask, other=0).to(tl.int64)
        v = x * c
        if HAS_BIAS:
            b = tl.load(c1_ptr + cols[None, :], mask=mask, other=0).to(tl.int64)
            v = v + _bias_term(b, r1, r0)
    elif OP == 2:
        y = tl.load(x1_ptr + rows[:, None] * stride_x1 + cols[None, :], mask=mask, other=0).to(tl.int64)
        kc = tl.minimum(r1, r3)
        v = _shift_round(x * r0, r1 - kc) + _shift_round(y * r2, r3 - kc)
    elif OP == 3:
        y = tl.load(x1_ptr + rows[:, None] * stride_x1 + cols[None, :], mask=mask, other=0).to(tl.int64)
        v = x * y
    elif OP == 4:
        v = x * _sigmoid(x, r0, r1, ORDER)
    elif OP == 5:
        y = tl.load(x1_ptr + rows[:, None] * stride_x1 + cols[None, :], mask=mask, other=0).to(tl.int64)
        v = x * _sigmoid(x, r0, r1, ORDER) * y
    else:
        v = _tanh_q30(x, r0, r1, ORDER)
    return v


@triton.jit
def _row_params(r0_ptr, r1_ptr, r2_ptr, r3_ptr, rows, rmask):
    r0 = tl.load(r0_ptr + rows, mask=rmask, other=0)[:, None]
    r1 = tl.load(r1_ptr + rows, mask=rmask, other=0)[:, None]
    r2 = tl.load(r2_ptr + rows, mask=rmask, other=0)[:, None]
    r3 = tl.load(r3_ptr + rows, mask=rmask, other=0)[:, None]
    return r0, r1, r2, r3


@triton.jit
def _ew_rowmax_kernel(x0_ptr, x1_ptr, c0_ptr, c1_ptr, r0_ptr, r1_ptr, r2_ptr, r3_ptr, amax_ptr,
                      R, C, rows_per_batch, stride_x0, stride_x1, stride_c,
                      OP: tl.constexpr, HAS_BIAS: tl.constexpr, ORDER: tl.constexpr, ONE_BATCH: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``amax[r] = max_c |v[r, c]|`` of the element-wise op (BLOCK_R rows per program, columns streamed)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    bat = (rows.to(tl.int32) // rows_per_batch).to(tl.int64)     # 32-bit: no 64-bit division routine
    r0, r1, r2, r3 = _row_params(r0_ptr, r1_ptr, r2_ptr, r3_ptr, rows, rmask)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        v = _produce(x0_ptr, x1_ptr, c0_ptr, c1_ptr, rows, cols, cmask, mask, stride_x0, stride_x1, stride_c,
                     bat, r0, r1, r2, r3, OP, HAS_BIAS, ORDER, ONE_BATCH)
        acc = tl.maximum(acc, tl.where(mask, tl.abs(v), 0))
    tl.store(amax_ptr + rows, tl.max(acc, axis=1), mask=rmask)


@triton.jit(do_not_specialize=["R_BUCKET"])
def _ew_requant_kernel(x0_ptr, x1_ptr, c0_ptr, c1_ptr, r0_ptr, r1_ptr, r2_ptr, r3_ptr, amax_ptr, min_ptr, kin_ptr,
                       q_ptr, mo_ptr, ko_ptr, R, C, rows_per_batch, stride_x0, stride_x1, stride_c, stride_q,
                       R_BUCKET,
                       OP: tl.constexpr, HAS_BIAS: tl.constexpr, ORDER: tl.constexpr, ONE_BATCH: tl.constexpr,
                       BITS: tl.constexpr, QMAX: tl.constexpr, LO: tl.constexpr, UNSIGNED: tl.constexpr,
                       FAST: tl.constexpr, W: tl.constexpr, T: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Quantize ``BLOCK_R`` rows x one column span (the columns cut in ``num_programs(1)`` spans, streamed
    ``BLOCK_C`` at a time) of the element-wise op against the rows' maxima; the per-row work (scales, reciprocal)
    is done once per program, and the first column span also writes the rows' output scales. ``R_BUCKET`` is only
    part of the autotuning key."""
    pid_c = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    a = tl.load(amax_ptr + rows, mask=rmask, other=0)[:, None]
    m_in = tl.load(min_ptr + rows, mask=rmask, other=0)[:, None]
    k_in = tl.load(kin_ptr + rows, mask=rmask, other=0)[:, None]
    pre, a2, mo, ko, d, sh, rcp = _rq_rowparams(a, m_in, k_in, BITS, QMAX, W, T)
    generic = tl.max(tl.max(pre + sh, axis=1), axis=0) > 0
    bat = (rows.to(tl.int32) // rows_per_batch).to(tl.int64)     # 32-bit: no 64-bit division routine
    r0, r1, r2, r3 = _row_params(r0_ptr, r1_ptr, r2_ptr, r3_ptr, rows, rmask)
    col_span = tl.cdiv(tl.cdiv(C, tl.num_programs(1)), BLOCK_C) * BLOCK_C
    c_start = pid_c * col_span
    c_end = tl.minimum(c_start + col_span, C)
    # two copies of the loop, so that the common one carries no pre-shift / narrowed-divisor code at all
    if generic:
        for c0 in range(c_start, c_end, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < c_end
            mask = rmask[:, None] & cmask[None, :]
            v = _produce(x0_ptr, x1_ptr, c0_ptr, c1_ptr, rows, cols, cmask, mask, stride_x0, stride_x1, stride_c,
                         bat, r0, r1, r2, r3, OP, HAS_BIAS, ORDER, ONE_BATCH)
            q = _rq_quant(v, pre, a2, d, sh, rcp, QMAX, LO, UNSIGNED, FAST, T, True)
            tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], q, mask=mask)
    else:
        for c0 in range(c_start, c_end, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < c_end
            mask = rmask[:, None] & cmask[None, :]
            v = _produce(x0_ptr, x1_ptr, c0_ptr, c1_ptr, rows, cols, cmask, mask, stride_x0, stride_x1, stride_c,
                         bat, r0, r1, r2, r3, OP, HAS_BIAS, ORDER, ONE_BATCH)
            q = _rq_quant(v, pre, a2, d, sh, rcp, QMAX, LO, UNSIGNED, FAST, T, False)
            tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], q, mask=mask)
    if pid_c == 0:
        tl.store(mo_ptr + rows[:, None], mo, mask=rmask[:, None])
        tl.store(ko_ptr + rows[:, None], ko, mask=rmask[:, None])


@triton.jit
def _ew_value_kernel(x0_ptr, x1_ptr, c0_ptr, c1_ptr, r0_ptr, r1_ptr, r2_ptr, r3_ptr, out_ptr,
                     R, C, rows_per_batch, stride_x0, stride_x1, stride_c, stride_o,
                     OP: tl.constexpr, HAS_BIAS: tl.constexpr, ORDER: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The exact int64 value of the element-wise op (``bits=None`` outputs)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    r0, r1, r2, r3 = _row_params(r0_ptr, r1_ptr, r2_ptr, r3_ptr, rows, rmask)
    v = _produce(x0_ptr, x1_ptr, c0_ptr, c1_ptr, rows, cols, cmask, mask, stride_x0, stride_x1, stride_c,
                 (rows.to(tl.int32) // rows_per_batch).to(tl.int64), r0, r1, r2, r3, OP, HAS_BIAS, ORDER, False)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], v, mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# DI-MatMul's GEMM
# ---------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M_BUCKET"])
def _igemm_kernel(a_ptr, b_ptr, p_ptr, mult_ptr, amax_ptr, bias_ptr, xm_ptr, bsh_ptr,
                  M, N, K, M_BUCKET,
                  stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn, stride_pb, stride_pm, stride_cb,
                  A_UNSIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  EPI_N: tl.constexpr, EPILOGUE: tl.constexpr = 2):
    """``P[b] = A[b] @ B[b]`` (int8 x int8 -> int32 on tensor cores), stored as int32, and
    ``amax[b·M + i] = max(amax, max_j |P_ij · mult[b, j] (+ bias term)|)`` (int64 atomic max)."""
    pid = tl.program_id(0)
    bat = tl.program_id(1).to(tl.int64)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering (Triton's matmul tutorial): GROUP_M row tiles share the column tiles of B while hot in L2
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows / columns past the edge load a valid duplicate (no mask in the loop); their results are not stored
    offs_am = offs_m % M
    offs_bn = offs_n % N
    a_ptrs = a_ptr + bat * stride_ab + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + bat * stride_bb + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    colsum = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kmask = offs_k < K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0)
            b = tl.load(b_ptrs, mask=kmask[:, None], other=0)
        if A_UNSIGNED:
            # uint8 a = (a - 128) + 128: an int8 product plus 128 · (column sums of b)
            colsum += tl.sum(b.to(tl.int32), axis=0)
            a = (a.to(tl.int32) - 128).to(tl.int8)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if A_UNSIGNED:
        acc += 128 * colsum[None, :]

    m_mask = offs_m < M
    n_mask = offs_n < N
    p_base = p_ptr + bat * stride_pb
    if EPILOGUE == 0:       # benchmarking only: the product without its epilogue (one int per row tile)
        tl.atomic_max(amax_ptr + bat * M + offs_m, tl.max(acc, axis=1).to(tl.int64), mask=m_mask)
        return
    tl.store(p_base + offs_m[:, None] * stride_pm + offs_n[None, :], acc, mask=m_mask[:, None] & n_mask[None, :])
    if EPILOGUE == 1:       # benchmarking only: P stored, no row maxima
        return
    if (EPILOGUE == 3) and (not HAS_BIAS):   # row maxima from the registers, the tile in column quarters
        mlt = tl.load(mult_ptr + bat * stride_cb + offs_n, mask=n_mask, other=0)
        t_lo, t_hi = _split_cols(acc)
        u_lo, u_hi = _split_vec(mlt)
        t0, t1 = _split_cols(t_lo)
        t2, t3 = _split_cols(t_hi)
        u0, u1 = _split_vec(u_lo)
        u2, u3 = _split_vec(u_hi)
        rmax3 = tl.maximum(tl.maximum(_absprod_max(t0, u0), _absprod_max(t1, u1)),
                           tl.maximum(_absprod_max(t2, u2), _absprod_max(t3, u3)))
        tl.atomic_max(amax_ptr + bat * M + offs_m, rmax3, mask=m_mask)
        return
    # the row maxima of |P · mult| in int64: read the tile back in narrow column slices (it is in L2, and the int64
    # products of a whole tile would not fit in registers)
    tl.debug_barrier()
    if HAS_BIAS:
        rows = bat * M + offs_m
        xm = tl.load(xm_ptr + rows, mask=m_mask, other=0)[:, None]
        bsh = tl.load(bsh_ptr + rows, mask=m_mask, other=0)[:, None]
    rmax = tl.zeros((BLOCK_M,), dtype=tl.int64)
    for c0 in range(0, BLOCK_N, EPI_N):
        offs_c = pid_n * BLOCK_N + c0 + tl.arange(0, EPI_N)
        c_mask = offs_c < N
        mask = m_mask[:, None] & c_mask[None, :]
        pc = tl.load(p_base + offs_m[:, None] * stride_pm + offs_c[None, :], mask=mask, other=0)
        mult = tl.load(mult_ptr + bat * stride_cb + offs_c, mask=c_mask, other=0)
        s = pc.to(tl.int64) * mult[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_c, mask=c_mask, other=0).to(tl.int64)[None, :]
            s = s + _bias_term(bias, bsh, xm)
        rmax = tl.maximum(rmax, tl.max(tl.where(mask, tl.abs(s), 0), axis=1))
    tl.atomic_max(amax_ptr + bat * M + offs_m, rmax, mask=m_mask)


@triton.jit
def _split_cols(x):
    """``x[:, :W/2], x[:, W/2:]`` (a register-level split when each thread holds both halves)."""
    return tl.split(tl.permute(tl.reshape(x, (x.shape[0], 2, x.shape[1] // 2)), (0, 2, 1)))


@triton.jit
def _split_vec(v):
    return tl.split(tl.permute(tl.reshape(v, (2, v.shape[0] // 2)), (1, 0)))


@triton.jit
def _absprod_max(p, mult):
    """``max_j |p_ij · mult_j|`` per row, in int64 (columns past the edge have ``mult = 0``)."""
    return tl.max(tl.abs(p.to(tl.int64) * mult[None, :]), axis=1)


def _gcfg(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    # the epilogue's column slice: about 16 int64 products per thread
    epi = max(16, min(bn, (16 * 32 * warps) // bm))
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "EPI_N": epi,
                          "EPILOGUE": 3},
                         num_warps=warps, num_stages=stages)


#: GEMM configs per row-count class and architecture (int8 operands: BLOCK_K >= 32, tiles >= 16). Every config
#: compiles without register spills for its architecture (the AOT report checks each one): the wide tiles only fit
#: Hopper's register budget with wgmma accumulators, so sm_80 gets narrower large tiles.
_SMALL = [_gcfg(16, 64, 256, 4, 4), _gcfg(16, 128, 128, 4, 4), _gcfg(16, 32, 256, 4, 4)]
_MID = [_gcfg(64, 64, 128, 4, 4), _gcfg(64, 128, 128, 4, 4), _gcfg(128, 64, 128, 4, 4), _gcfg(32, 64, 256, 4, 4)]
GEMM_CONFIGS = {
    90: {"small": _SMALL, "mid": _MID,
         "large": [_gcfg(128, 256, 128, 8, 3), _gcfg(128, 128, 128, 8, 4), _gcfg(128, 128, 64, 4, 4),
                   _gcfg(256, 128, 128, 8, 3), _gcfg(128, 256, 64, 8, 4), _gcfg(64, 128, 128, 4, 4),
                   _gcfg(128, 64, 128, 4, 4)]},
    80: {"small": _SMALL, "mid": _MID,
         "large": [_gcfg(128, 128, 128, 8, 4), _gcfg(128, 128, 64, 8, 4), _gcfg(64, 128, 128, 4, 4),
                   _gcfg(128, 64, 128, 4, 4)]},
}
_GEMM_INTERPRET = _gcfg(16, 32, 32, 4, 1, 4)


def _gemm_class(m: int) -> str:
    return "small" if m <= 16 else ("mid" if m <= 128 else "large")


_GEMM_KEY = ["M_BUCKET", "N", "K", "A_UNSIGNED", "HAS_BIAS"]
_heur = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
_gemm_tuned = {(arch, cls): autotune(cfgs, key=_GEMM_KEY)(_heur(_igemm_kernel))
               for arch, classes in GEMM_CONFIGS.items() for cls, cfgs in classes.items()}


def _gemm_arch(device: torch.device) -> int:
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def _launch_gemm(a: torch.Tensor, b: torch.Tensor, mult: torch.Tensor, *, a_unsigned: bool,
                 bias: torch.Tensor | None = None, xm: torch.Tensor | None = None, bsh: torch.Tensor | None = None,
                 config: triton.Config | None = None, epilogue: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``a [B, M, K]`` (int8, or uint8 with ``a_unsigned``) @ ``b`` given as a ``[B, K, N]`` view (any strides):
    returns ``P [B, M, N]`` int32 and the per-row maxima ``[B·M]`` of ``|P · mult[B, N] (+ bias)|``."""
    nb, m, k = a.shape
    n = b.shape[-1]
    p = torch.empty((nb, m, n), dtype=torch.int32, device=a.device)
    amax = torch.zeros(nb * m, dtype=torch.int64, device=a.device)
    if m == 0 or n == 0:
        return p, amax
    has_bias = bias is not None
    dummy = amax
    args = (a, b, p, mult, amax, bias if has_bias else dummy, xm if has_bias else dummy, bsh if has_bias else dummy,
            m, n, k, m_bucket(m), a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
            p.stride(0), p.stride(1), mult.stride(0))
    consts = dict(A_UNSIGNED=a_unsigned, HAS_BIAS=has_bias)
    if config is None and INTERPRET:
        config = _GEMM_INTERPRET
    if config is not None:
        kw = dict(config.kwargs)
        if epilogue is not None:
            kw["EPILOGUE"] = epilogue
        grid = (triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(n, kw["BLOCK_N"]), nb)
        _igemm_kernel[grid](*args, **consts, EVEN_K=k % kw["BLOCK_K"] == 0, **kw,
                            num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        def grid(meta: dict[str, Any]) -> tuple[int, int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), nb)
        _gemm_tuned[(_gemm_arch(a.device), _gemm_class(m))][grid](*args, **consts)
    return p, amax


def _matmul_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer ``a @ b`` for codes that the int8 tensor-core GEMM does not take (e.g. int16 activations).
    On the CPU: the reference's ``_matmul_int``. On a GPU (torch has no CUDA integer matmul): float64, exact when
    every partial sum is an integer below 2^53, which the dtypes bound (16-bit x 8-bit codes up to K = 2^29);
    wider codes go through the CPU."""
    if a.device.type == "cpu":
        return ref._matmul_int(a, b)
    bits = {torch.int8: 7, torch.uint8: 8, torch.int16: 15}
    ba, bb = bits.get(a.dtype), bits.get(b.dtype)
    if ba is not None and bb is not None and ba + bb + max(1, a.shape[-1]).bit_length() < 53:
        return torch.matmul(a.double(), b.double()).to(torch.int64)
    return ref._matmul_int(a.cpu(), b.cpu()).to(a.device)


# ---------------------------------------------------------------------------------------------------------------
# Host helpers for the element-wise family
# ---------------------------------------------------------------------------------------------------------------
def _i64(v: torch.Tensor | int, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(v, device=device).to(torch.int64) if isinstance(v, torch.Tensor) else \
        torch.tensor(int(v), dtype=torch.int64, device=device)


def _per_row(v: torch.Tensor | int, lead: tuple[int, ...], device: torch.device, what: str = "scale") -> torch.Tensor:
    """A scale given per row (``[..., 1]``), per tensor or as an int, as a contiguous int64 ``[rows]``."""
    t = _i64(v, device)
    try:
        t = torch.broadcast_to(t, tuple(lead) + (1,))
    except RuntimeError as err:
        raise ValueError(f"the Triton integer ops take per-row {what}s (broadcastable to {tuple(lead) + (1,)}), "
                         f"got shape {tuple(t.shape)}") from err
    return t.reshape(-1).contiguous()


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() > 0 else x.reshape(1, 1)
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def _ew_blocks(op: int, rows: int, cols: int, interpret: bool = INTERPRET) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of the element-wise kernels: 16 int64 values per thread for the plain
    producers, 8 for the sigmoid ones (more registers per value), so that nothing spills."""
    if interpret:
        return 4, 64, 4
    per_prog = 1024 if op in _SIGMOID_OPS else 2048
    bc = min(512, max(64, triton.next_power_of_2(cols)))
    br = max(1, per_prog // bc)
    return br, bc, 4


#: programs the requantization aims for (a few per SM): the columns of a row block are split until there are
#: this many, the rest of a row block is streamed inside its program (the per-row work is done once there)
REQUANT_PROGRAMS = 1024


def _rcfg(br: int, bc: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_R": br, "BLOCK_C": bc}, num_warps=warps, num_stages=1)


#: requantization tiles (values per step: 2048 or 1024; the sigmoid producers take the narrow ones)
REQUANT_CONFIGS = [_rcfg(4, 512, 4), _rcfg(4, 512, 8), _rcfg(8, 256, 8), _rcfg(4, 256, 4), _rcfg(4, 256, 8)]
_REQUANT_INTERPRET = _rcfg(4, 64, 4)


def _requant_prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    op = kwargs.get("OP", named_args.get("OP"))
    narrow = op in _SIGMOID_OPS
    kept = [c for c in configs if (c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_C"] <= 1024) == narrow] or configs
    if op == OP_TANH:            # at 8 warps ptxas caps the tanh producer at 64 registers and spills 8 bytes (sm_90)
        kept = [c for c in kept if c.num_warps == 4] or kept
    return kept


def _requant_splits(r: int, c: int, br: int, bc: int) -> int:
    """Column spans per row block: enough programs for the GPU (``REQUANT_PROGRAMS``), long spans otherwise."""
    return max(1, min(triton.cdiv(c, bc), triton.cdiv(REQUANT_PROGRAMS, triton.cdiv(r, br))))


_requant_tuned = autotune(REQUANT_CONFIGS, key=["R_BUCKET", "C", "OP", "BITS", "HAS_BIAS"],
                                 prune_configs_by={"early_config_prune": _requant_prune})(_ew_requant_kernel)


def _ew_requant(op: int, x0: torch.Tensor, *, x1: torch.Tensor | None = None, c0: torch.Tensor | None = None,
                c1: torch.Tensor | None = None, rp: tuple[torch.Tensor, ...] = (), m_in: torch.Tensor,
                k_in: torch.Tensor, bits: int, unsigned: bool = False, amax: torch.Tensor | None = None,
                rows_per_batch: int = 1, has_bias: bool = False, order: int = 2
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused element-wise op + per-row requantization on 2-D operands ``[R, C]``; returns 2-D ``q`` and ``[R]``
    scales. ``amax`` (the rows' max |value|) is computed first unless given (the GEMM's epilogue gives it)."""
    ref._check_bits(bits)
    r, c = x0.shape
    dev = x0.device
    rp = tuple(rp) + (m_in,) * (4 - len(rp))
    x1 = x0 if x1 is None else x1
    c0 = m_in if c0 is None else c0
    c1 = m_in if c1 is None else c1
    stride_c = c0.stride(0) if c0.dim() == 2 else 0
    br, bc, warps = _ew_blocks(op, r, c)
    common = (x0, x1, c0, c1, *rp)
    one_batch = op == OP_COLMUL and c0.dim() == 2 and c0.shape[0] == 1
    if amax is None:
        amax = torch.empty(r, dtype=torch.int64, device=dev)
        if r:
            _ew_rowmax_kernel[(triton.cdiv(r, br),)](*common, amax, r, c, rows_per_batch, x0.stride(0),
                                                     x1.stride(0), stride_c, OP=op, HAS_BIAS=has_bias, ORDER=order,
                                                     ONE_BATCH=one_batch, BLOCK_R=br, BLOCK_C=bc, num_warps=warps)
    q = torch.empty((r, c), dtype=ref.int_dtype(bits, unsigned), device=dev)
    mo = torch.empty(r, dtype=torch.int64, device=dev)
    ko = torch.empty(r, dtype=torch.int64, device=dev)
    if r and c:
        args = (*common, amax, m_in, k_in, q, mo, ko, r, c, rows_per_batch, x0.stride(0), x1.stride(0), stride_c,
                q.stride(0), m_bucket(r))
        consts = dict(OP=op, HAS_BIAS=has_bias, ORDER=order, ONE_BATCH=one_batch, **_qparams(bits, unsigned))
        if INTERPRET:
            kw = _REQUANT_INTERPRET.kwargs
            grid = (triton.cdiv(r, kw["BLOCK_R"]), _requant_splits(r, c, kw["BLOCK_R"], kw["BLOCK_C"]))
            _ew_requant_kernel[grid](*args, **consts, **kw, num_warps=_REQUANT_INTERPRET.num_warps)
        else:
            def grid(meta: dict[str, Any]) -> tuple[int, int]:
                return (triton.cdiv(r, meta["BLOCK_R"]), _requant_splits(r, c, meta["BLOCK_R"], meta["BLOCK_C"]))
            _requant_tuned[grid](*args, **consts)
    elif r:
        # an empty row: max 0, zero scale (as the reference's amax over nothing cannot be taken, never reached)
        mo.zero_()
        ko.zero_()
    return q, mo, ko


def _ew_value(op: int, x0: torch.Tensor, *, x1: torch.Tensor | None = None, rp: tuple[torch.Tensor, ...] = (),
              order: int = 2) -> torch.Tensor:
    r, c = x0.shape
    x1 = x0 if x1 is None else x1
    dummy = torch.zeros(max(r, 1), dtype=torch.int64, device=x0.device)
    rp = tuple(rp) + (dummy,) * (4 - len(rp))
    out = torch.empty((r, c), dtype=torch.int64, device=x0.device)
    br, bc, warps = _ew_blocks(op, r, c)
    if r and c:
        _ew_value_kernel[(triton.cdiv(r, br), triton.cdiv(c, bc))](
            x0, x1, dummy, dummy, *rp, out, r, c, 1, x0.stride(0), x1.stride(0), 0, out.stride(0),
            OP=op, HAS_BIAS=False, ORDER=order, BLOCK_R=br, BLOCK_C=bc, num_warps=warps)
    return out


def _finish(q2: torch.Tensor, mo: torch.Tensor, ko: torch.Tensor, shape: tuple[int, ...]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lead = tuple(shape[:-1])
    return q2.reshape(shape), mo.reshape(lead + (1,)), ko.reshape(lead + (1,))


# ---------------------------------------------------------------------------------------------------------------
# Entry points (signatures of fxquant.backends.intops)
# ---------------------------------------------------------------------------------------------------------------
def requantize_rows(x: torch.Tensor, m: torch.Tensor | int, k: torch.Tensor | int, bits: int, *,
                    unsigned: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fxquant.backends.intops.requantize_rows` (per-row ``m``, ``k``)."""
    ref._check_bits(bits)
    lead = tuple(x.shape[:-1])
    x2 = _as_2d(x)
    q, mo, ko = _ew_requant(OP_IDENT, x2, m_in=_per_row(m, lead, x.device), k_in=_per_row(k, lead, x.device),
                            bits=bits, unsigned=unsigned)
    return _finish(q, mo, ko, tuple(x.shape))


def linear_gemm(x2: torch.Tensor, w: torch.Tensor, wm: torch.Tensor, config: triton.Config | None = None,
                epilogue: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DI-Linear's GEMM alone (the benchmark times it): int8 ``x2 [M, K]`` @ int8 ``w [N, K]``ᵀ -> int32 ``P``
    and the row maxima of ``|P · wm|``. ``config`` forces a config; with it, ``epilogue`` picks the epilogue:
    3 (the default: row maxima from the registers), 2 (from ``P`` read back in column slices, the bias path),
    and, to measure what the epilogue costs, 1 (store ``P`` only) or 0 (no store): their outputs are not
    DI-Linear's."""
    mult = wm.reshape(1, -1)
    p, amax = _launch_gemm(x2.unsqueeze(0), w.t().unsqueeze(0), mult, a_unsigned=False, config=config,
                           epilogue=epilogue)
    return p[0], amax


def di_linear(x: torch.Tensor, xm: torch.Tensor, xk: torch.Tensor, w: torch.Tensor, wm: torch.Tensor, wk: int,
              bias: torch.Tensor | None = None, bias_k: int = 0, bits: int = 8
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fxquant.backends.intops.di_linear`: int8 tensor-core GEMM with the row-max epilogue, then one fused
    ``P · wm (+ bias)`` requantization pass. Non-int8 codes take torch's exact integer matmul for ``P``."""
    ref._check_bits(bits)
    lead = tuple(x.shape[:-1])
    dev = x.device
    n = w.shape[0]
    x2 = _as_2d(x)
    xm_r = _per_row(xm, lead, dev)
    kacc = _per_row(xk, lead, dev) + int(wk)
    if bias is not None:                                  # zero rows give the bias (see the reference)
        dead = xm_r == 0
        xm_r = torch.where(dead, 1, xm_r).contiguous()
        kacc = torch.where(dead, int(bias_k), kacc).contiguous()
    mult = torch.broadcast_to(_i64(wm, dev), (n,)).reshape(1, n).contiguous()
    has_bias = bias is not None
    bias_t = bsh = None
    if has_bias:
        bias_t = torch.broadcast_to(_i64(bias, dev), (n,)).contiguous()
        bsh = torch.clamp(bias_k - kacc, min=-40, max=62).contiguous()
    if x2.dtype == torch.int8 and w.dtype == torch.int8:
        wt = w.t() if w.stride(-1) == 1 else w.contiguous().t()
        p, amax = _launch_gemm(x2.unsqueeze(0), wt.unsqueeze(0), mult, a_unsigned=False, bias=bias_t, xm=xm_r,
                               bsh=bsh)
        p = p[0]
    else:
        p = _matmul_exact(x2, w.t()).contiguous()
        amax = None
    rp = (xm_r, bsh) if has_bias else ()
    q, mo, ko = _ew_requant(OP_COLMUL, p, c0=mult, c1=bias_t, rp=rp, m_in=xm_r, k_in=kacc, bits=bits, amax=amax,
                            rows_per_batch=max(p.shape[0], 1), has_bias=has_bias)
    return _finish(q, mo, ko, lead + (n,))


def di_matmul(a: torch.Tensor, am: torch.Tensor, ak: torch.Tensor, b: torch.Tensor, bm: torch.Tensor, bk: torch.Tensor,
              bits: int = 16, *, a_bits: int = 8, a_unsigned: bool = False, causal: str = ""
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fxquant.backends.intops.di_matmul`: the scale alignment in torch (per-row/per-column vectors), the
    fold of a per-row ``b`` scale into ``a`` as a fused Triton requantization, the batched int8 GEMM with its
    row-max epilogue and the requantization pass in Triton. ``causal``: the per-row key multipliers ``[M, keys]``
    are made in torch and applied by the element-wise product kernel (to ``a`` before the GEMM for ``P V``, to
    the GEMM's product for ``Q Kᵀ``)."""
    dev = a.device
    am, ak, bm, bk = (_i64(t, dev) for t in (am, ak, bm, bk))
    if am.shape[-1] != 1:
        raise ValueError(f"di_matmul: a's scale must be per row ([..., M, 1]), got shape {tuple(am.shape)}")
    if bm.shape[-2] != 1 and bm.shape[-1] != 1:
        raise ValueError(f"di_matmul: b's scale must be per column or per row, got shape {tuple(bm.shape)}")
    mdim, kdim = a.shape[-2], a.shape[-1]
    ndim = b.shape[-1]
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2], am.shape[:-2], ak.shape[:-2], bm.shape[:-2],
                                   bk.shape[:-2])
    nb = 1
    for s in batch:
        nb *= s
    a3 = torch.broadcast_to(a, batch + (mdim, kdim)).reshape(nb, mdim, kdim)
    am_r = torch.broadcast_to(am, batch + (mdim, 1)).reshape(-1).contiguous()
    ak_r = torch.broadcast_to(ak, batch + (mdim, 1)).reshape(-1).contiguous()
    b3 = torch.broadcast_to(b, batch + (kdim, ndim)).reshape(nb, kdim, ndim)
    if causal:
        km, kk = ref.causal_key_scales(b, bm, bk, causal)
        mk, kc = ref._align_exponents_causal(km, kk, mdim)               # [..., M, keys], [..., M, 1]
        keys = kdim if causal == "reduction" else ndim
        mk_r = torch.broadcast_to(mk, batch + (mdim, keys)).reshape(nb * mdim, keys).contiguous()
        k_in = (ak_r + torch.broadcast_to(kc, batch + (mdim, 1)).reshape(-1)).contiguous()
        if causal == "reduction":
            a2 = a3.reshape(nb * mdim, kdim)
            a2 = a2 if a2.stride(-1) == 1 else a2.contiguous()
            q, am_r, ak_r = _ew_requant(OP_MUL, a2, x1=mk_r, m_in=am_r, k_in=k_in, bits=a_bits, unsigned=a_unsigned)
            p = _product(q.reshape(nb, mdim, kdim), b3)
            q, mo, ko = _ew_requant(OP_IDENT, p.reshape(nb * mdim, ndim), m_in=am_r, k_in=ak_r, bits=bits)
        else:
            p = _product(a3, b3)
            q, mo, ko = _ew_requant(OP_MUL, p.reshape(nb * mdim, ndim), x1=mk_r, m_in=am_r, k_in=k_in, bits=bits)
        return _finish(q, mo, ko, batch + (mdim, ndim))
    if bm.shape[-2] != 1:                                        # per reduction index: fold into a's columns
        mk, kc = ref._align_exponents(bm, bk, dim=-2)            # [..., K, 1], [..., 1, 1]
        mk_c = torch.broadcast_to(mk.transpose(-1, -2), batch + (1, kdim)).reshape(nb, kdim).contiguous()
        kc_r = torch.broadcast_to(kc, batch + (mdim, 1)).reshape(-1)
        a2 = a3.reshape(nb * mdim, kdim)
        if a2.stride(-1) != 1:
            a2 = a2.contiguous()
        q, am_r, ak_r = _ew_requant(OP_COLMUL, a2, c0=mk_c, m_in=am_r, k_in=(ak_r + kc_r).contiguous(),
                                    bits=a_bits, unsigned=a_unsigned, rows_per_batch=mdim)
        a3 = q.reshape(nb, mdim, kdim)
        bm = torch.ones_like(kc)
        bk = torch.zeros_like(kc)
    mk, kc = ref._align_exponents(bm, bk, dim=-1)                # per column multipliers [..., 1, N] on kc
    mult = torch.broadcast_to(mk, batch + (1, ndim)).reshape(nb, ndim).contiguous()
    k_in = (ak_r + torch.broadcast_to(kc, batch + (mdim, 1)).reshape(-1)).contiguous()
    if b3.dtype == torch.int8 and a3.dtype in (torch.int8, torch.uint8):
        p, amax = _launch_gemm(a3, b3, mult, a_unsigned=a3.dtype == torch.uint8)
    else:
        p = _matmul_exact(a3, b3).contiguous()
        amax = None
    q, mo, ko = _ew_requant(OP_COLMUL, p.reshape(nb * mdim, ndim), c0=mult, m_in=am_r, k_in=k_in, bits=bits,
                            amax=amax, rows_per_batch=max(mdim, 1))
    return _finish(q, mo, ko, batch + (mdim, ndim))


def _product(a3: torch.Tensor, b3: torch.Tensor) -> torch.Tensor:
    """``a3 @ b3`` exactly, contiguous: the int8 tensor-core GEMM where it applies (its row maxima unused)."""
    if b3.dtype == torch.int8 and a3.dtype in (torch.int8, torch.uint8):
        ones = torch.ones((a3.shape[0], b3.shape[-1]), dtype=torch.int64, device=a3.device)
        return _launch_gemm(a3, b3, ones, a_unsigned=a3.dtype == torch.uint8)[0]
    return _matmul_exact(a3, b3).contiguous()


def di_add(a: torch.Tensor, am: torch.Tensor, ak: torch.Tensor, b: torch.Tensor, bm: torch.Tensor, bk: torch.Tensor,
           bits: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fxquant.backends.intops.di_add` (one fused kernel pair: align, add, requantize)."""
    a, b = torch.broadcast_tensors(a, b)
    lead = tuple(a.shape[:-1])
    dev = a.device
    rp = tuple(_per_row(t, lead, dev) for t in (am, ak, bm, bk))
    live_ak, live_bk = ref._live_exponents(*rp)
    rp = (rp[0], live_ak.contiguous(), rp[2], live_bk.contiguous())
    kc = torch.minimum(rp[1], rp[3])
    q, mo, ko = _ew_requant(OP_ADD, _as_2d(a), x1=_as_2d(b), rp=rp, m_in=torch.ones_like(kc), k_in=kc, bits=bits)
    return _finish(q, mo, ko, tuple(a.shape))


def di_mul(a: torch.Tensor, am: torch.Tensor, ak: torch.Tensor, b: torch.Tensor, bm: torch.Tensor, bk: torch.Tensor,
           bits: int | None = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fxquant.backends.intops.di_mul`."""
    a, b = torch.broadcast_tensors(a, b)
    lead = tuple(a.shape[:-1])
    dev = a.device
    if bits is None:
        m, k = ref.normalize(_i64(am, dev) * _i64(bm, dev), _i64(ak, dev) + _i64(bk, dev))
        return _ew_value(OP_MUL, _as_2d(a), x1=_as_2d(b)).reshape(a.shape), m, k
    m_in = _per_row(_i64(am, dev) * _i64(bm, dev), lead, dev)
    k_in = _per_row(_i64(ak, dev) + _i64(bk, dev), lead, dev)
    q, mo, ko = _ew_requant(OP_MUL, _as_2d(a), x1=_as_2d(b), m_in=m_in, k_in=k_in, bits=bits)
    return _finish(q, mo, ko, tuple(a.shape))


def di_silu(x: torch.Tensor, m: torch.Tensor, k: torch.Tensor, *, bits: int | None = 16, order: int = 2
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fxquant.backends.intops.di_silu`."""
    lead = tuple(x.shape[:-1])
    dev = x.device
    rp = (_per_row(m, lead, dev), _per_row(k, lead, dev))
    if bits is None:
        return (_ew_value(OP_SIG, _as_2d(x), rp=rp, order=order).reshape(x.shape), _i64(m, dev),
                _i64(k, dev) + ref.SIGMOID_BITS)
    q, mo, ko = _ew_requant(OP_SIG, _as_2d(x), rp=rp, m_in=rp[0], k_in=rp[1] + ref.SIGMOID_BITS, bits=bits,
                            order=order)
    return _finish(q, mo, ko, tuple(x.shape))


def di_gelu(x: torch.Tensor, m: torch.Tensor, k: torch.Tensor, *, bits: int = 8, order: int = 2
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fxquant.backends.intops.di_gelu` (the 1.702 folded into the sigmoid's per-row scale in torch)."""
    lead = tuple(x.shape[:-1])
    dev = x.device
    m_r, k_r = _per_row(m, lead, dev), _per_row(k, lead, dev)
    c = _C.gelu_alpha
    m2, k2 = ref.normalize(m_r * c.m, k_r + c.k)
    q, mo, ko = _ew_requant(OP_SIG, _as_2d(x), rp=(m2.contiguous(), k2.contiguous()), m_in=m_r,
                            k_in=k_r + ref.SIGMOID_BITS, bits=bits, order=order)
    return _finish(q, mo, ko, tuple(x.shape))


def di_swiglu(g: torch.Tensor, gm: torch.Tensor, gk: torch.Tensor, u: torch.Tensor, um: torch.Tensor, uk: torch.Tensor,
              bits: int = 8, *, order: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fxquant.backends.intops.di_swiglu` (``g · σ(g) · u`` and its requantization, fused)."""
    if g.dtype in (torch.int32, torch.int64) or u.dtype in (torch.int32, torch.int64):
        raise ValueError("di_swiglu takes codes of at most 16 bits (requantize gate and up first)")
    g, u = torch.broadcast_tensors(g, u)
    lead = tuple(g.shape[:-1])
    dev = g.device
    gm_r, gk_r = _per_row(gm, lead, dev), _per_row(gk, lead, dev)
    m_in = _per_row(_i64(gm, dev) * _i64(um, dev), lead, dev)
    k_in = _per_row(_i64(gk, dev) + _i64(uk, dev) + ref.SIGMOID_BITS, lead, dev)
    q, mo, ko = _ew_requant(OP_SWIGLU, _as_2d(g), x1=_as_2d(u), rp=(gm_r, gk_r), m_in=m_in, k_in=k_in, bits=bits,
                            order=order)
    return _finish(q, mo, ko, tuple(g.shape))


def di_tanh(x: torch.Tensor, m: torch.Tensor, k: torch.Tensor, *, bits: int = 16, order: int = 2
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fxquant.backends.intops.di_tanh` (the sigmoid of ``2|x|``: the row's ``k - 1``)."""
    lead = tuple(x.shape[:-1])
    dev = x.device
    m_r, k_r = _per_row(m, lead, dev), _per_row(k, lead, dev)
    one = torch.ones_like(m_r)
    q, mo, ko = _ew_requant(OP_TANH, _as_2d(x), rp=(m_r, (k_r - 1).contiguous()), m_in=one,
                            k_in=one * ref.TANH_BITS, bits=bits, order=order)
    return _finish(q, mo, ko, tuple(x.shape))


# ---------------------------------------------------------------------------------------------------------------
# DI-ClippedSoftmax
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _softmax_e(s, att, smax, m, k, F: tl.constexpr, ORDER: tl.constexpr, LIMIT: tl.constexpr):
    delta = tl.minimum(s - smax, 0)
    delta = tl.maximum(delta, -(1 << 40))
    e = _di_exp(delta, m, k, F, ORDER, LIMIT)
    return tl.where(att, e, 0)


@triton.jit
def _softmax_p(e, total, F: tl.constexpr, QMAX: tl.constexpr, NORM_SUM: tl.constexpr):
    if NORM_SUM:
        p = (e * QMAX) // tl.maximum(total, 1)               # e >= 0: truncation is floor
    else:
        p = _shr_c(e * QMAX, F)
    return tl.minimum(tl.maximum(p, 0), QMAX)


@triton.jit
def _softmax_kernel(s_ptr, m_ptr, k_ptr, mask_ptr, p_ptr, pm_ptr, pk_ptr, C, stride_s, stride_mask, stride_p,
                    HAS_MASK: tl.constexpr, F: tl.constexpr, ORDER: tl.constexpr, LIMIT: tl.constexpr,
                    QMAX: tl.constexpr, NORM_SUM: tl.constexpr, PM_SUM: tl.constexpr, PK_SUM: tl.constexpr,
                    C62: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    """One row of DI-ClippedSoftmax: max over attended entries, ``E = DI-Exp(s - max)``, ``ΣE``, ``P``."""
    row = tl.program_id(0).to(tl.int64)
    m = tl.load(m_ptr + row)
    k = tl.load(k_ptr + row)
    s_row = s_ptr + row * stride_s
    p_row = p_ptr + row * stride_p
    mask_row = mask_ptr + row * stride_mask
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        att = cols < C
        s = tl.load(s_row + cols, mask=att, other=0).to(tl.int64)
        if HAS_MASK:
            att = att & (tl.load(mask_row + cols, mask=att, other=0) != 0)
        smax = tl.max(tl.where(att, s, LOWEST), axis=0)
        e = _softmax_e(s, att, smax, m, k, F, ORDER, LIMIT)
        total = tl.sum(e, axis=0)
        p = _softmax_p(e, total, F, QMAX, NORM_SUM)
        tl.store(p_row + cols, p, mask=cols < C)
    else:
        acc = tl.full((BLOCK,), LOWEST, tl.int64)
        for c0 in range(0, C, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            att = cols < C
            s = tl.load(s_row + cols, mask=att, other=0).to(tl.int64)
            if HAS_MASK:
                att = att & (tl.load(mask_row + cols, mask=att, other=0) != 0)
            acc = tl.maximum(acc, tl.where(att, s, LOWEST))
        smax = tl.max(acc, axis=0)
        tacc = tl.zeros((BLOCK,), tl.int64)
        for c0 in range(0, C, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            att = cols < C
            s = tl.load(s_row + cols, mask=att, other=0).to(tl.int64)
            if HAS_MASK:
                att = att & (tl.load(mask_row + cols, mask=att, other=0) != 0)
            tacc += _softmax_e(s, att, smax, m, k, F, ORDER, LIMIT)
        total = tl.sum(tacc, axis=0)
        for c0 in range(0, C, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            att = cols < C
            s = tl.load(s_row + cols, mask=att, other=0).to(tl.int64)
            if HAS_MASK:
                att = att & (tl.load(mask_row + cols, mask=att, other=0) != 0)
            e = _softmax_e(s, att, smax, m, k, F, ORDER, LIMIT)
            tl.store(p_row + cols, _softmax_p(e, total, F, QMAX, NORM_SUM), mask=cols < C)
    zero = total == 0
    if NORM_SUM:
        pm = tl.where(zero, 0, PM_SUM)
        pk = tl.where(zero, 0, PK_SUM)
    else:
        num = (2 * C62 + total) // (2 * tl.maximum(total, 1))
        pm, pk = _normalize(num, total * 0 + (62 - F))
        pm = tl.where(zero, 0, pm)
        pk = tl.where(zero, 0, pk)
    tl.store(pm_ptr + row, pm)
    tl.store(pk_ptr + row, pk)


#: rows up to this many columns stay in registers (one load); longer rows are streamed in blocks
SINGLE_MAX = 4096


def _row_block(c: int, interpret: bool = INTERPRET, loop: tuple[int, int] = (1024, 8)) -> tuple[int, bool, int]:
    """(BLOCK, SINGLE, num_warps) of the one-program-per-row kernels. ``loop``: (BLOCK, num_warps) of the
    streamed mode, per kernel — the combinations whose AOT report is clean on sm_80 and sm_90 (ptxas keeps a
    small stack frame in some others)."""
    if interpret and c > SINGLE_MAX:
        return 2048, False, 4
    if c <= SINGLE_MAX:
        block = max(16, triton.next_power_of_2(c))
        return block, True, 4 if block <= 1024 else 8
    return loop[0], False, loop[1]


#: streamed-mode blocks of the norm kernels
NORM_LOOP = (512, 4)


@functools.lru_cache(maxsize=16)
def _sum_scale(qmax: int) -> tuple[int, int]:
    """The constant scale ``1 / qmax`` of ``normalize_to="sum"``, normalised as the reference does."""
    m, k = ref.normalize(ref.div_round(torch.tensor(1 << 40), qmax), torch.tensor(40))
    return int(m), int(k)


@functools.lru_cache(maxsize=64)
def _eps(eps: float) -> tuple[int, int]:
    e = _C.dyadic(eps)
    return e.m, e.k


def di_clipped_softmax(s: torch.Tensor, m: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, *,
                       clip: float = 15.0, frac_bits: int = 15, order: int = 2, bits: int = 8,
                       normalize_to: str = "max") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fxquant.backends.intops.di_clipped_softmax` (one program per row)."""
    if order not in (1, 2):
        raise ValueError(f"di_exp order must be 1 (shift-only, I-LLM) or 2 (quadratic), got {order}")
    if normalize_to not in ("max", "sum"):
        raise ValueError(f"normalize_to must be 'max' or 'sum', got {normalize_to!r}")
    dev = s.device
    lead = tuple(s.shape[:-1])
    cdim = s.shape[-1]
    s2 = _as_2d(s)
    r = s2.shape[0]
    m_r, k_r = _per_row(m, lead, dev), _per_row(k, lead, dev)
    if mask is not None:
        mk = torch.broadcast_to(mask.to(device=dev, dtype=torch.uint8), s.shape).reshape(r, cdim)
        if cdim > 1 and mk.stride(-1) != 1:
            mk = mk.contiguous()
        stride_mask = mk.stride(0)
    else:
        mk, stride_mask = m_r, 0
    qmax = (1 << bits) - 1
    p = torch.empty((r, cdim), dtype=ref.int_dtype(bits, True), device=dev)
    pm = torch.empty(r, dtype=torch.int64, device=dev)
    pk = torch.empty(r, dtype=torch.int64, device=dev)
    pm_sum, pk_sum = _sum_scale(qmax)
    block, single, warps = _row_block(cdim)
    if r:
        _softmax_kernel[(r,)](s2, m_r, k_r, mk, p, pm, pk, cdim, s2.stride(0), stride_mask, p.stride(0),
                              HAS_MASK=mask is not None, F=frac_bits, ORDER=order,
                              LIMIT=_exp_limit(clip, frac_bits), QMAX=qmax, NORM_SUM=normalize_to == "sum",
                              PM_SUM=pm_sum, PK_SUM=pk_sum, C62=(1 << 62) // qmax,
                              BLOCK=block, SINGLE=single, num_warps=warps)
    return p.reshape(s.shape), pm.reshape(lead + (1,)), pk.reshape(lead + (1,))


# ---------------------------------------------------------------------------------------------------------------
# DI-Norm
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _norm_r(ss, C, m, k, cm, cs1, cs2, EPS_M: tl.constexpr, EPS_K: tl.constexpr):
    """``isqrt(div_round(Σx² · 2^16, C) + eps_units)``: the RMS in code units with 8 fractional bits.
    ``(cm, cs1, cs2)``: the division multiplier of ``2C`` (host-computed); ``eps_units`` divides by the row's
    ``2m²`` with a multiplier made per row. No 64-bit division routine in the kernel."""
    sh = 2 * k + 16 - EPS_K
    num = _shift_round(k * 0 + EPS_M, -tl.minimum(sh, 40))
    safe = tl.where(m > 0, m * m, 1)
    em, es1, es2 = _udiv_magic(2 * safe)
    q1 = tl.where(m > 0, _udiv(2 * num + safe, em, es1, es2), 0)
    extra = tl.minimum(tl.maximum(sh - 40, 0), 62)            # the rest of the shift, saturated as the reference
    big = (q1 > 0) & ((sh - 40 > 61) | (q1 >= (EPS_UNITS_MAX >> extra)))
    eps_u = tl.where(big, EPS_UNITS_MAX, q1 << extra)
    r2 = _udiv(2 * (ss << 16) + C, cm, cs1, cs2) + eps_u
    return _isqrt(r2)


@triton.jit
def _norm_mean(total, C, cm, cs1, cs2):
    """``div_round(Σx, C) = floor((2Σx + C) / 2C)`` with the multiplier of ``2C`` (a signed numerator)."""
    num = 2 * total + C
    neg = num < 0
    q = _udiv(tl.where(neg, 2 * C - 1 - num, num), cm, cs1, cs2)
    return tl.where(neg, -q, q)


@triton.jit
def _norm_y(xc, g, r, beta, mg, s1, s2):
    """``div_round((xc · γ) << 16, r)`` (0 where ``r = 0``) ``+ β``: the floor division by ``D = 2r`` with the
    row's multiplier ``(mg, s1, s2) = _udiv_magic(D)``, on ``|N|`` (``floor(N/D) = -floor((|N| + D - 1)/D)`` for
    ``N < 0``)."""
    d = 2 * tl.maximum(r, 1)
    num = 2 * ((xc * g) << 16) + r
    neg = num < 0
    q = _udiv(tl.where(neg, d - 1 - num, num), mg, s1, s2)
    y = tl.where(r > 0, tl.where(neg, -q, q), 0)
    return y + beta


@triton.jit
def _norm_kernel(x_ptr, m_ptr, k_ptr, g_ptr, b_ptr, q_ptr, mo_ptr, ko_ptr, C, stride_x, stride_q, k_out,
                 c_mul, c_s1, c_s2,
                 LAYER: tl.constexpr, HAS_BETA: tl.constexpr, EPS_M: tl.constexpr, EPS_K: tl.constexpr,
                 BITS: tl.constexpr, QMAX: tl.constexpr, LO: tl.constexpr, UNSIGNED: tl.constexpr,
                 FAST: tl.constexpr, W: tl.constexpr, T: tl.constexpr,
                 BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    """One row of DI-Norm (RMSNorm, or LayerNorm with ``LAYER``), requantized to ``BITS``."""
    row = tl.program_id(0).to(tl.int64)
    m = tl.load(m_ptr + row)
    k = tl.load(k_ptr + row)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        cm = cols < C
        x = tl.load(x_row + cols, mask=cm, other=0).to(tl.int64)
        if LAYER:
            mean = _norm_mean(tl.sum(x, axis=0), C, c_mul, c_s1, c_s2)
            x = tl.where(cm, x - mean, 0)
        r = _norm_r(tl.sum(x * x, axis=0), C, m, k, c_mul, c_s1, c_s2, EPS_M, EPS_K)
        mg, s1, s2 = _udiv_magic(2 * tl.maximum(r, 1))
        g = tl.load(g_ptr + cols, mask=cm, other=0).to(tl.int64)
        if HAS_BETA:
            beta = tl.load(b_ptr + cols, mask=cm, other=0).to(tl.int64)
        else:
            beta = 0
        y = tl.where(cm, _norm_y(x, g, r, beta, mg, s1, s2), 0)
        a = tl.max(tl.abs(y), axis=0)
        pre, a2, mo, ko, d, sh, rcp = _rq_rowparams(a, a * 0 + 16384, k_out + a * 0, BITS, QMAX, W, T)
        q = _rq_quant(y, pre, a2, d, sh, rcp, QMAX, LO, UNSIGNED, FAST, T, True)
        tl.store(q_row + cols, q, mask=cm)
    else:
        mean = m * 0
        if LAYER:
            sacc = tl.zeros((BLOCK,), tl.int64)
            for c0 in range(0, C, BLOCK):
                cols = c0 + tl.arange(0, BLOCK)
                sacc += tl.load(x_row + cols, mask=cols < C, other=0).to(tl.int64)
            mean = _norm_mean(tl.sum(sacc, axis=0), C, c_mul, c_s1, c_s2)
        ssacc = tl.zeros((BLOCK,), tl.int64)
        for c0 in range(0, C, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            cm = cols < C
            x = tl.where(cm, tl.load(x_row + cols, mask=cm, other=0).to(tl.int64) - mean, 0)
            ssacc += x * x
        r = _norm_r(tl.sum(ssacc, axis=0), C, m, k, c_mul, c_s1, c_s2, EPS_M, EPS_K)
        mg, s1, s2 = _udiv_magic(2 * tl.maximum(r, 1))
        aacc = tl.zeros((BLOCK,), tl.int64)
        for c0 in range(0, C, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            cm = cols < C
            x = tl.load(x_row + cols, mask=cm, other=0).to(tl.int64) - mean
            g = tl.load(g_ptr + cols, mask=cm, other=0).to(tl.int64)
            if HAS_BETA:
                beta = tl.load(b_ptr + cols, mask=cm, other=0).to(tl.int64)
            else:
                beta = 0
            aacc = tl.maximum(aacc, tl.where(cm, tl.abs(_norm_y(x, g, r, beta, mg, s1, s2)), 0))
        a = tl.max(aacc, axis=0)
        pre, a2, mo, ko, d, sh, rcp = _rq_rowparams(a, a * 0 + 16384, k_out + a * 0, BITS, QMAX, W, T)
        for c0 in range(0, C, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            cm = cols < C
            x = tl.load(x_row + cols, mask=cm, other=0).to(tl.int64) - mean
            g = tl.load(g_ptr + cols, mask=cm, other=0).to(tl.int64)
            if HAS_BETA:
                beta = tl.load(b_ptr + cols, mask=cm, other=0).to(tl.int64)
            else:
                beta = 0
            q = _rq_quant(_norm_y(x, g, r, beta, mg, s1, s2), pre, a2, d, sh, rcp, QMAX, LO, UNSIGNED, FAST, T,
                          True)
            tl.store(q_row + cols, q, mask=cm)
    tl.store(mo_ptr + row, mo)
    tl.store(ko_ptr + row, ko)


def udiv_magic(d: int) -> tuple[int, int, int]:
    """Host version of :func:`_udiv_magic` (exact Python integers): ``(m', s1, s2)`` for dividing by ``d``,
    ``m'`` as the int64 with the same 64-bit pattern."""
    if not 1 <= d < 1 << 62:
        raise ValueError(f"divisor out of range: {d}")
    ell = (d - 1).bit_length()
    m = ((1 << 64) * ((1 << ell) - d)) // d + 1
    m &= (1 << 64) - 1
    return (m - (1 << 64) if m >= 1 << 63 else m), min(ell, 1), max(ell - 1, 0)


def _norm(x: torch.Tensor, m: torch.Tensor, k: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None,
          gamma_k: int, eps: float, bits: int, layer: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ref._check_bits(bits)
    dev = x.device
    lead = tuple(x.shape[:-1])
    cdim = x.shape[-1]
    x2 = _as_2d(x)
    r = x2.shape[0]
    m_r, k_r = _per_row(m, lead, dev), _per_row(k, lead, dev)
    g = torch.broadcast_to(_i64(gamma, dev), (cdim,)).contiguous()
    b = torch.broadcast_to(_i64(beta, dev), (cdim,)).contiguous() if beta is not None else g
    eps_m, eps_k = _eps(float(eps))
    q = torch.empty((r, cdim), dtype=ref.int_dtype(bits), device=dev)
    mo = torch.empty(r, dtype=torch.int64, device=dev)
    ko = torch.empty(r, dtype=torch.int64, device=dev)
    block, single, warps = _row_block(cdim, loop=NORM_LOOP)
    k_out = int(gamma_k) + ref.NORM_BITS + ref.MANT_BITS - 1
    if r:
        _norm_kernel[(r,)](x2, m_r, k_r, g, b, q, mo, ko, cdim, x2.stride(0), q.stride(0), k_out,
                           *udiv_magic(2 * cdim),
                           LAYER=layer, HAS_BETA=beta is not None, EPS_M=eps_m, EPS_K=eps_k,
                           **_qparams(bits, False), BLOCK=block, SINGLE=single, num_warps=warps)
    return _finish(q, mo, ko, tuple(x.shape))


def di_rmsnorm(x: torch.Tensor, m: torch.Tensor, k: torch.Tensor, gamma: torch.Tensor, gamma_k: int, *,
               eps: float = 1e-6, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fxquant.backends.intops.di_rmsnorm` (one program per row)."""
    return _norm(x, m, k, gamma, None, gamma_k, eps, bits, layer=False)


def di_layernorm(x: torch.Tensor, m: torch.Tensor, k: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None,
                 gamma_k: int, *, eps: float = 1e-5, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fxquant.backends.intops.di_layernorm` (one program per row)."""
    return _norm(x, m, k, gamma, beta, gamma_k, eps, bits, layer=True)


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IntopsVariant(KernelVariant):
    """A :class:`~fxquant.backends.triton_int.KernelVariant` with the specialisation the JIT gives real calls:
    the arguments in ``divisible`` are marked 16-divisible (16-byte aligned pointers, strides and sizes that are
    multiples of 16); unit strides are passed in ``constexprs`` (the JIT specialises an int equal to 1)."""

    divisible: tuple[str, ...] = ()
    #: the architectures this variant is meant for (GEMM configs differ between sm_80 and sm_90)
    archs: tuple[int, ...] = (80, 90)


def _variant(name: str, fn: Any, sig: dict[str, str], consts: dict[str, Any], warps: int, stages: int,
             dot: bool, ones: tuple[str, ...] = (), archs: tuple[int, ...] = (80, 90)) -> IntopsVariant:
    sig = dict(sig)
    consts = dict(consts)
    for o in ones:
        sig[o] = "constexpr"
        consts[o] = 1
    div = tuple(n for n, t in sig.items() if t.startswith("*") or (t == "i32" and n not in _NOT_DIV))
    return IntopsVariant(name, fn, sig, consts, warps, stages, dot, div, archs)


#: int arguments that are not multiples of 16 in general (row counts, ragged sizes, shifts)
_NOT_DIV = {"M", "R", "M_BUCKET", "R_BUCKET", "rows_per_batch", "k_out", "C", "c_s1", "c_s2"}


def _ew_sig(kind: str, x0: str = "*i64", x1: str = "*i64", q: str = "*i8") -> dict[str, str]:
    sig = {"x0_ptr": x0, "x1_ptr": x1, "c0_ptr": "*i64", "c1_ptr": "*i64", "r0_ptr": "*i64",
           "r1_ptr": "*i64", "r2_ptr": "*i64", "r3_ptr": "*i64"}
    if kind == "rowmax":
        sig["amax_ptr"] = "*i64"
    elif kind == "requant":
        sig.update(amax_ptr="*i64", min_ptr="*i64", kin_ptr="*i64", q_ptr=q, mo_ptr="*i64", ko_ptr="*i64")
    sig.update(R="i32", C="i32", rows_per_batch="i32", stride_x0="i32", stride_x1="i32", stride_c="i32")
    if kind == "requant":
        sig["stride_q"] = "i32"
        sig["R_BUCKET"] = "i32"
    return sig


def aot_variants() -> list[IntopsVariant]:
    """Representative specialisations of every kernel: the GEMM in every config (DI-Linear's layout: both operands
    K-contiguous), with a bias, and in the attention layout with an unsigned ``a`` (``P · V``: ``b`` is
    N-contiguous); the fused requantization for the DI-MatMul epilogue and the heaviest element-wise op (SwiGLU);
    softmax and the norms in both row modes."""
    out: list[IntopsVariant] = []
    gsig = {"a_ptr": "*i8", "b_ptr": "*i8", "p_ptr": "*i32", "mult_ptr": "*i64", "amax_ptr": "*i64",
            "bias_ptr": "*i64", "xm_ptr": "*i64", "bsh_ptr": "*i64", "M": "i32", "N": "i32", "K": "i32",
            "M_BUCKET": "i32", "stride_ab": "i32", "stride_am": "i32", "stride_ak": "i32", "stride_bb": "i32",
            "stride_bk": "i32", "stride_bn": "i32", "stride_pb": "i32", "stride_pm": "i32", "stride_cb": "i32"}
    # every autotuning config, each on the architecture it is offered to
    plan = []
    for cls in ("large", "mid", "small"):
        for arch in (80, 90):
            for i, cfg in enumerate(GEMM_CONFIGS[arch][cls]):
                shared = cls != "large" and arch == 90       # mid/small configs are the same list on both
                if cls != "large" and arch == 80:
                    continue
                plan.append((f"gemm_{cls}{i}" + ("" if shared else f"_sm{arch}"), cfg, False, False,
                             (80, 90) if shared else (arch,)))
    plan += [("gemm_mid_bias", _MID[1], False, True, (80, 90)), ("gemm_uint8_attn", _MID[0], True, False, (80, 90))]
    for name, cfg, uns, bias, archs in plan:
        sig = dict(gsig)
        if uns:
            sig["a_ptr"] = "*u8"
        consts = dict(A_UNSIGNED=uns, HAS_BIAS=bias, EVEN_K=not bias, **cfg.kwargs)
        ones = ("stride_ak", "stride_bn") if uns else ("stride_ak", "stride_bk")
        out.append(_variant(name, _igemm_kernel, sig, consts, cfg.num_warps, cfg.num_stages, True, ones, archs))
    for op, oname, x0 in ((OP_COLMUL, "colmul", "*i32"), (OP_SWIGLU, "swiglu", "*i16"), (OP_TANH, "tanh", "*i16")):
        for cfg in _requant_prune(REQUANT_CONFIGS, {"OP": op}):
            br, bc = cfg.kwargs["BLOCK_R"], cfg.kwargs["BLOCK_C"]
            out.append(_variant(f"requant_{oname}_{br}x{bc}w{cfg.num_warps}", _ew_requant_kernel,
                                _ew_sig("requant", x0, "*i16"),
                                dict(OP=op, HAS_BIAS=False, ORDER=2, ONE_BATCH=op == OP_COLMUL,
                                     **_qparams(8, False), BLOCK_R=br, BLOCK_C=bc), cfg.num_warps, 1, False))
    br, bc, warps = _ew_blocks(OP_SWIGLU, 2048, 4096, interpret=False)
    out.append(_variant("rowmax_swiglu", _ew_rowmax_kernel, _ew_sig("rowmax", "*i16", "*i16"),
                        dict(OP=OP_SWIGLU, HAS_BIAS=False, ORDER=2, ONE_BATCH=False, BLOCK_R=br, BLOCK_C=bc),
                        warps, 1, False))
    ssig = {"s_ptr": "*i16", "m_ptr": "*i64", "k_ptr": "*i64", "mask_ptr": "*u8", "p_ptr": "*u8", "pm_ptr": "*i64",
            "pk_ptr": "*i64", "C": "i32", "stride_s": "i32", "stride_mask": "i32", "stride_p": "i32"}
    for c in (2048, 8192):
        block, single, warps = _row_block(c, interpret=False)
        out.append(_variant(f"softmax_{'single' if single else 'loop'}", _softmax_kernel, ssig,
                            dict(HAS_MASK=True, F=15, ORDER=2, LIMIT=_exp_limit(15.0, 15), QMAX=255,
                                 NORM_SUM=False, PM_SUM=0, PK_SUM=0, C62=(1 << 62) // 255, BLOCK=block,
                                 SINGLE=single), warps, 1, False))
    nsig = {"x_ptr": "*i16", "m_ptr": "*i64", "k_ptr": "*i64", "g_ptr": "*i64", "b_ptr": "*i64", "q_ptr": "*i8",
            "mo_ptr": "*i64", "ko_ptr": "*i64", "C": "i32", "stride_x": "i32", "stride_q": "i32", "k_out": "i32",
            "c_mul": "i64", "c_s1": "i32", "c_s2": "i32"}
    e6 = _C.dyadic(1e-6)
    for name, layer, c in (("rmsnorm_single", False, 4096), ("rmsnorm_loop", False, 8192),
                           ("layernorm_loop", True, 8192)):
        block, single, warps = _row_block(c, interpret=False, loop=NORM_LOOP)
        out.append(_variant(name, _norm_kernel, nsig,
                            dict(LAYER=layer, HAS_BETA=layer, EPS_M=e6.m, EPS_K=e6.k, **_qparams(8, False),
                                 BLOCK=block, SINGLE=single), warps, 1, False))
    return out


def aot_compile(variant: KernelVariant, arch: int) -> dict[str, Any]:
    """Compile ``variant`` for ``sm_<arch>`` without a GPU; resources from the wheel's ``cuobjdump`` (as
    :func:`fxquant.backends.triton_int.aot_compile`), plus whether the PTX uses *int8* tensor-core MMAs
    (``mma.sync ... .s8`` on sm_80, ``wgmma ... .s8`` on sm_90) and the SASS has ``IMMA``/``IGMMA``."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    div = getattr(variant, "divisible", ())
    attrs = {(variant.fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
    src = ASTSource(fn=variant.fn, signature=variant.signature, constexprs=variant.constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
    ptx = compiled.asm["ptx"]
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{variant.name}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        text = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], check=True,
                              capture_output=True, text=True).stdout
        sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], check=False, capture_output=True,
                              text=True).stdout if variant.uses_dot else ""
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage for {variant.name}:\n{text}")
    reg, stack, shared, local = (int(v) for v in found.groups())
    return {"name": variant.name, "arch": arch, "registers": reg, "stack": stack, "shared": shared,
            "local": local, "num_warps": variant.num_warps, "num_stages": variant.num_stages,
            "mma": bool(re.search(r"\bmma\.sync", ptx)), "wgmma": "wgmma" in ptx,
            "int8_mma": bool(re.search(r"\b(?:wgmma\.mma_async|mma\.sync)\S*\.s8", ptx)),
            "sass_imma": bool(re.search(r"\bI(?:MMA|GMMA)\b", sass)), "uses_dot": variant.uses_dot}


def _aot_job(job: tuple[str, int]) -> dict[str, Any]:
    name, arch = job
    return aot_compile(next(v for v in aot_variants() if v.name == name), arch)


def aot_report(archs: tuple[int, ...] = (80, 90), jobs: int | None = None) -> list[dict[str, Any]]:
    """:func:`aot_compile` for every variant of :func:`aot_variants` on each of its architectures (in ``archs``),
    in ``jobs`` worker processes (default: up to 4, one per CPU)."""
    todo = [(v.name, a) for v in aot_variants() for a in archs if a in v.archs]
    jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    if jobs == 1:
        return [_aot_job(t) for t in todo]
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_aot_job, todo))


if __name__ == "__main__":  # python -m fxquant.backends.triton_intops  -> the AOT report as one JSON line
    import json
    import sys

    if INTERPRET:
        sys.exit("unset TRITON_INTERPRET: ahead-of-time compilation needs Triton's real compiler")
    from fxquant.backends import triton_intops as _mod   # workers import the module by its package name

    print(json.dumps(_mod.aot_report()))
