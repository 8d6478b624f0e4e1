"""The FP6 kernels: bias-shift rebuild == codec (bit for bit), GEMM == reference, the custom op, AOT compile.

On a CPU machine the Triton kernels run under ``TRITON_INTERPRET=1`` (set by conftest) on small shapes; the
ahead-of-time test compiles them for sm_80 and sm_90 with no GPU present and reads the cubin's resource usage.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fxquant.fpformats import (E2M1, E2M3, E3M1, E3M2, FloatFormat, FPQuantSpec, decode, pack_fp6, quantize_fp,
                               unpack_fp6_planes)

triton = pytest.importorskip("triton")
from fxquant.backends import fp6 as fp6_backend  # noqa: E402
from fxquant.backends import registry  # noqa: E402
from fxquant.backends import triton_fp6 as T  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 1, k)[torch.randperm(k, generator=g)]
    w[0, : min(k, 5)] = 0.0  # exact zeros and (below) values that land on subnormal codes
    return w


def _packed(w: torch.Tensor, fmt: FloatFormat = E3M2, group: int | None = None):
    q = quantize_fp(w, FPQuantSpec(format=fmt, group_size=group))
    return q, pack_fp6(q).to(DEVICE)


def _kw(p) -> dict:
    c = p.container
    return dict(in_features=p.in_features, exp_bits=c.exp_bits, bias=c.bias, group_size=p.group_size)


@pytest.mark.parametrize("fmt", [E3M2, E2M3], ids=str)
def test_bias_shift_rebuilds_every_code_exactly(fmt):
    # a weight whose codes are all 64 codes, twice, in a row of K = 128 (plus a second, shuffled row)
    codes = torch.arange(64, dtype=torch.uint8).repeat(2)
    codes = torch.stack([codes, codes[torch.randperm(128, generator=torch.Generator().manual_seed(1))]])
    from fxquant.fpformats import FPQuantizedWeight
    q = FPQuantizedWeight(codes, torch.ones(2, 1), fmt, None)
    p = pack_fp6(q).to(DEVICE)
    h = T.dequantize(p.hi2, p.lo4, p.scale, raw=True, **_kw(p)).cpu()
    # the FP16 bit pattern is METHODS.md §4's formula, and its value is decode(code) * 2**-(15 - bias)
    x16 = codes.to(torch.int32) << 10
    expect_bits = (x16 & 0x8000) | ((x16 & 0x7C00) >> (5 - fmt.exp_bits))
    assert torch.equal(h.view(torch.int16).to(torch.int32) & 0xFFFF, expect_bits)
    assert torch.equal(h.float() * 2.0 ** (15 - fmt.bias), decode(codes, fmt))
    # subnormal codes (exponent field 0) come out as FP16 subnormals with no special case
    sub = (codes[0] & 0b011100 == 0) & (codes[0] & 0b11 != 0) if fmt is E3M2 else None
    if sub is not None:
        assert torch.all(h[0][sub].abs().float() < 2.0 ** -14) and torch.all(h[0][sub] != 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt,group,k", [(E3M2, None, 100), (E3M2, 32, 200), (E3M2, 48, 100), (E2M3, 64, 130),
                                         (E3M1, None, 70), (E2M1, 16, 64)], ids=str)
def test_kernel_dequantized_weight_is_bit_exact(fmt, group, k, dtype):
    q, p = _packed(_weight(24, k), fmt, group)
    got = T.dequantize(p.hi2, p.lo4, p.scale, dtype=dtype, **_kw(p)).cpu()
    assert torch.equal(got, q.dequantize(dtype))
    # and the reference op's dequantization (the registry's) agrees too
    tensors, attrs = fp6_backend.pack_fp6_tensors(p)
    assert torch.equal(fp6_backend.dequantize_fp6(**tensors, dtype=dtype, **attrs).cpu(), q.dequantize(dtype))


# one forced configuration per kernel path (the autotuner's choice is not under test here)
PATHS = {
    "gemv": T.GEMV_CONFIGS[0],
    "gemv_splitk": T.GEMV_CONFIGS[6],
    "skinny_splitk": T.SKINNY_CONFIGS[0],
    "tiled": T.TILED_CONFIGS[1],
}


# the GEMV paths serve one row, the tile paths more
PATH_ROWS = [(p, m) for p in PATHS for m in (1, 3, 17) if (PATHS[p].kwargs["BLOCK_M"] == 1) == (m == 1)]


@pytest.mark.parametrize("path,m", PATH_ROWS, ids=[f"{p}-m{m}" for p, m in PATH_ROWS])
@pytest.mark.parametrize("group,k", [(None, 100), (64, 200), (48, 100)], ids=["perchan_k100", "g64_k200",
                                                                                  "g48_k100"])
def test_kernel_matches_reference(path, m, group, k):
    cfg = PATHS[path]
    n = 40
    q, p = _packed(_weight(n, k, seed=m), E3M2, group)
    g = torch.Generator().manual_seed(7)
    bias = torch.randn(n, generator=g).to(DEVICE)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
        y = T.fp6_linear(x, p.hi2, p.lo4, p.scale, bias.to(dtype), config=cfg, **_kw(p))
        ref = fp6_backend.linear_fp6_reference(x.float(), p.hi2, p.lo4, p.scale, bias, **{
            **fp6_backend.pack_fp6_tensors(p)[1]})
        assert y.shape == (m, n) and y.dtype == dtype
        err = (y.float() - ref).norm() / ref.norm()
        assert err < tol, f"{path} m={m} group={group} {dtype}: relative error {err:.2e}"


def test_dispatch_by_rows_and_torch_matmul_path():
    assert [T.kernel_path(m) for m in (1, 2, 16, 17, 255, 256, 4096)] == \
        ["gemv", "skinny", "skinny", "tiled", "tiled", "torch", "torch"]
    q, p = _packed(_weight(24, 100), E3M2, 32)
    x = torch.randn(2, 5, 100).to(DEVICE)  # leading dims are kept
    y = T.fp6_linear(x, p.hi2, p.lo4, p.scale, None, torch_matmul_min_m=4, **_kw(p))
    assert y.shape == (2, 5, 24)
    # the exact weight, then F.linear on the same device (cuBLAS and the CPU sum in different orders)
    assert torch.equal(y, torch.nn.functional.linear(x, q.dequantize().to(DEVICE)))
    y1 = T.fp6_linear(x[:1, :1], p.hi2, p.lo4, p.scale, None, **_kw(p))  # default dispatch: GEMV (first config)
    assert torch.allclose(y1.cpu(), y[:1, :1].cpu(), rtol=1e-5, atol=1e-5)


def test_kernel_refuses_bad_arguments():
    q, p = _packed(_weight(8, 64))
    with pytest.raises(ValueError, match="features"):
        T.fp6_linear(torch.randn(1, 65).to(DEVICE), p.hi2, p.lo4, p.scale, None, **_kw(p))
    with pytest.raises(ValueError, match="float32 scales"):
        T.fp6_linear(torch.randn(1, 64).to(DEVICE), p.hi2, p.lo4, p.scale.half(), None, **_kw(p))
    with pytest.raises(ValueError, match="4 exponent bits"):
        T.fp6_linear(torch.randn(1, 64).to(DEVICE), p.hi2, p.lo4, p.scale, None, in_features=64, exp_bits=5, bias=15,
                     group_size=None)


def test_custom_op_registry_and_fake():
    fmt = registry.get_format("fp6")
    assert fmt.qualname == "fxquant::linear_fp6" and fmt in registry.formats()
    assert registry.select_format(FPQuantSpec())[0] is fmt
    assert registry.select_format(FPQuantSpec(format=FloatFormat(4, 3, 7)))[0] is None  # FP8 does not fit
    w = _weight(16, 96)
    q = quantize_fp(w, FPQuantSpec(group_size=32))
    packed = registry.pack(q)  # codes -> planes through the registry
    assert packed.format == "fp6" and torch.equal(packed.dequantize(), q.dequantize())
    x = torch.randn(3, 96)
    bias = torch.randn(16)
    ref = torch.nn.functional.linear(x, q.dequantize(), bias)
    assert torch.equal(packed.linear(x, bias), ref)  # CPU: the reference implementation, exact
    assert torch.equal(fp6_backend.linear_fp6(x, pack_fp6(q), bias), ref)
    # fake tensor / meta propagation and torch.compile see an opaque op with the right output
    torch.library.opcheck(fmt.op, (x, *packed.args(bias)), test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda t: packed.linear(t, bias), backend="eager", fullgraph=True, dynamic=True)
    assert compiled(torch.randn(5, 96)).shape == (5, 16)
    assert torch.equal(compiled(x), ref)


def test_plane_loads_cover_padding_and_unpack_matches():
    # K = 65: the packed width is 128 codes and the kernel reads the zero padding
    q, p = _packed(_weight(8, 65))
    assert p.k_pad == 128 and torch.equal(unpack_fp6_planes(p.hi2.cpu(), p.lo4.cpu(), 65), q.codes)
    x = torch.randn(1, 65).to(DEVICE)
    y = T.fp6_linear(x, p.hi2, p.lo4, p.scale, None, config=T.GEMV_CONFIGS[2], **_kw(p))  # BLOCK_K = 512 > k_pad
    assert torch.allclose(y.cpu(), x.cpu() @ q.dequantize().t(), rtol=1e-5, atol=1e-5)


# ---- ahead-of-time compilation for real GPUs, no GPU needed -------------------------------------------------------
def _cuobjdump() -> str | None:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


@pytest.fixture(scope="module")
def aot_rows() -> list[dict]:
    # the interpreter replaces @triton.jit functions, so compile in a fresh process without TRITON_INTERPRET
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "fxquant.backends.triton_fp6", "--aot", "80", "90"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_cuobjdump() is None, reason="the triton wheel ships no cuobjdump here")
@pytest.mark.parametrize("arch", [80, 90])
def test_aot_compile_no_spills_and_tensor_cores(arch, aot_rows):
    rows = [r for r in aot_rows if r["arch"] == arch]
    assert {r["name"] for r in rows} == {v.name for v in T.aot_variants()}
    for r in rows:
        assert r["stack"] == 0 and r["local"] == 0, f"{r['name']} sm_{arch} spills: {r}"
        assert r["registers"] <= 255 and r["ld_global"] > 0
        if r["uses_dot"]:
            assert r["wgmma"] or r["mma"], f"{r['name']} sm_{arch}: no tensor-core instruction in the PTX"
    # the tiled path uses Hopper's warpgroup MMA on sm_90 and mma.sync on sm_80
    tiled = [r for r in rows if r["name"].startswith("fp6_tiled")]
    assert tiled and all(r["wgmma"] if arch >= 90 else r["mma"] for r in tiled)


# ---- the word GEMV (M == 1 on int32 / int64 words of the planes) -------------------------------------------------
# (group, K): per channel with a partial last 16-code group; groups of 64, 48 (3 x 16), 128; K % 4 != 0 (the
# activations are then read element by element); K < 16 (no whole group); K longer than one step (2 x 128 groups)
WORD_CASES = [(None, 100), (64, 200), (48, 100), (128, 4144), (None, 65), (None, 8), (32, 2100)]


@pytest.mark.parametrize("cfg", range(len(T.WORD_GEMV_CONFIGS)), ids=lambda i: f"cfg{i}")
@pytest.mark.parametrize("group,k", WORD_CASES, ids=[f"g{g}_k{k}" for g, k in WORD_CASES])
def test_word_gemv_matches_reference(group, k, cfg):
    config = T.WORD_GEMV_CONFIGS[cfg]
    n = 37 if config.kwargs["SPLIT_K"] == 1 else 19      # rows that do not fill the last row block
    q, p = _packed(_weight(n, k, seed=k), E3M2, group)
    g = torch.Generator().manual_seed(k)
    bias = torch.randn(n, generator=g).to(DEVICE)
    dtypes = [(torch.float32, 1e-5), (torch.float16, 2e-3)]
    if config.kwargs["SPLIT_K"] == 1:
        dtypes.append((torch.bfloat16, 1e-2))             # (no bf16 atomics: split-K is pruned for bf16)
    ref_attrs = fp6_backend.pack_fp6_tensors(p)[1]
    for dtype, tol in dtypes:
        x = torch.randn(1, k, generator=g)
        x[0, :: max(1, k // 7)] *= 40.0                    # outlier activations
        x = x.to(DEVICE, dtype)
        y = T.fp6_linear(x, p.hi2, p.lo4, p.scale, bias.to(dtype), config=config, **_kw(p))
        ref = fp6_backend.linear_fp6_reference(x.float(), p.hi2, p.lo4, p.scale, bias, **ref_attrs)
        assert y.shape == (1, n) and y.dtype == dtype
        err = (y.float() - ref).norm() / ref.norm()
        assert err < tol, f"word GEMV cfg{cfg} group={group} k={k} {dtype}: relative error {err:.2e}"


def test_word_gemv_every_code_and_no_bias():
    # all 64 codes (subnormals, zeros, both signs) in every position of a 16-code group, x = one-hot rows of the
    # identity: y[n] is then exactly the dequantized weight W[n, j]
    codes = torch.stack([torch.roll(torch.arange(64, dtype=torch.uint8), s) for s in range(16)])
    from fxquant.fpformats import FPQuantizedWeight
    q = FPQuantizedWeight(codes, torch.full((16, 1), 0.75), E3M2, None)
    p = pack_fp6(q).to(DEVICE)
    w = q.dequantize()
    for j in (0, 5, 8, 15, 16, 37, 63):
        x = torch.zeros(1, 64)
        x[0, j] = 1.0
        y = T.fp6_linear(x.to(DEVICE), p.hi2, p.lo4, p.scale, None, config=T.WORD_GEMV_CONFIGS[0], **_kw(p)).cpu()
        assert torch.equal(y[0], w[:, j]), j


def test_word_gemv_dispatch_and_fallbacks(monkeypatch):
    calls = []
    real = T._word_gemv_launch
    monkeypatch.setattr(T, "_word_gemv_launch", lambda *a, **kw: (calls.append(a[8]), real(*a, **kw)))
    x = torch.randn(1, 100).to(DEVICE)
    # default dispatch: one row takes the word GEMV (per channel and whole 16-code groups) ...
    for group in (None, 32):
        q, p = _packed(_weight(24, 100), E3M2, group)
        y = T.fp6_linear(x, p.hi2, p.lo4, p.scale, None, **_kw(p))
        assert torch.allclose(y.cpu(), x.cpu() @ q.dequantize().t(), rtol=1e-5, atol=1e-5)
    assert calls == [0, 32]
    # ... except groups that are not whole 16-code groups, other containers (E2M3), or word_gemv=False: the tile
    # GEMV, with the same result
    for fmt, group, word in ((E3M2, 24, None), (E2M3, 32, None), (E3M2, 32, False)):
        q, p = _packed(_weight(24, 100), fmt, group)
        y = T.fp6_linear(x, p.hi2, p.lo4, p.scale, None, word_gemv=word, **_kw(p))
        assert torch.allclose(y.cpu(), x.cpu() @ q.dequantize().t(), rtol=1e-5, atol=1e-5)
    assert calls == [0, 32]
    # planes that cannot be read as words (a row of 6 bytes, not a multiple of 4) fall back too
    q, p = _packed(_weight(8, 64), E3M2, None)
    hi, lo = p.hi2[:, :6].contiguous(), p.lo4[:, :12].contiguous()     # the first 24 codes of each row
    assert not T.word_gemv_eligible(x[:, :24], hi, lo, exp_bits=3, group=0)
    y = T.fp6_linear(x[:, :24], hi, lo, p.scale, None, in_features=24, exp_bits=3, bias=3, group_size=None)
    assert torch.allclose(y.cpu(), x[:, :24].cpu() @ q.dequantize()[:, :24].t(), rtol=1e-5, atol=1e-5)
    assert calls == [0, 32]
    # forcing the word GEMV where it cannot run is an error, not a silent fallback
    q, p = _packed(_weight(24, 100), E2M3, None)
    with pytest.raises(ValueError, match="word GEMV"):
        T.fp6_linear(x, p.hi2, p.lo4, p.scale, None, config=T.WORD_GEMV_CONFIGS[0], **_kw(p))
    with pytest.raises(ValueError, match="one activation row"):
        T.fp6_linear(torch.randn(2, 100).to(DEVICE), p.hi2, p.lo4, p.scale, None, word_gemv=True, **_kw(p))
