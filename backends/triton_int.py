"""Triton kernels for weight-only integer GEMM: ``y = x @ dequant(W)^T (+ bias)`` with int8 or packed int4 ``W``.

What this module computes, and why it is shaped this way
========================================================

A quantized linear reads its weight once per call. In decode (``M`` = 1 to a few rows) the product is bound by
memory: the time is the bytes of ``W`` over the memory bandwidth, so int8 weights can be up to 2x and int4
weights up to 4x faster than fp16 ones. In prefill (``M`` large) the product is bound by arithmetic and the
dequantized tile must feed the tensor cores (``tl.dot``). Two kernels:

* :func:`_wq_gemv_words_kernel` — the **word GEMV** for ``M == 1`` whenever the packed rows are whole 32-bit
  words (K a multiple of 8 codes for int4, 4 for int8) and groups are whole words: codes become floats by their
  bit pattern, no int->float conversion (see the comment above the kernel). Everything else goes to
* :func:`_wq_linear_kernel`, whose compile-time parameters pick the path:

* ``BLOCK_M == 1`` — **GEMV** for ``M == 1`` (odd K, odd group widths): each program owns ``BLOCK_N`` output
  channels, streams their packed weights along ``K`` and reduces ``w * x`` with plain FMAs;
* ``BLOCK_M >= 16`` with ``SPLIT_K > 1`` — **skinny / split-K** for ``2 <= M <= 16``: few output tiles exist,
  so ``K`` is cut into ``SPLIT_K`` slices that run as separate programs and add into ``y`` atomically;
* ``BLOCK_M >= 16``, ``SPLIT_K == 1`` — the **tiled GEMM** for larger ``M``: classic ``tl.dot`` tiles with
  grouped ("super-grouped") program ordering for L2 reuse, as in Triton's matmul tutorial.

The numerics are fxquant's one integer numerics (:mod:`fxquant.quant`): a weight element dequantizes to
``float32(code - zero) * scale`` with a float32 ``scale``: one exact integer, one float32 multiply, a single
rounding — which :func:`_dequant` reproduces bit for bit (:func:`dequantize` writes those values out so a test
can compare them with :meth:`QuantizedWeight.dequantize`). Where the scale is constant over a ``BLOCK_K`` slice
(per-channel, or a group width that is a multiple of ``BLOCK_K``), the GEMV path multiplies the partial sum by
the scale instead of every element — the same real number, one rounding fewer per element, and half the ALU work
(decode on an H100 has only ~5 simple operations per int4 element to spare before ALU, not memory, limits it).

Packed layouts (made once by :mod:`fxquant.backends.reference`, read here):

* int8: ``qweight`` int8 ``[N, K]``; asymmetric codes are stored shifted by -128 (with zero points shifted the
  same way) so that one signed kernel serves both;
* int4: ``qweight`` uint8 ``[N, ceil(K / 2)]``, column ``k`` in byte ``k // 2``, even ``k`` in the low nibble;
  nibbles are unsigned (``code + 8`` when symmetric, so the implicit zero point is 8);
* ``scale`` float32 ``[N, n_groups]`` and ``zero`` int32 ``[N, n_groups]`` (asymmetric only); group ``g``
  covers columns ``g * GROUP .. min((g + 1) * GROUP, K) - 1``: the last group may be shorter, which needs no
  special case because a ``BLOCK_K`` slice never straddles a group boundary when ``GROUP % BLOCK_K == 0``, and
  the general path indexes the group of every column.

This module imports Triton at import time; fxquant imports it lazily (only when a CUDA kernel runs, a test
asks for it, or the benchmark runs), so ``import fxquant`` stays cheap and works without Triton.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["wq_linear", "dequantize", "INTERPRET", "KernelVariant", "aot_variants", "SKINNY_CONFIGS",
           "GEMV_CONFIGS", "TILED_CONFIGS", "m_bucket",
           "last_kernel_resources", "aot_compile", "aot_report"]

#: True when kernels run under ``TRITON_INTERPRET=1`` (CPU tests): autotuning is skipped there, since the
#: interpreter would run every config at interpreter speed and timings mean nothing.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_codes(q_ptr, offs_n, n_mask, k0, K, stride_qn, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Load the integer codes of a ``[BLOCK_N, BLOCK_K]`` weight tile starting at column ``k0`` as int32."""
    if BITS == 8:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ptrs = q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :]
        q = tl.load(ptrs, mask=n_mask[:, None] & (offs_k[None, :] < K), other=0).to(tl.int32)
    else:
        # int4: BLOCK_K columns live in BLOCK_K // 2 contiguous bytes; load the bytes (coalesced, vectorisable),
        # split each into its low nibble (even column) and high nibble (odd column), and interleave the two
        # halves back into column order. The bytes are uint8, so the shifts need no sign masking.
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        ptrs = q_ptr + offs_n[:, None] * stride_qn + offs_b[None, :]
        b = tl.load(ptrs, mask=n_mask[:, None] & (offs_b[None, :] < (K + 1) // 2), other=0).to(tl.int32)
        q = tl.interleave(b & 0xF, b >> 4)
    return q


@triton.jit
def _group_params(s_ptr, z_ptr, offs_n, n_mask, k0, K, stride_sn,
                  HAS_ZERO: tl.constexpr, SYM_ZERO: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Scale and zero point for the tile at column ``k0``: ``[BLOCK_N, 1]`` when they are constant over the
    slice (per-channel, ``GROUP == 0``, or ``GROUP % BLOCK_K == 0``), else ``[BLOCK_N, BLOCK_K]`` (one group
    index per column, which is what makes an odd group width or a short last group exact)."""
    if GROUP == 0:
        s = tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)[:, None]
        if HAS_ZERO:
            z = tl.load(z_ptr + offs_n * stride_sn, mask=n_mask, other=0)[:, None]
        else:
            z = tl.full((1, 1), SYM_ZERO, tl.int32)
    elif GROUP % BLOCK_K == 0:
        g = k0 // GROUP
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0)[:, None]
        if HAS_ZERO:
            z = tl.load(z_ptr + offs_n * stride_sn + g, mask=n_mask, other=0)[:, None]
        else:
            z = tl.full((1, 1), SYM_ZERO, tl.int32)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        g = offs_k // GROUP
        mask = n_mask[:, None] & (offs_k[None, :] < K)
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=mask, other=0.0)
        if HAS_ZERO:
            z = tl.load(z_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=mask, other=0)
        else:
            z = tl.full((1, 1), SYM_ZERO, tl.int32)
    return s, z


@triton.jit
def _column_params(s_ptr, z_ptr, offs_n, n_mask, cols, K, stride_sn,
                   HAS_ZERO: tl.constexpr, SYM_ZERO: tl.constexpr, GROUP: tl.constexpr):
    """Scale and zero point ``[BLOCK_N, len(cols)]`` of arbitrary columns (the group of each column)."""
    g = cols // GROUP
    mask = n_mask[:, None] & (cols[None, :] < K)
    s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=mask, other=0.0)
    if HAS_ZERO:
        z = tl.load(z_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=mask, other=0)
    else:
        z = tl.full((1, 1), SYM_ZERO, tl.int32)
    return s, z


@triton.jit
def _dequant(q, s, z):
    """fxquant's one dequantization: ``float32(code - zero) * scale`` (an exact integer times a float32)."""
    return (q - z).to(tl.float32) * s


# ---------------------------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M_BUCKET"])
def _wq_linear_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_sn, stride_ym,
    M_BUCKET,  # only part of the autotuning key (powers of two), never read by the kernel
    BITS: tl.constexpr, HAS_ZERO: tl.constexpr, SYM_ZERO: tl.constexpr, GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # -- which output tile and which K slice this program owns ---------------------------------------------------
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering (Triton's matmul tutorial): GROUP_M row-tiles share the same column tiles of W while
    # they are hot in L2, instead of sweeping all of W once per row-tile.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    # Split-K: slice K into SPLIT_K ranges of whole BLOCK_K steps; the programs of one tile add atomically.
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_begin = pid_k * tiles_per_split * BLOCK_K
    k_end = min(k_begin + tiles_per_split * BLOCK_K, K)

    if BLOCK_M == 1:
        # -- GEMV: one activation row, FMAs and a row reduction ---------------------------------------------------
        SCALE_PER_SLICE: tl.constexpr = (GROUP == 0) or (GROUP % BLOCK_K == 0)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        x_row = x_ptr + pid_m * stride_xm
        for k0 in range(k_begin, k_end, BLOCK_K):
            if BITS == 4:
                # int4: keep the packed bytes as they are and split x instead. The low nibbles pair with the
                # even columns of x, the high nibbles with the odd ones: no interleave (a register shuffle that
                # costs more than the FMAs it feeds), and x's strided loads hit L1.
                offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                b = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_b[None, :],
                            mask=n_mask[:, None] & (offs_b[None, :] < (K + 1) // 2), other=0).to(tl.int32)
                k_even = 2 * offs_b
                x_even = tl.load(x_row + k_even, mask=k_even < K, other=0.0).to(tl.float32)
                x_odd = tl.load(x_row + k_even + 1, mask=k_even + 1 < K, other=0.0).to(tl.float32)
                lo = b & 0xF
                hi = b >> 4
                if SCALE_PER_SLICE:
                    s, z = _group_params(s_ptr, z_ptr, offs_n, n_mask, k0, K, stride_sn, HAS_ZERO, SYM_ZERO,
                                         GROUP, BLOCK_K)
                    part = tl.sum((lo - z).to(tl.float32) * x_even[None, :] + (hi - z).to(tl.float32) * x_odd[None, :],
                                  axis=1)
                    acc += part * tl.reshape(s, (BLOCK_N,))
                else:
                    s_e, z_e = _column_params(s_ptr, z_ptr, offs_n, n_mask, k_even, K, stride_sn, HAS_ZERO, SYM_ZERO,
                                              GROUP)
                    s_o, z_o = _column_params(s_ptr, z_ptr, offs_n, n_mask, k_even + 1, K, stride_sn, HAS_ZERO,
                                              SYM_ZERO, GROUP)
                    acc += tl.sum(_dequant(lo, s_e, z_e) * x_even[None, :] + _dequant(hi, s_o, z_o) * x_odd[None, :],
                                  axis=1)
            else:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                q = _load_codes(q_ptr, offs_n, n_mask, k0, K, stride_qn, BITS, BLOCK_K)
                s, z = _group_params(s_ptr, z_ptr, offs_n, n_mask, k0, K, stride_sn, HAS_ZERO, SYM_ZERO, GROUP,
                                     BLOCK_K)
                if SCALE_PER_SLICE:
                    # scale constant over the slice: sum (code - zero) * x first, scale the partial sum once
                    part = tl.sum((q - z).to(tl.float32) * x[None, :], axis=1)
                    acc += part * tl.reshape(s, (BLOCK_N,))
                else:
                    acc += tl.sum(_dequant(q, s, z) * x[None, :], axis=1)
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y_ptrs = y_ptr + pid_m * stride_ym + offs_n
        if SPLIT_K == 1:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_mask)
        else:
            tl.atomic_add(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_mask, sem="relaxed")
    else:
        # -- tiles: dequantize a [BLOCK_N, BLOCK_K] tile into registers, feed the tensor cores -------------------
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
            q = _load_codes(q_ptr, offs_n, n_mask, k0, K, stride_qn, BITS, BLOCK_K)
            s, z = _group_params(s_ptr, z_ptr, offs_n, n_mask, k0, K, stride_sn, HAS_ZERO, SYM_ZERO, GROUP, BLOCK_K)
            # the dequantized weight, rounded to the activation dtype exactly as the eager model stores it
            w = _dequant(q, s, z).to(x.dtype)
            if DOT_IEEE:
                # fp32 activations (and bf16 under the interpreter, whose bf16 dot is broken): exact fp32 products
                # of the already-rounded operands, no tf32
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        y_mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT_K == 1:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
        else:
            tl.atomic_add(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask, sem="relaxed")


# ---------------------------------------------------------------------------------------------------------------
# Decode GEMV on 32-bit words (M == 1): the fast path
# ---------------------------------------------------------------------------------------------------------------
# Why a second GEMV. Decode is bound by the weight bytes only if the per-weight ALU work is small: an H100 SM does
# 128 FP32 FMA/ADD, 64 integer shift/logic and only 16 *type conversions* per clock, so a single int -> float
# conversion per weight (``.to(tl.float32)`` on a code) costs more than reading an int4 weight. This kernel
#
# * loads the packed weight as int32 words, one word per thread and row per step (32-bit loads, coalesced across
#   the warp; 16-byte loads would put the x values of a code in another layout than the words, i.e. a shuffle
#   through shared memory with a barrier for every code), and requests the next step's words (and group scales)
#   before this step's arithmetic (a hand-made software pipeline: Triton pipelines only loads that feed tl.dot),
# * turns a code into a float with one LOP3 and one FADD, no conversion: the code's field at bit ``p`` OR'ed
#   into the bits of 2^23 reads as ``2^23 + u·2^p`` exactly, so one FADD leaves ``(u - offset)·2^p``; the
#   ``2^-p`` is folded into x (exact, once per x value, shared by the thread's rows). Codes at bit positions
#   0..16 (int4) or 0..8 (int8) take the word as it is, the others the word shifted once,
# * subtracts asymmetric zero points once per word (``zero · Σx`` over the word's columns),
# * accumulates in a ``[BLOCK_N, BLOCK_W]`` float32 tile, reduced across threads once after the loop, and
# * applies a per-channel scale once at the end, a group scale once per word (a word never straddles a group).
#
# Per int4 weight: 1 LOP3 + 1 FADD + 1 FFMA (+ 1/8 SHF); 4.4 SASS instructions per weight in the sm_90 main loop
# (per channel), against ~8 with an int->float conversion (16 per clock per SM on Hopper) before.
# The numerics are the same real number as :func:`_dequant` times ``x``: ``u - zero`` is exact, the product and
# the sum are float32 (summed in another order than the other paths: within float tolerance, as any GEMM).
@triton.jit
def _code_value(words, wshift, magic, j: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr):
    """``(u_j - OFFSET) · 2^P`` as float32 (exact) for code ``j`` of each word, where ``P`` is the code's bit position
    in ``words`` or in ``wshift`` (the word shifted right by 16 (int8) or 12 (int4) bits, which holds the codes
    that would reach the exponent field in place): ``bitcast(field | 0x4B000000) = 2^23 + u·2^P`` exactly.
    ``magic`` is 0x4B000000 passed as a kernel argument: as a register it is shared by every code, where a
    constant would be rebuilt next to each use (the masks are the logic ops' immediates)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if BITS == 4:
        P: tl.constexpr = 4 * j if j <= 4 else 4 * j - 12
    else:
        P: tl.constexpr = 8 * j if j <= 1 else 8 * j - 16
    if (BITS == 4 and j <= 4) or (BITS == 8 and j <= 1):
        v = words
    else:
        v = wshift
    BASE: tl.constexpr = 8388608.0 + OFFSET * float(1 << P)
    f = ((v & (MASK << P)) | magic).to(tl.float32, bitcast=True)
    return f - BASE


@triton.jit
def _x_for_code(xj, j: tl.constexpr, BITS: tl.constexpr):
    """``x · 2^-P`` for code ``j`` (``P`` as in :func:`_code_value`): exact, a power of two."""
    if BITS == 4:
        P: tl.constexpr = 4 * j if j <= 4 else 4 * j - 12
    else:
        P: tl.constexpr = 8 * j if j <= 1 else 8 * j - 16
    return xj * (1.0 / (1 << P))


@triton.jit
def _word_step(acc, words, s, z, x_ptrs, z_row, offs_w, w_end, magic,
               BITS: tl.constexpr, HAS_ZERO: tl.constexpr, SYM_ZERO: tl.constexpr, GROUP: tl.constexpr,
               MASKED: tl.constexpr):
    """One ``BLOCK_W``-word step of the word GEMV on loaded ``words`` (and, with groups, their loaded scales ``s``
    and zero points ``z``): ``acc += (codes - zero) * x`` (times the group scale). ``MASKED``: the partial last
    step (words past ``w_end`` were loaded as 0; x is masked here)."""
    CPW: tl.constexpr = 32 // BITS
    # int8 words: flip each byte's sign bit once per word, so byte j holds the unsigned ``code + 128``
    FLIP: tl.constexpr = -2139062144 if BITS == 8 else 0     # 0x80808080 as an int32
    SHIFT: tl.constexpr = 16 if BITS == 8 else 12
    # what each code value is taken relative to: the symmetric zero point (int4: 8) and the int8 flip (128);
    # asymmetric zero points are subtracted once per word below, through the word's sum of x
    OFFSET: tl.constexpr = (128 if BITS == 8 else 0) + (0 if HAS_ZERO else SYM_ZERO)
    if MASKED:
        w_mask = offs_w < w_end
    if BITS == 8:
        words = words ^ FLIP
    wshift = words >> SHIFT
    # per channel without zero points: straight into acc; else a per-word partial sum, corrected and scaled once
    DIRECT: tl.constexpr = (GROUP == 0) and (not HAS_ZERO)
    if DIRECT:
        part = acc
    else:
        part = tl.zeros(acc.shape, dtype=tl.float32)
    xsum = tl.zeros((acc.shape[1],), dtype=tl.float32)
    for j in tl.static_range(CPW):
        if MASKED:
            xj = tl.load(x_ptrs + j, mask=w_mask, other=0.0).to(tl.float32)
        else:
            xj = tl.load(x_ptrs + j).to(tl.float32)
        # the code's value carries 2^P (its bit position); x carries 2^-P (exact, and shared by the rows)
        part += _code_value(words, wshift, magic, j, BITS, OFFSET) * _x_for_code(xj, j, BITS)[None, :]
        if HAS_ZERO:
            xsum += xj
    if HAS_ZERO:
        if GROUP == 0:
            part -= z_row * xsum[None, :]
        else:
            part -= z.to(tl.float32) * xsum[None, :]
    if DIRECT:
        acc = part
    elif GROUP == 0:
        acc += part
    else:
        acc += part * s
    return acc


@triton.jit
def _group_tiles(s_ptr, z_ptr, rows, offs_w, w_end, stride_sn, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                 GROUP: tl.constexpr, MASK):
    """Scales and zero points ``[BLOCK_N, BLOCK_W]`` of the words at ``offs_w`` (GROUP > 0; else dummies). Words
    past ``w_end`` take the last word's group: their codes and x are zero, but a scale read past the row could be
    anything, NaN included. ``MASK`` (a prefetch past the last step) leaves the values undefined and unused."""
    CPW: tl.constexpr = 32 // BITS
    if GROUP == 0:
        s = 0.0
        z = 0
    else:
        g = (tl.minimum(offs_w, w_end - 1) * CPW) // GROUP
        ptrs = rows[:, None] * stride_sn + g[None, :]
        s = tl.load(s_ptr + ptrs, mask=MASK)
        if HAS_ZERO:
            z = tl.load(z_ptr + ptrs, mask=MASK)
        else:
            z = 0
    return s, z


@triton.jit
def _wq_gemv_words_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    N, KW, stride_wn, stride_sn, magic,
    BITS: tl.constexpr, HAS_ZERO: tl.constexpr, SYM_ZERO: tl.constexpr, GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr,
):
    CPW: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    # rows past the edge read a valid duplicate row (no mask in the loop); their results are not stored
    rows = offs_n % N
    w_tiles = tl.cdiv(KW, BLOCK_W)
    per_split = tl.cdiv(w_tiles, SPLIT_K) * BLOCK_W
    w_begin = pid_k * per_split
    w_end = min(w_begin + per_split, KW)
    n_full = tl.maximum(w_end - w_begin, 0) // BLOCK_W
    if HAS_ZERO and GROUP == 0:
        z_row = tl.load(z_ptr + rows * stride_sn).to(tl.float32)[:, None]
    else:
        z_row = 0.0
    # one word per thread per step along K (32-bit loads, coalesced across the warp): the x values of a code,
    # 8 (int4) or 4 (int8) columns apart, then land in the same layout as the words; 16-byte word loads would
    # need x shuffled through shared memory, with a barrier, for every code of every step
    offs_w = w_begin + tl.max_contiguous(tl.arange(0, BLOCK_W), 1)
    w_ptrs = w_ptr + rows[:, None] * stride_wn + offs_w[None, :]
    x_ptrs = x_ptr + offs_w * CPW
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    # software pipelining by hand (Triton's pipeliner leaves loads that feed no tl.dot alone): the next step's
    # words (and group scales) are requested before this step's arithmetic, so a program always has loads in
    # flight. The masks are one value per step; a masked-off prefetch leaves registers undefined and unused.
    ones = tl.full((1, BLOCK_W), 1, tl.int32)
    words = tl.load(w_ptrs, mask=ones <= n_full)
    s, z = _group_tiles(s_ptr, z_ptr, rows, offs_w, w_end, stride_sn, BITS, HAS_ZERO, GROUP, ones <= n_full)
    for it in range(n_full):
        more = ones + it < n_full
        words_next = tl.load(w_ptrs + BLOCK_W, mask=more)
        s_next, z_next = _group_tiles(s_ptr, z_ptr, rows, offs_w + BLOCK_W, w_end, stride_sn, BITS, HAS_ZERO,
                                      GROUP, more)
        acc = _word_step(acc, words, s, z, x_ptrs, z_row, offs_w, w_end, magic, BITS, HAS_ZERO, SYM_ZERO, GROUP,
                         False)
        words = words_next
        s = s_next
        z = z_next
        w_ptrs += BLOCK_W
        x_ptrs += BLOCK_W * CPW
        offs_w += BLOCK_W
    if w_begin + n_full * BLOCK_W < w_end:   # the partial last step
        tail = (offs_w < w_end)[None, :]
        words = tl.load(w_ptrs, mask=tail, other=0)
        s, z = _group_tiles(s_ptr, z_ptr, rows, offs_w, w_end, stride_sn, BITS, HAS_ZERO, GROUP, tail)
        acc = _word_step(acc, words, s, z, x_ptrs, z_row, offs_w, w_end, magic, BITS, HAS_ZERO, SYM_ZERO, GROUP,
                         True)
    y = tl.sum(acc, axis=1)
    if GROUP == 0:
        y = y * tl.load(s_ptr + rows * stride_sn)
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(b_ptr + rows).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask, sem="relaxed")


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, z_ptr, w_ptr, N, K, stride_qn, stride_sn, stride_wn,
                    BITS: tl.constexpr, HAS_ZERO: tl.constexpr, SYM_ZERO: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Write the dequantized weight with the very helpers the GEMM uses: the bit-exactness witness."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    q = _load_codes(q_ptr, offs_n, n_mask, k0, K, stride_qn, BITS, BLOCK_K)
    s, z = _group_params(s_ptr, z_ptr, offs_n, n_mask, k0, K, stride_sn, HAS_ZERO, SYM_ZERO, GROUP, BLOCK_K)
    w = _dequant(q, s, z)
    tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=n_mask[:, None] & (offs_k[None, :] < K))


# ---------------------------------------------------------------------------------------------------------------
# Configurations and autotuning
# ---------------------------------------------------------------------------------------------------------------
def _zero_output(nargs: dict[str, Any]) -> None:
    """Split-K programs add into ``y``: it must start at zero (only configs with SPLIT_K > 1 pay this memset)."""
    nargs["y_ptr"].zero_()


def _cfg(bm: int, bn: int, bk: int, split: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages, pre_hook=_zero_output if split > 1 else None)


# Every config below compiles without register spills for sm_80 and sm_90 in every scale layout (checked with
# cuobjdump; the AOT test re-checks the representative variants). Each set keeps a SPLIT_K == 1 config, which
# bf16 outputs need (no bf16 atomics before sm_90).
#: M == 1: narrow row blocks and long K slices keep many loads in flight on every SM.
GEMV_CONFIGS = [
    _cfg(1, 4, 512, 1, 2, 3), _cfg(1, 8, 256, 1, 4, 3), _cfg(1, 16, 256, 1, 4, 3), _cfg(1, 4, 1024, 1, 4, 3),
    _cfg(1, 16, 512, 1, 8, 3), _cfg(1, 8, 256, 2, 4, 3), _cfg(1, 16, 128, 4, 4, 3),
]
#: 2 <= M <= 16: one 16-row tile, split-K for parallelism across the SMs.
SKINNY_CONFIGS = [
    _cfg(16, 32, 128, 2, 4, 4), _cfg(16, 64, 64, 4, 4, 4), _cfg(16, 32, 64, 4, 4, 4), _cfg(16, 64, 64, 1, 4, 4),
]
#: M > 16: tensor-core tiles (shapes from Triton's matmul tutorial, trimmed to those that do not spill).
TILED_CONFIGS = [
    _cfg(64, 64, 64, 1, 8, 4), _cfg(64, 128, 64, 1, 8, 4), _cfg(128, 128, 32, 1, 8, 4), _cfg(64, 256, 32, 1, 8, 4),
]


def _wcfg(bn: int, bw: int, split: int, warps: int, stages: int = 1) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_W": bw, "SPLIT_K": split}, num_warps=warps, num_stages=stages,
                         pre_hook=_zero_output if split > 1 else None)


#: M == 1 on 32-bit words: BLOCK_W = a multiple of 32 lanes x warps, BLOCK_N rows per thread sharing each x value.
#: Decode here is bound by the loads in flight, not by bandwidth or arithmetic: small programs (many of them, few
#: registers each) won on the H100 (examples/results/word_gemv_nvidia-h100-80gb-hbm3.md); autotuning picks per shape.
WORD_GEMV_CONFIGS = [
    _wcfg(2, 128, 1, 1), _wcfg(4, 128, 1, 4), _wcfg(8, 128, 1, 4), _wcfg(4, 64, 1, 2), _wcfg(8, 256, 1, 8),
    _wcfg(8, 64, 1, 2), _wcfg(8, 64, 2, 2),
]


def _word_prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """bf16 outputs cannot take split-K (no bf16 atomics before sm_90); a split needs words to split; group-wise
    zero points (a prefetched scale and zero per word) keep to 16 words per thread, which spill on sm_80."""
    y = named_args["y_ptr"]
    kw = named_args["KW"]
    heavy = kwargs.get("GROUP", 0) != 0 and kwargs.get("HAS_ZERO", False)
    kept = [c for c in configs if c.kwargs["SPLIT_K"] == 1 or
            (y.dtype != torch.bfloat16 and kw >= 2 * c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_W"])]
    kept = [c for c in kept if not heavy or
            c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_W"] <= 16 * 32 * c.num_warps]
    return kept or [configs[0]]


def word_gemv_eligible(qweight: torch.Tensor, *, bits: int, in_features: int, group_size: int) -> bool:
    """Whether the word GEMV can read ``qweight`` as int32 words: whole words per row (K a multiple of 8 codes
    for int4, 4 for int8), rows and base 4-byte aligned, and groups made of whole words."""
    cpw = 32 // bits
    k = in_features
    group = 0 if group_size >= k else group_size
    return (qweight.is_contiguous() and k % cpw == 0 and qweight.stride(0) % 4 == 0
            and qweight.data_ptr() % 16 == 0 and (group == 0 or group % cpw == 0))


def m_bucket(m: int) -> int:
    """Autotuning bucket of the row count: 1, 2, 4, ..., capped at 4096 (one tuning per bucket, not per M)."""
    return 1 if m <= 1 else min(4096, 1 << (m - 1).bit_length())


def _prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """Drop configs that cannot run, or cannot be fast, for these arguments.

    * a K slice that straddles group boundaries falls back to per-column group indexing: keep only
      ``GROUP % BLOCK_K == 0`` configs when some exist;
    * split-K adds atomically in the output dtype; bf16 atomics need sm_90, so bf16 outputs skip split-K
      (fp16 and fp32 atomics exist on every GPU Triton targets);
    * a split of K into more slices than ``BLOCK_K`` steps would leave programs idle.
    """
    group = kwargs.get("GROUP", named_args.get("GROUP", 0))
    k = named_args["K"]
    y = named_args["y_ptr"]
    kept = [c for c in configs if group == 0 or group % c.kwargs["BLOCK_K"] == 0]
    if not kept:
        # per-column group indices hold a scale (and zero) per weight element: only tiles of at most 64 x 64
        # stay free of register spills on sm_80/sm_90 (checked with cuobjdump)
        kept = [c for c in configs if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 64 * 64 or c.kwargs["BLOCK_M"] == 1]
        kept = kept or list(configs)
    if y.dtype == torch.bfloat16:
        kept = [c for c in kept if c.kwargs["SPLIT_K"] == 1] or kept
    kept = [c for c in kept if c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_K"] <= max(k, c.kwargs["BLOCK_K"])] or kept
    return kept


def autotune(configs: list, key: list[str], **kwargs: Any):
    """``triton.autotune`` that keeps its choice per key on disk (in Triton's cache directory) where this Triton
    supports it, so each shape is timed once per machine rather than once per process (a decode step of a
    compiled model otherwise re-times every linear's shape in every new process). ``FXQUANT_AUTOTUNE_CACHE=0``
    turns the disk cache off; Triton itself never caches under ``TRITON_INTERPRET=1``."""
    if os.environ.get("FXQUANT_AUTOTUNE_CACHE", "1") != "0" and _AUTOTUNE_CAN_CACHE:
        kwargs.setdefault("cache_results", True)
    return triton.autotune(configs, key=key, **kwargs)


_AUTOTUNE_CAN_CACHE = "cache_results" in inspect.signature(triton.autotune).parameters


_KEY = ["M_BUCKET", "N", "K", "GROUP", "BITS", "HAS_ZERO"]
_word_gemv = autotune(WORD_GEMV_CONFIGS, key=["N", "KW", "GROUP", "BITS", "HAS_ZERO"],
                             prune_configs_by={"early_config_prune": _word_prune})(_wq_gemv_words_kernel)
_gemv = autotune(GEMV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(_wq_linear_kernel)
_skinny = autotune(SKINNY_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(_wq_linear_kernel)
_tiled = autotune(TILED_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(_wq_linear_kernel)


def _configs_for(m: int) -> tuple[Any, list[triton.Config]]:
    if m == 1:
        return _gemv, GEMV_CONFIGS
    if m <= 16:
        return _skinny, SKINNY_CONFIGS
    return _tiled, TILED_CONFIGS


# ---------------------------------------------------------------------------------------------------------------
# Host wrappers
# ---------------------------------------------------------------------------------------------------------------
def wq_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
              bias: torch.Tensor | None, *, bits: int, out_features: int, in_features: int, group_size: int,
              config: triton.Config | None = None) -> torch.Tensor:
    """``x[..., K] @ dequant(W)^T (+ bias)`` in ``x.dtype`` with a Triton kernel (CUDA, or the interpreter).

    ``group_size`` is the effective group width (``in_features`` for per-channel). ``config`` forces one
    configuration (tests use it to cover every code path under the interpreter); otherwise the row count
    picks the GEMV, split-K or tiled config set and ``triton.autotune`` picks within it, keyed on
    (M bucket, N, K, group, bits, zero points) and the dtypes.
    """
    if bits not in (4, 8):
        raise ValueError(f"wq_linear supports 4- and 8-bit weights, got {bits}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    n, k = out_features, in_features
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return y.reshape(*lead, n)
    group = 0 if group_size >= k else group_size
    has_zero = zero is not None
    args = (x2, qweight, scale, zero if has_zero else scale, bias if bias is not None else scale, y,
            m, n, k, x2.stride(0), qweight.stride(0), scale.stride(0), y.stride(0), m_bucket(m))
    consts = dict(BITS=bits, HAS_ZERO=has_zero, SYM_ZERO=8 if bits == 4 else 0, GROUP=group,
                  HAS_BIAS=bias is not None,
                  DOT_IEEE=x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16))
    word_path = m == 1 and (config is None or "BLOCK_W" in config.kwargs) and word_gemv_eligible(
        qweight, bits=bits, in_features=k, group_size=group_size)
    if word_path:
        _word_gemv_launch(x2, qweight, scale, zero, bias, y, n, k, bits, group, config)
        return y.reshape(*lead, n)
    if config is not None and "BLOCK_W" in config.kwargs:
        raise ValueError("a word-GEMV config was given for a call the word GEMV cannot take "
                         "(M > 1, K not a whole number of words, or groups that split a word)")
    tuner, configs = _configs_for(m)
    if config is None and INTERPRET:
        # the interpreter: no timing, take the first config that the pruning keeps
        named = dict(zip(tuner.arg_names, args))
        config = _prune(configs, named, **consts)[0]
    if config is not None:
        kw = dict(config.kwargs)
        grid = (triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(n, kw["BLOCK_N"]), kw["SPLIT_K"])
        if kw["SPLIT_K"] > 1:
            y.zero_()
        _wq_linear_kernel[grid](*args, **consts, **kw, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        def grid(meta: dict[str, Any]) -> tuple[int, int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
        tuner[grid](*args, **consts)
        config = tuner.best_config
    _LAST_LAUNCH.clear()
    _LAST_LAUNCH.update(args=args, consts=consts, config=config, m=m, n=n, kernel=_wq_linear_kernel)
    return y.reshape(*lead, n)


_LAST_LAUNCH: dict[str, Any] = {}


#: 0x4B000000: the float32 bit pattern of 2^23 (see :func:`_code_value`)
_MAGIC = 0x4B000000


def _word_gemv_launch(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      bias: torch.Tensor | None, y: torch.Tensor, n: int, k: int, bits: int, group: int,
                      config: triton.Config | None) -> None:
    """Launch :func:`_wq_gemv_words_kernel` for one row ``x2 [1, K]`` into ``y [1, N]``."""
    words = qweight.view(torch.int32)
    kw = k * bits // 32
    has_zero = zero is not None
    args = (x2, words, scale, zero if has_zero else scale, bias if bias is not None else scale, y,
            n, kw, words.stride(0), scale.stride(0), _MAGIC)
    consts = dict(BITS=bits, HAS_ZERO=has_zero, SYM_ZERO=8 if bits == 4 else 0, GROUP=group,
                  HAS_BIAS=bias is not None)
    if config is None and INTERPRET:
        config = _word_prune(WORD_GEMV_CONFIGS, dict(zip(_word_gemv.arg_names, args)), **consts)[0]
    if config is not None:
        kwc = dict(config.kwargs)
        if kwc["SPLIT_K"] > 1:
            y.zero_()
        grid = (triton.cdiv(n, kwc["BLOCK_N"]), kwc["SPLIT_K"])
        _wq_gemv_words_kernel[grid](*args, **consts, **kwc, num_warps=config.num_warps,
                                    num_stages=config.num_stages)
    else:
        def grid(meta: dict[str, Any]) -> tuple[int, int]:
            return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
        _word_gemv[grid](*args, **consts)
        config = _word_gemv.best_config
    _LAST_LAUNCH.clear()
    _LAST_LAUNCH.update(args=args, consts=consts, config=config, m=1, n=n, kernel=_wq_gemv_words_kernel)


def last_kernel_resources() -> dict[str, Any] | None:
    """Registers, spills and shared memory of the kernel :func:`wq_linear` launched last, with its config.

    Re-launches that call once with the chosen config to get the compiled kernel (``kernel[grid](...)`` returns
    it); only meaningful on a GPU (the interpreter compiles nothing).
    """
    if not _LAST_LAUNCH or INTERPRET:
        return None
    cfg = _LAST_LAUNCH["config"]
    kw = dict(cfg.kwargs)
    if _LAST_LAUNCH.get("kernel") is _wq_gemv_words_kernel:
        if kw["SPLIT_K"] > 1:
            _LAST_LAUNCH["args"][5].zero_()
        kernel = _wq_gemv_words_kernel[(triton.cdiv(_LAST_LAUNCH["n"], kw["BLOCK_N"]), kw["SPLIT_K"])](
            *_LAST_LAUNCH["args"], **_LAST_LAUNCH["consts"], **kw, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
        return {"config": {**kw, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "path": "word_gemv"},
                "n_regs": getattr(kernel, "n_regs", None), "n_spills": getattr(kernel, "n_spills", None),
                "shared": getattr(getattr(kernel, "metadata", None), "shared", None)}
    grid = (triton.cdiv(_LAST_LAUNCH["m"], kw["BLOCK_M"]) * triton.cdiv(_LAST_LAUNCH["n"], kw["BLOCK_N"]),
            kw["SPLIT_K"])
    if kw["SPLIT_K"] > 1:
        _LAST_LAUNCH["args"][5].zero_()
    kernel = _wq_linear_kernel[grid](*_LAST_LAUNCH["args"], **_LAST_LAUNCH["consts"], **kw,
                                     num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return {"config": {**kw, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
            "n_regs": getattr(kernel, "n_regs", None), "n_spills": getattr(kernel, "n_spills", None),
            "shared": getattr(getattr(kernel, "metadata", None), "shared", None)}


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, bits: int,
               out_features: int, in_features: int, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantized weight ``[N, K]`` computed by the kernels' own helpers (for bit-exactness tests)."""
    n, k = out_features, in_features
    w = torch.empty((n, k), device=qweight.device, dtype=dtype)
    group = 0 if group_size >= k else group_size
    block_k = 32 if group == 0 or group % 32 == 0 else 16
    grid = (triton.cdiv(n, 16), triton.cdiv(k, block_k))
    _dequant_kernel[grid](qweight, scale, zero if zero is not None else scale, w, n, k,
                          qweight.stride(0), scale.stride(0), w.stride(0),
                          BITS=bits, HAS_ZERO=zero is not None, SYM_ZERO=8 if bits == 4 else 0, GROUP=group,
                          BLOCK_N=16, BLOCK_K=block_k)
    return w


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (the CPU test that keeps kernels real between GPU runs, and the benchmark report)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelVariant:
    """One concrete specialisation of a kernel, enough for ``triton.compile(ASTSource(...))``."""

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    #: True for paths that must use tensor cores (``tl.dot``)
    uses_dot: bool


def _linear_signature(act: str) -> dict[str, str]:
    return {"x_ptr": f"*{act}", "q_ptr": "*i8", "s_ptr": "*fp32", "z_ptr": "*i32", "b_ptr": f"*{act}",
            "y_ptr": f"*{act}", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_qn": "i32",
            "stride_sn": "i32", "stride_ym": "i32", "M_BUCKET": "i32"}


def aot_variants(bits: int) -> list[KernelVariant]:
    """Representative specialisations of every kernel path for ``bits`` (4 or 8), fp16 activations.

    One per config set (its first config and one split-K config) and per scale layout: group-wise asymmetric
    (``GROUP=128``), per-channel symmetric, and an odd group width (per-column group index).
    """
    out: list[KernelVariant] = []
    q_ty = "*u8" if bits == 4 else "*i8"
    # (path, config, layout): every code path once — GEMV with per-slice and per-column scales, split-K GEMV and
    # skinny, and the tiled GEMM with per-slice and per-column (odd group width) scales
    g128a, perchan, g48 = dict(GROUP=128, HAS_ZERO=True), dict(GROUP=0, HAS_ZERO=False), dict(GROUP=48, HAS_ZERO=False)
    plan = [("gemv_g128a", GEMV_CONFIGS[1], g128a, False), ("gemv_g48", GEMV_CONFIGS[1], g48, False),
            ("gemv_splitk_perchan", GEMV_CONFIGS[5], perchan, False),
            ("skinny_splitk_g128a", SKINNY_CONFIGS[0], g128a, True),
            ("tiled_g128a", TILED_CONFIGS[1], g128a, True), ("tiled_g48", TILED_CONFIGS[0], g48, True)]
    for pname, cfg, layout, dot in plan:
        sig = _linear_signature("fp16")
        sig["q_ptr"] = q_ty
        consts = dict(BITS=bits, SYM_ZERO=8 if bits == 4 else 0, HAS_BIAS=True, DOT_IEEE=False, **layout,
                      **cfg.kwargs)
        out.append(KernelVariant(f"int{bits}_{pname}", _wq_linear_kernel, sig, consts, cfg.num_warps,
                                 cfg.num_stages, dot))
    # the decode word GEMV: per-channel symmetric and group-wise asymmetric
    wsig = {"x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*i32", "b_ptr": "*fp16", "y_ptr": "*fp16",
            "N": "i32", "KW": "i32", "stride_wn": "i32", "stride_sn": "i32", "magic": "i32"}
    for wname, layout, cfg in [("word_gemv_perchan", perchan, WORD_GEMV_CONFIGS[2]),
                               ("word_gemv_g128a", g128a, WORD_GEMV_CONFIGS[0])]:
        consts = dict(BITS=bits, SYM_ZERO=8 if bits == 4 else 0, HAS_BIAS=True, **layout, **cfg.kwargs)
        out.append(KernelVariant(f"int{bits}_{wname}", _wq_gemv_words_kernel, wsig, consts, cfg.num_warps,
                                 cfg.num_stages, False))
    sig = {"q_ptr": q_ty, "s_ptr": "*fp32", "z_ptr": "*i32", "w_ptr": "*fp16", "N": "i32", "K": "i32",
           "stride_qn": "i32", "stride_sn": "i32", "stride_wn": "i32"}
    out.append(KernelVariant(f"int{bits}_dequant_g128a", _dequant_kernel, sig,
                             dict(BITS=bits, HAS_ZERO=True, SYM_ZERO=8 if bits == 4 else 0, GROUP=128,
                                  BLOCK_N=16, BLOCK_K=32), 4, 1, False))
    return out


def aot_compile(variant: KernelVariant, arch: int) -> dict[str, Any]:
    """Compile ``variant`` for ``sm_<arch>`` without a GPU and read its resources with the wheel's cuobjdump.

    Returns ``{"name", "arch", "registers", "shared", "local", "stack", "mma", "wgmma"}``; ``local``/``stack``
    are the spill indicators (both 0 for a kernel that keeps everything in registers). Needs Triton's real JIT
    (not the interpreter): run it in a process without ``TRITON_INTERPRET=1``.
    """
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=variant.fn, signature=variant.signature, constexprs=variant.constexprs)
    target = GPUTarget("cuda", arch, 32)
    compiled = triton.compile(src, target=target,
                              options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
    ptx = compiled.asm["ptx"]
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{variant.name}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        text = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], check=True,
                              capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage for {variant.name}:\n{text}")
    reg, stack, shared, local = (int(v) for v in found.groups())
    return {"name": variant.name, "arch": arch, "registers": reg, "stack": stack, "shared": shared,
            "local": local, "mma": bool(re.search(r"\bmma\.sync", ptx)), "wgmma": "wgmma" in ptx,
            "uses_dot": variant.uses_dot}


def aot_report(archs: tuple[int, ...] = (80, 90)) -> list[dict[str, Any]]:
    """:func:`aot_compile` for every Triton kernel variant of every registered format, on every arch."""
    from . import registry

    rows = []
    for fmt in registry.formats():
        make = registry.load_callable(fmt.aot_variants)
        if make is None:
            continue
        for variant in make():
            for arch in archs:
                rows.append({"format": fmt.name, **aot_compile(variant, arch)})
    return rows


if __name__ == "__main__":  # python -m fxquant.backends.triton_int  -> the AOT report as JSON
    import json
    import sys

    if INTERPRET:
        sys.exit("unset TRITON_INTERPRET: ahead-of-time compilation needs Triton's real compiler")
    print(json.dumps(aot_report()))
