"""The Triton integer-only kernels (:mod:`fxquant.backends.triton_intops`) equal the reference
(:mod:`fxquant.backends.intops`) bit for bit: same codes, same scale mantissas and exponents, same dtypes and shapes.

Without a CUDA GPU the kernels run under ``TRITON_INTERPRET=1`` (set by conftest), so the shapes stay small; the
property tests draw a seed and a few structural choices (shape, which special rows/columns) and build the tensors
from them: outlier channels, all-equal rows, zero rows, codes at their maximal magnitude (int8 ±127,
int16 ±32767), masked rows (a fully masked one too). The reference always runs on the CPU (torch has no CUDA
integer matmul). The last test compiles every kernel ahead of time for sm_80 and sm_90 (no GPU needed).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.triton

import triton.language as tl  # noqa: E402

from fxquant.backends import intops as R  # noqa: E402
from fxquant.backends import triton_intops as T  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
SPECIALS = ["none", "outliers", "equal_row", "zero_row", "extreme"]


# ---- helpers -----------------------------------------------------------------------------------------------------
def _dev(*ts):
    return tuple(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in ts)


def assert_same(got, want, what: str = "") -> None:
    """``torch.equal`` on every returned tensor, with the dtype and the shape."""
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        g = g.cpu()
        assert g.dtype == w.dtype, f"{what}[{i}]: dtype {g.dtype} != {w.dtype}"
        assert g.shape == w.shape, f"{what}[{i}]: shape {tuple(g.shape)} != {tuple(w.shape)}"
        if not torch.equal(g, w):
            bad = (g.long() != w.long()).nonzero()[:5].tolist()
            raise AssertionError(f"{what}[{i}]: {int((g.long() != w.long()).sum())} differences, first at {bad}: "
                                 f"got {[g[tuple(b)].item() for b in bad]}, want {[w[tuple(b)].item() for b in bad]}")


def codes(gen: torch.Generator, shape: tuple[int, ...], qmax: int, special: str, dtype: torch.dtype,
          lo: int | None = None) -> torch.Tensor:
    """Random codes in ``[lo, qmax]`` (``lo = -qmax`` by default) with one special structure."""
    lo = -qmax if lo is None else lo
    x = torch.randint(lo, qmax + 1, shape, generator=gen, dtype=torch.int64)
    if special == "outliers" and shape[-1] > 1:
        small = max(1, (qmax - lo) // 40)
        x = torch.randint(max(lo, -small), small + 1, shape, generator=gen)
        cols = torch.randperm(shape[-1], generator=gen)[:2]
        x[..., cols] = torch.randint(lo, qmax + 1, x[..., cols].shape, generator=gen)
    elif special == "equal_row":
        x.reshape(-1, shape[-1])[0] = int(torch.randint(lo, qmax + 1, (), generator=gen))
    elif special == "zero_row":
        x.reshape(-1, shape[-1])[0] = 0
    elif special == "extreme":
        flip = torch.rand(shape, generator=gen) < 0.5
        x = torch.where(flip, torch.where(torch.rand(shape, generator=gen) < 0.5, lo, qmax), x)
    return x.to(dtype)


def row_scale(gen: torch.Generator, lead: tuple[int, ...], klo: int = -4, khi: int = 30
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised per-row scale ``(m, k)``: ``2^14 <= m < 2^15``."""
    m = torch.randint(1 << 14, 1 << 15, lead + (1,), generator=gen)
    k = torch.randint(klo, khi, lead + (1,), generator=gen)
    return m, k


# ---- requantization ------------------------------------------------------------------------------------------------
@settings(max_examples=15, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1), rows=st.integers(1, 6), cols=st.integers(1, 80),
       mag=st.sampled_from([7, 127, 32767, 2 ** 40, 2 ** 58, 2 ** 62]), bits=st.sampled_from([2, 4, 8, 16, 24]),
       unsigned=st.booleans(), special=st.sampled_from(SPECIALS))
def test_requantize_rows(seed: int, rows: int, cols: int, mag: int, bits: int, unsigned: bool, special: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = codes(gen, (rows, cols), mag, special, torch.int64, lo=0 if unsigned else None)
    m = torch.randint(0, 1 << 40, (rows, 1), generator=gen)
    m[-1] = 0 if rows > 2 else m[-1]                       # a zero scale: zero m, k, codes still computed
    k = torch.randint(-20, 40, (rows, 1), generator=gen)
    want = R.requantize_rows(x, m, k, bits, unsigned=unsigned)
    assert_same(T.requantize_rows(*_dev(x, m, k), bits, unsigned=unsigned), want, "requantize_rows")


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("amax", [3, 1000, (1 << 30) + 12345, (1 << 44) - 7, (1 << 54) - 3, (1 << 62) - 1])
def test_requantize_rounding_boundaries(bits: int, amax: int) -> None:
    """Every code boundary ``x · qmax / a = j ± 1/2``, one off each side: the per-row reciprocal division (and the
    pre-shift of rows above 2^(62 - bits)) must round exactly as ``div_round``."""
    qmax = (1 << (bits - 1)) - 1
    js = sorted({round(-qmax + i * 2 * qmax / 96) for i in range(97)})
    # x around (2j - 1) · a / (2 qmax): the value whose code is j - 1/2 exactly, and its neighbours
    xs = [min(max(((2 * j - 1) * amax) // (2 * qmax) + d, -amax), amax) for j in js for d in (-1, 0, 1)]
    xs = torch.tensor(xs, dtype=torch.int64)
    x = torch.cat([xs, torch.tensor([amax, -amax])]).reshape(1, -1)
    x = torch.cat([x, x.flip(-1) // 3])
    m = torch.tensor([[1 << 14], [23456]])
    k = torch.tensor([[10], [-3]])
    assert_same(T.requantize_rows(*_dev(x, m, k), bits), R.requantize_rows(x, m, k, bits), "boundaries")


@triton.jit
def _helpers_kernel(n_ptr, d_ptr, sqrt_ptr, quot_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    n = tl.load(n_ptr + offs)
    d = tl.load(d_ptr + offs)
    tl.store(sqrt_ptr + offs, T._isqrt(n))
    m, s1, s2 = T._udiv_magic(d)
    tl.store(quot_ptr + offs, T._udiv(n, m, s1, s2))


def test_isqrt_and_exact_division_helpers() -> None:
    """The kernels' integer square root (digit by digit) equals ``intops.isqrt`` (Newton), and the multiply-high
    division equals floor division, on edge values and random ones up to 2^62."""
    gen = torch.Generator().manual_seed(5)
    edge = [0, 1, 2, 3, 4, 15, 16, 17, (1 << 31) - 1, 1 << 32, (1 << 62) - 1, (1 << 61) + 12345]
    sq = [v * v for v in (1, 3, 46340, 3037000499)] + [v * v - 1 for v in (2, 46341, 3037000499)]
    n = torch.tensor(edge + sq + [0] * (64 - len(edge) - len(sq)), dtype=torch.int64)
    n[len(edge) + len(sq):] = torch.randint(0, 1 << 62, (64 - len(edge) - len(sq),), generator=gen)
    d = torch.randint(1, 1 << 40, (64,), generator=gen)
    d[:8] = torch.tensor([1, 2, 3, 7, 1 << 20, (1 << 33) + 1, (1 << 61) - 1, 6])
    out_sqrt, out_q = torch.empty_like(n), torch.empty_like(n)
    nd, dd, sd, qd = _dev(n, d, out_sqrt, out_q)
    _helpers_kernel[(1,)](nd, dd, sd, qd, N=64)
    assert torch.equal(sd.cpu(), R.isqrt(n))
    assert torch.equal(qd.cpu(), torch.div(n, d, rounding_mode="floor"))
    for dv in (1, 2, 3, 1152, 8200, (1 << 40) + 3):               # the host-side multipliers of the norm kernels
        m, s1, s2 = T.udiv_magic(dv)
        m %= 1 << 64
        for nv in (0, 1, dv - 1, dv, dv + 1, (1 << 63) - 1):
            t = (m * nv) >> 64
            assert (t + ((nv - t) >> s1)) >> s2 == nv // dv


# ---- DI-Linear -----------------------------------------------------------------------------------------------------
@settings(max_examples=12, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1), lead=st.sampled_from([(1,), (5,), (17,), (2, 3)]), k=st.integers(1, 70),
       n=st.integers(1, 40), bias=st.booleans(), bits=st.sampled_from([4, 8, 16]), special=st.sampled_from(SPECIALS))
def test_di_linear(seed: int, lead: tuple[int, ...], k: int, n: int, bias: bool, bits: int, special: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = codes(gen, lead + (k,), 127, special, torch.int8)
    w = codes(gen, (n, k), 127, "outliers" if special == "none" else special, torch.int8)
    xm, xk = row_scale(gen, lead)
    wm = torch.randint(0, 1 << 24, (n,), generator=gen)
    wm[0] = 0                                                  # a column with a zero multiplier
    wk = int(torch.randint(0, 30, (), generator=gen))
    b = torch.randint(-(1 << 30), 1 << 30, (n,), generator=gen) if bias else None
    bias_k = int(torch.randint(-10, 60, (), generator=gen))
    want = R.di_linear(x, xm, xk, w, wm, wk, b, bias_k, bits)
    got = T.di_linear(*_dev(x, xm, xk, w, wm), wk, *_dev(b), bias_k, bits)
    assert_same(got, want, "di_linear")


def test_di_linear_non_int8_codes_and_zero_scale() -> None:
    """int16 activations take torch's integer matmul for ``P`` (then the same Triton requantization); a row with a
    zero scale keeps its codes and gets a zero scale."""
    gen = torch.Generator().manual_seed(1)
    x = codes(gen, (3, 20), 32767, "extreme", torch.int16)
    w = codes(gen, (9, 20), 127, "none", torch.int8)
    xm, xk = row_scale(gen, (3,))
    xm[1] = 0
    wm = torch.randint(0, 1 << 20, (9,), generator=gen)
    b = torch.randint(-(1 << 20), 1 << 20, (9,), generator=gen)
    want = R.di_linear(x, xm, xk, w, wm, 7, b, 12, 8)
    assert_same(T.di_linear(*_dev(x, xm, xk, w, wm), 7, *_dev(b), 12, 8), want, "di_linear int16")


# ---- DI-MatMul ---------------------------------------------------------------------------------------------------
@settings(max_examples=12, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1), batch=st.sampled_from([(), (3,), (2, 2)]), m=st.integers(1, 20),
       kdim=st.integers(1, 40), n=st.integers(1, 24),
       layout=st.sampled_from(["col", "tensor", "row", "causal-pv", "causal-qk"]),
       a_unsigned=st.booleans(), bits=st.sampled_from([8, 16]), special=st.sampled_from(SPECIALS))
def test_di_matmul(seed: int, batch: tuple[int, ...], m: int, kdim: int, n: int, layout: str, a_unsigned: bool,
                   bits: int, special: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    if a_unsigned:
        a = codes(gen, batch + (m, kdim), 255, special, torch.uint8, lo=0)
    else:
        a = codes(gen, batch + (m, kdim), 127, special, torch.int8)
    b = codes(gen, batch + (n, kdim), 127, "extreme" if special == "extreme" else "none", torch.int8)
    b = b.transpose(-1, -2)                                    # [.., K, N], K-contiguous (as keys)
    am, ak = row_scale(gen, batch + (m,))
    if layout in ("col", "causal-qk"):   # Q Kᵀ: keys quantized per token = per column of b; exponents far apart
        bm, bk = row_scale(gen, batch + (n,), klo=-10, khi=40)
        bm, bk = bm.transpose(-1, -2), bk.transpose(-1, -2)
    elif layout == "tensor":
        bm, bk = row_scale(gen, batch + (1,))
    else:                      # P V: values per token = per row of b (folded into a), b made N-contiguous
        b = b.contiguous()
        bm, bk = row_scale(gen, batch + (kdim,), klo=-10, khi=40)
        bm[..., 0, :] = 0                                      # a key with a zero scale
    # causal attention: the keys' scales aligned per row over the keys it sees (m rows after kdim - m or n - m
    # cached keys, or fewer keys than rows)
    causal = {"causal-pv": "reduction", "causal-qk": "columns"}.get(layout, "")
    want = R.di_matmul(a, am, ak, b, bm, bk, bits, a_unsigned=a_unsigned, causal=causal)
    got = T.di_matmul(*_dev(a, am, ak, b, bm, bk), bits, a_unsigned=a_unsigned, causal=causal)
    assert_same(got, want, f"di_matmul {layout}")


def test_di_matmul_wide_a_falls_back_exactly() -> None:
    """``a_bits=16`` folds ``a`` into int16 codes: no int8 tensor-core product, torch's integer matmul instead."""
    gen = torch.Generator().manual_seed(2)
    a = codes(gen, (2, 5, 12), 255, "none", torch.uint8, lo=0)
    b = codes(gen, (2, 12, 7), 127, "extreme", torch.int8)
    am, ak = row_scale(gen, (2, 5))
    bm, bk = row_scale(gen, (2, 12))
    want = R.di_matmul(a, am, ak, b, bm, bk, 16, a_bits=16, a_unsigned=True)
    assert_same(T.di_matmul(*_dev(a, am, ak, b, bm, bk), 16, a_bits=16, a_unsigned=True), want, "wide a")


# ---- DI-ClippedSoftmax ---------------------------------------------------------------------------------------------
def _mask(gen: torch.Generator, kind: str, rows: int, cols: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "causal":
        return torch.ones(rows, cols, dtype=torch.bool).tril(cols - rows)
    mask = torch.rand(rows, cols, generator=gen) < 0.7
    mask[0] = False                                            # a fully masked row: zeros, zero scale
    return mask


@settings(max_examples=15, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1), heads=st.integers(1, 3), rows=st.integers(1, 6), cols=st.integers(1, 70),
       mask_kind=st.sampled_from(["none", "causal", "random"]), order=st.sampled_from([1, 2]),
       bits=st.sampled_from([4, 8]), normalize_to=st.sampled_from(["max", "sum"]),
       clip=st.sampled_from([15.0, 6.0]), special=st.sampled_from(SPECIALS),
       dtype=st.sampled_from([torch.int16, torch.int32]))
def test_di_clipped_softmax(seed: int, heads: int, rows: int, cols: int, mask_kind: str, order: int, bits: int,
                            normalize_to: str, clip: float, special: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    qmax = 32767 if dtype == torch.int16 else (1 << 30)
    s = codes(gen, (heads, rows, cols), qmax, special, dtype)
    m, k = row_scale(gen, (heads, rows), klo=10, khi=40)
    mask = _mask(gen, mask_kind, rows, cols)
    kw = dict(clip=clip, order=order, bits=bits, normalize_to=normalize_to)
    want = R.di_clipped_softmax(s, m, k, mask, **kw)
    got = T.di_clipped_softmax(*_dev(s, m, k, mask), **kw)
    assert_same(got, want, "softmax")


def test_di_clipped_softmax_long_rows() -> None:
    """Rows longer than one register block (4100 > 4096 columns) are streamed in blocks; one row fully masked."""
    gen = torch.Generator().manual_seed(3)
    s = codes(gen, (2, 4100), 32767, "extreme", torch.int16)
    m, k = row_scale(gen, (2,), klo=18, khi=24)
    mask = torch.rand(2, 4100, generator=gen) < 0.9
    mask[1, :] = False
    for msk in (None, mask):
        assert_same(T.di_clipped_softmax(*_dev(s, m, k, msk)), R.di_clipped_softmax(s, m, k, msk), "softmax long")


# ---- DI-Norm -----------------------------------------------------------------------------------------------------
@settings(max_examples=15, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1), lead=st.sampled_from([(1,), (4,), (2, 3)]), cols=st.integers(1, 80),
       layer=st.booleans(), beta=st.booleans(), bits=st.sampled_from([4, 8, 16]),
       eps=st.sampled_from([1e-6, 1e-5, 1e-2]), special=st.sampled_from(SPECIALS),
       dtype=st.sampled_from([torch.int8, torch.int16]))
def test_di_norm(seed: int, lead: tuple[int, ...], cols: int, layer: bool, beta: bool, bits: int, eps: float,
                 special: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = codes(gen, lead + (cols,), 127 if dtype == torch.int8 else 32767, special, dtype)
    m, k = row_scale(gen, lead, klo=-2, khi=30)
    gamma = torch.randint(-(1 << 15) + 1, 1 << 15, (cols,), generator=gen)
    gamma_k = int(torch.randint(8, 20, (), generator=gen))
    if layer:
        b = torch.randint(-(1 << 24), 1 << 24, (cols,), generator=gen) if beta else None
        want = R.di_layernorm(x, m, k, gamma, b, gamma_k, eps=eps, bits=bits)
        got = T.di_layernorm(*_dev(x, m, k, gamma, b), gamma_k, eps=eps, bits=bits)
    else:
        want = R.di_rmsnorm(x, m, k, gamma, gamma_k, eps=eps, bits=bits)
        got = T.di_rmsnorm(*_dev(x, m, k, gamma), gamma_k, eps=eps, bits=bits)
    assert_same(got, want, "layernorm" if layer else "rmsnorm")


@settings(max_examples=6, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1), layer=st.booleans(), eps=st.sampled_from([1e-6, 1e-5]))
def test_di_norm_tiny_scales_saturate_eps_alike(seed: int, layer: bool, eps: float) -> None:
    """Row scales down to 2^-75 (exponents up to 90): ``eps / scale²`` past its saturation point, bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    x = codes(gen, (6, 33), 32767, "zero_row", torch.int16)
    m, k = row_scale(gen, (6,), klo=20, khi=90)
    m[1] = 0                                                      # a zero scale too
    gamma = torch.randint(1, 1 << 15, (33,), generator=gen)
    if layer:
        want = R.di_layernorm(x, m, k, gamma, None, 14, eps=eps, bits=16)
        got = T.di_layernorm(*_dev(x, m, k, gamma), None, 14, eps=eps, bits=16)
    else:
        want = R.di_rmsnorm(x, m, k, gamma, 14, eps=eps, bits=16)
        got = T.di_rmsnorm(*_dev(x, m, k, gamma), 14, eps=eps, bits=16)
    assert_same(got, want, "norm, tiny scales")


def test_di_add_with_zero_rows() -> None:
    """A row of one operand with scale 0 (exponent 0) takes the other operand's exponent, in both implementations."""
    gen = torch.Generator().manual_seed(2)
    a = codes(gen, (4, 24), 32767, "zero_row", torch.int16)
    b = codes(gen, (4, 24), 32767, "none", torch.int16)
    am, ak = row_scale(gen, (4,), klo=20, khi=40)
    bm, bk = row_scale(gen, (4,), klo=20, khi=40)
    am[0], ak[0] = 0, 0
    bm[2], bk[2] = 0, 0
    want = R.di_add(a, am, ak, b, bm, bk, 16)
    assert_same(T.di_add(*_dev(a, am, ak, b, bm, bk), 16), want, "di_add zero rows")


def test_di_norm_long_rows() -> None:
    """4100 columns: the streamed (multi-pass) row mode of both norms."""
    gen = torch.Generator().manual_seed(4)
    x = codes(gen, (1, 4100), 32767, "outliers", torch.int16)
    m, k = row_scale(gen, (1,))
    gamma = torch.randint(1, 1 << 15, (4100,), generator=gen)
    beta = torch.randint(-(1 << 20), 1 << 20, (4100,), generator=gen)
    assert_same(T.di_rmsnorm(*_dev(x, m, k, gamma), 14), R.di_rmsnorm(x, m, k, gamma, 14), "rmsnorm long")
    assert_same(T.di_layernorm(*_dev(x, m, k, gamma, beta), 14), R.di_layernorm(x, m, k, gamma, beta, 14),
                "layernorm long")


# ---- element-wise ------------------------------------------------------------------------------------------------
@settings(max_examples=15, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1), lead=st.sampled_from([(1,), (3,), (2, 2)]), cols=st.integers(1, 70),
       op=st.sampled_from(["add", "mul", "mul_none", "silu", "silu_none", "gelu", "tanh", "swiglu"]),
       order=st.sampled_from([1, 2]), bits=st.sampled_from([4, 8, 16]), special=st.sampled_from(SPECIALS),
       dtype=st.sampled_from([torch.int8, torch.int16]))
def test_elementwise(seed: int, lead: tuple[int, ...], cols: int, op: str, order: int, bits: int, special: str,
                     dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    qmax = 127 if dtype == torch.int8 else 32767
    a = codes(gen, lead + (cols,), qmax, special, dtype)
    b = codes(gen, lead + (cols,), qmax, "extreme" if special == "extreme" else "none", dtype)
    am, ak = row_scale(gen, lead, klo=0, khi=30)
    bm, bk = row_scale(gen, lead, klo=0, khi=30)
    if op == "add":
        want, got = R.di_add(a, am, ak, b, bm, bk, bits), T.di_add(*_dev(a, am, ak, b, bm, bk), bits)
    elif op in ("mul", "mul_none"):
        bb = None if op == "mul_none" else bits
        want, got = R.di_mul(a, am, ak, b, bm, bk, bb), T.di_mul(*_dev(a, am, ak, b, bm, bk), bb)
    elif op in ("silu", "silu_none"):
        bb = None if op == "silu_none" else bits
        want = R.di_silu(a, am, ak, bits=bb, order=order)
        got = T.di_silu(*_dev(a, am, ak), bits=bb, order=order)
    elif op == "gelu":
        want, got = R.di_gelu(a, am, ak, bits=bits, order=order), T.di_gelu(*_dev(a, am, ak), bits=bits, order=order)
    elif op == "tanh":
        want, got = R.di_tanh(a, am, ak, bits=bits, order=order), T.di_tanh(*_dev(a, am, ak), bits=bits, order=order)
    else:
        want = R.di_swiglu(a, am, ak, b, bm, bk, bits, order=order)
        got = T.di_swiglu(*_dev(a, am, ak, b, bm, bk), bits, order=order)
    assert_same(got, want, op)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("special", SPECIALS)
def test_tanh_equals_reference(order: int, special: str) -> None:
    """DI-Tanh (the soft-caps): every special code pattern, odd row lengths, 8 and 16-bit outputs, bit for bit."""
    gen = torch.Generator().manual_seed(order)
    for cols, bits in ((1, 16), (37, 8), (70, 16)):
        a = codes(gen, (3, cols), 32767, special, torch.int16)
        am, ak = row_scale(gen, (3,), klo=0, khi=30)
        assert_same(T.di_tanh(*_dev(a, am, ak), bits=bits, order=order),
                    R.di_tanh(a, am, ak, bits=bits, order=order), "tanh")


def test_swiglu_rejects_wide_codes() -> None:
    x = torch.zeros(2, 4, dtype=torch.int32)
    m = torch.ones(2, 1, dtype=torch.int64)
    with pytest.raises(ValueError):
        T.di_swiglu(*_dev(x, m, m, x, m, m))


# ---- ahead-of-time compilation -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def aot_rows() -> list[dict]:
    if not CUOBJDUMP.exists():
        pytest.skip(f"the triton wheel has no cuobjdump at {CUOBJDUMP}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "fxquant.backends.triton_intops"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_aot_every_kernel_compiles(aot_rows: list[dict]) -> None:
    names = {r["name"] for r in aot_rows}
    assert {r["arch"] for r in aot_rows} == {80, 90}
    for prefix in ("gemm_large", "gemm_mid", "gemm_small", "gemm_uint8", "requant_", "rowmax_", "softmax_single",
                   "softmax_loop", "rmsnorm_single", "rmsnorm_loop", "layernorm_loop"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert len(aot_rows) == sum(len(v.archs) for v in T.aot_variants())


def test_aot_no_spills_and_int8_tensor_cores(aot_rows: list[dict]) -> None:
    problems = []
    for r in aot_rows:
        tag = f"{r['name']} sm_{r['arch']}"
        if r["local"] or r["stack"]:
            problems.append(f"{tag}: spills (LOCAL {r['local']}, STACK {r['stack']}, {r['registers']} registers)")
        if r["registers"] > 255:
            problems.append(f"{tag}: {r['registers']} registers")
        if r["uses_dot"] and not (r["int8_mma"] and r["sass_imma"]):
            problems.append(f"{tag}: no int8 tensor-core MMA (PTX s8 mma {r['int8_mma']}, SASS IMMA {r['sass_imma']})")
    large90 = [r for r in aot_rows if r["name"].startswith("gemm_large") and r["arch"] == 90]
    assert large90 and all(r["wgmma"] for r in large90), "the large sm_90 GEMM tiles should use wgmma"
    assert not problems, "\n".join(problems)
