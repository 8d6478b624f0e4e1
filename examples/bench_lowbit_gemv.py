"""
Decode GEMV (M = 1) for ParetoQ low-bit weights: 1, 1.58 (ternary), 2, 3 and 4 bits vs FP16
===========================================================================================

In this example you will learn

* how a ParetoQ weight (:func:`fxquant.paretoq.quantize_paretoq`) is packed into bit planes
  (:func:`fxquant.backends.registry.pack` with a ``pq_w*`` format) and run by the Triton decode GEMV
  (``backends/triton_lowbit.py``) — what ``fxquant::linear_pq_w*`` does at M = 1 on a GPU;
* how to **check** every format x scale mode against ``F.linear`` on the dequantized weight before timing (odd
  shapes, M = 1 and 3, fp16 / bf16 / fp32 activations, with and without bias; the script fails loudly);
* how fast it is against FP16 ``torch.matmul`` (cuBLAS) on the five LLaMA-7B layer shapes, and how the
  ``GEMV_CONFIG`` default ``(BLOCK_N, num_warps)`` was chosen (a sweep for 2 bit and ternary).

Run it (a CUDA GPU with Triton; about a minute on an H100)::

    python examples/bench_lowbit_gemv.py            # -> examples/results/lowbit_gemv_<device>.json / .md
    python examples/bench_lowbit_gemv.py --quick    # 4096x4096 only
    python examples/bench_lowbit_gemv.py --render examples/results/lowbit_gemv_nvidia-h100-80gb-hbm3.json \\
        examples/results/lowbit_gemv_nvidia-h100-80gb-hbm3_gemv16x4.json   # + a run with another GEMV_CONFIG

Times come from :func:`bench_kernels.bench` (``examples/bench_kernels.py``): a CUDA graph of 20 x [flush the L2,
call] minus a graph of the flushes alone, median of 7 replays — kernel time without Python launch overhead, weights
read from HBM as in a real model.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from fxquant import benchmark
from fxquant.benchmark import GPU_METHOD, example_main, geomean, slug

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NAME = "lowbit_gemv"
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]  # (N, K) = (out, in)
FORMATS = [("pq_w1", 1, None), ("pq_w1_58", 1.58, None), ("pq_w2", 2, None), ("pq_w3", 3, None),
           ("pq_w4", 4, None), ("pq_w2", 2, 128)]
#: M = 1 speedup over FP16 torch.matmul: 2-bit >= 5x, ternary >= 6x, and 4-bit held to the int4 target
TARGET = {("pq_w2", None): 5.0, ("pq_w1_58", None): 6.0, ("pq_w4", None): 3.0}
SWEEP = ((16, 4), (16, 8), (8, 4), (8, 8), (16, 2), (32, 4))   # (BLOCK_N, num_warps)
METHOD = GPU_METHOD


def weight(n: int, k: int, dev):
    import torch
    g = torch.Generator(device=dev).manual_seed(n * 7 + k)
    w = torch.randn(n, k, device=dev, generator=g) * 0.02
    w[:, torch.randperm(k, device=dev, generator=g)[:8]] *= 30  # outlier input channels
    return w


# %%
# Checks
# ------
def check(dev) -> list[dict]:
    """Every format x scale mode at odd and LLM shapes, fp16 activations at M = 1 and 3 (and bf16 / fp32 for three
    formats), vs F.linear(x, dequantized W) in float32."""
    import torch
    import torch.nn.functional as F

    from fxquant.backends import registry
    from fxquant.backends import triton_lowbit as T
    from fxquant.paretoq import ParetoQSpec, init_alpha, quantize_paretoq

    rows = []
    bad = []
    extra = [("pq_w1_58", 1.58, 128), ("pq_w4", 4, 128), ("pq_w3", 3, 128), ("pq_w1", 1, 128), ("pq_w2", 2, 48)]
    for n, k in ((300, 4096), (4096, 11008), (257, 1111), (64, 14336)):
        w = weight(n, k, dev)
        for name, bits, group in FORMATS + extra:
            spec = ParetoQSpec(bits, group)
            qw = quantize_paretoq(w, init_alpha(w, spec), spec)
            packed = registry.pack(qw, name).to(dev)
            wd = qw.dequantize(torch.float32).to(dev)
            planes = [packed.tensors[t] for t in packed.fmt.tensor_names[:-1]]
            cases = [(torch.float16, 3e-3, False)]
            if n == 257 and name in ("pq_w2", "pq_w1_58", "pq_w3"):
                cases += [(torch.bfloat16, 2e-2, True), (torch.float32, 1e-4, True)]
            for dtype, tol, with_bias in cases:
                bias = torch.randn(n, device=dev) if with_bias else None
                for m in (1, 3):
                    x = torch.randn(m, k, device=dev)
                    x[:, torch.randperm(k, device=dev)[:16]] *= 20
                    x = x.to(dtype)
                    ref = F.linear(x.float(), wd, bias)
                    y = T.lowbit_linear(x, planes, packed.tensors["scale"], None if bias is None else bias.to(dtype),
                                        bits=bits, path="gemv", **packed.attrs).float()
                    err = float((y - ref).norm() / ref.norm())
                    ok = err == err and err < tol
                    rows.append({"format": name, "group": group, "N": n, "K": k, "M": m, "dtype": str(dtype),
                                 "rel_err": err, "ok": ok})
                    if not ok:
                        bad.append(rows[-1])
            # the registered op's default path too (M = 1 -> GEMV)
            x = torch.randn(1, k, device=dev, dtype=torch.float16)
            ref = F.linear(x.float(), wd)
            err = float((packed.linear(x).float() - ref).norm() / ref.norm())
            if not err < 3e-3:
                bad.append({"format": name, "group": group, "N": n, "K": k, "op": "PackedWeight.linear",
                            "rel_err": err})
    if bad:
        for b in bad:
            print("CHECK FAILED", b, flush=True)
        raise SystemExit(f"{len(bad)} GEMV checks failed")
    print(f"checks: {len(rows)} GEMV cases ok (max rel err per dtype: "
          + ", ".join(f"{d.split('.')[-1]} {max(r['rel_err'] for r in rows if r['dtype'] == d):.1e}"
                      for d in sorted({r['dtype'] for r in rows})) + ")", flush=True)
    return rows


# %%
# Timing
# ------
def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import triton

    import fxquant  # noqa: F401
    from fxquant.backends import registry
    from fxquant.backends import triton_lowbit as T
    from fxquant.paretoq import ParetoQSpec, init_alpha, quantize_paretoq

    bk = benchmark
    t0 = time.monotonic()
    deadline = math.inf if args.deadline is None else args.deadline
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    out = Path(args.out or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{NAME}_{slug(name)}.json"
    report: dict[str, Any] = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
                              "gemv_config": T.GEMV_CONFIG, "method": METHOD,
                              "command": " ".join(["python", "examples/bench_lowbit_gemv.py", *sys.argv[1:]]),
                              "rows": [], "errors": []}

    def save() -> None:
        path.write_text(json.dumps(report, indent=1, default=str))
        path.with_suffix(".md").write_text(markdown([json.loads(path.read_text())]))

    report["checks"] = check(dev)
    report["check_s"] = time.monotonic() - t0
    shapes = SHAPES[:1] if args.quick else SHAPES
    print(f"{'format':9s} {'scales':7s} {'N':>6s} {'K':>6s} {'quant us':>9s} {'fp16 us':>8s} {'speedup':>8s} "
          f"{'GB/s':>6s}  target", flush=True)
    for n, k in shapes:
        w = weight(n, k, dev)
        w16 = w.half()
        x = torch.randn(1, k, device=dev, dtype=torch.float16)
        t_fp16 = bk.bench(lambda: torch.matmul(x, w16.t()), dev)
        for fname, bits, group in FORMATS:
            if time.monotonic() - t0 > deadline:
                report["errors"].append(f"deadline before {fname} g{group} {n}x{k}")
                break
            spec = ParetoQSpec(bits, group)
            qw = quantize_paretoq(w, init_alpha(w, spec), spec)
            packed = registry.pack(qw, fname).to(dev)
            packed.linear(x)
            t_q = bk.bench(lambda: packed.linear(x), dev)
            tgt = TARGET.get((fname, group))
            r = {"format": fname, "bits": bits, "group": group or "channel", "N": n, "K": k, "M": 1,
                 "us_quant": t_q * 1e3, "us_fp16": t_fp16 * 1e3, "speedup": t_fp16 / t_q,
                 "weight_bytes": packed.nbytes, "GBps": packed.nbytes / t_q / 1e6, "target": tgt}
            report["rows"].append(r)
            mark = "" if tgt is None else (f">={tgt:g}x " + ("ok" if r["speedup"] >= tgt else "MISSED"))
            print(f"{fname:9s} {str(group or 'chan'):7s} {n:6d} {k:6d} {r['us_quant']:9.2f} {r['us_fp16']:8.2f} "
                  f"{r['speedup']:7.2f}x {r['GBps']:6.0f}  {mark}", flush=True)
            del packed, qw
        del w, w16
        save()
    # GEMV_CONFIG sweep (BLOCK_N rows, num_warps) for 2 bit and ternary: the evidence for the default
    report["sweep"] = []
    print("sweep (BLOCK_N, warps):", flush=True)
    default = T.GEMV_CONFIG
    try:
        for n, k in ((4096, 4096), (4096, 14336)):
            w = weight(n, k, dev)
            x = torch.randn(1, k, device=dev, dtype=torch.float16)
            for fname, bits in (("pq_w2", 2), ("pq_w1_58", 1.58)):
                spec = ParetoQSpec(bits)
                packed = registry.pack(quantize_paretoq(w, init_alpha(w, spec), spec), fname).to(dev)
                line = []
                for cfg in SWEEP:
                    if time.monotonic() - t0 > deadline:
                        report["errors"].append(f"deadline in the sweep at {fname} {n}x{k} {cfg}")
                        break
                    T.GEMV_CONFIG = cfg
                    packed.linear(x)
                    t_q = bk.bench(lambda: packed.linear(x), dev)
                    report["sweep"].append({"format": fname, "N": n, "K": k, "config": cfg, "us": t_q * 1e3})
                    line.append(f"{cfg}: {t_q * 1e3:.2f}")
                print(f"  {fname:9s} {n}x{k}: " + "  ".join(line), flush=True)
    finally:
        T.GEMV_CONFIG = default
    report["elapsed_s"] = time.monotonic() - t0
    save()
    print(f"done in {report['elapsed_s']:.0f} s; wrote {path} and {path.with_suffix('.md')}", flush=True)
    return report


# %%
# Report
# ------
def _scales(g) -> str:
    return "channel" if g in (None, "channel") else f"g{g}"


def _cfg(c) -> tuple[int, int]:
    return tuple(c) if isinstance(c, (list, tuple)) else tuple(int(v) for v in re.findall(r"\d+", str(c)))


def markdown(reports: list[dict[str, Any]]) -> str:
    """The first report is the main one; reports measured with another ``GEMV_CONFIG`` add a comparison column;
    further reports with the same one add rows (other shapes)."""
    head = reports[0]
    main_cfg = _cfg(head.get("gemv_config", ()))
    rows: dict[tuple, dict] = {}
    other: dict[tuple, dict[tuple, float]] = {}
    for r in reports:
        c = _cfg(r.get("gemv_config", ()))
        for x in r["rows"]:
            key = (x["format"], str(x["group"]), x["N"], x["K"])
            if c == main_cfg:
                rows[key] = x
            else:
                other.setdefault(c, {})[key] = x["us_quant"]
    rows_l = list(rows.values())
    lines = [f"# ParetoQ low-bit decode GEMV (M = 1) on {head.get('device', 'unknown device')}", "",
             f"torch {head.get('torch', '?')}, triton {head.get('triton', '?')}, `GEMV_CONFIG` (BLOCK_N, num_warps) = "
             f"{main_cfg}. Method: {head.get('method', METHOD)}. Baseline: FP16 `torch.matmul` (cuBLAS) on the "
             "float weight. The quantized time is the registered op (`PackedWeight.linear`, the Triton GEMV at M = 1).",
             ""]
    cmds = list(dict.fromkeys(r["command"] for r in reports if r.get("command")))
    if cmds:
        lines += ["Command: " + "; ".join(f"`{c}`" for c in cmds), ""]
    for r in reports:
        if r.get("note"):
            lines += [r["note"], ""]
    checks = head.get("checks", [])
    if checks:
        per = {}
        for c in checks:
            d = c["dtype"].split(".")[-1]
            per[d] = max(per.get(d, 0.0), c["rel_err"])
        lines += [f"Checks before timing: {len(checks)} GEMV cases (every format × scale mode, shapes 300×4096, "
                  "4096×11008, 257×1111, 64×14336, M = 1 and 3) against `F.linear` on the dequantized weight, all "
                  f"{'passed' if all(c['ok'] for c in checks) else 'NOT passed'}; largest relative error "
                  + ", ".join(f"{d} {e:.1e}" for d, e in sorted(per.items())) + ".", ""]
    extra_cols = sorted(other)
    lines += ["| format | bits | scales | N | K | quant us | FP16 us | speedup | weight GB/s | target |"
              + "".join(f" us with {c} |" for c in extra_cols),
              "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |" + " ---: |" * len(extra_cols)]
    for x in rows_l:
        tgt = x.get("target")
        mark = "-" if tgt is None else f"≥ {tgt:g}×: {'met' if x['speedup'] >= tgt else 'missed'}"
        key = (x["format"], str(x["group"]), x["N"], x["K"])
        lines.append(f"| {x['format']} | {x['bits']} | {_scales(x['group'])} | {x['N']} | {x['K']} | "
                     f"{x['us_quant']:.2f} | {x['us_fp16']:.2f} | {x['speedup']:.2f}× | {x['GBps']:.0f} | {mark} |"
                     + "".join(f" {other[c][key]:.2f} |" if key in other[c] else " - |" for c in extra_cols))
    lines += ["", "Decode (M = 1) speedup over FP16 `torch.matmul`, geometric mean over the shapes"
              + (" (`with (BLOCK_N, warps)`: the comparison run's quantized times over this run's FP16 times)"
                 if extra_cols else "") + ":", ""]
    for fmt, grp in dict.fromkeys((x["format"], str(x["group"])) for x in rows_l):
        sel = [x for x in rows_l if (x["format"], str(x["group"])) == (fmt, grp)]
        sp = [x["speedup"] for x in sel]
        tgt = sel[0].get("target")
        met = "" if tgt is None else (f" — target ≥ {tgt:g}×: **{'met' if min(sp) >= tgt else 'missed'}** "
                                      f"({sum(s >= tgt for s in sp)} of {len(sp)} shapes)")
        cmp = "".join(f"; with {c}: {geomean([x['us_fp16'] / other[c][k] for x in sel if (k := (x['format'], str(x['group']), x['N'], x['K'])) in other[c]]):.2f}×"
                      for c in extra_cols if any((x["format"], str(x["group"]), x["N"], x["K"]) in other[c] for x in sel))
        lines.append(f"* {fmt} ({sel[0]['bits']} bit, {_scales(grp)}): {geomean(sp):.2f}× (min {min(sp):.2f}×, "
                     f"max {max(sp):.2f}×){met}{cmp}")
    sweep = head.get("sweep") or []
    if sweep:
        cfgs = list(dict.fromkeys(_cfg(s["config"]) for s in sweep))
        lines += ["", "## Sweep: microseconds per `GEMV_CONFIG` (BLOCK_N, num_warps), fastest in bold", "",
                  "| format | N × K | " + " | ".join(str(c) + (" (default)" if c == main_cfg else "") for c in cfgs)
                  + " |", "| --- | --- |" + " ---: |" * len(cfgs)]
        for fmt, n, k in dict.fromkeys((s["format"], s["N"], s["K"]) for s in sweep):
            vals = {_cfg(s["config"]): s["us"] for s in sweep if (s["format"], s["N"], s["K"]) == (fmt, n, k)}
            lo = min(vals.values())
            lines.append(f"| {fmt} | {n}×{k} | " + " | ".join(
                "-" if c not in vals else (f"**{vals[c]:.2f}**" if vals[c] == lo else f"{vals[c]:.2f}") for c in cfgs)
                + " |")
    errs = [e for r in reports for e in r.get("errors", [])]
    if errs:
        lines += ["", "Not measured: " + "; ".join(errs)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default: examples/results)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="stop starting new cases after this many seconds (default: no limit)")
    ap.add_argument("--quick", action="store_true", help="4096x4096 only")
    ap.add_argument("--render", nargs="+", metavar="JSON",
                    help="re-render the Markdown from existing JSON file(s), no GPU needed; a file measured with "
                         "another GEMV_CONFIG adds a comparison column; written next to the first file (or into "
                         "--out when given)")
    args = ap.parse_args()
    example_main(args, script=Path(__file__).name, what="the Triton low-bit GEMV", load=lambda paths: [json.loads(Path(p).read_text()) for p in paths], markdown=markdown,
                 measure=measure)


if __name__ == "__main__":
    main()
