"""``fxquant pareto``: quality against packed model size over bit widths, with the Pareto front marked.

    fxquant pareto --model smollm2 --steps 100 --windows 8

Every point loads the model afresh, quantizes it with one recipe and measures WikiText-2 test perplexity on the
first ``--windows`` windows (the protocol of :mod:`fxquant.evaluate`). ParetoQ points (1, 1.58, 2, 3, 4 bit) are
trained with the built-in QAT trainer for ``--steps`` steps first; the other methods' data-free points (RTN at
several widths, FP6) are added for comparison. Size is the *packed* model: quantized linears at their packed
bytes (codes + scales), every other parameter at 2 bytes (FP16 storage; tied parameters once) — the float model
is the FP16 point. A point is on the Pareto front when no other point is both smaller and better.

Writes ``<out>/pareto_<model>.json`` (every number), ``.md`` (the table) and ``.png`` (the plot, log-scaled
perplexity) — by default in ``examples/results/``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import FxquantError

__all__ = ["pareto_front", "measure_point", "run_pareto", "plot_pareto", "add_pareto_parser", "cmd_pareto",
           "packed_model_bytes"]

log = logging.getLogger("fxquant")

DEFAULT_PARETOQ = ("paretoq-w1", "paretoq-w1.58", "paretoq-w2", "paretoq-w3", "paretoq-w4")
DEFAULT_OTHERS = ("fp32", "rtn-w8", "fp6", "rtn-w4g128", "rtn-w4", "rtn-w3g128", "rtn-w2g64")


def packed_model_bytes(model: torch.nn.Module, quantized: dict[str, Any]) -> tuple[int, int]:
    """(whole model, quantized linears only) in bytes: packed codes + scales, everything else as FP16."""
    total = linear = 0
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        q = quantized.get(name)
        if q is None:
            total += 2 * p.numel()
        else:
            n = int(q.packed_nbytes() if hasattr(q, "packed_nbytes") else q.nbytes_packed())
            total += n
            linear += n
    return total, linear


def pareto_front(points: Sequence[dict[str, Any]], x: str = "size_bytes", y: str = "ppl") -> list[int]:
    """Indices of the points no other point dominates (smaller or equal ``x`` and ``y``, one strictly)."""
    front = []
    for i, p in enumerate(points):
        if not math.isfinite(p[y]):
            continue
        dominated = any(q is not p and q[x] <= p[x] and q[y] <= p[y] and (q[x] < p[x] or q[y] < p[y])
                        for q in points if math.isfinite(q[y]))
        if not dominated:
            front.append(i)
    return front


def measure_point(model_name: str, recipe_name: str, *, eval_ids: torch.Tensor, calib_ids: torch.Tensor | None,
                  windows: int, steps: int, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Load ``model_name``, quantize it with ``recipe_name`` (training ParetoQ recipes for ``steps``), measure."""
    from .api import quantize
    from .evaluate import perplexity
    from .models import load_model
    from .paretoq import ParetoQSpec, convert, paretoq_weights, prepare_qat
    from .qat import QATConfig, train_qat
    from .recipes import get_recipe

    recipe = get_recipe(recipe_name)
    lm = load_model(model_name)
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if isinstance(recipe.weight, ParetoQSpec):
        if calib_ids is None:
            raise FxquantError("ParetoQ points need calibration text", "do not pass --no-calib with ParetoQ recipes")
        torch.manual_seed(seed)
        prepare_qat(lm.model, recipe)
        hist = train_qat(lm.model, calib_ids, QATConfig(steps=steps, seed=seed, progress=progress),
                         bits=recipe.weight.bits)
        convert(lm.model, packed=False)
        quantized: dict[str, Any] = paretoq_weights(lm.model)
        extra = {"steps": steps, "loss_first": hist.losses[0], "loss_last": hist.losses[-1]}
        bits = recipe.weight.storage_bits
    else:
        result = quantize(lm.model, recipe, calibration=None)
        quantized = result.quantized
        bits = 16.0 if recipe.is_float else float(getattr(recipe.weight, "bits", 16))
    seconds = time.perf_counter() - start
    ppl = perplexity(lm.model, ids=eval_ids, windows=windows, progress=progress).ppl
    total, linear = packed_model_bytes(lm.model, quantized)
    return {"recipe": recipe.name, "method": recipe.method, "bits": bits, "ppl": ppl, "size_bytes": total,
            "linear_bytes": linear, "quantized_linears": len(quantized), "quantize_seconds": round(seconds, 1), **extra}


def plot_pareto(points: list[dict[str, Any]], front: list[int], path: str | os.PathLike, title: str) -> Path:
    """Perplexity (log) against packed size (MiB): every point labelled, the front joined and highlighted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = {"paretoq": "tab:red", "rtn": "tab:blue", "fp": "tab:green", "fp32": "black"}
    finite = [p for p in points if math.isfinite(p["ppl"])]
    for p in finite:
        ax.scatter(p["size_bytes"] / 2**20, p["ppl"], color=colors.get(p["method"], "tab:gray"), s=30, zorder=3)
        ax.annotate(p["recipe"], (p["size_bytes"] / 2**20, p["ppl"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    fr = sorted((points[i] for i in front), key=lambda p: p["size_bytes"])
    ax.plot([p["size_bytes"] / 2**20 for p in fr], [p["ppl"] for p in fr], color="tab:orange", lw=2, zorder=2,
            label="Pareto front")
    ax.scatter([p["size_bytes"] / 2**20 for p in fr], [p["ppl"] for p in fr], s=110, facecolors="none",
               edgecolors="tab:orange", zorder=4)
    for method, color in colors.items():
        if any(p["method"] == method for p in finite):
            ax.scatter([], [], color=color, label={"paretoq": "ParetoQ QAT", "rtn": "RTN", "fp": "FP6",
                                                   "fp32": "float (FP16 size)"}[method])
    ax.set_yscale("log")
    ax.set_xlabel("packed model size (MiB; float parts at FP16)")
    ax.set_ylabel("WikiText-2 test perplexity (log)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _table(points: list[dict[str, Any]], front: list[int]) -> str:
    lines = ["| recipe | bits | perplexity | model MiB | linears MiB | front |", "|---|---:|---:|---:|---:|:---:|"]
    for i, p in sorted(enumerate(points), key=lambda t: t[1]["size_bytes"]):
        lines.append(f"| {p['recipe']} | {p['bits']:g} | {p['ppl']:.2f} | {p['size_bytes'] / 2**20:.2f} | "
                     f"{p['linear_bytes'] / 2**20:.2f} | {'*' if i in front else ''} |")
    return "\n".join(lines)


def run_pareto(model: str, recipes: Sequence[str], *, windows: int, steps: int, out_dir: str | os.PathLike,
               seed: int = 0, progress: bool = True, calib: str | None = None, data: str | None = None) -> dict[str, Any]:
    from .data import calibration_text, eval_text
    from .evaluate import tokenize_text
    from .models import load_model
    from .recipes import get_recipe

    for r in recipes:
        get_recipe(r)  # fail on a bad name before the slow part
    tok = load_model(model).tokenizer
    eval_ids = tokenize_text(tok, eval_text(data)[0])
    needs_calib = any(get_recipe(r).method == "paretoq" for r in recipes)
    calib_ids = tokenize_text(tok, calibration_text(calib)[0]) if needs_calib else None
    points = []
    for r in recipes:
        p = measure_point(model, r, eval_ids=eval_ids, calib_ids=calib_ids, windows=windows, steps=steps, seed=seed,
                          progress=progress)
        log.info("pareto point %s", p)
        print(f"{p['recipe']:<16} bits {p['bits']:<5g} ppl {p['ppl']:>12.3f}  size {p['size_bytes'] / 2**20:8.2f} MiB",
              flush=True)
        points.append(p)
    front = pareto_front(points)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"pareto_{Path(model).stem}"
    report = {"model": model, "windows": windows, "steps": steps, "seed": seed, "points": points,
              "front": [points[i]["recipe"] for i in front]}
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    table = _table(points, front)
    (out / f"{stem}.md").write_text(f"# Pareto: {model}, {windows} WikiText-2 test windows, ParetoQ {steps} QAT steps\n\n"
                                    + table + "\n")
    plot_pareto(points, front, out / f"{stem}.png", f"{model}: quality vs packed size (QAT {steps} steps)")
    print("\n" + table)
    print(f"\nwrote {out / stem}.json, .md, .png")
    return report


def add_pareto_parser(sub: Any) -> Any:
    """Add ``fxquant pareto`` to the CLI's subparsers."""
    p = sub.add_parser("pareto", help="quality vs packed size over bit widths (ParetoQ QAT + other methods), plotted",
                       description="Quantize the model with each recipe (ParetoQ recipes are trained first), measure "
                                   "WikiText-2 test perplexity and packed size, and write a table and a PNG plot "
                                   "marking the Pareto front.")
    p.add_argument("--model", default="smollm2", help="built-in name, model folder, .gguf file or hub id")
    p.add_argument("--recipes", nargs="+", default=None,
                   help=f"recipes to measure (default: {' '.join(DEFAULT_OTHERS + DEFAULT_PARETOQ)})")
    p.add_argument("--steps", type=int, default=200, help="QAT steps per ParetoQ point (default 200)")
    p.add_argument("--windows", type=int, default=8, help="512-token WikiText-2 test windows per point (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="examples/results", help="output folder (default examples/results)")
    p.add_argument("--calib", default=None, help="calibration text (default WikiText-2 validation)")
    p.add_argument("--data", default=None, help="evaluation text (default WikiText-2 test)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_pareto)
    return p


def cmd_pareto(args: Any) -> int:
    recipes = args.recipes or list(DEFAULT_OTHERS + DEFAULT_PARETOQ)
    run_pareto(args.model, recipes, windows=args.windows, steps=args.steps, out_dir=args.out, seed=args.seed,
               progress=not args.no_progress, calib=args.calib, data=args.data)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fxquant.pareto ...``: the ``fxquant pareto`` command on its own."""
    import argparse
    import sys

    from .qat import _run
    parser = argparse.ArgumentParser(prog="fxquant")
    add_pareto_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pareto", *(argv if argv is not None else sys.argv[1:])])
    return _run(args)


if __name__ == "__main__":
    raise SystemExit(main())
