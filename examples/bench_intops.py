"""
Integer-only operators on a GPU: how fast is DI-MatMul against FP16?
====================================================================

I-LLM runs a transformer with integers only: activations are int8/int16 codes with a dyadic per-token scale
``m · 2^-k``, and every operator — the linear layers (DI-MatMul), softmax, the norms, SwiGLU — takes and returns
such triples. :mod:`fxquant.backends.intops` is the bit-exact reference of those operators in plain torch;
:mod:`fxquant.backends.triton_intops` runs them as Triton kernels. In this example you will learn

* how to **check** the kernels against the reference on the GPU, bit for bit (``--check``);
* how a DI-Linear call splits into an **int8 tensor-core GEMM** (whose epilogue also finds each row's
  maximum) and a **requantization pass** (one read of the int32 product, one write of the int8 codes), and what
  each part costs;
* how the integer operators compare with their FP16 counterparts: ``torch.matmul`` in FP16 (cuBLAS) for the
  linear layers, ``torch.softmax`` and ``F.rms_norm`` for the row-wise kernels.

Run it (CUDA GPU, no network, no model weights — random data)::

    python examples/bench_intops.py --check     # bit-exactness on the GPU, then the timings
    python examples/bench_intops.py --quick     # fewer shapes

The results go to ``examples/results/intops_<gpu-name-slug>.md`` (and ``.json``).
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# %%
# The shapes
# ----------
# SmolLM2-135M's linear layers as (K, N) = (in, out): the q/o projections (576 -> 576), k/v (576 -> 192), the
# MLP's gate/up (576 -> 1536) and down (1536 -> 576); then two LLaMA-7B-sized ones, where the GEMM is large
# enough for the tensor cores to dominate. M is the number of tokens: 1 (decode), 16, 256, 2048 (prefill).
SMOLLM2_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
LLAMA_SHAPES = [(4096, 4096), (4096, 11008)]
ROWS = [1, 16, 256, 2048]


# %%
# Timing
# ------
# The number we want is the GPU time of the operator, without Python launch overhead and with a cold L2 cache
# (the H100's 50 MB L2 would otherwise keep a whole weight matrix between repetitions). Each measurement
# captures ``reps`` iterations of [flush L2, run] in one CUDA graph, replays it, and subtracts the same graph of
# flushes alone. The FP16 reference and the integer kernels are measured the same way, one right after the other.
# ``triton.testing.do_bench`` medians (launch overhead included, L2 flushed by do_bench itself) are kept too.
_FLUSH: dict[str, torch.Tensor] = {}


def _graph_ms(body: Callable[[], None], reps: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            body()                      # warm-up outside the capture: autotuning, allocator
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            body()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    del graph
    return statistics.median(times)


def bench_us(fn: Callable[[], Any], reps: int = 20) -> float:
    """Median GPU time of ``fn`` in µs: CUDA-graph replays with the L2 flushed before every call."""
    flush = _FLUSH.setdefault("buf", torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
    both = _graph_ms(lambda: (flush.zero_(), fn()), reps)
    alone = _graph_ms(lambda: flush.zero_(), reps)
    return max(both - alone, 0.0) * 1e3


def do_bench_us(fn: Callable[[], Any]) -> float:
    import triton
    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")) * 1e3


# %%
# Random integer operands
# -----------------------
def _codes(shape: tuple[int, ...], qmax: int, dtype: torch.dtype, gen: torch.Generator, lo: int | None = None):
    lo = -qmax if lo is None else lo
    return torch.randint(lo, qmax + 1, shape, generator=gen, dtype=torch.int64).to(dtype)


def _scale(lead: tuple[int, ...], gen: torch.Generator, klo: int = 8, khi: int = 24):
    m = torch.randint(1 << 14, 1 << 15, lead + (1,), generator=gen)
    k = torch.randint(klo, khi, lead + (1,), generator=gen)
    return m, k


def linear_operands(m: int, k: int, n: int, seed: int = 0, bias: bool = False) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    x = _codes((m, k), 127, torch.int8, gen)
    x[:, torch.randperm(k, generator=gen)[:4]] = 127          # outlier channels at full scale
    w = _codes((n, k), 127, torch.int8, gen)
    xm, xk = _scale((m,), gen)
    wm = torch.randint(1 << 14, 1 << 15, (n,), generator=gen)
    b = torch.randint(-(1 << 24), 1 << 24, (n,), generator=gen) if bias else None
    return dict(x=x, xm=xm, xk=xk, w=w, wm=wm, wk=15, bias=b, bias_k=30)


# %%
# Bit-exactness on the GPU
# ------------------------
# Every entry point on a few shapes, including a long row (4100 columns: the streamed mode of the row kernels),
# a fully masked attention row, a bias, the unsigned-probabilities path of ``P · V``, and the per-column keys
# scale of ``Q · Kᵀ``. The reference runs on the CPU (torch has no CUDA integer matmul).
def _same(got, want) -> bool:
    return all(g.cpu().dtype == w.dtype and g.shape == w.shape and torch.equal(g.cpu(), w) for g, w in zip(got, want))


def check_cases() -> list[tuple[str, dict[str, Any], Callable[..., Any]]]:
    """(name, CPU tensors, call(module, tensors)) triples: ``call`` runs the op of ``module`` (the reference or the
    Triton one) and returns its triple."""
    gen = torch.Generator().manual_seed(7)
    cases: list[tuple[str, dict[str, Any], Callable[..., Any]]] = []

    def add(name: str, tensors: dict[str, Any], call: Callable[..., Any]) -> None:
        cases.append((name, tensors, call))

    x = _codes((5, 300), 1 << 45, torch.int64, gen)
    m, k = _scale((5,), gen)
    for bits in (4, 8, 16, 24):
        add(f"requantize_rows x int64, bits={bits}", dict(x=x, m=m, k=k),
            lambda M, t, bits=bits: M.requantize_rows(t["x"], t["m"], t["k"], bits))
    for (mm, kk, nn, bias) in [(1, 576, 192, False), (37, 576, 1536, True), (300, 1536, 576, False),
                               (256, 4096, 2048, False)]:
        ops = linear_operands(mm, kk, nn, seed=mm, bias=bias)
        add(f"di_linear M={mm} K={kk} N={nn}{' +bias' if bias else ''}", ops,
            lambda M, t: M.di_linear(t["x"], t["xm"], t["xk"], t["w"], t["wm"], t["wk"], t["bias"], t["bias_k"], 8))
    heads, tq, d = 9, 200, 64
    q = _codes((1, heads, tq, d), 127, torch.int8, gen)
    kt = _codes((1, heads, tq, d), 127, torch.int8, gen).transpose(-1, -2)
    qm, qk = _scale((1, heads, tq), gen)
    km, kk_ = _scale((1, heads, tq), gen, 0, 40)
    add("di_matmul Q·Kᵀ (per-column keys scale)", dict(a=q, am=qm, ak=qk, b=kt, bm=km.transpose(-1, -2),
                                                       bk=kk_.transpose(-1, -2)),
        lambda M, t: M.di_matmul(t["a"], t["am"], t["ak"], t["b"], t["bm"], t["bk"], 16))
    p = _codes((1, heads, tq, tq), 255, torch.uint8, gen, lo=0)
    v = _codes((1, heads, tq, d), 127, torch.int8, gen)
    vm, vk = _scale((1, heads, tq), gen, 0, 40)
    add("di_matmul P·V (uint8 P, per-token values scale folded)", dict(a=p, am=qm, ak=qk, b=v, bm=vm, bk=vk),
        lambda M, t: M.di_matmul(t["a"], t["am"], t["ak"], t["b"], t["bm"], t["bk"], 8, a_unsigned=True))
    s = _codes((2, 64, 4100), 32767, torch.int16, gen)
    sm, sk = _scale((2, 64), gen, 16, 26)
    mask = torch.ones(64, 4100, dtype=torch.bool).tril(4100 - 64)
    mask[3] = False
    for cols in (1000, 4100):
        for norm in ("max", "sum"):
            add(f"di_clipped_softmax {cols} cols causal, normalize_to={norm}",
                dict(s=s[..., :cols].contiguous(), m=sm, k=sk, mask=mask[:, :cols].contiguous()),
                lambda M, t, norm=norm: M.di_clipped_softmax(t["s"], t["m"], t["k"], t["mask"], normalize_to=norm))
    xn = _codes((32, 4100), 32767, torch.int16, gen)
    xn[1] = 0
    xn[2] = 123
    nm, nk = _scale((32,), gen)
    g = torch.randint(1, 1 << 15, (4100,), generator=gen)
    beta = torch.randint(-(1 << 20), 1 << 20, (4100,), generator=gen)
    for cols in (576, 4100):
        t = dict(x=xn[:, :cols].contiguous(), m=nm, k=nk, g=g[:cols].contiguous(), b=beta[:cols].contiguous())
        add(f"di_rmsnorm {cols} cols", t, lambda M, t: M.di_rmsnorm(t["x"], t["m"], t["k"], t["g"], 14))
        add(f"di_layernorm {cols} cols", t, lambda M, t: M.di_layernorm(t["x"], t["m"], t["k"], t["g"], t["b"], 14))
    ga = _codes((64, 1536), 32767, torch.int16, gen)
    ua = _codes((64, 1536), 32767, torch.int16, gen)
    gm, gk = _scale((64,), gen)
    um, uk = _scale((64,), gen)
    ew = dict(a=ga, am=gm, ak=gk, b=ua, bm=um, bk=uk)
    add("di_swiglu", ew, lambda M, t: M.di_swiglu(t["a"], t["am"], t["ak"], t["b"], t["bm"], t["bk"], 8))
    add("di_silu", ew, lambda M, t: M.di_silu(t["a"], t["am"], t["ak"]))
    add("di_gelu", ew, lambda M, t: M.di_gelu(t["a"], t["am"], t["ak"]))
    add("di_add", ew, lambda M, t: M.di_add(t["a"], t["am"], t["ak"], t["b"], t["bm"], t["bk"], 16))
    add("di_mul", ew, lambda M, t: M.di_mul(t["a"], t["am"], t["ak"], t["b"], t["bm"], t["bk"], 16))
    return cases


def run_check() -> list[dict[str, Any]]:
    from fxquant.backends import intops as R
    from fxquant.backends import triton_intops as T

    rows = []
    for name, tensors, call in check_cases():
        dev = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}
        try:
            want = call(R, tensors)
            got = call(T, dev)
            torch.cuda.synchronize()
            ok = _same(got, want)
            err = "" if ok else "mismatch"
        except Exception as e:  # noqa: BLE001 — recorded in the report
            ok, err = False, f"{type(e).__name__}: {e}"[:200]
        rows.append({"case": name, "pass": ok, "error": err})
        print(f"  check {'PASS' if ok else 'FAIL'}  {name} {err}", flush=True)
    return rows


# %%
# DI-Linear against FP16
# ----------------------
# The FP16 baseline is ``torch.matmul(x, wᵀ)`` (cuBLAS) on the same shapes. The integer path is the full
# ``di_linear`` (GEMM with the row-max epilogue + the fused ``P · wm`` requantization to int8 codes with their
# per-row scales), and the GEMM alone (:func:`fxquant.backends.triton_intops.linear_gemm`).
def run_linear(shapes: list[tuple[int, int]], rows: list[int]) -> list[dict[str, Any]]:
    from fxquant.backends import triton_intops as T

    out = []
    for k, n in shapes:
        for m in rows:
            ops = {kk: (v.cuda() if isinstance(v, torch.Tensor) else v) for kk, v in linear_operands(m, k, n).items()}
            xh = torch.randn(m, k, device="cuda", dtype=torch.float16)
            wt = torch.randn(n, k, device="cuda", dtype=torch.float16).t()

            def fp16() -> Any:
                return torch.matmul(xh, wt)

            def di() -> Any:
                return T.di_linear(ops["x"], ops["xm"], ops["xk"], ops["w"], ops["wm"], ops["wk"], bits=8)

            def gemm() -> Any:
                return T.linear_gemm(ops["x"], ops["w"], ops["wm"])

            di()
            gemm()                                               # autotune outside the timed graphs
            t_fp16, t_di, t_gemm = bench_us(fp16), bench_us(di), bench_us(gemm)
            ops2 = 2.0 * m * k * n
            row = {"K": k, "N": n, "M": m, "fp16_us": t_fp16, "di_linear_us": t_di, "gemm_us": t_gemm,
                   "requant_us": max(t_di - t_gemm, 0.0), "speedup": t_fp16 / t_di if t_di else None,
                   "speedup_gemm": t_fp16 / t_gemm if t_gemm else None,
                   "int8_tops": ops2 / (t_gemm * 1e-6) / 1e12 if t_gemm else None,
                   "fp16_tflops": ops2 / (t_fp16 * 1e-6) / 1e12 if t_fp16 else None,
                   "fp16_do_bench_us": do_bench_us(fp16), "di_linear_do_bench_us": do_bench_us(di)}
            out.append(row)
            print(f"  linear K={k:5d} N={n:5d} M={m:5d}: fp16 {t_fp16:8.1f} us  di_linear {t_di:8.1f} us "
                  f"(gemm {t_gemm:8.1f})  x{row['speedup']:.2f} (gemm x{row['speedup_gemm']:.2f})", flush=True)
    return out


def run_sweep(shapes: list[tuple[int, int]], m: int = 2048) -> list[dict[str, Any]]:
    """Every large-tile GEMM config on the given shapes, with its full epilogue (int32 ``P`` + row maxima), with
    ``P`` stored only, and with no epilogue at all: what the tile shape and the epilogue each cost."""
    from fxquant.backends import triton_intops as T

    arch = T._gemm_arch(torch.device("cuda"))
    out = []
    for k, n in shapes:
        ops = {kk: (v.cuda() if isinstance(v, torch.Tensor) else v) for kk, v in linear_operands(m, k, n).items()}
        for cfg in T.GEMM_CONFIGS[arch]["large"]:
            row = {"K": k, "N": n, "M": m, "config": {**cfg.kwargs, "num_warps": cfg.num_warps,
                                                       "num_stages": cfg.num_stages}}
            for epi in (3, 2, 1, 0):
                row[f"epi{epi}_us"] = bench_us(lambda epi=epi: T.linear_gemm(ops["x"], ops["w"], ops["wm"], cfg, epi))
            row["tops_no_epilogue"] = 2.0 * m * k * n / (row["epi0_us"] * 1e-6) / 1e12
            out.append(row)
            print(f"  sweep K={k} N={n} {row['config']}: full {row['epi3_us']:.1f} (read-back {row['epi2_us']:.1f})  "
                  f"P only {row['epi1_us']:.1f}  "
                  f"none {row['epi0_us']:.1f} us ({row['tops_no_epilogue']:.0f} TOPS)", flush=True)
    return out


def gemm_configs() -> list[dict[str, Any]]:
    """The configs the GEMM autotuner settled on, per (M bucket, N, K, ...) key."""
    from fxquant.backends import triton_intops as T

    found = []
    for (arch, cls), tuner in T._gemm_tuned.items():
        for key, cfg in getattr(tuner, "cache", {}).items():
            found.append({"arch": arch, "class": cls, "key": str(key[:3]),
                          "config": {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}})
    return found


# %%
# Row-wise kernels against their float counterparts
# -------------------------------------------------
# DI-ClippedSoftmax over 2048 x 2048 int16 scores (with and without a causal mask) against ``torch.softmax`` in
# FP16, and DI-RMSNorm over 2048 x 4096 int16 activations against ``F.rms_norm`` in FP16; both integer kernels
# also requantize their output to 8 bits with per-row scales.
def run_rowwise() -> list[dict[str, Any]]:
    from fxquant.backends import triton_intops as T

    gen = torch.Generator().manual_seed(3)
    out = []
    s = _codes((2048, 2048), 32767, torch.int16, gen).cuda()
    sm, sk = (t.cuda() for t in _scale((2048,), gen, 18, 24))
    mask = torch.ones(2048, 2048, dtype=torch.bool, device="cuda").tril()
    sh = torch.randn(2048, 2048, device="cuda", dtype=torch.float16)
    for name, msk in (("softmax 2048x2048", None), ("softmax 2048x2048 causal", mask)):
        def di(msk=msk) -> Any:
            return T.di_clipped_softmax(s, sm, sk, msk)

        if msk is None:
            def ref() -> Any:
                return torch.softmax(sh, dim=-1)
        else:
            def ref(msk=msk) -> Any:
                return torch.softmax(sh.masked_fill(~msk, float("-inf")), dim=-1)
        out.append(_row_entry(name, di, ref, "torch.softmax fp16" + (" (masked_fill)" if msk is not None else "")))
    x = _codes((2048, 4096), 32767, torch.int16, gen).cuda()
    xm, xk = (t.cuda() for t in _scale((2048,), gen))
    g = torch.randint(1, 1 << 15, (4096,), generator=gen).cuda()
    xh = torch.randn(2048, 4096, device="cuda", dtype=torch.float16)
    gh = torch.randn(4096, device="cuda", dtype=torch.float16)
    out.append(_row_entry("rmsnorm 2048x4096", lambda: T.di_rmsnorm(x, xm, xk, g, 14),
                          lambda: torch.nn.functional.rms_norm(xh, (4096,), gh, 1e-6), "F.rms_norm fp16"))
    gate = _codes((2048, 1536), 32767, torch.int16, gen).cuda()
    up = _codes((2048, 1536), 32767, torch.int16, gen).cuda()
    gm, gk = (t.cuda() for t in _scale((2048,), gen))
    gh2 = torch.randn(2048, 1536, device="cuda", dtype=torch.float16)
    uh2 = torch.randn(2048, 1536, device="cuda", dtype=torch.float16)
    out.append(_row_entry("swiglu 2048x1536", lambda: T.di_swiglu(gate, gm, gk, up, gm, gk, 8),
                          lambda: torch.nn.functional.silu(gh2) * uh2, "silu(g)*u fp16"))
    return out


def _row_entry(name: str, di: Callable[[], Any], ref: Callable[[], Any], ref_name: str) -> dict[str, Any]:
    di()
    t_ref, t_di = bench_us(ref), bench_us(di)
    print(f"  {name}: {ref_name} {t_ref:8.1f} us  integer {t_di:8.1f} us  x{t_ref / t_di:.2f}", flush=True)
    return {"op": name, "reference": ref_name, "ref_us": t_ref, "int_us": t_di, "speedup": t_ref / t_di}


# %%
# The report
# ----------
def markdown(rep: dict[str, Any]) -> str:
    lines = [f"# Integer-only operators (I-LLM) on {rep['gpu']}", "",
             f"Command: `{rep['command']}`  ", f"GPU: {rep['gpu']} (sm_{rep['capability']})  ",
             f"torch {rep['torch']}, triton {rep['triton']}, CUDA {rep['cuda']}, Python {rep['python']}  ",
             f"Date: {rep['date']}, total run time {rep.get('elapsed_s', 0):.0f} s", "",
             "Times are medians of GPU time in µs: CUDA graphs of [flush L2, call] replayed, minus the flushes "
             "alone (no launch overhead, cold L2). The integer and FP16 numbers of a row are measured back to back "
             "on the same GPU. `di_linear` = int8 tensor-core GEMM (its epilogue stores the int32 product and the "
             "row maxima of |P·wm|) + the fused requantization to int8 codes with per-row scales; `GEMM` = the "
             "first kernel alone.", ""]
    if rep.get("check") is not None:
        ok = sum(r["pass"] for r in rep["check"])
        lines += [f"## Bit-exactness on the GPU (`--check`): {ok}/{len(rep['check'])} pass", "",
                  "| case | Triton == reference |", "|---|---|"]
        lines += [f"| {r['case']} | {'PASS' if r['pass'] else 'FAIL ' + r['error']} |" for r in rep["check"]]
        lines.append("")
    if rep.get("linear"):
        lines += ["## DI-Linear (int8 x int8, requantized to int8) vs FP16 `torch.matmul`", "",
                  "| K | N | M | FP16 µs | di_linear µs | GEMM µs | requant µs | speedup | GEMM speedup "
                  "| int8 TOPS (GEMM) | FP16 TFLOPS |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rep["linear"]:
            lines.append(f"| {r['K']} | {r['N']} | {r['M']} | {r['fp16_us']:.1f} | {r['di_linear_us']:.1f} | "
                         f"{r['gemm_us']:.1f} | {r['requant_us']:.1f} | {r['speedup']:.2f}x | "
                         f"{r['speedup_gemm']:.2f}x | {r['int8_tops']:.0f} | {r['fp16_tflops']:.0f} |")
        lines += ["", "`triton.testing.do_bench` medians (launch overhead included), µs:", "",
                  "| K | N | M | FP16 | di_linear |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['K']} | {r['N']} | {r['M']} | {r['fp16_do_bench_us']:.1f} | {r['di_linear_do_bench_us']:.1f} |"
                  for r in rep["linear"]]
        lines.append("")
    if rep.get("rowwise"):
        lines += ["## Row-wise and element-wise kernels vs their FP16 torch equivalents", "",
                  "| op | FP16 reference | reference µs | integer µs | speedup |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['op']} | {r['reference']} | {r['ref_us']:.1f} | {r['int_us']:.1f} | {r['speedup']:.2f}x |"
                  for r in rep["rowwise"]]
        lines.append("")
    if rep.get("sweep"):
        lines += ["## GEMM tile sweep (M=2048), µs: the epilogue as used (row maxima from registers), with the "
                  "row maxima from P read back (the bias path), int32 P stored only, no epilogue", "",
                  "| K | N | config | as used | read-back | P only | none | TOPS (none) |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['K']} | {r['N']} | {r['config']} | {r['epi3_us']:.1f} | {r['epi2_us']:.1f} | "
                  f"{r['epi1_us']:.1f} | {r['epi0_us']:.1f} | {r['tops_no_epilogue']:.0f} |" for r in rep["sweep"]]
        lines.append("")
    if rep.get("gemm_configs"):
        lines += ["## GEMM configs chosen by the autotuner", "", "| arch | class | key (M bucket, N, K) | config |",
                  "|---|---|---|---|"]
        lines += [f"| sm_{c['arch']} | {c['class']} | {c['key']} | {c['config']} |" for c in rep["gemm_configs"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="verify Triton == reference bit for bit first")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (M in {1, 2048}, two linear shapes)")
    parser.add_argument("--no-bench", action="store_true", help="only the --check part")
    parser.add_argument("--sweep", action="store_true", help="also time every large GEMM tile config (M=2048)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: examples/results)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_intops.py needs a CUDA GPU (the Triton kernels are timed against cuBLAS/torch on the device); "
              "on a CPU, run the bit-exactness tests instead: pytest tests/test_intops_triton.py", file=sys.stderr)
        return 2
    import triton

    t0 = time.time()
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True
    name = torch.cuda.get_device_name()
    cap = torch.cuda.get_device_capability()
    rep: dict[str, Any] = {
        "command": "python examples/bench_intops.py"
                   + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "gpu": name, "capability": f"{cap[0]}{cap[1]}", "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "check": None}
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48]
    args.out.mkdir(parents=True, exist_ok=True)
    md, js = args.out / f"intops_{slug}.md", args.out / f"intops_{slug}.json"

    def save() -> None:   # after every part: a run cut short keeps what it measured
        rep["elapsed_s"] = time.time() - t0
        md.write_text(markdown(rep))
        js.write_text(json.dumps(rep, indent=2, default=str))

    if args.check:
        print("bit-exactness (GPU vs CPU reference):", flush=True)
        rep["check"] = run_check()
        save()
    if args.sweep:
        print("GEMM tile sweep:", flush=True)
        rep["sweep"] = run_sweep(LLAMA_SHAPES)
        save()
    if not args.no_bench:
        shapes = ([(576, 1536), (4096, 11008)] if args.quick else SMOLLM2_SHAPES + LLAMA_SHAPES)
        rows = [1, 2048] if args.quick else ROWS
        print("DI-Linear vs FP16 torch.matmul:", flush=True)
        rep["linear"] = []
        for shape in shapes:
            rep["linear"] += run_linear([shape], rows)
            save()
        print("row-wise kernels:", flush=True)
        rep["rowwise"] = run_rowwise()
        rep["gemm_configs"] = gemm_configs()
        save()
    print(f"wrote {md}", flush=True)
    failed = rep["check"] is not None and not all(r["pass"] for r in rep["check"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
