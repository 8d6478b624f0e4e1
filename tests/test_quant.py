"""Property tests for fxquant.quant: the spec, RTN quantization and the one dequantization formula.

The quantizer is checked against a deliberately naive reference (a Python loop over rows and group slices, so the
shorter last group falls out of slicing rather than padding), bit for bit, and against the properties that hold
for any input: code range, number of levels, half-step error, group independence.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from fxquant.errors import QuantSpecError, WeightError
from fxquant.quant import FakeQuantizeSTE, QuantizedWeight, QuantSpec, fake_quantize, quantize_weight

# ---- strategies ---------------------------------------------------------------------------------


@st.composite
def specs(draw) -> QuantSpec:
    symmetric = draw(st.booleans())
    bits = draw(st.integers(2 if symmetric else 1, 8))
    granularity = draw(st.sampled_from(["tensor", "channel", "group", "group"]))
    if granularity == "group":
        group = draw(st.one_of(st.sampled_from([1, 3, 8, 32, 64, 128]), st.integers(1, 300)))
        return QuantSpec(bits, symmetric=symmetric, group_size=group)
    return QuantSpec(bits, symmetric=symmetric, per_tensor=granularity == "tensor")


@st.composite
def weights(draw, max_rows: int = 6, max_cols: int = 200) -> torch.Tensor:
    """Random [O, C] weights over many magnitudes, with optional outlier columns, zero and constant rows."""
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    seed = draw(st.integers(0, 2**31 - 1))
    magnitude = 10.0 ** draw(st.integers(-6, 3))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * magnitude
    if draw(st.booleans()):  # positive-only or negative-only rows exercise min'/max' clamping at 0
        w = w.abs() * draw(st.sampled_from([1.0, -1.0]))
    if draw(st.booleans()):  # an outlier input channel, as in LLM activations folded into weights
        w[:, draw(st.integers(0, cols - 1))] *= draw(st.sampled_from([50.0, -1000.0]))
    special = draw(st.sampled_from(["none", "zero_row", "const_row", "zero_block"]))
    r = draw(st.integers(0, rows - 1))
    if special == "zero_row":
        w[r] = 0.0
    elif special == "const_row":
        w[r] = draw(st.sampled_from([0.37, -2.5, 1e-3]))
    elif special == "zero_block":
        w[r, : max(1, cols // 2)] = 0.0
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]))
    if dtype is not torch.float32:
        w = w.clamp(-6e4, 6e4)  # stay finite in float16
    return w.to(dtype)


# ---- a naive reference ----------------------------------------------------------------------------


def reference_quantize(w: torch.Tensor, spec: QuantSpec):
    """The INC formulas, one (row, group) slice at a time, in float32 tensors (never Python floats)."""
    w = w.float()
    rows, cols = w.shape
    g = spec.group_size or cols
    bounds = [(s, min(s + g, cols)) for s in range(0, cols, g)]
    one = torch.tensor(1.0)
    scales = torch.empty(rows, len(bounds))
    zeros = torch.zeros(rows, len(bounds), dtype=torch.int32)
    codes = torch.empty(rows, cols)
    for i in range(rows):
        for k, (a, b) in enumerate(bounds):
            part = w if spec.per_tensor else w[i, a:b]
            if spec.symmetric:
                scale = part.abs().max() / spec.qmax
                scale = one if scale == 0 else scale
                codes[i, a:b] = torch.clamp(torch.round(w[i, a:b] / scale), spec.qmin, spec.qmax)
            else:
                lo, hi = torch.clamp(part.min(), max=0.0), torch.clamp(part.max(), min=0.0)
                scale = (hi - lo) / spec.qmax
                scale = one if scale == 0 else scale
                zero = torch.clamp(torch.round(-lo / scale), 0, spec.qmax)
                codes[i, a:b] = torch.clamp(torch.round(w[i, a:b] / scale) + zero, 0, spec.qmax)
                zeros[i, k] = int(zero)
            scales[i, k] = scale
    return codes, scales, (None if spec.symmetric else zeros), bounds


def group_bounds(qw: QuantizedWeight) -> list[tuple[int, int]]:
    cols = qw.shape[1]
    return [(s, min(s + qw.group_size, cols)) for s in range(0, cols, qw.group_size)]


# ---- properties -----------------------------------------------------------------------------------


@given(w=weights(), spec=specs())
def test_matches_naive_reference_bit_for_bit(w, spec):
    qw = quantize_weight(w, spec)
    codes, scales, zeros, bounds = reference_quantize(w, spec)
    assert qw.n_groups == len(bounds) == math.ceil(w.shape[1] / (spec.group_size or w.shape[1]))
    assert qw.codes.dtype == (torch.int8 if spec.symmetric else torch.uint8)
    assert qw.scale.dtype == torch.float32 and qw.scale.shape == (w.shape[0], len(bounds))
    assert torch.equal(qw.scale, scales)
    assert torch.equal(qw.codes.float(), codes)
    if spec.symmetric:
        assert qw.zero is None
    else:
        assert qw.zero.dtype == torch.int32 and torch.equal(qw.zero, zeros)


@given(w=weights(), spec=specs())
def test_codes_in_range_and_at_most_2_pow_bits_levels_per_group(w, spec):
    qw = quantize_weight(w, spec)
    assert qw.code_range_error() is None
    assert int(qw.codes.min()) >= spec.qmin and int(qw.codes.max()) <= spec.qmax
    # symmetric never reaches -2^(b-1) (|w / scale| <= 2^(b-1) - 1), so it uses at most 2^b - 1 levels
    max_levels = 2**spec.bits - (1 if spec.symmetric else 0)
    for a, b in group_bounds(qw):
        for row in qw.codes[:, a:b]:
            assert row.unique().numel() <= max_levels
    deq = qw.dequantize()
    for a, b in group_bounds(qw):  # distinct dequantized values per group obey the same bound
        for row in deq[:, a:b]:
            assert row.unique().numel() <= max_levels


@given(w=weights(), spec=specs())
def test_error_at_most_half_a_step(w, spec):
    qw = quantize_weight(w, spec)
    w32 = w.float()
    err = (w32 - qw.dequantize()).abs()
    step = qw.expand(qw.scale)
    # half a step, plus float32 rounding of w / scale (relative to the code) and of codes * scale (relative to w)
    bound = step * (0.5 + 2**spec.bits * 2e-7) + w32.abs() * 2e-7
    assert bool((err <= bound).all()), float((err - bound).max())


@given(w=weights(), spec=specs(), data=st.data())
def test_changing_one_group_leaves_the_other_groups_alone(w, spec, data):
    if spec.per_tensor:
        spec = QuantSpec(spec.bits, symmetric=spec.symmetric)  # one scale for everything: nothing to isolate
    qw = quantize_weight(w, spec)
    bounds = group_bounds(qw)
    row = data.draw(st.integers(0, w.shape[0] - 1))
    k = data.draw(st.integers(0, len(bounds) - 1))
    a, b = bounds[k]
    w2 = w.clone()
    w2[row, a:b] = w2[row, a:b] * -7.0 + 3.0
    assume(bool(torch.isfinite(w2).all()))  # a large fp16 weight times -7 overflows: quantize refuses Inf
    qw2 = quantize_weight(w2, spec)
    others = torch.ones_like(qw.scale, dtype=torch.bool)
    others[row, k] = False
    assert torch.equal(qw.scale[others], qw2.scale[others])
    if qw.zero is not None:
        assert torch.equal(qw.zero[others], qw2.zero[others])
    untouched = torch.ones_like(qw.codes, dtype=torch.bool)
    untouched[row, a:b] = False
    assert torch.equal(qw.codes[untouched], qw2.codes[untouched])


@given(w=weights(), spec=specs())
def test_dequantize_is_the_explicit_formula_bit_for_bit(w, spec):
    qw = quantize_weight(w, spec)
    group_of_col = torch.arange(w.shape[1]) // qw.group_size
    scale = qw.scale[:, group_of_col]
    if spec.symmetric:
        expected = qw.codes.float() * scale
    else:
        expected = (qw.codes.float() - qw.zero[:, group_of_col].float()) * scale
    assert torch.equal(qw.dequantize(), expected)
    assert torch.equal(qw.dequantize(torch.float16), expected.to(torch.float16))
    assert torch.equal(qw.dequantize(torch.bfloat16), expected.to(torch.bfloat16))


@given(w=weights(max_cols=64), spec=specs())
def test_fake_quantize_is_dequantize_in_the_input_dtype(w, spec):
    out = fake_quantize(w, spec)
    assert out.dtype == w.dtype and out.shape == w.shape
    assert torch.equal(out, quantize_weight(w, spec).dequantize(w.dtype))
    # arithmetic is float32 whatever the input dtype
    assert torch.equal(quantize_weight(w, spec).scale, quantize_weight(w.float(), spec).scale)


# ---- zero, constant and tiny channels ---------------------------------------------------------------

ALL_SPECS = [QuantSpec(b, symmetric=s, group_size=g, per_tensor=t)
             for b in (1, 2, 4, 8) for s in (True, False) if not (s and b == 1)
             for g, t in ((None, False), (16, False), (None, True))]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_zero_constant_and_tiny_channels(spec):
    w = torch.randn(5, 40)
    w[0] = 0.0            # zero channel: exact
    w[1] = 0.37           # constant positive channel
    w[2] = -2.5           # constant negative channel
    w[3] = 1e-44          # subnormal: absmax / qmax underflows to 0
    w[4, :16] = 0.0       # a zero group inside a live channel
    qw = quantize_weight(w, spec)
    deq = qw.dequantize()
    assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all()
    assert torch.isfinite(deq).all()
    if not spec.per_tensor:
        assert torch.equal(deq[0], torch.zeros(40))
        assert torch.equal(qw.scale[0], torch.ones_like(qw.scale[0]))
        if spec.group_size == 16:
            assert torch.equal(deq[4, :16], torch.zeros(16))
    for r, v in ((1, 0.37), (2, -2.5)):  # a constant channel stays a constant channel
        assert deq[r].unique().numel() == 1
        if not spec.per_tensor:
            assert abs(float(deq[r, 0]) - v) <= 1e-6 * abs(v) + float(qw.scale[r].max()) / 2
    assert float(deq[3].abs().max()) <= 1e-44 * 1.01 + 1e-45


def test_round_half_to_even_and_inc_known_values():
    sym = quantize_weight(torch.tensor([[7.0, 2.5, 3.5, -2.5, 0.5]]), QuantSpec(4))
    assert float(sym.scale) == 1.0  # absmax 7 / (2^3 - 1)
    assert sym.codes.tolist() == [[7, 2, 4, -2, 0]]  # half to even
    sym = quantize_weight(torch.tensor([[-1.0, 0.5, 1.0]]), QuantSpec(4))
    assert torch.equal(sym.scale, torch.tensor([[1.0 / 7]]))
    # w is divided by the float32 scale: 0.5 / fl(1/7) = 3.4999998 -> 3, not 0.5 * 7 = 3.5 -> 4
    assert sym.codes.tolist() == [[-7, 3, 7]]
    asym = quantize_weight(torch.tensor([[-1.0, 3.0]]), QuantSpec(4, symmetric=False))
    assert torch.equal(asym.scale, torch.tensor([[4.0 / 15]]))
    assert asym.zero.tolist() == [[4]]  # round(15 / 4 = 3.75)
    assert asym.codes.tolist() == [[0, 15]]
    pos = quantize_weight(torch.tensor([[1.0, 2.0]]), QuantSpec(2, symmetric=False))
    assert pos.zero.tolist() == [[0]]  # min' = min(1, 0) = 0: the range always contains zero
    assert pos.codes.tolist() == [[2, 3]]  # scale 2/3: 1.5 -> 2, 3 -> 3


def test_one_bit_asymmetric_has_two_levels():
    w = torch.randn(4, 33)
    qw = quantize_weight(w, QuantSpec(1, symmetric=False, group_size=8))
    assert set(qw.codes.unique().tolist()) <= {0, 1}
    assert qw.n_groups == 5


# ---- group layout ---------------------------------------------------------------------------------------


def test_smollm2_width_576_with_group_128_has_a_last_group_of_64():
    w = torch.randn(8, 576)
    w[:, 575] = 100.0  # an outlier in the last, short group
    qw = quantize_weight(w, QuantSpec(4, group_size=128))
    assert qw.n_groups == 5 and qw.group_size == 128
    assert group_bounds(qw)[-1] == (512, 576)
    assert torch.allclose(qw.scale[:, 4], torch.full((8,), 100.0 / 7))
    assert (qw.scale[:, :4] < 1.0).all()  # the outlier did not leak into the full groups
    expanded = qw.expand(qw.scale)
    assert expanded.shape == (8, 576)
    assert torch.equal(expanded[:, 512:], qw.scale[:, 4:5].expand(8, 64))
    assert torch.equal(expanded[:, 384:512], qw.scale[:, 3:4].expand(8, 128))


def test_group_larger_than_width_is_per_channel_and_per_tensor_is_broadcast():
    w = torch.randn(3, 20)
    big = quantize_weight(w, QuantSpec(4, group_size=128))
    chan = quantize_weight(w, QuantSpec(4))
    assert big.n_groups == chan.n_groups == 1 and big.group_size == chan.group_size == 20
    assert torch.equal(big.scale, chan.scale) and torch.equal(big.codes, chan.codes)
    tensor = quantize_weight(w, QuantSpec(4, per_tensor=True))
    assert tensor.scale.shape == (3, 1) and tensor.scale.unique().numel() == 1
    assert torch.equal(tensor.scale[0], w.abs().max().reshape(1) / 7)


# ---- sizes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, spec, nbytes", [
    ((8, 576), QuantSpec(4, group_size=128), 8 * 576 // 2 + 2 * 8 * 5),                          # 2384
    ((8, 576), QuantSpec(4, group_size=128, symmetric=False), 2304 + 80 + 20),                    # + 40 4-bit zeros
    ((3, 5), QuantSpec(3), math.ceil(15 * 3 / 8) + 2 * 3),                                       # 23
    ((4, 4), QuantSpec(8, per_tensor=True), 16 + 2),                                             # one scale
    ((576, 576), QuantSpec(8), 576 * 576 + 2 * 576),
])
def test_packed_nbytes(shape, spec, nbytes):
    assert quantize_weight(torch.randn(*shape), spec).packed_nbytes() == nbytes


# ---- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, position", [(float("nan"), (2, 5)), (float("inf"), (0, 0)), (-float("inf"), (3, 9))])
def test_non_finite_weights_are_refused_with_count_and_position(bad, position):
    w = torch.randn(4, 10)
    w[position] = bad
    w[3, 9] = bad
    before = w.clone()
    with pytest.raises(WeightError) as info:
        quantize_weight(w, QuantSpec(4), name="layers.0.q_proj.weight")
    text = str(info.value)
    n = 1 if position == (3, 9) else 2
    assert f"{n} non-finite" in text and f"first at index {list(position)}" in text
    assert "layers.0.q_proj.weight" in text and "hint" in text
    assert torch.equal(w.isnan(), before.isnan()) and torch.equal(torch.nan_to_num(w), torch.nan_to_num(before))


@pytest.mark.parametrize("w, needle", [
    (torch.randn(4), "2-D"),
    (torch.randn(2, 3, 4), "2-D"),
    (torch.randint(0, 5, (4, 4)), "floating-point"),
    (torch.empty(0, 4), "empty"),
])
def test_malformed_weights_are_refused(w, needle):
    with pytest.raises(WeightError, match=needle):
        quantize_weight(w, QuantSpec(8))


@pytest.mark.parametrize("kwargs, needle", [
    (dict(bits=0), "1 to 8"),
    (dict(bits=9), "1 to 8"),
    (dict(bits=-4), "1 to 8"),
    (dict(bits=4.0), "integer from 1 to 8"),
    (dict(bits=True), "integer from 1 to 8"),
    (dict(bits=1), "symmetric integer quantization needs bits >= 2"),
    (dict(bits=4, group_size=0), "group size must be a positive integer (e.g. 32, 64, 128), or None for per-channel"),
    (dict(bits=4, group_size=-1), "group size must be a positive integer"),
    (dict(bits=4, group_size=12.5), "group size must be a positive integer"),
    (dict(bits=4, group_size=128, per_tensor=True), "exclusive"),
    (dict(bits=4, kind="fp6"), "must be 'int'"),
])
def test_bad_specs_get_a_one_line_error_saying_what_is_allowed(kwargs, needle):
    with pytest.raises(QuantSpecError) as info:
        QuantSpec(**kwargs)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_quantized_weight_rejects_inconsistent_parts():
    qw = quantize_weight(torch.randn(4, 10), QuantSpec(4, group_size=4, symmetric=False))
    with pytest.raises(WeightError, match="scale"):
        QuantizedWeight(qw.codes, qw.scale[:, :2].contiguous(), qw.zero, qw.spec, qw.group_size)
    with pytest.raises(WeightError, match="zero point"):
        QuantizedWeight(qw.codes, qw.scale, None, qw.spec, qw.group_size)
    with pytest.raises(WeightError, match="uint8"):
        QuantizedWeight(qw.codes.to(torch.int8), qw.scale, qw.zero, qw.spec, qw.group_size)
    broken = QuantizedWeight(qw.codes.clone(), qw.scale, qw.zero, QuantSpec(2, symmetric=False, group_size=4), 4)
    broken.codes[0, 0] = 15
    assert "allows [0, 3]" in broken.code_range_error()


# ---- spec naming --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, text, granularity", [
    (QuantSpec(8), "w8", "channel"),
    (QuantSpec(4), "w4", "channel"),
    (QuantSpec(4, symmetric=False, group_size=128), "w4g128a", "group"),
    (QuantSpec(3, group_size=128), "w3g128", "group"),
    (QuantSpec(8, per_tensor=True), "w8t", "tensor"),
    (QuantSpec(1, symmetric=False, group_size=32), "w1g32a", "group"),
])
def test_describe_parse_round_trip(spec, text, granularity):
    assert spec.describe() == text == str(spec)
    assert spec.granularity == granularity
    assert QuantSpec.parse(text) == spec


def test_parse_refuses_garbage_and_invalid_values():
    with pytest.raises(QuantSpecError, match="w<bits>"):
        QuantSpec.parse("int4")
    with pytest.raises(QuantSpecError, match="1 to 8"):
        QuantSpec.parse("w9")
    with pytest.raises(QuantSpecError, match="positive integer"):
        QuantSpec.parse("w4g0")


# ---- straight-through estimator ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [QuantSpec(4, group_size=8), QuantSpec(2, symmetric=False)], ids=str)
def test_ste_forward_is_fake_quant_and_gradient_is_identity(spec):
    w = torch.randn(6, 20, requires_grad=True)
    upstream = torch.randn(6, 20)
    out = fake_quantize(w, spec, ste=True)
    assert torch.equal(out.detach(), fake_quantize(w.detach(), spec))
    (out * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)
    # through a product, as in TEQ's FQ(W * s): the gradient reaches the scale
    s = torch.ones(20, requires_grad=True)
    FakeQuantizeSTE.apply(w.detach() * s, spec).sum().backward()
    assert torch.allclose(s.grad, w.detach().sum(0))
