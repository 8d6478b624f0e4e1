"""Capture: torch.export to an FX graph with a parameter-name map, dynamic batch and sequence length."""
from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant import CaptureError


def test_tiny_llama_graph_matches_eager_on_new_shapes(tiny_llama):
    cg = fxquant.capture(tiny_llama)
    for shape in [(2, 33), (1, 5), (3, 64)]:
        x = torch.randint(0, 128, shape)
        with torch.no_grad():
            assert torch.equal(cg(x), tiny_llama(x).logits), shape


def test_parameter_map_covers_every_parameter(tiny_llama):
    cg = fxquant.capture(tiny_llama)
    params = dict(tiny_llama.named_parameters())
    assert set(params) <= set(cg.fqn.values())
    assert any(v.endswith("rotary_emb.inv_freq") for v in cg.fqn.values())  # buffers are mapped too
    for node in cg.gm.graph.nodes:
        if node.op == "placeholder" and node.name in cg.fqn:
            assert node.meta["fxquant"]["param"] == cg.fqn[node.name]
            if cg.fqn[node.name] in params:
                # the graph's tensors are the model's own parameters, not copies
                assert cg.tensors[node.name] is params[cg.fqn[node.name]]
    assert cg.user_inputs == ["input_ids"]


def test_write_back_puts_rewritten_tensors_into_the_model(tiny_llama):
    cg = fxquant.capture(tiny_llama)
    ph = next(k for k, v in cg.fqn.items() if v.endswith("q_proj.weight"))
    cg.tensors[ph] = torch.zeros_like(cg.tensors[ph])
    assert cg.write_back() == 1
    assert tiny_llama.model.layers[0].self_attn.q_proj.weight.abs().sum() == 0


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        if self.lin(x).sum() > 0:  # Python control flow on a tensor value: not capturable
            return x * 2
        return x


def test_capture_failure_names_model_class_and_construct():
    with pytest.raises(CaptureError) as info:
        fxquant.capture(_DataDependent(), (torch.randn(2, 4),))
    msg = str(info.value)
    assert "_DataDependent" in msg
    assert "if self.lin(x).sum() > 0" in msg
    assert info.value.hint


def test_plain_module_needs_example_inputs():
    with pytest.raises(CaptureError, match="example inputs"):
        fxquant.capture(torch.nn.Linear(4, 4))


def test_plain_module_captures_with_example_inputs():
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)
    cg = fxquant.capture(m, (x,))
    assert set(cg.fqn.values()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert torch.allclose(cg(x), m(x))


@pytest.mark.slow
def test_smollm2_capture_matches_eager(smollm2):
    cg = fxquant.capture(smollm2.model)
    x = smollm2.tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = smollm2.model(x).logits
    assert torch.allclose(cg(x), ref, atol=1e-4, rtol=1e-4)
    assert sum(1 for n in cg.gm.graph.nodes if n.target == torch.ops.aten.linear.default) == 30 * 7 + 1
