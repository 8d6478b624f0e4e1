"""FSBR: q/k groups tied across RoPE pairs, the clipping quantizer equal to RTN of the clamped weight, per-token
activation fake-quant, block-by-block training and the recipes end to end."""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_tiny_llama
from fxquant.capture import capture
from fxquant.errors import PassError
from fxquant.pipeline import PassContext
from fxquant.passes.analyze_structure import AnalyzeStructure
from fxquant.passes.fold_equivalent_scales import EquivalentScales, FoldEquivalentScales, random_scales
from fxquant.passes.fsbr import (FSBRConfig, act_fake_quantize, clip_bounds, lwc_fake_quantize, plan_fsbr,
                                 smoothquant_init, train_fsbr)
from fxquant.quant import QuantSpec, quantize_weight
from fxquant.recipes import get_recipe
from test_teq import ARCHS, _fresh, randomize

FEW = max(3, settings().max_examples // 8)


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def test_plan_has_a_rope_tied_qk_group_per_attention():
    _, cg, structure = _fresh(ARCHS[1], 0)
    plan = plan_fsbr(cg, structure)
    qk = [g for g in plan.groups if g.kind == "qk"]
    assert len(qk) == 1 and qk[0].tie_half == 4  # head_dim 8, full rotary
    assert qk[0].size == 16  # k width: 2 kv heads x 8
    assert sorted(g.kind for g in plan.groups) == ["attention", "gated", "norm", "norm", "qk"]
    _, cg, structure = _fresh(ARCHS[2], 0)  # multi-query, two layers: one q/k group per layer
    assert [g.size for g in plan_fsbr(cg, structure).groups if g.kind == "qk"] == [16, 16]


@settings(max_examples=FEW, deadline=None)
@given(arch=st.sampled_from(ARCHS), seed=st.integers(0, 2**16), spread=st.floats(0.1, 1.5),
       outliers=st.integers(0, 3))
def test_fold_with_tied_qk_keeps_the_float_function(arch, seed, spread, outliers):
    _, cg, structure = _fresh(arch, seed, outliers)
    plan = plan_fsbr(cg, structure)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    before = cg(ids).detach().clone()
    scales = random_scales(plan, spread=spread, generator=torch.Generator().manual_seed(seed))
    FoldEquivalentScales(scales=EquivalentScales(plan, scales, method="fsbr")).call(cg, PassContext())
    assert _rel(cg(ids).detach(), before) <= 1e-5


def test_untied_qk_scales_break_rope():
    """The public I-LLM code does not tie s_i and s_{i+d/2}; under RoPE that fold is not exact."""
    _, cg, structure = _fresh(ARCHS[1], 5)
    plan = plan_fsbr(cg, structure)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    before = cg(ids).detach().clone()
    scales = {g.name: torch.ones(g.size, dtype=torch.float64) for g in plan.groups}
    qk = next(g for g in plan.groups if g.kind == "qk")
    scales[qk.name] = torch.exp(torch.randn(qk.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    FoldEquivalentScales(scales=EquivalentScales(plan, scales)).call(cg, PassContext())
    assert _rel(cg(ids).detach(), before) > 1e-3


@settings(max_examples=FEW * 2, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(3, 70), bits=st.sampled_from([2, 3, 4, 8]),
       group=st.sampled_from([None, 8, 32]), sym=st.booleans(), seed=st.integers(0, 999))
def test_clipping_quantizer_is_rtn_of_the_clamped_weight(rows, cols, bits, group, sym, seed):
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits=bits, symmetric=sym, group_size=group)
    w = torch.randn(rows, cols, generator=g)
    w[:, 0] *= 20  # an outlier column
    n = -(-cols // spec.effective_group_size(cols))
    hi = torch.randn(rows, n, generator=g) + 2
    lo = None if sym else torch.randn(rows, n, generator=g) + 2
    fq = lwc_fake_quantize(w, spec, lo, hi)
    rtn = quantize_weight(clip_bounds(w, spec, lo, hi), spec).dequantize()
    assert torch.equal(fq, rtn)


def test_clipping_bounds_get_gradients():
    spec = QuantSpec(bits=3, group_size=8)
    w = torch.randn(4, 16)
    hi = torch.full((4, 2), 4.0, requires_grad=True)
    x = torch.randn(5, 16)
    (x @ lwc_fake_quantize(w, spec, None, hi).t()).pow(2).sum().backward()
    assert hi.grad is not None and bool((hi.grad != 0).any())


def test_activation_fake_quant_is_per_token_and_straight_through():
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = act_fake_quantize(x, 4)
    scale = x.detach().abs().amax(-1, keepdim=True) / 7
    codes = y.detach() / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4) and int(codes.abs().max().round()) <= 8
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert act_fake_quantize(x, 16) is x


def test_smoothquant_init_grows_with_activation_outliers():
    model, cg, structure = _fresh(ARCHS[1], 2, outliers=0)
    plan = plan_fsbr(cg, structure)
    base = {f: cg.tensors[p] for p, f in cg.fqn.items()}
    norm = next(g for g in plan.groups if g.kind == "norm")
    base[norm.producer] = base[norm.producer].detach().clone()
    base[norm.producer][3] *= 50  # channel 3 of the norm output becomes an outlier
    batches = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    s = smoothquant_init(model, plan, base, batches, alpha=0.5)
    assert all(bool((v > 0).all()) for v in s.values())
    assert int(s[norm.name].argmax()) == 3
    assert torch.equal(s[next(g.name for g in plan.groups if g.kind == "qk")], torch.ones(16))


# ---- training ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _setup():
    model = make_tiny_llama(layers=2, hidden=32, heads=4, kv_heads=2, inter=64)
    randomize(model, 9, outliers=2, outlier_gain=8.0)
    cg = capture(model)
    ctx = PassContext()
    AnalyzeStructure().call(cg, ctx)
    ids = torch.randint(0, 128, (2000,), generator=torch.Generator().manual_seed(3))
    return cg, plan_fsbr(cg, ctx.artifacts["structure"]), ids


def _train(seed=0, epochs=4, samples=3):
    cg, plan, ids = _setup()
    cfg = FSBRConfig(act_bits=8, epochs=epochs, samples=samples, seq_len=16, seed=seed, progress=False)
    return train_fsbr(cg, plan, QuantSpec(bits=4), ids, cfg)


def test_block_training_moves_scales_and_clipping_and_lowers_the_mse():
    record = _train()
    assert record.moved() > 1e-3, "FSBR scales stayed at their SmoothQuant init"
    assert any(not torch.equal(hi, torch.full_like(hi, 4.0)) for _, hi in record.extra["clip"].values())
    assert len(record.losses) == 2 * 4  # one mean MSE per epoch and layer
    first_layer = record.losses[:4]
    assert min(first_layer) < 0.8 * first_layer[0], first_layer
    qk = next(g for g in record.plan.groups if g.kind == "qk")
    s = record.scales[qk.name].view(-1, 2, qk.tie_half)
    assert torch.equal(s[:, 0], s[:, 1])  # still tied after training


def test_fsbr_is_deterministic():
    a, b = _train(seed=1, epochs=1, samples=2), _train(seed=1, epochs=1, samples=2)
    assert a.losses == b.losses and all(torch.equal(a.scales[k], b.scales[k]) for k in a.scales)


def test_recipes_end_to_end_w4a4():
    from fxquant.api import quantize
    for name in ("fsbr-w8a8", "fsbr-w4a8", "fsbr-w4a4"):
        r = get_recipe(name)
        assert r.method == "fsbr" and not r.data_free
        assert r.pipeline().names == ["analyze_structure", "train_fsbr_scales", "fold_equivalent_scales",
                                      "clip_weights", "quantize_weights_rtn", "quantize_activations"]
    model = make_tiny_llama(layers=1, hidden=32, heads=4, kv_heads=2, inter=64)
    recipe = get_recipe("fsbr-w4a4")
    recipe.options.update(epochs=1, samples=2, seq_len=16, progress=False)
    ids = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(0))
    result = quantize(model, recipe, calibration=ids, verify=True)
    assert {qw.spec.bits for qw in result.quantized.values()} == {4}
    assert len(result.quantized) == 7
    assert result.records[-1].stats["act_quantized"] == 7
    probe = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(input_ids=probe).logits
        graph = result.captured(probe)
    assert torch.allclose(eager, graph, atol=1e-5, rtol=1e-5)  # the eager hooks do what the graph nodes do


def test_fsbr_refuses_minifloat_weights():
    from fxquant.fpformats import FPQuantSpec
    from fxquant.passes.fsbr import TrainFSBRScales
    with pytest.raises(PassError, match="integer QuantSpec"):
        TrainFSBRScales(FPQuantSpec())
