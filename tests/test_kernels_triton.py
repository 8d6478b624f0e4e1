"""Every weight format: reference == QuantizedWeight.dequantize bit for bit; Triton == reference.

On a CPU-only machine the Triton kernels run under ``TRITON_INTERPRET=1`` (set by conftest), so shapes stay
small; on a CUDA machine the same tests run the compiled kernels. Weights have outlier input channels, ``K`` is
never a multiple of the block, and ``M`` covers the GEMV (1), split-K/skinny (3) and tiled (17) paths.
"""
from __future__ import annotations

import pytest
import torch

from fxquant.backends import registry
from fxquant.quant import QuantSpec, quantize_weight

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (bits, symmetric, group_size, K): per-channel, group-wise with a shorter last group, an odd group width, odd K
SPECS = [
    (4, True, 32, 72),      # 3 groups, the last one 8 wide
    (4, False, 16, 61),     # asymmetric, odd K (a padding nibble), last group 13 wide
    (4, True, None, 40),    # per-channel
    (3, False, 12, 30),     # 3-bit codes in the int4 container, group width 12 (per-column group index)
    (8, True, None, 70),
    (8, False, 32, 90),     # asymmetric int8: codes shifted by -128 in the packed form
    (6, True, 24, 50),      # 6-bit codes in the int8 container
]


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, torch.randperm(k, generator=g)[:3]] *= 25.0  # outlier input channels
    w[1] = 0.0  # an all-zero row: scale 1, codes 0
    return w


def _packed(bits: int, sym: bool, group: int | None, k: int, n: int = 24, seed: int = 0):
    qw = quantize_weight(_weight(n, k, seed), QuantSpec(bits, symmetric=sym, group_size=group))
    packed = registry.pack(qw).to(DEVICE)
    return qw, packed


def _tensors(packed):
    return [packed.tensors[n] for n in packed.fmt.tensor_names]


@pytest.mark.parametrize("bits,sym,group,k", SPECS)
def test_reference_dequantize_is_bit_exact(bits: int, sym: bool, group: int | None, k: int) -> None:
    qw, packed = _packed(bits, sym, group, k)
    assert packed.format == ("int4" if bits <= 4 else "int8")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(packed.to("cpu").dequantize(dtype), qw.dequantize(dtype)), dtype


@pytest.mark.parametrize("bits,sym,group,k", SPECS)
def test_triton_dequantize_is_bit_exact(bits: int, sym: bool, group: int | None, k: int) -> None:
    qw, packed = _packed(bits, sym, group, k)
    dequant = registry.load_callable(packed.fmt.triton_dequant)
    for dtype in (torch.float32, torch.float16):
        got = dequant(*_tensors(packed), dtype=dtype, **packed.attrs).cpu()
        assert torch.equal(got, qw.dequantize(dtype)), dtype


def _check_linear(packed, x: torch.Tensor, bias: torch.Tensor | None, config=None) -> None:
    fmt = packed.fmt
    from fxquant.backends import triton_int
    bits = 4 if fmt.name == "int4" else 8
    got = triton_int.wq_linear(x, *_tensors(packed), bias, bits=bits, config=config, **packed.attrs)
    ref = fmt.reference(x, *_tensors(packed), bias, **packed.attrs)
    assert got.dtype == x.dtype and got.shape == ref.shape
    assert torch.isfinite(got).all()
    rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[x.dtype]
    assert rel < tol, f"relative error {rel:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("bits,sym,group,k", SPECS)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_triton_linear_matches_reference(bits: int, sym: bool, group: int | None, k: int, m: int) -> None:
    _, packed = _packed(bits, sym, group, k, seed=m)
    g = torch.Generator().manual_seed(100 + m)
    dtypes = [torch.float32, torch.float16] if DEVICE.type == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
    for dtype in dtypes:
        x = (torch.randn(m, k, generator=g) * 2).to(dtype).to(DEVICE)
        bias = torch.randn(packed.attrs["out_features"], generator=g).to(dtype).to(DEVICE) if m != 3 else None
        _check_linear(packed, x, bias)


def test_bf16_activations() -> None:
    # bf16 through the GEMV and the tile path (under the interpreter the tile path upcasts the rounded operands)
    _, packed = _packed(4, True, 32, 72)
    for m in (1, 17):
        x = torch.randn(m, 72, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16).to(DEVICE)
        _check_linear(packed, x, None)


@pytest.mark.parametrize("which", ["gemv_splitk", "skinny_splitk", "tiled", "gemv_per_column"])
def test_every_kernel_path(which: str) -> None:
    """Force the configurations the interpreter would not pick: split-K GEMV, split-K skinny, the tiled GEMM, and
    a K slice that straddles groups (per-column group index)."""
    from fxquant.backends import triton_int as ti
    cfg = {"gemv_splitk": ti.GEMV_CONFIGS[6], "skinny_splitk": ti.SKINNY_CONFIGS[1],
           "tiled": ti.TILED_CONFIGS[0], "gemv_per_column": ti.GEMV_CONFIGS[1]}[which]
    m = cfg.kwargs["BLOCK_M"] if cfg.kwargs["BLOCK_M"] == 1 else (5 if which == "skinny_splitk" else 33)
    group = 24 if which == "gemv_per_column" else 128
    _, packed = _packed(4, False, group, 300, n=40)
    x = torch.randn(m, 300, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    _check_linear(packed, x, torch.randn(40).to(DEVICE), config=cfg)
    _check_linear(packed, x.half(), None, config=cfg)


@pytest.mark.parametrize("bits,sym,group,k", [SPECS[1], SPECS[5]])
def test_one_hot_rows_give_the_exact_weights(bits: int, sym: bool, group: int | None, k: int) -> None:
    """x = rows of the identity: every output is one dequantized weight, exactly (GEMV and tile paths)."""
    qw, packed = _packed(bits, sym, group, k)
    expect = qw.dequantize().t()
    from fxquant.backends import triton_int
    for cols in (slice(0, 1), slice(3, 20)):
        x = torch.eye(k)[cols].to(DEVICE)
        got = triton_int.wq_linear(x, *_tensors(packed), None, bits=4 if bits <= 4 else 8, **packed.attrs).cpu()
        assert torch.equal(got, expect[cols])


def test_custom_op_dispatches_and_has_a_fake() -> None:
    _, packed = _packed(4, True, 32, 72)
    x = torch.randn(2, 3, 72).to(DEVICE)
    y = packed.linear(x)
    assert y.shape == (2, 3, 24)
    ref = packed.fmt.reference(x, *_tensors(packed), None, **packed.attrs)
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-5)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = packed.linear(torch.empty(5, 72, device=DEVICE, dtype=torch.float16))
    assert fake.shape == (5, 24) and fake.dtype == torch.float16


# (bits, symmetric, group_size, K) that the decode word GEMV takes: whole 32-bit words per row, whole words per group
WORD_SPECS = [
    (4, True, None, 72), (4, False, None, 136), (4, True, 32, 72), (4, False, 64, 200),
    (8, True, None, 68), (8, False, None, 100), (8, True, 32, 96), (8, False, 16, 80),
]


@pytest.mark.parametrize("bits,sym,group,k", WORD_SPECS)
def test_word_gemv_matches_reference(bits: int, sym: bool, group: int | None, k: int) -> None:
    """The M = 1 word GEMV (codes made floats by bit patterns, not conversions): the default config, a narrow
    word block that loops over K with a partial last step, and split-K; fp32 and fp16 activations, with a bias."""
    from fxquant.backends import triton_int as ti
    _, packed = _packed(bits, sym, group, k, n=40, seed=k)
    assert ti.word_gemv_eligible(packed.tensors["qweight"], bits=bits, in_features=k,
                                 group_size=packed.attrs["group_size"])
    g = torch.Generator().manual_seed(k)
    for cfg in (None, ti._wcfg(4, 8, 1, 1), ti._wcfg(8, 4, 3, 1)):
        for dtype in (torch.float32, torch.float16):
            x = (torch.randn(1, k, generator=g) * 2).to(dtype).to(DEVICE)
            x[0, :3] *= 40.0   # outlier activations
            _check_linear(packed, x, torch.randn(40, generator=g).to(dtype).to(DEVICE), config=cfg)
            assert ti._LAST_LAUNCH["kernel"] is ti._wq_gemv_words_kernel


@pytest.mark.parametrize("bits,sym,group,k", [WORD_SPECS[1], WORD_SPECS[3], WORD_SPECS[5], WORD_SPECS[7]])
def test_word_gemv_one_hot_rows_give_the_exact_weights(bits: int, sym: bool, group: int | None, k: int) -> None:
    """x = one row of the identity through the word GEMV: each output is one dequantized weight, bit for bit (the
    code's float value and the zero-point subtraction are exact, the scale is the single rounding)."""
    from fxquant.backends import triton_int as ti
    qw, packed = _packed(bits, sym, group, k)
    expect = qw.dequantize().t()
    for col in (0, 5, k - 1):
        x = torch.eye(k)[col:col + 1].to(DEVICE)
        got = ti.wq_linear(x, *_tensors(packed), None, bits=bits, **packed.attrs).cpu()
        assert ti._LAST_LAUNCH["kernel"] is ti._wq_gemv_words_kernel
        assert torch.equal(got, expect[col:col + 1])


def test_word_gemv_is_skipped_where_it_cannot_read_words() -> None:
    """Odd K (a half-filled word), groups that split a word, and more than one row take the other paths; forcing a
    word config on such a call is an error, not a silent fallback."""
    from fxquant.backends import triton_int as ti
    for bits, sym, group, k in [(4, False, 16, 61), (4, True, 12, 72), (8, True, None, 70)]:
        _, packed = _packed(bits, sym, group, k)
        eligible = ti.word_gemv_eligible(packed.tensors["qweight"], bits=4 if bits <= 4 else 8, in_features=k,
                                         group_size=packed.attrs["group_size"])
        assert not eligible, (bits, group, k)
    _, packed = _packed(4, True, None, 72)
    x = torch.randn(3, 72).to(DEVICE)
    _check_linear(packed, x, None)
    assert ti._LAST_LAUNCH.get("kernel") is not ti._wq_gemv_words_kernel
    with pytest.raises(ValueError, match="word-GEMV config"):
        ti.wq_linear(x, *_tensors(packed), None, bits=4, config=ti.WORD_GEMV_CONFIGS[0], **packed.attrs)


def test_autotune_choices_are_kept_on_disk(monkeypatch) -> None:
    """Every autotuned kernel asks Triton to cache its timings on disk (so a compiled model does not re-time each
    shape in every process); FXQUANT_AUTOTUNE_CACHE=0 turns that off. The interpreter never caches, so the check
    builds the autotuners as the compiled mode would."""
    import triton
    from fxquant.backends import triton_fp6, triton_int, triton_intops
    if not triton_int._AUTOTUNE_CAN_CACHE:
        pytest.skip("this Triton has no autotune cache_results")
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    tuned = triton_int.autotune(triton_int.GEMV_CONFIGS, key=["N"])(triton_int._wq_linear_kernel)
    assert tuned.cache_results is True
    monkeypatch.setenv("FXQUANT_AUTOTUNE_CACHE", "0")
    assert triton_int.autotune(triton_int.GEMV_CONFIGS, key=["N"])(triton_int._wq_linear_kernel).cache_results is False
    # the module-level autotuners all went through the helper (under the interpreter Triton reports False)
    import inspect
    for mod in (triton_int, triton_fp6, triton_intops):
        assert "triton.autotune(" not in inspect.getsource(mod).replace("return triton.autotune(", ""), mod.__name__
