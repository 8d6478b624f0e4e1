"""What each of I-LLM's 8-bit activation positions costs on SmolLM2: one position at a time, untrained FSBR.

For one ``fsbr-*`` recipe at ``epochs: 0`` (SmoothQuant scales, no training — the same for every row), the script
quantizes a fresh SmolLM2-135M-Instruct with: the linear inputs only; I-LLM's full allocation (norm inputs, SwiGLU
operands, Q/K/V and softmax output at 8 bits as well); and the full allocation with one position kept float at a
time; and the full allocation with the norm inputs quantized plain per token instead of channel-aligned
(``norm_align: 0``), and with the SwiGLU act-smooth started at the balanced scale (``act_smooth_alpha: 0.5``).
Perplexity on the same WikiText-2 test windows as FP32.

Run (CPU; about 2 minutes per row at 10 windows on two threads)::

    python examples/fsbr_allocation.py --recipe fsbr-w8a8 --alpha 0.7 --windows 10

Appends a section to ``examples/results/fsbr_allocation.md`` (and the rows to ``fsbr_allocation.json``).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time

import torch

from fxquant import load_model, quantize
from fxquant.evaluate import perplexity
from fxquant.recipes import get_recipe
from fsbr_smollm2 import append_results, smollm2_data   # examples/ is on sys.path when this script runs
FLOAT = dict(norm_bits=16, swiglu_bits=16, attn_bits=16, softmax_bits=16)
ROWS = [("linear inputs only", FLOAT), ("I-LLM: all positions", {}),
        ("all, norm inputs plain per token (norm_align 0)", {"norm_align": 0.0}),
        ("all, act-smooth balanced at init (act_smooth_alpha 0.5)", {"act_smooth_alpha": 0.5}),
        ("all but norm inputs", {"norm_bits": 16}), ("all but SwiGLU operands", {"swiglu_bits": 16}),
        ("all but Q/K/V", {"attn_bits": 16}), ("all but softmax output", {"softmax_bits": 16})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="fsbr-w8a8")
    ap.add_argument("--alpha", type=float, default=None, help="SmoothQuant α (default: the recipe's)")
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--samples", type=int, default=16, help="calibration sequences for the SmoothQuant statistics")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    ids, cal, fp32 = smollm2_data(args.windows)
    rows = []
    for label, widths in ROWS:
        lm = load_model("smollm2")
        recipe = get_recipe(args.recipe)
        recipe.options.update(epochs=0, samples=args.samples, seq_len=args.seq_len, progress=False, **widths)
        if args.alpha is not None:
            recipe.options["alpha"] = args.alpha
        quantize(lm.model, recipe, calibration=cal)
        ppl = perplexity(lm.model, ids=ids, windows=args.windows, progress=False).ppl
        rows.append({"row": label, "widths": widths, "ppl": ppl})
        print(f"{label}: {ppl:.3f} ({(ppl / fp32 - 1) * 100:+.2f}% vs FP32)", flush=True)
        del lm
    cmd = "python examples/fsbr_allocation.py " + " ".join(sys.argv[1:])
    out = {"command": cmd, "date": str(datetime.date.today()), "recipe": args.recipe, "alpha": args.alpha,
           "windows": args.windows, "fp32": fp32, "rows": rows, "torch": torch.__version__,
           "total_s": time.perf_counter() - start}
    full = next(r["ppl"] for r in rows if r["row"].startswith("I-LLM"))
    lines = [f"\n## {out['date']} — `{cmd}`\n",
             f"SmolLM2-135M-Instruct, WikiText-2 test, first {args.windows} windows of 512 tokens; `{args.recipe}` "
             f"untrained (SmoothQuant α {args.alpha if args.alpha is not None else 'of the recipe'}, {args.samples} × "
             f"{args.seq_len} calibration tokens), fake-quant; torch {torch.__version__}, {platform.machine()} CPU, "
             f"{args.threads} threads, {out['total_s'] / 60:.0f} min.\n",
             "| activations quantized | ppl | vs FP32 | vs I-LLM's full allocation |", "|---|---:|---:|---:|",
             f"| none (FP32) | {fp32:.3f} | — | — |"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['ppl']:.3f} | {(r['ppl'] / fp32 - 1) * 100:+.2f}% | "
                     f"{(r['ppl'] / full - 1) * 100:+.2f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.no_write:
        return
    append_results("fsbr_allocation",
                   "FSBR on SmolLM2: the cost of each 8-bit activation position (I-LLM's allocation) — measured", text, out)

if __name__ == "__main__":
    main()
