"""The ``fxquant`` command line.

    fxquant eval      --model smollm2 --recipe rtn-w4g128 --windows 40 --baseline --json out.json
    fxquant quantize  --model smollm2 --recipe rtn-w4g128 --out quantized/
    fxquant recipes
    fxquant generate  --model smollm2 --recipe rtn-w4g128 --prompt "The capital of France is"

Errors on bad input are one line (plus a hint), never a traceback; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from typing import Any, Sequence

from .errors import FxquantError

log = logging.getLogger("fxquant")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="built-in name (smollm2 [default], minilm), a .gguf file, a model folder or fxquant checkpoint, "
                        "or a Hugging Face hub id (downloaded only when online)")
    p.add_argument("--recipe", default=None,
                   help="recipe name (see `fxquant recipes`) or a .yaml/.json recipe file "
                        "(default: rtn-w4g128 for quantize, fp32 for eval)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the model is loaded and evaluated in (default float32)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of data-driven recipes (TEQ and ParetoQ QAT steps; epochs for FSBR); "
                        "default: the recipe's")
    p.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--windows", type=int, default=None,
                   help="evaluate only the first N 512-token windows of WikiText-2 test (quick mode); default: all")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--data", default=None,
                   help="evaluation text file or data folder (default: $FXQUANT_DATA, then ../shared/data, "
                        "then the HF datasets loader)")
    p.add_argument("--baseline", action="store_true",
                   help="also evaluate the float model and print both side by side")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxquant",
        description="fxquant: a quantization compiler for LLMs on torch.fx. "
                    "Set FXQUANT_DEBUG=<dir> to dump the graph after every pass.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("eval", help="quantize (optionally) and measure WikiText-2 perplexity and packed size",
                       description="Perplexity on WikiText-2 test: the file is tokenized whole and cut into "
                                   "non-overlapping 512-token windows from the start; --windows N scores the first N.")
    _add_model_args(p)
    _add_eval_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="quantize a model with a recipe and save it (safetensors + JSON)",
                       description="Quantize a model and write a folder that transformers and `fxquant eval --model DIR` load.")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--calib", default=None, help="calibration text (default: WikiText-2 validation) for data-driven recipes")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("recipes", help="list the recipes, one line each",
                       description="Built-in recipes. A recipe file (YAML/JSON) has keys: name, method (rtn|fp32), "
                                   "bits (1-8), group_size (positive int or null), symmetric (bool), exclude (patterns).")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("generate", help="quantize (optionally) and generate text greedily with the KV cache")
    _add_model_args(p)
    p.add_argument("--prompt", default="The capital of France is", help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("verify", help="quantize with a recipe and prove a property of the result's graph",
                       description="--integer-only: walk the lowered graph and prove that no floating-point op or "
                                   "tensor remains between the integer boundaries (quantize at the embedding, "
                                   "dequantize at the output). Exit status 0 when it holds, 1 when it does not.")
    _add_model_args(p)
    p.add_argument("--integer-only", action="store_true", required=True,
                   help="check the integer-only property (the only check so far)")
    p.add_argument("--calib", default=None, help="calibration text (default: WikiText-2 validation)")
    p.set_defaults(func=cmd_verify)

    from .debug import add_debug_parser
    from .pareto import add_pareto_parser
    from .qat import add_qat_parser
    add_debug_parser(sub)
    add_qat_parser(sub)
    add_pareto_parser(sub)
    return parser


def _dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _load_and_quantize(args, default_recipe: str):
    from .api import quantize
    from .models import load_model
    from .recipes import get_recipe
    recipe = get_recipe(args.recipe or default_recipe)  # validate before the slow load
    if getattr(args, "steps", None) is not None:
        if args.steps <= 0:
            raise FxquantError(f"--steps must be a positive number, got {args.steps}", "e.g. --steps 200")
        recipe.options["epochs" if recipe.method in ("fsbr", "illm") else "steps"] = args.steps
    lm = load_model(args.model, dtype=_dtype(args.dtype))
    float_model = None
    if getattr(args, "baseline", False) and not recipe.is_float:
        float_model = copy.deepcopy(lm.model)
    calibration = None
    if not recipe.data_free:
        from .data import calibration_text
        from .evaluate import tokenize_text
        # token ids of WikiText-2 validation: every data-driven pass (TEQ, FSBR, ParetoQ QAT) takes a 1-D id tensor
        calibration = tokenize_text(lm.tokenizer, calibration_text(getattr(args, "calib", None))[0])
    # the float baseline needs no graph: skip the capture (tens of seconds on a 2-core machine)
    result = quantize(lm.model, recipe, calibration=calibration, capture_model=not recipe.is_float)
    return lm, recipe, result, float_model


def cmd_eval(args) -> int:
    from .data import eval_text
    from .evaluate import encoder_similarity, perplexity, weight_bytes
    lm, recipe, result, float_model = _load_and_quantize(args, "fp32")
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {"model": args.model, "model_class": type(lm.model).__name__, "recipe": recipe.name,
                              "quantize_seconds": round(result.seconds, 3), "weight_bytes": result.weight_bytes}
    if lm.is_causal_lm:
        text, source = eval_text(args.data)
        from .evaluate import tokenize_text
        ids = tokenize_text(lm.tokenizer, text)
        models = [(recipe.name, result.eval_model, result.weight_bytes)]
        if float_model is not None:
            models.insert(0, ("fp32", float_model, weight_bytes(float_model)))
        for name, model, nbytes in models:
            r = perplexity(model, ids=ids, windows=args.windows, seq_len=args.seq_len, batch_size=args.batch_size,
                           progress=not args.no_progress)
            rows.append({"recipe": name, "ppl": r.ppl, "tokens": r.tokens, "windows": r.windows,
                         "weight_bytes": nbytes, "seconds": round(r.seconds, 2)})
        main = rows[-1]
        report.update(ppl=main["ppl"], tokens=main["tokens"], windows=main["windows"], seq_len=args.seq_len,
                      data=source, metric="wikitext2-test perplexity")
        if float_model is not None:
            report["baseline"] = rows[0]
    else:
        if float_model is None:
            float_model = lm.model
        text, source = eval_text(args.data)
        sim = encoder_similarity(float_model, result.eval_model, lm.tokenizer, text, n=args.windows or 256)
        report.update(ppl=None, tokens=sim["tokens"], metric="mean cosine similarity of sentence embeddings to fp32",
                      embedding_cosine=sim["cosine"], sentences=sim["sentences"], data=source)
        rows.append({"recipe": recipe.name, "embedding_cosine": sim["cosine"], "weight_bytes": result.weight_bytes})
    _print_table(args.model, rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _print_table(model: str, rows: list[dict[str, Any]]) -> None:
    print(f"\nmodel: {model}")
    if rows and "ppl" in rows[0]:
        print(f"{'recipe':<18} {'ppl':>10} {'tokens':>8} {'weights MiB':>12} {'vs fp32':>9}")
        base = rows[0]["ppl"] if rows[0]["recipe"] == "fp32" else None
        for r in rows:
            rel = f"{(r['ppl'] / base - 1) * 100:+.2f}%" if base else ""
            print(f"{r['recipe']:<18} {r['ppl']:>10.3f} {r['tokens']:>8} {r['weight_bytes'] / 2**20:>12.2f} {rel:>9}")
    else:
        print(f"{'recipe':<18} {'cos vs fp32':>12} {'weights MiB':>12}")
        for r in rows:
            print(f"{r['recipe']:<18} {r['embedding_cosine']:>12.5f} {r['weight_bytes'] / 2**20:>12.2f}")


def cmd_quantize(args) -> int:
    from .checkpoint import save_quantized
    from .models import BUILTIN_MODELS
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise FxquantError(f"output folder {args.out} exists and is not empty", "choose a new --out, or pass --overwrite")
    lm, recipe, result, _ = _load_and_quantize(args, "rtn-w4g128")
    out = save_quantized(lm.model, lm.tokenizer, args.out, recipe=recipe, quantized=result.quantized,
                         overwrite=args.overwrite)
    n = len(result.quantized)
    print(f"quantized {args.model} ({BUILTIN_MODELS.get(args.model, {}).get('about', type(lm.model).__name__)}) "
          f"with {recipe.name}: {n} weights, packed weight size {result.weight_bytes / 2**20:.2f} MiB, "
          f"{result.seconds:.1f}s")
    print(f"wrote {out}")
    return 0


def cmd_recipes(args) -> int:
    from .recipes import DEFAULT_RECIPE, named_recipes
    for name, desc in named_recipes().items():
        mark = " (default)" if name == DEFAULT_RECIPE else ""
        print(f"{name:<20} {desc}{mark}")
    return 0


def cmd_generate(args) -> int:
    import torch
    lm, recipe, result, _ = _load_and_quantize(args, "fp32")
    if not lm.is_causal_lm:
        raise FxquantError(f"{args.model} is an encoder and cannot generate text", "use a causal LM such as smollm2")
    prompt = args.prompt
    if args.chat and getattr(lm.tokenizer, "chat_template", None):
        prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = result.eval_model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                         pad_token_id=lm.tokenizer.pad_token_id)
    print(f"[{recipe.name}] {lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}")
    return 0


def cmd_verify(args) -> int:
    from .verify import check_integer_region, propagate_meta
    lm, recipe, result, _ = _load_and_quantize(args, "illm-w8a8")
    if result.integer_model is None:
        raise FxquantError(f"recipe {recipe.name!r} does not lower the model to integers, so there is nothing to "
                           "verify", "use an integer-only recipe: illm-w8a8, illm-w4a8 or illm-w4a4")
    propagate_meta(result.captured)
    report = check_integer_region(result.captured)
    print(f"[{recipe.name}] {args.model}: {report.render()}")
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import warnings
        warnings.filterwarnings("ignore")
    start = time.perf_counter()
    try:
        code = args.func(args)
    except FxquantError as exc:
        if debug:
            raise
        # one line: what is wrong, then what to do
        print(f"fxquant: error: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fxquant: interrupted", file=sys.stderr)
        return 130
    log.info("done in %.1fs", time.perf_counter() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
