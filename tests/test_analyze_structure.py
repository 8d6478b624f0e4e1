"""Tests of the analyze_structure pass: exact counts on the real models, every family of tiny models,
a golden rendering on a one-layer LLaMA, and a hypothesis property over random LLaMA shapes.

The real SmolLM2/MiniLM captures are module-scoped (SmolLM2's capture is the slow part of this file).
Tiny models are captured with static shapes (``dynamic=False``: 3x faster to export); the golden test and the
real models use the default dynamic capture, so both kinds of shapes are covered.
"""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxquant
from fxquant.graphview import build_graphview, op_name
from fxquant.passes.analyze_structure import AnalyzeStructure, Structure, render_annotations
from fxquant.pipeline import PassContext, Pipeline

from conftest import make_tiny_family, make_tiny_llama


def analyze(cg: fxquant.CapturedGraph) -> Structure:
    """Run the pass through the pipeline with the verifier on (so ``ensures`` is checked too)."""
    ctx = PassContext()
    records = Pipeline([AnalyzeStructure()]).run(cg, ctx, verify=True)
    assert records[0].modified is False and records[0].added == records[0].removed == records[0].replaced == 0
    structure = ctx.artifacts["structure"]
    assert isinstance(structure, Structure)
    assert records[0].stats == structure.counts()
    json.dumps(structure.to_dict())  # JSON-serialisable as promised
    return structure


def capture_static(model: torch.nn.Module) -> fxquant.CapturedGraph:
    return fxquant.capture(model, dynamic=False, seq_len=8)


# ---- tiny models from transformers configs (no download) -------------------------------------------------
H, V, I = 64, 128, 96


def tiny(family: str, layers: int = 1) -> torch.nn.Module:
    return make_tiny_family(family, layers=layers, hidden=H, vocab=V, inter=I)


# what each family has, per layer: (norm groups, final groups, attention pairs, gated pairs, relu pairs,
# swiglu, rope, unclassified); every family has one attention and two residual adds per layer
EXPECTED = {
    "llama":   (2, 1, 1, 1, 0, 1, 1, 0),
    "qwen2":   (2, 1, 1, 1, 0, 1, 1, 0),
    "mistral": (2, 1, 1, 1, 0, 1, 1, 0),
    "phi3":    (2, 1, 1, 1, 0, 1, 1, 0),
    "opt":     (2, 1, 1, 0, 1, 0, 0, 0),
    "gpt2":    (2, 1, 1, 0, 0, 0, 0, 1),   # c_proj after GELU: reported, not paired
    "bert":    (2, 0, 1, 0, 0, 0, 0, 2),   # output.dense after GELU, and the last LayerNorm (no linear reads it)
}


@pytest.fixture(scope="module")
def family_structures() -> dict[str, tuple[fxquant.CapturedGraph, Structure]]:
    out = {}
    for family in EXPECTED:
        cg = capture_static(tiny(family))
        out[family] = (cg, analyze(cg))
    return out


@pytest.mark.parametrize("family", list(EXPECTED))
def test_family_counts(family_structures, family):
    _, s = family_structures[family]
    groups, final, att_pairs, gated_pairs, relu_pairs, swiglu, rope, unclassified = EXPECTED[family]
    c = s.counts()
    assert (c["norm_groups"], c["final_norm_groups"]) == (groups, final), s.render()
    assert (c["pairs_attention"], c["pairs_gated"], c["pairs_activation"], c["pairs_linear"]) == \
        (att_pairs, gated_pairs, relu_pairs, 0), s.render()
    assert (c["swiglu"], c["rope"], c["attention"], c["residual_adds"]) == (swiglu, rope, 1, 2), s.render()
    assert c["unclassified"] == unclassified, s.render()
    att = s.attentions[0]
    assert None not in (att.q, att.k, att.v, att.o)
    assert att.num_heads == 4 and att.head_dim == 16
    assert att.num_kv_heads == (2 if family in ("llama", "qwen2", "mistral", "phi3") else 4)


def test_every_linear_is_accounted_for(family_structures):
    """No linear is silently dropped: each one is in some record or listed as unclassified."""
    for family, (cg, s) in family_structures.items():
        for node in cg.gm.graph.nodes:
            if op_name(node) in ("linear", "addmm", "mm"):
                meta = node.meta.get("fxquant", {}).get("structure", {})
                listed = any(u.node == node.name for u in s.unclassified)
                assert meta or listed, f"{family}: {node.name} neither classified nor reported"


def test_gqa_pair_records_n_rep(family_structures):
    for family in ("llama", "qwen2", "mistral", "phi3"):
        _, s = family_structures[family]
        (vo,) = [p for p in s.pairs if p.kind == "attention"]
        assert (vo.n_rep, vo.head_dim) == (2, 16), family
        assert vo.consumer == s.attentions[0].o and vo.producer == s.attentions[0].v


def test_qwen2_biases_do_not_change_structure(family_structures):
    _, s = family_structures["qwen2"]
    g = s.norm_groups[0]
    assert [c.rsplit(".", 2)[-2] for c in g.consumers] == ["q_proj", "k_proj", "v_proj"]


def test_phi3_fused_projections_are_split_into_channel_ranges(family_structures):
    _, s = family_structures["phi3"]
    qkv_group, gate_up_group = s.norm_groups[0], s.norm_groups[1]
    assert len(qkv_group.consumers) == 1 and qkv_group.consumers[0].endswith("qkv_proj.weight")
    assert len(gate_up_group.consumers) == 1 and gate_up_group.consumers[0].endswith("gate_up_proj.weight")
    att = s.attentions[0]
    assert att.q == att.k == att.v
    assert (att.q_channels, att.k_channels, att.v_channels) == ((0, 64), (64, 96), (96, 128))
    vo = next(p for p in s.pairs if p.kind == "attention")
    assert vo.channels == (96, 128)              # only the v slice of qkv_proj is scaled
    sw = s.swiglus[0]
    assert sw.gate == sw.up and (sw.gate_channels, sw.up_channels) == ((0, I), (I, 2 * I))
    up_down = next(p for p in s.pairs if p.kind == "gated")
    assert up_down.channels == (I, 2 * I) and up_down.consumer == sw.down
    # the gate half does not pair (SiLU); the q and k halves do not pair (RoPE / attention scores)
    rejected = {r.channels: r.reason for r in s.rejected_pairs if r.producer == sw.gate}
    assert "silu" in rejected[(0, I)]


def test_opt_relu_pair_is_positive_only(family_structures):
    _, s = family_structures["opt"]
    (relu_pair,) = [p for p in s.pairs if p.kind == "activation"]
    assert relu_pair.positive_scales_only and "relu" in relu_pair.through
    assert relu_pair.producer.endswith("fc1.weight") and relu_pair.consumer.endswith("fc2.weight")
    assert {g.kind for g in s.norm_groups} == {"layernorm"}
    assert all(g.bias for g in s.norm_groups)


def test_gpt2_gelu_blocks_the_mlp_pair(family_structures):
    cg, s = family_structures["gpt2"]
    assert not any(p.producer.endswith("c_fc.weight") for p in s.pairs)
    (rej,) = [r for r in s.rejected_pairs if r.producer.endswith("c_fc.weight")]
    assert "not linear per channel" in rej.reason
    (u,) = s.unclassified
    assert u.what == "linear" and u.fqn.endswith("mlp.c_proj.weight") and "c_fc" in u.reason
    # Conv1D: addmm with an [in, out] weight; its fused c_attn pairs through the v third only
    vo = next(p for p in s.pairs if p.kind == "attention")
    assert vo.channels == (2 * H, 3 * H) and vo.producer.endswith("c_attn.weight")
    assert cg.gm.graph.find_nodes(op="call_function", target=torch.ops.aten.addmm.default)


def test_bert_post_ln_groups_are_not_exclusive(family_structures):
    _, s = family_structures["bert"]
    assert all(not g.exclusive and g.other_users for g in s.norm_groups)  # the residual reads the norm too
    assert {u.what for u in s.unclassified} == {"linear", "norm"}


def test_eager_attention_matmul_softmax_form():
    model = make_tiny_llama(layers=1, inter=I)
    model.set_attn_implementation("eager")
    s = analyze(capture_static(model))
    (att,) = s.attentions
    assert att.form == "matmul_softmax" and (att.num_heads, att.num_kv_heads, att.n_rep) == (4, 2, 2)
    vo = next(p for p in s.pairs if p.kind == "attention")
    assert "matmul" in vo.through and vo.n_rep == 2
    assert s.counts()["rope"] == 1 and s.ropes[0].targets == ["q", "k"]


# ---- decisions on hand-written graphs: the linearity rules themselves -------------------------------------
class _TwoLinears(torch.nn.Module):
    def __init__(self, act: str):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)
        self.act = act

    def forward(self, x):
        h = self.a(x)
        h = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh, "scale": lambda t: 2 * t,
             "square": lambda t: t * t, "shift": lambda t: t + 1.0}[self.act](h)
        return self.b(h)


@pytest.mark.parametrize("act,pairs", [("relu", True), ("scale", True), ("gelu", False), ("tanh", False),
                                       ("square", False), ("shift", False)])
def test_linearity_rules(act, pairs):
    cg = fxquant.capture(_TwoLinears(act), (torch.randn(2, 8),))
    s = analyze(cg)
    assert (len(s.pairs) == 1) is pairs, s.render()
    if not pairs:
        assert s.rejected_pairs and s.rejected_pairs[0].producer == "a.weight"


class _NormForms(torch.nn.Module):
    """``aten.rms_norm`` (torch's own RMSNorm), a weightless LayerNorm, and a sigmoid GLU."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.RMSNorm(8)
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.ln = torch.nn.LayerNorm(8, elementwise_affine=False)
        self.c = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = self.norm(x)
        return self.c(self.ln(self.a(h) * torch.sigmoid(self.b(h))))


def test_aten_rms_norm_and_weightless_layer_norm():
    s = analyze(fxquant.capture(_NormForms(), (torch.randn(2, 3, 8),)))
    rms, ln = s.norm_groups
    assert (rms.kind, rms.form, rms.weight, rms.consumers) == ("rmsnorm", "aten.rms_norm", "norm.weight",
                                                               ["a.weight", "b.weight"])
    assert (ln.kind, ln.weight, ln.final) == ("layernorm", None, True)
    (glu,) = s.swiglus
    assert (glu.act, glu.gate, glu.up, glu.down) == ("sigmoid", "b.weight", "a.weight", None)  # LN blocks a -> c
    assert not s.pairs


# ---- golden rendering on a one-layer LLaMA ---------------------------------------------------------------
GOLDEN_RENDER = """\
structure of LlamaForCausalLM: norm_groups=2, final_norm_groups=1, pairs=2, pairs_attention=1, pairs_gated=1, swiglu=1, attention=1, rope=1, residual_adds=2, unclassified=0
norm groups:
  rmsnorm[decomposed] model.layers.0.input_layernorm.weight -> model.layers.0.self_attn.q_proj.weight, model.layers.0.self_attn.k_proj.weight, model.layers.0.self_attn.v_proj.weight
  rmsnorm[decomposed] model.layers.0.post_attention_layernorm.weight -> model.layers.0.mlp.gate_proj.weight, model.layers.0.mlp.up_proj.weight
  rmsnorm[decomposed] model.norm.weight -> lm_head.weight final
linear pairs:
  attention: model.layers.0.self_attn.v_proj.weight[0:32] -> model.layers.0.self_attn.o_proj.weight via sdpa n_rep=2 head_dim=16
  gated: model.layers.0.mlp.up_proj.weight[0:96] -> model.layers.0.mlp.down_proj.weight via mul n_rep=1
not paired:
  model.layers.0.self_attn.q_proj.weight[0:64]: slice_2: slices producer channels after they were reshaped
  model.layers.0.self_attn.k_proj.weight[0:32]: slice_4: slices producer channels after they were reshaped
  model.layers.0.self_attn.o_proj.weight[0:64]: add_6: add is not linear per channel
  model.layers.0.mlp.gate_proj.weight[0:96]: silu: silu is not linear per channel
  model.layers.0.mlp.down_proj.weight[0:64]: add_8: add is not linear per channel
  lm_head.weight[0:128]: output: reaches the graph output
attention[sdpa] heads=4 kv_heads=2 head_dim=16 q=model.layers.0.self_attn.q_proj.weight k=model.layers.0.self_attn.k_proj.weight v=model.layers.0.self_attn.v_proj.weight o=model.layers.0.self_attn.o_proj.weight
gated mlp[silu] gate=model.layers.0.mlp.gate_proj.weight[0:96] up=model.layers.0.mlp.up_proj.weight[0:96] down=model.layers.0.mlp.down_proj.weight
rope on q+k rotary_dim=16 head_dim=16 (layer 0)
residual[attention] to_6 + linear_3 (layer 0)
residual[mlp] to_8 + linear_6 (layer 0)
"""

GOLDEN_ANNOTATIONS = """\
mul_4                        mul        norm={'kind': 'rmsnorm', 'weight': 'model.layers.0.input_layernorm.weight', 'group': 0, 'final': False}
linear                       linear     attention=0, norm_group=0, role=q
linear_1                     linear     attention=0, norm_group=0, role=k
linear_2                     linear     attention=0, norm_group=0, pairs_as_producer=[0], role=v
add_4                        add        rope=0
add_5                        add        rope=0
scaled_dot_product_attention scaled_dot_product_attention attention=0
linear_3                     linear     attention=0, pairs_as_consumer=[0], role=o
add_6                        add        residual=0
mul_18                       mul        norm={'kind': 'rmsnorm', 'weight': 'model.layers.0.post_attention_layernorm.weight', 'group': 1, 'final': False}
linear_4                     linear     norm_group=1, role=gate, swiglu=0
linear_5                     linear     norm_group=1, pairs_as_producer=[1], role=up, swiglu=0
mul_19                       mul        swiglu=0
linear_6                     linear     pairs_as_consumer=[1], role=down, swiglu=0
add_8                        add        residual=1
mul_21                       mul        norm={'kind': 'rmsnorm', 'weight': 'model.norm.weight', 'group': 2, 'final': True}
linear_7                     linear     norm_group=2, role=head
"""


@pytest.fixture(scope="module")
def llama_one_layer() -> tuple[fxquant.CapturedGraph, Structure]:
    cg = fxquant.capture(make_tiny_llama(layers=1, inter=I))  # default (dynamic) capture
    return cg, analyze(cg)


def test_golden_render_llama(llama_one_layer):
    _, s = llama_one_layer
    assert s.render() == GOLDEN_RENDER


def test_golden_annotations_llama(llama_one_layer):
    cg, _ = llama_one_layer
    assert render_annotations(cg.gm) == GOLDEN_ANNOTATIONS


def test_graphview_matches_fx(llama_one_layer):
    cg, _ = llama_one_layer
    view = build_graphview(cg.gm, cg.fqn)
    assert view.number_of_nodes() == len(cg.gm.graph.nodes)
    assert view.number_of_edges() == sum(len(set(n.all_input_nodes)) for n in cg.gm.graph.nodes)
    lin = next(n for n in cg.gm.graph.nodes if op_name(n) == "linear")
    assert view.nodes[lin.name]["target"] == "aten.linear.default"
    w = lin.args[1].name
    assert view.nodes[w]["fqn"] == cg.fqn[w] and view.has_edge(w, lin.name)


# ---- property: counts follow the number of layers on random LLaMA shapes --------------------------------
@st.composite
def llama_shapes(draw):
    head_dim = draw(st.sampled_from([8, 16]))
    heads = draw(st.sampled_from([1, 2, 3, 4, 6]))
    kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    layers = draw(st.integers(1, 2))
    inter = draw(st.sampled_from([24, 40, 64]))
    return layers, heads, kv_heads, head_dim, inter


@settings(max_examples=5)
@given(llama_shapes())
def test_counts_follow_layers(shape):
    layers, heads, kv_heads, head_dim, inter = shape
    model = make_tiny_llama(layers=layers, hidden=heads * head_dim, heads=heads, kv_heads=kv_heads, inter=inter,
                            vocab=64)
    s = analyze(capture_static(model))
    c = s.counts()
    assert c == {"norm_groups": 2 * layers, "final_norm_groups": 1, "pairs": 2 * layers, "pairs_attention": layers,
                 "pairs_gated": layers, "pairs_activation": 0, "pairs_linear": 0, "swiglu": layers,
                 "attention": layers, "rope": layers, "residual_adds": 2 * layers, "unclassified": 0}, s.render()
    for att in s.attentions:
        assert (att.num_heads, att.num_kv_heads, att.head_dim) == (heads, kv_heads, head_dim)
    for p in s.pairs:
        if p.kind == "attention":
            assert (p.n_rep, p.head_dim) == (heads // kv_heads, head_dim)


# ---- the real models -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_structure(smollm2) -> tuple[fxquant.CapturedGraph, Structure]:
    cg = fxquant.capture(smollm2.model)
    return cg, analyze(cg)


@pytest.mark.slow
def test_smollm2_exact_counts(smollm2_structure):
    cg, s = smollm2_structure
    assert s.counts() == {"norm_groups": 60, "final_norm_groups": 1, "pairs": 60, "pairs_attention": 30,
                          "pairs_gated": 30, "pairs_activation": 0, "pairs_linear": 0, "swiglu": 30,
                          "attention": 30, "rope": 30, "residual_adds": 60, "unclassified": 0}
    sizes = sorted(len(g.consumers) for g in s.norm_groups if not g.final)
    assert sizes == [2] * 30 + [3] * 30 and all(g.exclusive for g in s.norm_groups)
    (final,) = [g for g in s.norm_groups if g.final]
    assert final.consumers == ["lm_head.weight"] and final.weight == "model.norm.weight"
    assert {(a.num_heads, a.num_kv_heads, a.head_dim, a.n_rep) for a in s.attentions} == {(9, 3, 64, 3)}
    assert {(p.n_rep, p.head_dim) for p in s.pairs if p.kind == "attention"} == {(3, 64)}
    assert {r.targets == ["q", "k"] for r in s.ropes} == {True}
    assert sorted(r.layer for r in s.residuals) == sorted(list(range(30)) * 2)
    # every pair is within one layer, and every linear got a role
    assert all(p.producer.split(".")[2] == p.consumer.split(".")[2] for p in s.pairs)
    linears = cg.gm.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)
    assert len(linears) == 30 * 7 + 1
    roles = {n.meta["fxquant"]["structure"].get("role") for n in linears}
    assert roles == {"q", "k", "v", "o", "gate", "up", "down", "head"}


@pytest.fixture(scope="module")
def minilm_structure(minilm) -> tuple[fxquant.CapturedGraph, Structure]:
    cg = fxquant.capture(minilm.model)
    return cg, analyze(cg)


@pytest.mark.slow
def test_minilm_layernorm_groups_and_no_gelu_pair(minilm_structure):
    _, s = minilm_structure
    c = s.counts()
    assert (c["attention"], c["pairs_attention"], c["residual_adds"]) == (6, 6, 12)
    assert c["pairs"] == 6 and c["swiglu"] == 0 and c["rope"] == 0
    groups = [g for g in s.norm_groups if not g.final]
    assert all(g.kind == "layernorm" and g.bias for g in groups)
    qkv = [g for g in groups if len(g.consumers) == 3]
    ffn = [g for g in groups if len(g.consumers) == 1]
    assert len(qkv) == 6 and len(ffn) == 6
    by_core = {(a.q, a.k, a.v) for a in s.attentions}
    assert {tuple(g.consumers) for g in qkv} == by_core
    assert all(g.weight.endswith("attention.output.LayerNorm.weight")
               and g.consumers[0].endswith("intermediate.dense.weight") for g in ffn)
    # GELU between intermediate.dense and output.dense: never a pair, and the reason is recorded
    assert not any("intermediate" in p.producer for p in s.pairs)
    gelu_blocks = [r for r in s.rejected_pairs if r.producer.endswith("intermediate.dense.weight")]
    assert len(gelu_blocks) == 6 and all("gelu" in r.reason for r in gelu_blocks)
    assert sorted(u.fqn for u in s.unclassified) == [f"encoder.layer.{i}.output.dense.weight" for i in range(6)]
    # v -> attention.output.dense is linear (sdpa's value input) and pairs
    assert all(p.producer.endswith("value.weight") and p.consumer.endswith("attention.output.dense.weight")
               for p in s.pairs)
