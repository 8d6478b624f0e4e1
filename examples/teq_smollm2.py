"""TEQ on SmolLM2-135M: how much of the RTN perplexity gap do trained equivalent scales close?

What you will see
-----------------
1. the float model and round-to-nearest (RTN) weights at the same setting, as the two ends of the gap;
2. TEQ: per-channel scales between every norm and its linears, v_proj and o_proj (grouped-query aware), and
   up_proj and down_proj, trained against the fake-quantized model on WikiText-2 *validation* text, folded into
   the weights (no runtime cost), then the same RTN;
3. WikiText-2 *test* perplexity of each, by fxquant's protocol (512-token windows, ``--windows`` of them).

Run (CPU, a reduced budget; the default recipe trains 1000 steps of 4 x 512 tokens)::

    python examples/teq_smollm2.py --bits 4 3 --steps 120 --seq-len 128 --batch-size 2 --lr 5e-3 --windows 40

The table goes to stdout and, with ``--out``, to a Markdown file.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from fxquant import load_model
from fxquant.api import quantize
from fxquant.data import calibration_text, eval_text
from fxquant.evaluate import perplexity, tokenize_text
from fxquant.recipes import get_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--distill", type=float, default=0.0)
    ap.add_argument("--init", choices=["ones", "awq"], default="awq", help="TEQ's starting scales")
    ap.add_argument("--init-grid", type=int, default=20, help="awq init: exponents tried per group")
    ap.add_argument("--check-every", type=int, default=None,
                    help="held-out loss every N steps, the best scales kept (default: the recipe's, 100; 0: end only)")
    ap.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                    help="activation-aware clip search after the fold (the recipe's default; --no-clip: plain RTN)")
    ap.add_argument("--clip-qk", action=argparse.BooleanOptionalAction, default=True,
                    help="the clip search also clips q/k projections (AWQ does not)")
    ap.add_argument("--clip-grid", type=int, default=None, help="clip ratios tried per group (default: the recipe's, 40)")
    ap.add_argument("--clip-windows", type=int, default=None,
                    help="calibration windows the clip search scores on (default: the recipe's, 32)")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--fp32", action="store_true", help="also evaluate the float model")
    ap.add_argument("--skip-rtn", action="store_true", help="do not re-measure RTN")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--progress", action="store_true", help="show TEQ's training progress bar (stderr)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    # ---- the model, the calibration ids and the evaluation ids (tokenized once) --------------------------
    lm = load_model(args.model)
    calib = tokenize_text(lm.tokenizer, calibration_text()[0])
    test_ids = tokenize_text(lm.tokenizer, eval_text()[0])
    rows: list[tuple[str, float, float, str]] = []

    def evaluate(name: str, model: torch.nn.Module, seconds: float, note: str = "") -> None:
        r = perplexity(model, ids=test_ids, windows=args.windows, seq_len=512, progress=False)
        rows.append((name, r.ppl, seconds, note))
        print(f"{name:<14} ppl {r.ppl:10.3f}   quantize {seconds:7.1f}s  {note}", flush=True)
        if args.out:
            write(args.out, args, rows)

    if args.fp32:
        evaluate("fp32", lm.model, 0.0)
    for bits in args.bits:
        g = f"w{bits}g{args.group}"
        if not args.skip_rtn:
            model = copy.deepcopy(lm.model)
            res = quantize(model, f"rtn-{g}")
            evaluate(f"rtn-{g}", model, res.seconds)
            del model
        # ---- TEQ: the same RTN after trained, folded scales ------------------------------------------------
        recipe = get_recipe(f"teq-{g}")
        recipe.options.update(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                              distill=args.distill, init=args.init, init_grid=args.init_grid, progress=args.progress,
                              clip=args.clip, clip_qk=args.clip_qk,
                              **({} if args.clip_grid is None else {"clip_grid": args.clip_grid}),
                              **({} if args.clip_windows is None else {"clip_windows": args.clip_windows}),
                              **({} if args.check_every is None else {"check_every": args.check_every}))
        model = copy.deepcopy(lm.model)
        start = time.perf_counter()
        res = quantize(model, recipe, calibration=calib)
        teq = res.artifacts["teq"]
        k = max(1, len(teq.losses) // 10)
        note = (f"init {args.init}, {len(teq.losses)} steps, {len(teq.plan.groups)} groups, "
                f"max |s - init| {teq.moved():.3f}, kept {teq.extra.get('kept')}")
        if teq.losses:
            note += f", loss {sum(teq.losses[:k]) / k:.3f} -> {sum(teq.losses[-k:]) / k:.3f}"
        for key in ("heldout_loss_ones", "heldout_loss_init", "heldout_loss_trained"):
            if key in teq.extra:
                note += f", {key.replace('heldout_loss_', 'held-out ')} {teq.extra[key]:.4f}"
        if "heldout_checks" in teq.extra:
            note += ", checks " + " ".join(f"{int(a)}:{b:.4f}" for a, b in teq.extra["heldout_checks"])
        if "kept_step" in teq.extra:
            note += f", kept the scales of step {teq.extra['kept_step']}"
        if "awq" in teq.extra:
            chosen = list(teq.extra["awq"].values())
            note += (f", awq: mean alpha {sum(c['alpha'] for c in chosen) / max(1, len(chosen)):.2f}, "
                     f"{sum(c['form'] == 'duo' for c in chosen)} duo groups")
        clip = next((r.stats for r in res.records if r.name == "search_weight_clipping"), None)
        if clip:
            note += (f", clip search{'' if args.clip_qk else ' (not q/k)'}: {clip['clipped']} weights, mean ratio "
                     f"{clip['mean_ratio']:.3f}, output error x{clip['output_error_ratio']:.3f}")
        else:
            note += ", no clip search"
        evaluate(f"teq-{g}", model, time.perf_counter() - start, note)
        del model


def write(path: str, args: argparse.Namespace, rows: list[tuple[str, float, float, str]]) -> None:
    lines = ["# TEQ vs RTN on SmolLM2-135M-Instruct (WikiText-2 test perplexity)", "",
             f"Command: `python examples/teq_smollm2.py --bits {' '.join(map(str, args.bits))} --group {args.group} "
             f"--steps {args.steps} --seq-len {args.seq_len} --batch-size {args.batch_size} --lr {args.lr} "
             f"--distill {args.distill} --init {args.init} --init-grid {args.init_grid} --windows {args.windows}"
             + ("" if args.check_every is None else f" --check-every {args.check_every}") + (" --fp32" if args.fp32 else "")
             + ("" if args.clip else " --no-clip") + ("" if args.clip_qk else " --no-clip-qk")
             + ("" if args.clip_grid is None else f" --clip-grid {args.clip_grid}")
             + ("" if args.clip_windows is None else f" --clip-windows {args.clip_windows}")
             + (" --skip-rtn" if args.skip_rtn else "") + "`", "",
             "| recipe | perplexity | quantize s | training |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {name} | {ppl:.3f} | {sec:.1f} | {note} |" for name, ppl, sec, note in rows]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
