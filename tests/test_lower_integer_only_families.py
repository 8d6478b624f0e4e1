"""Integer-only lowering beyond LLaMA: the Hugging Face families whose graphs hold other ops than LLaMA's —
Qwen2 (q/k/v biases), Qwen3 (RMSNorm on q and k), Phi-3 (fused qkv and gate_up projections, ``chunk``, partial
rotary: ``cat`` of a rotated and a pass-through piece), Gemma (norm gain ``1 + w`` computed in the graph,
``type_as``, embeddings scaled by a buffer, tanh-GELU gate), GPT-NeoX (partial rotary, the KV cache's ``cat`` with an
empty tensor), Falcon (``x @ W.T`` as ``matmul``, key/value heads picked by ``index``, an in-place add), OPT (ReLU,
learned positions, biases, tokens flattened to rows before the linears), GPT-2 (Conv1D as ``addmm`` with
``[in, out]`` weights, the tanh-GELU written out) and Gemma-2 (eager attention — ``matmul``, an additive float mask,
``softmax``, ``matmul`` — with ``tanh`` soft-caps on the scores and the logits, sliding-window layers). Each lowers,
passes the verifier and keeps the float function, with a padding token (a zero embedding row) in the batch; and the
scale rules behind them (``cat`` of pieces with their own scales, reshapes that merge per-token dims) are checked on
their own."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.capture import capture
from fxquant.intmodel import IntegerOnlyModel
from fxquant.passes.lower_integer_only import IntegerOnlyConfig, LoweringError, lower_integer_only
from fxquant.verify import verify_integer_only

from conftest import make_tiny_family

#: family -> (config extras, the lowering's counters: (per layer, once))
FAMILIES = {
    "qwen2": ({}, {"di_swiglu": (1, 0), "di_attention": (1, 0), "di_rmsnorm": (2, 1), "di_linear": (7, 1)}),
    "mistral": ({}, {"di_swiglu": (1, 0), "di_attention": (1, 0), "di_rmsnorm": (2, 1), "di_linear": (7, 1)}),
    "phi3": ({"partial_rotary_factor": 0.5}, {"di_swiglu": (1, 0), "di_attention": (1, 0), "cat_scaled": (2, 0),
                                              "di_linear": (4, 1)}),
    "opt": ({}, {"relu": (1, 0), "di_layernorm": (2, 1), "di_attention": (1, 0), "di_linear": (6, 1)}),
    "gpt2": ({}, {"di_gelu": (1, 0), "di_layernorm": (2, 1), "di_attention": (1, 0), "di_linear": (4, 1)}),
    "qwen3": ({}, {"di_rmsnorm": (4, 1), "di_swiglu": (1, 0), "di_attention": (1, 0)}),
    "gemma": ({}, {"di_rmsnorm": (2, 1), "di_gelu": (1, 0), "di_attention": (1, 0), "mul_const": (0, 1)}),
    "neox": ({}, {"di_layernorm": (2, 1), "di_gelu": (1, 0), "di_attention": (1, 0), "cat_scaled": (2, 0)}),
    "falcon": ({}, {"di_layernorm": (1, 1), "di_gelu": (1, 0), "di_attention": (1, 0), "di_linear": (4, 1)}),
    # eager attention: matmul, ·scale, /cap, tanh, ·cap, + additive mask, softmax, matmul; the logits soft-capped
    "gemma2": ({}, {"di_tanh": (1, 1), "di_matmul": (2, 0), "masked_scores": (1, 0), "di_softmax": (1, 0),
                    "di_rmsnorm": (4, 1), "di_gelu": (1, 0), "di_linear": (7, 1)}),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_lowers_to_integers_and_keeps_the_function(family):
    extra, per_layer = FAMILIES[family]
    layers = 2
    model = make_tiny_family(family, layers=layers, **extra)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    pad = model.config.pad_token_id
    if pad is not None:
        ids[1, 5] = pad                               # a zero embedding row in the middle of a sequence
        assert float(model.get_input_embeddings().weight[pad].abs().max()) == 0.0
    with torch.no_grad():
        ref = model(ids).logits
    cg = capture(model)
    stats = lower_integer_only(cg)
    for what, (n, once) in per_layer.items():
        assert stats.get(what, 0) == n * layers + once, (what, stats)
    report = verify_integer_only(cg)
    assert report.ok and report.exits == 1, report.problems
    out = cg(ids)
    err = _rel(out, ref)
    assert float(err.max()) < 0.05, err                # every token, the padding token's too
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.85


@pytest.mark.parametrize("family,layers,counts", [
    ("gpt2", 1, {"di_gelu": 1, "di_linear": 5}),      # Conv1D weights, LayerNorm, the tanh-GELU written out
    ("gemma2", 2, {"di_tanh": 3, "di_softmax": 2}),   # eager attention, soft-caps on the scores and the logits
])
def test_illm_recipe_end_to_end(family, layers, counts):
    """The whole illm-w8a8 recipe (SmoothQuant on FSBR's groups, RTN, lowering) on GPT-2 and Gemma-2: the integer
    model keeps the function, holds the ops it should, and generates (Gemma-2 with its sliding-window cache)."""
    from fxquant import quantize
    from fxquant.recipes import get_recipe
    model = make_tiny_family(family, layers=layers)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    calib = torch.randint(0, 128, (2048,), generator=torch.Generator().manual_seed(2))
    res = quantize(model, get_recipe({"base": "illm-w8a8", "options": {"seq_len": 32}}), calibration=calib)
    for what, n in counts.items():
        assert res.artifacts["integer_only"][what] == n, (what, res.artifacts["integer_only"])
    im = res.integer_model
    assert float(_rel(im(input_ids=ids).logits, ref).max()) < 0.05
    out = im.generate(ids, max_new_tokens=3)
    assert out.shape == (1, 11) and torch.equal(out[:, :8], ids)


class _Heads(torch.nn.Module):
    """embedding -> linear -> [B, S, H, D] -> [B, H, S, D] -> reshape [B*H, S, D] (per-token scales merged with the
    heads dim) -> back -> a second linear; and a cat of two linears' outputs (two scales) along the last dim."""

    def __init__(self, heads: int = 2, d: int = 8, vocab: int = 50):
        super().__init__()
        self.heads, self.d = heads, d
        self.emb = torch.nn.Embedding(vocab, heads * d)
        self.a = torch.nn.Linear(heads * d, heads * d)
        self.b = torch.nn.Linear(heads * d, d)
        self.c = torch.nn.Linear(heads * d, 3)
        self.out = torch.nn.Linear(heads * d + d + 3, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        bsz, s, _ = x.shape
        h = self.a(x).view(bsz, s, self.heads, self.d).transpose(1, 2)
        h = h.reshape(bsz * self.heads, s, self.d)          # merges B (per token) with H (not)
        h = h.reshape(bsz, self.heads, s, self.d).transpose(1, 2).reshape(bsz, s, self.heads * self.d)
        y = torch.cat([h, self.b(x), self.c(x)], dim=-1)     # three values with their own scales
        return self.out(y)


@settings(max_examples=4, deadline=None)
@given(st.integers(0, 1000), st.integers(1, 3), st.integers(1, 9))
def test_reshapes_that_merge_token_dims_and_cats_of_scaled_pieces(seed, batch, seq):
    torch.manual_seed(seed)
    model = _Heads().eval()
    with torch.no_grad():
        model.c.weight.mul_(300.0)                        # pieces whose scales differ by orders of magnitude
    ids = torch.randint(0, 50, (batch, seq), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(ids)
    cg = capture(model, (ids,))
    stats = lower_integer_only(cg)
    assert stats["cat_scaled"] == 1 and stats["di_linear"] == 4
    verify_integer_only(cg, ids)                           # a static capture: shapes from these ids
    assert float(_rel(cg(ids), ref).max()) < 0.03


def test_eager_attention_is_the_same_integer_attention_as_sdpa():
    """LLaMA captured with ``attn_implementation="eager"`` (matmul, + additive mask, softmax, matmul) lowers to the
    same DI-MatMul / DI-ClippedSoftmax / DI-MatMul as its SDPA capture: the integer logits agree to float rounding."""
    outs = {}
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    for impl in ("sdpa", "eager"):
        model = make_tiny_family("llama", layers=2)
        model.config._attn_implementation = impl
        cg = capture(model)
        stats = lower_integer_only(cg)
        assert verify_integer_only(cg).ok
        if impl == "eager":
            assert stats["di_matmul"] == 4 and stats["di_softmax"] == 2 and stats["masked_scores"] == 2
            assert stats["mask_from_additive"] == 1 and "di_attention" not in stats
        outs[impl] = cg(ids)
    torch.testing.assert_close(outs["eager"], outs["sdpa"], rtol=1e-5, atol=1e-5)


def test_an_additive_mask_other_than_0_and_minus_infinity_is_refused():
    """A position bias (ALiBi-like) in the additive mask has no boolean form: refused with what to do; a padded
    causal mask (0 and the dtype's minimum) becomes its boolean form."""
    from fxquant.backends.di_ops import op
    lo = torch.finfo(torch.float32).min
    causal = torch.full((1, 1, 4, 4), lo).triu(1)
    torch.testing.assert_close(op("mask_from_additive")(causal), torch.ones(4, 4, dtype=torch.bool).tril()[None, None])
    alibi = -torch.arange(4.0)[None, None, None, :] + causal
    with pytest.raises(ValueError, match="position bias.*fsbr-w8a8"):
        op("mask_from_additive")(alibi)


class _MaskedAttention(torch.nn.Module):
    """One eager attention head whose additive mask is an input of the model (a placeholder of the graph)."""

    def __init__(self, d: int = 16, vocab: int = 40):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, ids, mask):
        x = self.emb(ids)
        s = torch.matmul(self.q(x), self.k(x).transpose(-1, -2)) * 0.25 + mask
        return self.o(torch.matmul(torch.softmax(s, dim=-1), self.v(x)))


def test_an_additive_mask_given_as_an_input_enters_once_after_the_inputs():
    model = _MaskedAttention().eval()
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.full((7, 7), torch.finfo(torch.float32).min).triu(1)
    with torch.no_grad():
        ref = model(ids, mask)
    cg = capture(model, (ids, mask))
    stats = lower_integer_only(cg)
    assert stats["mask_from_additive"] == 1 and stats["di_softmax"] == 1 and stats["di_matmul"] == 2
    cg.gm.graph.lint()
    kinds = [n.op for n in cg.gm.graph.nodes]
    assert "placeholder" not in kinds[kinds.index("call_function"):]      # the inputs still come first
    assert verify_integer_only(cg, (ids, mask)).ok
    assert float(_rel(cg(ids, mask), ref).max()) < 0.03


#: families whose attention is causal SDPA with positions from an arange: the integer KV cache applies
KV_FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "neox", "falcon", "gpt2"]


@pytest.mark.parametrize("family", KV_FAMILIES)
def test_family_kv_cache_steps_equal_the_whole_sequence(family):
    """A prefill and then one token per step through the integer KV cache gives the logits of the whole sequence
    run at once, bit for bit; and the graph without a cache is causal per token (a prefix's logits do not change
    when tokens follow), which is what makes that possible."""
    extra = FAMILIES.get(family, ({}, {}))[0]
    model = make_tiny_family(family, layers=2, **extra)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    plain = capture(model)
    lower_integer_only(plain)
    full = plain(ids)
    assert torch.equal(plain(ids[:, :5]), full[:, :5])
    cg = capture(model)
    stats = lower_integer_only(cg, IntegerOnlyConfig(kv_cache=True))
    assert stats["kv_cache"] == 2 * 2 and stats.get("positions_shifted") == 1
    verify_integer_only(cg)
    im = IntegerOnlyModel(cg)
    logits, cache = im.step(ids[:, :5])
    steps = [logits]
    for t in range(5, 9):
        logits, cache = im.step(ids[:, t:t + 1], cache)
        steps.append(logits)
    assert torch.equal(torch.cat(steps, 1), full)
    assert int(cache["past_length"]) == 9 and cache["past_k0_q"].shape[-2] == 9
    assert cache["past_k0_q"].dtype == torch.int8 and cache["past_v1_m"].dtype == torch.int64


@pytest.mark.parametrize("family,extra,why", [
    ("opt", {}, "counted from an attention mask"),            # learned positions from cumsum(attention_mask)
    ("gemma2", {}, "eager attention"),
    ("mistral", {"sliding_window": 4}, "not causal"),         # the mask is probed just past the window
    ("bert", {}, "not causal"),
])
def test_family_without_kv_cache_says_why(family, extra, why, caplog):
    model = make_tiny_family(family, layers=1, **extra)
    with pytest.raises(LoweringError, match=why):
        lower_integer_only(capture(model), IntegerOnlyConfig(kv_cache=True))
    cg = capture(model)
    with caplog.at_level("INFO", logger="fxquant"):
        stats = lower_integer_only(cg, IntegerOnlyConfig(kv_cache="auto"))
    assert "kv_cache" not in stats and "kv_cache" not in cg.meta and cg.user_inputs == ["input_ids"]
    assert any("without a KV cache" in r.getMessage() and why in r.getMessage() for r in caplog.records)
    assert cg.meta["integer_only"]["config"]["kv_cache"] is False


def test_a_sliding_window_mask_is_kept_and_applied():
    """Mistral with a 4-token window: the mask is not the causal one, so it stays a mask, and the integer model
    follows the float model beyond the window."""
    model = make_tiny_family("mistral", layers=1, sliding_window=4)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    cg = capture(model)
    stats = lower_integer_only(cg)
    assert "causal_mask" not in stats
    assert float(_rel(cg(ids), ref).max()) < 0.05
    causal = make_tiny_family("mistral", layers=1)             # same weights (seeded), no window
    with torch.no_grad():
        assert float(_rel(causal(ids).logits, ref)[0, -1]) > 0.01   # the window matters at the last token
