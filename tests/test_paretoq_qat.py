"""ParetoQ QAT end to end on a tiny random LLaMA: prepare -> train (loss drops, scales move) -> checkpoint/resume
(identical) -> convert (packed logits == fake-quant logits, generate works); the FX passes and the recipe."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from fxquant.capture import capture
from fxquant.errors import RecipeError, TrainingError
from fxquant.paretoq import (PackedLinear, ParetoQSpec, QATLinear, convert, init_alpha, paretoq_weights, prepare_qat,
                             qat_modules, scales)
from fxquant.pipeline import PassContext, Pipeline
from fxquant.qat import QATConfig, train_qat

LINEARS_PER_LAYER = 7  # q k v o gate up down


def _ids(n: int = 4096, vocab: int = 128) -> torch.Tensor:
    # a learnable stream: a fixed random sequence of 24 tokens, repeated
    base = torch.randint(0, vocab, (24,), generator=torch.Generator().manual_seed(0))
    return base.repeat(n // 24 + 1)[:n]


CFG = dict(batch_size=2, seq_len=32, lr=2e-3, progress=False, grad_clip=1.0)


def test_prepare_replaces_linears_keeps_lm_head_and_names_scales():
    model = make_tiny_llama(layers=2)
    w_before = model.model.layers[0].self_attn.q_proj.weight
    prepare_qat(model, "paretoq-w2")
    mods = qat_modules(model)
    assert len(mods) == 2 * LINEARS_PER_LAYER and "lm_head" not in mods
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, QATLinear)
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight is w_before  # the same Parameter: optimizers and state dicts keep their keys
    sd = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight_alpha" in sd and "model.layers.0.self_attn.q_proj.weight" in sd
    torch.testing.assert_close(q.weight_alpha.detach(), init_alpha(q.weight, ParetoQSpec(2)))
    with pytest.raises(RecipeError, match="already prepared"):
        prepare_qat(model, "paretoq-w2")
    with pytest.raises(RecipeError, match="not a ParetoQ recipe"):
        prepare_qat(make_tiny_llama(), "rtn-w4")


def test_tied_lm_head_stays_float_even_when_asked():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    prepare_qat(model, ParetoQSpec(4), exclude=())
    assert not isinstance(model.lm_head, QATLinear) and len(qat_modules(model)) == LINEARS_PER_LAYER


def test_train_loss_drops_scales_move_and_resume_is_identical(tmp_path):
    bits = 1.58
    ids = _ids()
    model = make_tiny_llama(seed=1)
    prepare_qat(model, ParetoQSpec(bits))
    start = scales(model)
    hist = train_qat(model, ids, QATConfig(steps=8, save_every=4, **CFG), checkpoint_dir=tmp_path)
    assert len(hist.losses) == 8
    assert sum(hist.losses[-2:]) < sum(hist.losses[:2])
    moved = [k for k in start if not torch.equal(start[k], scales(model)[k])]
    assert len(moved) == len(start)
    assert (tmp_path / "step-000004").is_dir() and (tmp_path / "step-000008").is_dir()

    # a fresh model prepared the same way, resumed from step 4, ends where the uninterrupted run ended
    again = make_tiny_llama(seed=1)
    prepare_qat(again, ParetoQSpec(bits))
    hist2 = train_qat(again, ids, QATConfig(steps=8, **CFG), resume=tmp_path / "step-000004")
    assert hist2.start_step == 4 and hist2.losses == hist.losses[4:]
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_train_qat_without_paretoq_layers_needs_a_width_or_lr():
    model = make_tiny_llama(seed=1)
    no_lr = {k: v for k, v in CFG.items() if k != "lr"}
    with pytest.raises(TrainingError, match="prepare_qat"):
        train_qat(model, _ids(), QATConfig(steps=1, **no_lr))
    # a model quantized some other way (the benchmark's torchao linears) trains once the lr or width is given
    hist = train_qat(model, _ids(), QATConfig(steps=1, **CFG))
    assert len(hist.losses) == 1


def test_convert_packed_logits_equal_fake_quant_and_generate_works():
    ids = _ids()
    model = make_tiny_llama(layers=2, seed=2)
    prepare_qat(model, ParetoQSpec(2, group_size=24))  # groups: 64 = 24 + 24 + 16, 128 = 5 x 24 + 8
    train_qat(model, ids, QATConfig(steps=3, **CFG))
    model.eval()
    x = ids[:20].reshape(2, 10)
    with torch.no_grad():
        fake = model(input_ids=x).logits
    expected_codes = {k: v.codes.clone() for k, v in paretoq_weights(model).items()}
    convert(model)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 2 * LINEARS_PER_LAYER and {m.format for m in packed} == {"pq_w2"}
    with torch.no_grad():
        real = model(input_ids=x).logits
    torch.testing.assert_close(real, fake, rtol=1e-5, atol=1e-5)
    got = paretoq_weights(model)
    assert set(got) == set(expected_codes) and all(torch.equal(got[k].codes, expected_codes[k]) for k in got)
    out = model.generate(x[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)


def test_convert_float_form_remembers_codes():
    model = make_tiny_llama(seed=3)
    prepare_qat(model, "paretoq-w3")
    model.eval()
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        fake = model(input_ids=x).logits
    codes = paretoq_weights(model)
    convert(model, packed=False)
    assert not qat_modules(model) and type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, fake)
    again = paretoq_weights(model)
    assert set(again) == set(codes) and all(torch.equal(again[k].codes, codes[k].codes) for k in codes)


def test_fx_pass_graph_view_equals_eager_fake_quant():
    from fxquant.passes.convert_paretoq import ConvertParetoQ
    from fxquant.passes.insert_paretoq_fake_quant import InsertParetoQFakeQuant, fake_quant_nodes
    from fxquant.paretoq import paretoq_fake_quant

    model = make_tiny_llama(layers=2, seed=4)
    eager = make_tiny_llama(layers=2, seed=4)
    spec = ParetoQSpec(1.58)
    cg = capture(model)
    ctx = PassContext()
    Pipeline([InsertParetoQFakeQuant(spec)]).run(cg, ctx, verify=True)
    nodes = fake_quant_nodes(cg)
    assert len(nodes) == 2 * LINEARS_PER_LAYER
    assert all(n.target is paretoq_fake_quant for n in nodes)
    rec = ctx.artifacts["paretoq_fake_quant"]["model.layers.0.self_attn.q_proj.weight"]
    assert cg.fqn[rec["alpha_placeholder"]] == "model.layers.0.self_attn.q_proj.weight_alpha"
    assert "lm_head.weight" not in ctx.artifacts["paretoq_fake_quant"]
    x = torch.randint(0, 128, (2, 9))
    prepare_qat(eager, spec)
    eager.eval()
    with torch.no_grad():
        want = eager(input_ids=x).logits
        torch.testing.assert_close(cg(x), want, rtol=1e-5, atol=1e-5)
    Pipeline([ConvertParetoQ()]).run(cg, ctx, verify=True)
    assert not fake_quant_nodes(cg)
    with torch.no_grad():
        torch.testing.assert_close(cg(x), want, rtol=1e-5, atol=1e-5)
    annotated = [n for n in cg.gm.graph.nodes if n.meta.get("fxquant", {}).get("quant", {}).get("method") == "paretoq"]
    assert len(annotated) == 2 * LINEARS_PER_LAYER


def test_quantize_api_runs_the_recipe_and_lowers_to_packed_ops():
    from fxquant.api import quantize
    from fxquant.passes.lower_quantized_linears import LowerQuantizedLinears
    from fxquant.recipes import get_recipe

    model = make_tiny_llama(seed=5)
    recipe = get_recipe("paretoq-w2")
    recipe.options.update(steps=3, batch_size=2, seq_len=32)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    result = quantize(model, recipe, calibration=_ids())
    names = [r.name for r in result.records]
    assert names == ["analyze_structure", "insert_fake_quant", "train_qat", "convert_fake_quant"]
    assert result.artifacts["qat_history"].losses and len(result.quantized) == LINEARS_PER_LAYER
    qw = result.quantized["model.layers.0.mlp.down_proj.weight"]
    w = model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(w, qw.dequantize()) and not torch.equal(w, before)
    assert result.weight_bytes < sum(p.numel() * 4 for p in model.parameters())
    # the lowering pass packs the ParetoQ weights into the registry's formats
    x = torch.randint(0, 128, (1, 7))
    want = result.captured(x)
    ctx = PassContext(artifacts=result.artifacts)
    Pipeline([LowerQuantizedLinears()]).run(result.captured, ctx, verify=True)
    assert set(ctx.artifacts["lowering"].values()) == {"pq_w2"}
    torch.testing.assert_close(result.captured(x), want, rtol=1e-5, atol=1e-5)


def test_scale_lr_trains_the_scales_in_their_own_group_and_resumes_only_into_the_same_setting(tmp_path):
    from fxquant.qat import make_optimizer
    ids = _ids()
    # the optimizer: the scales alone in a second group at scale_lr, on the same cosine schedule
    model = prepare_qat(make_tiny_llama(seed=1), ParetoQSpec(1.58))
    opt, sched = make_optimizer(model, 1e-4, steps=4, scale_lr=1e-2)
    alphas = {id(m.weight_alpha) for m in qat_modules(model).values()}
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-2]
    assert {id(p) for p in opt.param_groups[1]["params"]} == alphas
    assert not alphas & {id(p) for p in opt.param_groups[0]["params"]}
    assert len(opt.param_groups[0]["params"]) + len(alphas) == len(list(model.parameters()))
    opt.step()
    sched.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-5, 5e-3])
    with pytest.raises(RecipeError, match="no ParetoQ scales"):
        make_optimizer(make_tiny_llama(seed=1), 1e-4, steps=4, scale_lr=1e-2)

    # at a small shared lr the scales barely move; with their own lr they move ~that lr per step (Adam)
    cfg = {**CFG, "lr": 1e-5}
    moved = {}
    for scale_lr in (None, 1e-2):
        m = prepare_qat(make_tiny_llama(seed=1), ParetoQSpec(1.58))
        start = scales(m)
        train_qat(m, ids, QATConfig(steps=4, scale_lr=scale_lr, **cfg))
        moved[scale_lr] = max(float((scales(m)[k] - start[k]).abs().max()) for k in start)
    assert moved[None] < 1e-4 < 5e-3 < moved[1e-2]

    # resumable with the same scale_lr (bit for bit), refused with another one
    m = prepare_qat(make_tiny_llama(seed=1), ParetoQSpec(1.58))
    train_qat(m, ids, QATConfig(steps=4, save_every=2, scale_lr=1e-2, **cfg), checkpoint_dir=tmp_path)
    again = prepare_qat(make_tiny_llama(seed=1), ParetoQSpec(1.58))
    train_qat(again, ids, QATConfig(steps=4, scale_lr=1e-2, **cfg), resume=tmp_path / "step-000002")
    for (k, a), (_, b) in zip(m.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    other = prepare_qat(make_tiny_llama(seed=1), ParetoQSpec(1.58))
    with pytest.raises(TrainingError):
        train_qat(other, ids, QATConfig(steps=4, **cfg), resume=tmp_path / "step-000002")


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("nan"), float("inf"), True, "1e-2"])
def test_scale_lr_must_be_a_positive_number(bad):
    with pytest.raises(RecipeError, match="scale learning rate"):
        QATConfig(scale_lr=bad)


# ---- GPT-2's Conv1D: weights stored [in, out] ----------------------------------------------------------------------
def _gpt2(seed: int = 0) -> torch.nn.Module:
    from conftest import make_tiny_family
    torch.manual_seed(seed)
    return make_tiny_family("gpt2", layers=2)


def test_conv1d_eager_qat_fx_graph_and_converted_forms_compute_the_same_model():
    """GPT-2's Conv1D (``x @ W + b``, ``W`` stored ``[in, out]``) under ParetoQ: ``prepare_qat`` wraps it with scales
    per output channel of ``Wᵀ``; the FX graph (``t(fake_quant(t(W)))``), the eager QAT model, the packed model and
    the float checkpoint form compute the same logits, and every form gives the same codes."""
    from transformers.pytorch_utils import Conv1D

    from fxquant.passes.convert_paretoq import ConvertParetoQ
    from fxquant.passes.insert_paretoq_fake_quant import InsertParetoQFakeQuant, fake_quant_nodes
    spec = ParetoQSpec(2, group_size=16)
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    eager = _gpt2()
    prepare_qat(eager, spec)
    mods = qat_modules(eager)
    assert len(mods) == 8 and all(m.in_out for m in mods.values())
    c_fc = mods["transformer.h.0.mlp.c_fc"]
    assert (c_fc.out_features, c_fc.in_features) == (96, 64) and tuple(c_fc.weight_alpha.shape) == (96, 4)
    eager.eval()
    with torch.no_grad():
        want = eager(input_ids=x).logits
    codes = paretoq_weights(eager)
    assert codes["transformer.h.0.mlp.c_fc.weight"].codes.shape == (96, 64)
    # the FX passes on a fresh copy, the same initial scales: the graph view of the same fake-quant model
    model = _gpt2()
    cg = capture(model)
    ctx = PassContext()
    Pipeline([InsertParetoQFakeQuant(spec)]).run(cg, ctx, verify=True)
    assert len(fake_quant_nodes(cg)) == 8
    assert ctx.artifacts["paretoq_fake_quant"]["transformer.h.0.attn.c_attn.weight"]["layout"] == "in_out"
    with torch.no_grad():
        torch.testing.assert_close(cg(x), want, rtol=1e-5, atol=1e-5)
    Pipeline([ConvertParetoQ()]).run(cg, ctx, verify=True)
    with torch.no_grad():
        torch.testing.assert_close(cg(x), want, rtol=1e-5, atol=1e-5)
    qw = ctx.artifacts["quantized_weights"]["transformer.h.0.mlp.c_fc.weight"]
    assert torch.equal(qw.codes, codes["transformer.h.0.mlp.c_fc.weight"].codes)
    # packed: PackedLinear over the [out, in] codes computes x @ W + b
    packed_model = _gpt2()
    prepare_qat(packed_model, spec)
    convert(packed_model)
    assert sum(isinstance(m, PackedLinear) for m in packed_model.modules()) == 8
    packed_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(packed_model(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)
    # float form: the Conv1D modules stay (save_pretrained-compatible), holding the dequantized [in, out] weights
    float_model = _gpt2()
    prepare_qat(float_model, spec)
    convert(float_model, packed=False)
    assert isinstance(float_model.transformer.h[0].mlp.c_fc, Conv1D)
    float_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(float_model(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)
    again = paretoq_weights(float_model)
    assert set(again) == set(codes) and all(torch.equal(again[k].codes, codes[k].codes) for k in codes)


def test_conv1d_paretoq_recipe_compiles_to_packed_ops_and_reloads(tmp_path):
    """``paretoq-w2`` on GPT-2 through ``fxquant.quantize`` (insert, train, convert), then ``torch.compile`` with
    the fxquant backend: every Conv1D weight is lowered to the packed 2-bit op from its remembered codes, and the
    compiled model computes what the eager quantized model does; the saved checkpoint reloads bit for bit."""
    import fxquant
    from fxquant import backend as fxbackend
    model = _gpt2(3)
    recipe = fxquant.get_recipe({"base": "paretoq-w2", "options": {"steps": 2, "batch_size": 2, "seq_len": 32}})
    res = fxquant.quantize(model, recipe, calibration=_ids())
    assert len(res.quantized) == 8
    x = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(input_ids=x).logits
        torch._dynamo.reset()
        got = torch.compile(model, backend="fxquant", options={"kernels": "always"})(input_ids=x).logits
    report = fxbackend.last_reports[-1]
    assert report.stats().get("pq_w2") == 8, report.stats()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    res.save(str(tmp_path / "q"))
    loaded = fxquant.load(str(tmp_path / "q"))
    with torch.no_grad():
        assert torch.equal(getattr(loaded, "model", loaded)(input_ids=x).logits, want)
