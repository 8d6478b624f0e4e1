"""Integer-only SmolLM2 decode with and without the integer KV cache, side by side in one run (CPU).

The ``illm-w8a8`` recipe is run once (SmoothQuant scales from WikiText-2 validation, per-channel 8-bit weights);
the same rounded weights are lowered twice: with the integer KV cache (the recipe's default where the model allows
one) and without (every generated token re-runs the whole sequence). Both generate greedily from the same prompt;
the script checks that they pick the same tokens (the cached steps compute the whole sequence's logits bit for
bit) and reports the median time per generated token over alternating repeats, next to the float model's
Hugging Face ``generate()`` with its own KV cache.

    python examples/bench_illm_decode.py --prompt-tokens 48 --new-tokens 32 --repeats 3

Writes ``examples/results/illm_decode_cpu.{json,md}`` with the command that made them.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from fxquant import load_model, quantize
from fxquant.capture import capture
from fxquant.data import calibration_text, eval_text
from fxquant.evaluate import tokenize_text
from fxquant.intmodel import IntegerOnlyModel
from fxquant.passes.lower_integer_only import lower_integer_only
from fxquant.recipes import get_recipe, illm_integer_config

OUT = Path(__file__).parent / "results" / "illm_decode_cpu"


def timed(fn) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="illm-w8a8")
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model("smollm2")
    float_model = copy.deepcopy(lm.model)
    text, _ = eval_text(None)
    prompt = tokenize_text(lm.tokenizer, text)[: args.prompt_tokens][None]
    cal = tokenize_text(lm.tokenizer, calibration_text(None)[0])
    recipe = get_recipe(args.recipe)
    res = quantize(lm.model, recipe, calibration=cal)
    cached = res.integer_model
    if not cached.has_kv_cache:
        raise SystemExit(f"{args.recipe} lowered SmolLM2 without a KV cache: nothing to compare")
    cfg = illm_integer_config({**recipe.options, "kv_cache": False})
    plain_cg = capture(lm.model)
    lower_integer_only(plain_cg, cfg, dict(res.artifacts.get("quantized_weights", {})))
    plain = IntegerOnlyModel(plain_cg, config=lm.model.config)

    n = args.new_tokens
    runs: dict[str, list[float]] = {"integer, KV cache": [], "integer, no cache": [], "fp32 eager (HF generate)": []}
    outs: dict[str, torch.Tensor] = {}
    for r in range(args.repeats):
        for name, fn in (("integer, KV cache", lambda: cached.generate(prompt, max_new_tokens=n)),
                         ("integer, no cache", lambda: plain.generate(prompt, max_new_tokens=n)),
                         ("fp32 eager (HF generate)", lambda: float_model.generate(
                             prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=lm.tokenizer.eos_token_id))):
            with torch.no_grad():
                sec, out = timed(fn)
            runs[name].append(sec / n)
            outs[name] = out
            print(f"repeat {r}: {name}: {sec:.1f} s for {n} tokens", flush=True)
    same = torch.equal(outs["integer, KV cache"], outs["integer, no cache"])
    if not same:
        raise SystemExit("the cached and the re-running integer graphs generated different tokens")
    med = {k: statistics.median(v) for k, v in runs.items()}
    base = med["integer, no cache"]
    rows = [{"model": k, "median_s_per_token": med[k], "tokens_per_s": 1 / med[k], "speedup_vs_no_cache": base / med[k],
             "runs_s_per_token": runs[k]} for k in runs]
    cmd = "python examples/bench_illm_decode.py " + " ".join(sys.argv[1:])
    result = {"date": str(datetime.date.today()), "command": cmd, "recipe": args.recipe, "threads": args.threads,
              "prompt_tokens": args.prompt_tokens, "new_tokens": n, "repeats": args.repeats,
              "torch": torch.__version__, "machine": platform.machine(), "same_tokens": same, "rows": rows,
              "text": lm.tokenizer.decode(outs["integer, KV cache"][0, args.prompt_tokens:])}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"# Integer-only SmolLM2 decode, with and without the integer KV cache ({result['date']})", "",
             f"`{cmd}` — SmolLM2-135M-Instruct, `{args.recipe}`, {args.prompt_tokens}-token WikiText-2 prompt, "
             f"{n} greedy tokens, {args.threads} threads, torch {torch.__version__}, {platform.machine()} CPU; "
             f"median of {args.repeats} alternating repeats. The cached and re-running integer graphs generated "
             f"the same tokens: {same}.", "",
             "| model | s / token | tokens / s | vs integer without cache |", "|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['median_s_per_token']:.3f} | {row['tokens_per_s']:.2f} | "
                     f"{row['speedup_vs_no_cache']:.1f}× |")
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
