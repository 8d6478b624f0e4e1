"""I-LLM's activation positions (fxquant.actquant) and FSBR's SwiGLU act-smooth.

* the graph quantizers and the eager hooks compute the same function, for every allocation;
* the act-smooth fold (``gate' = s ⊙ gate``, ``up' = up ⊘ s``, SiLU as ``g · σ(g ⊘ s)``) is exact on the graph and
  on the eager model, and is not without its run-time half;
* the fake-quant attention is the model's attention when nothing is quantized, decodes with a KV cache as it
  computes a whole sequence, and quantizes what it says it does;
* the norm inputs' channel alignment is calibrated from the residual stream, spares its quiet channels the
  outliers' step, is the same on graph and eager model, and comes back with a checkpoint;
* FSBR trains the act-smooth scales when the SwiGLU operands are quantized, and a checkpoint brings the hooks back.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_tiny_llama
from fxquant.actquant import (ActAllocation, EagerActQuant, act_fake_quantize, aligned_fake_quantize,
                              calibrate_norm_align, find_sites, unit_fake_quantize)
from fxquant.capture import capture
from fxquant.errors import PassError, RecipeError
from fxquant.passes.analyze_structure import AnalyzeStructure
from fxquant.passes.fold_equivalent_scales import EquivalentScales, FoldEquivalentScales, random_scales
from fxquant.passes.fsbr import FSBRConfig, QuantizeActivations, plan_fsbr, train_fsbr
from fxquant.passes.quantize_weights_rtn import QuantizeWeightsRTN
from fxquant.pipeline import PassContext
from fxquant.quant import QuantSpec
from fxquant.recipes import get_recipe

FEW = max(3, settings().max_examples // 8)
WIDTHS = st.sampled_from([4, 8, 16])
ARCH = st.sampled_from([(32, 4, 4, 64, 1), (32, 4, 2, 48, 2), (64, 4, 1, 96, 1)])  # MHA, GQA, MQA


def _llama(arch, seed, dtype=torch.float32):
    hidden, heads, kv, inter, layers = arch
    model = make_tiny_llama(layers=layers, hidden=hidden, heads=heads, kv_heads=kv, inter=inter, seed=seed).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # outlier channels in the norms: the case smoothing is for
        for layer in model.model.layers:
            idx = torch.randperm(hidden, generator=g)[:2]
            layer.input_layernorm.weight[idx] *= 20.0
            layer.post_attention_layernorm.weight[idx] *= 20.0
    cg = capture(model)
    ctx = PassContext()
    AnalyzeStructure().call(cg, ctx)
    return model, cg, ctx


def _rel(a, b):
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())


@settings(max_examples=FEW, deadline=None)
@given(arch=ARCH, seed=st.integers(0, 2**16), linear=WIDTHS, norm=WIDTHS, swiglu=WIDTHS, attn=WIDTHS, softmax=WIDTHS,
       beta=st.sampled_from([0.0, 0.5, 1.0]))
def test_graph_quantizers_and_eager_hooks_compute_the_same_function(arch, seed, linear, norm, swiglu, attn, softmax,
                                                                      beta):
    model, cg, ctx = _llama(arch, seed)
    layers = arch[-1]
    QuantizeWeightsRTN(QuantSpec(bits=4), exclude=("lm_head*",)).call(cg, ctx)
    cg.write_back()
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        weights_only = model(input_ids=ids).logits
    if beta > 0:   # the norm inputs' channel alignment, as FSBR leaves it for quantize_activations
        norms = [p for _, p in find_sites(cg, ctx.artifacts["structure"], ctx.artifacts["quantized_weights"]).norms]
        ctx.artifacts["norm_align"] = calibrate_norm_align(model, norms, ids[:1], beta)
    alloc = ActAllocation(linear=linear, norm=norm, swiglu=swiglu, attn=attn, softmax=softmax)
    stats = QuantizeActivations(linear, alloc).call(cg, ctx).stats
    assert stats["norm_aligned"] == (2 * layers + 1 if norm < 16 and beta > 0 else 0)
    with torch.no_grad():
        eager, graph = model(input_ids=ids).logits, cg(ids)
    assert torch.equal(eager, graph)
    # each position is where the allocation says: the counts, and the model changed iff something is quantized
    assert stats["act_quantized"] == (7 * layers if linear < 16 else 0)
    assert stats["norm_quantized"] == (2 * layers + 1 if norm < 16 else 0)   # + the final norm (read by lm_head)
    assert stats["swiglu_quantized"] == (layers if swiglu < 16 else 0)
    assert stats["attn_quantized"] == (layers if min(attn, softmax) < 16 else 0)
    assert torch.equal(eager, weights_only) == (not alloc.active())
    marks = [n.meta["fxquant"]["act_quant"] for n in cg.gm.graph.nodes if "act_quant" in n.meta.get("fxquant", {})]
    assert {m["bits"] for m in marks} <= set(alloc.active().values())
    for h in ctx.artifacts.get("activation_hooks", []):
        h.remove()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, weights_only)   # the hooks come off cleanly
    assert model.config._attn_implementation != "fxquant_fakequant"


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("attn,softmax", [(8, 8), (4, 16), (16, 4)])
def test_eager_attention_is_quantized_in_graph_and_eager_model_alike(family, attn, softmax):
    """Eager attention (``matmul``, scale, Gemma-2's tanh soft-cap, additive mask, ``softmax``, ``matmul``): the graph
    quantizers on Q, K, V and P and the eager model's fake-quant attention (which applies the soft-cap too) compute
    the same function, and quantizing changes it."""
    from conftest import make_tiny_family
    model = make_tiny_family(family, layers=2)
    model.set_attn_implementation("eager")
    cg = capture(model)
    ctx = PassContext()
    AnalyzeStructure().call(cg, ctx)
    structure = ctx.artifacts["structure"]
    assert [a.form for a in structure.attentions] == ["matmul_softmax"] * 2
    QuantizeWeightsRTN(QuantSpec(bits=8), exclude=("lm_head*",)).call(cg, ctx)
    cg.write_back()
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    alloc = ActAllocation(linear=16, norm=16, swiglu=16, attn=attn, softmax=softmax)
    stats = QuantizeActivations(16, alloc).call(cg, ctx).stats
    assert stats["attn_quantized"] == 2
    with torch.no_grad():
        eager, graph = model(input_ids=ids).logits, cg(ids)
    torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)
    assert _rel(eager, ref) > 1e-4
    for h in ctx.artifacts.get("activation_hooks", []):
        h.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)


@settings(max_examples=FEW, deadline=None)
@given(arch=ARCH, seed=st.integers(0, 2**16), spread=st.floats(0.2, 2.0))
def test_act_smooth_fold_is_exact_on_graph_and_eager_model(arch, seed, spread):
    model, cg, ctx = _llama(arch, seed, torch.float64)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    plan = plan_fsbr(cg, ctx.artifacts["structure"])
    sw = [g for g in plan.groups if g.kind == "swiglu"]
    assert len(sw) == arch[-1]
    scales = {g.name: torch.ones(g.size, dtype=torch.float64) for g in plan.groups}
    rnd = random_scales(plan, spread=spread, generator=torch.Generator().manual_seed(seed))
    scales.update({g.name: rnd[g.name] for g in sw})           # the act-smooth alone
    ctx.artifacts["fsbr"] = EquivalentScales(plan, scales, method="fsbr")
    mlp = model.model.layers[0].mlp
    gate, up = mlp.gate_proj.weight.detach().clone(), mlp.up_proj.weight.detach().clone()
    stats = FoldEquivalentScales(source="fsbr").call(cg, ctx).stats
    cg.write_back()
    assert stats["swiglu_smoothed"] == len(sw)
    s0 = scales[sw[0].name]
    assert torch.allclose(mlp.gate_proj.weight, gate * s0[:, None]) and torch.allclose(mlp.up_proj.weight, up / s0[:, None])
    with torch.no_grad():
        assert _rel(cg(ids), before) <= 1e-9
        assert _rel(model(input_ids=ids).logits, before) <= 1e-9
        # the weights alone are not the model: without the SiLU's run-time ⊘ s it computes something else
        for h in ctx.artifacts["activation_hooks"]:
            h.remove()
        assert _rel(model(input_ids=ids).logits, before) > 1e-4
    smoothed = [n for n in cg.gm.graph.nodes if "swiglu_smooth" in n.meta.get("fxquant", {})]
    assert len(smoothed) == len(sw)
    assert not any(n.target == torch.ops.aten.silu.default for n in cg.gm.graph.nodes)


@pytest.mark.parametrize("seed", [0, 1])
def test_act_smooth_on_a_fused_gate_up_projection(seed):
    """Phi-3's MLP is one ``gate_up_proj`` whose output is chunked: the act-smooth multiplies its gate rows by ``s``
    and divides its up rows by ``s`` (exact fold, graph and eager model), the SmoothQuant init reads each half's
    output range, and the fused output is the SwiGLU operand quantized (once, per token), graph and eager alike."""
    from conftest import make_tiny_family
    model = make_tiny_family("phi3", layers=2).double()
    cg = capture(model)
    ctx = PassContext()
    AnalyzeStructure().call(cg, ctx)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    plan = plan_fsbr(cg, ctx.artifacts["structure"])
    sw = [g for g in plan.groups if g.kind == "swiglu"]
    assert len(sw) == 2 and all(g.consumers[0] == g.consumers[1] for g in sw)
    inter = model.config.intermediate_size
    rows = {site.power: site.positions for site in sw[0].sites}
    assert torch.equal(rows[1], torch.arange(inter)) and torch.equal(rows[-1], torch.arange(inter, 2 * inter))
    scales = {g.name: torch.ones(g.size, dtype=torch.float64) for g in plan.groups}
    rnd = random_scales(plan, spread=1.0, generator=torch.Generator().manual_seed(seed))
    scales.update({g.name: rnd[g.name] for g in sw})
    ctx.artifacts["fsbr"] = EquivalentScales(plan, scales, method="fsbr")
    w = model.model.layers[0].mlp.gate_up_proj.weight.detach().clone()
    assert FoldEquivalentScales(source="fsbr").call(cg, ctx).stats["swiglu_smoothed"] == 2
    cg.write_back()
    s0 = scales[sw[0].name]
    folded = model.model.layers[0].mlp.gate_up_proj.weight
    torch.testing.assert_close(folded, torch.cat([w[:inter] * s0[:, None], w[inter:] / s0[:, None]]))
    with torch.no_grad():
        assert _rel(cg(ids), before) <= 1e-9 and _rel(model(input_ids=ids).logits, before) <= 1e-9
    for h in ctx.artifacts["activation_hooks"]:
        h.remove()
    # the operand quantizers: one per fused projection, graph and eager model computing the same function
    model2 = make_tiny_family("phi3", layers=2)
    cg2 = capture(model2)
    ctx2 = PassContext()
    AnalyzeStructure().call(cg2, ctx2)
    QuantizeWeightsRTN(QuantSpec(bits=8), exclude=("lm_head*",)).call(cg2, ctx2)
    cg2.write_back()
    stats = QuantizeActivations(16, ActAllocation(linear=16, norm=16, swiglu=8, attn=16, softmax=16)).call(
        cg2, ctx2).stats
    assert stats["swiglu_quantized"] == 2
    marks = [n for n in cg2.gm.graph.nodes if n.meta.get("fxquant", {}).get("act_quant", {}).get("what") == "swiglu"]
    assert len(marks) == 2
    with torch.no_grad():
        assert torch.equal(model2(input_ids=ids).logits, cg2(ids))


def test_act_smooth_scales_of_one_leave_the_graph_alone():
    model, cg, ctx = _llama((32, 4, 2, 48, 1), 0)
    plan = plan_fsbr(cg, ctx.artifacts["structure"])
    ctx.artifacts["fsbr"] = EquivalentScales(plan, plan.init_scales(), method="fsbr")
    rec = FoldEquivalentScales(source="fsbr").call(cg, ctx)
    assert not rec.modified and "swiglu_smoothed" not in rec.stats
    assert any(n.target == torch.ops.aten.silu.default for n in cg.gm.graph.nodes)


def _hf_attention(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@settings(max_examples=FEW, deadline=None)
@given(arch=ARCH, seed=st.integers(0, 2**16))
def test_fake_quant_attention_is_the_models_attention_when_nothing_is_quantized(arch, seed):
    """The explicit attention (GQA expansion, causal mask, softmax, P·V) equals the model's sdpa to float rounding
    when Q/K/V/P are kept float, and quantizing them changes the output."""
    model, cg, ctx = _llama(arch, seed)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(seed))
    ref = _hf_attention(model, ids)
    sites = find_sites(cg, ctx.artifacts["structure"], [])
    aq = EagerActQuant(model, sites, ActAllocation(linear=16, norm=16, swiglu=16, attn=8, softmax=8))
    assert model.config._attn_implementation == "fxquant_fakequant"
    quantized = _hf_attention(model, ids)
    aq.enabled = False   # delegates to the model's own implementation: bit for bit
    assert torch.equal(_hf_attention(model, ids), ref)
    aq.remove()
    float_alloc = EagerActQuant(model, sites, ActAllocation(linear=16, norm=16, swiglu=16, attn=8, softmax=8))
    float_alloc.allocation = ActAllocation(linear=16, norm=16, swiglu=16, attn=16, softmax=16)
    assert _rel(_hf_attention(model, ids), ref) < 1e-5
    float_alloc.remove()
    assert _rel(quantized, ref) > 1e-4


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_switched_off_quantizers_give_back_the_models_own_attention(impl):
    """Off, the fake-quant attention delegates to the attention the model was loaded with — an eager model gets the
    float causal mask its eager attention adds (the masks are built sdpa-style for the fake-quant attention)."""
    model, cg, ctx = _llama((32, 4, 2, 48, 1), 0)
    model.set_attn_implementation(impl)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = _hf_attention(model, ids)
    aq = EagerActQuant(model, find_sites(cg, ctx.artifacts["structure"], []), ActAllocation(16, 16, 16, 8, 8),
                       enabled=False)
    assert torch.equal(_hf_attention(model, ids), ref)
    aq.remove()
    assert model.config._attn_implementation == impl


def test_fake_quant_attention_decodes_with_a_kv_cache_as_it_computes_the_whole_sequence():
    """Per-token quantizers: a cached K/V row is quantized the same way in every step (re-quantizing a quantized
    row is the identity), so incremental decoding gives the full-sequence logits."""
    model, cg, ctx = _llama((32, 4, 2, 48, 2), 3)
    QuantizeWeightsRTN(QuantSpec(bits=4), exclude=("lm_head*",)).call(cg, ctx)
    cg.write_back()
    QuantizeActivations(8, ActAllocation()).call(cg, ctx)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :6], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(6, 12):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert _rel(torch.cat(steps, dim=1), full) < 1e-5
    gen = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 9)


@settings(max_examples=FEW * 2, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(2, 40), bits=st.sampled_from([4, 8]), seed=st.integers(0, 2**16))
def test_quantizers_use_the_levels_they_claim(rows, cols, bits, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g) * 3)
    q = act_fake_quantize(x, bits)
    step = x.abs().amax(dim=-1, keepdim=True) / (2 ** (bits - 1) - 1)
    codes = q / step
    assert torch.allclose(codes, codes.round(), atol=1e-3) and float(codes.abs().max()) <= 2 ** (bits - 1) - 1 + 1e-3
    assert torch.allclose(q, x, atol=float(step.max()) / 2 + 1e-6)
    p = torch.softmax(torch.randn(rows, cols, generator=g) * 4, dim=-1)
    pq = unit_fake_quantize(p, bits)
    pstep = p.amax(dim=-1, keepdim=True) / (2 ** bits - 1)   # relative to each row's largest probability
    assert torch.allclose(pq / pstep, (pq / pstep).round(), atol=1e-3)
    assert torch.allclose(pq.amax(dim=-1), p.amax(dim=-1))   # the row maximum is a level
    assert bool(((pq - p).abs() <= pstep / 2 + 1e-7).all())
    assert unit_fake_quantize(p, 16) is p and act_fake_quantize(x, 16) is x


@settings(max_examples=FEW * 2, deadline=None)
@given(tokens=st.integers(16, 64), cols=st.integers(16, 96), outlier=st.floats(30.0, 300.0), seed=st.integers(0, 2**16))
def test_channel_alignment_spares_the_quiet_channels_the_outliers_step(tokens, cols, outlier, seed):
    """A residual stream with a few outlier channels (large in every token, as SmolLM2's are): plain per-token
    quantization gives every channel the outliers' step; aligned by amax^0.5 the quiet channels' error shrinks by
    about √outlier, and the loud ones pay at most the spread of the alignment among themselves. At I-LLM's 8 bits
    for norm inputs (at 4 bits the quiet channels round to zero either way)."""
    bits = 8
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g)
    loud = torch.randperm(cols, generator=g)[:2]
    sign = torch.where(torch.rand(1, 2, generator=g) < 0.5, -1.0, 1.0)
    x[:, loud] = sign * outlier * (1 + 0.2 * torch.randn(tokens, 2, generator=g))
    x = x * torch.exp(torch.randn(tokens, 1, generator=g))   # tokens of different sizes
    quiet = torch.ones(cols, dtype=torch.bool)
    quiet[loud] = False
    amax = x.abs().amax(dim=0)
    a = amax.sqrt() / amax.sqrt().max()
    plain, aligned = act_fake_quantize(x, bits), aligned_fake_quantize(x, a, bits)
    err = lambda q, cols: float(((q - x)[:, cols] ** 2).mean())   # noqa: E731
    assert err(aligned, quiet) < 0.5 * err(plain, quiet)
    assert err(aligned, ~quiet) <= float(1 / a[loud].min()) ** 2 * 1.5 * err(plain, ~quiet) + 1e-12
    # the same grid as act_fake_quantize on x ⊘ a, and none at all when a is None or at 16 bits
    assert torch.equal(aligned, act_fake_quantize(x / a, bits) * a)
    assert torch.equal(aligned_fake_quantize(x, None, bits), plain) and aligned_fake_quantize(x, a, 16) is x


def test_norm_alignment_is_calibrated_from_the_residual_stream():
    model, cg, ctx = _llama((32, 4, 2, 48, 2), 5)
    with torch.no_grad():   # two loud channels in the residual stream (SmolLM2 has a few hundred-fold ones)
        model.model.embed_tokens.weight[:, [3, 17]] *= 50.0
    sites = find_sites(cg, ctx.artifacts["structure"], [f for f in cg.fqn.values() if "proj" in f])
    paths = [p for _, p in sites.norms]
    assert paths[0] == "model.layers.0.input_layernorm" and paths[-1] == "model.norm" and len(paths) == 5
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    a = calibrate_norm_align(model, paths, ids, 0.5)
    first = a["model.layers.0.input_layernorm"]
    assert first.shape == (32,) and float(first.max()) == 1.0
    assert set(first.topk(2).indices.tolist()) == {3, 17}
    emb = model.model.embed_tokens.weight[ids.reshape(-1)].abs().amax(dim=0)   # layer 0 reads the embeddings
    floor = emb.median() * 0.1
    assert torch.allclose(first, emb.clamp(min=floor).sqrt() / emb.clamp(min=floor).sqrt().max(), rtol=1e-5)
    assert all(torch.equal(v, torch.ones(32)) for v in calibrate_norm_align(model, paths, ids, 0.0).values())
    assert not any(m._forward_pre_hooks for m in model.modules())   # the statistics hooks come off
    with pytest.raises(PassError, match=r"\[0, 1\]"):
        calibrate_norm_align(model, paths, ids, 1.5)


def test_fsbr_calibrates_the_norm_alignment_only_for_quantized_norm_inputs():
    model, cg, ctx = _llama((32, 4, 2, 48, 1), 7)
    plan = plan_fsbr(cg, ctx.artifacts["structure"])
    ids = torch.randint(0, 128, (600,), generator=torch.Generator().manual_seed(3))
    def align(**o):
        cfg = FSBRConfig(act_bits=8, epochs=0, samples=2, seq_len=16, progress=False, holdout=0, **o)
        return train_fsbr(cg, plan, QuantSpec(bits=4), ids, cfg, structure=ctx.artifacts["structure"]).extra["norm_align"]
    got = align()
    assert sorted(got) == ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.norm"]
    assert not any(torch.equal(v, torch.ones_like(v)) for v in got.values())
    assert align(norm_bits=16) == {} and align(norm_align=0.0) == {}


def test_fsbr_trains_each_layers_norm_alignment_and_keeps_the_final_norms_calibrated():
    model, record = _train(norm_bits=4, swiglu_bits=16, attn_bits=16, softmax_bits=16, epochs=4, norm_align_train=True)
    groups = {g.name: g for g in record.plan.groups if g.kind == "norm_align"}
    assert sorted(groups) == ["model.layers.0.input_layernorm.align", "model.layers.0.post_attention_layernorm.align",
                              "model.norm.align"]
    assert all(not g.sites for g in groups.values())          # nothing is folded: the quantizer keeps them
    final, init = record.extra["norm_align"], record.extra["norm_align_init"]
    moved = [float((record.scales[name] / record.init[name] - 1).abs().max()) for name in groups if "layers" in name]
    assert min(moved) > 1e-3, "a layer's norm alignment never moved"
    for name in groups:
        assert torch.equal(final[name[: -len(".align")]], record.scales[name])
    assert torch.equal(final["model.norm"], init["model.norm"])   # outside every layer: calibrated only
    assert record.extra["block_mse"][0]["trained"] < record.extra["block_mse"][0]["init"]
    _, fixed = _train(norm_bits=4, swiglu_bits=16, attn_bits=16, softmax_bits=16, epochs=1, norm_align_train=False)
    assert not any(g.kind == "norm_align" for g in fixed.plan.groups)
    assert all(torch.equal(fixed.extra["norm_align"][p], init[p]) for p in init)


def test_balanced_act_smooth_init_gives_gate_and_up_the_same_channel_ranges():
    """act_smooth_alpha 0.5: after the fold (the up → down group's row scales included), max|gate'_j| = max|up'_j|
    on the calibration data; 0 keeps METHODS.md's s = 1."""
    model, cg, ctx = _llama((32, 4, 2, 48, 2), 13)
    plan = plan_fsbr(cg, ctx.artifacts["structure"])
    ids = torch.randint(0, 128, (600,), generator=torch.Generator().manual_seed(3))
    def init(gamma):
        cfg = FSBRConfig(act_bits=8, epochs=0, samples=4, seq_len=32, progress=False, holdout=0,
                         act_smooth_alpha=gamma)
        return train_fsbr(cg, plan, QuantSpec(bits=8), ids, cfg, structure=ctx.artifacts["structure"])
    sw = [g for g in plan.groups if g.kind == "swiglu"]
    assert all(torch.equal(init(0.0).scales[g.name], torch.ones(g.size)) for g in sw)
    record = init(0.5)
    up = "model.layers.1.mlp.up_proj.weight"   # the up -> down group scales up's rows too: the init composes them
    assert any(site.fqn == up and site.axis == 0 for g in plan.groups if g.kind != "swiglu" for site in g.sites)
    ctx.artifacts["fsbr"] = record
    FoldEquivalentScales(source="fsbr").call(cg, ctx)
    cg.write_back()
    amax = {}
    def rec(name):
        def hook(mod, args, y):
            v = y.detach().abs().reshape(-1, y.shape[-1]).amax(0)
            amax[name] = torch.maximum(amax[name], v) if name in amax else v
        return hook
    mlp = model.model.layers[1].mlp
    hs = [mlp.gate_proj.register_forward_hook(rec("gate")), mlp.up_proj.register_forward_hook(rec("up"))]
    from fxquant.passes.train_teq_scales import calibration_windows
    windows = calibration_windows(ids, 32)
    perm = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():   # the windows FSBR calibrated on (its seed-0 permutation)
        for b in windows[perm[:4]]:
            model(input_ids=b[None])
    for h in hs:
        h.remove()
    assert torch.allclose(amax["gate"], amax["up"], rtol=1e-3), (amax["gate"] / amax["up"])
    for h in ctx.artifacts.get("activation_hooks", []):
        h.remove()


def test_balanced_act_smooth_init_on_a_fused_gate_up_projection():
    """The balanced init on Phi-3's fused gate_up: after the fold, the projection's gate half and up half have the
    same per-channel output range on the calibration windows."""
    from conftest import make_tiny_family
    from fxquant.passes.train_teq_scales import calibration_windows
    model = make_tiny_family("phi3", layers=2)
    cg = capture(model)
    ctx = PassContext()
    AnalyzeStructure().call(cg, ctx)
    plan = plan_fsbr(cg, ctx.artifacts["structure"])
    ids = torch.randint(0, 128, (600,), generator=torch.Generator().manual_seed(3))
    cfg = FSBRConfig(act_bits=8, epochs=0, samples=4, seq_len=32, progress=False, holdout=0, act_smooth_alpha=0.5)
    ctx.artifacts["fsbr"] = train_fsbr(cg, plan, QuantSpec(bits=8), ids, cfg, structure=ctx.artifacts["structure"])
    FoldEquivalentScales(source="fsbr").call(cg, ctx)
    cg.write_back()
    out = []
    h = model.model.layers[1].mlp.gate_up_proj.register_forward_hook(
        lambda mod, args, y: out.append(y.detach().abs().reshape(-1, y.shape[-1]).amax(0)))
    windows = calibration_windows(ids, 32)
    perm = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for b in windows[perm[:4]]:
            model(input_ids=b[None])
    h.remove()
    amax = torch.stack(out).amax(0)
    inter = model.config.intermediate_size
    assert torch.allclose(amax[:inter], amax[inter:], rtol=1e-3), amax[:inter] / amax[inter:]
    for hook in ctx.artifacts.get("activation_hooks", []):
        hook.remove()


def _train(**options):
    model, cg, ctx = _llama((32, 4, 2, 48, 1), 7)
    plan = plan_fsbr(cg, ctx.artifacts["structure"])
    ids = torch.randint(0, 128, (1500,), generator=torch.Generator().manual_seed(3))
    options = {"epochs": 3, **options}
    cfg = FSBRConfig(act_bits=8, samples=3, seq_len=16, progress=False, holdout=0, **options)
    return model, train_fsbr(cg, plan, QuantSpec(bits=4), ids, cfg, structure=ctx.artifacts["structure"])


def test_fsbr_trains_the_act_smooth_when_the_swiglu_operands_are_quantized():
    model, record = _train(swiglu_bits=4, norm_bits=16, attn_bits=16, softmax_bits=16, act_smooth_alpha=0.0)
    sw = next(g for g in record.plan.groups if g.kind == "swiglu")
    assert float((record.scales[sw.name] - 1).abs().max()) > 1e-3, "the act-smooth scale never moved"
    assert record.extra["block_mse"][0]["trained"] < record.extra["block_mse"][0]["init"]
    # training leaves no hook behind: the float model is the float model again
    assert not model.model.layers[0].mlp.act_fn._forward_hooks
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert model.config._attn_implementation != "fxquant_fakequant"


def _scale_gradients(alloc: ActAllocation) -> dict[str, float]:
    """Largest |∂ block MSE / ∂ log s| per group kind, at s = 1, for one decoder layer under ``alloc``."""
    import torch.nn.functional as F
    from fxquant.actquant import SwiGLUSmooth
    from fxquant.calibration import layer_inputs as _layer_inputs
    from fxquant.passes.fsbr import _act_path, _Block, _decoder_layers
    from fxquant.passes.train_teq_scales import quantized_linears
    model, cg, ctx = _llama((32, 4, 2, 48, 1), 11)
    plan = plan_fsbr(cg, ctx.artifacts["structure"])
    qlin = quantized_linears(cg, ("lm_head*",))
    prefix, layers = _decoder_layers(model, plan)
    base = {f: cg.tensors[p] for p, f in cg.fqn.items() if p in cg.tensors}
    aq = EagerActQuant(model, find_sites(cg, ctx.artifacts["structure"], qlin), alloc, range_grad=True, enabled=False)
    smoothers = {g.name: SwiGLUSmooth(model, _act_path(cg, g)) for g in plan.groups if g.kind == "swiglu"}
    try:
        block = _Block(plan, prefix, 0, layers[0], model, qlin, base, QuantSpec(bits=8), torch.float32, aq, smoothers)
        ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
        (h, kw), = _layer_inputs(model, layers[0], ids)
        target = block.float_outputs([(h, kw)])[0]
        logs = {g.name: torch.nn.Parameter(block.free(g, torch.zeros(g.size))) for g in block.groups}
        clips = block.initial_clips(30.0)   # no clipping
        out = block.quantized(block.effective(block.scales(logs), clips), h, kw)
        F.mse_loss(out, target).backward()
        block.__exit__(None, None, None)
        return {g.kind: float(logs[g.name].grad.abs().max()) for g in block.groups if g.kind in ("qk", "swiglu")}
    finally:
        aq.remove()
        for sm in smoothers.values():
            sm.remove()


def test_qk_and_act_smooth_scales_get_a_gradient_only_where_their_operands_are_quantized():
    """Row scales of W_q/W_k and W_gate/W_up commute with per-channel weight quantization: the q/k and act-smooth
    scales matter only through the quantized Q/K and SwiGLU operands, and that is where their gradient comes from."""
    quiet = _scale_gradients(ActAllocation(linear=8, norm=16, swiglu=16, attn=16, softmax=16))
    qk = _scale_gradients(ActAllocation(linear=8, norm=16, swiglu=16, attn=4, softmax=16))
    swiglu = _scale_gradients(ActAllocation(linear=8, norm=16, swiglu=4, attn=16, softmax=16))
    assert qk["qk"] > 100 * max(quiet["qk"], 1e-12), (quiet, qk)
    assert swiglu["swiglu"] > 100 * max(quiet["swiglu"], 1e-12), (quiet, swiglu)


def test_fsbr_checkpoint_restores_the_act_smooth_and_the_activation_quantizers(tmp_path):
    from fxquant.api import quantize
    from fxquant.checkpoint import RUNTIME, load_quantized
    model = make_tiny_llama(layers=1, hidden=32, heads=4, kv_heads=2, inter=64)
    recipe = get_recipe("fsbr-w4a8")
    recipe.options.update(epochs=0, samples=2, seq_len=16, progress=False)
    ids = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(0))
    result = quantize(model, recipe, calibration=ids)
    # an act-smooth scale that is not 1, so the fold rewrites the SiLU (epochs 0 keeps it at 1)
    plan_groups = result.artifacts["fsbr"].plan.groups
    assert any(g.kind == "swiglu" for g in plan_groups)
    from fxquant.actquant import SwiGLUSmooth, remember_runtime
    s = torch.exp(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight.mul_(s[:, None])
        model.model.layers[0].mlp.up_proj.weight.div_(s[:, None])
    SwiGLUSmooth(model, "model.layers.0.mlp.act_fn", s)
    remember_runtime(model, swiglu=("model.layers.0.mlp.act_fn", s))
    probe = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(input_ids=probe).logits
    result.quantized.clear()   # the weights were changed by hand: store them in float
    result.save(str(tmp_path / "ck"))
    assert (tmp_path / "ck" / RUNTIME).is_file()
    loaded = load_quantized(tmp_path / "ck")
    with torch.no_grad():
        got = loaded.model(input_ids=probe).logits
    assert torch.equal(got, want)
    rt = loaded.quantization_config["runtime"]
    assert rt["activations"]["allocation"] == ActAllocation(linear=8).to_dict()
    assert rt["swiglu_smooth"] == ["model.layers.0.mlp.act_fn"]
    # the norm inputs' channel alignment comes back as stored, and it matters: plain per-token norms differ
    align = result.artifacts["norm_align"]
    assert rt["norm_align"] == sorted(align) and len(align) == 3
    restored = _eager_quantizer(loaded.model).norm_align
    assert all(torch.equal(restored[p], align[p]) for p in align)
    _eager_quantizer(loaded.model).norm_align.clear()
    with torch.no_grad():
        assert not torch.equal(loaded.model(input_ids=probe).logits, want)


def _eager_quantizer(model):
    """The EagerActQuant a loaded checkpoint installed (its norm hooks close over it)."""
    for m in model.modules():
        for h in m._forward_pre_hooks.values():
            for cell in getattr(h, "__closure__", None) or ():
                if isinstance(cell.cell_contents, EagerActQuant):
                    return cell.cell_contents
    raise AssertionError("no EagerActQuant hook on the model")


def test_allocation_and_recipe_options_are_checked():
    with pytest.raises(PassError, match="norm=1"):
        FSBRConfig.from_options({"norm_bits": 1})
    with pytest.raises(PassError, match="act_smooth"):
        FSBRConfig.from_options({"act_smooth": "yes"})
    for bad in (1.5, -0.1, True, "half"):
        with pytest.raises(PassError, match="norm_align"):
            FSBRConfig.from_options({"norm_align": bad})
    with pytest.raises(RecipeError, match="norm_align"):
        get_recipe({"base": "illm-w8a8", "options": {"norm_align": 0.5}})
    # an illm recipe's FSBR trains against what the integer graph computes: those widths are not its options
    with pytest.raises(RecipeError, match="norm_bits"):
        get_recipe({"base": "illm-w8a8", "options": {"norm_bits": 8}})
    r = get_recipe({"base": "fsbr-w4a4", "options": {"norm_bits": 16, "act_smooth": False}})
    passes = r.pipeline().passes
    assert passes[-1].allocation == ActAllocation(linear=4, norm=16)
    assert passes[1].config.act_smooth is False

