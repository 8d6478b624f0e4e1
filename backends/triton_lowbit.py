"""Triton kernels for ParetoQ's packed low-bit weights: ``y = x @ dequant(W)^T (+ bias)``.

Formats (laid out by :mod:`fxquant.backends.lowbit`): 1 bit (8 codes a byte), ternary (5 codes a byte, base 3),
2 bit (4 a byte), 3 bit (a 2-bit plane and a 1-bit plane), 4 bit (2 a byte); float32 scales per output row or per
group of input columns. A weight element is ``float32((A·u − B) · STEP) · scale`` — the integer ``A·u − B`` is
exact, ``· STEP`` is exact except for ternary (one rounding to float32(2/3), the same one the fake-quant forward
makes), ``· scale`` is the single rounding of fxquant's one numerics. :func:`dequantize` writes these values out
with the kernels' own tile helper, so a test compares them bit for bit with the reference.

Two paths, picked by the row count ``M``:

* **GEMV** (``M = 1``, decode; any ``M`` when forced): one program per (row, ``BLOCK_N`` outputs). The uint8 planes
  are read as 32-bit words (int16 pairs of bytes, or bytes, for ternary), one word of each of the ``BLOCK_N`` rows
  per thread, and each code becomes a float without an int->float conversion: the field at bit ``p`` OR'ed into
  the bits of 2^23 reads as 2^23 + c·2^p, and one FADD leaves (c − B/A)·2^p exactly; the 2^-p goes into the
  activation (exact, once per activation, shared by the thread's rows), A·STEP and the per-channel scale to the end,
  a group scale to the per-word partial sum. Per weight that is LOP3 + FADD + FFMA (3 bit: + LOP3 + FFMA for the
  second plane; ternary: five balanced base-3 digits per byte by the round-to-integer trick, all in float32, all
  exact). A 2-D float32 accumulator is reduced once at the end. SASS per weight on sm_90 (main loop, before ->
  after): 1 bit 32 -> 3.4, ternary 38 -> 4.4, 2 bit 33 -> 3.5 (g128: 36 -> 4.0), 3 bit 40 -> 5.9, 4 bit 31 -> 3.8.
* **tiled GEMM** (``M > 1``): ``BLOCK_M × BLOCK_N`` output tiles; each ``BLOCK_N × BLOCK_K`` weight tile is
  dequantized into registers in the activation dtype and fed to ``tl.dot`` (tensor cores). Its unpacking (and the
  :func:`dequantize` witness) gathers byte ``k // PER_BYTE`` for every column ``k`` of the tile.

Under ``TRITON_INTERPRET=1`` (CPU tests) the same code runs in numpy.
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


# ---- the decode GEMV ----------------------------------------------------------------------------------------------
# Codes become floats without an int->float conversion: with the field of code c at bit p of a word,
# ``((word & (MASK << p)) | 0x4B000000)`` read as float32 is exactly 2^23 + c·2^p, so one FADD of the constant
# 2^23 + (B/A)·2^p leaves (c − B/A)·2^p exactly (B/A·2^p must be an integer: p ≥ 1 for the 1/2-bit offsets 0.5/1.5).
# The 2^p is folded into the activation (x · 2^-p, exact, once per activation element and shared by the BLOCK_N rows
# a thread holds), A·STEP and the per-channel scale into the end. Per weight that is LOP3 + FADD + FFMA.
@triton.jit
def _x_pair(x_row, idx, KX, XMODE: tl.constexpr, MASKED: tl.constexpr):
    """Two consecutive activations as float32 (``idx`` counts int32 pairs of 16-bit values, or fp32 elements;
    ``KX`` of them exist)."""
    if XMODE == 0:  # float32 activations: idx is the even column
        if MASKED:
            a = tl.load(x_row + idx, mask=idx < KX, other=0.0)
            b = tl.load(x_row + idx + 1, mask=idx + 1 < KX, other=0.0)
        else:
            a = tl.load(x_row + idx)
            b = tl.load(x_row + idx + 1)
    else:
        if MASKED:
            xp = tl.load(x_row + idx, mask=idx < KX, other=0)
        else:
            xp = tl.load(x_row + idx)
        if XMODE == 1:  # fp16 pair
            a = (xp & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            b = (xp >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:  # bf16 pair: the bits of a bf16 are the top half of its float32
            a = (xp << 16).to(tl.float32, bitcast=True)
            b = (xp & -65536).to(tl.float32, bitcast=True)
    return a, b


@triton.jit
def _close_tile(acc, part, s_ptr, rows, offs_w, wmask, stride_sn, CODES: tl.constexpr, GROUP: tl.constexpr,
                GROUP_MODE: tl.constexpr, MASKED: tl.constexpr):
    """End of a tile: with groups of whole words (``GROUP_MODE == 1``) the per-word partial sum ``part`` times its
    group's scale is added to ``acc``; otherwise ``part`` already is the accumulator. ``CODES`` codes a word."""
    if GROUP_MODE == 1:
        sp = s_ptr + rows[:, None] * stride_sn + (offs_w // (GROUP // CODES))[None, :]
        if MASKED:
            sc = tl.load(sp, mask=wmask[None, :], other=0.0)
        else:
            sc = tl.load(sp)
        acc = tl.fma(part, sc, acc)
    else:
        acc = part
    return acc


@triton.jit
def _word_tile(acc, x_row, q_ptr, q2_ptr, s_ptr, rows, offs_w, K, KW, KX, stride_qn, stride_q2n, stride_sn, MAGIC,
               MAGIC1, FMT: tl.constexpr, CPW: tl.constexpr, GROUP: tl.constexpr, GROUP_MODE: tl.constexpr,
               XMODE: tl.constexpr, MASKED: tl.constexpr):
    """``acc[BLOCK_N, W] += Σ_j level(code_j)·2^p·x_j·2^-p`` over the CPW codes of the words ``offs_w`` (1, 2, 3, 4 bit)."""
    wmask = offs_w < KW
    qp = q_ptr + rows[:, None] * stride_qn + offs_w[None, :]
    if MASKED:
        q = tl.load(qp, mask=wmask[None, :], other=0)
    else:
        q = tl.load(qp)
    qa = q << 1
    if FMT == 1:
        qb = q >> 10
    elif FMT == 4:
        qb = q >> 12
    else:
        qb = q >> 11
    if FMT == 3:
        # the hi bits of lo word i are half (i % 2) of hi word i // 2; moved to bits 6..21 (q = j + 6 below)
        hp = q2_ptr + rows[:, None] * stride_q2n + (offs_w // 2)[None, :]
        if MASKED:
            h = tl.load(hp, mask=wmask[None, :], other=0)
        else:
            h = tl.load(hp)
        hs = (h >> ((offs_w % 2) * 16)[None, :]) << 6
    if GROUP_MODE == 1:
        part = tl.zeros_like(acc)
    else:
        part = acc
    for jj in tl.static_range(CPW // 2):
        if XMODE == 0:
            xa, xb = _x_pair(x_row, offs_w * CPW + 2 * jj, KX, XMODE, MASKED)
        else:
            xa, xb = _x_pair(x_row, offs_w * (CPW // 2) + jj, KX, XMODE, MASKED)
        for hh in tl.static_range(2):
            j = 2 * jj + hh
            # code j: taken from word << 1 (bit p = its field + 1), the word, or word >> HI_SHIFT, so that its
            # field lies in the 23 mantissa bits, at p >= 1 for the half-integer offsets of 1 and 2 bit
            if FMT == 1:
                if j <= 21:
                    src = qa
                    P = j + 1
                else:
                    src = qb
                    P = j - 10
            elif FMT == 4:
                if j <= 4:
                    src = q
                    P = 4 * j
                else:
                    src = qb
                    P = 4 * j - 12
            else:
                if j <= 10:
                    src = qa
                    P = 2 * j + 1
                else:
                    src = qb
                    P = 2 * j - 11
            if hh == 0:
                xj = xa
            else:
                xj = xb
            if P != 0:
                xj = xj * (1.0 / (1 << P))
            if FMT == 1:
                FIELD = 1
            elif FMT == 4:
                FIELD = 15
            else:
                FIELD = 3
            f = ((src & (FIELD << P)) | MAGIC).to(tl.float32, bitcast=True)
            if FMT == 1:
                d = f - (8388608.0 + 0.5 * (1 << P))
            elif FMT == 2:
                d = f - (8388608.0 + 1.5 * (1 << P))
            elif FMT == 4:
                d = f - (8388608.0 + 8.0 * (1 << P))
            else:
                # 3 bit: code = lo + 4·hi. t = (lo − 4)·2^p − C and H = 1 + hi·2^(q−23) with C = 2^(p+25−q):
                # fma(H, C, t) = (lo + 4·hi − 4)·2^p, every step exact (checked for all codes and positions)
                Q = j + 6
                C = 1.0 * (1 << (P + 25 - Q))  # <= 2^30: Triton's constexpr ints are 32-bit
                t = f - (8388608.0 + 4.0 * (1 << P) + C)
                hf = ((hs & (1 << Q)) | MAGIC1).to(tl.float32, bitcast=True)
                d = tl.fma(hf, C, t)
            if GROUP_MODE == 2:
                col = offs_w * CPW + j
                sj = tl.load(s_ptr + rows[:, None] * stride_sn + (col // GROUP)[None, :], mask=(col < K)[None, :],
                             other=0.0)
                d = d * sj
            part = tl.fma(d, xj[None, :], part)
    return _close_tile(acc, part, s_ptr, rows, offs_w, wmask, stride_sn, CPW, GROUP, GROUP_MODE, MASKED)


@triton.jit
def _sel5(d: tl.constexpr, a0, a1, a2, a3, a4):
    if d == 0:
        return a0
    elif d == 1:
        return a1
    elif d == 2:
        return a2
    elif d == 3:
        return a3
    else:
        return a4


@triton.jit
def _trits(f, OFF: tl.constexpr, SC: tl.constexpr):
    """The five balanced digits (float32, times SC = 1 or 256) of the base-3 byte whose magic float is ``f``
    (2^23 + SC·byte). v = byte − 121 = Σ s_d·3^d with s_d ∈ {−1, 0, 1}; r_d = round(v / 3^d) is never a tie, so
    s_d = r_d − 3·r_{d+1}. r_d comes from the round-to-integer trick fma(v, 3^-d, 1.5·2^23) − 1.5·2^23; every value
    is a small integer (times SC), every step exact."""
    v = f - OFF
    r1 = tl.fma(v, 0.3333333432674408 / SC, 12582912.0) - 12582912.0
    r2 = tl.fma(v, 0.1111111119389534 / SC, 12582912.0) - 12582912.0
    r3 = tl.fma(v, 0.03703703731298447 / SC, 12582912.0) - 12582912.0
    r4 = tl.fma(v, 0.012345679104328156 / SC, 12582912.0) - 12582912.0
    s0 = tl.fma(r1, -3.0 * SC, v)  # SC·s_0: its activation is divided by SC
    s1 = tl.fma(r2, -3.0, r1)
    s2 = tl.fma(r3, -3.0, r2)
    s3 = tl.fma(r4, -3.0, r3)
    return s0, s1, s2, s3, r4


@triton.jit
def _ternary_tile(acc, x_row, q_ptr, s_ptr, rows, offs_w, K, KW, KX, stride_qn, stride_sn, MAGIC,
                  GROUP: tl.constexpr, GROUP_MODE: tl.constexpr, XMODE: tl.constexpr, TUNIT: tl.constexpr,
                  MASKED: tl.constexpr):
    """Ternary, 5 codes a byte: ``TUNIT`` = 1 reads one byte per thread and row (any row length), 2 reads a 16-bit
    pair of bytes (rows of an even byte count), 10 codes, with activations in int32 pairs."""
    wmask = offs_w < KW
    qp = q_ptr + rows[:, None] * stride_qn + offs_w[None, :]
    if MASKED:
        b = tl.load(qp, mask=wmask[None, :], other=0).to(tl.int32)
    else:
        b = tl.load(qp).to(tl.int32)
    if GROUP_MODE == 1:
        part = tl.zeros_like(acc)
    else:
        part = acc
    if TUNIT == 1:
        s0, s1, s2, s3, s4 = _trits((b | MAGIC).to(tl.float32, bitcast=True), 8388608.0 + 121.0, 1.0)
        for d in tl.static_range(5):
            s = _sel5(d, s0, s1, s2, s3, s4)
            col = offs_w * 5 + d
            if MASKED:
                xj = tl.load(x_row + col, mask=col < K, other=0.0).to(tl.float32)
            else:
                xj = tl.load(x_row + col).to(tl.float32)
            if GROUP_MODE == 2:
                sj = tl.load(s_ptr + rows[:, None] * stride_sn + (col // GROUP)[None, :], mask=(col < K)[None, :],
                             other=0.0)
                s = s * sj
            part = tl.fma(s, xj[None, :], part)
    else:
        a0, a1, a2, a3, a4 = _trits(((b & 0xFF) | MAGIC).to(tl.float32, bitcast=True), 8388608.0 + 121.0, 1.0)
        c0, c1, c2, c3, c4 = _trits(((b & 0xFF00) | MAGIC).to(tl.float32, bitcast=True), 8388608.0 + 121.0 * 256,
                                    256.0)
        for i in tl.static_range(5):
            if XMODE == 0:
                xa, xb = _x_pair(x_row, offs_w * 10 + 2 * i, KX, XMODE, MASKED)
            else:
                xa, xb = _x_pair(x_row, offs_w * 5 + i, KX, XMODE, MASKED)
            for hh in tl.static_range(2):
                c = 2 * i + hh
                if hh == 0:
                    xj = xa
                else:
                    xj = xb
                if c < 5:
                    s = _sel5(c, a0, a1, a2, a3, a4)
                else:
                    s = _sel5(c - 5, c0, c1, c2, c3, c4)
                    if c == 5:
                        xj = xj * (1.0 / 256)
                if GROUP_MODE == 2:
                    col = offs_w * 10 + c
                    sj = tl.load(s_ptr + rows[:, None] * stride_sn + (col // GROUP)[None, :],
                                 mask=(col < K)[None, :], other=0.0)
                    s = s * sj
                part = tl.fma(s, xj[None, :], part)
    return _close_tile(acc, part, s_ptr, rows, offs_w, wmask, stride_sn, 5 * TUNIT, GROUP, GROUP_MODE, MASKED)


# no integer argument is specialised: the row strides must not be (see below), and the shape ones need not be, so
# a model's layers share one compiled kernel per format
@triton.jit(do_not_specialize=["M", "N", "K", "KW", "KX", "stride_xm", "stride_qn", "stride_q2n", "stride_sn",
                               "stride_ym", "MAGIC", "MAGIC1"])
def _gemv_kernel(x_ptr, q_ptr, q2_ptr, s_ptr, b_ptr, y_ptr, M, N, K, KW, KX,
                 stride_xm, stride_qn, stride_q2n, stride_sn, stride_ym, MAGIC, MAGIC1,
                 FMT: tl.constexpr, CPW: tl.constexpr, LEVEL_SCALE: tl.constexpr, GROUP: tl.constexpr,
                 GROUP_MODE: tl.constexpr, XMODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, W: tl.constexpr, UNROLL: tl.constexpr):
    # -- one activation row, BLOCK_N outputs; each thread holds one word (byte for ternary) of all BLOCK_N rows ----
    # (the row strides are not specialised, so Triton keeps one 32-bit word per thread instead of a 16-byte vector:
    # each activation a thread converts then serves BLOCK_N weights)
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)  # clamped: the loads need no row mask, the store has one
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros((BLOCK_N, W), dtype=tl.float32)
    # words whose codes all lie inside K, in groups of UNROLL whole tiles: no masks, and the next tile's addresses are
    # the first's plus a constant (one address computation per row for UNROLL words)
    full = (K // CPW) // (UNROLL * W) * (UNROLL * W)
    for w0 in range(0, full, UNROLL * W):
        for u in tl.static_range(UNROLL):
            offs_w = w0 + u * W + tl.arange(0, W)
            if FMT == 15:
                acc = _ternary_tile(acc, x_row, q_ptr, s_ptr, rows, offs_w, K, KW, KX, stride_qn, stride_sn, MAGIC,
                                    GROUP, GROUP_MODE, XMODE, CPW // 5, False)
            else:
                acc = _word_tile(acc, x_row, q_ptr, q2_ptr, s_ptr, rows, offs_w, K, KW, KX, stride_qn, stride_q2n,
                                 stride_sn, MAGIC, MAGIC1, FMT, CPW, GROUP, GROUP_MODE, XMODE, False)
    for w0 in range(full, KW, W):
        offs_w = w0 + tl.arange(0, W)
        if FMT == 15:
            acc = _ternary_tile(acc, x_row, q_ptr, s_ptr, rows, offs_w, K, KW, KX, stride_qn, stride_sn, MAGIC,
                                GROUP, GROUP_MODE, XMODE, CPW // 5, True)
        else:
            acc = _word_tile(acc, x_row, q_ptr, q2_ptr, s_ptr, rows, offs_w, K, KW, KX, stride_qn, stride_q2n,
                             stride_sn, MAGIC, MAGIC1, FMT, CPW, GROUP, GROUP_MODE, XMODE, True)
    out = tl.sum(acc, axis=1) * LEVEL_SCALE
    if GROUP_MODE == 0:
        out = out * tl.load(s_ptr + rows * stride_sn)
    if HAS_BIAS:
        out += tl.load(b_ptr + rows).to(tl.float32)
    n_mask = offs_n < N
    tl.store(y_ptr + m * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)


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


#: (BLOCK_N, num_warps) of the GEMV path: a program covers BLOCK_N rows and 32·num_warps words (int16 / bytes for
#: ternary) per tile, one word of every row per thread
GEMV_CONFIG = (8, 4)
#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the tiled path. The per-column gathers hold one pointer
#: per tile element: 32x64x64 tiles spill on sm_80/sm_90 (checked by the AOT test), 16x32x64 tiles do not.
TILED_CONFIG = (16, 32, 64, 4, 2)
#: codes per 32-bit word (per byte for ternary) of each FMT, as the GEMV reads them
CODES_PER_WORD = {1: 32, 2: 16, 3: 16, 4: 8, 15: 5}
_MAGIC = 0x4B000000   # float32 bits of 2^23: | c gives 2^23 + c
_MAGIC1 = 0x3F800000  # float32 bits of 1.0


def kernel_path(m: int) -> str:
    return "gemv" if m <= GEMV_MAX_M else "tiled"


def _consts(bits: float, group_size: int, in_features: int) -> dict[str, Any]:
    from fxquant.paretoq import LEVELS, ParetoQSpec
    bits = ParetoQSpec(bits).bits
    lv = LEVELS[bits]
    return dict(FMT=FMT_CODES[bits], LA=lv.a, LB=lv.b, STEP=float(lv.step),
                GROUP=0 if group_size >= in_features else int(group_size))


def _gemv_consts(bits: float, group_size: int, in_features: int, ternary_unit: int = 2) -> dict[str, Any]:
    from fxquant.paretoq import LEVELS, ParetoQSpec
    bits = ParetoQSpec(bits).bits
    lv = LEVELS[bits]
    fmt = FMT_CODES[bits]
    cpw = CODES_PER_WORD[fmt] * (ternary_unit if fmt == FMT_CODES[1.58] else 1)
    group = 0 if group_size >= in_features else int(group_size)
    # 0: per channel (scale at the end), 1: groups of whole words (scale per word), 2: any other group (per code)
    mode = 0 if group == 0 else (1 if group % cpw == 0 else 2)
    # two tiles a step where registers allow (not the two-plane 3 bit, not per-group scales), and per-code groups
    # (the rare group sizes that split words) on 4 rows a program: their per-code scale pointers would spill
    unroll = 2 if mode == 0 and fmt != 3 else 1
    return dict(FMT=fmt, CPW=cpw, LEVEL_SCALE=float(lv.a * lv.step), GROUP=group, GROUP_MODE=mode, UNROLL=unroll,
                BLOCK_N=GEMV_CONFIG[0] if mode != 2 else 4)


def _norm_bits(bits: float) -> float:
    from fxquant.paretoq import ParetoQSpec
    return ParetoQSpec(bits).bits


def _as_words(plane: torch.Tensor) -> torch.Tensor:
    """A uint8 plane ``[N, B]`` as int32 words ``[N, ceil(B/4)]`` (a view when rows are whole words, else a padded
    copy: the ParetoQ layouts of LLM shapes, K a multiple of 32, are whole words)."""
    pad = (-plane.shape[1]) % 4
    if pad or plane.data_ptr() % 4:
        plane = torch.nn.functional.pad(plane, (0, pad)).contiguous()
    return plane.view(torch.int32)


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
    ``"gemv"`` or ``"tiled"`` (tests cover both); by default ``M ≤ GEMV_MAX_M`` (1) rows take the GEMV."""
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
        bn, warps = GEMV_CONFIG
        ternary = FMT_CODES[_norm_bits(bits)] == FMT_CODES[1.58]
        # ternary rows of an even byte count are read two bytes at a time (int16), others byte by byte
        unit = 2 if ternary and q.shape[1] % 2 == 0 and q.data_ptr() % 2 == 0 else 1
        gc = _gemv_consts(bits, group_size, in_features, unit)
        if ternary:
            qw = q2w = q if unit == 1 else q.view(torch.int16)
            kw = qw.shape[1]
        else:
            qw = _as_words(q)
            q2w = _as_words(q2) if len(planes) > 1 else qw
            kw = qw.shape[1]
        if ternary and unit == 1:
            xk, xmode = x2, 3
        elif x2.dtype == torch.float32:
            xk, xmode = x2, 0
        else:
            if x2.dtype not in (torch.float16, torch.bfloat16):
                raise ValueError(f"the ParetoQ GEMV takes fp32/fp16/bf16 activations, got {x2.dtype}")
            xk = x2 if k % 2 == 0 and x2.stride(0) % 2 == 0 else torch.nn.functional.pad(x2, (0, k % 2))
            if xk.data_ptr() % 4:
                xk = xk.clone()
            xk, xmode = xk.contiguous().view(torch.int32), 1 if x2.dtype == torch.float16 else 2
        kx = xk.shape[1]
        _gemv_kernel[(triton.cdiv(n, gc["BLOCK_N"]), m)](
            xk, qw, q2w, scale, b, y, m, n, k, kw, kx, xk.stride(0), qw.stride(0), q2w.stride(0), scale.stride(0),
            y.stride(0), _MAGIC, _MAGIC1, **gc, XMODE=xmode, HAS_BIAS=bias is not None, W=32 * warps,
            num_warps=warps, num_stages=1)
    else:
        bm, bn, bk, warps, stages = TILED_CONFIG
        dot_ieee = x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16)
        _tiled_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](*args, **consts, HAS_BIAS=bias is not None,
                                                                DOT_IEEE=dot_ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                                                num_warps=warps, num_stages=stages)
    return y.reshape(*lead, n)


# ---- ahead-of-time compilation (no GPU needed): reuses triton_int's helper -------------------------------------------
def aot_variants() -> list:
    """One specialisation per distinct unpack path, fp16 activations: the GEMV of every width per channel (ternary
    both two bytes and one byte at a time), 2 bit with groups of 128 (a scale per word) and of 24 (per code); the
    tiled GEMM for 2 and 3 bit (groups of 128)."""
    from .triton_int import KernelVariant

    sig = {"x_ptr": "*fp16", "q_ptr": "*u8", "q2_ptr": "*u8", "s_ptr": "*fp32", "b_ptr": "*fp16", "y_ptr": "*fp16",
           "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_qn": "i32", "stride_q2n": "i32",
           "stride_sn": "i32", "stride_ym": "i32"}
    gsig = {"x_ptr": "*i32", "q_ptr": "*i32", "q2_ptr": "*i32", "s_ptr": "*fp32", "b_ptr": "*fp16", "y_ptr": "*fp16",
            "M": "i32", "N": "i32", "K": "i32", "KW": "i32", "KX": "i32", "stride_xm": "i32", "stride_qn": "i32",
            "stride_q2n": "i32", "stride_sn": "i32", "stride_ym": "i32", "MAGIC": "i32", "MAGIC1": "i32"}
    bn, warps = GEMV_CONFIG
    out = []
    for label, bits, group, unit in (("w1_gemv_perchan", 1, 4096, 1), ("w1_58_gemv_perchan", 1.58, 4096, 2),
                                     ("w1_58_gemv_bytes_perchan", 1.58, 4096, 1),
                                     ("w2_gemv_perchan", 2, 4096, 1), ("w2_gemv_g128", 2, 128, 1),
                                     ("w2_gemv_g24", 2, 24, 1),
                                     ("w3_gemv_perchan", 3, 4096, 1), ("w4_gemv_perchan", 4, 4096, 1)):
        gc = _gemv_consts(bits, group, 4096, unit)
        s_ = dict(gsig)
        xmode = 1
        if gc["FMT"] == FMT_CODES[1.58]:
            s_.update(q_ptr="*i16", q2_ptr="*i16") if unit == 2 else s_.update(x_ptr="*fp16", q_ptr="*u8",
                                                                                q2_ptr="*u8")
            xmode = 1 if unit == 2 else 3
        consts = dict(gc, XMODE=xmode, HAS_BIAS=False, W=32 * warps)
        out.append(KernelVariant(f"pq_{label}", _gemv_kernel, s_, consts, warps, 1, False))
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
