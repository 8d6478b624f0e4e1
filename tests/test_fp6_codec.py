"""The minifloat codec (fxquant.fpformats): exhaustive over every code, hypothesis on random weights.

What must hold: decode∘encode is the identity on representable values, encode picks the nearest value and
breaks ties to the even code, saturates at ±max, refuses NaN/Inf weights; scales per row or per group (a
last, shorter group); fake-quant equals the packed dequantization bit for bit and passes gradients straight.
"""
from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxquant.errors import QuantSpecError, WeightError
from fxquant.fpformats import (E2M1, E2M2, E2M3, E3M1, E3M2, FloatFormat, FPQuantSpec, compute_scales, decode,
                               encode, fp_fake_quantize, get_format, quantize_fp)

ALL = [E3M2, E2M3, E2M2, E3M1, E2M1]


def _quantum(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Spacing of fmt's values in the binade of |x| (the subnormal step below the smallest normal)."""
    mag = x.abs().double().clamp(min=fmt.min_normal)
    e = torch.floor(torch.log2(mag))
    return torch.pow(2.0, e - fmt.man_bits)


def test_e3m2_constants():
    assert (E3M2.bits, E3M2.max_value, E3M2.min_normal) == (6, 28.0, 0.25)
    assert decode(torch.tensor([1, 2, 3], dtype=torch.uint8), E3M2).tolist() == [0.0625, 0.125, 0.1875]
    assert (E2M3.max_value, E2M2.max_value, E3M1.max_value, E2M1.max_value) == (7.5, 7.0, 24.0, 6.0)
    # no Inf/NaN: all 64 codes are finite, 62 distinct nonzero magnitudes pairs +/-0
    t = E3M2.table
    assert torch.isfinite(t).all() and len(set(t.tolist())) == 63  # +0.0 == -0.0 as floats
    assert get_format("fp6") is E3M2 and get_format("fp6-e2m3") is E2M3 and get_format("fp4") is E2M1


@pytest.mark.parametrize("fmt", ALL, ids=str)
def test_decode_encode_identity_on_every_code(fmt):
    codes = torch.arange(fmt.num_codes, dtype=torch.uint8)
    values = decode(codes, fmt)
    assert torch.equal(encode(values, fmt), codes)  # -0.0 keeps its sign code too
    # values are sorted by code within each sign, and the sign bit flips the sign
    half = fmt.num_codes // 2
    assert torch.all(values[1:half] > values[: half - 1])
    assert torch.equal(values[half:], -values[:half])
    # the same on float64, float16 and bfloat16 inputs (every value is representable in all of them)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        assert torch.equal(encode(values.to(dtype), fmt), codes)


@pytest.mark.parametrize("fmt", ALL, ids=str)
def test_midpoints_tie_to_even_and_neighbours_go_nearest(fmt):
    half = fmt.num_codes // 2
    pos = decode(torch.arange(half, dtype=torch.uint8), fmt).double()
    mids = (pos[:-1] + pos[1:]) / 2  # exact in float64
    lower_code = torch.arange(half - 1)
    even = torch.where(lower_code % 2 == 0, lower_code, lower_code + 1)  # code LSB == mantissa LSB
    for sign, sbit in ((1.0, 0), (-1.0, half)):
        got = encode(sign * mids, fmt).long()
        assert torch.equal(got, even + sbit), f"ties in {fmt}"
        below = encode(sign * torch.nextafter(mids, torch.zeros_like(mids)), fmt).long()
        above = encode(sign * torch.nextafter(mids, torch.full_like(mids, 1e9)), fmt).long()
        assert torch.equal(below, lower_code + sbit) and torch.equal(above, lower_code + 1 + sbit)
    # also in float32, where the midpoints are exact too
    assert torch.equal(encode(mids.float(), fmt).long(), even)


@pytest.mark.parametrize("fmt", ALL, ids=str)
def test_encode_is_nearest_on_a_dense_grid(fmt):
    x = torch.linspace(-fmt.max_value * 1.2, fmt.max_value * 1.2, 20011, dtype=torch.float64)
    got = decode(encode(x, fmt), fmt).double()
    table = fmt.table.double()
    best = (x[:, None] - table[None, :]).abs().min(dim=1).values
    assert torch.equal((got - x.clamp(-fmt.max_value, fmt.max_value)).abs(),
                       (table[None, :] - x.clamp(-fmt.max_value, fmt.max_value)[:, None]).abs().min(dim=1).values)
    inside = x.abs() <= fmt.max_value
    assert torch.equal((got - x).abs()[inside], best[inside])


def test_saturation_and_nan():
    x = torch.tensor([28.0, 29.0, 30.0, 1e30, float("inf"), -31.0, -float("inf")])
    assert decode(encode(x), E3M2).tolist() == [28.0, 28.0, 28.0, 28.0, 28.0, -28.0, -28.0]
    with pytest.raises(WeightError, match="NaN"):
        encode(torch.tensor([1.0, float("nan")]))
    with pytest.raises(WeightError, match="uint8"):
        decode(torch.tensor([1, 2]))
    with pytest.raises(WeightError, match="does not exist"):
        decode(torch.tensor([17], dtype=torch.uint8), E2M1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(bad):
    w = torch.randn(4, 8)
    w[2, 5] = bad
    with pytest.raises(WeightError, match=r"NaN/Inf value\(s\) \(first at index \(2, 5\)\)"):
        quantize_fp(w, E3M2, name="layers.0.q_proj.weight")
    with pytest.raises(WeightError):
        fp_fake_quantize(w.requires_grad_())


def test_bad_inputs_have_clear_errors():
    with pytest.raises(WeightError, match="2-D"):
        quantize_fp(torch.randn(8))
    for bad in (0, -4, 2.5, True):
        with pytest.raises(QuantSpecError, match="group size"):
            FPQuantSpec(group_size=bad)
    with pytest.raises(QuantSpecError, match="unknown minifloat"):
        get_format("e9m9")
    with pytest.raises(QuantSpecError, match="out of range"):
        FloatFormat(0, 2, 1)
    with pytest.raises(QuantSpecError, match="scale search"):
        FPQuantSpec(scale_search="percentile")  # type: ignore[arg-type]


@st.composite
def weights_with_outliers(draw):
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 70))
    base = draw(hnp.arrays(np.float32, (rows, cols), elements=st.floats(-1, 1, width=32)))
    w = torch.from_numpy(base.copy())
    n_out = draw(st.integers(0, 3))
    for _ in range(n_out):
        r, c = draw(st.integers(0, rows - 1)), draw(st.integers(0, cols - 1))
        w[r, c] = draw(st.sampled_from([-1, 1])) * draw(st.floats(10, 1e4))
    if draw(st.booleans()):
        w[draw(st.integers(0, rows - 1))] = 0.0  # a zero channel
    return w


@given(w=weights_with_outliers(), fmt=st.sampled_from(ALL), group=st.sampled_from([None, 1, 4, 16, 32]))
def test_error_is_at_most_half_an_ulp_after_scaling(w, fmt, group):
    q = quantize_fp(w, FPQuantSpec(format=fmt, group_size=group))
    cols = w.shape[1]
    full = q.scale.repeat_interleave(group or cols, dim=1)[:, :cols].double()
    x = w.double() / full
    assert x.abs().max() <= fmt.max_value * (1 + 1e-6)  # absmax scale: nothing saturates beyond rounding
    err = (q.dequantize(torch.float64) - w.double()).abs()
    bound = 0.5 * _quantum(x, fmt) * full
    # the two float32 roundings (w / scale and decode * scale) add at most a few ulps of float32
    slack = 4 * torch.finfo(torch.float32).eps * w.double().abs() + 1e-30
    assert torch.all(err <= bound + slack)
    zero_rows = (w == 0).all(dim=1)
    assert torch.all(q.scale[zero_rows] == 1) and torch.all(decode(q.codes[zero_rows], fmt) == 0)


def test_group_scales_with_a_shorter_last_group():
    torch.manual_seed(0)
    w = torch.randn(3, 10)
    w[1, 9] = 50.0  # an outlier in the short last group only
    q = quantize_fp(w, FPQuantSpec(format=E3M2, group_size=4))
    assert q.scale.shape == (3, 3)  # groups [0:4], [4:8], [8:10]
    for g, (lo, hi) in enumerate([(0, 4), (4, 8), (8, 10)]):
        expect = w[:, lo:hi].abs().amax(dim=1) / 28.0
        assert torch.equal(q.scale[:, g], expect)
        manual = decode(encode(w[:, lo:hi] / expect[:, None]), E3M2) * expect[:, None]
        assert torch.equal(q.dequantize()[:, lo:hi], manual)
    # the outlier costs precision only in its own group: the other groups of row 1 are as good as row 0's
    err = (q.dequantize() - w).abs()
    assert err[1, :8].max() < 0.1 and q.scale[1, 2] > 1.0
    # group_size larger than the width is one group == per channel
    assert torch.equal(quantize_fp(w, FPQuantSpec(group_size=64)).dequantize(), quantize_fp(w).dequantize())


def test_zero_rows_get_scale_one_and_tiny_rows_survive():
    w = torch.zeros(3, 5)
    w[1] = torch.tensor([1e-40, -2e-40, 0, 0, 3e-40])  # float32 subnormals: amax / 28 underflows
    w[2] = torch.tensor([1.0, -2.0, 0.5, 0.25, 28.0])
    q = quantize_fp(w)
    assert q.scale[0, 0] == 1 and torch.all(q.codes[0] == 0)
    assert torch.isfinite(q.dequantize()).all()
    assert torch.equal(q.dequantize()[2], w[2])  # on-grid values with scale 1 come back exactly


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt,group", [(E3M2, None), (E3M2, 8), (E2M3, None), (E2M1, 16)], ids=str)
def test_fake_quant_equals_packed_dequant_bit_for_bit(dtype, fmt, group):
    torch.manual_seed(1)
    w = (torch.randn(8, 40) * torch.logspace(-3, 1, 40)).to(dtype)
    packed = quantize_fp(w, FPQuantSpec(format=fmt, group_size=group)).dequantize()
    assert packed.dtype == dtype
    fq = fp_fake_quantize(w.clone().requires_grad_(), fmt, group)
    assert torch.equal(fq.detach().view(torch.int16 if dtype != torch.float32 else torch.int32),
                       packed.view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert torch.equal(fp_fake_quantize(w, fmt, group, ste=False), packed)


def test_ste_gradient_is_identity_and_reaches_teq_scales():
    torch.manual_seed(2)
    w = torch.randn(6, 16, requires_grad=True)
    g = torch.randn(6, 16)
    fp_fake_quantize(w, E3M2).backward(g)
    assert torch.equal(w.grad, g)
    # TEQ: y = (x / s) @ FQ(W * s)^T trains s through the fake quantizer
    s = torch.ones(16, requires_grad=True)
    x = torch.randn(4, 16)
    y = (x / s) @ fp_fake_quantize(w.detach() * s, E3M2).t()
    y.square().sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # without STE there is no gradient path
    assert not fp_fake_quantize(w, E3M2, ste=False).requires_grad


def test_mse_scale_search_never_loses_to_absmax():
    torch.manual_seed(3)
    w = torch.randn(16, 256) * torch.rand(16, 1) ** 4  # Gaussian rows: clipping the tail pays off
    for fmt in (E3M2, E2M3, E2M1):
        ab = quantize_fp(w, FPQuantSpec(format=fmt))
        ms = quantize_fp(w, FPQuantSpec(format=fmt, scale_search="mse"))
        err_ab = ((ab.dequantize() - w) ** 2).sum(dim=1)
        err_ms = ((ms.dequantize() - w) ** 2).sum(dim=1)
        assert torch.all(err_ms <= err_ab) and err_ms.sum() < err_ab.sum()
    assert compute_scales(w, E3M2).shape == (16, 1)
    assert not math.isnan(float(compute_scales(w, E3M2, 100, "mse").sum()))
