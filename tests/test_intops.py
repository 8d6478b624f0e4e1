"""The integer-only reference operators (fxquant.backends.intops): exact integer helpers, error against the float
functions within the bounds derived in fxquant.backends.dyadic, edge cases, and "no float inside"."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fxquant.backends import intops as I
from fxquant.backends.dyadic import constants, dyadic

F64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def deq(q, m, k):
    return I.dequantize(q, m, k, F64)


def _rows(seed: int, rows: int, cols: int, scale: float = 3.0, outliers: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=F64) * scale
    if outliers and cols > 4:
        x[:, torch.randint(0, cols, (2,), generator=g)] *= 40.0
    return x


# ---- integer helpers ---------------------------------------------------------------------------------------
@SETTINGS
@given(st.lists(st.integers(0, 2 ** 62), min_size=1, max_size=50))
def test_bitlen_matches_python(vals):
    t = torch.tensor(vals, dtype=torch.int64)
    assert I.bitlen(t).tolist() == [v.bit_length() for v in vals]


@SETTINGS
@given(st.lists(st.integers(-2 ** 50, 2 ** 50), min_size=1, max_size=30), st.integers(-10, 40))
def test_shift_round_and_div_round_match_python(vals, s):
    t = torch.tensor(vals, dtype=torch.int64)
    want = [math.floor(Fraction(v, 2 ** s) + Fraction(1, 2)) if s > 0 else v * 2 ** -s for v in vals]  # exact
    assert I.shift_round(t, s).tolist() == want
    assert I.shift_round(t, torch.full_like(t, s)).tolist() == want
    assert I.shift_round(t, torch.full((1,), s, dtype=torch.int64)).tolist() == want
    b = 7
    assert I.div_round(t, b).tolist() == [(2 * v + b) // (2 * b) for v in vals]


def test_isqrt_exhaustive_small_and_random_large():
    n = torch.arange(0, 1 << 16, dtype=torch.int64)
    r = I.isqrt(n)
    assert bool(((r * r <= n) & ((r + 1) * (r + 1) > n)).all())
    g = torch.Generator().manual_seed(0)
    big = torch.randint(0, 1 << 62, (20000,), generator=g, dtype=torch.int64)
    sq = torch.arange(1, 3037000499, 7919, dtype=torch.int64)[:20000] ** 2          # perfect squares up to 2^63
    for n in (big, sq, sq - 1, sq + 1):
        r = I.isqrt(n)
        assert bool(((r * r <= n) & ((r + 1) * (r + 1) > n)).all())


@SETTINGS
@given(st.lists(st.integers(1, 2 ** 61), min_size=1, max_size=30), st.integers(-20, 60))
def test_normalize_is_a_15_bit_mantissa_within_2e_15(vals, k):
    num = torch.tensor(vals, dtype=torch.int64)
    m, kk = I.normalize(num, k)
    assert bool(((m >= 2 ** 14) & (m < 2 ** 15)).all())
    rel = (m.double() * torch.pow(2.0, -kk.double()) - num.double() * 2.0 ** -k).abs() / (num.double() * 2.0 ** -k)
    assert float(rel.max()) <= 2.0 ** -15 + 1e-12
    m0, k0 = I.normalize(torch.zeros(1, dtype=torch.int64), 5)
    assert int(m0) == 0 and int(k0) == 0


# ---- requantization --------------------------------------------------------------------------------------------
@SETTINGS
@given(st.integers(0, 10 ** 6), st.integers(1, 5), st.integers(2, 300), st.sampled_from([4, 8, 16]),
       st.booleans())
def test_quantize_rows_error_is_half_a_step(seed, rows, cols, bits, unsigned):
    x = _rows(seed, rows, cols)
    if unsigned:
        x = x.abs()
    x[0] = 0.0                                                              # an all-zero row
    q, m, k = I.quantize_rows(x, bits, unsigned=unsigned)
    assert q.dtype == I.int_dtype(bits, unsigned)
    step = m.double() * torch.pow(2.0, -k.double())
    assert bool(((deq(q, m, k) - x).abs() <= step / 2 * (1 + 1e-9) + 1e-300).all())
    assert bool((q[0] == 0).all()) and int(m[0]) == 0


@SETTINGS
@given(st.integers(0, 10 ** 6), st.integers(2, 200), st.sampled_from([8, 16]), st.integers(0, 50))
def test_requantize_rows_is_within_a_step_of_the_exact_value(seed, cols, bits, extra_shift):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-(2 ** 40), 2 ** 40, (4, cols), generator=g, dtype=torch.int64)
    x[1] = 0
    x[2] = 2 ** 61                                                          # maximal magnitude: pre-shifted
    m = torch.full((4, 1), 21000, dtype=torch.int64)
    k = torch.full((4, 1), 30 + extra_shift, dtype=torch.int64)
    q, m2, k2 = I.requantize_rows(x, m, k, bits)
    exact = x.double() * (m.double() * torch.pow(2.0, -k.double()))
    step = m2.double() * torch.pow(2.0, -k2.double())
    err = (deq(q, m2, k2) - exact).abs()
    assert bool((err <= step * 0.5 + exact.abs() * 2.0 ** -13 + 1e-300).all())
    assert bool((q[1] == 0).all())
    assert q.abs().max() <= 2 ** (bits - 1) - 1


# ---- DI-Exp / softmax ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [1, 2])
def test_di_exp_within_the_derived_bound(order):
    c = constants()
    x = torch.linspace(-16.5, 0, 4001, dtype=F64)[None]
    q, m, k = I.quantize_rows(x, 16)
    v = deq(q, m, k)
    e = I.di_exp(q, m, k, order=order).double() / 2 ** 15
    ref = torch.exp(v)
    bound = c.exp_rel_bound(order) * ref + 2 * 2.0 ** -15
    assert bool(((e - ref).abs() <= bound).all()), float(((e - ref).abs() - bound).max())
    assert bool((e[:, 1:] >= e[:, :-1]).all())                       # monotone in x
    assert int(I.di_exp(torch.zeros(1, 1, dtype=torch.int64), m[:, :1], k[:, :1]).item()) == 2 ** 15


def test_derived_bounds_match_the_papers():
    c = constants()
    assert 0.0614 < c.exp2_order1_rel < 0.0616                      # METHODS.md: "<= 6.2% relative"
    assert c.exp2_order2_rel < 0.0035
    assert c.log2e_rel < 2.0 ** -15
    assert 0.015 < c.gelu_abs < 0.025
    d = dyadic(1 / 3)
    assert 2 ** 14 <= d.m < 2 ** 15 and abs(d.approx - 1 / 3) <= 2.0 ** -16


def _softmax_bound(p_ref: torch.Tensor, order: int, bits: int = 8, clip: float = 15.0) -> torch.Tensor:
    delta = constants().exp_rel_bound(order)
    pmax = p_ref.amax(-1, keepdim=True)
    n = p_ref.shape[-1]
    return 2.2 * delta * p_ref + 0.5 * pmax / (2 ** bits - 1) * 1.01 + n * math.exp(-clip) + 2 * n * 2.0 ** -15


@SETTINGS
@given(st.integers(0, 10 ** 6), st.integers(1, 4), st.integers(1, 200), st.floats(0.1, 20.0), st.sampled_from([1, 2]))
def test_clipped_softmax_within_bound(seed, rows, cols, scale, order):
    s = _rows(seed, rows, cols, scale=scale, outliers=False)
    q, m, k = I.quantize_rows(s, 16)
    p, pm, pk = I.di_clipped_softmax(q, m, k, order=order)
    assert p.dtype == torch.uint8
    ref = torch.softmax(deq(q, m, k), -1)
    got = deq(p, pm, pk)
    assert bool(((got - ref).abs() <= _softmax_bound(ref, order)).all())


def test_clipped_softmax_edge_cases():
    # all-equal rows -> uniform; a fully masked row -> zeros; long rows (4096); masked entries get exactly 0
    s = torch.zeros(3, 4096, dtype=torch.int64)
    s[1] = torch.arange(4096) * 7 - 10000
    m = torch.full((3, 1), 20000, dtype=torch.int64)
    k = torch.full((3, 1), 24, dtype=torch.int64)
    mask = torch.ones(3, 4096, dtype=torch.bool)
    mask[2] = False
    mask[1, :100] = False
    p, pm, pk = I.di_clipped_softmax(s, m, k, mask)
    got = deq(p, pm, pk)
    assert torch.allclose(got[0], torch.full((4096,), 1 / 4096, dtype=F64), rtol=0.02)
    assert bool((p[2] == 0).all()) and int(pm[2]) == 0
    assert bool((p[1, :100] == 0).all())
    ref = torch.softmax(torch.where(mask[1], deq(s[1:2], m[1:2], k[1:2])[0], torch.tensor(-math.inf, dtype=F64)), -1)
    assert bool(((got[1] - ref).abs() <= _softmax_bound(ref[None], 2)[0]).all())
    # I-LLM's "sum" normalisation: P = floor(E·255/ΣE) with the scale 1/255
    p2, pm2, pk2 = I.di_clipped_softmax(s[:1], m[:1], k[:1], normalize_to="sum")
    assert abs(float(deq(p2, pm2, pk2).sum()) - 1.0) <= 4096 / 255


# ---- DI-Norm ---------------------------------------------------------------------------------------------------
@SETTINGS
@given(st.integers(0, 10 ** 6), st.integers(1, 4), st.integers(2, 600), st.booleans())
def test_rmsnorm_within_an_output_step(seed, rows, cols, big):
    x = _rows(seed, rows, cols, scale=1000.0 if big else 1.0)
    gamma = torch.rand(cols, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.2
    q, m, k = I.quantize_rows(x, 16)
    gq = torch.round(gamma * 2 ** 14).to(torch.int64)
    y, ym, yk = I.di_rmsnorm(q, m, k, gq, 14, eps=1e-6, bits=8)
    xd = deq(q, m, k)
    ref = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-6) * (gq.double() / 2 ** 14)
    step = ym.double() * torch.pow(2.0, -yk.double())
    assert bool(((deq(y, ym, yk) - ref).abs() <= 0.5 * step + ref.abs().amax(-1, keepdim=True) * 2e-3).all())


def test_norm_edge_cases():
    g = torch.full((4096,), 2 ** 14, dtype=torch.int64)
    m = torch.full((3, 1), 20000, dtype=torch.int64)
    k = torch.full((3, 1), 30, dtype=torch.int64)
    x = torch.zeros(3, 4096, dtype=torch.int64)
    x[1] = 32767                                                      # maximal int16, all equal
    x[2, ::2] = -32767
    x[2, 1::2] = 32767
    y, ym, yk = I.di_rmsnorm(x.to(torch.int16), m, k, g, 14, bits=8)
    assert bool((y[0] == 0).all())                                     # zero variance RMS row -> zeros
    assert torch.allclose(deq(y[1:], ym[1:], yk[1:]).abs(), torch.ones(2, 4096, dtype=F64), rtol=1e-2)
    beta = torch.full((4096,), 3 << 22, dtype=torch.int64)             # β = 3 · 2^22 at 2^-(14 + 8)
    y, ym, yk = I.di_layernorm(x.to(torch.int16), m, k, g, beta, 14, bits=8)
    assert torch.allclose(deq(y[:2], ym[:2], yk[:2]), torch.full((2, 4096), 3.0, dtype=F64), rtol=1e-2)  # -> β
    want = 3.0 + torch.sign(x[2].double())                                # ±1 around the mean, plus β
    assert torch.allclose(deq(y[2], ym[2], yk[2]), want, atol=0.03)


@SETTINGS
@given(st.integers(0, 10 ** 6), st.integers(2, 300), st.floats(-40.0, 2.0), st.sampled_from([1e-6, 1e-5]))
def test_rmsnorm_of_tiny_rows_follows_eps(seed, cols, log2_scale, eps):
    """Rows far below sqrt(eps) (a padding token's zero embedding plus noise, a dying residual): eps dominates and
    the output is ~x/sqrt(eps), near zero, as in float; ``eps / scale²`` saturates high, never low (it once
    saturated at 2^40 and normalised such rows to unit RMS)."""
    x = _rows(seed, 3, cols, scale=2.0 ** log2_scale)
    gamma = torch.rand(cols, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.2
    q, m, k = I.quantize_rows(x, 16)
    gq = torch.round(gamma * 2 ** 14).to(torch.int64)
    for norm in ("rms", "layer"):
        xd = deq(q, m, k)
        if norm == "rms":
            y, ym, yk = I.di_rmsnorm(q, m, k, gq, 14, eps=eps, bits=16)
            var = (xd * xd).mean(-1, keepdim=True)
        else:
            y, ym, yk = I.di_layernorm(q, m, k, gq, None, 14, eps=eps, bits=16)
            xd = xd - xd.mean(-1, keepdim=True)
            var = (xd * xd).mean(-1, keepdim=True)
        ref = xd / torch.sqrt(var + eps) * (gq.double() / 2 ** 14)
        step = ym.double() * torch.pow(2.0, -yk.double())
        # half an output step, the 2^-8 of the RMS's fixed point, the integer mean's rounding (LayerNorm)
        tol = 0.5 * step + ref.abs().amax(-1, keepdim=True) * 4e-3 + (gq.double() / 2 ** 14).max() * 2.0 ** -20
        # where eps / scale² passes its saturation (2^61 in 2^-16 units), eps is underestimated: such a row's
        # output is below 2^15 · 2^8 / 2^30.5 = 2^-7.5 times γ, and that bounds its error too
        scale = m.double() * torch.pow(2.0, -k.double())
        saturated = eps / scale.clamp_min(1e-300) ** 2 * 2 ** 16 >= I.EPS_UNITS_MAX
        tol = torch.where(saturated, tol + 2.0 ** -7.5 * (gq.double() / 2 ** 14).abs().max(), tol)
        assert bool(((deq(y, ym, yk) - ref).abs() <= tol).all()), norm
        assert bool((deq(y, ym, yk).abs() <= 2.0 ** -7.5 * 1.01 * (gq.double() / 2 ** 14).abs().max()
                     )[saturated.expand_as(y)].all())


def test_zero_rows_add_and_linear_like_float():
    """A zero row (scale 0: a padding token's zero embedding) neither drags an add to integer precision (its
    exponent 0 is not the coarser one) nor loses a linear's bias."""
    a = torch.zeros(2, 8, dtype=F64)
    b = _rows(3, 2, 8, scale=1e-3)
    qa, am, ak = I.quantize_rows(a, 16)
    qb, bm, bk = I.quantize_rows(b, 16)
    assert int(am.abs().max()) == 0
    for y, ym, yk in (I.di_add(qa, am, ak, qb, bm, bk, 16), I.di_add(qb, bm, bk, qa, am, ak, 16)):
        assert torch.allclose(deq(y, ym, yk), deq(qb, bm, bk), rtol=2.0 ** -14, atol=0)
    g = torch.Generator().manual_seed(5)
    w = torch.randint(-127, 128, (5, 8), dtype=torch.int8, generator=g)
    wm = torch.full((5,), 1 << 23, dtype=torch.int64)
    bias = torch.randint(-(1 << 20), 1 << 20, (5,), dtype=torch.int64, generator=g)
    y, ym, yk = I.di_linear(qa.to(torch.int8), am, ak, w, wm, 30, bias, 24, bits=16)
    step = ym.double() * torch.pow(2.0, -yk.double())              # the output's per-row quantization step
    exact = (bias.double() / 2 ** 24).expand(2, 5)
    assert bool(((deq(y, ym, yk) - exact).abs() <= step + 1e-15).all())          # requantized: within a step
    assert bool((step <= exact.abs().amax(-1, keepdim=True) * 2.0 ** -14).all())   # a 16-bit grid over the bias


@SETTINGS
@given(st.integers(0, 10 ** 6), st.integers(2, 300))
def test_layernorm_within_an_output_step(seed, cols):
    x = _rows(seed, 3, cols) + 5.0
    gam = torch.rand(cols, dtype=F64) + 0.5
    bet = torch.randn(cols, dtype=F64)
    q, m, k = I.quantize_rows(x, 16)
    gq = torch.round(gam * 2 ** 14).to(torch.int64)
    bq = torch.round(bet * 2 ** 22).to(torch.int64)
    y, ym, yk = I.di_layernorm(q, m, k, gq, bq, 14, eps=1e-5, bits=8)
    ref = torch.nn.functional.layer_norm(deq(q, m, k), (cols,), gq.double() / 2 ** 14, bq.double() / 2 ** 22, 1e-5)
    step = ym.double() * torch.pow(2.0, -yk.double())
    assert bool(((deq(y, ym, yk) - ref).abs() <= 0.5 * step + ref.abs().amax(-1, keepdim=True) * 3e-3).all())


# ---- DI-MatMul -------------------------------------------------------------------------------------------------
@SETTINGS
@given(st.integers(0, 10 ** 6), st.integers(1, 9), st.integers(1, 70), st.integers(1, 40), st.booleans())
def test_di_linear_within_an_output_step(seed, m_rows, kdim, n, with_bias):
    g = torch.Generator().manual_seed(seed)
    x = _rows(seed, m_rows, kdim)
    w = torch.randn(n, kdim, generator=g, dtype=F64)
    w[0] = 0.0
    q, xm, xk = I.quantize_rows(x, 8)
    sw = w.abs().amax(1).clamp_min(1e-8) / 127
    wq = torch.round(w / sw[:, None]).to(torch.int8)
    wk = 23 - math.floor(math.log2(float(sw.max())))
    wm = torch.round(sw * 2 ** wk).to(torch.int64)
    b = torch.round(torch.randn(n, generator=g, dtype=F64) * 2 ** 20).to(torch.int64) if with_bias else None
    y, ym, yk = I.di_linear(q, xm, xk, wq, wm, wk, b, 20, bits=16)
    ref = deq(q, xm, xk) @ (wq.double() * (wm.double() * 2.0 ** -wk)[:, None]).t()
    if b is not None:
        ref = ref + b.double() / 2 ** 20
    step = ym.double() * torch.pow(2.0, -yk.double())
    assert bool(((deq(y, ym, yk) - ref).abs() <= 0.5 * step + ref.abs().amax(-1, keepdim=True) * 2e-4 + 1e-9).all())


@SETTINGS
@given(st.integers(0, 10 ** 6), st.integers(1, 12), st.integers(1, 20), st.integers(1, 12))
def test_di_matmul_both_scale_layouts(seed, m_rows, kdim, n):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2, m_rows, kdim, generator=g, dtype=F64)
    spread = torch.logspace(0, 3, n, dtype=F64)
    bt = torch.randn(2, n, kdim, generator=g, dtype=F64) * spread[None, :, None]       # keys: per-token scales
    qa, am, ak = I.quantize_rows(a, 8)
    qb, bm, bk = I.quantize_rows(bt, 8)
    y, ym, yk = I.di_matmul(qa, am, ak, qb.transpose(-1, -2), bm.transpose(-1, -2), bk.transpose(-1, -2), 16)
    ref = deq(qa, am, ak) @ deq(qb, bm, bk).transpose(-1, -2)
    step = ym.double() * torch.pow(2.0, -yk.double())
    assert bool(((deq(y, ym, yk) - ref).abs() <= 0.5 * step + ref.abs().amax(-1, keepdim=True) * 1e-3).all())
    # P V: a non-negative P, V with per-token scales along the reduction dim (folded into P, 8 bits)
    p = torch.softmax(torch.randn(2, m_rows, n, generator=g, dtype=F64), -1)
    v = torch.randn(2, n, kdim, generator=g, dtype=F64) * torch.logspace(0, 1, n, dtype=F64)[None, :, None]
    qp, pm, pk = I.quantize_rows(p, 8, unsigned=True)
    qv, vm, vk = I.quantize_rows(v, 8)
    y, ym, yk = I.di_matmul(qp, pm, pk, qv, vm, vk, 16, a_unsigned=True)
    ref = deq(qp, pm, pk) @ deq(qv, vm, vk)
    bound = (deq(qp, pm, pk).abs() @ deq(qv, vm, vk).abs()).amax(-1, keepdim=True) * (1 / 255 + 1e-3)
    assert bool(((deq(y, ym, yk) - ref).abs() <= bound + 1e-9).all())


def _causal_pv(seed: int, heads: int, n: int, d: int):
    """A causal P (rows sum to 1 over the keys each row sees, 0 after) and V with per-token scales far apart."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(heads, n, n, generator=g, dtype=F64).masked_fill(~torch.ones(n, n).tril().bool(), -1e9)
    qp, pm, pk = I.quantize_rows(torch.softmax(scores, -1), 8, unsigned=True)
    v = torch.randn(heads, n, d, generator=g, dtype=F64) * torch.logspace(-2, 3, n, dtype=F64)[None, :, None]
    qv, vm, vk = I.quantize_rows(v, 8)
    return qp, pm, pk, qv, vm, vk


@SETTINGS
@given(st.integers(0, 10 ** 6), st.integers(1, 3), st.integers(1, 24), st.integers(1, 16), st.data())
def test_causal_pv_rows_never_see_later_keys(seed, heads, n, d, data):
    """``causal=True``: the first ``t`` rows of ``P V`` are the same with or without the keys after them, and the
    rows of a query block after ``n - t`` cached keys (a KV cache's decode step) are those of the full product."""
    qp, pm, pk, qv, vm, vk = _causal_pv(seed, heads, n, d)
    full = I.di_matmul(qp, pm, pk, qv, vm, vk, 16, a_unsigned=True, causal="reduction")
    t = data.draw(st.integers(1, n))
    prefix = I.di_matmul(qp[:, :t, :t], pm[:, :t], pk[:, :t], qv[:, :t], vm[:, :t], vk[:, :t], 16, a_unsigned=True,
                         causal="reduction")
    for got, want in zip(prefix, full):
        assert torch.equal(got, want[:, :t])
    tail = I.di_matmul(qp[:, t - 1:], pm[:, t - 1:], pk[:, t - 1:], qv, vm, vk, 16, a_unsigned=True, causal="reduction")
    for got, want in zip(tail, full):
        assert torch.equal(got, want[:, t - 1:])
    # the last row sees every key: there the causal and the one-exponent fold are the same computation (with one
    # key the scale is also per tensor, which the one-exponent path multiplies after the product instead)
    glob = I.di_matmul(qp, pm, pk, qv, vm, vk, 16, a_unsigned=True)
    for got, want in zip(glob, full):
        assert n == 1 or torch.equal(got[:, -1], want[:, -1])
    # and it is as accurate as the one-exponent fold
    ref = deq(qp, pm, pk) @ deq(qv, vm, vk)
    bound = (deq(qp, pm, pk).abs() @ deq(qv, vm, vk).abs()).amax(-1, keepdim=True) * (1 / 255 + 1e-3)
    assert bool(((deq(*full) - ref).abs() <= bound + 1e-9).all())


@SETTINGS
@given(st.integers(0, 10 ** 6), st.integers(1, 3), st.integers(1, 24), st.integers(1, 16), st.data())
def test_causal_qk_rows_never_see_later_keys(seed, heads, n, d, data):
    """``causal="columns"`` (``Q Kᵀ``): a row's scores, and the scale they are requantized to, depend only on the
    keys the row sees (the later ones are 0), whichever keys come after; and they are the float scores there."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, n, d, generator=g, dtype=F64)
    keys = torch.randn(heads, n, d, generator=g, dtype=F64) * torch.logspace(-2, 3, n, dtype=F64)[None, :, None]
    qq, qm, qk = I.quantize_rows(q, 8)
    kq, km, kk = I.quantize_rows(keys, 8)
    kt, ktm, ktk = kq.transpose(-1, -2), km.transpose(-1, -2), kk.transpose(-1, -2)
    full = I.di_matmul(qq, qm, qk, kt, ktm, ktk, 16, causal="columns")
    t = data.draw(st.integers(1, n))
    prefix = I.di_matmul(qq[:, :t], qm[:, :t], qk[:, :t], kt[..., :t], ktm[..., :t], ktk[..., :t], 16,
                         causal="columns")
    for got, want in zip(prefix, full):
        assert torch.equal(got, want[:, :t, :t] if got.shape[-1] == t else want[:, :t])
    tail = I.di_matmul(qq[:, t - 1:], qm[:, t - 1:], qk[:, t - 1:], kt, ktm, ktk, 16, causal="columns")
    for got, want in zip(tail, full):
        assert torch.equal(got, want[:, t - 1:])
    visible = torch.ones(n, n, dtype=torch.bool).tril()
    assert bool((full[0][:, ~visible] == 0).all())
    ref = (deq(qq, qm, qk) @ deq(kq, km, kk).transpose(-1, -2)).masked_fill(~visible, 0)
    step = full[1].double() * torch.pow(2.0, -full[2].double())
    # keys more than 16 binades finer than the row's coarsest lose their low bits: 2^-16 of the row's maximum
    assert bool(((deq(*full) - ref).abs() <= 0.5 * step + ref.abs().amax(-1, keepdim=True) * 1e-3 + 1e-9).all())


def test_causal_modes_are_checked():
    a, am, ak = I.quantize_rows(torch.randn(1, 3, 4, dtype=F64), 8)
    b, bm, bk = I.quantize_rows(torch.randn(1, 4, 5, dtype=F64), 8)          # per row of b: the P V layout
    for mode, msg in (("columns", "per column"), ("both", "causal must be one of")):
        with pytest.raises(ValueError, match=msg):
            I.di_matmul(a, am, ak, b, bm, bk, 16, causal=mode)


def test_causal_pv_without_the_flag_depends_on_later_keys():
    """Why the flag exists: with one exponent for all keys, a later key with a much coarser scale changes the
    rounding of earlier rows (the first row here), which a KV cache could not reproduce."""
    qp, pm, pk, qv, vm, vk = _causal_pv(5, 1, 20, 8)
    vk[:, -1] = vk[:, 0] - 30                                   # the last value 2^30 coarser than the first
    full = I.di_matmul(qp, pm, pk, qv, vm, vk, 16, a_unsigned=True)
    prefix = I.di_matmul(qp[:, :1, :1], pm[:, :1], pk[:, :1], qv[:, :1], vm[:, :1], vk[:, :1], 16, a_unsigned=True,
                         causal="reduction")
    assert not all(torch.equal(p, f[:, :1]) for p, f in zip(prefix, full))
    causal = I.di_matmul(qp, pm, pk, qv, vm, vk, 16, a_unsigned=True, causal="reduction")
    assert all(torch.equal(p, c[:, :1]) for p, c in zip(prefix, causal))
    # the one-exponent fold kept 1 of the first value's 15 scale bits: its row is off by tens of percent
    ref = deq(qp, pm, pk)[:, :1] @ deq(qv, vm, vk)
    assert _rel(deq(*full)[:, :1], ref) > 0.05 > 0.01 > _rel(deq(*causal)[:, :1], ref)


# ---- activations, add -----------------------------------------------------------------------------------------
@SETTINGS
@given(st.integers(0, 10 ** 6), st.integers(2, 200), st.floats(0.5, 30.0))
def test_swiglu_silu_gelu_within_bounds(seed, cols, scale):
    gate = _rows(seed, 3, cols, scale=scale, outliers=False)
    up = _rows(seed + 1, 3, cols, scale=1.0)
    qg, gm, gk = I.quantize_rows(gate, 16)
    qu, um, uk = I.quantize_rows(up, 16)
    gd, ud = deq(qg, gm, gk), deq(qu, um, uk)
    sig_err = constants().exp_rel_bound(2) + 2.0 ** -14                  # σ from exp with relative error δ: ≤ δ
    y, ym, yk = I.di_swiglu(qg, gm, gk, qu, um, uk, 16)
    ref = torch.nn.functional.silu(gd) * ud
    step = ym.double() * torch.pow(2.0, -yk.double())
    assert bool(((deq(y, ym, yk) - ref).abs() <= 0.5 * step + sig_err * (gd * ud).abs() + 1e-12).all())
    y, ym, yk = I.di_silu(qg, gm, gk, bits=16)
    step = ym.double() * torch.pow(2.0, -yk.double())
    assert bool(((deq(y, ym, yk) - torch.nn.functional.silu(gd)).abs() <= 0.5 * step + sig_err * gd.abs() + 1e-12).all())
    y, ym, yk = I.di_gelu(qg, gm, gk, bits=16)
    step = ym.double() * torch.pow(2.0, -yk.double())
    bound = 0.5 * step + constants().gelu_abs + sig_err * gd.abs() + 2.0 ** -13 * gd.abs()
    assert bool(((deq(y, ym, yk) - torch.nn.functional.gelu(gd)).abs() <= bound).all())


@SETTINGS
@given(st.integers(0, 10 ** 6), st.integers(1, 120), st.floats(0.01, 40.0), st.sampled_from([1, 2]),
       st.sampled_from([8, 16]))
def test_tanh_within_the_derived_bound(seed, cols, scale, order, bits):
    """Integer tanh (soft-caps): within ``tanh_abs_bound`` plus half an output step of ``tanh``, relatively exact
    below 1/4 (the series), exactly odd, 0 at 0, and saturating at ±1 without overflow for the largest codes."""
    x = _rows(seed, 3, cols, scale=scale, outliers=True)
    q, m, k = I.quantize_rows(x, 16)
    v = deq(q, m, k)
    y, ym, yk = I.di_tanh(q, m, k, bits=bits, order=order)
    step = ym.double() * torch.pow(2.0, -yk.double())
    bound = constants().tanh_abs_bound(order) + 0.5 * step
    assert bool(((deq(y, ym, yk) - torch.tanh(v)).abs() <= bound + 1e-12).all())
    t = I.tanh_q30(q, m, k, order=order)
    small = v.abs() < 0.25
    err = (t.double() / 2 ** I.TANH_BITS - torch.tanh(v)).abs()
    assert bool((err[small] <= 17 / 315 * v[small].abs() ** 7 + 4 * 2.0 ** -30).all())
    assert torch.equal(I.tanh_q30(-q, m, k, order=order), -t)                  # odd, bit for bit
    assert bool((t.abs() <= 2 ** I.TANH_BITS).all())
    assert bool((I.tanh_q30(torch.zeros_like(q), m, k) == 0).all())
    big = torch.tensor([[32767, -32767, 1]], dtype=torch.int16)
    tb = I.tanh_q30(big, torch.tensor([[2 ** 14]]), torch.tensor([[10]]))        # ±16: saturated
    assert tb[0, 0] == 2 ** I.TANH_BITS and tb[0, 1] == -(2 ** I.TANH_BITS)


@SETTINGS
@given(st.integers(0, 10 ** 6), st.integers(1, 100), st.floats(1e-3, 1e3))
def test_di_add_aligns_scales(seed, cols, ratio):
    a = _rows(seed, 3, cols)
    b = _rows(seed + 7, 3, cols) * ratio
    qa, am, ak = I.quantize_rows(a, 16)
    qb, bm, bk = I.quantize_rows(b, 16)
    y, ym, yk = I.di_add(qa, am, ak, qb, bm, bk, 16)
    ref = deq(qa, am, ak) + deq(qb, bm, bk)
    step = ym.double() * torch.pow(2.0, -yk.double())
    # half a step of rounding, plus the 15-bit scale mantissa's 2^-15 relative rounding
    assert bool(((deq(y, ym, yk) - ref).abs() <= step * 0.51 + ref.abs() * 2.0 ** -14).all())


# ---- Q31 -------------------------------------------------------------------------------------------------------
def _q31_python(a: int, mul: int, shift: int) -> int:
    if a == mul == -(2 ** 31):
        high = 2 ** 31 - 1
    else:
        ab = a * mul
        nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
        num = ab + nudge
        high = int(num / 2 ** 31) if abs(num) < 2 ** 52 else (num // 2 ** 31 if num >= 0 else -((-num) // 2 ** 31))
    if shift <= 0:
        return high
    mask = (1 << shift) - 1
    rem = high & mask
    thr = (mask >> 1) + (1 if high < 0 else 0)
    return (high >> shift) + (1 if rem > thr else 0)


@SETTINGS
@given(st.lists(st.integers(-(2 ** 31), 2 ** 31 - 1), min_size=1, max_size=40), st.floats(1e-6, 0.999),
       st.integers(0, 20))
def test_requantize_q31_matches_gemmlowp(vals, real, extra):
    mul, shift = I.quantize_multiplier_q31(real)
    shift = shift + extra
    got = I.requantize_q31(torch.tensor(vals, dtype=torch.int32), mul, shift)
    assert got.tolist() == [_q31_python(v, mul, shift) for v in vals]
    assert abs(mul * 2.0 ** -31 * 2.0 ** -(shift - extra) - real) <= real * 2.0 ** -30


# ---- no float inside ---------------------------------------------------------------------------------------------
def _ints(*shape, lo=-100, hi=100, dtype=torch.int64):
    return torch.randint(lo, hi, shape, dtype=dtype)


OPS = {
    "requantize_rows": lambda: (lambda x, m, k: I.requantize_rows(x, m, k, 8),
                                (_ints(3, 8), _ints(3, 1, lo=16384, hi=32767), _ints(3, 1, lo=10, hi=30))),
    "di_linear": lambda: (lambda x, m, k, w, wm: I.di_linear(x, m, k, w, wm, 30, None, 0, 16),
                          (_ints(3, 8, dtype=torch.int8), _ints(3, 1, lo=16384, hi=32767), _ints(3, 1, lo=10, hi=30),
                           _ints(4, 8, dtype=torch.int8), _ints(4, lo=1, hi=2 ** 23))),
    "di_clipped_softmax": lambda: (lambda s, m, k: I.di_clipped_softmax(s, m, k),
                                   (_ints(3, 8), _ints(3, 1, lo=16384, hi=32767), _ints(3, 1, lo=20, hi=30))),
    "di_rmsnorm": lambda: (lambda x, m, k, g: I.di_rmsnorm(x, m, k, g, 14),
                           (_ints(3, 8), _ints(3, 1, lo=16384, hi=32767), _ints(3, 1, lo=10, hi=30), _ints(8, lo=1, hi=2 ** 14))),
    "di_layernorm": lambda: (lambda x, m, k, g, b: I.di_layernorm(x, m, k, g, b, 14),
                             (_ints(3, 8), _ints(3, 1, lo=16384, hi=32767), _ints(3, 1, lo=10, hi=30),
                              _ints(8, lo=1, hi=2 ** 14), _ints(8))),
    "di_swiglu": lambda: (lambda g, gm, gk, u, um, uk: I.di_swiglu(g, gm, gk, u, um, uk, 8),
                          (_ints(3, 8, dtype=torch.int16), _ints(3, 1, lo=16384, hi=32767), _ints(3, 1, lo=10, hi=30),
                           _ints(3, 8, dtype=torch.int16), _ints(3, 1, lo=16384, hi=32767), _ints(3, 1, lo=10, hi=30))),
    "di_gelu": lambda: (lambda x, m, k: I.di_gelu(x, m, k), (_ints(3, 8, dtype=torch.int16),
                                                             _ints(3, 1, lo=16384, hi=32767), _ints(3, 1, lo=10, hi=30))),
    "di_tanh": lambda: (lambda x, m, k: I.di_tanh(x, m, k),
                        (_ints(3, 8, dtype=torch.int16), _ints(3, 1, lo=16384, hi=32767), _ints(3, 1, lo=10, hi=30))),
    "di_add": lambda: (lambda a, am, ak, b, bm, bk: I.di_add(a, am, ak, b, bm, bk, 16),
                       (_ints(3, 8), _ints(3, 1, lo=16384, hi=32767), _ints(3, 1, lo=10, hi=30),
                        _ints(3, 8), _ints(3, 1, lo=16384, hi=32767), _ints(3, 1, lo=10, hi=30))),
    "di_matmul": lambda: (lambda a, am, ak, b, bm, bk: I.di_matmul(a, am, ak, b, bm, bk, 16),
                          (_ints(2, 3, 8), _ints(2, 3, 1, lo=16384, hi=32767), _ints(2, 3, 1, lo=10, hi=30),
                           _ints(2, 8, 5), _ints(2, 8, 1, lo=16384, hi=32767), _ints(2, 8, 1, lo=10, hi=30))),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_reference_ops_have_no_float_inside(name):
    """Trace each operator to ATen ops and check every intermediate tensor is an integer or bool tensor."""
    fn, args = OPS[name]()
    seen: list[str] = []
    floats: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen.append(str(func))
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
                    floats.append(f"{func} -> {t.dtype}")
            return out

    with Record():
        fn(*args)
    assert len(seen) > 10 and not floats, floats
