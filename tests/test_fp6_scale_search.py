"""The ``mse`` scale search of the minifloat formats (``FPQuantSpec(scale_search="mse")``) and its recipes.

What must hold: per row (group) the searched scale never gives a larger squared weight error than absmax — on
random shapes with outlier rows/columns and zero rows —, it is deterministic, it is a candidate of the documented
grid, every code it produces is a code of the format (so the 4+2 planes, the kernels and the checkpoint are
unchanged), the cheap rounding it uses equals ``decode(encode(.))`` bit for bit, and the ``...-mse`` recipes run
end to end on a tiny model (quantize, pack, lower, save, load).
"""
from __future__ import annotations

import json

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxquant
from fxquant.fpformats import (E2M1, E2M2, E2M3, E3M1, E3M2, MSE_RATIOS, FPQuantSpec, compute_scales, decode,
                               encode, pack_fp6, quantize_fp, round_to_format, unpack_fp6_planes)
from fxquant.recipes import get_recipe, named_recipes
from tests.conftest import make_tiny_llama

ALL = [E3M2, E2M3, E2M2, E3M1, E2M1]


def _sq_err(w: torch.Tensor, q, group: int | None) -> torch.Tensor:
    """Squared error per row ([O, 1]) or per group ([O, G]) of a quantized weight."""
    sq = (q.dequantize(torch.float32) - w) ** 2
    if group is None:
        return sq.sum(dim=1, keepdim=True)
    pad = -(-w.shape[1] // group) * group - w.shape[1]
    return torch.nn.functional.pad(sq, (0, pad)).view(w.shape[0], -1, group).sum(dim=2)


@st.composite
def weights(draw):
    rows = draw(st.integers(1, 12))
    cols = draw(st.integers(1, 80))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
    if draw(st.booleans()):  # outlier columns (the LLM case: a few huge input channels)
        cols_hit = torch.randint(0, cols, (max(1, cols // 16),), generator=g)
        w[:, cols_hit] *= draw(st.sampled_from([8.0, 50.0]))
    if draw(st.booleans()):  # one outlier row
        w[int(torch.randint(0, rows, (1,), generator=g))] *= 20.0
    if draw(st.booleans()):  # a zero row
        w[int(torch.randint(0, rows, (1,), generator=g))] = 0.0
    if draw(st.booleans()):  # single spikes
        w.view(-1)[torch.randint(0, w.numel(), (2,), generator=g)] = 5.0 * w.abs().max() + 1.0
    return w


@settings(max_examples=60, deadline=None)
@given(w=weights(), fmt=st.sampled_from(ALL), group=st.sampled_from([None, 1, 7, 16, 32, 64]))
def test_mse_search_never_loses_to_absmax_and_codes_stay_valid(w, fmt, group):
    ab = quantize_fp(w, FPQuantSpec(format=fmt, group_size=group))
    ms = quantize_fp(w, FPQuantSpec(format=fmt, group_size=group, scale_search="mse"))
    e_ab, e_ms = _sq_err(w, ab, group), _sq_err(w, ms, group)
    # per row / group, never worse (a tiny float tolerance: the search sums in another order than this check)
    assert torch.all(e_ms <= e_ab * (1 + 1e-5) + 1e-30)
    assert e_ms.sum() <= e_ab.sum() * (1 + 1e-5) + 1e-30
    # the scale is absmax scaled by a ratio of the grid, finite and positive; zero rows/groups keep scale 1
    assert torch.isfinite(ms.scale).all() and (ms.scale > 0).all()
    assert ms.scale.shape == ab.scale.shape
    zero = ab.scale == 1.0
    ratio = ms.scale / ab.scale
    grid = torch.tensor(MSE_RATIOS)
    assert torch.all((ratio[~zero, None] - grid).abs().min(dim=1).values <= 1e-6)
    assert torch.all(ms.scale <= ab.scale * (1 + 1e-6))
    # every code is a code of the format and round-trips the 4+2 planes
    assert ms.codes.dtype == torch.uint8 and int(ms.codes.max()) < fmt.num_codes
    packed = pack_fp6(ms)
    assert torch.equal(unpack_fp6_planes(packed.hi2, packed.lo4, w.shape[1]) >> (6 - fmt.bits), ms.codes)
    assert torch.equal(packed.dequantize(), ms.dequantize())


def test_zero_rows_groups_and_determinism():
    w = torch.randn(5, 40)
    w[1] = 0
    w[3, 16:32] = 0
    for group in (None, 16):
        s1 = compute_scales(w, E2M3, group, "mse")
        s2 = compute_scales(w.clone(), E2M3, group, "mse")
        assert torch.equal(s1, s2)  # deterministic, bit for bit
        assert torch.all(s1[1] == 1.0)
    assert compute_scales(w, E2M3, 16, "mse")[3, 1] == 1.0
    q = quantize_fp(w, FPQuantSpec(format=E2M3, group_size=16, scale_search="mse"))
    assert torch.all(q.codes[1] == 0) and torch.all(q.dequantize()[3, 16:32] == 0)


def test_search_helps_on_gaussian_rows_and_keeps_outliers_when_they_pay():
    torch.manual_seed(0)
    w = torch.randn(32, 512)
    for fmt in (E2M3, E3M2, E2M1):
        ab = quantize_fp(w, FPQuantSpec(format=fmt))
        ms = quantize_fp(w, FPQuantSpec(format=fmt, scale_search="mse"))
        assert _sq_err(w, ms, None).sum() < 0.97 * _sq_err(w, ab, None).sum()
    # a row whose only nonzero weights are two equal spikes: clipping them only adds error, absmax is kept
    spikes = torch.zeros(1, 64)
    spikes[0, [3, 40]] = 2.5
    assert torch.equal(compute_scales(spikes, E2M3, None, "mse"), compute_scales(spikes, E2M3))


@pytest.mark.parametrize("fmt", ALL, ids=str)
def test_round_to_format_equals_the_codec(fmt):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 257, generator=g) * fmt.max_value / 2
    vals = decode(torch.arange(fmt.num_codes, dtype=torch.uint8), fmt)
    mids = ((vals[: fmt.num_codes // 2 - 1] + vals[1: fmt.num_codes // 2]) / 2)  # exact ties
    for t in (x, x * 100, x * 1e-3, x * 1e-40, vals, mids, -mids, torch.tensor([0.0, -0.0, 1e30, -1e30])):
        assert torch.equal(round_to_format(t, fmt), decode(encode(t, fmt), fmt))
        assert torch.equal(torch.signbit(round_to_format(t, fmt)), torch.signbit(decode(encode(t, fmt), fmt)))


@settings(max_examples=80, deadline=None)
@given(x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, max_side=40),
                    elements=st.floats(-1e4, 1e4, width=32, allow_nan=False)), fmt=st.sampled_from(ALL))
def test_round_to_format_equals_the_codec_hypothesis(x, fmt):
    t = torch.from_numpy(x)
    assert torch.equal(round_to_format(t, fmt), decode(encode(t, fmt), fmt))


# ---- recipes ------------------------------------------------------------------------------------------------

MSE_RECIPES = ["fp6-mse", "fp6-e2m3-mse", "fp6-e2m3g128-mse", "fp6-e2m3g64-mse"]


def test_fp_recipes_are_registered():
    names = named_recipes()
    for name in ["fp6", "fp6g128", "fp6g64", "fp6-e2m3", "fp6-e2m3g128", "fp6-e2m3g64", "fp5", "fp4", "teq-fp6",
                 *MSE_RECIPES]:
        assert name in names, name
    r = get_recipe("fp6-e2m3g64-mse")
    assert r.method == "fp" and r.data_free
    assert (r.weight.format, r.weight.group_size, r.weight.scale_search) == (E2M3, 64, "mse")
    assert get_recipe("fp6-e2m3g64").weight.scale_search == "absmax"
    # the same thing written as a recipe file / dict
    d = get_recipe({"method": "fp", "format": "e2m3", "group_size": 64, "scale_search": "mse"})
    assert d.weight == r.weight


@pytest.mark.parametrize("name", ["fp6-e2m3g64-mse", "fp6-mse"])
def test_mse_recipe_end_to_end_on_a_tiny_model(tmp_path, name):
    model = make_tiny_llama(layers=2)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    result = fxquant.quantize(model, name)
    assert len(result.quantized) == 14
    spec = get_recipe(name).weight
    absmax = FPQuantSpec(format=spec.format, group_size=spec.group_size)
    floats = make_tiny_llama(layers=2).state_dict()
    err_ms = err_ab = 0.0
    for fqn, packed in result.quantized.items():
        w = floats[fqn]
        assert packed.format == spec.format and packed.group_size == spec.group_size
        assert packed.spec == spec and packed.to_quantized().spec == spec  # scale_search included
        assert torch.equal(packed.scale, compute_scales(w, spec.format, spec.group_size, "mse"))
        assert torch.equal(dict(model.named_parameters())[fqn].detach(), packed.dequantize(torch.float32))
        err_ms += float(((packed.dequantize() - w) ** 2).sum())
        err_ab += float(((quantize_fp(w, absmax).dequantize() - w) ** 2).sum())
    assert err_ms < err_ab
    with torch.no_grad():
        out = result.eval_model(ids).logits
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.05
    # the packed checkpoint stores the searched scales: reload is bit-identical
    saved = result.save(tmp_path / "ckpt")
    cfg = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert cfg["recipe"] == name
    ckpt = fxquant.load(saved)
    with torch.no_grad():
        assert torch.equal(ckpt.eval_model(ids).logits, out)
    assert {q.spec for q in ckpt.quantized.values()} == {spec}, "the reloaded weights must say how scales were made"


def test_mse_recipe_lowers_to_the_fp6_op():
    import fxquant.backends.fp6  # noqa: F401 - registers the fp6 format
    from fxquant.passes.lower_quantized_linears import LowerQuantizedLinears
    from fxquant.passes.split_fp6_weights import SplitFP6Weights
    model = make_tiny_llama()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    cg = fxquant.capture(model)
    ctx = fxquant.PassContext()
    fxquant.Pipeline([SplitFP6Weights(get_recipe("fp6-e2m3g64-mse").weight)]).run(cg, ctx, verify=True)
    notes = [n.meta["fxquant"]["quant"] for n in cg.gm.graph.nodes if "quant" in n.meta.get("fxquant", {})]
    assert notes and all(n["scale_search"] == "mse" and n["format"] == "fp6_e2m3" for n in notes)
    before = cg(ids)
    records = fxquant.Pipeline([LowerQuantizedLinears()]).run(cg, ctx, verify=True)
    assert records[0].stats["lowered"] == 7
    assert torch.equal(cg(ids), before)
