"""Harness-based property tests (fxquant.testing) for the passes test_harness.py does not cover: the TEQ/FSBR
scale fold and training, FSBR's clipping and activation fake-quant, and the ParetoQ insert/train/convert passes.

Every property runs on graphs drawn by the harness strategies (captured transformer blocks, tiny LLaMAs) under
the plugin's hypothesis profile (``ci`` in CI), with a few examples each: graph capture and training dominate.
"""
from __future__ import annotations

import copy
import types

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.fpformats import FPQuantSpec
from fxquant.paretoq import ParetoQSpec, init_alpha, paretoq_fake_quant, quantize_paretoq
from fxquant.passes.analyze_structure import AnalyzeStructure
from fxquant.passes.convert_paretoq import ConvertParetoQ
from fxquant.passes.fold_equivalent_scales import EquivalentScales, FoldEquivalentScales, plan_scales, random_scales
from fxquant.passes.fsbr import ClipWeights, QuantizeActivations, TrainFSBRScales, act_fake_quantize, clip_bounds
from fxquant.passes.insert_paretoq_fake_quant import InsertParetoQFakeQuant, fake_quant_nodes
from fxquant.passes.quantize_weights_rtn import QuantizeWeightsRTN
from fxquant.passes.round_weights_gptq import RoundWeightsGPTQ
from fxquant.passes.split_fp6_weights import SplitFP6Weights
from fxquant.passes.train_paretoq import TrainParetoQ
from fxquant.passes.search_weight_clipping import SearchWeightClipping
from fxquant.passes.train_teq_scales import TrainTEQScales
from fxquant.pipeline import PassContext
from fxquant.quant import QuantSpec, fake_quantize
from fxquant.testing import (assert_equivalent, assert_fold_exact, copy_captured, linear_weight_placeholders,
                             run_graph, run_pass, with_tensors)
from fxquant.testing import strategies as fst

FEW = settings(max_examples=4, deadline=None)
TRAIN = settings(max_examples=3, deadline=None)

#: one-layer tiny LLaMAs keep the training passes to a fraction of a second an example
LLAMAS = fst.tiny_llamas(fst.tiny_llama_configs(max_layers=1))
#: blocks whose attention analyze_structure recognises (see the xfail in test_harness.py)
SDPA_BLOCKS = fst.captured_blocks(fst.block_configs(attention=("sdpa",)))


def _structure(cg, ctx: PassContext):
    run_pass(AnalyzeStructure(), copy_captured(cg), ctx)
    return ctx.artifacts["structure"]


def _graph_signature(cg) -> list[tuple]:
    return [(n.op, str(n.target), tuple(str(a) for a in n.args)) for n in cg.gm.graph.nodes]


def _calibration(vocab: int, seed: int, n: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# ---- fold_equivalent_scales ------------------------------------------------------------------------------------
@FEW
@given(block=SDPA_BLOCKS, spread=st.floats(0.1, 1.0), seed=st.integers(0, 2**16))
def test_fold_of_random_scales_is_exact_on_blocks(block, spread, seed):
    ctx = PassContext(verify=True)
    plan = plan_scales(block.cg, _structure(block.cg, ctx), exclude=())
    assert plan.groups, plan.render()
    scales = random_scales(plan, spread=spread, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    report = assert_fold_exact(FoldEquivalentScales(scales=EquivalentScales(plan, scales)), block.cg, block.inputs,
                               tol=1e-4, ctx=ctx)
    assert report.record.stats["groups"] == len(plan.groups)
    assert report.record.stats["tensors"] == len(plan.fqns())
    assert _graph_signature(report.transformed) == _graph_signature(block.cg)  # only tensors move


@FEW
@given(llama=LLAMAS, spread=st.floats(0.1, 1.0), seed=st.integers(0, 2**16))
def test_fold_of_random_scales_is_exact_on_tiny_llamas(llama, spread, seed):
    ctx = PassContext(verify=True)
    plan = plan_scales(llama.cg, _structure(llama.cg, ctx))
    kinds = sorted(g.kind for g in plan.groups)
    assert kinds == sorted(["norm", "norm", "attention", "gated"] * llama.model.config.num_hidden_layers), plan.render()
    scales = random_scales(plan, spread=spread, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    # read from ctx.artifacts["teq"], as after train_teq_scales
    ctx.artifacts["teq"] = EquivalentScales(plan, scales)
    assert_fold_exact(FoldEquivalentScales(), llama.cg, llama.inputs, tol=1e-4, ctx=ctx)
    assert set(ctx.artifacts["folded_scales"]["teq"]) == set(scales)


# ---- train_teq_scales ------------------------------------------------------------------------------------------
@TRAIN
@given(llama=LLAMAS, bits=st.sampled_from([2, 3, 4]), seed=st.integers(0, 999))
def test_teq_training_records_finite_scales_and_leaves_the_graph_alone(llama, bits, seed):
    ctx = PassContext(calibration=_calibration(llama.model.config.vocab_size, seed), verify=True)
    plan = plan_scales(llama.cg, _structure(llama.cg, ctx))
    cg = copy_captured(llama.cg, model=llama.model)  # TEQ trains on the eager model
    before = run_graph(llama.cg, llama.inputs)
    # holdout 0: this checks the training itself; the held-out guard (which may keep the init on random text)
    # has its own tests in test_teq.py
    options = dict(steps=3, lr=5e-2, seq_len=8, batch_size=2, seed=seed, progress=False, holdout=0)
    record = run_pass(TrainTEQScales(QuantSpec(bits=bits, group_size=8), options=options), cg, ctx)
    assert not record.modified
    teq = ctx.artifacts["teq"]
    assert isinstance(teq, EquivalentScales) and set(teq.scales) == {g.name for g in teq.plan.groups}
    assert {g.name for g in teq.plan.groups} == {g.name for g in plan.groups}
    for g in teq.plan.groups:
        s = teq.scales[g.name]
        assert s.shape == (g.size,) and bool(torch.isfinite(s).all()) and bool((s > 0).all()), g.name
    assert len(teq.losses) == 3 and all(torch.isfinite(torch.tensor(teq.losses)))
    assert teq.moved() > 0, "three steps at lr 5e-2 left every scale at its init"
    # an analysis-like pass: the graph and its tensors are untouched, so it computes what it did
    assert _graph_signature(cg) == _graph_signature(llama.cg)
    assert all(torch.equal(cg.tensors[k], v) for k, v in llama.cg.tensors.items())
    torch.testing.assert_close(run_graph(cg, llama.inputs), before, rtol=0, atol=0)
    # and the trained scales fold exactly
    assert_fold_exact(FoldEquivalentScales(), cg, llama.inputs, tol=1e-4, ctx=ctx)


# ---- search_weight_clipping -------------------------------------------------------------------------------------
@TRAIN
@given(llama=LLAMAS, bits=st.sampled_from([2, 3, 4]), group=st.sampled_from([None, 8]), seed=st.integers(0, 999))
def test_clip_search_only_narrows_weights_and_never_raises_a_groups_output_error(llama, bits, group, seed):
    spec = QuantSpec(bits=bits, group_size=group)
    calib = _calibration(llama.model.config.vocab_size, seed, n=96)
    ctx = PassContext(calibration=calib, verify=True)
    _structure(llama.cg, ctx)
    cg = copy_captured(llama.cg, model=llama.model)
    options = dict(seq_len=8, holdout=0, clip_windows=64)   # every window of the calibration ids
    record = run_pass(SearchWeightClipping(spec, options=options), cg, ctx)
    assert record.modified and record.name == "search_weight_clipping"
    assert _graph_signature(cg) == _graph_signature(llama.cg)   # weights change, the graph does not
    # the linears' inputs on the same windows, from the float model (clipping happens after they are read)
    names = {fqn: ph for ph, fqn in cg.fqn.items()}
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [llama.model.get_submodule(f.rsplit(".", 1)[0]).register_forward_pre_hook(
        lambda m, a, f=f: seen.setdefault(f, []).append(a[0].detach().reshape(-1, a[0].shape[-1])))
        for f in ctx.artifacts["clip_search"]]
    with torch.no_grad():
        for start in range(0, calib.numel() - 8 + 1, 4):
            llama.model(calib[start:start + 8][None], use_cache=False)
    for h in hooks:
        h.remove()
    for fqn, rec in ctx.artifacts["clip_search"].items():
        w, c = llama.cg.tensors[names[fqn]].double(), cg.tensors[names[fqn]].double()
        assert bool((c.abs() <= w.abs() + 1e-12).all()) and bool((c * w >= 0).all()), fqn   # toward zero only
        x = torch.cat(seen[fqn]).double()
        size = group or w.shape[1]
        cols = [slice(i, i + size) for i in range(0, w.shape[1], size)]

        def errors(q: torch.Tensor) -> torch.Tensor:   # [rows, groups]: each group's share of the output error
            return torch.stack([((x[:, j] @ (q[:, j] - w[:, j]).t()) ** 2).sum(dim=0) for j in cols], dim=1)
        plain, clipped = errors(fake_quantize(w, spec)), errors(fake_quantize(c, spec))
        assert bool((clipped <= plain * (1 + 1e-6) + 1e-9).all()), fqn
        assert abs(float(clipped.sum()) - rec["error_after"]) <= 1e-3 * max(1.0, float(clipped.sum())), fqn
        assert abs(float(plain.sum()) - rec["error_before"]) <= 1e-3 * max(1.0, float(plain.sum())), fqn


# ---- round_weights_gptq ---------------------------------------------------------------------------------------
@TRAIN
@given(llama=LLAMAS, spec=st.sampled_from([QuantSpec(bits=3, group_size=8), QuantSpec(bits=4, symmetric=False),
                                           FPQuantSpec(format="e3m2"), FPQuantSpec(format="e2m3", group_size=8)]),
       sequential=st.booleans(), act_order=st.booleans(), seed=st.integers(0, 999))
def test_gptq_rounds_onto_the_grid_the_quantization_pass_then_stores(llama, spec, sequential, act_order, seed):
    calib = _calibration(llama.model.config.vocab_size, seed, n=96)
    ctx = PassContext(calibration=calib, verify=True)
    _structure(llama.cg, ctx)
    cg = copy_captured(llama.cg, model=llama.model)
    options = dict(seq_len=8, gptq_windows=16, gptq_sequential=sequential, gptq_act_order=act_order, progress=False)
    record = run_pass(RoundWeightsGPTQ(spec, exclude=(), options=options), cg, ctx)   # ensures: on the grid
    assert record.name == "round_weights_gptq"
    assert _graph_signature(cg) == _graph_signature(llama.cg)   # weights change, the graph does not
    gptq = ctx.artifacts["gptq"]
    assert gptq and all(v["error"] <= v["error_rtn"] for v in gptq.values())
    rounded = {fqn: cg.tensors[ph].clone() for ph, fqn in cg.fqn.items() if fqn in gptq}
    quantize = SplitFP6Weights(spec, exclude=()) if isinstance(spec, FPQuantSpec) else QuantizeWeightsRTN(spec, exclude=())
    run_pass(quantize, cg, ctx)
    for fqn, w in rounded.items():   # the quantization pass stores the rounded weights unchanged
        assert torch.equal(next(cg.tensors[ph] for ph, f in cg.fqn.items() if f == fqn), w), fqn


# ---- fsbr: train_fsbr_scales, clip_weights, quantize_activations ----------------------------------------------
def _fsbr(llama, bits: int, seed: int):
    ctx = PassContext(calibration=_calibration(llama.model.config.vocab_size, seed), verify=True)
    _structure(llama.cg, ctx)
    cg = copy_captured(llama.cg, model=llama.model)
    options = dict(epochs=1, samples=2, seq_len=8, seed=seed, progress=False)
    record = run_pass(TrainFSBRScales(QuantSpec(bits=bits, group_size=8), act_bits=8, options=options), cg, ctx)
    return cg, ctx, record


@TRAIN
@given(llama=LLAMAS, bits=st.sampled_from([3, 4, 8]), seed=st.integers(0, 999))
def test_fsbr_training_folds_exactly_and_clipping_is_the_learned_clamp(llama, bits, seed):
    cg, ctx, record = _fsbr(llama, bits, seed)
    fsbr = ctx.artifacts["fsbr"]
    assert record.stats["groups"] == len(fsbr.plan.groups) and record.stats["qk_groups"] >= 1
    assert all(bool(torch.isfinite(s).all()) and bool((s > 0).all()) for s in fsbr.scales.values())
    assert _graph_signature(cg) == _graph_signature(llama.cg)
    assert all(torch.equal(cg.tensors[k], v) for k, v in llama.cg.tensors.items())
    # RoPE-tied q/k scales: s_i == s_{i + d/2} within each head, or the fold is not exact
    for g in fsbr.plan.groups:
        if g.kind == "qk":
            s = fsbr.scales[g.name].view(-1, 2, g.tie_half)
            assert torch.equal(s[:, 0], s[:, 1]), g.name
    # the fold of the trained scales (q/k across RoPE included) keeps the float function
    folded = assert_fold_exact(FoldEquivalentScales(source="fsbr"), cg, llama.inputs, tol=1e-4, ctx=ctx).transformed
    # clip_weights clamps exactly the weights with learned bounds, to those bounds, and nothing else
    clipped = copy_captured(folded)
    report = run_pass(ClipWeights(), clipped, ctx)
    clips, spec = fsbr.extra["clip"], fsbr.extra["spec"]
    assert report.stats["clipped"] == sum(f in clips for f in clipped.fqn.values()) > 0
    for ph, fqn in clipped.fqn.items():
        if ph not in clipped.tensors:
            continue
        if fqn in clips:
            want = clip_bounds(folded.tensors[ph], spec, *clips[fqn])
            assert torch.equal(clipped.tensors[ph], want), fqn
            assert float(clipped.tensors[ph].abs().max()) <= float(folded.tensors[ph].abs().max()), fqn
        else:
            assert torch.equal(clipped.tensors[ph], folded.tensors[ph]), fqn


@FEW
@given(block=fst.captured_blocks(), spec=fst.quant_specs(bits=st.integers(2, 8)), act_bits=st.integers(2, 8))
def test_quantize_activations_is_per_token_fake_quant_before_every_quantized_linear(block, spec, act_bits):
    ctx = PassContext()
    quantized = copy_captured(block.cg)
    run_pass(QuantizeWeightsRTN(spec, exclude=()), quantized, ctx)
    n_linears = len(block.config.linears)

    def expected(cg):  # the eager block: fake-quant weights, and per-token fake-quant on every linear's input
        module = copy.deepcopy(block.module)
        with torch.no_grad():
            for name in block.config.linears:
                lin = module.get_submodule(name)
                lin.weight.copy_(fake_quantize(lin.weight, spec))
                lin.register_forward_pre_hook(lambda m, args: (act_fake_quantize(args[0], act_bits),) + args[1:])
            return module(*block.inputs)

    report = assert_equivalent(QuantizeActivations(act_bits), quantized, block.inputs, tol=1e-4, expected=expected,
                               ctx=ctx)
    assert report.record.stats["act_quantized"] == n_linears
    marked = [n for n in report.transformed.gm.graph.nodes if "act_quant" in n.meta.get("fxquant", {})]
    assert len(marked) == n_linears and all(n.meta["fxquant"]["act_quant"]["bits"] == act_bits for n in marked)
    assert "activation_hooks" not in ctx.artifacts  # a copied graph has no model: no eager hooks to leak


# ---- ParetoQ: insert_fake_quant, train_qat, convert_fake_quant -------------------------------------------------
PARETOQ_SPECS = st.builds(ParetoQSpec, st.sampled_from([1, 1.58, 2, 3, 4]), st.sampled_from([None, 8, 16]))


def _paretoq_fq(w: torch.Tensor, spec: ParetoQSpec) -> torch.Tensor:
    return paretoq_fake_quant(w, init_alpha(w, spec), spec.bits, spec.group_size or 0).detach()


def _expected_fake_quant(spec: ParetoQSpec, inputs):
    def expected(cg):
        weights = linear_weight_placeholders(cg)
        return run_graph(with_tensors(cg, {ph: _paretoq_fq(cg.tensors[ph], spec) for ph in weights}), inputs)
    return expected


@FEW
@given(block=fst.captured_blocks(), spec=PARETOQ_SPECS)
def test_paretoq_insert_computes_fake_quant_and_convert_stores_it(block, spec):
    ctx = PassContext()
    inserted = assert_equivalent(InsertParetoQFakeQuant(spec, exclude=()), block.cg, block.inputs, tol=1e-5,
                                 expected=_expected_fake_quant(spec, block.inputs), ctx=ctx).transformed
    nodes = fake_quant_nodes(inserted)
    assert len(nodes) == len(block.config.linears)
    assert all(n.target is paretoq_fake_quant for n in nodes)
    # convert: the same function, no fake-quant node left, and each weight is its ParetoQ fake-quant
    report = assert_equivalent(ConvertParetoQ(), inserted, block.inputs, tol=1e-5, ctx=ctx)
    assert not fake_quant_nodes(report.transformed)
    assert report.record.stats["converted"] == len(block.config.linears)
    table = ctx.artifacts["quantized_weights"]
    for ph in linear_weight_placeholders(report.transformed):
        fqn = report.transformed.fqn[ph]
        w = block.cg.tensors[ph]
        want = _paretoq_fq(w, spec)
        torch.testing.assert_close(report.transformed.tensors[ph], want, rtol=0, atol=1e-6, msg=fqn)
        qw = table[fqn]
        assert torch.equal(qw.dequantize(w.dtype), report.transformed.tensors[ph]), fqn
        assert torch.equal(qw.dequantize(w.dtype), quantize_paretoq(w, init_alpha(w, spec), spec).dequantize(w.dtype))


@TRAIN
@given(llama=LLAMAS, spec=PARETOQ_SPECS, seed=st.integers(0, 999))
def test_paretoq_training_moves_finite_scales_and_convert_matches_the_trained_graph(llama, spec, seed):
    ctx = PassContext(calibration=_calibration(llama.model.config.vocab_size, seed, 128),
                      recipe=types.SimpleNamespace(options=dict(steps=3, lr=1e-2, batch_size=2, seq_len=8, seed=seed)))
    cg = copy_captured(llama.cg, model=llama.model)
    run_pass(InsertParetoQFakeQuant(spec), cg, ctx)
    records = ctx.artifacts["paretoq_fake_quant"]
    assert len(records) == 7 * llama.model.config.num_hidden_layers and "lm_head.weight" not in records
    signature = _graph_signature(cg)
    alphas = {f: cg.tensors[r["alpha_placeholder"]].clone() for f, r in records.items()}
    record = run_pass(TrainParetoQ(), cg, ctx)
    assert record.stats["steps"] == 3 and len(ctx.artifacts["qat_history"].losses) == 3
    assert _graph_signature(cg) == signature  # training changes tensors, never the graph
    trained = {f: cg.tensors[r["alpha_placeholder"]] for f, r in records.items()}
    assert all(bool(torch.isfinite(a).all()) for a in trained.values())
    assert any(not torch.equal(alphas[f], trained[f]) for f in records), "no scale moved in training"
    # the graph reads the trained weights: each is the model's parameter
    params = dict(llama.model.named_parameters())
    for ph, fqn in cg.fqn.items():
        if fqn in records:
            assert torch.equal(cg.tensors[ph], params[fqn].detach()), fqn
    # the graph after training computes what convert then stores
    report = assert_equivalent(ConvertParetoQ(), cg, llama.inputs, tol=1e-5, ctx=ctx)
    for fqn, rec in records.items():
        w = params[fqn].detach()
        want = quantize_paretoq(w, trained[fqn], ParetoQSpec(rec["bits"], rec["group_size"] or None))
        assert torch.equal(ctx.artifacts["quantized_weights"][fqn].dequantize(w.dtype), want.dequantize(w.dtype))
    assert not fake_quant_nodes(report.transformed)
