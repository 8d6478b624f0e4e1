"""Quality and size of SmolLM2-135M under every data-free recipe, side by side in one run.

What you will learn: how much WikiText-2 perplexity each weight format costs on a real LLaMA-architecture
model, and how many bytes its weights take when packed.

    python examples/quality_table.py --windows 40            # the README's table (about 10 min on 2 cores)
    python examples/quality_table.py --windows 4 --recipes fp32 rtn-w8

The model is loaded once; each recipe starts from a fresh copy of the float weights. Results go to
``examples/results/smollm2_quality.json`` and ``.md`` with the command that made them.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

import fxquant
from fxquant.api import quantize
from fxquant.data import eval_text
from fxquant.evaluate import perplexity, tokenize_text, weight_bytes

DEFAULT = ["fp32", "rtn-w8", "rtn-w4", "rtn-w4g128", "rtn-w4g128a", "rtn-w3g128", "rtn-w2g64", "fp6", "fp6g128"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--recipes", nargs="+", default=DEFAULT)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "smollm2_quality"))
    args = ap.parse_args()

    # 1. load the float model once and tokenize the evaluation text once
    lm = fxquant.load_model(args.model)
    ids = tokenize_text(lm.tokenizer, eval_text()[0])
    float_state = copy.deepcopy(lm.model.state_dict())

    # 2. each recipe: restore the float weights, quantize, score
    rows = []
    for name in args.recipes:
        lm.model.load_state_dict(float_state)
        start = time.perf_counter()
        result = quantize(lm.model, name)
        q_seconds = time.perf_counter() - start
        r = perplexity(lm.model, ids=ids, windows=args.windows, progress=False)
        rows.append({"recipe": name, "ppl": r.ppl, "tokens": r.tokens,
                     "weight_bytes": weight_bytes(lm.model, result.quantized),
                     "quantized_layers": len(result.quantized), "quantize_seconds": round(q_seconds, 1)})
        print(f"{name:<14} ppl {r.ppl:9.3f}  weights {rows[-1]['weight_bytes'] / 2**20:7.2f} MiB", flush=True)

    # 3. write JSON and a Markdown table with the command that made them
    command = "python examples/quality_table.py " + " ".join(sys.argv[1:])
    meta = {"model": args.model, "windows": args.windows, "seq_len": 512, "command": command.strip(),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "fxquant": fxquant.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    base = next((r["ppl"] for r in rows if r["recipe"] == "fp32"), None)
    lines = [f"SmolLM2-135M-Instruct, WikiText-2 test, first {args.windows} windows of 512 tokens "
             f"({rows[0]['tokens']} predicted tokens). Command: `{meta['command']}`", "",
             "| recipe | perplexity | vs fp32 | weights (MiB, packed) |", "|---|---:|---:|---:|"]
    for r in rows:
        rel = f"{(r['ppl'] / base - 1) * 100:+.2f}%" if base else ""
        lines.append(f"| {r['recipe']} | {r['ppl']:.3f} | {rel} | {r['weight_bytes'] / 2**20:.1f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
