"""The 4+2 split: plane layout, round trip, and the ``split_fp6_weights`` pass on a tiny random LLaMA."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxquant
from fxquant.errors import QuantSpecError, WeightError
from fxquant.fpformats import (E2M1, E2M3, E3M1, E3M2, FP6_K_ALIGN, FP6PackedWeight, FPQuantSpec, decode, encode,
                               pack_fp6, pack_fp6_planes, quantize_fp, unpack_fp6_planes)
from fxquant.passes.split_fp6_weights import SplitFP6Weights
from tests.conftest import make_tiny_llama


def test_plane_layout_is_the_documented_one():
    # one row, K = 8: codes 0b S E2 E1 E0 M1 M0
    codes = torch.tensor([[0b110101, 0b001010, 0b011111, 0b100000, 0b000001, 0b111111, 0b010000, 0b000000]],
                         dtype=torch.uint8)
    hi2, lo4 = pack_fp6_planes(codes)
    assert hi2.shape == (1, FP6_K_ALIGN // 4) and lo4.shape == (1, FP6_K_ALIGN // 2)
    # lo4 byte j: code 2j in the low nibble, 2j+1 in the high nibble
    assert lo4[0, :4].tolist() == [0b1010_0101, 0b0000_1111, 0b1111_0001, 0b0000_0000]
    # hi2 byte j: code 4j+t's [S E2] at bits 2t+1..2t
    assert hi2[0, :2].tolist() == [(0b11) | (0b00 << 2) | (0b01 << 4) | (0b10 << 6),
                                   (0b00) | (0b11 << 2) | (0b01 << 4) | (0b00 << 6)]
    assert torch.all(hi2[0, 2:] == 0) and torch.all(lo4[0, 4:] == 0)  # zero-code padding
    assert hi2.is_contiguous() and lo4.is_contiguous()


@given(n=st.integers(1, 9), k=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 64, (n, k), dtype=torch.uint8, generator=g)
    hi2, lo4 = pack_fp6_planes(codes)
    k_pad = -(-k // FP6_K_ALIGN) * FP6_K_ALIGN
    assert hi2.shape == (n, k_pad // 4) and lo4.shape == (n, k_pad // 2)
    assert hi2.shape[1] % 16 == 0 and lo4.shape[1] % 16 == 0  # 16-byte aligned rows
    assert torch.equal(unpack_fp6_planes(hi2, lo4, k), codes)


def test_pack_refuses_bad_input():
    with pytest.raises(WeightError, match="6 bits"):
        pack_fp6_planes(torch.tensor([[64]], dtype=torch.uint8))
    with pytest.raises(WeightError, match="2-D uint8"):
        pack_fp6_planes(torch.tensor([1, 2], dtype=torch.uint8))
    hi2, lo4 = pack_fp6_planes(torch.zeros(2, 10, dtype=torch.uint8))
    with pytest.raises(WeightError, match="do not match"):
        unpack_fp6_planes(hi2, lo4[:, :4], 10)


@pytest.mark.parametrize("fmt", [E3M2, E2M3, E3M1, E2M1], ids=str)
@pytest.mark.parametrize("group", [None, 32, 48])
def test_packed_dequant_equals_codec_bit_for_bit(fmt, group):
    torch.manual_seed(0)
    w = torch.randn(5, 100) * torch.logspace(-2, 1, 100)
    q = quantize_fp(w, FPQuantSpec(format=fmt, group_size=group))
    p = pack_fp6(q)
    assert isinstance(p, FP6PackedWeight) and p.shape == (5, 100)
    assert torch.equal(p.codes, q.codes)  # narrower formats ride in the 6-bit container and come back
    assert torch.equal(p.dequantize(), q.dequantize())
    # the container's decode of the shifted code is the element format's value
    assert torch.equal(decode(unpack_fp6_planes(p.hi2, p.lo4, 100), p.container), decode(q.codes, fmt))
    # 6 bits per weight plus the scales
    assert p.hi2.numel() + p.lo4.numel() == 5 * 128 * 6 // 8


def test_pass_on_tiny_llama():
    model = make_tiny_llama()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    cg = fxquant.capture(model)
    ctx = fxquant.PassContext()
    p = SplitFP6Weights(FPQuantSpec(format=E3M2, group_size=48))  # 64 / 48 and 128 / 48: shorter last groups
    records = fxquant.Pipeline([p]).run(cg, ctx, verify=True)
    stats = records[0].stats
    # one layer: q, k, v, o, gate, up, down; lm_head stays float by default
    assert stats["quantized"] == 7 and stats["excluded"] == 1 and stats["skipped"] == 0
    stored = ctx.artifacts["quantized_weights"]
    assert set(stored) == {f"model.layers.0.{m}.weight" for m in
                           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    annotated = [n for n in cg.gm.graph.nodes if "quant" in n.meta.get("fxquant", {})]
    assert len(annotated) == 7
    for node in annotated:
        note = node.meta["fxquant"]["quant"]
        assert note["format"] == "fp6_e3m2" and note["group_size"] == 48 and note["packing"] == "fp6_4+2"
        packed = stored[note["weight"]]
        assert isinstance(packed, FP6PackedWeight) and packed.scale.shape[1] == -(-packed.in_features // 48)
        ph = node.args[1]
        assert torch.equal(cg.tensors[ph.name], packed.dequantize(torch.float32))
    # the parameters themselves are untouched until write_back
    w = model.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(w, stored["model.layers.0.mlp.down_proj.weight"].dequantize())
    out = cg(ids)
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.05  # FP6 on random weights: small but nonzero error
    assert cg.write_back() == 7 and torch.equal(w, stored["model.layers.0.mlp.down_proj.weight"].dequantize())


def test_pass_records_what_it_skips_and_refuses_nan(caplog):
    model = make_tiny_llama()
    # tie lm_head to the embedding: the pass must not quantize the embedding table through it
    model.lm_head.weight = model.model.embed_tokens.weight
    cg = fxquant.capture(model)
    ctx = fxquant.PassContext()
    with caplog.at_level("WARNING", logger="fxquant"):
        records = fxquant.Pipeline([SplitFP6Weights(exclude=())]).run(cg, ctx)
    skipped = ctx.artifacts["split_fp6_skipped"]
    assert records[0].stats["quantized"] == 7 and len(skipped) == 1
    (reason,) = skipped.values()
    assert "untie" in reason and "not quantizing" in caplog.text

    bad = make_tiny_llama()
    with torch.no_grad():
        bad.model.layers[0].mlp.up_proj.weight[3, 4] = float("nan")
    with pytest.raises(WeightError, match="mlp.up_proj.weight"):
        fxquant.Pipeline([SplitFP6Weights()]).run(fxquant.capture(bad), fxquant.PassContext())


def test_pass_formats_and_bad_specs():
    model = make_tiny_llama()
    cg = fxquant.capture(model)
    ctx = fxquant.PassContext()
    fxquant.Pipeline([SplitFP6Weights(FPQuantSpec(format=E2M1))]).run(cg, ctx, verify=True)
    note = next(n.meta["fxquant"]["quant"] for n in cg.gm.graph.nodes if "quant" in n.meta.get("fxquant", {}))
    assert note["format"] == "fp4_e2m1" and note["bits"] == 4
    packed = ctx.artifacts["quantized_weights"][note["weight"]]
    assert int(packed.codes.max()) < 16
    with pytest.raises(QuantSpecError, match="FPQuantSpec"):
        SplitFP6Weights("e3m2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sequences"):
        SplitFP6Weights(exclude="lm_head")  # type: ignore[arg-type]
    assert encode(torch.tensor([28.0])).item() == 31 and SplitFP6Weights(FPQuantSpec(format=E2M3)).spec.label == \
        "fp6_e2m3"


def test_split_then_lower_to_the_fp6_custom_op():
    """The split weights plug into the registry: lower_quantized_linears emits fxquant::linear_fp6, exactly."""
    import fxquant.backends.fp6  # noqa: F401 - registers the fp6 format
    from fxquant.passes.lower_quantized_linears import LowerQuantizedLinears
    model = make_tiny_llama()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    cg = fxquant.capture(model)
    ctx = fxquant.PassContext()
    fxquant.Pipeline([SplitFP6Weights(FPQuantSpec(group_size=32))]).run(cg, ctx, verify=True)
    before = cg(ids)
    records = fxquant.Pipeline([LowerQuantizedLinears()]).run(cg, ctx, verify=True)
    assert records[0].stats["lowered"] == 7 and not ctx.artifacts["lowering_kept"]
    ops = [n for n in cg.gm.graph.nodes if n.op == "call_function" and "linear_fp6" in str(n.target)]
    assert len(ops) == 7
    assert torch.equal(cg(ids), before)  # CPU: the reference op computes the eager model's numbers exactly
