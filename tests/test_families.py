"""The recipes on Hugging Face families other than LLaMA (every other test file uses LLaMA): Qwen2 (q/k/v biases),
Qwen3 (q/k norms), Mistral, Phi-3 (fused qkv and gate_up projections), Gemma (norm gain ``1 + w``, scaled embeddings,
GeGLU), Gemma-2 (eager attention with tanh soft-caps, four norms per layer, sliding-window layers), GPT-NeoX (parallel
attention + MLP, partial rotary), Falcon (``x @ W.T`` linears, multi-query attention, one norm for attention and
MLP), OPT (ReLU, LayerNorm, learned positions) and GPT-2 (Conv1D weights read as ``[in, out]`` by ``addmm``, GELU;
ParetoQ quantizes them as their ``[out, in]`` transpose). Each method family quantizes every linear but ``lm_head``,
keeps the float function within its width's error, and the model still generates; the torch.compile backend lowers
every quantized linear to its custom op; and what a method cannot do on a family is refused with a reason."""
from __future__ import annotations

import copy

import pytest
import torch

import fxquant
from fxquant import backend as fxbackend

from conftest import make_tiny_family

FAMILIES = ["qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "neox", "falcon", "opt", "gpt2"]

#: recipe -> (options for a tiny, quick run, the largest relative logit error allowed)
RECIPES = {
    "rtn-w4g128": ({}, 0.30),
    "fp6": ({}, 0.15),
    "gptq-w4g128": ({"seq_len": 32}, 0.30),
    "teq-w4g128": ({"seq_len": 32, "steps": 2}, 0.30),
    "fsbr-w8a8": ({"seq_len": 32, "epochs": 1, "samples": 8}, 0.05),
}

CALIBRATION = torch.randint(0, 128, (1024,), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def models():
    return {f: make_tiny_family(f, layers=2) for f in FAMILIES}


def _linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every linear-like weight but lm_head's, as ``[out, in]`` (GPT-2's Conv1D stores ``[in, out]``)."""
    from transformers.pytorch_utils import Conv1D
    out = {}
    for name, mod in model.named_modules():
        if name.startswith("lm_head"):
            continue
        if isinstance(mod, torch.nn.Linear):
            out[name] = mod.weight.detach()
        elif isinstance(mod, Conv1D):
            out[name] = mod.weight.detach().t()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_recipe_on_family(models, family, recipe):
    options, bound = RECIPES[recipe]
    model = copy.deepcopy(models[family])
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    before = {k: v.clone() for k, v in _linear_weights(model).items()}
    r = fxquant.get_recipe({"base": recipe, "options": options})
    res = fxquant.quantize(model, r, calibration=None if r.data_free else CALIBRATION)
    after = _linear_weights(model)
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert sorted(changed) == sorted(after), f"not quantized: {sorted(set(after) - set(changed))}"
    if recipe.startswith(("rtn-", "gptq-", "teq-")):
        # 4-bit symmetric groups of 128: at most 16 levels in each group of each row
        assert all(int(torch.unique(w[i, j:j + 128]).numel()) <= 16
                   for w in after.values() for i in range(w.shape[0]) for j in range(0, w.shape[1], 128))
    with torch.no_grad():
        got = res.eval_model(ids).logits
    assert _rel(got, ref) < bound
    out = res.eval_model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_family_lowers_every_quantized_linear(models, family):
    model = copy.deepcopy(models[family])
    fxquant.quantize(model, "rtn-w4g128")
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(ids).logits
        torch._dynamo.reset()
        got = torch.compile(model, backend="fxquant", options={"kernels": "always"})(ids).logits
    report = fxbackend.last_reports[-1]
    assert len(report.lowered) == len(_linear_weights(model)) and not report.as_float, report.stats()
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "mistral", "phi3", "gemma2", "neox", "falcon", "opt", "gpt2"])
def test_paretoq_on_family(models, family):
    model = copy.deepcopy(models[family])
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    r = fxquant.get_recipe({"base": "paretoq-w2", "options": {"seq_len": 32, "steps": 2}})
    res = fxquant.quantize(model, r, calibration=CALIBRATION)
    after = _linear_weights(model)
    assert set(res.quantized) >= {f"{k}.weight" for k in after}
    # 2-bit SEQ: four levels per output channel
    assert all(int(torch.unique(w[i]).numel()) <= 4 for w in after.values() for i in range(w.shape[0]))
    assert res.eval_model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_gpt2_conv1d_lowers_on_the_captured_graph(models):
    """``lower_quantized_linears`` on a captured GPT-2: the ``addmm(b, x, W[in, out])`` sites become packed int4
    custom ops over ``Wᵀ``'s codes, computing the same numbers."""
    from fxquant.passes.lower_quantized_linears import LowerQuantizedLinears
    from fxquant.passes.quantize_weights_rtn import QuantizeWeightsRTN
    from fxquant.quant import QuantSpec
    model = copy.deepcopy(models["gpt2"])
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    cg = fxquant.capture(model)
    ctx = fxquant.PassContext()
    fxquant.Pipeline([QuantizeWeightsRTN(QuantSpec(4, group_size=32))]).run(cg, ctx, verify=True)
    before = cg(ids)
    records = fxquant.Pipeline([LowerQuantizedLinears()]).run(cg, ctx, verify=True)
    assert records[0].stats["lowered"] == 8 and not ctx.artifacts["lowering_kept"]
    assert not any(n.target is torch.ops.aten.addmm.default for n in cg.gm.graph.nodes if n.op == "call_function")
    torch.testing.assert_close(cg(ids), before, rtol=1e-5, atol=1e-5)
