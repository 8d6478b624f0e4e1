"""fxquant.testing: the strategies make valid graphs, every check catches a broken case, and every pass in
passes/ has harness-based property tests (run under the plugin's hypothesis profile: ``ci`` in CI)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx

import fxquant
from fxquant.fpformats import fp_fake_quantize
from fxquant.passes.analyze_structure import AnalyzeStructure
from fxquant.passes.lower_quantized_linears import LowerQuantizedLinears
from fxquant.passes.quantize_weights_rtn import QuantizeWeightsRTN
from fxquant.passes.split_fp6_weights import SplitFP6Weights
from fxquant.quant import QuantSpec, fake_quantize, quantize_weight
from fxquant.testing import (INTEGER_BOUNDARY, assert_bit_exact, assert_equivalent, assert_fold_exact,
                             assert_integer_only, copy_captured, linear_weight_placeholders, run_graph, run_pass,
                             with_tensors)
from fxquant.testing import strategies as fst

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent

#: graph-capturing properties cost ~0.3 s an example: a quarter of the profile's budget (ci: 6, thorough: 125)
GRAPHS = settings(max_examples=max(4, settings.default.max_examples // 4))


def fake_quant_linears(quant, inputs):
    """expected(cg) for a weight-quantizing pass: the original graph with every linear weight fake-quantized."""
    def expected(cg):
        weights = linear_weight_placeholders(cg)
        return run_graph(with_tensors(cg, {ph: quant(cg.tensors[ph]) for ph in weights}), inputs)
    return expected


# ---- strategies ------------------------------------------------------------------------------------------------
@GRAPHS
@given(block=fst.captured_blocks())
def test_captured_blocks_lint_and_compute_the_module(block):
    block.cg.gm.graph.lint()
    assert block.cg.model_class == "TransformerBlock"
    torch.testing.assert_close(run_graph(block.cg, block.inputs), block.reference(), rtol=1e-5, atol=1e-5)
    linears = [n for n in block.cg.gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == len(block.config.linears)


@settings(max_examples=max(2, settings.default.max_examples // 12))
@given(llama=fst.tiny_llamas())
def test_tiny_llamas_run_like_the_model(llama):
    with torch.no_grad():
        torch.testing.assert_close(llama.cg(*llama.inputs), llama.model(llama.inputs[0]).logits, rtol=1e-5, atol=1e-5)


@given(w=fst.weights(), spec=fst.quant_specs(), s=st.integers(1, 64).flatmap(fst.scales))
def test_tensor_strategies_are_valid(w, spec, s):
    assert w.dim() == 2 and torch.isfinite(w).all()
    assert isinstance(spec, QuantSpec)
    assert (s > 0).all() and torch.isfinite(s).all()
    quantize_weight(w, spec)  # every drawn spec is usable on every drawn weight


def test_copy_captured_is_independent(fxquant_block):
    cg = fxquant_block.cg
    copy = copy_captured(cg)
    node = next(n for n in copy.gm.graph.nodes if n.op == "call_function")
    fxquant.fxmeta(node)["probe"] = 1
    first = next(iter(copy.tensors))
    copy.tensors[first].add_(1.0)
    original = next(n for n in cg.gm.graph.nodes if n.name == node.name)
    assert "probe" not in original.meta.get("fxquant", {})
    assert not torch.equal(copy.tensors[first], cg.tensors[first])


def test_failure_reports_name_the_block_not_its_tensors():
    text = repr(fst.make_block(fst.BlockConfig(), seed=5))
    assert "seed=5" in text and "tensor(" not in text


# ---- each check catches a broken case --------------------------------------------------------------------------
class _ScaleOneWeight(fxquant.Pass):
    """Broken on purpose: multiplies the first linear weight by 1.01."""

    name = "scale_one_weight"

    def call(self, cg, ctx):
        ph = linear_weight_placeholders(cg)[0]
        cg.tensors[ph] = cg.tensors[ph] * 1.01
        return fxquant.PassResult(True)


class _Nothing(fxquant.Pass):
    name = "do_nothing"

    def call(self, cg, ctx):
        return fxquant.PassResult(False)


def test_assert_equivalent_catches_a_changed_weight_and_leaves_the_input_alone(fxquant_block):
    cg, x = fxquant_block.cg, fxquant_block.inputs
    before = {k: v.clone() for k, v in cg.tensors.items()}
    with pytest.raises(AssertionError, match="scale_one_weight.*outputs differ.*worst element"):
        assert_equivalent(_ScaleOneWeight(), cg, x, tol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in cg.tensors.items())
    report = assert_equivalent(_Nothing(), cg, x, tol=0)
    assert report.max_abs_error == 0.0 and math.isinf(report.sqnr_db)


def test_assert_fold_exact_catches_a_wrong_fold_and_a_fold_that_does_nothing(fxquant_gelu_block):
    cg, x = fxquant_gelu_block.cg, fxquant_gelu_block.inputs
    s = torch.linspace(0.5, 4.0, 64)

    def fold_across_gelu(c):  # fc1 rows / s, fc2 columns * s: wrong, gelu(z / s) != gelu(z) / s
        w1, b1, w2 = (next(k for k, v in c.fqn.items() if v == n) for n in
                      ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight"))
        c.tensors[w1] = c.tensors[w1] / s[:, None]
        c.tensors[b1] = c.tensors[b1] / s
        c.tensors[w2] = c.tensors[w2] * s[None, :]

    def fold_into_layernorm(c):  # norm2 gain and bias / s, fc1 columns * s: exact
        g, b, w = (next(k for k, v in c.fqn.items() if v == n) for n in
                   ("norm2.weight", "norm2.bias", "mlp.fc1.weight"))
        s32 = torch.linspace(0.5, 4.0, 32)
        c.tensors[g] = c.tensors[g] / s32
        c.tensors[b] = c.tensors[b] / s32
        c.tensors[w] = c.tensors[w] * s32[None, :]

    with pytest.raises(AssertionError, match="fold_across_gelu.*outputs differ"):
        assert_fold_exact(fold_across_gelu, cg, x)
    with pytest.raises(AssertionError, match="nothing was folded"):
        assert_fold_exact(lambda c: None, cg, x)
    assert assert_fold_exact(fold_into_layernorm, cg, x, tol=1e-5).max_abs_error > 0  # rounding, within tol


@given(w=fst.weights(rows=st.integers(1, 16), cols=st.integers(1, 96)), spec=fst.quant_specs(bits=st.integers(2, 8)))
def test_assert_bit_exact_holds_for_the_int_formats(w, spec):
    from fxquant.backends import registry
    qw = quantize_weight(w, spec)
    fq = fake_quantize(w, spec)
    assert_bit_exact(fq, qw)
    fmt, _ = registry.select_format(spec)
    if fmt is not None:  # the packed format's dequantize and its custom op (reference on CPU)
        x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0))
        assert_bit_exact(fq, registry.pack(qw, fmt), x=x, matmul=lambda x_, p: p.linear(x_))


def test_assert_bit_exact_catches_one_ulp_and_a_wrong_kernel():
    w = torch.randn(8, 40, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=4, group_size=16)
    fq, qw = fake_quantize(w, spec), quantize_weight(w, spec)
    off = fq.clone()
    off[3, 5] = torch.nextafter(off[3, 5], torch.tensor(math.inf))
    with pytest.raises(AssertionError, match=r"1 of 320 values differ in their bits; first at \(3, 5\)"):
        assert_bit_exact(off, qw)
    with pytest.raises(AssertionError, match="kernel"):
        assert_bit_exact(fq, qw, lambda p: p.dequantize() * (1 + 2**-20))
    with pytest.raises(AssertionError, match="matmul"):
        assert_bit_exact(fq, qw, x=torch.randn(2, 40), matmul=lambda x, p: x @ p.dequantize().t() + 1e-3)


def _integer_graph(float_inside: str | None = None) -> fx.GraphModule:
    """x -> quantize (enter) -> int matmul with int weight -> dequantize (exit): integer-only, unless broken."""
    aten = torch.ops.aten
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w_int")
    x.meta["val"] = torch.empty(2, 4)
    w.meta["val"] = torch.empty(4, 4, dtype=torch.int8)
    q = g.call_function(aten._to_copy.default, (g.call_function(aten.round.default, (x,)),), {"dtype": torch.int8})
    q.meta["val"] = torch.empty(2, 4, dtype=torch.int8)
    q.meta["fxquant"] = {INTEGER_BOUNDARY: "enter"}
    acc = g.call_function(aten.mm.default, (q, w))
    acc.meta["val"] = torch.empty(2, 4, dtype=torch.int32)
    if float_inside == "exp":
        acc = g.call_function(aten.exp.default, (acc,))
        acc.meta["val"] = torch.empty(2, 4)
    elif float_inside == "scale":
        s = g.placeholder("scale")
        s.meta["val"] = torch.empty(4)
        acc = g.call_function(aten.mul.Tensor, (acc, s))
        acc.meta["val"] = torch.empty(2, 4, dtype=torch.int32)  # a lying dtype: the float input still shows
    out = g.call_function(aten.mul.Tensor, (acc, 0.5))
    out.meta["val"] = torch.empty(2, 4)
    out.meta["fxquant"] = {INTEGER_BOUNDARY: "exit"}
    g.output(out)
    return fx.GraphModule(torch.nn.Module(), g)


def test_assert_integer_only_passes_an_integer_region_and_catches_floats():
    assert assert_integer_only(_integer_graph()) == 2  # the quantize and the int matmul
    with pytest.raises(AssertionError, match="exp is a floating-point op"):
        assert_integer_only(_integer_graph("exp"))
    with pytest.raises(AssertionError, match="reads float tensor scale from outside the integer region"):
        assert_integer_only(_integer_graph("scale"))
    plain = _integer_graph()
    for n in plain.graph.nodes:
        n.meta.pop("fxquant", None)
    with pytest.raises(AssertionError, match="no integer region"):
        assert_integer_only(plain)


# ---- every pass in passes/ -------------------------------------------------------------------------------------
@GRAPHS
@given(block=fst.captured_blocks(), spec=fst.quant_specs())
def test_rtn_is_fake_quant_of_every_linear_weight(block, spec):
    report = assert_equivalent(QuantizeWeightsRTN(spec, exclude=()), block.cg, block.inputs, tol=0,
                               expected=fake_quant_linears(lambda w: fake_quantize(w, spec), block.inputs))
    assert report.record.stats["quantized"] == len(block.config.linears)


@GRAPHS
@given(block=fst.captured_blocks(), spec=fst.fp_quant_specs())
def test_fp6_split_is_fp_fake_quant_of_every_linear_weight(block, spec):
    report = assert_equivalent(SplitFP6Weights(spec, exclude=()), block.cg, block.inputs, tol=0,
                               expected=fake_quant_linears(lambda w: fp_fake_quantize(w, spec, ste=False),
                                                           block.inputs))
    assert report.record.stats["quantized"] == len(block.config.linears)


@GRAPHS
@given(block=fst.captured_blocks(), spec=fst.quant_specs(bits=st.integers(2, 8), granularity=("channel", "group")))
def test_lowering_computes_what_the_quantized_graph_computes(block, spec):
    ctx = fxquant.PassContext()
    quantized = copy_captured(block.cg)
    run_pass(QuantizeWeightsRTN(spec, exclude=()), quantized, ctx)
    report = assert_equivalent(LowerQuantizedLinears(), quantized, block.inputs, tol=1e-5, ctx=ctx)
    lowered = [n for n in report.transformed.gm.graph.nodes if getattr(n.target, "namespace", "") == "fxquant"]
    assert len(lowered) == report.record.stats.get("lowered", len(lowered)) > 0


@GRAPHS
@given(block=fst.captured_blocks(fst.block_configs(attention=("sdpa",))))
def test_analyze_structure_changes_nothing_and_finds_the_block(block):
    report = assert_equivalent(AnalyzeStructure(), block.cg, block.inputs, tol=0)
    s, c = report.context.artifacts["structure"], block.config
    assert [(a.num_heads, a.num_kv_heads, a.head_dim) for a in s.attentions] == [(c.heads, c.kv_heads, c.head_dim)]
    assert sum(not g.final for g in s.norm_groups) == 2
    assert len(s.swiglus) == (c.mlp == "swiglu")
    assert [sorted(r.targets) for r in s.ropes] == ([["k", "q"]] if c.rope else [])
    assert {p.kind for p in s.pairs} >= ({"attention"} | ({"gated"} if c.mlp == "swiglu" else set())
                                         | ({"activation"} if c.mlp == "relu" else set()))


@pytest.mark.xfail(strict=True, reason="analyze_structure does not yet recognise matmul->masked_fill->softmax "
                                       "attention (found by the harness; remove this mark when it does)")
def test_analyze_structure_finds_masked_matmul_softmax_attention():
    block = fst.make_block(fst.BlockConfig(attention="matmul", rope=False))
    report = assert_equivalent(AnalyzeStructure(), block.cg, block.inputs, tol=0)
    assert len(report.context.artifacts["structure"].attentions) == 1


# ---- the plugin and the example ----------------------------------------------------------------------------------
def test_plugin_profiles_and_fixtures(fxquant_block, fxquant_gelu_block, fxquant_llama):
    for name in ("ci", "dev", "thorough"):
        assert settings.get_profile(name).deadline is None
    assert settings.get_profile("ci").derandomize and settings.get_profile("ci").max_examples == 25
    assert fxquant_block.config.mlp == "swiglu" and fxquant_gelu_block.config.mlp == "gelu"
    assert fxquant_llama.cg(*fxquant_llama.inputs).shape[-1] == 64


def test_a_user_tests_a_pass_in_five_lines(pytester):
    """The entry point loads the plugin in a fresh pytest: its fixtures, strategies and the ci profile."""
    pytester.makepyfile(test_user="""
        from hypothesis import given, settings
        from fxquant.testing import assert_equivalent, strategies as fst
        from fxquant.passes.analyze_structure import AnalyzeStructure

        @given(block=fst.captured_blocks(fst.block_configs(attention=("sdpa",))))
        def test_my_pass(block):
            assert_equivalent(AnalyzeStructure(), block.cg, block.inputs, tol=0)

        def test_fixture(fxquant_block):
            assert settings.default.max_examples == 3
            assert_equivalent(AnalyzeStructure(), fxquant_block.cg, fxquant_block.inputs, tol=0)
    """)
    # the profile comes from the plugin ($HYPOTHESIS_PROFILE, then ci); "fast" keeps this subprocess quick
    pytester.makeconftest("""
        from hypothesis import settings
        settings.register_profile("fast", settings.get_profile("ci"), max_examples=3)
    """)
    # no -q: pytest prints report headers (where the plugin names its profile) only at normal verbosity
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--hypothesis-profile", "fast")
    result.assert_outcomes(passed=2)
    assert any("fxquant: hypothesis profile" in line for line in result.outlines)


def _example_module():
    spec = importlib.util.spec_from_file_location("custom_pass_example", ROOT / "examples" / "custom_pass.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_wrong_fold_is_caught_with_a_minimal_example():
    example = _example_module()
    prop = settings(max_examples=10, derandomize=True, database=None)(
        example.make_property(example.EqualizeAcrossAnyActivation, ("relu", "gelu")))
    with pytest.raises(AssertionError, match="outputs differ") as info:
        prop()
    notes = "\n".join(getattr(info.value, "__notes__", []))
    # shrunk: the smallest block, seed 0, and the one thing that matters: the GELU
    assert "mlp='gelu'" in notes and "hidden=4" in notes and "seed=0" in notes, notes


def test_example_correct_pass_holds():
    example = _example_module()
    settings(max_examples=max(3, settings.default.max_examples // 5), derandomize=True)(
        example.make_property(example.correct_pass, ("relu", "swiglu")))()
