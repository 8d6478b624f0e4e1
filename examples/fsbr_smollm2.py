"""FSBR on SmolLM2: SmoothQuant-initialised (untrained) scales vs FSBR block reconstruction, W8A8 / W4A8 / W4A4.

For each ``fsbr-*`` recipe this script quantizes a fresh SmolLM2-135M-Instruct twice — once with ``epochs: 0``
(SmoothQuant scales, no clipping, no training: the baseline FSBR must beat) and once with FSBR's block-by-block
reconstruction at the stated budget (epochs x samples x seq_len, calibration on WikiText-2 validation) — and scores
both fake-quant models (per-channel RTN weights, dynamic per-token activation fake-quant on every linear input) on
the same WikiText-2 test windows as the FP32 model. It also reports, per decoder layer, the block objective (MSE
between the float block output on float inputs and the quantized block output on the quantized chain's inputs) at
the SmoothQuant init and for the parameters FSBR kept.

Run (CPU; about 10 minutes per trained recipe at the default budget on one thread)::

    python examples/fsbr_smollm2.py --windows 10 --epochs 2 --samples 16 --seq-len 256 --lr-scale 2e-2 \
        --lr-clip 1e-1 --alpha fsbr-w8a8=0.7 fsbr-w4a8=0.3 fsbr-w4a4=0.5 --threads 1

Appends a section to ``examples/results/fsbr_smollm2.md`` and a run to ``examples/results/fsbr_smollm2.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from fxquant import load_model, quantize
from fxquant.data import calibration_text, eval_text
from fxquant.evaluate import perplexity, tokenize_text
from fxquant.passes.fsbr import FSBRConfig
from fxquant.recipes import get_recipe

RESULTS = Path(__file__).parent / "results"


def run_one(name: str, options: dict, ids: torch.Tensor, cal: torch.Tensor, windows: int) -> dict:
    """Quantize a fresh model with recipe ``name`` + ``options``; perplexity on ``windows`` test windows."""
    lm = load_model("smollm2")
    recipe = get_recipe(name)
    recipe.options.update(options)
    t0 = time.perf_counter()
    res = quantize(lm.model, recipe, calibration=cal)
    seconds = time.perf_counter() - t0
    ppl = perplexity(lm.model, ids=ids, windows=windows, progress=False).ppl
    record = res.artifacts.get("fsbr")
    blocks = list(record.extra.get("block_mse", [])) if record is not None else []
    cfg = FSBRConfig.from_options({k: v for k, v in recipe.options.items() if k not in ("resume", "checkpoint_dir")})
    return {"recipe": name, "options": {k: getattr(cfg, k) for k in
                                        ("act_bits", "norm_bits", "norm_align", "swiglu_bits", "attn_bits",
                                         "softmax_bits", "act_smooth", "act_smooth_alpha", "norm_align_train",
                                         "epochs", "samples", "seq_len", "alpha", "lr_scale", "lr_clip",
                                         "clip_init", "seed", "holdout")},
            "ppl": ppl, "quantize_s": seconds, "block_mse": blocks,
            "guard": {k: record.extra[k] for k in ("kept", "heldout_windows", "heldout_loss_init",
                                                   "heldout_loss_trained") if record is not None and k in record.extra}}


def _guard(row: dict) -> str:
    g = row.get("guard") or {}
    if "heldout_loss_trained" not in g:
        return "off"
    return (f"{g['heldout_loss_init']:.4f} → {g['heldout_loss_trained']:.4f} on {g['heldout_windows']} windows, "
            f"kept {g['kept']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["fsbr-w8a8", "fsbr-w4a8", "fsbr-w4a4"])
    ap.add_argument("--windows", type=int, default=10, help="512-token WikiText-2 test windows (the first N)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--alpha", nargs="+", default=[], metavar="[RECIPE=]ALPHA",
                    help="SmoothQuant α for every recipe, or per recipe (fsbr-w8a8=0.7); default: the recipe's")
    ap.add_argument("--lr-scale", type=float, default=None, help="lr of the log-scales (default: the recipe's)")
    ap.add_argument("--lr-clip", type=float, default=None, help="lr of the clipping logits (default: the recipe's)")
    ap.add_argument("--holdout", type=int, default=None,
                    help="held-out calibration windows of FSBR's model-level guard (default: the recipe's; 0: off)")
    for key, what in (("norm", "norm inputs"), ("swiglu", "the SwiGLU operands gate' and up'"),
                      ("attn", "Q, K, V"), ("softmax", "the softmax output")):
        ap.add_argument(f"--{key}-bits", type=int, default=None,
                        help=f"width of {what} (default: the recipe's, I-LLM's 8; 16: float)")
    ap.add_argument("--norm-align", type=float, default=None,
                    help="exponent β of the norm inputs' channel alignment amax^β (default: the recipe's 0.5; 0: plain)")
    ap.add_argument("--act-smooth-alpha", type=float, default=None,
                    help="init of the SwiGLU act-smooth (max|up'|/max|gate'|)^γ (default: the recipe's; 0: s = 1)")
    train = ap.add_mutually_exclusive_group()
    train.add_argument("--norm-align-train", dest="norm_align_train", action="store_true", default=None,
                       help="train each layer's norm-input alignment with its block (default: the recipe's, off)")
    train.add_argument("--no-norm-align-train", dest="norm_align_train", action="store_false",
                       help="keep the norm inputs' alignment as calibrated")
    ap.add_argument("--linear-only", action="store_true",
                    help="quantize the linear inputs only (norm/swiglu/attn/softmax at 16 = float)")
    ap.add_argument("--no-act-smooth", action="store_true", help="leave out the SwiGLU act-smooth groups")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only, write no result files")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    ids, cal, fp32 = smollm2_data(args.windows)

    common = {"samples": args.samples, "seq_len": args.seq_len, "progress": False}
    for key in ("lr_scale", "lr_clip", "holdout", "norm_bits", "norm_align", "swiglu_bits", "attn_bits",
                "softmax_bits", "act_smooth_alpha"):
        if getattr(args, key) is not None:
            common[key] = getattr(args, key)
    if args.linear_only:
        common.update(norm_bits=16, swiglu_bits=16, attn_bits=16, softmax_bits=16)
    if args.no_act_smooth:
        common["act_smooth"] = False
    if args.norm_align_train is not None:
        common["norm_align_train"] = args.norm_align_train
    alphas = {}
    for item in args.alpha:
        name, _, value = item.rpartition("=")
        alphas[name or "*"] = float(value)
    rows = []
    for name in args.recipes:
        if name in alphas or "*" in alphas:
            common["alpha"] = alphas.get(name, alphas.get("*"))
        else:
            common.pop("alpha", None)
        base = run_one(name, {**common, "epochs": 0}, ids, cal, args.windows)
        print(f"{name} untrained: {base['ppl']:.3f} ({base['quantize_s']:.0f} s)", flush=True)
        trained = run_one(name, {**common, "epochs": args.epochs}, ids, cal, args.windows)
        print(f"{name} FSBR: {trained['ppl']:.3f} ({trained['quantize_s']:.0f} s) {trained['guard']}", flush=True)
        for b in trained["block_mse"]:
            print(f"  layer {b['layer']:2d}: init {b['init']:.4g}  trained {b['trained']:.4g}  ({b['best']})")
        rows.append({"recipe": name, "untrained": base, "fsbr": trained})

    cmd = "python examples/fsbr_smollm2.py " + " ".join(sys.argv[1:])
    total = time.perf_counter() - start
    out = {"command": cmd, "date": str(datetime.date.today()), "model": "SmolLM2-135M-Instruct",
           "eval": {"data": "WikiText-2 test", "windows": args.windows, "seq_len": 512}, "fp32": fp32,
           "torch": torch.__version__, "threads": args.threads, "total_s": total, "rows": rows}
    o = rows[0]["fsbr"]["options"] if rows else {}
    widths = ", ".join(f"{k} {o.get(k + '_bits')}" for k in ("norm", "swiglu", "attn", "softmax"))
    lines = [f"\n## {out['date']} — `{cmd}`\n",
             f"SmolLM2-135M-Instruct, WikiText-2 test, first {args.windows} windows of 512 tokens; fake-quant "
             f"(per-channel symmetric RTN weights, dynamic per-token symmetric activations on every linear input; "
             f"other activation widths ({widths}; 16 = float), norm inputs aligned with β {o.get('norm_align')} "
             f"({'trained' if o.get('norm_align_train') else 'calibrated'}), SwiGLU act-smooth "
             f"{'on' if o.get('act_smooth') else 'off'} (init γ {o.get('act_smooth_alpha')})); "
             f"torch {torch.__version__}, {platform.machine()} CPU, {args.threads} thread(s), {total / 60:.0f} min "
             f"in all. FSBR budget: {args.epochs} epochs x {args.samples} sequences x {args.seq_len} tokens "
             f"(WikiText-2 validation), per decoder layer.\n",
             "| recipe | FP32 ppl | SmoothQuant init, untrained (epochs 0) | FSBR trained | FSBR vs untrained | "
             "FSBR vs FP32 | α | quantize s (untrained / FSBR) | guard: held-out CE untrained → trained, kept |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, t = r["untrained"], r["fsbr"]
        lines.append(f"| {r['recipe']} | {fp32:.3f} | {b['ppl']:.3f} | {t['ppl']:.3f} | "
                     f"{(t['ppl'] / b['ppl'] - 1) * 100:+.1f}% | {(t['ppl'] / fp32 - 1) * 100:+.2f}% | "
                     f"{t['options']['alpha']} | {b['quantize_s']:.0f} / {t['quantize_s']:.0f} | {_guard(t)} |")
    lines += ["", "Per-layer block MSE (float block on float inputs vs quantized block on the quantized chain's "
                  "inputs, mean over the calibration sequences): at the SmoothQuant init (no clipping) and for the "
                  "parameters FSBR kept (the best of: init, init with clipping, each epoch).", ""]
    names = [r["recipe"] for r in rows]
    lines.append("| layer | " + " | ".join(f"{n} init | {n} trained" for n in names) + " |")
    lines.append("|---|" + "---|---|" * len(names))
    n_layers = max((len(r["fsbr"]["block_mse"]) for r in rows), default=0)
    for i in range(n_layers):
        cells = []
        for r in rows:
            bm = r["fsbr"]["block_mse"]
            cells += [f"{bm[i]['init']:.4g}", f"{bm[i]['trained']:.4g}"] if i < len(bm) else ["—", "—"]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.no_write:
        return
    append_results("fsbr_smollm2", "FSBR on SmolLM2: SmoothQuant init vs trained block reconstruction — measured",
                   text, out)


def smollm2_data(windows: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """WikiText-2 test ids, calibration ids (validation) and the FP32 perplexity on the first ``windows`` windows."""
    lm = load_model("smollm2")
    ids = tokenize_text(lm.tokenizer, eval_text(None)[0])
    cal = tokenize_text(lm.tokenizer, calibration_text(None)[0])
    fp32 = perplexity(lm.model, ids=ids, windows=windows, progress=False).ppl
    print(f"fp32: {fp32:.3f}", flush=True)
    return ids, cal, fp32


def append_results(stem: str, title: str, text: str, run: dict) -> None:
    """Append ``text`` to ``examples/results/<stem>.md`` (``# title`` first in a new file) and ``run`` to the
    ``runs`` of ``<stem>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    md, js = RESULTS / f"{stem}.md", RESULTS / f"{stem}.json"
    with md.open("a") as f:
        if md.stat().st_size == 0:
            f.write(f"# {title}\n")
        f.write(text)
    runs = json.loads(js.read_text()).get("runs", []) if js.exists() else []
    js.write_text(json.dumps({"runs": runs + [run]}, indent=1))
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
