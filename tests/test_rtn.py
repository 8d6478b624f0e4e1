"""The quantize_weights_rtn pass on tiny models built from configs (no download)."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama

import fxquant
from fxquant.errors import PassError, WeightError
from fxquant.passes.quantize_weights_rtn import QuantizeWeightsRTN, matches
from fxquant.quant import QuantSpec, quantize_weight

LLAMA_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def run_rtn(cg, spec, **kwargs):
    ctx = fxquant.PassContext()
    records = fxquant.Pipeline([QuantizeWeightsRTN(spec, **kwargs)]).run(cg, ctx, verify=True)
    return ctx, records[0]


def linear_notes(cg) -> dict[str, dict]:
    return {n.name: n.meta["fxquant"]["quant"] for n in cg.gm.graph.nodes
            if "quant" in n.meta.get("fxquant", {})}


@pytest.fixture
def llama_tokens():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def _llama_capture():
    """One capture of the tiny LLaMA for the tests that do not write back (capture is the slow part)."""
    model = make_tiny_llama()
    cg = fxquant.capture(model)
    return model, cg, dict(cg.tensors)


def _reset(cg, tensors) -> None:
    """Back to the float state: the pass changes only ``cg.tensors`` and the annotations, never the graph."""
    cg.tensors.clear()
    cg.tensors.update(tensors)
    for node in cg.gm.graph.nodes:
        node.meta.get("fxquant", {}).pop("quant", None)


@pytest.fixture
def llama_cg(_llama_capture):
    """The shared tiny-LLaMA capture, reset to its float state."""
    _, cg, tensors = _llama_capture
    _reset(cg, tensors)
    return cg


def test_llama_all_seven_linears_quantized_lm_head_float_and_model_matches_graph(llama_tokens):
    model = make_tiny_llama(layers=2)
    originals = {k: v.detach().clone() for k, v in model.named_parameters()}
    cg = fxquant.capture(model)
    spec = QuantSpec(4, group_size=24, symmetric=False)  # 24 divides neither 64 nor 128: shorter last groups
    ctx, record = run_rtn(cg, spec)

    expected = {f"model.layers.{i}.{name}.weight" for i in range(2) for name in LLAMA_LINEARS}
    quantized = ctx.artifacts["quantized_weights"]
    assert set(quantized) == expected
    assert record.stats == {"quantized": 14, "skipped": 0, "excluded": 1}
    assert ctx.artifacts["rtn_skipped"] == {}
    notes = linear_notes(cg)
    assert sorted(n["weight"] for n in notes.values()) == sorted(expected)
    assert all(n["spec"] == "w4g24a" and n["bits"] == 4 and n["group_size"] == 24 for n in notes.values())

    params = dict(model.named_parameters())
    for fqn, qw in quantized.items():
        ph = cg.parameter_nodes()[fqn].name
        assert cg.tensors[ph] is not params[fqn]  # a new tensor; the model is untouched until write_back
        assert torch.equal(params[fqn], originals[fqn])
        assert torch.equal(cg.tensors[ph], qw.dequantize(torch.float32))
        assert qw.spec.bits == 4 and int(qw.codes.max()) <= 15 and qw.codes.dtype == torch.uint8
        assert qw.n_groups == -(-params[fqn].shape[1] // 24)
    assert "lm_head.weight" not in quantized

    with torch.no_grad():
        graph_out = cg(llama_tokens)
        assert cg.write_back() == 14
        eager_out = model(llama_tokens).logits
    assert torch.equal(graph_out, eager_out)
    assert torch.equal(params["lm_head.weight"], originals["lm_head.weight"])
    for fqn, qw in quantized.items():
        assert torch.equal(params[fqn], qw.dequantize())
    # still a working Hugging Face model: generate() with its KV cache runs on the written-back weights
    generated = model.generate(llama_tokens[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 7)


def test_eight_bit_output_is_close_to_float_and_two_bit_is_not(llama_cg, _llama_capture, llama_tokens):
    model = _llama_capture[0]
    with torch.no_grad():
        ref = model(llama_tokens).logits
    errors = {}
    for bits in (8, 2):
        _reset(llama_cg, _llama_capture[2])
        run_rtn(llama_cg, QuantSpec(bits))
        with torch.no_grad():
            errors[bits] = float((llama_cg(llama_tokens) - ref).norm() / ref.norm())
    assert errors[8] < 5e-3, errors
    assert errors[2] > 20 * errors[8], errors


def test_include_exclude_patterns_and_lm_head_opt_in(llama_cg, _llama_capture):
    assert matches("lm_head.weight", "lm_head") and matches("lm_head.weight", "lm_head*")
    assert matches("model.layers.0.mlp.up_proj.weight", "mlp.*")
    assert matches("model.layers.0.mlp.up_proj.weight", "layers.0.*")
    assert matches("model.layers.0.mlp.up_proj.weight", "up_proj")
    assert not matches("model.layers.10.mlp.up_proj.weight", "layers.1.*")
    assert not matches("model.layers.0.mlp.up_proj.weight", "proj")  # a glob, not a substring search
    assert matches("model.layers.0.mlp.up_proj.weight", "re:layers\\.0\\..*proj")

    ctx, record = run_rtn(llama_cg, QuantSpec(8), include=["mlp.*"])
    assert sorted(ctx.artifacts["quantized_weights"]) == [
        f"model.layers.0.mlp.{n}.weight" for n in ("down_proj", "gate_proj", "up_proj")]
    assert record.stats["excluded"] == 5
    _reset(llama_cg, _llama_capture[2])
    ctx, record = run_rtn(llama_cg, QuantSpec(8), exclude=())
    assert "lm_head.weight" in ctx.artifacts["quantized_weights"] and record.stats["quantized"] == 8


def test_debug_dump_shows_the_quant_annotations(llama_cg, tmp_path):
    cg = llama_cg
    fxquant.Pipeline([QuantizeWeightsRTN(QuantSpec(4, group_size=32))]).run(cg, fxquant.PassContext(),
                                                                            debug_dir=tmp_path)
    text = (tmp_path / "001_quantize_weights_rtn.py").read_text()
    assert "'spec': 'w4g32'" in text
    for name in LLAMA_LINEARS:
        assert f"'weight': 'model.layers.0.{name}.weight'" in text
    assert "lm_head.weight'" not in text.split("# fxquant annotations")[1]
    assert "'quant'" not in (tmp_path / "000_capture.py").read_text()


class _Tied(torch.nn.Module):
    """Two linears sharing one weight, and a linear whose weight is computed in the graph."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 16, bias=False)
        self.b.weight = self.a.weight
        self.c = torch.nn.Linear(16, 16, bias=False)

    def forward(self, x):
        return F.linear(self.b(self.a(x)), self.c.weight * 2.0)


def test_tied_weight_quantized_once_and_computed_weight_reported(caplog):
    model = _Tied()
    x = torch.randn(3, 16)
    cg = fxquant.capture(model, (x,))
    with caplog.at_level(logging.WARNING, logger="fxquant"):
        ctx, record = run_rtn(cg, QuantSpec(4))
    quantized = ctx.artifacts["quantized_weights"]
    assert len(quantized) == 1 and record.stats["quantized"] == 1
    (fqn,) = quantized
    notes = linear_notes(cg)
    assert len(notes) == 2 and {n["weight"] for n in notes.values()} == {fqn}
    # the F.linear on `c.weight * 2` is not silently ignored
    skipped = ctx.artifacts["rtn_skipped"]
    assert record.stats["skipped"] == 1 and len(skipped) == 1
    assert "aten.mul" in next(iter(skipped.values()))
    assert "not quantizing" in caplog.text
    with torch.no_grad():
        out = cg(x)
        cg.write_back()
        assert torch.equal(model.a.weight, quantized[fqn].dequantize())
        assert torch.allclose(out, model(x))


def test_gpt2_conv1d_quantized_along_the_input_dim_and_tied_lm_head_reported():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)).eval()
    conv1d = {f"transformer.h.0.{n}.weight": model.get_parameter(f"transformer.h.0.{n}.weight")
              for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    originals = {k: v.detach().clone() for k, v in conv1d.items()}
    cg = fxquant.capture(model)
    spec = QuantSpec(4, group_size=48)
    ctx, record = run_rtn(cg, spec, exclude=())

    quantized = ctx.artifacts["quantized_weights"]
    assert set(quantized) == set(conv1d)
    for fqn, w in originals.items():  # Conv1D stores [in, out]: quantized as [out, in]
        qw = quantized[fqn]
        assert qw.shape == (w.shape[1], w.shape[0])
        assert torch.equal(qw.scale, quantize_weight(w.t(), spec).scale)
        assert torch.equal(cg.tensors[cg.parameter_nodes()[fqn].name], qw.dequantize().t())
    assert all(n.get("layout") == "in_out" for n in linear_notes(cg).values())
    # lm_head is tied to the token embedding: reported, with the reason, not skipped silently
    assert record.stats["skipped"] == 1
    assert "embedding" in ctx.artifacts["rtn_skipped"]["lm_head.weight"]
    tokens = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = cg(tokens)
        cg.write_back()
        assert torch.equal(out, model(tokens).logits)
    for fqn in conv1d:
        assert torch.equal(conv1d[fqn], quantized[fqn].dequantize().t())


def test_nan_weight_raises_instead_of_skipping(llama_cg):
    ph = llama_cg.parameter_nodes()["model.layers.0.mlp.up_proj.weight"].name
    poisoned = llama_cg.tensors[ph].detach().clone()
    poisoned[3, 7] = float("nan")
    llama_cg.tensors[ph] = poisoned
    with pytest.raises(WeightError, match=r"mlp\.up_proj\.weight.*1 non-finite.*\[3, 7\]"):
        run_rtn(llama_cg, QuantSpec(4))


def test_requires_a_linear_and_ensures_catches_a_wrong_tensor(llama_cg, _llama_capture):
    class NoLinear(torch.nn.Module):
        def forward(self, x):
            return x.relu()

    cg = fxquant.capture(NoLinear(), (torch.randn(2, 3),))
    with pytest.raises(PassError, match="no linear"):
        run_rtn(cg, QuantSpec(8))

    cg, model = llama_cg, _llama_capture[0]
    rtn = QuantizeWeightsRTN(QuantSpec(3, group_size=32))
    ctx = fxquant.PassContext()
    fxquant.Pipeline([rtn]).run(cg, ctx, verify=True)
    rtn.ensures(cg, ctx)
    ph = cg.parameter_nodes()["model.layers.0.mlp.down_proj.weight"].name
    cg.tensors[ph] = model.get_parameter("model.layers.0.mlp.down_proj.weight")  # the float weight again
    with pytest.raises(PassError, match="not the dequantized"):
        rtn.ensures(cg, ctx)
    cg.tensors[ph] = ctx.artifacts["quantized_weights"]["model.layers.0.mlp.down_proj.weight"].dequantize()
    ctx.artifacts["quantized_weights"]["model.layers.0.mlp.down_proj.weight"].codes[0, 0] = 5
    with pytest.raises(PassError, match="codes span"):
        rtn.ensures(cg, ctx)
