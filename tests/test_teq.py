"""TEQ: the scale plan, the fold (exact in float64), the explicit-node form, training and the recipes.

The equivalence tests randomise every weight with O(1) values (HF's 0.02-std init makes each block's
contribution vanish below float64 rounding, which would make "unchanged" trivially true), add outlier channels,
and check a deliberately broken fold is caught, so they can fail.
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_tiny_llama
from fxquant.capture import capture
from fxquant.errors import PassError
from fxquant.pipeline import PassContext
from fxquant.passes.analyze_structure import AnalyzeStructure
from fxquant.passes.fold_equivalent_scales import (EquivalentScales, FoldEquivalentScales, _gqa_index,
                                                   insert_scale_nodes, plan_scales, random_scales)
from fxquant.passes.train_teq_scales import (TEQConfig, linear_warmup_decay, quantized_loss, train_scales,
                                             weight_quantizer)
from fxquant.quant import QuantSpec
from fxquant.recipes import get_recipe

FEW = max(3, settings().max_examples // 6)


def randomize(model: torch.nn.Module, seed: int, outliers: int = 0, outlier_gain: float = 30.0) -> None:
    """O(1) random weights (so every block matters), norm weights in [0.5, 2], ``outliers`` hot input channels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(0.5 + 1.5 * torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
            else:
                p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) / p.shape[-1] ** 0.5).to(p.dtype))
        if outliers:
            for layer in model.model.layers:
                idx = torch.randperm(layer.input_layernorm.weight.numel(), generator=g)[:outliers]
                layer.input_layernorm.weight[idx] *= outlier_gain
                layer.post_attention_layernorm.weight[idx] *= outlier_gain


@functools.lru_cache(maxsize=None)
def _captured(hidden: int, heads: int, kv_heads: int, inter: int, layers: int):
    """One export per architecture (export is the slow part); examples re-randomise the same parameters."""
    model = make_tiny_llama(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, inter=inter).double()
    cg = capture(model)
    ctx = PassContext()
    AnalyzeStructure().call(cg, ctx)
    return model, cg, ctx.artifacts["structure"], dict(cg.tensors)


def _fresh(arch, seed: int, outliers: int = 0):
    model, cg, structure, tensors = _captured(*arch)
    randomize(model, seed, outliers)
    return model, dataclasses.replace(cg, tensors=dict(tensors)), structure


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


ARCHS = [(32, 4, 4, 64, 1), (32, 4, 2, 48, 1), (64, 4, 1, 96, 2)]  # MHA, GQA n_rep=2, MQA n_rep=4 with 2 layers


@settings(max_examples=FEW, deadline=None)
@given(arch=st.sampled_from(ARCHS), seed=st.integers(0, 2**16), spread=st.floats(0.1, 2.0),
       outliers=st.integers(0, 3))
def test_fold_keeps_the_float_function(arch, seed, spread, outliers):
    model, cg, structure = _fresh(arch, seed, outliers)
    plan = plan_scales(cg, structure)
    layers = arch[-1]
    kinds = sorted(g.kind for g in plan.groups)
    assert kinds == sorted(["norm", "norm", "attention", "gated"] * layers), plan.render()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    before = cg(ids).detach().clone()
    scales = random_scales(plan, spread=spread, generator=torch.Generator().manual_seed(seed))
    ctx = PassContext(verify=True)
    fold = FoldEquivalentScales(scales=EquivalentScales(plan, scales))
    fold.requires(cg, ctx)
    fold.call(cg, ctx)
    fold.ensures(cg, ctx)
    after = cg(ids)
    assert _rel(after, before) <= 1e-5
    # the weights really moved (the fold is not a no-op)
    moved = max(float((cg.tensors[ph] - t).detach().abs().max()) for ph, t in _captured(*arch)[3].items()
                if cg.tensors[ph] is not t)
    assert moved > 1e-3


@functools.lru_cache(maxsize=None)
def _captured_family(family: str):
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from conftest import make_tiny_family
    model = make_tiny_family(family, layers=2).double()
    cg = capture(model)
    ctx = PassContext()
    AnalyzeStructure().call(cg, ctx)
    return cg, ctx.artifacts["structure"], dict(cg.tensors)


@settings(max_examples=FEW, deadline=None)
@given(family=st.sampled_from(["gemma", "gemma2"]), seed=st.integers(0, 2**16), spread=st.floats(0.1, 2.0))
def test_fold_into_an_offset_norm_gain_keeps_the_float_function(family, seed, spread):
    """Gemma's RMSNorm multiplies by ``1 + w``: its norm → qkv and norm → gate/up groups are found (the gain's
    offset recorded), and folding ``1/s`` writes ``w' = (1 + w)/s - 1`` — the function is unchanged."""
    cg0, structure, tensors = _captured_family(family)
    cg = dataclasses.replace(cg0, tensors=dict(tensors))
    norms = [g for g in structure.norm_groups if not g.final]
    assert len(norms) == 4 and all(g.weight_offset == 1.0 for g in norms)
    plan = plan_scales(cg, structure)
    assert sum(g.kind == "norm" for g in plan.groups) == 4, plan.render()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    before = cg(ids).detach().clone()
    scales = random_scales(plan, spread=spread, generator=torch.Generator().manual_seed(seed))
    fold = FoldEquivalentScales(scales=EquivalentScales(plan, scales))
    ctx = PassContext(verify=True)
    fold.requires(cg, ctx)
    fold.call(cg, ctx)
    fold.ensures(cg, ctx)
    assert _rel(cg(ids), before) <= 1e-5
    g = next(g for g in plan.groups if g.kind == "norm")
    ph = next(p for p, f in cg.fqn.items() if f == g.producer)
    torch.testing.assert_close(1 + cg.tensors[ph], (1 + tensors[ph]) / scales[g.name].double())


def test_a_broken_fold_is_caught():
    """Dropping the consumer side of one group must change the function: the equivalence check is not vacuous."""
    model, cg, structure = _fresh(ARCHS[1], 7, 2)
    plan = plan_scales(cg, structure)
    target = next(g for g in plan.groups if g.kind == "attention")
    target.sites = [s for s in target.sites if s.power < 0]
    ctx = PassContext(verify=True)
    fold = FoldEquivalentScales(scales=EquivalentScales(plan, random_scales(plan, generator=torch.Generator().manual_seed(0))))
    fold.call(cg, ctx)
    with pytest.raises(PassError, match="changed the float model"):
        fold.ensures(cg, ctx)


def test_gqa_scale_is_shared_by_the_query_heads_that_read_it():
    # 2 kv heads of width 3, n_rep 2: o_proj input = 4 query heads, heads 0,1 read kv 0 and heads 2,3 read kv 1
    idx = _gqa_index(12, 6, 2, 3)
    assert idx.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]
    kv = torch.arange(6.0).reshape(1, 2, 1, 3)  # [batch, kv_heads, seq, head_dim]
    rep = kv[:, :, None].expand(1, 2, 2, 1, 3).reshape(1, 4, 1, 3)  # HF repeat_kv
    assert rep.reshape(-1).long().tolist() == idx.tolist()
    assert _gqa_index(12, 6, 2, None) is None and _gqa_index(10, 6, 2, 3) is None


def test_explicit_scale_nodes_compute_the_same_function():
    model, cg, structure = _fresh(ARCHS[1], 3, 1)
    plan = plan_scales(cg, structure)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    before = cg(ids).detach().clone()
    # a private graph copy: the cached graph module is shared by other tests
    gm = torch.fx.GraphModule(cg.gm, cg.gm.graph.__deepcopy__())
    cg = dataclasses.replace(cg, gm=gm, fqn=dict(cg.fqn))
    n_nodes = len(gm.graph.nodes)
    inserted = insert_scale_nodes(cg, plan, random_scales(plan, generator=torch.Generator().manual_seed(1)))
    assert inserted == len(plan.groups) + sum(len(g.consumers) for g in plan.groups)
    assert len(gm.graph.nodes) > n_nodes
    assert _rel(cg(ids), before) <= 1e-5


class _MLP(torch.nn.Module):
    def __init__(self, act: torch.nn.Module):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.fc1, self.act, self.fc2 = torch.nn.Linear(16, 32), act, torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.norm(x))))


@pytest.mark.parametrize("act,folds", [(torch.nn.GELU(), False), (torch.nn.ReLU(), True)])
def test_gelu_is_never_folded_across_relu_is(act, folds):
    torch.manual_seed(0)
    model = _MLP(act).double().eval()
    x = torch.randn(3, 16, dtype=torch.float64)
    cg = capture(model, (x,))
    ctx = PassContext()
    AnalyzeStructure().call(cg, ctx)
    plan = plan_scales(cg, ctx.artifacts["structure"], exclude=())
    pair = [g for g in plan.groups if g.producer == "fc1.weight"]
    assert bool(pair) == folds, plan.render()
    assert any(g.kind == "norm" for g in plan.groups)  # the LayerNorm -> fc1 group is there either way
    before = cg(x).clone()
    scales = random_scales(plan, generator=torch.Generator().manual_seed(2))
    FoldEquivalentScales(scales=EquivalentScales(plan, scales)).call(cg, PassContext())
    assert _rel(cg(x), before) <= 1e-5
    if folds:  # the ReLU pair scales fc1's rows and bias and fc2's columns
        assert {s.fqn for s in pair[0].sites} == {"fc1.weight", "fc1.bias", "fc2.weight"}


def test_linear_warmup_then_decay():
    f = linear_warmup_decay(100, 0.05)
    assert [round(f(i), 3) for i in (0, 4, 5, 50, 99)] == [0.2, 1.0, 1.0, 0.526, 0.011]
    assert f(100) == 0.0


# ---- training --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _train_setup(layers: int = 1, seed: int = 11, data_seed: int = 5):
    model = make_tiny_llama(layers=layers, hidden=64, heads=4, kv_heads=2, inter=128)
    randomize(model, seed, outliers=2, outlier_gain=10.0)
    cg = capture(model)
    ctx = PassContext()
    AnalyzeStructure().call(cg, ctx)
    plan = plan_scales(cg, ctx.artifacts["structure"])
    ids = torch.randint(0, 128, (4000,), generator=torch.Generator().manual_seed(data_seed))
    return cg, plan, ids


def _train(seed: int = 0, steps: int = 30, distill: float = 1.0):
    cg, plan, ids = _train_setup()
    cfg = TEQConfig(steps=steps, lr=1e-2, seq_len=32, batch_size=2, seed=seed, distill=distill, progress=False,
                    init="ones")   # the training itself, from the paper's identity start
    return train_scales(cg, plan, weight_quantizer(QuantSpec(bits=3, group_size=32)), ids, cfg)


def test_training_moves_the_scales_and_lowers_the_loss():
    cg, plan, ids = _train_setup()
    record = _train()
    assert record.moved() > 1e-2, "scales stayed at their init: TEQ did not train"
    assert all(bool((s >= 1e-5).all()) for s in record.scales.values())
    batch = ids[:8 * 32].reshape(8, 32)
    q = weight_quantizer(QuantSpec(bits=3, group_size=32))
    untrained = quantized_loss(cg, plan, q, plan.init_scales(), batch, distill=1.0)
    trained = quantized_loss(cg, plan, q, record.scales, batch, distill=1.0)
    assert trained < 0.9 * untrained, (untrained, trained)


def test_same_seed_same_scales():
    a, b, c = _train(seed=3, steps=6), _train(seed=3, steps=6), _train(seed=4, steps=6)
    assert all(torch.equal(a.scales[k], b.scales[k]) for k in a.scales)
    assert a.losses == b.losses
    assert any(not torch.equal(a.scales[k], c.scales[k]) for k in a.scales)


def test_nan_loss_stops_with_the_step():
    cg, plan, ids = _train_setup()
    ph = next(p for p, f in cg.fqn.items() if f == "model.layers.0.input_layernorm.weight")
    bad = dataclasses.replace(cg, tensors={**cg.tensors, ph: torch.full_like(cg.tensors[ph], float("inf"))})
    cfg = TEQConfig(steps=3, seq_len=16, batch_size=1, progress=False)
    from fxquant.errors import TrainingError
    with pytest.raises(TrainingError, match=r"TEQ: the loss became (nan|inf) at step 1"):
        train_scales(bad, plan, weight_quantizer(QuantSpec(bits=4)), ids, cfg)


# ---- recipes end to end ----------------------------------------------------------------------------------
def test_recipes_are_registered_and_chain_into_quantization():
    for name in ("teq-w4g128", "teq-w4", "teq-w3g128", "teq-w2g64", "teq-fp6"):
        r = get_recipe(name)
        assert r.method == "teq" and not r.data_free and r.options["steps"] == 1000
        last = ["round_weights_gptq", "split_fp6_weights"] if name == "teq-fp6" else ["quantize_weights_rtn"]
        assert r.pipeline().names == ["analyze_structure", "train_teq_scales", "fold_equivalent_scales",
                                      "search_weight_clipping", *last]


@pytest.mark.parametrize("name,bits", [("teq-w3g128", 3), ("teq-w2g64", 2), ("teq-fp6", 6)])
def test_the_configured_width_is_the_width_stored(name, bits):
    """Neural Compressor's convert quantizes at 4 bits whatever is configured; ours stores what was asked."""
    from fxquant.api import quantize
    model = make_tiny_llama(layers=1, hidden=32, heads=4, kv_heads=2, inter=64)
    recipe = get_recipe(name)
    recipe.options.update(steps=2, seq_len=16, batch_size=1, progress=False)
    ids = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(0))
    result = quantize(model, recipe, calibration=ids, verify=True)
    assert [r.name for r in result.records][1:3] == ["train_teq_scales", "fold_equivalent_scales"]
    assert result.artifacts["teq"].plan.groups
    assert len(result.quantized) == 7  # q k v o gate up down; lm_head stays float
    for fqn, qw in result.quantized.items():
        assert qw.spec.bits == bits, fqn
        if bits < 6:
            assert qw.code_range_error() is None
            assert int(qw.codes.max()) <= 2 ** (bits - 1) - 1
        weight = dict(model.named_parameters())[fqn]
        assert torch.equal(weight.detach(), qw.dequantize(weight.dtype))


def test_calibration_inputs_and_their_errors():
    from fxquant.errors import DataError
    from fxquant.passes.train_teq_scales import calibration_ids, calibration_windows

    class Tok:  # the one call TEQ makes on a Hugging Face tokenizer
        def __call__(self, text, return_tensors, add_special_tokens):
            return type("Enc", (), {"input_ids": torch.tensor([[ord(c) for c in text]])})()

    assert calibration_ids(("abc", Tok())).tolist() == [97, 98, 99]
    assert calibration_ids({"text": "ab", "tokenizer": Tok()}).tolist() == [97, 98]
    assert calibration_ids([torch.tensor([1, 2]), [3]]).tolist() == [1, 2, 3]
    with pytest.raises(DataError, match="no tokenizer"):
        calibration_ids("text without a tokenizer")
    with pytest.raises(DataError, match="fewer than one"):
        calibration_windows(torch.arange(10), 16)
    assert calibration_windows(torch.arange(40), 16).shape == (4, 16)  # starts 0, 8, 16, 24
    with pytest.raises(PassError, match="steps"):
        TEQConfig(steps=-1).validate()


def test_held_out_windows_never_overlap_training_windows():
    from fxquant.passes.train_teq_scales import calibration_windows, split_holdout
    windows = calibration_windows(torch.arange(1000), 32)     # token ids = positions
    train, held = split_holdout(windows, 4)
    assert held.shape[0] == 4 and train.shape[0] + 2 * 4 == windows.shape[0]
    assert not set(train.flatten().tolist()) & set(held.flatten().tolist())
    assert len(set(held.flatten().tolist())) == held.numel()      # the held-out windows do not overlap each other
    assert split_holdout(windows, 0)[1] is None and split_holdout(windows[:7], 4)[1] is None  # < 8 windows: none


def test_a_harmful_run_keeps_the_initial_scales(caplog):
    """A learning rate far too high makes the held-out loss rise: TEQ warns and keeps the init (RTN's quality), and
    records both losses; with holdout 0 nothing is checked."""
    cg, plan, ids = _train_setup()
    q = weight_quantizer(QuantSpec(bits=3, group_size=32))
    cfg = TEQConfig(steps=5, lr=30.0, seq_len=32, batch_size=2, seed=0, distill=1.0, progress=False)
    with caplog.at_level("WARNING", logger="fxquant"):
        record = train_scales(cg, plan, q, ids, cfg)
    assert record.extra["kept"] == "init" and record.moved() == 0.0
    assert record.extra["heldout_loss_trained"] > record.extra["heldout_loss_init"]
    assert "keeping the initial scales" in caplog.text
    unchecked = train_scales(cg, plan, q, ids, dataclasses.replace(cfg, holdout=0))
    assert unchecked.extra["kept"] == "trained" and "heldout_loss_init" not in unchecked.extra
    assert unchecked.moved() > 1.0


def test_a_useful_run_keeps_its_scales():
    record = _train()
    assert record.extra["kept"] == "trained" and record.extra["heldout_windows"] == 8
    assert record.extra["heldout_loss_trained"] <= record.extra["heldout_loss_init"]


@pytest.mark.parametrize("bad", [-1, True, 2.5])
def test_holdout_option_is_validated(bad):
    with pytest.raises(PassError, match="holdout"):
        TEQConfig(holdout=bad).validate()


# ---- the AWQ-style init --------------------------------------------------------------------------------------
@torch.no_grad()
def _group_error(cg, plan, q, scales, x_by_group):
    """Sum over groups of the squared error of the quantized consumer outputs against the float ones."""
    from fxquant.passes.train_teq_scales import quantized_linears
    qlin = quantized_linears(cg, ("lm_head*",))
    base = {fqn: cg.tensors[ph] for ph, fqn in cg.fqn.items() if ph in cg.tensors}
    total = 0.0
    for g in plan.groups:
        x = x_by_group[g.name]
        for site in g.sites:
            if site.power < 0 or site.fqn not in qlin:
                continue
            s = scales[g.name].to(x.dtype)
            divide = torch.ones(x.shape[-1], dtype=x.dtype)
            divide[site.positions] = s[site.index]
            w = q(plan.apply_one(site.fqn, base[site.fqn], {g.name: s}))
            total += float(((x / divide) @ w.t() - x @ base[site.fqn].t()).pow(2).sum())
    return total


def test_awq_init_never_loses_to_the_identity_on_its_own_objective():
    """On a model with hot input channels the searched scales cut each group's quantized-output error (α = 0,
    the identity, is one of the candidates, so no group can be worse), and some groups pick α > 0."""
    from fxquant.passes.train_teq_scales import awq_init, calibration_windows
    cg, plan, ids = _train_setup()
    q = weight_quantizer(QuantSpec(bits=3, group_size=32))
    windows = calibration_windows(ids, 32)[:4]
    scales, chosen = awq_init(cg, plan, q, windows, grid=10)
    assert set(scales) == {g.name for g in plan.groups} and set(chosen) <= set(scales)
    assert any(c["alpha"] > 0 or c["form"] == "duo" for c in chosen.values()), chosen
    assert all(c["gain"] >= 1.0 for c in chosen.values())
    assert all(bool((s > 0).all()) and s.shape == (g.size,) for g, s in zip(plan.groups, scales.values()))
    # the search's activations, read again the same way
    xs: dict[str, list] = {}
    hooks = []
    for g in plan.groups:
        mod = cg.model.get_submodule(g.consumers[0].rsplit(".", 1)[0])
        hooks.append(mod.register_forward_pre_hook(
            lambda m, a, n=g.name: xs.setdefault(n, []).append(a[0].detach().reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for i in range(4):
            cg.model(input_ids=windows[i:i + 1])
    for h in hooks:
        h.remove()
    x_by_group = {k: torch.cat(v) for k, v in xs.items()}
    for g in plan.groups:
        one = {g.name: torch.ones(g.size)}
        mine = {g.name: scales[g.name]}
        sub = dataclasses.replace(plan, groups=[g])
        assert _group_error(cg, sub, q, mine, x_by_group) <= _group_error(cg, sub, q, one, x_by_group) * (1 + 1e-9)
    assert _group_error(cg, plan, q, scales, x_by_group) < 0.95 * _group_error(cg, plan, q, plan.init_scales(),
                                                                               x_by_group)


def test_awq_init_with_zero_steps_is_awq_alone_and_training_starts_from_it():
    cg, plan, ids = _train_setup()
    q = weight_quantizer(QuantSpec(bits=3, group_size=32))
    cfg = TEQConfig(steps=0, seq_len=32, batch_size=2, init="awq", init_grid=10, progress=False)
    record = train_scales(cg, plan, q, ids, cfg)
    assert record.losses == [] and record.moved() == 0.0
    assert any(not torch.equal(s, torch.ones_like(s)) for s in record.scales.values()), "awq init left s = 1"
    assert record.extra["kept"] in ("init", "trained") and "awq" in record.extra
    assert record.extra["heldout_loss_init"] <= record.extra["heldout_loss_ones"]
    trained = train_scales(cg, plan, q, ids, dataclasses.replace(cfg, steps=5, lr=1e-2))
    assert all(torch.equal(trained.init[k], record.scales[k]) for k in record.scales)  # the same search, then Adam
    assert trained.moved() > 0


def test_an_init_worse_than_the_identity_is_dropped(caplog):
    """A (user-given) init far from 1 that training cannot repair in one tiny step: the held-out check keeps s = 1."""
    cg, plan, ids = _train_setup()
    q = weight_quantizer(QuantSpec(bits=3, group_size=32))
    g = torch.Generator().manual_seed(0)
    bad = {grp.name: torch.exp(3 * torch.randn(grp.size, generator=g)) for grp in plan.groups}
    cfg = TEQConfig(steps=1, lr=1e-6, seq_len=32, batch_size=2, progress=False)
    with caplog.at_level("WARNING", logger="fxquant"):
        record = train_scales(cg, plan, q, ids, cfg, init=bad)
    assert record.extra["kept"] == "ones", record.extra
    assert all(torch.equal(s, torch.ones_like(s)) for s in record.scales.values())
    assert "keeping the identity" in caplog.text


@pytest.mark.parametrize("bad", [{"init": "smooth"}, {"init_grid": 0}, {"init_windows": True}])
def test_init_options_are_validated(bad):
    with pytest.raises(PassError, match="init"):
        TEQConfig(**bad).validate()


def test_periodic_held_out_checks_keep_the_best_scales(tmp_path, monkeypatch):
    """``check_every``: the held-out loss is measured every N steps and the best scales seen are what TEQ returns
    when they beat both the end of training and the init (rigged losses pick step 4 of 8; the checkpoint of step
    4 holds the scales it must return)."""
    import fxquant.passes.train_teq_scales as teq
    from fxquant.train_state import load_train_state
    cg, plan, ids = _train_setup()
    q = weight_quantizer(QuantSpec(bits=3, group_size=32))
    cfg = TEQConfig(steps=8, lr=1e-2, seq_len=32, batch_size=2, seed=0, progress=False, init="ones",
                    check_every=2, save_every=2, checkpoint_dir=str(tmp_path / "ck"))
    # calls: the checks at steps 2, 4, 6 (none at 8, the end), then the init's and the trained scales' losses
    script = iter([5.0, 1.0, 3.0, 4.0, 2.0])
    monkeypatch.setattr(teq, "_heldout_loss", lambda *a, **k: next(script))
    record = train_scales(cg, plan, q, ids, cfg)
    assert record.extra["heldout_checks"] == [[2, 5.0], [4, 1.0], [6, 3.0]]
    assert record.extra["kept_step"] == 4 and record.extra["heldout_loss_kept"] == 1.0
    assert record.extra["heldout_loss_trained"] == 2.0 and record.extra["kept"] == "trained"
    at4 = load_train_state(tmp_path / "ck" / "step-000004", kind="teq").tensors
    at8 = load_train_state(tmp_path / "ck" / "step-000008", kind="teq").tensors
    for name, s in record.scales.items():
        assert torch.equal(s, at4[f"scale.{name}"]) and torch.equal(at8[f"best.{name}"], s)
    assert any(not torch.equal(s, at8[f"scale.{n}"]) for n, s in record.scales.items()), "step 4 != the end"

    # the end of training beats every check: the trained scales are kept, no kept_step
    script = iter([5.0, 1.0, 3.0, 4.0, 0.5])
    end = train_scales(cg, plan, q, ids, dataclasses.replace(cfg, checkpoint_dir=None, save_every=0))
    assert "kept_step" not in end.extra and end.extra["kept"] == "trained"
    for name, s in end.scales.items():
        assert torch.equal(s, at8[f"scale.{name}"])
    # a check better than the end but worse than the init: the init is kept
    script = iter([5.0, 4.5, 6.0, 4.0, 4.2])
    worse = train_scales(cg, plan, q, ids, dataclasses.replace(cfg, checkpoint_dir=None, save_every=0))
    assert worse.extra["kept"] == "init" and worse.moved() == 0.0
    # 0: the held-out loss is measured at the end only
    monkeypatch.undo()
    plain = train_scales(cg, plan, q, ids, dataclasses.replace(cfg, check_every=0, checkpoint_dir=None, save_every=0))
    assert "heldout_checks" not in plain.extra
    for bad in (-1, 1.5, True):
        with pytest.raises(PassError, match="check_every"):
            TEQConfig(check_every=bad).validate()


# ---- the block objective (objective: block) --------------------------------------------------------------------
def _range_reference(w: torch.Tensor, spec) -> torch.Tensor:
    """Fake quantization written with a differentiable range: ``scale(w) · R(w / scale(w))``, ``scale = amax / top``
    per row (group) from autograd's own ``amax``, only the rounding ``R`` straight-through."""
    from fxquant.fpformats import FPQuantSpec, round_to_format
    group = spec.group_size
    cols = w.shape[1]
    size = group if group is not None and group < cols else cols
    pad = -cols % size
    wp = torch.nn.functional.pad(w, (0, pad)).view(w.shape[0], -1, size)
    amax = wp.abs().amax(dim=2, keepdim=True)
    if isinstance(spec, FPQuantSpec):
        scale = torch.where(amax > 0, amax / spec.format.max_value, torch.ones_like(amax))
        x = wp / scale
        r = round_to_format(x.detach(), spec.format)
    else:
        top = 2 ** (spec.bits - 1) - 1
        scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
        x = wp / scale
        r = torch.round(x.detach()).clamp(-top, top)
    out = scale * (x + (r - x).detach())
    return out.reshape(w.shape[0], -1)[:, :cols]


@settings(max_examples=FEW * 2, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 70), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["e3m2", "e2m3", "int4", "int3"]), group=st.sampled_from([None, 8, 32]),
       outlier=st.floats(1.0, 100.0), zero_row=st.booleans())
def test_range_aware_quantizer_value_and_gradient(rows, cols, seed, kind, group, outlier, zero_row):
    """The block objective's quantizer: the recipe's fake-quant value bit for bit, and the gradient of a quantizer
    whose range is differentiable (checked against autograd on that formula), outliers and zero rows included."""
    from fxquant.fpformats import FPQuantSpec
    from fxquant.passes.train_teq_scales import range_aware_quantizer
    spec = FPQuantSpec(format=kind, group_size=group) if kind.startswith("e") else \
        QuantSpec(bits=int(kind[3:]), symmetric=True, group_size=group)
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(rows, cols, generator=g)
    w0[:, int(torch.randint(0, cols, (1,), generator=g))] *= outlier
    if zero_row:
        w0[0] = 0.0
    up = torch.randn(rows, cols, generator=g)
    fq = range_aware_quantizer(weight_quantizer(spec), spec)
    w = w0.clone().requires_grad_(True)
    out = fq(w)
    assert torch.equal(out.detach(), weight_quantizer(spec)(w0)), "the value is not the recipe's fake quant"
    (out * up).sum().backward()
    ref_w = w0.clone().requires_grad_(True)
    ref = _range_reference(ref_w, spec)
    torch.testing.assert_close(ref.detach(), out.detach(), rtol=0, atol=1e-6 * float(w0.abs().max()))
    (ref * up).sum().backward()
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-4, atol=1e-5)
    plain = w0.clone().requires_grad_(True)
    (weight_quantizer(spec)(plain) * up).sum().backward()
    if not torch.equal(out.detach(), w0):   # some rounding error: the range's gradient is not zero
        assert not torch.equal(w.grad, plain.grad), "no range gradient: the quantizer is plain straight-through"


def test_range_aware_quantizer_leaves_asymmetric_integers_alone():
    from fxquant.passes.train_teq_scales import range_aware_quantizer
    spec = QuantSpec(bits=4, symmetric=False, group_size=32)
    q = weight_quantizer(spec)
    assert range_aware_quantizer(q, spec) is q


def _block_setup():
    return _train_setup(layers=2, seed=13, data_seed=7)   # two layers: the second trains on the first's output


def _block_train(**kw):
    cg, plan, ids = _block_setup()
    spec = QuantSpec(bits=3, group_size=32)
    opts = dict(steps=0, seq_len=32, init="ones", objective="block", block_samples=8, block_epochs=4, block_lr=2e-2,
                progress=False, holdout=0)
    cfg = TEQConfig(**{**opts, **kw})
    return train_scales(cg, plan, weight_quantizer(spec), ids, cfg, spec=spec)


@torch.no_grad()
def _logit_error(cg, plan, scales, batch) -> float:
    """Mean squared error of the quantized model's logits (scales folded, W3 g32 fake quant) against the float's."""
    from fxquant.calibration import model_logits as _logits
    from fxquant.passes.train_teq_scales import _quantized_params
    q = weight_quantizer(QuantSpec(bits=3, group_size=32))
    params = _quantized_params(cg, plan, q, scales, ("lm_head*",))
    return float(torch.nn.functional.mse_loss(_logits(cg.model, params, batch), _logits(cg.model, {}, batch)))


def test_block_objective_trains_each_layer_and_lowers_the_model_output_error():
    """Layer by layer: every layer ends at or below its init on its own objective, at least one improves, the
    scales move (RoPE pairs stay tied, scales stay positive), and — a check outside the block objective — the
    whole quantized model's logits are closer to the float model's on text it never trained on."""
    cg, plan, ids = _block_setup()
    record = _block_train()
    blocks = record.extra["block_mse"]
    assert [b["layer"] for b in blocks] == [0, 1]
    assert all(b["trained"] <= b["init"] and len(b["epochs"]) == 4 for b in blocks)
    assert any(b["best"] != "init" and b["trained"] < 0.95 * b["init"] for b in blocks), blocks
    assert record.moved() > 1e-2 and record.extra["kept"] == "trained" and len(record.losses) == 2 * 4
    for g in plan.groups:
        s = record.scales[g.name]
        assert bool((s > 0).all())
        if g.tie_half:
            halves = s.view(-1, 2, g.tie_half)
            assert torch.equal(halves[:, 0], halves[:, 1])
    unseen = ids[-8 * 32:].reshape(8, 32)
    assert _logit_error(cg, plan, record.scales, unseen) < 0.9 * _logit_error(cg, plan, plan.init_scales(), unseen)


def test_block_objective_is_deterministic_and_zero_epochs_keep_the_init():
    a, b, c = _block_train(seed=1, block_epochs=2), _block_train(seed=1, block_epochs=2), _block_train(seed=2,
                                                                                                    block_epochs=2)
    assert all(torch.equal(a.scales[k], b.scales[k]) for k in a.scales) and a.losses == b.losses
    assert any(not torch.equal(a.scales[k], c.scales[k]) for k in a.scales)
    none = _block_train(block_epochs=0)
    assert none.moved() == 0.0 and none.losses == [] and all(r["best"] == "init" for r in none.extra["block_mse"])


def test_block_objective_goes_through_the_held_out_guard():
    """The guard judges the block-trained scales like any others: kept exactly when their held-out loss is not
    above the init's, else the init comes back (the same verdict as objective: model)."""
    record = _block_train(holdout=8)
    assert record.extra["heldout_windows"] == 8
    before, after = record.extra["heldout_loss_init"], record.extra["heldout_loss_trained"]
    if after <= before:
        assert record.extra["kept"] == "trained" and record.moved() > 1e-3   # the trained scales, not the init
    else:
        assert record.extra["kept"] == "init" and record.moved() == 0.0


def test_block_error_measures():
    """``mse`` is the plain mean over elements; ``relative`` weighs every token by its own norm, so a massive token
    (x1000) counts once, not a million times."""
    from fxquant.passes.train_teq_scales import block_error
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    target[0, 0] *= 1000.0
    out = target * 1.1                               # every token 10 % off
    assert float(block_error(out, target)) == pytest.approx(float(((out - target) ** 2).mean()))
    assert float(block_error(out, target, "relative")) == pytest.approx(0.01)
    out2 = out.clone()
    out2[0, 0] = target[0, 0]                        # the massive token exact: mse collapses, relative barely moves
    assert float(block_error(out2, target)) < 1e-3 * float(block_error(out, target))
    assert float(block_error(out2, target, "relative")) == pytest.approx(0.01 * 9 / 10)


@pytest.mark.parametrize("bad, match", [({"objective": "layer"}, "objective"), ({"block_loss": "l1"}, "block_loss"), ({"block_lr": 0.0}, "block_lr"),
                                        ({"block_epochs": -1}, "block_epochs"), ({"block_samples": 0}, "block_samples"),
                                        ({"objective": "block", "checkpoint_dir": "x"}, "checkpoint")])
def test_block_options_are_validated(bad, match):
    with pytest.raises(PassError, match=match):
        TEQConfig(**bad).validate()


def test_block_objective_is_a_recipe_option():
    from fxquant.errors import RecipeError
    recipe = get_recipe("teq-fp6")
    recipe.options.update(objective="block", block_epochs=2)
    recipe.validate()
    recipe.options.update(objective="blocks")
    with pytest.raises(RecipeError, match="objective"):
        recipe.validate()
