"""ParetoQ quantizers: exact level sets, the clip at ±0.99, α init, gradients against a float64 autograd reference,
and clear errors for specs that do not exist (METHODS.md §3)."""
from __future__ import annotations

import math

import pytest
import torch

from fxquant.errors import QuantSpecError, WeightError
from fxquant.paretoq import (ALPHA_EPS, ParetoQFakeQuant, ParetoQSpec, expand_groups, grad_scale, init_alpha,
                             levels_of, paretoq_fake_quant, quantize_codes)

ALL_BITS = (1, 1.58, 2, 3, 4)
EXPECTED_LEVELS = {
    1: {-1.0, 1.0},
    1.58: {-2 / 3, 0.0, 2 / 3},
    2: {-0.75, -0.25, 0.25, 0.75},
    3: {float(i) for i in range(-4, 4)},
    4: {float(i) for i in range(-8, 8)},
}


def _level_set(bits: float, x: torch.Tensor) -> set[float]:
    """Levels (in units of α = 1) the quantizer produces for the inputs ``x`` (float64, rounded for set equality)."""
    w = x.reshape(1, -1).double()
    out = paretoq_fake_quant(w, torch.ones(1, 1, dtype=torch.float64), bits)
    return {round(v, 6) for v in out.flatten().tolist()}


@pytest.mark.parametrize("bits", ALL_BITS)
def test_level_set_is_exactly_the_methods_table(bits):
    # a dense sweep far past the clip on both sides, with the boundaries ±0.99, ±1 and the LSQ range ends in it
    x = torch.cat([torch.linspace(-12, 12, 4801), torch.tensor([-1.0, -0.99, 0.0, 0.99, 1.0, -8.5, 7.5])])
    got = _level_set(bits, x)
    assert got == {round(v, 6) for v in EXPECTED_LEVELS[bits]}


def test_clip_at_one_would_add_a_level_and_ours_does_not():
    # the formula with clip ±1 (what the ±0.99 avoids): x = 1 lands on an extra level
    one = torch.tensor(1.0)
    assert float(torch.round(one * 1.5) / 1.5) == pytest.approx(4 / 3)            # ternary: a 4th level
    assert float((torch.round(one * 2 - 0.5) + 0.5) / 2) == pytest.approx(1.25)   # 2-bit: a 5th level
    # ours, at exactly x = ±1 (W = ±α): the outermost table levels
    assert _level_set(1.58, torch.tensor([1.0, -1.0])) == {round(2 / 3, 6), round(-2 / 3, 6)}
    assert _level_set(2, torch.tensor([1.0, -1.0])) == {0.75, -0.75}


def test_binary_sign_of_zero_is_plus_one():
    w = torch.tensor([[0.0, -0.0, 1e-30, -1e-30, 3.0]])
    out = paretoq_fake_quant(w, torch.tensor([[2.0]]), 1)
    assert out.tolist() == [[2.0, 2.0, 2.0, -2.0, 2.0]]


@pytest.mark.parametrize("bits", ALL_BITS)
def test_codes_and_levels_agree_with_the_forward_formula(bits):
    # the METHODS.md formulas written out directly, against our code -> level path (float32, bit for bit)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 40, generator=g) * 3
    alpha = torch.rand(6, 1, generator=g) + 0.3
    x = w / alpha
    if bits == 1:
        q = torch.where(w >= 0, 1.0, -1.0)
    elif bits == 1.58:
        q = torch.round(x.clamp(-0.99, 0.99) * 1.5) / 1.5
    elif bits == 2:
        q = (torch.round(x.clamp(-0.99, 0.99) * 2 - 0.5) + 0.5) / 2
    else:
        q = torch.round(x).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    spec = ParetoQSpec(bits)
    assert torch.equal(levels_of(quantize_codes(w, alpha, spec), spec), q)
    assert torch.equal(paretoq_fake_quant(w, alpha, bits), q * alpha)


@pytest.mark.parametrize("bits,stat", [(1, "mean"), (1.58, "max"), (2, "max"), (3, "max/3"), (4, "max/7")])
def test_alpha_init_per_row_and_per_group(bits, stat):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 13, generator=g)
    w[3] = 0.0  # a zero row gets the floor, not 0
    for group in (None, 5):
        spec = ParetoQSpec(bits, group)
        a = init_alpha(w, spec)
        bounds = [(0, 13)] if group is None else [(0, 5), (5, 10), (10, 13)]  # the last group is shorter
        assert a.shape == (4, len(bounds)) and a.dtype == torch.float32
        for j, (lo, hi) in enumerate(bounds):
            cols = w[:3, lo:hi].abs()
            want = {"mean": cols.mean(1), "max": cols.amax(1), "max/3": cols.amax(1) / 3,
                    "max/7": cols.amax(1) / 7}[stat]
            torch.testing.assert_close(a[:3, j], want)
        assert torch.all(a[3] == ALPHA_EPS)


def _reference(w: torch.Tensor, a: torch.Tensor, spec: ParetoQSpec) -> torch.Tensor:
    """The forward with plain autograd: straight-through round, LSQ's grad-scale trick on α (float64)."""
    rows, cols = w.shape
    group = spec.effective_group_size(cols)
    gs = grad_scale(spec, w.numel())
    a_s = a * gs + (a - a * gs).detach()          # value α, gradient × grad_scale
    ae = expand_groups(a_s, group, cols)

    def ste_round(t: torch.Tensor) -> torch.Tensor:
        return t + (torch.round(t) - t).detach()

    if spec.bits == 1:
        inside = ((w / ae).abs() <= 1).to(w.dtype).detach()
        return ae * torch.where(w >= 0, 1.0, -1.0).to(w.dtype) + (w - w.detach()) * inside
    x = w / ae
    if spec.bits == 1.58:
        q = ste_round(x.clamp(-0.99, 0.99) * 1.5) / 1.5
    elif spec.bits == 2:
        q = (ste_round(x.clamp(-0.99, 0.99) * 2 - 0.5) + 0.5) / 2
    else:
        q = ste_round(x.clamp(spec.qn, spec.qp))
    return q * ae


@pytest.mark.parametrize("group", [None, 5], ids=["perchan", "g5"])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_gradients_match_float64_autograd_reference(bits, group):
    spec = ParetoQSpec(bits, group)
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(7, 13, generator=g, dtype=torch.float64)
    a0 = init_alpha(w0, spec).double() * (0.6 + 0.5 * torch.rand(7, 1, generator=g, dtype=torch.float64))
    upstream = torch.randn(7, 13, generator=g, dtype=torch.float64)
    grads = []
    for fn in (lambda w, a: ParetoQFakeQuant.apply(w, a, spec), lambda w, a: _reference(w, a, spec)):
        w = w0.clone().requires_grad_(True)
        a = a0.clone().requires_grad_(True)
        out = fn(w, a)
        (out * upstream).sum().backward()
        grads.append((out.detach(), w.grad, a.grad))
    (o1, gw1, ga1), (o2, gw2, ga2) = grads
    torch.testing.assert_close(o1, o2, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gw1, gw2, rtol=0, atol=1e-12)
    torch.testing.assert_close(ga1, ga2, rtol=1e-6, atol=1e-9)
    # the straight-through mask is a real mask: some weights lie outside the clip range and get no gradient
    assert bool((gw1 == 0).any()) and bool((gw1 != 0).any())


def test_alpha_gradient_formula_by_hand():
    # 2-bit SEQ, one row: inside (Q(x) - x), outside the clip level (±0.75), times 1/sqrt(numel * Qp)
    spec = ParetoQSpec(2)
    w = torch.tensor([[0.3, -2.0, 5.0, -0.1]], dtype=torch.float64, requires_grad=True)
    a = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
    ParetoQFakeQuant.apply(w, a, spec).sum().backward()
    expect = ((0.25 - 0.3) + (-0.75) + 0.75 + (-0.25 + 0.1)) / math.sqrt(4 * 1)
    assert float(a.grad) == pytest.approx(expect)
    assert w.grad.tolist() == [[1.0, 0.0, 0.0, 1.0]]
    # LSQ 4 bit: Qp = 7 enters the grad scale; outside the range the clamp level (-8 or 7)
    spec = ParetoQSpec(4)
    w = torch.tensor([[2.4, -20.0, 30.0]], dtype=torch.float64)
    a = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
    ParetoQFakeQuant.apply(w, a, spec).sum().backward()
    assert float(a.grad) == pytest.approx(((2 - 2.4) - 8 + 7) / math.sqrt(3 * 7))


def test_scale_floor_gives_no_nan():
    w = torch.randn(3, 8)
    a = torch.tensor([[0.0], [-1.0], [0.5]], requires_grad=True)
    out = ParetoQFakeQuant.apply(w, a, ParetoQSpec(4))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(a.grad).all()
    assert a.grad[0].item() == 0.0 and a.grad[1].item() == 0.0  # clamped scales do not move the output


def test_low_precision_weights_quantize_in_float32():
    w = torch.randn(4, 16, dtype=torch.bfloat16)
    a = init_alpha(w, ParetoQSpec(2))
    out = paretoq_fake_quant(w, a, 2)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, paretoq_fake_quant(w.float(), a, 2).to(torch.bfloat16))


@pytest.mark.parametrize("bad", [0, 1.5, 5, 8, -2, True, "2", None])
def test_invalid_bits_are_refused(bad):
    with pytest.raises(QuantSpecError, match="1, 1.58, 2, 3, 4"):
        ParetoQSpec(bad)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True])
def test_invalid_group_size_is_refused(bad):
    with pytest.raises(QuantSpecError, match="group size"):
        ParetoQSpec(2, bad)


def test_spec_names_and_wrong_shapes():
    assert ParetoQSpec(1.58).describe() == "pq-w1.58" and ParetoQSpec(2, 64).describe() == "pq-w2g64"
    assert ParetoQSpec(1.58000000001).bits == 1.58
    assert ParetoQSpec(2, 200).effective_group_size(64) == 64
    with pytest.raises(QuantSpecError, match=r"shape \[4, 3\]"):
        paretoq_fake_quant(torch.randn(4, 12), torch.ones(4, 1), 2, 5)
    with pytest.raises(WeightError, match="non-finite"):
        init_alpha(torch.tensor([[1.0, float("nan")]]), ParetoQSpec(2))


def test_binary_init_stays_on_the_weights_device():
    """The 1-bit mean-|W| divisor is made on the weight's device, not the default one (a CUDA weight with the
    default device CPU failed with a device mismatch; here the default device is 'meta' and the weight CPU)."""
    w = torch.randn(6, 20)
    expect = init_alpha(w, ParetoQSpec(1, 8))
    with torch.device("meta"):
        got = init_alpha(w, ParetoQSpec(1, 8))
    assert got.device == w.device and torch.equal(got, expect)
