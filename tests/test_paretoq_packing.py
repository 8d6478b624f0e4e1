"""ParetoQ packed formats: pack/unpack round trips for every width (odd sizes), fake-quant == packed dequant bit for
bit, sizes, the registry and the reference custom ops."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxquant.backends import lowbit, registry
from fxquant.paretoq import ParetoQSpec, ParetoQWeight, init_alpha, paretoq_fake_quant, quantize_paretoq
from fxquant.quant import QuantSpec

ALL_BITS = (1, 1.58, 2, 3, 4)


@given(bits=st.sampled_from(ALL_BITS), rows=st.integers(1, 9), cols=st.integers(1, 67), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, rows, cols, seed):
    n_codes = ParetoQSpec(bits).levels.n_codes
    codes = torch.randint(0, n_codes, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    planes = lowbit.pack_codes(bits, codes)
    assert all(p.dtype == torch.uint8 and p.is_contiguous() for p in planes)
    per_byte = {1: [8], 1.58: [5], 2: [4], 3: [4, 8], 4: [2]}[bits]
    assert [p.shape for p in planes] == [(rows, -(-cols // k)) for k in per_byte]
    assert torch.equal(lowbit.unpack_codes(bits, *planes, in_features=cols), codes)


def test_pack_refuses_out_of_range_codes():
    with pytest.raises(ValueError, match="0..2"):
        lowbit.pack_codes(1.58, torch.tensor([[0, 3]], dtype=torch.uint8))


def test_ternary_is_five_per_byte_and_extreme_byte():
    codes = torch.full((1, 5), 2, dtype=torch.uint8)
    (packed,) = lowbit.pack_codes(1.58, codes)
    assert packed.tolist() == [[242]]  # 2·(1+3+9+27+81)


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-2, 1, cols)[torch.randperm(cols, generator=g)]
    w[0, :3] = 0.0
    return w


@pytest.mark.parametrize("group", [None, 8, 7], ids=["perchan", "g8", "g7"])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_fake_quant_equals_packed_dequant_bit_for_bit(bits, group):
    spec = ParetoQSpec(bits, group)
    w = _weight(11, 37, seed=int(bits * 100))
    alpha = init_alpha(w, spec) * 0.7  # some weights beyond the clip
    qw = quantize_paretoq(w, alpha, spec)
    packed = registry.pack(qw)
    assert packed.format == lowbit.FORMAT_NAMES[spec.bits]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        # a model in `dtype` quantizes its own (rounded) weights: convert packs those codes
        fq = paretoq_fake_quant(w.to(dtype), alpha, bits, group or 0)
        deq = registry.pack(quantize_paretoq(w.to(dtype), alpha, spec)).dequantize(dtype)
        assert deq.dtype == dtype and deq.shape == w.shape
        # bitwise, including the sign of zero
        assert torch.equal(fq.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           deq.view(torch.int16 if dtype != torch.float32 else torch.int32))
    # x @ W^T through the registry's custom op (the CPU reference) is F.linear on the fake-quant weight
    x = torch.randn(3, 37)
    bias = torch.randn(11)
    ref = torch.nn.functional.linear(x, paretoq_fake_quant(w, alpha, bits, group or 0), bias)
    assert torch.equal(packed.linear(x, bias), ref)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_packed_bytes(bits):
    w = _weight(64, 576, seed=1)
    qw = quantize_paretoq(w, init_alpha(w, ParetoQSpec(bits)), ParetoQSpec(bits))
    packed = registry.pack(qw)
    assert packed.nbytes == qw.packed_nbytes()
    bits_per_weight = 8 * (packed.nbytes - 4 * 64) / w.numel()
    assert bits_per_weight == pytest.approx({1: 1, 1.58: 1.6, 2: 2, 3: 3, 4: 4}[bits], abs=0.02)
    if bits == 2:  # the target: at most 1/7 of the fp16 bytes, scales included
        assert packed.nbytes <= w.numel() * 2 / 7


def test_registry_selects_by_spec_and_other_formats_refuse():
    for bits, name in lowbit.FORMAT_NAMES.items():
        fmt, _ = registry.select_format(ParetoQSpec(bits))
        assert fmt is not None and fmt.name == name and fmt.qualname == f"fxquant::linear_{name}"
    # integer specs never land in a ParetoQ format, and ParetoQ specs never in an integer one
    assert registry.select_format(QuantSpec(4))[0].name == "int4"
    assert registry.get_format("int4").supports(ParetoQSpec(4)) is not None
    with pytest.raises(ValueError, match="cannot hold"):
        registry.pack(quantize_paretoq(torch.randn(2, 8), torch.ones(2, 1), ParetoQSpec(2)), "pq_w4")


def test_weight_object_validates():
    with pytest.raises(Exception, match="0..2"):
        ParetoQWeight(torch.full((2, 3), 3, dtype=torch.uint8), torch.ones(2, 1), ParetoQSpec(1.58), 3)
    with pytest.raises(Exception, match="float32"):
        ParetoQWeight(torch.zeros((2, 3), dtype=torch.uint8), torch.ones(2, 2), ParetoQSpec(2), 3)


def test_custom_op_schema_fake_and_compile():
    spec = ParetoQSpec(3, 16)
    w = _weight(12, 40, seed=5)
    packed = registry.pack(quantize_paretoq(w, init_alpha(w, spec), spec))
    fmt = packed.fmt
    x = torch.randn(2, 40)
    torch.library.opcheck(fmt.op, (x, *packed.args(None)), test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda t: packed.linear(t), backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), packed.linear(x))
