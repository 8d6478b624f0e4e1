"""Integer-only lowering (I-LLM): the rewritten graph is integer-only between its boundaries (the verifier is on),
computes nearly the float model's function, fails loudly on ops without a rule, and runs the real models."""
from __future__ import annotations

import operator

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx

from fxquant.capture import capture
from fxquant.passes.lower_integer_only import INTEGER_BOUNDARY, IntegerOnlyConfig, LoweringError, lower_integer_only
from fxquant.testing import assert_integer_only
from fxquant.verify import check_integer_region, propagate_meta, verify_integer_only

from conftest import make_tiny_llama


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@settings(max_examples=4, deadline=None)
@given(st.integers(1, 2), st.sampled_from([(4, 4), (4, 2), (4, 1)]), st.sampled_from([32, 64]), st.integers(0, 100))
def test_tiny_llama_lowers_to_integers_and_keeps_the_function(layers, heads, hidden, seed):
    model = make_tiny_llama(layers=layers, hidden=hidden, heads=heads[0], kv_heads=heads[1], inter=2 * hidden, seed=seed)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(ids).logits
    cg = capture(model)
    stats = lower_integer_only(cg)
    assert stats["di_attention"] == layers and stats["di_swiglu"] == layers and stats["di_rmsnorm"] == 2 * layers + 1
    out = cg(ids)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert _rel(out, ref) < 0.05
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.85
    report = verify_integer_only(cg)
    assert report.ok and report.enters >= 1 and report.exits == 1
    assert_integer_only(cg)                                       # the test harness's assertion agrees


def test_widths_are_configurable_and_wider_is_closer():
    model = make_tiny_llama(layers=2, seed=3)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    errs = {}
    for bits in (4, 8):
        cg = capture(model)
        lower_integer_only(cg, IntegerOnlyConfig(act_bits=bits))
        errs[bits] = _rel(cg(ids), ref)
        linear_inputs = [n for n in cg.gm.graph.nodes if "di_linear" in str(n.target)]
        propagate_meta(cg, ids)
        assert all(n.args[0].meta["val"].dtype == torch.int8 for n in linear_inputs)
    assert errs[8] < errs[4]


def test_an_op_without_a_rule_is_named():
    class AtanLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(32, 16)
            self.out = torch.nn.Linear(16, 32)

        def forward(self, input_ids):
            return self.out(torch.atan(self.emb(input_ids)))

    cg = capture(AtanLM().eval(), (torch.randint(0, 32, (1, 5)),))
    try:
        lower_integer_only(cg)
    except LoweringError as exc:
        assert "aten.atan" in str(exc) and "RULES" in str(exc)
    else:
        raise AssertionError("lowering an atan should fail with a LoweringError")


def test_a_model_without_embedding_is_refused():
    cg = capture(torch.nn.Sequential(torch.nn.Linear(4, 4)).eval(), (torch.randn(2, 4),))
    try:
        lower_integer_only(cg)
    except LoweringError as exc:
        assert "embedding" in str(exc)
    else:
        raise AssertionError("expected a LoweringError")


def _region_graph(float_inside: bool, read_float_weight: bool) -> fx.GraphModule:
    g = fx.Graph()
    x = g.placeholder("x")
    w = g.placeholder("w")
    from fxquant.backends.di_ops import op
    enter = g.call_function(op("quantize_rows"), (x, 8, False))
    enter.meta["fxquant"] = {INTEGER_BOUNDARY: "enter"}
    q = g.call_function(__import__("operator").getitem, (enter, 0))
    m = g.call_function(__import__("operator").getitem, (enter, 1))
    k = g.call_function(__import__("operator").getitem, (enter, 2))
    y = g.call_function(torch.ops.aten.neg.default, (q,))
    if float_inside:
        f = g.call_function(torch.ops.aten.exp.default, (g.call_function(torch.ops.aten.to.dtype, (y, torch.float32)),))
        y = g.call_function(torch.ops.aten.to.dtype, (f, torch.int8))
    if read_float_weight:
        y = g.call_function(torch.ops.aten.mul.Tensor, (y, w))
    out = g.call_function(op("dequantize"), (y, m, k))
    out.meta["fxquant"] = {INTEGER_BOUNDARY: "exit"}
    g.output(out)
    gm = fx.GraphModule(torch.nn.Module(), g)

    class Prop(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                n.meta["val"] = out.to("meta")
            return out

    Prop(gm).run(torch.randn(2, 4), torch.randn(4))
    return gm


def test_verifier_finds_float_ops_and_float_tensors():
    assert check_integer_region(_region_graph(False, False)).ok
    bad = check_integer_region(_region_graph(True, False))
    assert not bad.ok and any("exp is a floating-point op" in p for p in bad.problems)
    assert any("produces torch.float32" in p for p in bad.problems)
    bad = check_integer_region(_region_graph(False, True))
    assert any("reads float tensor w" in p or "produces torch.float32" in p for p in bad.problems)
    empty = check_integer_region(fx.symbolic_trace(torch.nn.ReLU()))
    assert not empty.ok and "no integer region" in empty.problems[0]


def test_illm_recipe_through_quantize_and_generate():
    from fxquant import quantize
    from fxquant.recipes import get_recipe
    model = make_tiny_llama(layers=1, seed=5)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    recipe = get_recipe("illm-w8a8")
    recipe.options["fsbr"] = False
    assert recipe.data_free
    res = quantize(model, recipe)
    im = res.integer_model
    assert im is not None and res.eval_model is im
    assert _rel(im(input_ids=ids).logits, ref) < 0.05
    out = im.generate(ids, max_new_tokens=3)
    assert out.shape == (1, 9) and torch.equal(out[:, :6], ids)
    assert [r.name for r in res.records][-1] == "lower_integer_only"


def test_illm_recipe_generates_through_the_kv_cache():
    """The illm recipes lower with an integer KV cache where the model allows one: generate() prefills once and
    then runs one token per call, and picks the tokens the cache-less graph picks re-running the whole sequence."""
    from fxquant import quantize
    from fxquant.intmodel import IntegerOnlyModel
    from fxquant.recipes import get_recipe
    model = make_tiny_llama(layers=2, seed=7)
    ids = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(0))
    res = quantize(model, get_recipe({"base": "illm-w8a8", "options": {"fsbr": False}}))
    im = res.integer_model
    assert im.has_kv_cache and res.artifacts["integer_only"]["kv_cache"] == 4
    calls = []
    run = im._call
    im._call = lambda feed: calls.append(int(feed["input_ids"].shape[1])) or run(feed)
    cached = im.generate(ids, max_new_tokens=6)
    assert calls == [4, 1, 1, 1, 1, 1]
    im._call = run
    plain = capture(model)
    lower_integer_only(plain, IntegerOnlyConfig(), dict(res.artifacts.get("quantized_weights", {})))
    again = IntegerOnlyModel(plain).generate(ids, max_new_tokens=6)
    assert torch.equal(cached, again)
    assert torch.equal(im(input_ids=ids).logits, plain(ids))


def test_lowered_graph_keeps_no_float_original():
    """Capture-time assertions and attention (impure to FX: dropout) used to keep the float model running beside
    the integer one; the lowered graph computes only what its outputs need."""
    cg = capture(make_tiny_llama(layers=2))
    lower_integer_only(cg)
    ops = {str(n.target) for n in cg.gm.graph.nodes if n.op == "call_function"}
    for float_op in ("aten.linear", "aten.scaled_dot_product_attention", "aten.rsqrt", "aten.silu", "aten.mean",
                     "aten._assert_tensor_metadata", "aten.index.Tensor", "aten.cumsum"):
        assert not any(o.startswith(float_op) for o in ops), float_op


def test_minilm_embeddings_match_fp32(minilm):
    """MiniLM (LayerNorm, GELU, biases) integer-only W8A8: mean cosine of sentence embeddings >= 0.99."""
    from fxquant.data import eval_text
    from fxquant.evaluate import encoder_similarity
    from fxquant.intmodel import IntegerOnlyModel
    cg = capture(minilm.model)
    stats = lower_integer_only(cg)
    assert stats["di_layernorm"] == 13 and stats["di_gelu"] == 6
    verify_integer_only(cg)
    text, _ = eval_text(None)
    sim = encoder_similarity(minilm.model, IntegerOnlyModel(cg, causal=False), minilm.tokenizer, text, n=12)
    assert sim["cosine"] >= 0.99, sim


def test_torch_compile_of_the_integer_graph_is_bit_exact():
    """The lowered graph through torch.compile(backend="fxquant"): custom ops stay opaque, Inductor compiles the
    integer glue, and the logits equal the eager integer graph's bit for bit."""
    model = make_tiny_llama(layers=1, seed=2)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    cg = capture(model)
    lower_integer_only(cg)
    eager = cg(ids)
    from fxquant.intmodel import IntegerOnlyModel
    im = IntegerOnlyModel(cg)
    out = torch.compile(im.run, backend="fxquant")(ids)
    assert torch.equal(out, eager)


def test_torch_compile_of_the_cached_steps_is_bit_exact():
    """The KV-cached graph's prefill and decode steps through torch.compile(backend="fxquant") equal the eager
    integer graph's, cache included."""
    from fxquant.intmodel import IntegerOnlyModel
    model = make_tiny_llama(layers=1, seed=2)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    cg = capture(model)
    lower_integer_only(cg, IntegerOnlyConfig(kv_cache=True))
    im = IntegerOnlyModel(cg)
    eager = [im.step(ids[:, :5])]
    for t in (5, 6):
        eager.append(im.step(ids[:, t:t + 1], eager[-1][1]))
    call = im._call
    im._call = torch.compile(call, backend="fxquant", dynamic=True)
    try:
        got = [im.step(ids[:, :5])]
        for t in (5, 6):
            got.append(im.step(ids[:, t:t + 1], got[-1][1]))
    finally:
        im._call = call
    for (gl, gc), (el, ec) in zip(got, eager):
        assert torch.equal(gl, el) and gc.keys() == ec.keys()
        assert all(torch.equal(gc[n], ec[n]) for n in ec)


def test_custom_ops_pass_opcheck():
    """Fake (meta) implementations agree with the real ones (shapes, dtypes, strides) for every di op."""
    from fxquant.backends.di_ops import op
    g = torch.Generator().manual_seed(0)

    def ints(*shape, lo=-100, hi=100, dtype=torch.int64):
        return torch.randint(lo, hi, shape, generator=g, dtype=dtype)

    def scale(*shape):
        return ints(*shape, lo=16384, hi=32767), ints(*shape, lo=12, hi=30)

    xm, xk = scale(2, 5, 1)
    cases = {
        "quantize_rows": (torch.randn(2, 5, 8), 8, False),
        "quantize_fixed": (torch.randn(1, 5, 8), 14, 16),
        "float64_fn": (torch.randn(1, 5, 8), "cos", 0.0),
        "dequantize": (ints(2, 5, 8), xm, xk),
        "requantize_rows": (ints(2, 5, 8), xm, xk, 8, False),
        "rescale": (xm, xk, 23170, 15),
        "align_rows": (ints(2, 5, 3, 4), *scale(2, 5, 3, 1), 2),
        "di_add": (ints(2, 5, 8), xm, xk, ints(2, 5, 8), *scale(2, 5, 1), 16),
        "di_mul": (ints(2, 5, 8), xm, xk, ints(1, 5, 8), *scale(1, 1, 1), 0),
        "di_linear": (ints(2, 5, 8, dtype=torch.int8), xm, xk, ints(6, 8, dtype=torch.int8),
                      ints(6, lo=1, hi=2 ** 23), 30, ints(6), 20, 16),
        "di_matmul": (ints(2, 5, 8, dtype=torch.int8), xm, xk, ints(2, 8, 7, dtype=torch.int8), *scale(2, 1, 7),
                      16, 8, False, "columns"),
        "di_clipped_softmax": (ints(2, 5, 5), xm, xk, None, True, 30720, 11, 2, 8),
        "di_silu": (ints(2, 5, 8, dtype=torch.int16), xm, xk, 2, 16),
        "di_gelu": (ints(2, 5, 8, dtype=torch.int16), xm, xk, 2, 8),
        "di_tanh": (ints(2, 5, 8, dtype=torch.int16), xm, xk, 2, 16),
        "mask_from_additive": (torch.full((1, 1, 5, 5), torch.finfo(torch.float32).min).triu(1),),
        "di_swiglu": (ints(2, 5, 8, dtype=torch.int16), xm, xk, ints(2, 5, 8, dtype=torch.int16), *scale(2, 5, 1),
                      2, 8),
        "di_rmsnorm": (ints(2, 5, 8, dtype=torch.int16), xm, xk, ints(8, lo=1, hi=2 ** 14), 14, 17180, 34, 8),
        "di_layernorm": (ints(2, 5, 8, dtype=torch.int16), xm, xk, ints(8, lo=1, hi=2 ** 14), ints(8), 14, 21475,
                         31, 8),
    }
    from fxquant.backends.di_ops import OPS
    assert set(cases) == set(OPS)
    for name, args in cases.items():
        torch.library.opcheck(op(name), args, test_utils=("test_schema", "test_faketensor"))


def test_cli_verify_integer_only(tmp_path, capsys):
    """`fxquant verify --integer-only` on a saved tiny LLaMA with the full illm-w8a8 recipe (FSBR on WikiText-2
    validation, then the lowering): exit 0 and the verifier's report; a recipe that does not lower is refused."""
    import shutil
    from fxquant.cli import main
    from fxquant.models import builtin_path
    model = make_tiny_llama(layers=1, vocab=30522, seed=4)         # MiniLM's WordPiece vocabulary
    folder = tmp_path / "tiny"
    model.save_pretrained(folder, safe_serialization=True)
    tok_dir, _ = builtin_path("minilm")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok_dir / name, folder / name)
    code = main(["verify", "--integer-only", "--model", str(folder), "--recipe", "illm-w8a8", "--steps", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "integer-only: OK" in out and "di_linear" in out
    assert main(["verify", "--integer-only", "--model", str(folder), "--recipe", "rtn-w8"]) == 2
    assert "does not lower the model to integers" in capsys.readouterr().err


def test_position_tables_enter_the_same_under_torch_compile():
    """RoPE's cos/sin run as fxquant::float64_fn (float64, rounded once), so the fixed-point position codes are the
    same integers eager and under torch.compile: Inductor's float32 cos differs from ATen's in the last bit for
    thousands of angles, and that moved 8 of 44,800 14-bit codes of this model before."""
    from fxquant.backends.di_ops import op
    model = make_tiny_llama(layers=1, hidden=64, heads=1, kv_heads=1, seed=2)
    ids = torch.randint(0, 128, (1, 700), generator=torch.Generator().manual_seed(0))
    cg = capture(model)
    stats = lower_integer_only(cg)
    g = cg.gm.graph
    assert stats["float64_fn"] == 2
    assert not [n for n in g.nodes if n.op == "call_function" and str(n.target).startswith("aten.cos")]
    fixed = [n for n in g.nodes if n.target is op("quantize_fixed")]
    assert fixed
    codes = []
    for n in fixed:                                  # the position codes become extra outputs
        with g.inserting_before(g.output_node()):
            codes.append(g.call_function(operator.getitem, (n, 0)))
    out = g.output_node()
    out.args = ((*out.args[0], *codes) if isinstance(out.args[0], (tuple, list)) else (out.args[0], *codes),)
    cg.gm.recompile()
    eager = cg(ids)
    got = torch.compile(lambda i: cg(i), backend="fxquant")(ids)
    assert len(got) == len(eager) == 1 + len(codes)
    assert all(torch.equal(a, b) for a, b in zip(got, eager))


def test_float64_fn_is_float64_rounded_once_and_names_what_it_computes():
    import pytest
    from fxquant.backends.di_ops import FLOAT64_FNS, op
    x = torch.linspace(0.01, 40.0, 997)
    f = op("float64_fn")
    compiled = torch.compile(lambda t, fn, s: f(t, fn, s), backend="fxquant")
    for fn in FLOAT64_FNS:
        want = {"pow_scalar_base": lambda t: torch.pow(10000.0, t), "pow_scalar_exp": lambda t: t ** 1.5
                }.get(fn, getattr(torch, fn, None))
        arg = -x / 40 if fn == "pow_scalar_base" else x
        got = f(arg, fn, 10000.0 if fn == "pow_scalar_base" else 1.5)
        assert torch.equal(got, want(arg.double()).float()), fn
        assert torch.equal(compiled(arg, fn, 10000.0 if fn == "pow_scalar_base" else 1.5), got), fn
    with pytest.raises(ValueError, match="not one of"):
        f(x, "atan", 0.0)


def test_a_position_table_built_with_pow_and_exp_runs_in_float64():
    """A model that builds its position table in forward (``base ** (-i/d)``, ``x ** p``, ``exp``) gets every
    device-dependent float op as fxquant::float64_fn, and the same integers eager and compiled."""
    class PosLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(32, 16)
            self.out = torch.nn.Linear(16, 32)

        def forward(self, input_ids):
            pos = torch.arange(input_ids.shape[1], dtype=torch.float32)[:, None]
            freq = 500.0 ** (-torch.arange(16, dtype=torch.float32) / 16)
            table = torch.exp(-(pos * freq) ** 1.5 / 200)
            return self.out(self.emb(input_ids) * table)

    torch.manual_seed(0)
    model = PosLM().eval()
    ids = torch.randint(0, 32, (1, 40))
    cg = capture(model, (ids,))
    stats = lower_integer_only(cg)
    names = [n.args[1] for n in cg.gm.graph.nodes if n.op == "call_function" and "float64_fn" in str(n.target)]
    assert sorted(names) == ["exp", "pow_scalar_base", "pow_scalar_exp"] and stats["float64_fn"] == 3
    out = cg(ids)
    assert torch.equal(torch.compile(lambda i: cg(i), backend="fxquant")(ids), out)
    with torch.no_grad():
        assert _rel(out, model(ids)) < 0.05
