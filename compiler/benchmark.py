"""``fxquant bench``: how fast are fxquant's quantized GEMMs, and a whole model's decode?

Each weight format is quantized from a random weight with outlier input channels, packed once, checked against its
reference (exact dequantization, then ``F.linear``) and timed against ``torch.matmul`` on float weights (FP16 on a
GPU, FP32 on the CPU) over LLaMA-class shapes and row counts, with the achieved memory bandwidth next to the
device's measured copy bandwidth; then SmolLM2's decode tokens/s, compiled with ``backend="fxquant"`` against eager.
Results go to ``<out>/bench_<device>.json`` and ``.md``. ``examples/bench_kernels.py`` is the same program.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .backends import registry
from .errors import FxquantError
from .models import load_model
from .quant import QuantSpec, quantize_weight

#: where ``fxquant bench`` writes by default (``examples/bench_kernels.py`` writes to ``examples/results``)
RESULTS = Path("bench-results")
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]  # (N, K) = (out, in)
ROWS = [1, 16, 64, 256, 2048]
FORMATS = {"int8 (w8, per-channel)": QuantSpec(8), "int4 (w4g128)": QuantSpec(4, group_size=128)}


# %%
# Timing
# ------
# What we want is the time the GPU spends on the product, the number that decode sees once launches are
# captured in a CUDA graph (``torch.compile(mode="reduce-overhead")`` does that). So on a GPU each measurement
# captures ``reps`` iterations of [flush L2, run] in one CUDA graph, and subtracts a graph of the flushes alone:
# no Python launch overhead, and a cold L2 for every call (the H100's 50 MB L2 would otherwise hold a whole int4
# weight and flatter the kernel). ``bench_launch`` keeps the plain ``triton.testing.do_bench`` number, launch
# overhead included, for comparison. On the CPU a median of wall-clock repetitions does.
_FLUSH: dict[str, torch.Tensor] = {}


def _graph_ms(body: Callable[[], None], reps: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()  # warm-up outside the capture (autotuning, allocations)
    torch.cuda.current_stream().wait_stream(stream)
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
    return statistics.median(times)


def bench(fn: Callable[[], Any], device: torch.device, reps: int = 50) -> float:
    """Median time of ``fn()`` in milliseconds (GPU: kernel time from a CUDA graph, cold L2)."""
    if device.type == "cuda":
        flush = _FLUSH.setdefault("buf", torch.empty(256 << 20, dtype=torch.uint8, device=device))
        fn()
        torch.cuda.synchronize()
        both = _graph_ms(lambda: (flush.zero_(), fn()), 20)
        alone = _graph_ms(lambda: flush.zero_(), 20)
        return max(both - alone, 1e-6)
    fn()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench_launch(fn: Callable[[], Any], device: torch.device) -> float | None:
    """``triton.testing.do_bench`` median: launch overhead included (GPU only)."""
    if device.type != "cuda":
        return None
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def copy_bandwidth(device: torch.device) -> float:
    """Measured copy bandwidth in GB/s, counting bytes read plus bytes written."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        import triton.testing
        ms = float(triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median"))
    else:
        ms = bench(lambda: dst.copy_(src), device)
    return 2 * n / ms / 1e6


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


# %%
# One GEMM
# --------
# Quantize a random weight with a few outlier input channels, pack it once, check the packed op against the
# reference at two row counts, then time both the op and the float matmul at every ``M``.
def kernel_resources() -> dict[str, Any] | None:
    """Registers, spills and shared memory of the Triton kernel launched last (CUDA only)."""
    try:
        from .backends import triton_int
    except Exception:  # noqa: BLE001
        return None
    return triton_int.last_kernel_resources()


def run_gemm(n: int, k: int, rows: list[int], device: torch.device, dtype: torch.dtype,
             formats: dict[str, QuantSpec] = FORMATS) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    w = torch.randn(n, k, device=device) * 0.02
    w[:, torch.randperm(k, device=device)[:8]] *= 30  # outlier input channels
    w_float = w.to(dtype)
    out = []
    for fname, spec in formats.items():
        qw = quantize_weight(w, spec)
        packed = registry.pack(qw)
        # ---- check: packed op vs reference (fresh random activations, every element written)
        for m in (1, 33):
            x = torch.randn(m, k, device=device, dtype=dtype)
            got = packed.linear(x).float()
            ref = torch.nn.functional.linear(x.float(), qw.dequantize(dtype).float())
            rel = float((got - ref).norm() / ref.norm())
            assert math.isfinite(rel) and rel < 2e-2, f"{fname} {n}x{k} M={m}: relative error {rel:.2e}"
        weight_bytes = packed.nbytes
        for m in rows:
            x = torch.randn(m, k, device=device, dtype=dtype)
            t_q = bench(lambda: packed.linear(x), device)
            res = kernel_resources() if device.type == "cuda" else None
            t_f = bench(lambda: torch.matmul(x, w_float.t()), device)
            t_ql, t_fl = bench_launch(lambda: packed.linear(x), device), bench_launch(lambda: torch.matmul(x, w_float.t()), device)
            act_bytes = (m * k + m * n) * x.element_size()
            out.append({
                "format": fname, "N": n, "K": k, "M": m, "ms_quant": t_q, "ms_float": t_f, "speedup": t_f / t_q,
                "GBps_quant": (weight_bytes + act_bytes) / t_q / 1e6,
                "GBps_float": (n * k * w_float.element_size() + act_bytes) / t_f / 1e6,
                "TFLOPs_quant": 2 * m * n * k / t_q / 1e9, "kernel": res,
                "ms_quant_with_launch": t_ql, "ms_float_with_launch": t_fl,
            })
            r = out[-1]
            print(f"{fname:24s} N={n:6d} K={k:6d} M={m:5d}  quant {t_q * 1e3:9.1f} us  float {t_f * 1e3:9.1f} us  "
                  f"x{r['speedup']:.2f}  {r['GBps_quant']:.0f} GB/s")
    return out


# %%
# A whole model: decode tokens/s
# ------------------------------
# Greedy decoding of 64 tokens with the Hugging Face ``generate()`` and its KV cache. ``model.forward`` is
# compiled (so ``generate`` keeps working); the first call compiles, the timed calls reuse the graphs.
def smollm2_model(device: torch.device, dtype: torch.dtype, real: bool) -> tuple[torch.nn.Module, str]:
    if real:
        try:
            return load_model("smollm2", dtype=dtype, device=device).model, "SmolLM2-135M-Instruct"
        except Exception as exc:  # noqa: BLE001 - fall back to the same architecture with random weights
            print(f"(SmolLM2 not available: {exc}; using its architecture with random weights)")
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval(), "SmolLM2-135M architecture, random weights"


def decode_tps(model: torch.nn.Module, device: torch.device, new_tokens: int = 64, reps: int = 3) -> float:
    ids = torch.randint(0, 1000, (1, 16), device=device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **kw)  # warm-up (and compilation)
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(ids, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return new_tokens / statistics.median(times)


def run_e2e(device: torch.device, dtype: torch.dtype, real: bool, variants: list[str], out: dict[str, Any],
            save: Callable[[], None]) -> dict[str, Any]:
    for variant in variants:
        model, what = smollm2_model(device, dtype, real)
        out["model"] = what
        torch._dynamo.reset()
        if variant != "eager":
            backend, opts = variant.split(":") if ":" in variant else (variant, None)
            options = {"recipe": opts} if opts else None
            model.forward = torch.compile(model.forward, backend=backend, options=options)
        out[variant] = decode_tps(model, device)
        print(f"decode {variant:24s} {out[variant]:8.1f} tokens/s")
        save()
        del model
    return out


# %%
# Report
# ------
def markdown(report: dict[str, Any]) -> str:
    lines = [f"# fxquant weight-only GEMM on {report['device']}", "",
             f"torch {report['torch']}, triton {report.get('triton', '-')}; float baseline: `torch.matmul` in "
             f"{report['dtype']}; measured copy bandwidth {report['copy_GBps']:.0f} GB/s (read + write). "
             "Times are medians of kernel time (CUDA: replayed CUDA graphs with the L2 cache flushed before every call; "
             "the JSON also holds `triton.testing.do_bench` times with Python launch overhead).", "",
             "| format | N | K | M | quant us | float us | speedup | quant GB/s | % of copy BW | regs | smem B | spills |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["gemm"]:
        kr = r.get("kernel") or {}
        lines.append(f"| {r['format']} | {r['N']} | {r['K']} | {r['M']} | {r['ms_quant'] * 1e3:.1f} | "
                     f"{r['ms_float'] * 1e3:.1f} | {r['speedup']:.2f}x | {r['GBps_quant']:.0f} | "
                     f"{100 * r['GBps_quant'] / report['copy_GBps']:.0f}% | {kr.get('n_regs', '-')} | "
                     f"{kr.get('shared', '-')} | {kr.get('n_spills', '-')} |")
    if report["device"].startswith("CPU"):
        lines += ["", "On the CPU the eager `fxquant::linear_*` op is the reference: it dequantizes the whole weight on "
                  "every call, so the GEMM rows measure that, not a kernel. Compiled models do not pay it: "
                  "`torch.compile(..., backend=\"fxquant\")` dequantizes once at compile time and lets Inductor run the "
                  "float GEMM (the decode table below)."]
    if report.get("command"):
        lines += ["", f"Command: `{report['command']}`"]
    m1 = [r for r in report["gemm"] if r["M"] == 1]
    if m1:
        lines += ["", "Decode (M = 1) speedup over the float matmul, geometric mean over the shapes:", ""]
        for fname in FORMATS:
            sp = [r["speedup"] for r in m1 if r["format"] == fname]
            if sp:
                lines.append(f"* {fname}: {math.exp(sum(map(math.log, sp)) / len(sp)):.2f}x "
                             f"(min {min(sp):.2f}x, max {max(sp):.2f}x)")
    if report.get("e2e"):
        e = report["e2e"]
        lines += ["", f"## Decode, {e.get('model')}: 64 greedy tokens, HF generate with KV cache", "",
                  "| variant | tokens/s |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.1f} |" for k, v in e.items() if k != "model"]
    return "\n".join(lines) + "\n"


def add_arguments(ap: argparse.ArgumentParser, default_out: Path = RESULTS) -> None:
    ap.add_argument("--quick", action="store_true", help="a small subset (default on the CPU)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the SmolLM2 decode measurement")
    ap.add_argument("--no-gemm", action="store_true", help="skip the GEMM grid (only the decode measurement)")
    ap.add_argument("--synthetic-model", action="store_true",
                    help="SmolLM2's architecture with random weights (when the GGUF package is not installed)")
    ap.add_argument("--rows", default=None, help="comma-separated M values (default: the full list)")
    ap.add_argument("--shapes", default=None,
                    help="comma-separated NxK weight shapes, e.g. 4096x4096,11008x4096 (default: LLaMA-7B's)")
    ap.add_argument("--variants", default=None, help="comma-separated decode variants, e.g. eager,fxquant:rtn-w4g128")
    ap.add_argument("--out", default=str(default_out), help=f"output folder (default {default_out})")


def _parse_list(text: str | None, what: str, parse: Callable[[str], Any]) -> list[Any] | None:
    if not text:
        return None
    try:
        return [parse(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FxquantError(f"cannot read {what} {text!r}",
                         hint="--rows 1,16,256 and --shapes 4096x4096,11008x4096 (N x K, out x in)") from None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark the parsed ``args`` ask for; write and return the report."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    shapes = (_parse_list(args.shapes, "shapes", lambda s: tuple(int(v) for v in s.lower().split("x", 1)))
              or (SHAPES[:2] if quick else SHAPES))
    rows = _parse_list(args.rows, "rows", int) or ([1, 16] if quick else ROWS)
    if any(len(s) != 2 or min(s) < 1 for s in shapes) or min(rows) < 1:
        raise FxquantError(f"shapes {shapes} / rows {rows}: every N, K and M must be a positive integer",
                         hint="--rows 1,16,256 and --shapes 4096x4096,11008x4096")
    import sys
    report: dict[str, Any] = {"device": device_name(device), "torch": torch.__version__, "dtype": str(dtype),
                              "quick": quick, "command": " ".join(["fxquant", "bench", *sys.argv[2:]])
                              if sys.argv and sys.argv[0].endswith("fxquant") else
                              " ".join(["python", "examples/bench_kernels.py", *sys.argv[1:]])}
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:  # triton is optional on the CPU: the report then names no triton version
        report["triton"] = None
    report["copy_GBps"] = copy_bandwidth(device)
    print(f"{report['device']}: copy bandwidth {report['copy_GBps']:.0f} GB/s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")[:40]

    def save() -> None:  # after each part, so a run cut short still leaves its numbers
        (out / f"bench_{slug}.json").write_text(json.dumps(report, indent=2, default=str))
        (out / f"bench_{slug}.md").write_text(markdown(report))

    report["gemm"] = [] if args.no_gemm else [r for n, k in shapes for r in run_gemm(n, k, rows, device, dtype)]
    save()
    if not args.no_e2e:
        variants = (args.variants.split(",") if args.variants else
                    ["eager", "inductor", "fxquant:rtn-w8", "fxquant:rtn-w4g128"] if device.type == "cuda"
                    else ["eager", "fxquant:rtn-w8"])
        report["e2e"] = {}
        report["e2e"] = run_e2e(device, dtype, not args.synthetic_model, variants, report["e2e"], save)
    save()
    print(markdown(report))
    print(f"written: {out / f'bench_{slug}.md'} and .json")
    return report


def main(argv: list[str] | None = None, default_out: Path = RESULTS) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap, default_out)
    run(ap.parse_args(argv))


def add_bench_parser(sub: Any) -> None:
    """``fxquant bench``: the subcommand of the CLI."""
    p = sub.add_parser("bench", help="time the quantized GEMMs against torch.matmul, and SmolLM2 decode",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    add_arguments(p)
    p.set_defaults(func=lambda args: (run(args), 0)[1])


# ---- shared by the GPU kernel examples (examples/bench_word_gemv.py, bench_fp6_gemv.py, bench_lowbit_gemv.py) ----
#: how their kernel times are taken, quoted in every report they write
GPU_METHOD = ("kernel time from `fxquant.benchmark.bench`: a CUDA graph of 20 x [flush the 50 MB L2 with a 256 MB "
              "memset, call] minus a graph of the flushes alone, median of 7 replays (no Python launch overhead, "
              "weights read from HBM)")


def slug(device: str) -> str:
    """A file-name form of a device name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:40]


def geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def example_main(args: argparse.Namespace, *, script: str, what: str,
                 load: Callable[[list[str]], Any], markdown: Callable[[Any], str],
                 measure: Callable[[argparse.Namespace], Any]) -> None:
    """The common ``main`` of a GPU kernel example: ``--render JSON...`` re-renders recorded results (no GPU:
    the Markdown goes next to the first file, or into ``--out``); otherwise it needs CUDA and measures."""
    if getattr(args, "render", None):
        md = markdown(load(args.render))
        first = Path(args.render[0])
        dest = (Path(args.out) if args.out else first.parent) / (first.stem + ".md")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(md)
        print(md)
        print(f"wrote {dest}")
        return
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU ({what}); without one, --render JSON re-renders recorded "
                         "results")
    measure(args)
