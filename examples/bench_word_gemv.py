"""
Decode GEMV (M = 1) for int8 / int4: the word kernel, config by config
=====================================================================

In this example you will learn

* how fxquant's **word GEMV** (``backends/triton_int.py``, the kernel every int8 / int4 linear runs at M = 1 on a
  GPU) is timed against FP16 ``torch.matmul`` (cuBLAS) on the five LLaMA-7B layer shapes;
* how to **force one launch config** (``wq_linear(..., config=...)``) and sweep all of them: ``BLOCK_N`` rows a
  program, ``BLOCK_W`` 32-bit words a step (``BLOCK_W / (32 * num_warps)`` words a thread), ``SPLIT_K`` and
  ``num_warps`` — the sweep is the evidence behind the autotuning list ``WORD_GEMV_CONFIGS``;
* how every timed call is **checked** first against ``F.linear`` on the exactly dequantized weight;
* how to read one launch with Nsight Compute (``--profile-config``) and tell a kernel bound by loads in flight
  from one bound by bandwidth or arithmetic.

Run it (a CUDA GPU with Triton; about a minute on an H100)::

    python examples/bench_word_gemv.py                     # -> examples/results/word_gemv_<device>.json / .md
    python examples/bench_word_gemv.py --deadline 120      # stop starting new cases after 120 s
    python examples/bench_word_gemv.py --render examples/results/word_gemv_nvidia-h100-80gb-hbm3.json  # no GPU
    ncu -k regex:_wq_gemv_words --launch-skip 2 --launch-count 1 --section SpeedOfLight --section Occupancy \\
        --section LaunchStats python examples/bench_word_gemv.py --profile-config 8,64,1,2

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
NAME = "word_gemv"
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]  # (N, K) = (out, in)
#: configs timed besides fxquant's WORD_GEMV_CONFIGS (BLOCK_N, BLOCK_W, SPLIT_K, num_warps): with the current list
#: these are the 13 configs of the sweep that chose it
EXTRA_CONFIGS = [(16, 64, 1, 2), (16, 128, 1, 4), (8, 32, 1, 1), (4, 32, 1, 1), (16, 32, 1, 1), (16, 64, 2, 2),
                 (2, 128, 1, 1), (8, 256, 1, 8), (4, 128, 1, 4)]
TARGETS = {"int8": 1.8, "int4": 3.0}   # M = 1 speedup over FP16 torch.matmul
TOL = 2e-3
METHOD = GPU_METHOD


def cfg_key(i: int, cfg) -> str:
    """Row key of one forced config: ``c<i>_<BLOCK_N>_<BLOCK_W>_<SPLIT_K>_w<warps>``."""
    return "c%d_%s" % (i, "_".join(str(v) for v in cfg.kwargs.values()) + f"_w{cfg.num_warps}")


# %%
# Measurement
# -----------
# One random weight per shape with a few outlier input channels; three formats; FP16 ``torch.matmul`` once per
# shape; then the autotuned dispatch and every forced config, each checked before it is timed.
def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import triton

    import fxquant  # noqa: F401
    from fxquant.backends import registry
    from fxquant.backends import triton_int as ti
    from fxquant.quant import QuantSpec, quantize_weight

    bk = benchmark
    dev = torch.device("cuda")
    formats = {"int8 perchan": QuantSpec(8), "int4 g128": QuantSpec(4, group_size=128),
               "int4 g128 asym": QuantSpec(4, symmetric=False, group_size=128)}
    word_configs = [tuple(c.kwargs.values()) + (c.num_warps,) for c in ti.WORD_GEMV_CONFIGS]
    sweep = list(ti.WORD_GEMV_CONFIGS) + [ti._wcfg(*c) for c in EXTRA_CONFIGS if c not in word_configs]
    out = Path(args.out or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(dev)
    path = out / f"{NAME}_{slug(name)}.json"
    report: dict[str, Any] = {
        "device": name, "torch": torch.__version__, "triton": triton.__version__,
        "command": " ".join(["python", "examples/bench_word_gemv.py", *sys.argv[1:]]), "method": METHOD,
        "word_configs": [list(c) for c in word_configs],
        "sweep_configs": [list(c.kwargs.values()) + [c.num_warps] for c in sweep], "rows": []}

    def save() -> None:  # after every shape, so a run cut short keeps its numbers
        path.write_text(json.dumps(report, indent=1, default=str))
        path.with_suffix(".md").write_text(markdown([report]))

    t0 = time.time()
    for n, k in SHAPES:
        torch.manual_seed(0)
        w = torch.randn(n, k, device=dev) * 0.02
        w[:, torch.randperm(k, device=dev)[:8]] *= 30   # outlier input channels
        wf = w.half()
        x = torch.randn(1, k, device=dev, dtype=torch.float16)
        t_f = bk.bench(lambda: torch.matmul(x, wf.t()), dev)
        for fname, spec in formats.items():
            if args.deadline is not None and time.time() - t0 > args.deadline:
                print("deadline: skipping", fname, n, k, flush=True)
                continue
            qw = quantize_weight(w, spec)
            p = registry.pack(qw)
            ts = [p.tensors[t] for t in p.fmt.tensor_names]
            bits = 4 if p.fmt.name == "int4" else 8
            ref = torch.nn.functional.linear(x.float(), qw.dequantize(torch.float16).float())
            res: dict[str, Any] = {"fmt": fname, "N": n, "K": k, "fp16_us": t_f * 1e3}
            for i, cfg in enumerate([None] + sweep):
                call = lambda cfg=cfg: ti.wq_linear(x, *ts, None, bits=bits, config=cfg, **p.attrs)  # noqa: E731
                rel = float((call().float() - ref).norm() / ref.norm())
                if not rel < TOL or ti._LAST_LAUNCH["kernel"] is not ti._wq_gemv_words_kernel:
                    raise SystemExit(f"FAIL {fname} {n}x{k} config {cfg}: relative error {rel:.2e}, kernel "
                                     f"{getattr(ti._LAST_LAUNCH.get('kernel'), '__name__', '?')}")
                t = bk.bench(call, dev)
                res["auto" if cfg is None else cfg_key(i - 1, cfg)] = t * 1e3
                if cfg is None:
                    res["auto_cfg"] = str(getattr(ti._word_gemv, "best_config", None))
                    res["resources"] = ti.last_kernel_resources()
            best = min(v for kk, v in res.items() if kk.startswith("c"))
            res["speedup_auto"] = res["fp16_us"] / res["auto"]
            res["speedup_best"] = res["fp16_us"] / best
            report["rows"].append(res)
            print(f"{fname:15s} {n:6d}x{k:<6d} fp16 {t_f * 1e3:6.1f}  auto {res['auto']:6.1f} "
                  f"({res['speedup_auto']:.2f}x)  best {best:6.1f} ({res['speedup_best']:.2f}x)  "
                  + " ".join(f"{v:.1f}" for kk, v in res.items() if kk.startswith("c")), flush=True)
        save()
    report["elapsed_s"] = time.time() - t0
    save()
    print(f"elapsed {report['elapsed_s']:.0f} s; wrote {path} and {path.with_suffix('.md')}")
    return report


def profile_one(spec: str) -> None:
    """Three launches of one forced config (int4 g128, 4096 x 4096, M = 1): run under ``ncu``."""
    import torch

    from fxquant.backends import registry
    from fxquant.backends import triton_int as ti
    from fxquant.quant import QuantSpec, quantize_weight

    dev = torch.device("cuda")
    w = torch.randn(4096, 4096, device=dev) * 0.02
    p = registry.pack(quantize_weight(w, QuantSpec(4, group_size=128)))
    ts = [p.tensors[t] for t in p.fmt.tensor_names]
    x = torch.randn(1, 4096, device=dev, dtype=torch.float16)
    cfg = ti._wcfg(*map(int, spec.split(",")))
    for _ in range(3):
        ti.wq_linear(x, *ts, None, bits=4, config=cfg, **p.attrs)
    torch.cuda.synchronize()
    print("ok")


# %%
# Report
# ------
_KEY = re.compile(r"^c(\d+)_(\d+)_(\d+)_(\d+)_w(\d+)$")


def _cfg_of_key(key: str) -> tuple[int, ...] | None:
    m = _KEY.match(key)
    return tuple(int(v) for v in m.groups()[1:]) if m else None


def cfg_label(c) -> str:
    bn, bw, split, warps = c
    return f"{bn}×{bw}" + (f" s{split}" if split > 1 else "") + f" w{warps}"


def _auto_label(s: str | None) -> str:
    if not s or s == "None":
        return "-"
    d = dict(re.findall(r"(\w+): (\w+)", s))
    try:
        return cfg_label((int(d["BLOCK_N"]), int(d["BLOCK_W"]), int(d["SPLIT_K"]), int(d["num_warps"])))
    except KeyError:
        return s


def _target(fmt: str) -> float | None:
    return next((t for prefix, t in TARGETS.items() if fmt.startswith(prefix)), None)


def load(paths: list[str]) -> list[dict[str, Any]]:
    """Reports from JSON files; a bare list of rows (the first recorded format) becomes ``{"rows": ...}``."""
    out = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        out.append({"rows": d} if isinstance(d, list) else d)
    return out


def markdown(reports: list[dict[str, Any]]) -> str:
    """One Markdown page from one or more reports (rows of later files replace same format-and-shape rows)."""
    head = reports[0]
    rows_by: dict[tuple, dict] = {}
    for r in reports:
        for row in r["rows"]:
            rows_by[(row["fmt"], row["N"], row["K"])] = row
    rows = list(rows_by.values())
    listed = {tuple(c) for c in head.get("word_configs", [])}
    now = {tuple(c) for c in head.get("word_configs_now", [])}
    dev = head.get("device", "unknown device")
    lines = [f"# int8 / int4 word GEMV (M = 1) on {dev}", "",
             f"torch {head.get('torch', '?')}, triton {head.get('triton', '?')}. Method: {head.get('method', METHOD)}. "
             "Baseline: FP16 `torch.matmul` (cuBLAS) on the same random weight (a few outlier input channels). "
             f"Every timed call was first checked against `F.linear` on the dequantized weight (relative error < {TOL:g}).",
             ""]
    cmds = [r.get("command") for r in reports if r.get("command")]
    if cmds:
        lines += ["Command: " + "; ".join(f"`{c}`" for c in dict.fromkeys(cmds)), ""]
    if head.get("note"):
        lines += [head["note"], ""]
    lines += ["`auto` is the autotuned dispatch (what a model runs), `best` the fastest forced config of the sweep. "
              "Configs read `BLOCK_N×BLOCK_W [sSPLIT_K] wWARPS`: BLOCK_N rows a program, BLOCK_W 32-bit words a step, "
              "so BLOCK_W / (32 · warps) words a thread.", "",
              "| format | N | K | FP16 us | auto us | auto speedup | autotuned | regs | best us | best config | "
              "best speedup | target |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | --- |"]
    for r in rows:
        cfgs = {k: v for k, v in r.items() if _cfg_of_key(k)}
        bk = min(cfgs, key=cfgs.get) if cfgs else None
        tgt = _target(r["fmt"])
        mark = "-" if tgt is None else f"≥ {tgt:g}×: {'met' if r['speedup_auto'] >= tgt else 'missed'}"
        regs = (r.get("resources") or {}).get("n_regs", "-")
        lines.append(f"| {r['fmt']} | {r['N']} | {r['K']} | {r['fp16_us']:.1f} | {r['auto']:.1f} | "
                     f"{r['speedup_auto']:.2f}× | {_auto_label(r.get('auto_cfg'))} | {regs} | "
                     f"{cfgs[bk] if bk else float('nan'):.1f} | {cfg_label(_cfg_of_key(bk)) if bk else '-'} | "
                     f"{r['speedup_best']:.2f}× | {mark} |")
    lines += ["", "Decode (M = 1) speedup over FP16 `torch.matmul`, geometric mean over the shapes "
              "(autotuned; best forced config in brackets):", ""]
    for fmt in dict.fromkeys(r["fmt"] for r in rows):
        sp = [r["speedup_auto"] for r in rows if r["fmt"] == fmt]
        sb = [r["speedup_best"] for r in rows if r["fmt"] == fmt]
        tgt = _target(fmt)
        met = "" if tgt is None else (f" — target ≥ {tgt:g}×: **{'met' if min(sp) >= tgt else 'missed'}** "
                                      f"({sum(s >= tgt for s in sp)} of {len(sp)} shapes)")
        lines.append(f"* {fmt}: {geomean(sp):.2f}× (min {min(sp):.2f}×, max {max(sp):.2f}×) "
                     f"[best config: {geomean(sb):.2f}×]{met}")
    if now:
        lines += ["", "Best config within the current `WORD_GEMV_CONFIGS` (from the sweep below: the pick the "
                  "autotuner can make now), speedup over FP16:", ""]
        for fmt in dict.fromkeys(r["fmt"] for r in rows):
            sp = []
            for r in (r for r in rows if r["fmt"] == fmt):
                cand = [v for k, v in r.items() if _cfg_of_key(k) in now]
                if cand:
                    sp.append(r["fp16_us"] / min(cand))
            if sp:
                lines.append(f"* {fmt}: {geomean(sp):.2f}× (min {min(sp):.2f}×, max {max(sp):.2f}×)")
    # ---- the sweep
    keys = list(dict.fromkeys(k for r in rows for k in r if _cfg_of_key(k)))
    if keys:
        def mark(c):
            return ("†" if c in listed else "") + ("*" if c in now else "")
        lines += ["", "## Sweep: microseconds per forced config (fastest in bold)", "",
                  "† = in the autotuning list of this run" + (", * = in the current `WORD_GEMV_CONFIGS`" if now else "")
                  + ".", "",
                  "| format | N × K | " + " | ".join(cfg_label(_cfg_of_key(k)) + mark(_cfg_of_key(k)) for k in keys)
                  + " |", "| --- | --- |" + " ---: |" * len(keys)]
        for r in rows:
            vals = [r.get(k) for k in keys]
            lo = min(v for v in vals if v is not None)
            lines.append(f"| {r['fmt']} | {r['N']}×{r['K']} | " + " | ".join(
                "-" if v is None else (f"**{v:.1f}**" if v == lo else f"{v:.1f}") for v in vals) + " |")
    # ---- history and profiler readings, when the report carries them
    hist = [h for r in reports for h in r.get("history", [])]
    if hist:
        versions = hist + [{"version": head.get("version", "this run"), "note": head.get("version_note", ""),
                            "rows": rows}]
        lines += ["", "## History: the kernel versions on this device", ""]
        lines += [f"* **{v['version']}**: {v['note']}" for v in versions]
        lines += ["", "Speedup over FP16 `torch.matmul` at M = 1, autotuned / best forced config "
                  "(each version's own FP16 time and config list):", "",
                  "| format | N × K | " + " | ".join(v["version"] for v in versions) + " |",
                  "| --- | --- |" + " ---: |" * len(versions)]
        cases = list(dict.fromkeys((r["fmt"], r["N"], r["K"]) for v in versions for r in v["rows"]))
        for fmt, n, k in cases:
            cells = []
            for v in versions:
                r = next((r for r in v["rows"] if (r["fmt"], r["N"], r["K"]) == (fmt, n, k)), None)
                cells.append("-" if r is None else f"{r['speedup_auto']:.2f}× / {r['speedup_best']:.2f}×")
            lines.append(f"| {fmt} | {n}×{k} | " + " | ".join(cells) + " |")
        lines += ["", "Geometric mean over the shapes, autotuned / best:", ""]
        for fmt in dict.fromkeys(c[0] for c in cases):
            cells = []
            for v in versions:
                a = [r["speedup_auto"] for r in v["rows"] if r["fmt"] == fmt]
                b = [r["speedup_best"] for r in v["rows"] if r["fmt"] == fmt]
                cells.append(f"{v['version']} {geomean(a):.2f}× / {geomean(b):.2f}×" if a else f"{v['version']} -")
            lines.append(f"* {fmt}: " + ", ".join(cells))
    ncu = [n for r in reports for n in r.get("ncu", [])]
    if ncu:
        lines += ["", "## Nsight Compute: one launch, int4 g128, 4096 × 4096, M = 1", "",
                  "ncu locks the SM clock (about 1.58 GHz here) and flushes caches, so its durations are longer than "
                  "the CUDA-graph medians above; the ratios are what matter.", "",
                  "| version | config | grid × block | registers / thread | theoretical occupancy | achieved occupancy "
                  "(warps / SM) | DRAM throughput | memory throughput | compute (SM) throughput | duration |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for n in ncu:
            lines.append(f"| {n['version']} | {cfg_label(n['config'])} ({n['words_per_thread']} word{'s' if n['words_per_thread'] > 1 else ''} / thread) | "
                         f"{n['grid']} × {n['block']} | {n['registers']} | {n['theoretical_occupancy_pct']:.2f} % | "
                         f"{n['achieved_occupancy_pct']:.2f} % ({n['achieved_warps_per_sm']:.2f}) | "
                         f"{n['dram_throughput_pct']:.2f} % | {n['memory_throughput_pct']:.2f} % | "
                         f"{n['compute_throughput_pct']:.2f} % | {n['duration_us']:.2f} us |")
        def one(n):
            asked = n["grid"] * n["block"] / 32 / 132
            cap = n.get("theoretical_warps_per_sm")
            limit = (f"{n['registers']} registers allow {cap:g}" if cap is not None else "")
            why = ("the registers are the limit" if cap is not None and asked > cap else "the grid is the limit")
            return (f"{n['version']}: {n['grid']} programs × {n['block'] // 32} warps = {asked:.1f} warps per SM "
                    f"asked on 132 SMs, {limit} ({why}), {n['achieved_warps_per_sm']:.2f} achieved")
        lines += ["", f"**Conclusion.** The kernel is bound by the loads in flight, not by bandwidth or arithmetic: "
                  f"DRAM throughput stays at {min(n['dram_throughput_pct'] for n in ncu):.0f}–"
                  f"{max(n['dram_throughput_pct'] for n in ncu):.0f} % and compute (SM) throughput at "
                  f"{min(n['compute_throughput_pct'] for n in ncu):.0f}–{max(n['compute_throughput_pct'] for n in ncu):.0f} %"
                  " of peak, while achieved occupancy is low. At N = 4096 the grid has too few warps to cover the "
                  "memory latency — " + "; ".join(one(n) for n in ncu) + ". Cutting the registers (v3) raised the "
                  "ceiling but not the achieved occupancy, because the grid itself is then the limit; more bytes in "
                  "flight per SM needs more warps (a persistent or split-K schedule) or more loads in flight per warp."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default: examples/results)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="stop starting new cases after this many seconds (default: no limit)")
    ap.add_argument("--render", nargs="+", metavar="JSON",
                    help="re-render the Markdown from existing JSON file(s), no GPU needed; written next to the "
                         "first file (or into --out when given)")
    ap.add_argument("--profile-config", metavar="BN,BW,SK,W",
                    help="only launch this config three times (int4 g128, 4096 x 4096), for ncu")
    args = ap.parse_args()
    if args.profile_config:
        import torch
        if not torch.cuda.is_available():
            raise SystemExit(f"{Path(__file__).name} --profile-config needs a CUDA GPU")
        profile_one(args.profile_config)
        return
    example_main(args, script=Path(__file__).name, what="the Triton word GEMV", load=load, markdown=markdown,
                 measure=measure)


if __name__ == "__main__":
    main()
