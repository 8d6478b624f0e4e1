"""Peak resident memory while quantizing SmolLM2, against the size of the float32 model.

Each recipe runs in a fresh process (so one run's heap does not flatter the next), which reports its own
accounting from /proc/self/status: ``VmRSS`` after importing fxquant and after loading the model, and
``VmHWM`` — the peak — over the quantize call alone (reset with /proc/self/clear_refs just before it) and over the
whole process (load included). The target (issue #9): the quantize peak stays under 2.5× the float32 model's
size. Python, torch and transformers themselves are part of every number (≈ 220 MiB after import).

    python examples/bench_memory.py                       # rtn-w4g128, rtn-w8, fp6 -> examples/results/memory_smollm2.md
    python examples/bench_memory.py --recipes rtn-w4g128
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

CHILD = r"""
import json, sys, time
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, value = line.split(":", 1)
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out
import torch, fxquant
from fxquant.evaluate import weight_bytes
torch.set_num_threads(2)
rec = {"import_rss": status()["VmRSS"]}
lm = fxquant.load_model("smollm2")
rec["float32_model_bytes"] = weight_bytes(lm.model)
rec["load_rss"] = status()["VmRSS"]
open("/proc/self/clear_refs", "w").write("5")   # reset the peak: measure the quantize call alone
t = time.perf_counter()
result = fxquant.quantize(lm.model, sys.argv[1])
rec["quantize_seconds"] = time.perf_counter() - t
s = status()
rec["quantize_peak_rss"] = s["VmHWM"]
rec["after_rss"] = s["VmRSS"]
rec["packed_weight_bytes"] = result.weight_bytes
import os, tempfile
with tempfile.TemporaryDirectory() as tmp:   # and the checkpoint it makes, on disk
    out = result.save(os.path.join(tmp, "ckpt"), tokenizer=lm.tokenizer)
    rec["checkpoint_bytes"] = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
print("RESULT " + json.dumps(rec))
"""


def run(recipe: str) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, recipe], capture_output=True, text=True,
                          env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{recipe}: the measuring process failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    rec = json.loads(line[len("RESULT "):])
    rec["recipe"] = recipe
    rec["ratio"] = rec["quantize_peak_rss"] / rec["float32_model_bytes"]
    rec["wall_seconds"] = time.perf_counter() - t
    print(f"{recipe}: peak {rec['quantize_peak_rss'] / 2**20:.0f} MiB = {rec['ratio']:.2f}x the float32 model "
          f"({rec['float32_model_bytes'] / 2**20:.0f} MiB)", flush=True)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["rtn-w4g128", "rtn-w8", "fp6"])
    ap.add_argument("--out", default=str(RESULTS / "memory_smollm2"))
    args = ap.parse_args()
    rows = [run(r) for r in args.recipes]
    mib = 2 ** 20
    lines = ["# Peak memory while quantizing SmolLM2-135M (CPU)", "",
             f"Command: `python examples/bench_memory.py --recipes {' '.join(args.recipes)}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
             f"{time.strftime('%Y-%m-%d')}", "",
             "Each recipe in a fresh process; numbers are that process's own `/proc/self/status` (RSS includes "
             "Python, torch and transformers). Peak = `VmHWM` over the `fxquant.quantize` call (capture, passes, "
             "write-back), reset just before it. \"checkpoint on disk\": the folder `result.save()` writes (packed weights, "
             "the float32 embedding, tokenizer).", "",
             "| recipe | float32 model | RSS after import | RSS after load | **peak while quantizing** | peak / model | "
             "RSS after | packed weights | checkpoint on disk | quantize s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['float32_model_bytes'] / mib:.0f} MiB | {r['import_rss'] / mib:.0f} MiB | "
                     f"{r['load_rss'] / mib:.0f} MiB | **{r['quantize_peak_rss'] / mib:.0f} MiB** | "
                     f"**{r['ratio']:.2f}×** | {r['after_rss'] / mib:.0f} MiB | {r['packed_weight_bytes'] / mib:.0f} MiB | "
                     f"{r['checkpoint_bytes'] / mib:.0f} MiB | {r['quantize_seconds']:.1f} |")
    lines += ["", "Target (issue #9): peak / model < 2.5×."]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}.md")
    return 0 if all(r["ratio"] < 2.5 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
