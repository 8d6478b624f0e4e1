"""
Decode GEMV (M = 1) for FP6 E3M2: word kernel vs the old tile GEMV vs FP16
==========================================================================

In this example you will learn

* how fxquant's FP6 **word GEMV** (``backends/triton_fp6.py``: the 2-bit and 4-bit planes read as 32-bit words, codes
  turned into floats by their bit pattern) compares with the earlier tile GEMV (``word_gemv=False``) and with FP16
  ``torch.matmul`` (cuBLAS) on the five LLaMA-7B layer shapes, with per-channel and group-128 scales;
* how to **check** every launch config (``fp6_linear(..., config=...)``), a bias and the autotuned dispatch against
  ``linear_fp6_reference`` before anything is timed (odd shapes included; the script fails loudly);
* how to **sweep** the forced configs — ``BLOCK_N`` rows a program, ``BLOCK_V`` 16-code groups a step (one a thread),
  ``SPLIT_K``, ``num_warps`` — the evidence behind the autotuning list ``WORD_GEMV_CONFIGS``.

Run it (a CUDA GPU with Triton; about two minutes on an H100)::

    python examples/bench_fp6_gemv.py                               # -> examples/results/fp6_gemv_<device>.json / .md
    python examples/bench_fp6_gemv.py --shapes 14336x4096,4096x14336 --out /tmp/b   # a subset of the shapes
    python examples/bench_fp6_gemv.py --render a.json b.json        # merge runs over different shapes, no GPU

Times come from :func:`bench_kernels.bench` (``examples/bench_kernels.py``): a CUDA graph of 20 x [flush the L2,
call] minus a graph of the flushes alone, median of 7 replays — kernel time without Python launch overhead, weights
read from HBM as in a real model. The old tile GEMV is skipped (``-``) when a ``--deadline`` is less than 15 s away.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from fxquant import benchmark
from fxquant.benchmark import GPU_METHOD, example_main, geomean, slug

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NAME = "fp6_gemv"
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]  # (N, K) = (out, in)
#: configs timed besides fxquant's WORD_GEMV_CONFIGS: (BLOCK_N, BLOCK_V, SPLIT_K, num_warps)
EXTRA_CONFIGS = [(4, 64, 1, 2), (8, 64, 1, 2), (2, 32, 1, 1), (4, 32, 1, 1), (16, 128, 1, 4)]
TOL = 5e-3          # fp16 output rounding alone is ~2e-4
TARGET = 2.2        # M = 1 speedup over FP16 torch.matmul
METHOD = GPU_METHOD


def _finite(v: Any) -> Any:
    """NaN (a skipped timing) -> None, so the JSON stays standard."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# %%
# Measurement
# -----------
def measure(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import triton

    import fxquant  # noqa: F401
    from fxquant.backends import fp6 as B
    from fxquant.backends import triton_fp6 as T
    from fxquant.fpformats import E3M2, FPQuantSpec, pack_fp6, quantize_fp

    bk = benchmark
    t0 = time.time()
    dev = torch.device("cuda")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    listed = [tuple(c.kwargs.values()) + (c.num_warps,) for c in T.WORD_GEMV_CONFIGS]
    sweep = list(T.WORD_GEMV_CONFIGS) + [T._wcfg(*c) for c in EXTRA_CONFIGS if c not in listed]
    name = torch.cuda.get_device_name(dev)
    out = Path(args.out or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{NAME}_{slug(name)}.json"
    report: dict[str, Any] = {
        "device": name, "torch": torch.__version__, "triton": triton.__version__,
        "command": " ".join(["python", "examples/bench_fp6_gemv.py", *sys.argv[1:]]), "method": METHOD,
        "word_configs": [str(c) for c in T.WORD_GEMV_CONFIGS],
        "sweep_configs": [list(c.kwargs.values()) + [c.num_warps] for c in sweep], "checks": [], "rows": []}

    def save() -> None:  # after every case, so a run cut short keeps its numbers
        path.write_text(json.dumps(_finite(report), indent=1))
        path.with_suffix(".md").write_text(markdown([_finite(report)]))

    def kw(p):
        return dict(in_features=p.in_features, exp_bits=p.container.exp_bits, bias=p.container.bias,
                    group_size=p.group_size)

    # ---- 1. correctness: every forced word config, odd shapes, both scale layouts, against the reference ------
    # (few distinct constexpr sets: each word config compiles once per scale layout, + once with a bias)
    g = torch.Generator().manual_seed(0)
    for (n, k) in [(4096, 4096), (1000, 4104)]:
        for group in (None, 128):
            w = torch.randn(n, k, generator=g) * 0.02
            w[:, torch.randperm(k, generator=g)[:8]] *= 30.0          # outlier input channels
            p = pack_fp6(quantize_fp(w, FPQuantSpec(format=E3M2, group_size=group))).to(dev)
            attrs = B.pack_fp6_tensors(p)[1]
            x = (torch.randn(1, k, generator=g) * 0.5)
            x[0, torch.randperm(k, generator=g)[:8]] *= 20.0            # outlier activations
            x = x.to(dev, torch.float16)
            bias = torch.randn(n, generator=g).to(dev, torch.float16)
            ref = B.linear_fp6_reference(x.float(), p.hi2, p.lo4, p.scale, None, **attrs)
            errs = []
            for cfg in T.WORD_GEMV_CONFIGS:
                errs.append(rel(T.fp6_linear(x, p.hi2, p.lo4, p.scale, None, config=cfg, **kw(p)), ref))
            y = T.fp6_linear(x, p.hi2, p.lo4, p.scale, bias, config=T.WORD_GEMV_CONFIGS[0], **kw(p))
            errs.append(rel(y, ref + bias.float()))
            errs.append(rel(T.fp6_linear(x, p.hi2, p.lo4, p.scale, None, **kw(p)), ref))   # autotuned dispatch
            report["checks"].append({"N": n, "K": k, "group": group, "rel_err_per_config": errs[:-2],
                                     "rel_err_bias": errs[-2], "rel_err_auto": errs[-1]})
            print(f"check {n:5d}x{k:5d} group={group}: rel err " + " ".join(f"{e:.1e}" for e in errs), flush=True)
            if not all(math.isfinite(e) and e < TOL for e in errs):
                save()
                raise SystemExit(f"FAIL word GEMV {n}x{k} group={group}: relative errors {errs}")
    print(f"checks passed ({time.time() - t0:.0f} s)", flush=True)
    save()

    # ---- 2. timing at M = 1 ------------------------------------------------------------------------------------
    deadline = math.inf if args.deadline is None else args.deadline
    print(f"{'N':>6} {'K':>6} {'scales':>8} | {'fp16 us':>8} {'old us':>8} {'new us':>8} | {'old x':>6} {'new x':>6}"
          f" | new GB/s | per-config us | autotuned", flush=True)
    for n, k in shapes:
        for group in (None, 128):
            if time.time() - t0 > deadline:
                print("deadline reached: stopping", flush=True)
                save()
                return report
            torch.manual_seed(n + k)
            w = torch.randn(n, k, device=dev) * 0.02
            w[:, torch.randperm(k, device=dev)[:8]] *= 30.0
            q = quantize_fp(w, FPQuantSpec(format=E3M2, group_size=group))
            p = pack_fp6(q)
            w16 = q.dequantize(torch.float16)
            x = torch.randn(1, k, device=dev, dtype=torch.float16)
            a = (x, p.hi2, p.lo4, p.scale, None)
            t16 = bk.bench(lambda: torch.matmul(x, w16.t()), dev)
            t_new = bk.bench(lambda: T.fp6_linear(*a, **kw(p)), dev)
            best = str(getattr(T._word_gemv, "best_config", None))
            t_cfg = [bk.bench(lambda c=c: T.fp6_linear(*a, config=c, **kw(p)), dev) for c in sweep]
            t_old = bk.bench(lambda: T.fp6_linear(*a, word_gemv=False, **kw(p)), dev) \
                if time.time() - t0 < deadline - 15 else float("nan")
            attrs = B.pack_fp6_tensors(p)[1]
            ref = B.linear_fp6_reference(x.float(), p.hi2, p.lo4, p.scale, None, **attrs)
            e_new = rel(T.fp6_linear(*a, **kw(p)), ref)
            if not (math.isfinite(e_new) and e_new < TOL):
                save()
                raise SystemExit(f"FAIL word GEMV {n}x{k} group={group}: relative error {e_new:.3e}")
            nbytes = p.nbytes() + 2 * (k + n)
            row = {"N": n, "K": k, "group": group, "fp16_us": t16 * 1e3, "old_us": t_old * 1e3, "new_us": t_new * 1e3,
                   "speedup_old": t16 / t_old, "speedup_new": t16 / t_new, "new_GBps": nbytes / t_new / 1e6,
                   "config_us": [t * 1e3 for t in t_cfg], "autotuned": best, "rel_err_new": e_new}
            report["rows"].append(row)
            save()
            print(f"{n:6d} {k:6d} {('g' + str(group)) if group else 'chan':>8} | {t16 * 1e3:8.1f} {t_old * 1e3:8.1f} "
                  f"{t_new * 1e3:8.1f} | {t16 / t_old:6.2f} {t16 / t_new:6.2f} | {nbytes / t_new / 1e6:8.0f} | "
                  + " ".join(f"{t * 1e3:.1f}" for t in t_cfg) + f" | {best}", flush=True)
    sp = [r["speedup_new"] for r in report["rows"]]
    if sp:
        report["geomean_speedup_new"] = math.exp(sum(map(math.log, sp)) / len(sp))
        print(f"new word GEMV vs FP16: geomean {report['geomean_speedup_new']:.2f}x, min {min(sp):.2f}x "
              f"(total {time.time() - t0:.0f} s)", flush=True)
    save()
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return report


# %%
# Report
# ------
def cfg_label(c) -> str:
    bn, bv, split, warps = c
    return f"{bn}×{bv}" + (f" s{split}" if split > 1 else "") + f" w{warps}"


def _parse_cfg(s: str | None) -> tuple[int, ...] | None:
    d = dict(re.findall(r"(\w+): (\w+)", s or ""))
    try:
        return int(d["BLOCK_N"]), int(d["BLOCK_V"]), int(d["SPLIT_K"]), int(d["num_warps"])
    except KeyError:
        return None


def _f(v: float | None, fmt: str = ".1f", unit: str = "") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:{fmt}}{unit}"


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from runs over different shapes: rows by (N, K, scales), later files win; checks and commands
    concatenated; the geometric mean recomputed."""
    out = {k: v for k, v in reports[0].items() if k not in ("rows", "checks", "command", "geomean_speedup_new")}
    rows: dict[tuple, dict] = {}
    for r in reports:
        if r.get("sweep_configs") != reports[0].get("sweep_configs"):
            raise SystemExit("these runs swept different config lists: render them separately")
        rows.update({(x["N"], x["K"], x["group"]): x for x in r["rows"]})
    out["rows"] = list(rows.values())
    out["checks"] = [c for r in reports for c in r.get("checks", [])]
    cmds = []
    for r in reports:
        c = r.get("command")
        cmds += c if isinstance(c, list) else ([c] if c else [])
    out["command"] = list(dict.fromkeys(cmds))
    sp = [x["speedup_new"] for x in out["rows"]]
    if sp:
        out["geomean_speedup_new"] = geomean(sp)
    return out


def markdown(reports: list[dict[str, Any]]) -> str:
    r = merge(reports)
    rows = r["rows"]
    sweep = [tuple(c) for c in r.get("sweep_configs", [])]
    listed = {_parse_cfg(s) for s in r.get("word_configs", [])}
    lines = [f"# FP6 E3M2 word GEMV (M = 1) on {r.get('device', 'unknown device')}", "",
             f"torch {r.get('torch', '?')}, triton {r.get('triton', '?')}. Method: {r.get('method', METHOD)}. "
             "Baseline: FP16 `torch.matmul` (cuBLAS) on the dequantized weight. `old` is the earlier tile GEMV "
             "(`fp6_linear(..., word_gemv=False)`), `new` the autotuned word GEMV (what a model runs).", ""]
    cmds = r.get("command") or []
    if cmds:
        lines += ["Command" + ("s (one run per set of shapes, merged)" if len(cmds) > 1 else "") + ": "
                  + "; ".join(f"`{c}`" for c in cmds), ""]
    if r.get("note"):
        lines += [r["note"], ""]
    checks = r.get("checks", [])
    if checks:
        errs = [e for c in checks for e in c["rel_err_per_config"] + [c["rel_err_bias"], c["rel_err_auto"]]]
        lines += [f"Checks before timing: every config of the autotuning list, a bias and the autotuned dispatch on "
                  f"{len({(c['N'], c['K'], c['group']) for c in checks})} cases (4096×4096 and 1000×4104, per-channel "
                  f"and g128) against `linear_fp6_reference`: largest relative error {max(errs):.1e} (limit {TOL:g}); "
                  f"each timed row is checked again (`rel_err_new` in the JSON).", ""]
    lines += ["| N | K | scales | FP16 us | old us | old speedup | new us | new speedup | new GB/s | autotuned | "
              f"target ≥ {TARGET:g}× |", "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for x in rows:
        c = _parse_cfg(x.get("autotuned"))
        lines.append(f"| {x['N']} | {x['K']} | {'g' + str(x['group']) if x['group'] else 'channel'} | "
                     f"{x['fp16_us']:.1f} | {_f(x.get('old_us'))} | {_f(x.get('speedup_old'), '.2f', '×')} | "
                     f"{x['new_us']:.1f} | {x['speedup_new']:.2f}× | {x['new_GBps']:.0f} | "
                     f"{cfg_label(c) if c else x.get('autotuned')} | "
                     f"{'met' if x['speedup_new'] >= TARGET else 'missed'} |")
    lines += ["", "Decode (M = 1) speedup of the word GEMV over FP16 `torch.matmul`, geometric mean over the shapes:", ""]
    for label, sel in (("FP6 per-channel", lambda x: not x["group"]), ("FP6 g128", lambda x: bool(x["group"])),
                       ("FP6, both", lambda x: True)):
        sp = [x["speedup_new"] for x in rows if sel(x)]
        if sp:
            lines.append(f"* {label}: {geomean(sp):.2f}× (min {min(sp):.2f}×, max {max(sp):.2f}×) — target ≥ {TARGET:g}×: "
                         f"**{'met' if min(sp) >= TARGET else 'missed'}** ({sum(s >= TARGET for s in sp)} of "
                         f"{len(sp)} cases)")
    if sweep and rows and all(len(x.get("config_us", [])) == len(sweep) for x in rows):
        seen: dict[tuple, int] = {}
        heads = []
        for c in sweep:
            seen[c] = seen.get(c, 0) + 1
            heads.append(cfg_label(c) + ("†" if c in listed else "") + (" (again)" if seen[c] > 1 else ""))
        lines += ["", "## Sweep: microseconds per forced config (fastest in bold)", "",
                  "Configs read `BLOCK_N×BLOCK_V [sSPLIT_K] wWARPS`: BLOCK_N rows a program, BLOCK_V 16-code groups a "
                  "step (one a thread). † = in the autotuning list `WORD_GEMV_CONFIGS`."
                  + (" A config marked (again) was timed a second time in the same run: the difference is the "
                     "run-to-run noise." if any(v > 1 for v in seen.values()) else ""), "",
                  "| N × K | scales | " + " | ".join(heads) + " |", "| --- | --- |" + " ---: |" * len(sweep)]
        for x in rows:
            lo = min(x["config_us"])
            lines.append(f"| {x['N']}×{x['K']} | {'g' + str(x['group']) if x['group'] else 'channel'} | " + " | ".join(
                f"**{v:.1f}**" if v == lo else f"{v:.1f}" for v in x["config_us"]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default: examples/results)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="stop starting new cases after this many seconds (default: no limit)")
    ap.add_argument("--shapes", default=None, help="comma-separated NxK list (default: the five LLaMA-7B shapes)")
    ap.add_argument("--render", nargs="+", metavar="JSON",
                    help="re-render the Markdown from existing JSON file(s), merging runs over different shapes, no "
                         "GPU needed; written next to the first file (or into --out when given)")
    args = ap.parse_args()
    example_main(args, script=Path(__file__).name, what="the Triton FP6 kernels", load=lambda paths: [json.loads(Path(p).read_text()) for p in paths], markdown=markdown,
                 measure=measure)


if __name__ == "__main__":
    main()
