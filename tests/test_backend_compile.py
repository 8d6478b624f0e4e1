"""torch.compile(backend="fxquant"): registration, lowering inside the backend, logits, greedy generation, recompiles."""
from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant import backend as fxbackend
from fxquant.quant import QuantSpec, quantize_weight


#: graphs the backend compiles for a 64-token greedy generation (see the test below)
RECOMPILES = 3


def _quantize_eagerly(model: torch.nn.Module, spec: QuantSpec, skip: str = "lm_head") -> int:
    """The eager reference: every linear except ``skip`` holds its RTN-dequantized weight."""
    n = 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and not name.startswith(skip):
                mod.weight.copy_(quantize_weight(mod.weight, spec).dequantize(mod.weight.dtype))
                n += 1
    return n


def test_backend_is_registered_both_ways() -> None:
    from importlib.metadata import entry_points
    from torch._dynamo.backends.registry import lookup_backend
    assert lookup_backend("fxquant") is fxbackend.fxquant_backend
    eps = [ep for ep in entry_points(group="torch_dynamo_backends") if ep.name == "fxquant"]
    assert eps and eps[0].load() is fxbackend.fxquant_backend


def test_bad_options_are_refused() -> None:
    with pytest.raises(fxquant.RecipeError, match="unknown fxquant backend option"):
        fxbackend.BackendOptions({"recipee": "rtn-w4"})
    with pytest.raises(fxquant.RecipeError, match="kernels"):
        fxbackend.BackendOptions({"kernels": "fast"})


@pytest.mark.parametrize("kernels", ["always", "auto"])
def test_tiny_llama_logits_match_eager_quantized(kernels: str) -> None:
    from conftest import make_tiny_llama
    spec = QuantSpec(4, group_size=48)  # 64 input columns: groups of 48 and 16 (a shorter last group)
    eager_q = make_tiny_llama()
    assert _quantize_eagerly(eager_q, spec) == 7
    model = make_tiny_llama()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="fxquant",
                                  options={"recipe": "rtn-w4g48", "kernels": kernels})
    with torch.no_grad():
        got = model(ids).logits
        ref = eager_q(ids).logits
    report = fxbackend.last_reports[-1]
    if kernels == "always":
        assert report.stats()["int4"] == 7 and "lm_head.weight" in report.kept
    else:  # CPU policy: the float linear on exactly dequantized weights
        assert len(report.as_float) == 7 and not report.lowered
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


class _InOutAndInputProducts(torch.nn.Module):
    """A Conv1D-style ``[in, out]`` parameter read by ``mm``, a product of two inputs, and an ``nn.Linear``."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = torch.nn.Parameter(torch.randn(64, 32, generator=g))
        self.lin = torch.nn.Linear(64, 32)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.mm(x, self.w) + torch.mm(x, y)[:, :32] + self.lin(x)


@pytest.mark.parametrize("kernels", ["always", "auto"])
def test_a_recipe_quantizes_parameters_never_the_inputs(kernels: str) -> None:
    """``mm(x, W)`` with ``W`` a parameter is a linear on ``Wᵀ``; ``mm(x, y)`` of two inputs is not, and ``y``
    must reach the product unquantized. Both policies (packed op, float on dequantized weights) agree with an
    eager model whose two weights hold their RTN values."""
    spec = QuantSpec(4, group_size=32)
    model = _InOutAndInputProducts()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 64, generator=g), torch.randn(64, 64, generator=g)
    with torch.no_grad():
        wq = quantize_weight(model.w.t(), spec).dequantize().t()
        lq = quantize_weight(model.lin.weight, spec).dequantize()
        ref = x @ wq + (x @ y)[:, :32] + torch.nn.functional.linear(x, lq, model.lin.bias)
        torch._dynamo.reset()
        got = torch.compile(model, backend="fxquant", options={"recipe": "rtn-w4g32", "kernels": kernels})(x, y)
    report = fxbackend.last_reports[-1]
    names = set(report.lowered) | set(report.as_float) | set(report.kept)
    assert names == {"w", "lin.weight"}, names          # y is neither lowered nor reported as a kept linear
    assert (report.stats()["int4"] == 2) if kernels == "always" else (len(report.as_float) == 2)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_remembered_quantization_is_lowered_without_a_recipe() -> None:
    from conftest import make_tiny_llama
    from fxquant.backends.registry import remember_quantized
    model = make_tiny_llama()
    spec = QuantSpec(8, symmetric=False, group_size=32)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                qw = quantize_weight(mod.weight, spec)
                mod.weight.copy_(qw.dequantize())
                remember_quantized(mod.weight, qw)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        torch._dynamo.reset()
        got = torch.compile(model, backend="fxquant", options={"kernels": "always"})(ids).logits
    assert fxbackend.last_reports[-1].stats()["int8"] == 7
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_recompilations_over_a_64_token_generation() -> None:
    """HF generate with its dynamic KV cache: the same greedy tokens as the eager quantized model, and few graphs.

    Measured with torch 2.13 / transformers 5.23: 3 graphs over 64 tokens (the prefill at a static
    length, then the decode step, recompiled once with a dynamic cache length when the length first changes);
    the cache length growing every token causes no further recompilation.
    """
    from conftest import make_tiny_llama
    eager_q = make_tiny_llama()
    _quantize_eagerly(eager_q, QuantSpec(8))
    model = make_tiny_llama()
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="fxquant", options={"recipe": "rtn-w8"})
    before = fxbackend.stats["graphs"]
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(ids, **kw)
        assert torch.equal(out, eager_q.generate(ids, **kw))
    assert out.shape[1] == 7 + 64
    compiled = fxbackend.stats["graphs"] - before
    print(f"graphs compiled over 64 tokens: {compiled}")
    assert compiled <= RECOMPILES, f"{compiled} graphs compiled over 64 tokens, expected at most {RECOMPILES}"


@pytest.mark.slow
def test_smollm2_rtn_w4g128_compiled_matches_eager(smollm2) -> None:
    import copy
    model = copy.deepcopy(smollm2.model)
    eager_q = copy.deepcopy(smollm2.model)
    _quantize_eagerly(eager_q, QuantSpec(4, group_size=128))
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    torch._dynamo.reset()
    # dynamic=True: one prefill and one decode graph, instead of a third compile when the length first changes
    # (a 30-layer Inductor compile takes minutes on a 2-core CI machine)
    model.forward = torch.compile(model.forward, backend="fxquant", options={"recipe": "rtn-w4g128"}, dynamic=True)
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, eager_q(ids).logits, rtol=1e-3, atol=1e-3)
        assert torch.equal(model.generate(ids, **kw), eager_q.generate(ids, **kw))
