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

from .errors import DataError, FxquantError, OutputError, RecipeError
from .hostmem import keep_heap

log = logging.getLogger("fxquant")

_INTERNAL_HINT = "rerun with --debug for the traceback and report it"


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
    p.add_argument("--checkpoint-dir", default=None,
                   help="trained recipes (teq-*, fsbr-*, illm-* with --steps, paretoq-*): write resumable training "
                        "checkpoints (safetensors + JSON) to step-<N>/ folders here")
    p.add_argument("--save-every", type=int, default=None,
                   help="with --checkpoint-dir: a checkpoint every N training steps (default: only at the end)")
    p.add_argument("--keep-last", type=int, default=None,
                   help="with --checkpoint-dir: keep only the newest N checkpoints (default: keep every one)")
    p.add_argument("--resume", default=None,
                   help="continue training from a checkpoint folder, a checkpoint directory (its latest complete "
                        "checkpoint) or 'auto' (the latest in --checkpoint-dir; start fresh if there is none)")
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
                       description="Built-in recipes. A recipe file (YAML/JSON) has keys: name, method (fp32, rtn, "
                                   "fp, teq, fsbr, illm, paretoq) or base (a built-in name to start from), bits, "
                                   "group_size, symmetric, per_tensor, format, scale_search, exclude (patterns), "
                                   "options (only those the method reads). See the README's Recipes section.")
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

    from .benchmark import add_bench_parser
    from .debug import add_debug_parser
    from .pareto import add_pareto_parser
    from .qat import add_qat_parser
    add_debug_parser(sub)
    add_qat_parser(sub)
    add_pareto_parser(sub)
    add_bench_parser(sub)
    return parser


def _dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _check_args(args) -> None:
    """Numeric flags that cannot work, refused before anything slow starts."""
    for flag, value, least in (("--windows", getattr(args, "windows", None), 1),
                               ("--seq-len", getattr(args, "seq_len", None), 2),
                               ("--batch-size", getattr(args, "batch_size", None), 1),
                               ("--max-new-tokens", getattr(args, "max_new_tokens", None), 1),
                               ("--steps", getattr(args, "steps", None), 0)):   # 0: TEQ's init alone, FSBR's
        if value is not None and value < least:
            raise FxquantError(f"{flag} must be at least {least}, got {value}",
                               {"--windows": "e.g. --windows 40, or omit it to score every window",
                                "--seq-len": "e.g. --seq-len 512 (the protocol's window length)",
                                "--batch-size": "e.g. --batch-size 4",
                                "--max-new-tokens": "e.g. --max-new-tokens 32",
                                "--steps": "e.g. --steps 200 (0: no training where the recipe allows it)"}[flag])


def _max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _calibration_tokens_needed(recipe) -> int:
    """Tokens a data-driven recipe needs at least: one training window (TEQ/FSBR 512, ParetoQ QAT 256) plus one."""
    default = 256 if recipe.method == "paretoq" else 512
    return int(recipe.options.get("seq_len", default)) + 1


def _load_and_quantize(args, default_recipe: str, check=None):
    """Recipe, model, quantization; everything that can be checked before the slow part is checked first.

    ``check(lm)`` runs after the load and before quantization (a command's own checks on the model)."""
    from .api import quantize
    from .models import load_model
    from .recipes import get_recipe
    _check_args(args)
    recipe = get_recipe(args.recipe or default_recipe)  # validate before the slow load
    if getattr(args, "steps", None) is not None:
        if not recipe.trains:
            raise RecipeError(f"--steps {args.steps} was given but recipe {recipe.name!r} does not train"
                              + (" (GPTQ rounds once from calibration statistics)" if recipe.method == "gptq" else ""),
                              "drop --steps, or use a trained recipe (teq-*, fsbr-*, illm-*, paretoq-*)")
        recipe.options["epochs" if recipe.method in ("fsbr", "illm") else "steps"] = args.steps
    _apply_checkpoint_args(args, recipe)
    calib_text = calib_source = None
    if not recipe.data_free:
        from .data import calibration_text
        # read now: a missing or empty file fails before the model is loaded
        calib_text, calib_source = calibration_text(getattr(args, "calib", None))
    lm = load_model(args.model, dtype=_dtype(args.dtype))
    if check is not None:
        check(lm)
    from .checkpoint import QuantizedCheckpoint
    if isinstance(lm, QuantizedCheckpoint):
        return _checkpoint_result(args, lm, recipe)
    calibration = None
    if calib_text is not None:
        from .evaluate import tokenize_text
        # token ids of WikiText-2 validation: every data-driven pass (TEQ, FSBR, ParetoQ QAT) takes a 1-D id tensor
        calibration = tokenize_text(lm.tokenizer, calib_text)
        need = _calibration_tokens_needed(recipe)
        if calibration.numel() < need:
            raise DataError(f"calibration text {calib_source} is too short: {calibration.numel()} tokens, and recipe "
                            f"{recipe.name!r} trains on windows of {need - 1} tokens (needs at least {need})",
                            "pass a longer --calib file (the default, WikiText-2 validation, is long enough)")
    float_model = None
    if getattr(args, "baseline", False) and not recipe.is_float:
        float_model = copy.deepcopy(lm.model)
    # the float baseline needs no graph: skip the capture (tens of seconds on a 2-core machine)
    result = quantize(lm.model, recipe, calibration=calibration, capture_model=not recipe.is_float)
    return lm, recipe, result, float_model


def _checkpoint_result(args, lm, recipe):
    """A saved fxquant checkpoint is already quantized: evaluate / generate with it as it is."""
    import dataclasses

    from .api import QuantizeResult
    saved = lm.quantization_config.get("recipe") or "checkpoint"
    if args.recipe is not None and not recipe.is_float:
        raise RecipeError(f"{args.model} is an fxquant checkpoint already quantized with {saved!r}; quantizing it "
                          f"again with {recipe.name!r} would compound the errors",
                          "drop --recipe to use the checkpoint as it is, or quantize the float model instead")
    if getattr(args, "baseline", False):
        raise RecipeError(f"{args.model} is an fxquant checkpoint: the float model it came from is not in it, so "
                          "--baseline has nothing to compare against",
                          f"run fxquant eval --model <the float model> --recipe {saved} --baseline instead")
    result = QuantizeResult(model=lm.model, recipe=dataclasses.replace(recipe, name=saved), captured=None,
                            quantized=dict(lm.quantized), artifacts={"_integer_model": lm.integer_model})
    return lm, result.recipe, result, None


def _apply_checkpoint_args(args, recipe) -> None:
    """--checkpoint-dir / --save-every / --keep-last / --resume become the recipe's training options (checked before
    loading)."""
    ckpt, every, keep, resume = (getattr(args, k, None) for k in ("checkpoint_dir", "save_every", "keep_last", "resume"))
    if ckpt is None and every is None and keep is None and resume is None:
        return
    if not recipe.trains:
        raise RecipeError(f"--checkpoint-dir/--save-every/--keep-last/--resume were given but recipe {recipe.name!r} "
                          "does not train",
                          "drop them, or use a trained recipe (teq-*, fsbr-*, illm-* with --steps, paretoq-*)")
    if every is not None and every < 1:
        raise RecipeError(f"--save-every must be at least 1, got {every}", "e.g. --save-every 50")
    if every is not None and ckpt is None:
        raise RecipeError("--save-every needs --checkpoint-dir (where to write the checkpoints)",
                          "e.g. --checkpoint-dir ckpt/ --save-every 50")
    if keep is not None and keep < 1:
        raise RecipeError(f"--keep-last must be at least 1, got {keep}", "e.g. --keep-last 2")
    if keep is not None and ckpt is None:
        raise RecipeError("--keep-last needs --checkpoint-dir (the folder to prune)",
                          "e.g. --checkpoint-dir ckpt/ --save-every 50 --keep-last 2")
    if ckpt is not None:
        recipe.options["checkpoint_dir"] = ckpt
    if keep is not None:
        recipe.options["keep_last"] = keep
    if every is not None:
        recipe.options["save_every"] = every
    if resume is not None:
        recipe.options["resume"] = resume


def _eval_activation_bytes(config, batch: int, seq_len: int, itemsize: int) -> int:
    """Peak activation memory of one perplexity batch: the logits in the model's dtype, their float32 copy and
    log-softmax, plus one layer's attention scores (when attention materialises them) and MLP activations."""
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)
    inter = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 1)
    tokens = batch * seq_len
    return tokens * vocab * (itemsize + 8) + batch * heads * seq_len * seq_len * 8 + tokens * max(hidden, inter) * itemsize * 4


def cmd_eval(args) -> int:
    from .data import eval_text
    from .evaluate import encoder_similarity, perplexity, tokenize_text, weight_bytes
    _check_args(args)
    if args.json:
        _check_writable_parent(args.json, "--json")
    text, source = eval_text(args.data)  # a missing or empty file fails before the model is loaded
    eval_ids = None

    def check(lm) -> None:
        nonlocal eval_ids
        if not lm.is_causal_lm:
            return
        config = getattr(lm.model, "config", None)
        limit = _max_positions(config)
        if limit is not None and args.seq_len > limit:
            raise DataError(f"--seq-len {args.seq_len} does not fit {args.model}: it has {limit} positions",
                            f"use --seq-len {min(512, limit)} (at most {limit})")
        eval_ids = tokenize_text(lm.tokenizer, text)
        if eval_ids.numel() < args.seq_len:
            raise DataError(f"the evaluation text {source} is too short: {eval_ids.numel()} tokens, fewer than one "
                            f"{args.seq_len}-token window",
                            "use the full WikiText-2 test file (--data), or a smaller --seq-len")
        from .guards import check_memory
        itemsize = next(lm.model.parameters()).element_size()
        check_memory(_eval_activation_bytes(config, args.batch_size, args.seq_len, itemsize),
                     f"evaluating with --batch-size {args.batch_size} --seq-len {args.seq_len}",
                     hint="use a smaller --batch-size (or --seq-len)")

    lm, recipe, result, float_model = _load_and_quantize(args, "fp32", check)
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {"model": args.model, "model_class": type(lm.model).__name__, "recipe": recipe.name,
                              "quantize_seconds": round(result.seconds, 3), "weight_bytes": result.weight_bytes}
    if lm.is_causal_lm:
        ids = eval_ids if eval_ids is not None else tokenize_text(lm.tokenizer, text)
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
    _check_out(args.out, args.overwrite)
    lm, recipe, result, _ = _load_and_quantize(args, "rtn-w4g128")
    try:
        # written to a temporary sibling and renamed at the end: an interrupted or failed write leaves no folder
        out = save_quantized(lm.model, lm.tokenizer, args.out, recipe=recipe, quantized=result.quantized,
                             overwrite=args.overwrite)
    except OSError as exc:
        raise OutputError(f"could not write {args.out}: {exc.strerror or exc}"
                          + (f" ({exc.filename})" if getattr(exc, "filename", None) else ""),
                          "free disk space or choose a writable --out, then run again; nothing was written") from exc
    n = len(result.quantized)
    print(f"quantized {args.model} ({BUILTIN_MODELS.get(args.model, {}).get('about', type(lm.model).__name__)}) "
          f"with {recipe.name}: {n} weights, packed weight size {result.weight_bytes / 2**20:.2f} MiB, "
          f"{result.seconds:.1f}s")
    print(f"wrote {out}")
    return 0


def _check_writable_parent(path: str, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a folder we can write into."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"cannot create {flag} {path}: {parent} is a file, not a folder", f"choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create {flag} {path}: {parent} is not writable", f"choose a writable {flag}")


def _check_out(out: str, overwrite: bool) -> None:
    """Refuse an output folder that cannot be written, before the slow part."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"--out {out} is a file, not a folder", "choose a folder name for --out")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise OutputError(f"output folder {out} exists and is not empty", "choose a new --out, or pass --overwrite")
    _check_writable_parent(out, "--out")


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
    keep_heap()          # large CPU temporaries stay mapped (fxquant.hostmem; FXQUANT_KEEP_HEAP=0 turns it off)
    start = time.perf_counter()
    try:
        code = args.func(args)
    except FxquantError as exc:
        if debug:
            raise
        # one line: what is wrong, then what to do
        _error_line("error", exc.message, exc.hint)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        # outputs are written to a temporary sibling and renamed at the end, so nothing half-written is left
        print("fxquant: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: one line, never a traceback
        if debug:
            raise
        if _is_out_of_memory(exc):
            _error_line("error", f"out of memory during `fxquant {args.command}` ({_describe(exc)})",
                        "free memory, use a smaller model, --dtype bfloat16 or a smaller --batch-size")
        elif isinstance(exc, OSError):
            _error_line("error", f"{exc.strerror or _describe(exc)}"
                                 + (f": {exc.filename}" if getattr(exc, "filename", None) else ""),
                        "check the path, its permissions and the free disk space")
        else:
            _error_line("internal error", _describe(exc), _INTERNAL_HINT)
        return 2
    log.info("done in %.1fs", time.perf_counter() - start)
    return code


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (just ``Type`` when there is no message)."""
    first = _first_line(exc)
    return type(exc).__name__ + (f": {first}" if first else "")


def _is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError (CUDA), or the CPU allocator's RuntimeError."""
    text = str(exc)
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or (isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)))


def _error_line(kind: str, message: str, hint: str | None) -> None:
    """``fxquant: <kind>: <message> (hint: <hint>)`` on one line of stderr."""
    line = f"fxquant: {kind}: {message}" + (f" (hint: {hint})" if hint else "")
    print(" ".join(part.strip() for part in line.splitlines() if part.strip()), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
