"""The activation-aware clip search (passes/search_weight_clipping.py).

The search scores candidates through per-group Gram blocks; these tests recompute every error from the tokens
themselves (``‖X (Q(W') − W)ᵀ‖²`` per row and group), so a wrong block, a wrong padding or a mismatched quantizer
fails them. Weights carry outliers, which is where clipping has something to win.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_tiny_llama
from fxquant.errors import PassError, RecipeError
from fxquant.fpformats import FPQuantSpec
from fxquant.passes.search_weight_clipping import ClipConfig, _grouping, _pad, clip_search
from fxquant.passes.train_teq_scales import weight_quantizer
from fxquant.quant import QuantSpec
from fxquant.recipes import get_recipe

FEW = max(4, settings().max_examples // 4)


def _blocks(x: torch.Tensor, group: int, ng: int) -> torch.Tensor:
    xb = _pad(x, ng * group).view(-1, ng, group).transpose(0, 1)
    return xb.transpose(1, 2) @ xb


def _direct_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor, group: int) -> torch.Tensor:
    """[out, groups] output error of each row and group, from the tokens (no Gram matrix)."""
    k = w.shape[1]
    cols = [slice(s, min(s + group, k)) for s in range(0, k, group)]
    return torch.stack([((x[:, c].double() @ (wq[:, c] - w[:, c]).double().t()) ** 2).sum(dim=0) for c in cols], dim=1)


def _case(seed: int, out: int, k: int, tokens: int, outliers: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=g)
    rows = torch.randint(0, out, (outliers,), generator=g)
    cols = torch.randint(0, k, (outliers,), generator=g)
    w[rows, cols] *= 12.0                                   # a few outlier weights stretch their groups' ranges
    x = torch.randn(tokens, k, generator=g) * (0.2 + torch.rand(k, generator=g) * 3)   # uneven channel energies
    return w, x


SPECS = [QuantSpec(bits=4, symmetric=True, group_size=16), QuantSpec(bits=3, symmetric=True, group_size=None),
         QuantSpec(bits=4, symmetric=False, group_size=24), QuantSpec(bits=2, symmetric=True, group_size=8),
         FPQuantSpec(format="e3m2", group_size=16), FPQuantSpec(format="e2m1", group_size=None, scale_search="mse")]


@settings(max_examples=FEW, deadline=None)
@given(seed=st.integers(0, 2**16), spec=st.sampled_from(SPECS), out=st.integers(1, 12), k=st.integers(5, 70),
       tokens=st.integers(3, 40), outliers=st.integers(0, 6))
def test_the_chosen_ratios_never_lose_to_plain_rounding_per_group(seed, spec, out, k, tokens, outliers):
    w, x = _case(seed, out, k, tokens, outliers)
    group, ng = _grouping(spec, k)
    q = weight_quantizer(spec)
    cfg = ClipConfig()
    clipped, ratios, before, after = clip_search(w, _blocks(x, group, ng), q, group, cfg.ratios())
    assert ratios.shape == (out, ng)
    assert bool(((ratios >= 1 - cfg.clip_shrink) & (ratios <= 1)).all())
    # the reported errors are the errors measured on the tokens
    e_plain = _direct_error(x, w, q(w), group)
    e_clip = _direct_error(x, w, q(clipped), group)
    assert math.isclose(before, float(e_plain.sum()), rel_tol=1e-3, abs_tol=1e-6)
    assert math.isclose(after, float(e_clip.sum()), rel_tol=1e-3, abs_tol=1e-6)
    # per row and group: never worse than r = 1 (a candidate), up to float rounding of the two routes
    assert bool((e_clip <= e_plain * (1 + 1e-4) + 1e-6).all()), (e_clip - e_plain).max()
    # clipping only narrows: every weight stays inside its group's original range, unclipped groups are untouched
    wp, cp = _pad(w, ng * group).view(out, ng, group), _pad(clipped, ng * group).view(out, ng, group)
    assert bool((cp.amax(dim=2) <= wp.amax(dim=2).clamp(min=0) + 1e-6).all())
    assert bool((cp.amin(dim=2) >= wp.amin(dim=2).clamp(max=0) - 1e-6).all())
    same = ratios == 1
    assert torch.equal(cp[same], wp[same])


FP_SPECS = [FPQuantSpec(format="e3m2", group_size=None), FPQuantSpec(format="e3m2", group_size=16),
            FPQuantSpec(format="e2m3", group_size=None), FPQuantSpec(format="e2m1", group_size=8, scale_search="mse")]


@settings(max_examples=FEW, deadline=None)
@given(seed=st.integers(0, 2**16), spec=st.sampled_from(FP_SPECS), out=st.integers(1, 12), k=st.integers(5, 70),
       tokens=st.integers(3, 40), outliers=st.integers(0, 6))
def test_minifloat_scale_ratios_above_one_are_what_the_packed_weight_gets(seed, spec, out, k, tokens, outliers):
    """With the scale-up candidates the search keeps ratios in [1 - shrink, top]; the weight the FP quantizer
    then packs (clipped weight, scales times ``r.clamp(min=1)``) has exactly the error the search reported, and no
    group is worse than with the clip candidates alone (those are a subset)."""
    from fxquant.fpformats import fp_fake_quantize, quantize_fp
    w, x = _case(seed, out, k, tokens, outliers)
    group, ng = _grouping(spec, k)
    cfg = ClipConfig(clip_scale_up=True)
    up = cfg.up_ratios(spec)
    top = spec.format.max_value / 2.0 ** math.floor(math.log2(spec.format.max_value))
    assert up and max(up) == pytest.approx(top) and min(up) > 1
    q = weight_quantizer(spec)
    scaled = lambda w_, r_: fp_fake_quantize(w_, spec, ste=False, scale_ratio=r_)   # noqa: E731
    blocks = _blocks(x, group, ng)
    c_only, r_only, _, _ = clip_search(w, blocks, q, group, cfg.ratios())
    clipped, ratios, before, after = clip_search(w, blocks, q, group, cfg.ratios(), up, scaled)
    assert bool(((ratios >= 1 - cfg.clip_shrink) & (ratios <= top + 1e-6)).all())
    packed = quantize_fp(clipped, spec, scale_ratio=ratios.clamp(min=1)).dequantize()
    assert torch.equal(packed, scaled(clipped, ratios.clamp(min=1)))    # fake quant == packed dequant, bit for bit
    e_final = _direct_error(x, w, packed, group)
    assert math.isclose(after, float(e_final.sum()), rel_tol=1e-3, abs_tol=1e-6)
    e_clip = _direct_error(x, w, q(c_only), group)
    assert bool((e_final <= e_clip * (1 + 1e-4) + 1e-6).all()), (e_final - e_clip).max()
    # a ratio above 1 never clips: those groups' float weights are untouched
    wp, cp = _pad(w, ng * group).view(out, ng, group), _pad(clipped, ng * group).view(out, ng, group)
    assert torch.equal(cp[ratios >= 1], wp[ratios >= 1])
    assert ClipConfig().up_ratios(spec) == [] and cfg.up_ratios(SPECS[0]) == []   # off by default; int: none


def test_scale_ratios_are_checked():
    from fxquant.errors import WeightError
    from fxquant.fpformats import quantize_fp
    w = torch.randn(4, 32)
    ok = quantize_fp(w, "e3m2", scale_ratio=torch.full((4, 1), 1.5))
    torch.testing.assert_close(ok.scale, quantize_fp(w, "e3m2").scale * 1.5)
    with pytest.raises(WeightError, match="shape"):
        quantize_fp(w, "e3m2", scale_ratio=torch.ones(4, 2))
    for bad in (0.9, 2.0, float("nan")):
        with pytest.raises(WeightError, match=r"\[1, 2\)"):
            quantize_fp(w, "e3m2", scale_ratio=torch.full((4, 1), bad))


def test_an_outlier_in_a_quiet_channel_is_clipped():
    """One huge weight on an input channel that barely fires: rounding around it costs the group its precision,
    cutting it costs almost nothing. The search must cut it as deep as it may and lower the output error."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 32, generator=g) * 0.1
    w[:, 5] = 3.0
    x = torch.randn(256, 32, generator=g)
    x[:, 5] *= 1e-3
    spec = QuantSpec(bits=4, symmetric=True, group_size=32)
    clipped, ratios, before, after = clip_search(w, _blocks(x, 32, 1), weight_quantizer(spec), 32,
                                                 ClipConfig().ratios())
    assert bool((ratios <= 0.55).all()), ratios     # close to the deepest cut the grid allows (0.525)
    assert after < 0.6 * before                       # the other weights' step halves; most round to 0 anyway
    # and the quantizer that follows sees the clipped range
    assert float(clipped.abs().amax()) < 0.6 * 3.0


def test_options_are_checked_before_anything_runs():
    r = get_recipe("teq-w4g128")
    assert r.options.get("clip", ClipConfig.clip) is True
    for bad in ({"clip_shrink": 1.5}, {"clip_grid": 0}, {"clip_windows": -1}, {"clip_qk": "no"},
                {"clip_scale_up": 1}):
        r2 = get_recipe("teq-w4g128")
        with pytest.raises(RecipeError):
            r2.options.update(bad)
            r2.validate()
    with pytest.raises(RecipeError, match="clip_grid"):
        get_recipe({"base": "teq-w4g128", "options": {"clip_gird": 10}})


def test_the_pass_runs_after_the_fold_and_can_be_turned_off():
    r = get_recipe("teq-w4g128")
    names = r.pipeline().names
    assert names.index("fold_equivalent_scales") < names.index("search_weight_clipping") \
        < names.index("quantize_weights_rtn")
    r.options["clip"] = False
    assert "search_weight_clipping" not in r.pipeline().names
    assert "search_weight_clipping" in get_recipe("teq-fp6").pipeline().names


@pytest.mark.parametrize("name", ["teq-w4g128", "teq-fp6"])
@pytest.mark.parametrize("qk", [True, False])
def test_on_a_tiny_llama_the_quantized_model_is_the_clipped_one(name, qk):
    from fxquant.api import quantize
    torch.manual_seed(0)
    model = make_tiny_llama(layers=1, hidden=32, heads=4, kv_heads=2, inter=64)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 3] *= 40      # an outlier column for the search to cut
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe = get_recipe(name)
    recipe.options.update(steps=0, init="ones", seq_len=16, batch_size=1, progress=False, clip_qk=qk,
                          clip_windows=4, clip_scale_up=name == "teq-fp6", gptq=False)   # init ones: the fold is the identity, so `before` is the folded weight
    ids = torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(0))
    result = quantize(model, recipe, calibration=ids, verify=True)
    stats = next(r.stats for r in result.records if r.name == "search_weight_clipping")
    record = result.artifacts["clip_search"]
    skipped = result.artifacts["clip_search_skipped"]
    assert stats["clipped"] == len(record) == (7 if qk else 5)
    assert sorted(k.split(".")[-2] for k in skipped) == ([] if qk else ["k_proj", "q_proj"])
    assert 0 < stats["output_error_ratio"] <= 1.0
    assert all(v["error_after"] <= v["error_before"] * (1 + 1e-5) for v in record.values())
    down = "model.layers.0.mlp.down_proj.weight"
    assert bool((record[down]["ratios"] < 1).any()) if name != "teq-fp6" else bool((record[down]["ratios"] != 1).any())
    # the stored weights are the clipped ones, quantized: down_proj has one group per row (64 inputs), and both
    # quantizers map a group's largest magnitude onto their largest level, so each clipped (or kept) row's largest
    # magnitude is its chosen ratio times the original's
    r = record[down]["ratios"][:, 0]
    stored = model.get_parameter(down).detach().abs().amax(dim=1)
    want = r.clamp(max=1) * before[down].abs().amax(dim=1)
    torch.testing.assert_close(stored[r <= 1], want[r <= 1], rtol=1e-5, atol=1e-7)
    ups = result.artifacts["weight_scale_ratios"]
    if name == "teq-fp6":
        # FP6 rows may take a scale above absmax instead: it is in the packed weight's stored scales
        scale = result.quantized[down].scale[:, 0]
        torch.testing.assert_close(scale, want * r.clamp(min=1) / 28, rtol=1e-6, atol=0)
        assert (down in ups) == bool((r > 1).any())
        assert all(bool((v >= 1).all()) for v in ups.values()) and len(ups) > 0
    else:
        assert bool((r <= 1).all()) and ups == {}


def test_per_tensor_scales_are_refused_with_a_hint():
    from fxquant.api import quantize
    model = make_tiny_llama(layers=1, hidden=32, heads=4, kv_heads=2, inter=64)
    recipe = get_recipe({"base": "teq-w4g128", "group_size": None, "per_tensor": True,
                         "options": {"steps": 0, "seq_len": 16, "batch_size": 1, "progress": False}})
    ids = torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(PassError, match="per tensor") as info:
        quantize(model, recipe, calibration=ids)
    assert "clip: false" in str(info.value.hint)
