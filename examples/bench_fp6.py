"""Benchmark: the FP6 (E3M2, 4+2 planes) GEMM against FP16 ``torch.matmul`` on LLaMA-7B shapes.

What you will learn
-------------------
* how to pack a weight into FP6 planes and call ``fxquant::linear_fp6`` (the Triton kernel on CUDA);
* that it computes what the reference computes (checked on every shape before timing);
* how fast it is against cuBLAS FP16 at batch sizes M = 1, 16, 64, 256, and which kernel path serves each M.

FP6 reads 6/16 of FP16's bytes, so memory-bound shapes (small M) can be up to 2.67x faster; at large M the
product is bound by arithmetic and the op dispatches to FP16 ``torch.matmul`` on a dequantized weight.

Run ``python examples/bench_fp6.py`` on a CUDA machine, or ``--quick`` anywhere (small shapes; on a CPU the
reference op is timed against an fp32 matmul, which only shows that the script runs). Results go to
``examples/results/fp6_<device>.json`` and a Markdown table ``fp6_<device>.md`` naming the device.

Timing method: CUDA-graph replays (``triton.testing.do_bench_cudagraph``), median; each timed call runs the
op over several weight copies whose total exceeds twice the L2 cache, so weights come from HBM as in a real
model, and the time is divided by the copy count.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from fxquant.backends import fp6 as fp6_backend
from fxquant.fpformats import E3M2, FPQuantSpec, pack_fp6, quantize_fp

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # N x K of LLaMA-7B's q/o, gate/up and down projections
ROWS = [1, 16, 64, 256]


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()})"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _time_cpu(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _time_cuda(fn) -> float:
    import triton
    fn()  # autotune and compile outside the graph
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def run(quick: bool, group_size: int | None, out_dir: Path) -> dict:
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    act = torch.float16 if cuda else torch.float32
    shapes = SHAPES if not quick else [(512, 512), (1024, 512)]
    rows = ROWS if not quick else [1, 16]
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if cuda else 0
    spec = FPQuantSpec(format=E3M2, group_size=group_size)
    # Triton is imported only where its kernels run
    triton_fp6 = importlib.import_module("fxquant.backends.triton_fp6") if cuda else None
    results = []
    for n, k in shapes:
        g = torch.Generator().manual_seed(n + k)
        w = torch.randn(n, k, generator=g) * 0.02
        q = quantize_fp(w, spec)
        packed = pack_fp6(q).to(dev)
        w16 = q.dequantize(act).to(dev)  # the FP16 baseline multiplies the same (dequantized) values
        copies = max(1, -(-2 * l2 // (n * k * 2))) if cuda else 1  # > 2x L2 of FP16 weights: HBM-bound
        packs = [packed] + [pack_fp6(q).to(dev) for _ in range(copies - 1)]
        w16s = [w16] + [w16.clone() for _ in range(copies - 1)]
        for m in rows:
            x = (torch.randn(m, k, generator=g) * 0.5).to(dev, act)
            # -- check against the reference before timing -------------------------------------------------------
            y = fp6_backend.linear_fp6(x, packed)
            ref = fp6_backend.linear_fp6_reference(x.float(), *fp6_backend.pack_fp6_tensors(packed)[0].values(),
                                                   None, **fp6_backend.pack_fp6_tensors(packed)[1])
            rel = float((y.float() - ref).norm() / ref.norm())
            if rel > 5e-3:
                raise SystemExit(f"FP6 GEMM disagrees with the reference on {m}x{n}x{k}: relative error {rel:.2e}")
            # -- time ----------------------------------------------------------------------------------------------
            def fp6_all() -> None:
                for p in packs:
                    fp6_backend.linear_fp6(x, p)

            def fp16_all() -> None:
                for w_ in w16s:
                    torch.matmul(x, w_.t())

            timer = _time_cuda if cuda else _time_cpu
            t6 = timer(fp6_all) / copies
            t16 = timer(fp16_all) / copies
            path = triton_fp6.kernel_path(m) if cuda else "reference"
            row = {"M": m, "N": n, "K": k, "path": path, "fp6_ms": t6, "fp16_ms": t16, "speedup": t16 / t6,
                   "rel_err_vs_reference": rel, "weight_copies": copies,
                   "fp6_GBps": (packed.nbytes() + m * k * 2 + m * n * 2) / t6 / 1e6}
            if cuda and path != "torch":
                if path == "gemv" and getattr(triton_fp6, "_word_gemv", None) is not None and \
                        getattr(triton_fp6._word_gemv, "best_config", None) is not None:
                    path = row["path"] = "word_gemv"
                tuner = {"gemv": triton_fp6._gemv, "word_gemv": triton_fp6._word_gemv, "skinny": triton_fp6._skinny,
                         "tiled": triton_fp6._tiled}[path]
                if getattr(tuner, "best_config", None) is not None:
                    row["config"] = str(tuner.best_config)
            results.append(row)
            print(f"M={m:4d} N={n:5d} K={k:5d}  {path:9s} fp6 {t6 * 1e3:8.1f} us  fp16 {t16 * 1e3:8.1f} us  "
                  f"speedup {t16 / t6:5.2f}x  (rel err {rel:.1e})", flush=True)
    device = _device_name()
    report = {"device": device, "torch": torch.__version__, "quick": quick, "group_size": group_size,
              "activation_dtype": str(act), "timing": "cudagraph median" if cuda else "perf_counter median",
              "results": results}
    if cuda:
        import triton
        report["triton"] = triton.__version__
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"fp6_{_slug(device)}" + (f"_g{group_size}" if group_size else "") + ("_quick" if quick else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    lines = [f"# FP6 E3M2 GEMM vs FP16 torch.matmul on {device}", "",
             f"{'per-channel scales' if not group_size else f'groups of {group_size}'}; {report['timing']}; "
             f"activations {act}; torch {torch.__version__}" + (f", triton {report.get('triton')}" if cuda else ""), "",
             "| M | N | K | path | FP6 (µs) | FP16 (µs) | speedup |", "|---:|---:|---:|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['M']} | {r['N']} | {r['K']} | {r['path']} | {r['fp6_ms'] * 1e3:.1f} | "
                     f"{r['fp16_ms'] * 1e3:.1f} | {r['speedup']:.2f}x |")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (works on a CPU)")
    parser.add_argument("--group-size", type=int, default=None, help="per-group scales (e.g. 128)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ns = parser.parse_args()
    run(ns.quick, ns.group_size, ns.out)


if __name__ == "__main__":
    main()
