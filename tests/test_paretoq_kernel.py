"""ParetoQ Triton kernels: dequantized tile == reference bit for bit, GEMV / tiled GEMM == reference op (interpreter on
CPU, small shapes, K not a multiple of the block), and an ahead-of-time compile for sm_80/sm_90 without a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fxquant.backends import registry
from fxquant.paretoq import ParetoQSpec, init_alpha, quantize_paretoq

triton = pytest.importorskip("triton")
from fxquant.backends import triton_lowbit as T  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL_BITS = (1, 1.58, 2, 3, 4)


def _packed(bits: float, n: int, k: int, group: int | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 0.5, k)[torch.randperm(k, generator=g)]
    spec = ParetoQSpec(bits, group)
    qw = quantize_paretoq(w, init_alpha(w, spec) * 0.8, spec)
    p = registry.pack(qw)
    planes = [p.tensors[name].to(DEVICE) for name in p.fmt.tensor_names[:-1]]
    return qw, p, planes, p.tensors["scale"].to(DEVICE)


@pytest.mark.parametrize("group", [None, 24], ids=["perchan", "g24"])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_kernel_dequantized_weight_is_bit_exact(bits, group):
    qw, p, planes, scale = _packed(bits, 20, 77, group)
    for dtype in (torch.float32, torch.float16):
        got = T.dequantize(planes, scale, bits=bits, dtype=dtype, **p.attrs).cpu()
        want = qw.dequantize(dtype)
        view = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(got.view(view), want.view(view))


CASES = [(bits, m) for bits in ALL_BITS for m in (1, 3, 17)]


@pytest.mark.parametrize("bits,m", CASES, ids=[f"w{b}-m{m}" for b, m in CASES])
def test_kernel_matches_reference(bits, m):
    # K = 100: not a multiple of BLOCK_K (64 / 128), nor of the bytes' 8/5/4/2 codes; groups of 24 with a short last one
    group = 24 if m == 3 else None
    qw, p, planes, scale = _packed(bits, 40, 100, group, seed=m)
    g = torch.Generator().manual_seed(7)
    bias = torch.randn(40, generator=g)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        x = torch.randn(m, 100, generator=g).to(dtype)
        ref = p.linear(x.float(), bias)  # the registry's reference op
        y = T.lowbit_linear(x.to(DEVICE), planes, scale, bias.to(DEVICE, dtype), bits=bits, **p.attrs)
        assert y.shape == (m, 40) and y.dtype == dtype
        err = ((y.float().cpu() - ref).norm() / ref.norm()).item()
        assert err < tol, f"{bits}-bit m={m} {dtype}: relative error {err:.2e}"
    # the other path on the same rows agrees too (the dispatch is by M, both must be right)
    other = "tiled" if T.kernel_path(m) == "gemv" else "gemv"
    x = torch.randn(m, 100, generator=g)
    y = T.lowbit_linear(x.to(DEVICE), planes, scale, None, bits=bits, path=other, **p.attrs).cpu()
    torch.testing.assert_close(y, p.linear(x), rtol=1e-5, atol=1e-5)


def test_dispatch_and_bad_arguments():
    assert [T.kernel_path(m) for m in (1, 2, 16, 17, 512)] == ["gemv", "tiled", "tiled", "tiled", "tiled"]
    qw, p, planes, scale = _packed(2, 8, 64, None)
    x = torch.randn(2, 3, 64).to(DEVICE)
    assert T.lowbit_linear(x, planes, scale, None, bits=2, **p.attrs).shape == (2, 3, 8)
    with pytest.raises(ValueError, match="features"):
        T.lowbit_linear(torch.randn(1, 65).to(DEVICE), planes, scale, None, bits=2, **p.attrs)
    with pytest.raises(ValueError, match="float32 scales"):
        T.lowbit_linear(torch.randn(1, 64).to(DEVICE), planes, scale.half(), None, bits=2, **p.attrs)


def _cuobjdump() -> str | None:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


@pytest.mark.skipif(_cuobjdump() is None, reason="the triton wheel ships no cuobjdump here")
def test_aot_compile_sm80_sm90_no_spills():
    # the interpreter replaces @triton.jit functions, so compile in a fresh process without TRITON_INTERPRET
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "fxquant.backends.triton_lowbit", "80", "90"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {(r["name"], r["arch"]) for r in rows} == {(v.name, a) for v in T.aot_variants() for a in (80, 90)}
    for r in rows:
        assert r["stack"] == 0 and r["local"] == 0, f"{r['name']} sm_{r['arch']} spills: {r}"
        assert r["registers"] <= 255
        if r["uses_dot"]:
            assert r["mma"] or r["wgmma"], f"{r['name']} sm_{r['arch']}: no tensor-core instruction"


# ---- the decode GEMV: unmasked main loop (two tiles a step), masked tail, every scale mode and activation dtype --
GEMV_CASES = [(bits, k + (1000 if bits == 1 else 0), group) for bits in ALL_BITS
              for k, group in ((1100, None), (1111, 64), (1100, 40))]


@pytest.mark.parametrize("bits,k,group", GEMV_CASES, ids=[f"w{b}-k{k}-g{g}" for b, k, g in GEMV_CASES])
def test_gemv_main_loop_tail_and_scale_modes(bits, k, group, monkeypatch):
    # one warp -> tiles of 32 words (int16 / bytes for ternary), so K ~ 1100 runs the unmasked two-tile main loop
    # and a masked tail; K = 1111 is odd (fp16 activations padded to int32 pairs, ternary rows of 223 bytes are
    # read byte by byte); groups of 64 / 40 are whole words for some widths (a scale per word) and split words
    # for the others (a scale per code)
    monkeypatch.setattr(T, "GEMV_CONFIG", (16, 1))
    qw, p, planes, scale = _packed(bits, 20, k, group, seed=k)
    w = qw.dequantize(torch.float32)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(20, generator=g)
    for m in (1, 3):
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 4e-3), (torch.bfloat16, 2e-2)):
            x = torch.randn(m, k, generator=g)
            x[:, :: max(1, k // 7)] *= 30  # outlier columns
            x = x.to(dtype)
            ref = torch.nn.functional.linear(x.float(), w, bias)
            y = T.lowbit_linear(x.to(DEVICE), planes, scale, bias.to(DEVICE, dtype), bits=bits, path="gemv",
                                **p.attrs).float().cpu()
            err = ((y - ref).norm() / ref.norm()).item()
            assert err < tol, f"{bits}-bit k={k} g={group} m={m} {dtype}: relative error {err:.2e}"


@pytest.mark.parametrize("bits", ALL_BITS)
def test_gemv_consts_cover_every_mode(bits):
    for group, k in ((None, 4096), (128, 4096), (24, 4096)):
        gc = T._gemv_consts(bits, group or k, k, 2)
        cpw = gc["CPW"]
        assert gc["GROUP_MODE"] == (0 if group is None else (1 if group % cpw == 0 else 2))
        assert gc["BLOCK_N"] == (4 if gc["GROUP_MODE"] == 2 else T.GEMV_CONFIG[0])
