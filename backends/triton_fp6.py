"""Triton kernels for FP6 weight-only GEMM: ``y = x @ dequant(W)^T (+ bias)`` with ``W`` in the 4+2 planes.

What this module computes, and why it is shaped this way
========================================================

FP6 weights cost 6 bits each: in decode (``M`` = 1 to a few rows) a linear is bound by the bytes of ``W``, so the
ceiling over FP16 is 16/6 = 2.67x. The weight lives in two planes (:class:`fxquant.fpformats.FP6PackedWeight`):
a 2-bit plane with the high bits ``[S E2]`` and a 4-bit plane with ``[E1 E0 M1 M0]``, each row contiguous and
16-byte aligned, so a ``BLOCK_K`` slice of ``BLOCK_N`` rows is two rectangular, vectorisable byte loads.

Rebuilding FP16 in registers (METHODS.md §4, the bias-shift trick)
------------------------------------------------------------------
With the 6-bit code at the top of a 16-bit lane, ``x = code << 10`` (``S E2 E1 E0 M1 M0`` in bits 15..10),
``h = (x & 0x8000) | ((x & 0x7C00) >> 2)`` puts the sign in FP16's sign bit, ``E2 E1 E0`` in the low three
exponent bits and ``M1 M0`` in the top mantissa bits. Read as FP16, ``h == decode(code) * 2**-12`` exactly,
subnormals included (an E3M2 exponent field of 0 becomes an FP16 exponent field of 0: both are subnormal with
the same mantissa). The factor ``2**(15 - bias)`` is applied with the scale. For a container with ``e``
exponent bits (E2M3: FP6 with more mantissa; FP5/FP4 ride in a 6-bit container) the shift is ``5 - e``.

Numerics (the one numerics of :mod:`fxquant.fpformats`)
-------------------------------------------------------
The dequantized weight is ``(float32(h) * 2**(15-bias)) * scale``: the first product is exact, so this is
``decode(code) * scale`` rounded once in float32 — bit for bit :meth:`FPQuantizedWeight.dequantize`
(:func:`dequantize` writes these values out with the kernels' own helper for the tests).
With FP16 activations and a scale that is constant over a ``BLOCK_K`` slice (per channel, or groups whose
width is a multiple of ``BLOCK_K``), the tensor cores take ``h`` itself and the scale multiplies the partial
sum — once at the very end for per-channel scales. This is the same real number as multiplying every weight,
with one rounding fewer per element and no per-element ALU work beyond the bit shuffle. Otherwise (bf16 or
fp32 activations, odd group widths) every element is scaled exactly as above and rounded to the activation dtype,
which is what the eager quantized model stores.

Paths (one kernel body, chosen by compile-time parameters, as in :mod:`fxquant.backends.triton_int`)
----------------------------------------------------------------------------------------------------
* ``M == 1`` — the **word GEMV** :func:`_fp6_gemv_words_kernel` (planes read as int32 / int64 words, two FP16
  weights rebuilt per register with ~2 integer instructions a weight, float32 FMAs, one row reduction after the
  K loop; see the comment above it) wherever :func:`word_gemv_eligible` allows: E3M2 container, per-channel
  scales or groups of whole 16-code groups. Otherwise ``BLOCK_M == 1`` — the tile **GEMV**: plain FMAs and a
  row reduction, optional split-K;
* ``BLOCK_M == 16`` with ``SPLIT_K > 1`` — **skinny / split-K** for ``2 <= M <= 16``: ``tl.dot`` on one row tile,
  ``K`` cut in slices that add into ``y`` atomically so that enough programs exist to fill the GPU;
* ``BLOCK_M >= 32`` — the **tiled GEMM**: ``tl.dot`` tiles with grouped program ordering;
* above :data:`TORCH_MATMUL_MIN_M` rows the host wrapper dequantizes once and calls FP16 ``torch.matmul``
  (cuBLAS), where FP6 no longer wins (FP6-LLM reports the crossover near batch 256).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .triton_int import autotune

__all__ = ["fp6_linear", "dequantize", "INTERPRET", "TORCH_MATMUL_MIN_M", "GEMV_CONFIGS", "SKINNY_CONFIGS",
           "TILED_CONFIGS", "WORD_GEMV_CONFIGS", "FP6KernelVariant", "aot_variants", "kernel_path",
           "word_gemv_eligible"]

#: True under ``TRITON_INTERPRET=1`` (CPU tests): no autotuning, the first config that fits runs.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: from this many rows on, dequantize and use FP16 ``torch.matmul``. Measured on an H100 (examples/results/
#: fp6_nvidia_h100_80gb_hbm3.md): at M = 64 the tiled kernel beats dequantize + matmul (31 vs ~35 us on
#: 4096x4096, 69 vs ~92 us on 11008x4096), at M = 256 it does not. Both are ~2x slower than FP16 with a stored
#: FP16 weight: being never slower than FP16 at large M needs a cached FP16 copy of the weight (not done here).
TORCH_MATMUL_MIN_M = 256


# ---------------------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _fp6_tile(hi_ptr, lo_ptr, offs_n, n_mask, k0, KH, SHIFT: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """Load a ``[BLOCK_N, BLOCK_K]`` slice of both planes and rebuild the FP16 bit patterns ``h``.

    ``KH`` is the 2-bit plane's row length in bytes (``k_pad / 4``); the 4-bit plane's is ``2 * KH``.
    Returns FP16 values equal to ``decode(code) * 2**-(15 - bias)`` (exact).
    """
    # -- wide loads: BLOCK_K/4 bytes of the 2-bit plane and BLOCK_K/2 bytes of the 4-bit plane per row ---------
    offs_h = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    offs_l = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    hb = tl.load(hi_ptr + offs_n[:, None] * KH + offs_h[None, :],
                 mask=n_mask[:, None] & (offs_h[None, :] < KH), other=0)
    lb = tl.load(lo_ptr + offs_n[:, None] * (2 * KH) + offs_l[None, :],
                 mask=n_mask[:, None] & (offs_l[None, :] < 2 * KH), other=0)
    # -- unpack in the packing order (bytes stay uint8: 4 per register, less register pressure) ------------------
    # lo4 byte j = codes 2j (low nibble), 2j+1; hi2 byte j = codes 4j..4j+3 at bits 2t+1..2t
    lo = tl.reshape(tl.join(lb & 0xF, lb >> 4), (BLOCK_N, BLOCK_K))
    hi = tl.join(tl.join(hb & 0x3, (hb >> 4) & 0x3), tl.join((hb >> 2) & 0x3, hb >> 6))
    hi = tl.reshape(hi, (BLOCK_N, BLOCK_K))  # [j, i, t] -> code 4j + 2i + t
    # -- bias shift: code at the top of a 16-bit lane, exponent+mantissa shifted into FP16's low exponent bits --
    x = ((hi << 4) | lo).to(tl.uint16) << 10
    h = (x & 0x8000) | ((x & 0x7C00) >> SHIFT)
    return h.to(tl.float16, bitcast=True)


@triton.jit
def _scale_slice(s_ptr, offs_n, n_mask, k0, stride_sn, GROUP: tl.constexpr):
    """The ``[BLOCK_N]`` scales of a K slice that lies inside one group (GROUP == 0: per channel)."""
    if GROUP == 0:
        g = 0
    else:
        g = k0 // GROUP
    return tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=1.0)


@triton.jit
def _scale_cols(s_ptr, offs_n, n_mask, offs_k, K, stride_sn, GROUP: tl.constexpr):
    """Per-column scales ``[BLOCK_N, BLOCK_K]`` (a slice that straddles groups; the last group may be shorter)."""
    if GROUP == 0:
        g = offs_k * 0
    else:
        g = offs_k // GROUP
    return tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :],
                   mask=n_mask[:, None] & (offs_k[None, :] < K), other=1.0)


# ---------------------------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M_BUCKET"])
def _fp6_linear_kernel(
    x_ptr, hi_ptr, lo_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, KH,
    stride_xm, stride_sn, stride_ym,
    M_BUCKET,  # only part of the autotuning key, never read
    SHIFT: tl.constexpr, FACTOR: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    RAW_DOT: tl.constexpr, DOT_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # -- which output tile and which K slice this program owns (grouped ordering for L2 reuse) ------------------
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_begin = pid_k * tiles_per_split * BLOCK_K
    k_end = min(k_begin + tiles_per_split * BLOCK_K, K)
    # the scale is constant over a K slice: per channel, or groups that are whole multiples of BLOCK_K
    SCALE_PER_SLICE: tl.constexpr = (GROUP == 0) or (GROUP % BLOCK_K == 0)
    # FP16 activations and a slice-constant scale: the tensor cores read the rebuilt h as it is
    USE_RAW: tl.constexpr = RAW_DOT and SCALE_PER_SLICE

    if BLOCK_M == 1:
        # -- GEMV: one activation row, FMAs in float32 and a row reduction ----------------------------------------
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        x_row = x_ptr + pid_m * stride_xm
        for k0 in range(k_begin, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            h = _fp6_tile(hi_ptr, lo_ptr, offs_n, n_mask, k0, KH, SHIFT, BLOCK_N, BLOCK_K).to(tl.float32)
            if SCALE_PER_SLICE:
                part = tl.sum(h * x[None, :], axis=1)
                if GROUP == 0:
                    acc += part  # per channel: the scale multiplies the finished sum, once
                else:
                    acc += part * (_scale_slice(s_ptr, offs_n, n_mask, k0, stride_sn, GROUP) * FACTOR)
            else:
                w = (h * FACTOR) * _scale_cols(s_ptr, offs_n, n_mask, offs_k, K, stride_sn, GROUP)
                acc += tl.sum(w * x[None, :], axis=1)
        if GROUP == 0:
            acc = acc * (_scale_slice(s_ptr, offs_n, n_mask, 0, stride_sn, GROUP) * FACTOR)
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y_ptrs = y_ptr + pid_m * stride_ym + offs_n
        if SPLIT_K == 1:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_mask)
        else:
            tl.atomic_add(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_mask, sem="relaxed")
    else:
        # -- tiles: rebuild a [BLOCK_N, BLOCK_K] weight tile in registers, feed the tensor cores -------------------
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
            h = _fp6_tile(hi_ptr, lo_ptr, offs_n, n_mask, k0, KH, SHIFT, BLOCK_N, BLOCK_K)
            if USE_RAW:
                if GROUP == 0:
                    acc = tl.dot(x, tl.trans(h), acc)
                else:
                    part = tl.dot(x, tl.trans(h))
                    s = _scale_slice(s_ptr, offs_n, n_mask, k0, stride_sn, GROUP) * FACTOR
                    acc += part * s[None, :]
            else:
                # the exact dequantized weight, rounded to the activation dtype as the eager model stores it
                if SCALE_PER_SLICE:
                    s = _scale_slice(s_ptr, offs_n, n_mask, k0, stride_sn, GROUP)[:, None]
                else:
                    s = _scale_cols(s_ptr, offs_n, n_mask, offs_k, K, stride_sn, GROUP)
                w = ((h.to(tl.float32) * FACTOR) * s).to(x.dtype)
                if DOT_IEEE:
                    acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, tl.trans(w), acc)
        if USE_RAW:
            if GROUP == 0:
                acc = acc * (_scale_slice(s_ptr, offs_n, n_mask, 0, stride_sn, GROUP) * FACTOR)[None, :]
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        y_mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT_K == 1:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
        else:
            tl.atomic_add(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask, sem="relaxed")


@triton.jit
def _fp6_dequant_kernel(hi_ptr, lo_ptr, s_ptr, w_ptr, N, K, KH, stride_sn, stride_wn,
                        SHIFT: tl.constexpr, FACTOR: tl.constexpr, GROUP: tl.constexpr, RAW: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Write the dequantized weight with the GEMM's own tile helper: the bit-exactness witness, and the
    large-M path's one-off dequantization. ``RAW`` writes ``h`` itself (the FP16 bit patterns)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    h = _fp6_tile(hi_ptr, lo_ptr, offs_n, n_mask, k0, KH, SHIFT, BLOCK_N, BLOCK_K)
    if RAW:
        w = h
    else:
        w = (h.to(tl.float32) * FACTOR) * _scale_cols(s_ptr, offs_n, n_mask, offs_k, K, stride_sn, GROUP)
    tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=n_mask[:, None] & (offs_k[None, :] < K))


# ---------------------------------------------------------------------------------------------------------------
# Decode GEMV on 32/64-bit words (M == 1, E3M2 container): the fast path
# ---------------------------------------------------------------------------------------------------------------
# Why a second GEMV. In decode the weight bytes bound the time only if the per-weight
# ALU work is small: an H100 SM issues 128 thread-instructions a clock (64 of them integer shift/logic), and the
# tile GEMV above spends ~27 instructions a weight (byte loads, join/reshape shuffles through shared memory, a
# cross-thread row sum every K step). This kernel spends ~4:
#
# * **word loads**: one thread reads, per row and step, one 16-code group: the 2-bit plane's int32 word (16 codes)
#   and the 4-bit plane's int64 word (same 16 codes), so a warp reads 128 + 256 contiguous bytes a row; every
#   thread owns ``BLOCK_N`` rows of its group, so its ``x`` values (four int64 words of FP16) serve all of them;
# * **pairs of FP16 in one register**: codes ``t`` and ``t + 8`` of a group sit 16 bits apart in the 2-bit word
#   (fields ``2t`` and ``2t + 16``), so one register holds both FP16 values, ``t`` in the low half, ``t + 8`` in
#   the high half. The 4-bit words are first re-paired once per group, ``p0 = [codes 0-3 | codes 8-11]`` and
#   ``p1 = [4-7 | 12-15]`` (16-bit halves), and the 2-bit word once, ``h2``: the sign bit of every field is moved 2
#   bits up (a rotate and a select), so that sign and ``E2`` lie 3 bits apart as in FP16 (bits 15 and 12). Then
#   pair ``t`` is ``(p << (8 - 4 (t % 4)) & 0x0F000F00) | (rotl(h2, 12 - 2t) & 0x90009000)``: the bias-shift
#   FP16 bit patterns (METHODS.md §4) of two weights in one shift, one rotate and two LOP3, about 2 integer
#   instructions a weight;
# * **no int -> float conversion**: each FP16 half becomes float32 with one HADD2.F32 (FMA pipe), times ``x`` in
#   float32 (FFMA). The product ``h * x`` is exact in float32 (3 x 11 significant bits), as in the other paths;
# * a ``[BLOCK_N, BLOCK_V]`` float32 accumulator, reduced across threads once after the K loop; per-channel
#   scales multiply the row sum once, a group scale (groups of a multiple of 16 codes) the partial sum of a
#   16-code group (one FFMA per 16 weights).
#
# Only the E3M2 container (``SHIFT == 2``: sign and exponent 3 bits apart) takes this path; other containers and
# groups that are not whole 16-code groups keep the tile GEMV.
@triton.jit
def _rotl(x, S: tl.constexpr):
    """Rotate the uint32 lanes of ``x`` left by ``S`` bits (``S < 0``: right); one funnel shift (SHF.L.W)."""
    if S == 0:
        r = x
    elif S > 0:
        r = (x << S) | (x >> (32 - S))
    else:
        r = (x >> (-S)) | (x << (32 + S))
    return r


@triton.jit
def _xval(xw0, xw1, xw2, xw3, x_ptrs, x_mask, J: tl.constexpr, X_WORDS: tl.constexpr, XMASKED: tl.constexpr):
    """float32 ``x[16 v + J]`` for each group ``v`` of the step: a 16-bit half of one of the group's four int64
    words of activations (``X_WORDS``), or an element load (masked with ``x_mask`` when ``XMASKED``)."""
    if X_WORDS:
        if J // 4 == 0:
            w = xw0
        elif J // 4 == 1:
            w = xw1
        elif J // 4 == 2:
            w = xw2
        else:
            w = xw3
        half = ((w >> (16 * (J % 4))) & 0xFFFF).to(tl.uint16)
        xv = half.to(x_ptrs.dtype.element_ty, bitcast=True).to(tl.float32)
    elif XMASKED:
        xv = tl.load(x_ptrs + J, mask=x_mask, other=0.0).to(tl.float32)
    else:
        xv = tl.load(x_ptrs + J).to(tl.float32)
    return xv


@triton.jit
def _word_pair(p, h2, T: tl.constexpr):
    """The FP16 bit patterns of codes ``T`` (low half) and ``T + 8`` (high half) of each 16-code group.

    ``p`` holds the codes' 4-bit fields (``p0`` for ``T < 4``, ``p1`` otherwise: nibble ``T % 4`` of each half),
    ``h2`` the 2-bit word with the sign moved up 2 bits (field ``t``: ``E2`` at bit ``2t``, sign at ``2t + 3``).
    Bits 8-11 of each half get ``E1 E0 M1 M0``, bit 12 ``E2``, bit 15 the sign: ``decode(code) * 2**-12``."""
    I: tl.constexpr = T % 4
    if I < 2:
        a = p << (8 - 4 * I)
    elif I == 2:
        a = p
    else:
        a = p >> 4
    b = _rotl(h2, 12 - 2 * T)
    return (a & 0x0F000F00) | (b & 0x90009000)


@triton.jit
def _halves_f32(w, ASM: tl.constexpr):
    """float32 values of the low and the high FP16 half of each uint32 lane (exact).

    ``ASM`` (compiled kernels): one ``cvt.f32.f16`` per half of the register as it is (two HADD2.F32). The plain
    Triton form (the interpreter) truncates to 16 bits first, which LLVM packs two lanes at a time with a PRMT."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }",
            "=r,=r,r", [w], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        lo = (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (w >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _word_load(hi_rows, lo_rows, xw_ptr, s_rows, offs_v, v_end, KV, GROUP: tl.constexpr, X_WORDS: tl.constexpr):
    """The loads of one step: both planes' words of groups ``offs_v`` (clamped to the last whole group, so always
    inside the planes, no mask), the activations' int64 words (zero past ``v_end``) and the group scales."""
    offs_c = tl.minimum(offs_v, tl.maximum(KV - 1, 0))
    hw = tl.load(hi_rows + offs_c[None, :])
    lw = tl.load(lo_rows + offs_c[None, :])
    if X_WORDS:
        x_mask = offs_v < v_end
        xw0 = tl.load(xw_ptr + offs_v * 4, mask=x_mask, other=0)
        xw1 = tl.load(xw_ptr + offs_v * 4 + 1, mask=x_mask, other=0)
        xw2 = tl.load(xw_ptr + offs_v * 4 + 2, mask=x_mask, other=0)
        xw3 = tl.load(xw_ptr + offs_v * 4 + 3, mask=x_mask, other=0)
    else:
        xw0 = 0
        xw1 = 0
        xw2 = 0
        xw3 = 0
    if GROUP == 0:
        sg = 0.0
    else:
        sg = tl.load(s_rows + ((offs_c * 16) // GROUP)[None, :])
    return hw, lw, xw0, xw1, xw2, xw3, sg


@triton.jit
def _word_math(acc, hw, lw, xw0, xw1, xw2, xw3, sg, x_ptrs, x_mask, x_k, K,
               GROUP: tl.constexpr, X_WORDS: tl.constexpr, XMASKED: tl.constexpr, TAIL: tl.constexpr,
               ASM: tl.constexpr):
    """``acc[r, v] += sum_j h[r, 16 v + j] * x[16 v + j]`` for one step (times the group scale ``sg``).

    Activations come from the int64 words (``X_WORDS``) or element loads at ``x_ptrs`` (masked with ``x_mask``
    when ``XMASKED``; ``TAIL``: also ``16 v + j < K``, for the partial group at the end of a row)."""
    # -- re-pair the 4-bit fields and move the sign bits of the 2-bit fields, once per group --------------------
    hw = hw.to(tl.uint32, bitcast=True)
    l0 = lw.to(tl.uint32)               # codes 0-7 (nibble i at bits 4i)
    l1 = (lw >> 32).to(tl.uint32)       # codes 8-15
    p0 = (l0 & 0xFFFF) | (l1 << 16)     # [codes 0-3 | codes 8-11]
    p1 = (l0 >> 16) | (l1 & 0xFFFF0000)  # [codes 4-7 | codes 12-15]
    h2 = hw ^ ((hw ^ _rotl(hw, 2)) & 0xAAAAAAAA)   # odd bits (signs) from the rotate
    DIRECT: tl.constexpr = GROUP == 0
    if DIRECT:
        part = acc
    else:
        part = tl.zeros(acc.shape, dtype=tl.float32)
    for t in tl.static_range(8):
        if t < 4:
            w = _word_pair(p0, h2, t)
        else:
            w = _word_pair(p1, h2, t)
        if TAIL:
            xa = _xval(xw0, xw1, xw2, xw3, x_ptrs, x_mask & (x_k + t < K), t, False, True)
            xb = _xval(xw0, xw1, xw2, xw3, x_ptrs, x_mask & (x_k + t + 8 < K), t + 8, False, True)
        else:
            xa = _xval(xw0, xw1, xw2, xw3, x_ptrs, x_mask, t, X_WORDS, XMASKED)
            xb = _xval(xw0, xw1, xw2, xw3, x_ptrs, x_mask, t + 8, X_WORDS, XMASKED)
        wa, wb = _halves_f32(w, ASM)
        part += wa * xa[None, :]
        part += wb * xb[None, :]
    if DIRECT:
        acc = part
    else:
        acc += part * sg
    return acc


@triton.jit
def _fp6_gemv_words_kernel(
    x_ptr, xw_ptr, hi_ptr, lo_ptr, s_ptr, b_ptr, y_ptr,
    N, K, stride_w, stride_sn,
    FACTOR: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, X_WORDS: tl.constexpr, ASM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """``y[0, n] = sum_k x[0, k] * dequant(W)[n, k] (+ bias)`` with ``hi_ptr`` / ``lo_ptr`` the planes read as
    int32 / int64 words (one word each per 16-code group, ``stride_w`` words a row) and ``xw_ptr`` the
    activation row as int64 words (16-bit activations, ``X_WORDS``)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    # rows past the edge read a valid duplicate row (no mask in the loop); their results are not stored
    rows = offs_n % N
    KV = K // 16                                    # whole 16-code groups; a partial one follows if K % 16
    v_tiles = tl.cdiv(KV, BLOCK_V)
    per_split = tl.cdiv(v_tiles, SPLIT_K) * BLOCK_V
    v_begin = pid_k * per_split
    v_end = min(v_begin + per_split, KV)
    n_steps = tl.cdiv(tl.maximum(v_end - v_begin, 0), BLOCK_V)
    # one 16-code group per thread per step (32/64-bit word loads, coalesced across the warp): the activations of
    # a group then sit in the thread that multiplies them, for all of its BLOCK_N rows
    offs_v = v_begin + tl.max_contiguous(tl.arange(0, BLOCK_V), 1)
    hi_rows = hi_ptr + rows[:, None] * stride_w
    lo_rows = lo_ptr + rows[:, None] * stride_w
    s_rows = s_ptr + rows[:, None] * stride_sn
    x_ptrs = x_ptr + offs_v * 16
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    # register double buffering: the loads of step i + 1 are in flight while step i is multiplied (the step
    # after the last one re-reads the last group, clamped, with zero activations)
    hw, lw, xw0, xw1, xw2, xw3, sg = _word_load(hi_rows, lo_rows, xw_ptr, s_rows, offs_v, v_end, KV, GROUP,
                                                X_WORDS)
    for _ in range(n_steps):
        nhw, nlw, nxw0, nxw1, nxw2, nxw3, nsg = _word_load(hi_rows, lo_rows, xw_ptr, s_rows, offs_v + BLOCK_V,
                                                           v_end, KV, GROUP, X_WORDS)
        acc = _word_math(acc, hw, lw, xw0, xw1, xw2, xw3, sg, x_ptrs, offs_v < v_end, offs_v * 16, K,
                         GROUP, X_WORDS, True, False, ASM)
        hw, lw, xw0, xw1, xw2, xw3, sg = nhw, nlw, nxw0, nxw1, nxw2, nxw3, nsg
        offs_v += BLOCK_V
        x_ptrs += BLOCK_V * 16
    if KV * 16 < K:
        if pid_k == SPLIT_K - 1:                   # the partial 16-code group at the end of the rows
            offs_t = KV + tl.max_contiguous(tl.arange(0, BLOCK_V), 1)
            t_mask = offs_t < KV + 1
            ht = tl.load(hi_rows + offs_t[None, :], mask=t_mask[None, :], other=0)
            lt = tl.load(lo_rows + offs_t[None, :], mask=t_mask[None, :], other=0)
            if GROUP == 0:
                st = 0.0
            else:
                st = tl.load(s_rows + ((offs_t * 16) // GROUP)[None, :], mask=t_mask[None, :], other=0.0)
            acc = _word_math(acc, ht, lt, 0, 0, 0, 0, st, x_ptr + offs_t * 16, t_mask, offs_t * 16, K,
                             GROUP, X_WORDS, True, True, ASM)
    y = tl.sum(acc, axis=1)
    if GROUP == 0:
        y = y * (tl.load(s_ptr + rows * stride_sn) * FACTOR)
    else:
        y = y * FACTOR
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(b_ptr + rows).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask, sem="relaxed")


# ---------------------------------------------------------------------------------------------------------------
# Configurations and autotuning
# ---------------------------------------------------------------------------------------------------------------
def _zero_output(nargs: dict[str, Any]) -> None:
    """Split-K programs add into ``y``: it must start at zero."""
    nargs["y_ptr"].zero_()


def _cfg(bm: int, bn: int, bk: int, split: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages, pre_hook=_zero_output if split > 1 else None)


#: M == 1: few rows per program and long K slices keep many loads in flight on every SM.
GEMV_CONFIGS = [
    _cfg(1, 8, 256, 1, 4, 3), _cfg(1, 16, 256, 1, 4, 3), _cfg(1, 4, 512, 1, 2, 3), _cfg(1, 8, 512, 1, 4, 3),
    _cfg(1, 16, 128, 1, 4, 4), _cfg(1, 32, 128, 1, 4, 3), _cfg(1, 8, 256, 2, 4, 3), _cfg(1, 16, 128, 4, 4, 3),
]
#: 2 <= M <= 16: one 16-row tile, split-K for parallelism.
SKINNY_CONFIGS = [
    _cfg(16, 32, 128, 2, 4, 4), _cfg(16, 32, 128, 1, 4, 4), _cfg(16, 64, 128, 1, 4, 4), _cfg(16, 64, 64, 4, 4, 4),
    _cfg(16, 32, 256, 4, 4, 3), _cfg(16, 128, 64, 2, 4, 4),
]
#: 16 < M < TORCH_MATMUL_MIN_M: tensor-core tiles. The in-register unpack is register-hungry (~170-235
#: registers a thread for these tiles on sm_80/sm_90, checked by the AOT test): 128-row tiles or 4 warps on a
#: 64x128 tile spill, so none is listed.
TILED_CONFIGS = [
    _cfg(64, 128, 64, 1, 8, 3), _cfg(32, 64, 64, 1, 4, 4), _cfg(64, 64, 64, 1, 8, 3), _cfg(32, 128, 64, 1, 8, 3),
]


def _wcfg(bn: int, bv: int, split: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "SPLIT_K": split}, num_warps=warps, num_stages=1,
                         pre_hook=_zero_output if split > 1 else None)


#: M == 1 on words: ``BLOCK_V = 32 x warps`` 16-code groups a step (one per thread), ``BLOCK_N`` rows a thread.
#: For N = 4096 the first two give 1024 / 512 programs, all resident at once on 132 SMs (64 / 96 registers per
#: thread, per channel); groups of 128 need ~100 / ~160 registers (the per-group partial sums), hence the first.
#: The split-K config serves narrow layers (N of a few hundred rows), which would leave SMs idle.
WORD_GEMV_CONFIGS = [_wcfg(4, 128, 1, 4), _wcfg(8, 128, 1, 4), _wcfg(2, 64, 1, 2), _wcfg(4, 128, 4, 4),
                     # small programs (one or two warps) won on the H100 at most shapes
                     _wcfg(4, 64, 1, 2), _wcfg(4, 32, 1, 1), _wcfg(2, 32, 1, 1)]


def _word_prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """bf16 outputs cannot take split-K (no bf16 atomics before sm_90); a split needs groups to split and is only
    worth it when the row blocks alone leave SMs idle."""
    y = named_args["y_ptr"]
    kv = named_args["K"] // 16
    n = named_args["N"]
    kept = [c for c in configs if c.kwargs["SPLIT_K"] == 1 or
            (y.dtype != torch.bfloat16 and kv >= 2 * c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_V"]
             and n <= 64 * c.kwargs["BLOCK_N"] * 4)]
    return kept or [configs[0]]


def word_gemv_eligible(x2: torch.Tensor, hi2: torch.Tensor, lo4: torch.Tensor, *, exp_bits: int,
                       group: int) -> bool:
    """Whether the word GEMV takes this call: the E3M2 container (sign and ``E2`` 3 bits apart after the bias
    shift), group widths of whole 16-code groups, planes readable as int32 / int64 words (row lengths in bytes a
    multiple of 4 / 8 and 8-byte aligned bases: always true for :func:`fxquant.fpformats.pack_fp6_planes`, whose
    rows are padded to 64 codes) and 16- or 32-bit activations."""
    return (exp_bits == 3 and (group == 0 or group % 16 == 0) and x2.dtype in (torch.float16, torch.bfloat16,
                                                                                  torch.float32)
            and hi2.shape[1] % 4 == 0 and hi2.data_ptr() % 8 == 0 and lo4.data_ptr() % 8 == 0
            and hi2.shape[0] == lo4.shape[0] and lo4.shape[1] == 2 * hi2.shape[1])


def m_bucket(m: int) -> int:
    """Autotuning bucket of the row count: 1, 2, 4, ..., capped at 4096."""
    return 1 if m <= 1 else min(4096, 1 << (m - 1).bit_length())


def _prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """Drop configs that cannot run, or cannot be fast, for these arguments.

    * prefer slices inside one group (``GROUP % BLOCK_K == 0``): the scale then multiplies partial sums;
    * bf16 atomics need sm_90: bf16 outputs skip split-K;
    * a split into more slices than ``BLOCK_K`` steps would leave programs idle.
    """
    group = kwargs.get("GROUP", named_args.get("GROUP", 0))
    k = named_args["K"]
    y = named_args["y_ptr"]
    kept = [c for c in configs if group == 0 or group % c.kwargs["BLOCK_K"] == 0] or list(configs)
    if y.dtype == torch.bfloat16:
        kept = [c for c in kept if c.kwargs["SPLIT_K"] == 1] or kept
    kept = [c for c in kept if c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_K"] <= max(k, c.kwargs["BLOCK_K"])] or kept
    return kept


_KEY = ["M_BUCKET", "N", "K", "GROUP", "SHIFT"]
_gemv = autotune(GEMV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(_fp6_linear_kernel)
_skinny = autotune(SKINNY_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(_fp6_linear_kernel)
_tiled = autotune(TILED_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(_fp6_linear_kernel)
_word_gemv = autotune(WORD_GEMV_CONFIGS, key=["N", "K", "GROUP", "X_WORDS", "HAS_BIAS"],
                             prune_configs_by={"early_config_prune": _word_prune})(_fp6_gemv_words_kernel)


def kernel_path(m: int, torch_matmul_min_m: int = TORCH_MATMUL_MIN_M) -> str:
    """Which path serves ``m`` rows: ``gemv``, ``skinny``, ``tiled`` or ``torch`` (dequantize + torch.matmul)."""
    if m >= torch_matmul_min_m:
        return "torch"
    if m == 1:
        return "gemv"
    return "skinny" if m <= 16 else "tiled"


def _format_consts(exp_bits: int, bias: int) -> dict[str, Any]:
    """``SHIFT`` of the bias-shift trick and the power of two it leaves: ``2**(15 - bias)``."""
    if not 1 <= exp_bits <= 4:
        raise ValueError(f"the FP6 kernel rebuilds FP16 from at most 4 exponent bits, got {exp_bits}")
    return {"SHIFT": 5 - exp_bits, "FACTOR": float(2.0 ** (15 - bias))}


# ---------------------------------------------------------------------------------------------------------------
# Host wrappers
# ---------------------------------------------------------------------------------------------------------------
def dequantize(hi2: torch.Tensor, lo4: torch.Tensor, scale: torch.Tensor, *, in_features: int, exp_bits: int,
               bias: int, group_size: int | None, dtype: torch.dtype = torch.float32, raw: bool = False) -> torch.Tensor:
    """The dequantized weight ``[N, K]`` computed by the kernels' tile helper.

    ``raw=True`` returns the rebuilt FP16 values ``h`` (``decode(code) * 2**-(15 - bias)``) instead.
    """
    n, k = int(hi2.shape[0]), in_features
    w = torch.empty((n, k), device=hi2.device, dtype=torch.float16 if raw else dtype)
    group = 0 if group_size is None or group_size >= k else group_size
    consts = _format_consts(exp_bits, bias)
    block_n, block_k = 32, 64
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _fp6_dequant_kernel[grid](hi2, lo4, scale, w, n, k, hi2.shape[1], scale.stride(0), w.stride(0),
                              GROUP=group, RAW=raw, BLOCK_N=block_n, BLOCK_K=block_k, **consts)
    return w


def fp6_linear(x: torch.Tensor, hi2: torch.Tensor, lo4: torch.Tensor, scale: torch.Tensor, bias_t: torch.Tensor | None,
               *, in_features: int, exp_bits: int, bias: int, group_size: int | None,
               config: triton.Config | None = None, torch_matmul_min_m: int = TORCH_MATMUL_MIN_M,
               word_gemv: bool | None = None) -> torch.Tensor:
    """``x[..., K] @ dequant(W)^T (+ bias_t)`` in ``x.dtype`` (CUDA, or the interpreter).

    ``bias`` is the minifloat's exponent bias (3 for E3M2), ``bias_t`` the linear's bias vector. ``config``
    forces one kernel configuration (tests cover every path under the interpreter with it): a
    :data:`WORD_GEMV_CONFIGS` entry (it has ``BLOCK_V``) forces the word GEMV, any other the tile kernel. Without
    it, the row count picks the path (:func:`kernel_path`) and ``triton.autotune`` the config within it; one row
    takes the word GEMV where :func:`word_gemv_eligible` allows (``word_gemv=False`` keeps the tile GEMV,
    ``True`` insists on the word GEMV and raises where it cannot run).
    """
    if hi2.dtype != torch.uint8 or lo4.dtype != torch.uint8 or not (hi2.is_contiguous() and lo4.is_contiguous()):
        raise ValueError("fp6_linear takes contiguous uint8 planes from fxquant.fpformats.pack_fp6_planes")
    if scale.dtype != torch.float32:
        raise ValueError(f"fp6_linear takes float32 scales, got {scale.dtype}")
    lead = x.shape[:-1]
    k = in_features
    if x.shape[-1] != k:
        raise ValueError(f"fp6_linear: x has {x.shape[-1]} features, the weight {k}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], int(hi2.shape[0])
    consts_fmt = _format_consts(exp_bits, bias)
    if m >= torch_matmul_min_m and config is None:
        # compute-bound: one dequantization into the activation dtype, then cuBLAS
        w = dequantize(hi2, lo4, scale, in_features=k, exp_bits=exp_bits, bias=bias, group_size=group_size,
                       dtype=x.dtype)
        return torch.nn.functional.linear(x, w, bias_t)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return y.reshape(*lead, n)
    group = 0 if group_size is None or group_size >= k else group_size
    word_cfg = config is not None and "BLOCK_V" in config.kwargs
    if m == 1 and (word_cfg or (config is None and word_gemv is not False)):
        if word_gemv_eligible(x2, hi2, lo4, exp_bits=exp_bits, group=group):
            _word_gemv_launch(x2, hi2, lo4, scale, bias_t, y, n, k, group, consts_fmt["FACTOR"], config)
            return y.reshape(*lead, n)
        if word_cfg or word_gemv:
            raise ValueError("the word GEMV cannot take this call (E3M2 container, groups of whole 16-code groups "
                             "and word-aligned planes only)")
    elif word_cfg or word_gemv:
        raise ValueError("the word GEMV serves one activation row")
    args = (x2, hi2, lo4, scale, bias_t if bias_t is not None else scale, y,
            m, n, k, hi2.shape[1], x2.stride(0), scale.stride(0), y.stride(0), m_bucket(m))
    path = kernel_path(m, torch_matmul_min_m)
    tuner, configs = {"gemv": (_gemv, GEMV_CONFIGS), "skinny": (_skinny, SKINNY_CONFIGS)}.get(
        path, (_tiled, TILED_CONFIGS))
    # RAW_DOT asks for the raw-h tensor-core path; the kernel takes it where the config's slices allow it
    consts: dict[str, Any] = dict(GROUP=group, HAS_BIAS=bias_t is not None, RAW_DOT=x.dtype == torch.float16,
                                  DOT_IEEE=x.dtype == torch.float32, **consts_fmt)
    if config is None and INTERPRET:
        named = dict(zip(tuner.arg_names, args))
        config = _prune(configs, named, **consts)[0]
    if config is not None:
        kw = dict(config.kwargs)
        grid = (triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(n, kw["BLOCK_N"]), kw["SPLIT_K"])
        if kw["SPLIT_K"] > 1:
            y.zero_()
        _fp6_linear_kernel[grid](*args, **consts, **kw, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        def grid(meta: dict[str, Any]) -> tuple[int, int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
        tuner[grid](*args, **consts)
    return y.reshape(*lead, n)


def _word_gemv_launch(x2: torch.Tensor, hi2: torch.Tensor, lo4: torch.Tensor, scale: torch.Tensor,
                      bias_t: torch.Tensor | None, y: torch.Tensor, n: int, k: int, group: int, factor: float,
                      config: triton.Config | None) -> None:
    """Launch :func:`_fp6_gemv_words_kernel` for one row ``x2 [1, K]`` into ``y [1, N]``."""
    hw = hi2.view(torch.int32)
    lw = lo4.view(torch.int64)
    # 16-bit activations are read as int64 words (4 a word) where the row allows it, else element by element
    x_words = x2.element_size() == 2 and k % 4 == 0 and x2.data_ptr() % 8 == 0
    xw = x2.view(torch.int64) if x_words else x2
    args = (x2, xw, hw, lw, scale, bias_t if bias_t is not None else scale, y, n, k, hw.stride(0), scale.stride(0))
    consts = dict(FACTOR=factor, GROUP=group, HAS_BIAS=bias_t is not None, X_WORDS=x_words, ASM=not INTERPRET)
    if config is None and INTERPRET:
        config = _word_prune(WORD_GEMV_CONFIGS, dict(zip(_word_gemv.arg_names, args)), **consts)[0]
    if config is not None:
        kw = dict(config.kwargs)
        if kw["SPLIT_K"] > 1:
            y.zero_()
        grid = (triton.cdiv(n, kw["BLOCK_N"]), kw["SPLIT_K"])
        _fp6_gemv_words_kernel[grid](*args, **consts, **kw, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        def grid(meta: dict[str, Any]) -> tuple[int, int]:
            return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
        _word_gemv[grid](*args, **consts)


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (the CPU test that keeps the kernels real between GPU runs)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FP6KernelVariant:
    """One concrete specialisation of a kernel, enough for ``triton.compile(ASTSource(...))``."""

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    #: True for the paths that must use tensor cores
    uses_dot: bool


def aot_variants() -> list[FP6KernelVariant]:
    """Representative E3M2 specialisations of every path, FP16 activations: per channel and groups of 128."""
    sig = {"x_ptr": "*fp16", "hi_ptr": "*u8", "lo_ptr": "*u8", "s_ptr": "*fp32", "b_ptr": "*fp16", "y_ptr": "*fp16",
           "M": "i32", "N": "i32", "K": "i32", "KH": "i32", "stride_xm": "i32", "stride_sn": "i32",
           "stride_ym": "i32", "M_BUCKET": "i32"}
    fmt = _format_consts(3, 3)
    out: list[FP6KernelVariant] = []
    paths = [("gemv", GEMV_CONFIGS[0], False), ("gemv_splitk", GEMV_CONFIGS[6], False),
             ("skinny_splitk", SKINNY_CONFIGS[0], True), ("tiled", TILED_CONFIGS[0], True)]
    for lname, group in (("perchan", 0), ("g128", 128)):
        for pname, cfg, dot in paths:
            consts = dict(GROUP=group, HAS_BIAS=False, RAW_DOT=True, DOT_IEEE=False, **fmt, **cfg.kwargs)
            out.append(FP6KernelVariant(f"fp6_{pname}_{lname}", _fp6_linear_kernel, dict(sig), consts,
                                        cfg.num_warps, cfg.num_stages, dot))
    # the word GEMV (M == 1), with the inline-PTX FP16 -> float32 conversion the GPU runs
    wsig = {"x_ptr": "*fp16", "xw_ptr": "*i64", "hi_ptr": "*i32", "lo_ptr": "*i64", "s_ptr": "*fp32",
            "b_ptr": "*fp16", "y_ptr": "*fp16", "N": "i32", "K": "i32", "stride_w": "i32", "stride_sn": "i32"}
    for lname, group, cfg in (("perchan", 0, WORD_GEMV_CONFIGS[1]), ("g128", 128, WORD_GEMV_CONFIGS[0]),
                              ("splitk_g128", 128, WORD_GEMV_CONFIGS[3])):
        consts = dict(FACTOR=fmt["FACTOR"], GROUP=group, HAS_BIAS=True, X_WORDS=True, ASM=True, **cfg.kwargs)
        out.append(FP6KernelVariant(f"fp6_word_gemv_{lname}", _fp6_gemv_words_kernel, dict(wsig), consts,
                                    cfg.num_warps, cfg.num_stages, False))
    dsig = {"hi_ptr": "*u8", "lo_ptr": "*u8", "s_ptr": "*fp32", "w_ptr": "*fp16", "N": "i32", "K": "i32",
            "KH": "i32", "stride_sn": "i32", "stride_wn": "i32"}
    out.append(FP6KernelVariant("fp6_dequant_g128", _fp6_dequant_kernel, dsig,
                                dict(GROUP=128, RAW=False, BLOCK_N=32, BLOCK_K=64, **fmt), 4, 1, False))
    return out


def aot_report(arch: int) -> list[dict[str, Any]]:
    """Compile every :func:`aot_variants` entry for ``sm_<arch>`` (no GPU needed) and read the cubin's resources.

    Returns one dict per variant: name, registers, stack and local bytes (spills), and whether the PTX holds
    tensor-core instructions (``mma`` / ``wgmma``). Needs real ``@triton.jit`` functions, so it must run
    without ``TRITON_INTERPRET`` (the test runs ``python -m fxquant.backends.triton_fp6 --aot <arch>``).
    """
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in aot_variants():
            sig = dict(v.signature)
            sig.update({k: "constexpr" for k in v.constexprs})
            kernel = triton.compile(ASTSource(fn=v.fn, signature=sig, constexprs=v.constexprs),
                                    target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": v.num_warps, "num_stages": v.num_stages})
            path = os.path.join(tmp, f"{v.name}.cubin")
            with open(path, "wb") as f:
                f.write(kernel.asm["cubin"])
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                                   check=True).stdout
            m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
            if m is None:
                raise RuntimeError(f"cuobjdump printed no resource usage for {v.name}: {usage}")
            ptx = kernel.asm["ptx"]
            out.append({"name": v.name, "arch": arch, "registers": int(m[1]), "stack": int(m[2]), "local": int(m[3]),
                        "uses_dot": v.uses_dot, "mma": bool(re.search(r"\bmma\.", ptx)),
                        "wgmma": bool(re.search(r"\bwgmma\.", ptx)), "ld_global": ptx.count("ld.global")})
    return out


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="ahead-of-time compile the FP6 kernels and report resources")
    parser.add_argument("--aot", type=int, nargs="+", required=True, help="SM architectures, e.g. 80 90")
    ns = parser.parse_args()
    if INTERPRET:
        raise SystemExit("unset TRITON_INTERPRET: the AOT compile needs real @triton.jit functions")
    print(json.dumps([row for arch in ns.aot for row in aot_report(arch)]))
