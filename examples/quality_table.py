"""Quality and size of SmolLM2-135M under every data-free recipe, side by side in one run.

What you will learn: how much WikiText-2 perplexity each weight format costs on a real LLaMA-architecture
model, and how many bytes its weights take when packed.

    python examples/quality_table.py --windows 40            # the README's table (about 10 min on 2 cores)
    python examples/quality_table.py --windows 4 --recipes fp32 rtn-w8
    python examples/quality_table.py --windows 40 --recipes teq-fp6 --steps 60   # TEQ on a short budget

The model is loaded once; each recipe starts from a fresh copy of the float weights. Results go to
``examples/results/smollm2_quality.json`` and ``.md``: rows measured by this run replace the rows of the same
recipe, the other rows are kept if they were measured with the same ``--model`` and ``--windows`` (``--fresh``
drops them), and every row records the command that made it. Recipes that need calibration data (TEQ) train on
the WikiText-2 train text with the ``--steps`` / ``--seq-len`` / ``--batch-size`` / ``--lr`` budget, which is
part of the row's label (``teq-fp6 (60 steps)``, ``teq-fp6 (40 steps, lr=0.0001)``) so a short run is never
mistaken for the default budget and runs with different budgets keep their own rows.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

import fxquant
from fxquant.api import quantize
from fxquant.recipes import get_recipe, method_options
from fxquant.data import calibration_text, eval_text
from fxquant.evaluate import perplexity, tokenize_text, weight_bytes

DEFAULT = ["fp32", "rtn-w8", "rtn-w4", "rtn-w4g128", "rtn-w4g128a", "rtn-w3g128", "rtn-w2g64", "fp6", "fp6g128"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--recipes", nargs="+", default=DEFAULT)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "smollm2_quality"))
    ap.add_argument("--fresh", action="store_true", help="drop the rows already in the output files")
    ap.add_argument("--steps", type=int, default=None, help="training steps of recipes that need data (TEQ)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe option for recipes that take options (value parsed as YAML: true, 8, 0.5); "
                         "repeatable, and part of the row's label, e.g. --option clip_scale_up=true")
    args = ap.parse_args()
    # the passes' progress lines (TEQ's init search, each trained block, the clip search) on stderr
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("fxquant").setLevel(logging.INFO)
    command = ("python examples/quality_table.py " + " ".join(sys.argv[1:])).strip()

    # 1. load the float model once and tokenize the evaluation text once
    lm = fxquant.load_model(args.model)
    ids = tokenize_text(lm.tokenizer, eval_text()[0])
    float_state = copy.deepcopy(lm.model.state_dict())

    # 2. each recipe: restore the float weights, quantize, score
    meta = {"model": args.model, "windows": args.windows, "seq_len": 512, "command": command,
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "fxquant": fxquant.__version__}
    extra = parse_options(args.option)
    rows = [] if args.fresh else _previous_rows(args.out, meta)
    calib = None
    for name in args.recipes:
        recipe = get_recipe(name)
        label = name
        if extra and recipe.data_free:
            raise SystemExit(f"--option is for recipes trained on data (teq-*); {name} takes none")
        if not recipe.data_free:
            if calib is None:
                calib = tokenize_text(lm.tokenizer, calibration_text()[0])
            accepted = method_options(recipe.method)   # gptq-* take no steps/lr/batch size
            budget = {k: v for k, v in (("steps", args.steps), ("seq_len", args.seq_len),
                                        ("batch_size", args.batch_size), ("lr", args.lr))
                      if v is not None and k in accepted}
            recipe.options.update(budget, **extra, progress=False)
            recipe.validate()   # a misspelt --option stops here, before any work
            # every budget flag and option given is in the label: runs that differ in any of them keep their own rows
            given = {**{k: v for k, v in budget.items() if k != "steps"}, **extra}
            settings = ([f"{recipe.options.get('steps')} steps"] if "steps" in accepted else []) + [
                f"{k}={v}" for k, v in given.items()]
            label = f"{name} ({', '.join(settings)})" if settings else name
        lm.model.load_state_dict(float_state)
        start = time.perf_counter()
        result = quantize(lm.model, recipe, calibration=calib)
        q_seconds = time.perf_counter() - start
        r = perplexity(lm.model, ids=ids, windows=args.windows, progress=False)
        row = {"recipe": label, "ppl": r.ppl, "tokens": r.tokens,
               "weight_bytes": weight_bytes(lm.model, result.quantized),
               "quantized_layers": len(result.quantized), "quantize_seconds": round(q_seconds, 1),
               "command": command}
        if not recipe.data_free:
            row["options"] = {k: v for k, v in recipe.options.items() if k != "progress"}
        rows = [old for old in rows if old["recipe"] != label] + [row]
        print(f"{label:<18} ppl {r.ppl:9.3f}  weights {row['weight_bytes'] / 2**20:7.2f} MiB", flush=True)
        _write(args.out, meta, rows)  # after every row: a long run that is cut off keeps what it measured
    print(Path(args.out + ".md").read_text())


def parse_options(items: list[str]) -> dict:
    """``--option KEY=VALUE`` flags as recipe options (each value read as YAML: true, 8, 0.5, null)."""
    import yaml
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option takes KEY=VALUE, got {item!r} (e.g. --option clip_scale_up=true)")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _previous_rows(out: str, meta: dict) -> list[dict]:
    """The rows already in ``out.json`` if they were measured by the same protocol (model, windows), else none."""
    path = Path(out + ".json")
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    old_meta = old.get("meta", {})
    if (old_meta.get("model"), old_meta.get("windows")) != (meta["model"], meta["windows"]):
        print(f"note: {path} was measured with another model/windows; starting a new table", flush=True)
        return []
    # rows from before per-row commands carry the command of the run that made the file
    return [{**r, "command": r.get("command", old_meta.get("command", ""))} for r in old.get("rows", [])]


def _write(out: str, meta: dict, rows: list[dict]) -> None:
    """JSON (meta + rows) and a Markdown table; each row names the command that measured it."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    base = next((r["ppl"] for r in rows if r["recipe"] == "fp32"), None)
    commands = list(dict.fromkeys(r["command"] for r in rows))
    lines = [f"SmolLM2-135M-Instruct, WikiText-2 test, first {meta['windows']} windows of 512 tokens "
             f"({rows[0]['tokens']} predicted tokens). Each row was measured by the command whose number it "
             "carries (listed below the table).", "",
             "| recipe | perplexity | vs fp32 | weights (MiB, packed) | command |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        rel = f"{(r['ppl'] / base - 1) * 100:+.2f}%" if base else ""
        lines.append(f"| {r['recipe']} | {r['ppl']:.3f} | {rel} | {r['weight_bytes'] / 2**20:.1f} | "
                     f"{commands.index(r['command']) + 1} |")
    lines += ["", "Commands:", ""] + [f"{i + 1}. `{c}`" for i, c in enumerate(commands)]
    Path(out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
