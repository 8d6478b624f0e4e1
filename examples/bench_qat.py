"""ParetoQ QAT against RTN and torchao's QAT on SmolLM2, at 2 bits and ternary (1.58 bits), per output channel.

Issue #5's check: in one run, with the same data, token budget and step count for every trained method,

1. **RTN** — no training: fxquant's ParetoQ quantizer at its initial scale (α = max|W| per output row), i.e.
   round-to-nearest onto ParetoQ's own level set ({±0.25, ±0.75}·α at 2 bits, {−2/3, 0, 2/3}·α ternary);
2. **ParetoQ QAT** — :func:`fxquant.paretoq.prepare_qat` (stretched elastic quant, learnable per-row α, LSQ
   gradient) trained by fxquant's own loop, :func:`fxquant.qat.train_qat`;
3. **torchao QAT** — ``torchao.quantization.qat.QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int2,
   "per_channel", is_symmetric=True))`` (dynamic per-row scale ``max|W| / 1.5``, levels {−2, −1, 0, 1}·scale),
   trained by the *same* :func:`~fxquant.qat.train_qat` call (same AdamW, no weight decay, cosine schedule to zero,
   grad clip 1.0, seeded WikiText-2 *validation* windows). torchao has no ternary dtype: the ternary column uses
   the same int2 config — the narrowest torchao integer type holding {−1, 0, +1} — which has *one more* level
   than ternary, so it favours torchao. Its run is the 2-bit torchao run (same config, same learning rate, same
   seed: the same numbers), so it is trained once and reported in both columns.

Both QAT methods quantize the same linears (every decoder projection; ``lm_head``, tied to the embeddings, and
the embeddings stay float) and train every parameter. Every model is evaluated **fake-quantized** (ParetoQ's
fake-quant equals its packed dequantized weight bit for bit; torchao's ``convert`` step without a base config only
swaps back to float linears, so its fake-quant model is its quantized model) by fxquant's perplexity protocol on
the first ``--eval-windows`` 512-token windows of WikiText-2 *test*, at step 0 and every ``--eval-every`` steps.

Run (the issue's budget: 300 steps of 4 x 256 tokens; on a 2-core CPU pass fewer ``--steps``)::

    python examples/bench_qat.py --steps 300 --eval-every 50 --eval-windows 5

``--scale-lr 3e-2`` trains ParetoQ's scales at their own learning rate (:class:`fxquant.qat.QATConfig`'s
``scale_lr``, what the ``paretoq-w1.58`` / ``paretoq-w2`` recipes do by default): at the paper's shared lr, this
script's default, they stay at their initial values over a budget this short.

Writes ``examples/results/qat_smollm2.{json,md,png}`` (``--out`` changes the stem), after every method, so an
interrupted run keeps what it measured; ``--resume`` with the same arguments finishes it, training only the
(width, method) pairs the saved file lacks. Every method trains from the same pristine model with the same seed,
so a resumed run reports what one uninterrupted run would have. torchao is optional (``pip install
fxquant[bench]``): without it the torchao variant is skipped with a printed line.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxquant.data import calibration_text, eval_text
from fxquant.evaluate import perplexity, tokenize_text
from fxquant.models import load_model
from fxquant.paretoq import ParetoQSpec, prepare_qat, qat_modules
from fxquant.qat import QATConfig, default_lr, train_qat

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "examples" / "results" / "qat_smollm2"
ISSUE_STEPS = 300
METHODS = ("rtn", "paretoq", "torchao")
LABELS = {"rtn": "RTN (ParetoQ init, no training)", "paretoq": "ParetoQ QAT (fxquant)",
          "torchao": "torchao QAT (IntxFakeQuantizeConfig int2 sym, per channel)"}
#: torchao's weight config at each width (torchao has no ternary dtype: int2 symmetric, see the docstring)
TORCHAO_DTYPE = {2: "int2", 1.58: "int2"}


def _bits(text: str) -> float:
    return ParetoQSpec(float(text)).bits  # validates: 1, 1.58, 2, 3, 4


def width_label(bits: float) -> str:
    return "ternary (1.58-bit)" if bits == 1.58 else f"{bits:g}-bit"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="built-in name, model folder or .gguf file (default smollm2)")
    p.add_argument("--widths", default="2,1.58", help="comma-separated ParetoQ widths (default 2,1.58)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--steps", type=int, default=ISSUE_STEPS, help=f"training steps (default {ISSUE_STEPS})")
    p.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training window (default 256)")
    p.add_argument("--lr", type=float, default=None, help="peak lr for every method (default: ParetoQ's, 2e-5 <= 2 bit)")
    p.add_argument("--scale-lr", type=float, default=None,
                   help="peak lr of ParetoQ's scales (default: --lr, the paper's recipe); torchao has no learned scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order (default 0)")
    p.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps (default 50; 0: start and end)")
    p.add_argument("--eval-windows", type=int, default=5, help="WikiText-2 test windows per evaluation (default 5)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--calib", default=None, help="training text (default: WikiText-2 validation)")
    p.add_argument("--data", default=None, help="evaluation text (default: WikiText-2 test)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output stem: writes STEM.json, STEM.md, STEM.png")
    p.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    p.add_argument("--no-progress", action="store_true", help="no per-step progress bar")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved at --out: keep the widths and methods it finished, run the rest "
                        "(the saved budget and evaluation settings must equal this command's)")
    return p


def _import_torchao() -> Any:
    """torchao's QAT API, or None (printed) when torchao is not installed."""
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig as AOQATConfig
    except ImportError as exc:
        print(f"torchao QAT: SKIPPED - torchao is not importable ({exc}); "
              f"pip install 'torchao==0.18.0' (or fxquant[bench]) to include it", flush=True)
        return None
    return {"version": getattr(sys.modules["torchao"], "__version__", "?"), "quantize_": quantize_,
            "IntxFakeQuantizeConfig": IntxFakeQuantizeConfig, "QATConfig": AOQATConfig}


def prepare_torchao(model: nn.Module, bits: float, ao: dict[str, Any], targets: set[str]) -> str:
    """Swap exactly the linears ParetoQ quantizes (``targets``) for torchao ``FakeQuantizedLinear``s."""
    dtype = getattr(torch, TORCHAO_DTYPE[bits])
    weight_config = ao["IntxFakeQuantizeConfig"](dtype, "per_channel", is_symmetric=True)
    ao["quantize_"](model, ao["QATConfig"](weight_config=weight_config, step="prepare"),
                    filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in targets)
    swapped = {n for n, m in model.named_modules() if type(m).__name__ == "FakeQuantizedLinear"}
    if swapped != targets:
        raise RuntimeError(f"torchao quantized {len(swapped)} linears, ParetoQ {len(targets)}: the comparison "
                           f"would not be like for like ({sorted(swapped ^ targets)[:4]})")
    return f"IntxFakeQuantizeConfig(torch.{TORCHAO_DTYPE[bits]}, 'per_channel', is_symmetric=True)"


class StepTimer:
    """``on_step`` callback of :func:`train_qat`: wall time of every step, leaving out the evaluations."""

    def __init__(self, eval_every: int):
        self.eval_every = eval_every
        self.last = time.perf_counter()
        self.times: list[float] = []

    def __call__(self, step: int, loss: float) -> None:
        now = time.perf_counter()
        after_eval = self.eval_every and step > 1 and (step - 1) % self.eval_every == 0
        if not after_eval:  # the interval before this step held an evaluation: not a step time
            self.times.append(now - self.last)
        self.last = now


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = [_bits(w) for w in args.widths.split(",") if w.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}: choose from {', '.join(METHODS)}")
    ao = _import_torchao() if "torchao" in methods else None
    out = Path(args.out)
    command = " ".join(["python", "examples/bench_qat.py", *(argv if argv is not None else sys.argv[1:])])

    print(f"loading {args.model} ...", flush=True)
    lm = load_model(args.model)
    pristine = lm.model
    pristine.requires_grad_(True)
    ids = tokenize_text(lm.tokenizer, calibration_text(args.calib)[0])
    eval_ids = tokenize_text(lm.tokenizer, eval_text(args.data)[0])
    lr_of = {b: args.lr if args.lr is not None else default_lr(b) for b in widths}
    config_of = {b: QATConfig(steps=args.steps, lr=lr_of[b], batch_size=args.batch_size, seq_len=args.seq_len,
                              seed=args.seed, eval_every=args.eval_every, eval_windows=args.eval_windows,
                              eval_seq_len=args.eval_seq_len, progress=not args.no_progress) for b in widths}
    # ParetoQ's config: the same, plus its scales' own lr when asked (torchao's linears have no weight_alpha)
    paretoq_config_of = {b: dataclasses.replace(c, scale_lr=args.scale_lr) for b, c in config_of.items()}
    eval_steps = sorted({0, args.steps, *(range(args.eval_every, args.steps, args.eval_every) if args.eval_every else ())})

    def ppl(model: nn.Module) -> tuple[float, float]:
        start = time.perf_counter()
        model.eval()
        with torch.no_grad():
            r = perplexity(model, ids=eval_ids, windows=args.eval_windows, seq_len=args.eval_seq_len, progress=False)
        return r.ppl, time.perf_counter() - start

    report: dict[str, Any] = {
        "model": args.model, "command": command,
        "budget": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                   "tokens": args.steps * args.batch_size * args.seq_len, "issue_steps": ISSUE_STEPS,
                   "paretoq_scale_lr": args.scale_lr,
                   "reduced_from_issue": args.steps < ISSUE_STEPS, "seed": args.seed,
                   "optimizer": "AdamW (no weight decay) over every parameter, cosine to zero, grad clip 1.0 "
                                "(fxquant.qat.train_qat, the same call for every trained method)",
                   "train_data": "random windows of WikiText-2 validation" if args.calib is None else args.calib},
        "eval": {"windows": args.eval_windows, "seq_len": args.eval_seq_len, "every": args.eval_every,
                 "steps": eval_steps, "data": "WikiText-2 test" if args.data is None else args.data,
                 "mode": "fake-quant (ParetoQ QATLinear / torchao FakeQuantizedLinear) for every method"},
        "env": {"torch": torch.__version__, "torchao": ao["version"] if ao else None, "threads": torch.get_num_threads(),
                "machine": platform.machine(), "cpus": os.cpu_count()},
        "float_ppl": None, "widths": {}, "skipped": [],
    }
    if "torchao" in methods and ao is None:
        report["skipped"].append("torchao: not installed")

    def write() -> None:
        write_results(report, out, plot=not args.no_plot)

    if args.resume:
        report = resume_report(report, out)
    if report["float_ppl"] is None:
        report["float_ppl"], secs = ppl(pristine)
        report["eval"]["seconds_per_eval"] = secs
        print(f"float model: perplexity {report['float_ppl']:.3f} on {args.eval_windows} windows ({secs:.1f}s)",
              flush=True)
    torchao_runs: dict[tuple, dict[str, Any]] = {
        (TORCHAO_DTYPE.get(e["bits"]), e["lr"]): e["methods"]["torchao"] for e in report["widths"].values()
        if "torchao" in e["methods"] and not e["methods"]["torchao"].get("reused_from_width")}

    for bits in widths:
        spec = ParetoQSpec(bits)
        config = config_of[bits]
        entry = report["widths"].setdefault(spec.label, {"bits": bits, "lr": lr_of[bits], "methods": {}})
        if entry["lr"] != lr_of[bits]:
            raise SystemExit(f"--resume: the saved {width_label(bits)} run used lr {entry['lr']:g}, this command "
                             f"{lr_of[bits]:g}: pass the same --lr, or a new --out")
        print(f"\n=== {width_label(bits)}, per output channel, lr {lr_of[bits]:g} ===", flush=True)
        done = [m for m in methods if m in entry["methods"]]
        if done:
            print(f"resumed: {', '.join(done)} at {width_label(bits)} kept from {out.with_suffix('.json')}", flush=True)

        # 1. RTN: ParetoQ's quantizer at its initial scale, no training
        targets: set[str] = set()
        if any(m not in entry["methods"] for m in methods):
            probe = prepare_qat(copy.deepcopy(pristine), spec)
            targets = set(qat_modules(probe))
            entry["quantized_linears"] = len(targets)
            if "rtn" in methods and "rtn" not in entry["methods"]:
                value, secs = ppl(probe)
                entry["methods"]["rtn"] = {"label": LABELS["rtn"], "trained_steps": 0,
                                           "quantizer": f"fxquant ParetoQ {spec.describe()} at init (alpha = max|W| per row)",
                                           "curve": [{"step": s, "ppl": value} for s in eval_steps], "final_ppl": value,
                                           "note": "no training: the same model at every point of the curve"}
                print(f"RTN {width_label(bits)}: perplexity {value:.3f}", flush=True)
                write()
            del probe

        # 2. ParetoQ QAT and 3. torchao QAT, trained by the same train_qat call
        for method in ("paretoq", "torchao"):
            if method not in methods or method in entry["methods"] or (method == "torchao" and ao is None):
                continue
            if method == "torchao" and bits not in TORCHAO_DTYPE:
                why = f"torchao at {width_label(bits)}: no torchao config is compared at this width (2-bit and ternary only)"
                print(f"{why}: SKIPPED", flush=True)
                report["skipped"].append(why)
                continue
            key = (TORCHAO_DTYPE.get(bits), lr_of[bits])
            if method == "torchao" and key in torchao_runs:
                reused = copy.deepcopy(torchao_runs[key])
                reused["note"] = (f"{width_label(bits)} uses the same torchao config ({reused['quantizer']}) and lr as the "
                                  f"{reused['width']}-bit run: trained once, the same numbers")
                reused["reused_from_width"] = reused["width"]
                entry["methods"]["torchao"] = reused
                print(f"torchao {width_label(bits)}: the {reused['width']}-bit int2 run (same config), "
                      f"final perplexity {reused['final_ppl']:.3f}", flush=True)
                write()
                continue
            model = copy.deepcopy(pristine)
            if method == "paretoq":
                prepare_qat(model, spec)
                quantizer = f"fxquant.paretoq.prepare_qat({spec.describe()}: per-row learnable alpha)" + (
                    "" if args.scale_lr is None else f", alpha trained at peak lr {args.scale_lr:g}")
            else:
                quantizer = prepare_torchao(model, bits, ao, targets)
            start_ppl, _ = ppl(model)
            print(f"{method} {width_label(bits)}: step 0 perplexity {start_ppl:.3f}; training {args.steps} steps of "
                  f"{args.batch_size}x{args.seq_len} tokens", flush=True)
            timer = StepTimer(args.eval_every)
            t0 = timer.last
            history = train_qat(model, ids, paretoq_config_of[bits] if method == "paretoq" else config, bits=bits,
                                eval_ids=eval_ids, on_step=timer)
            curve = [{"step": 0, "ppl": start_ppl}] + [{"step": int(e["step"]), "ppl": float(e["ppl"])}
                                                       for e in history.evals]
            step_s = statistics.median(timer.times) if timer.times else float("nan")
            label = LABELS[method] + ("" if method != "paretoq" or args.scale_lr is None
                                      else f", scales at lr {args.scale_lr:g}")
            result = {"label": label, "trained_steps": len(history.losses), "quantizer": quantizer,
                      "curve": curve, "final_ppl": curve[-1]["ppl"], "losses": history.losses,
                      "seconds": time.perf_counter() - t0, "step_seconds_median": step_s, "width": spec.label}
            entry["methods"][method] = result
            if method == "torchao":
                torchao_runs[key] = result
            print(f"{method} {width_label(bits)}: final perplexity {result['final_ppl']:.3f} after "
                  f"{result['trained_steps']} steps ({result['seconds']:.0f}s, {step_s:.2f}s/step)", flush=True)
            del model
            write()
        entry["verdict"] = verdict(entry)
        write()
    for label, entry in report["widths"].items():
        if entry.get("verdict"):
            print(f"{width_label(entry['bits'])}: {entry['verdict']}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", flush=True)
    return report


#: report fields a resumed run must share with the saved one (the rest is measured, or bookkeeping)
_RESUME_KEYS = {"budget": ("steps", "batch_size", "seq_len", "seed", "paretoq_scale_lr", "train_data"),
                "eval": ("windows", "seq_len", "every", "steps", "data")}


def resume_report(fresh: dict[str, Any], out: Path) -> dict[str, Any]:
    """The report saved at ``out`` (STEM.json), to be continued by ``fresh``'s command.

    Refuses, with what differs, when the saved run measured something else (model, budget, data, evaluation or
    torch version): mixing those in one table would compare unlike runs.
    """
    path = out.with_suffix(".json")
    if not path.exists():
        print(f"--resume: no {path} yet, starting a new run", flush=True)
        return fresh
    saved = json.loads(path.read_text())
    diffs = [f"model {saved.get('model')!r} != {fresh['model']!r}"] if saved.get("model") != fresh["model"] else []
    for part, keys in _RESUME_KEYS.items():
        diffs += [f"{part}.{k} {saved.get(part, {}).get(k)!r} != {fresh[part][k]!r}"
                  for k in keys if saved.get(part, {}).get(k) != fresh[part][k]]
    for k in ("torch", "torchao"):
        if saved.get("env", {}).get(k) != fresh["env"][k]:
            diffs.append(f"env.{k} {saved.get('env', {}).get(k)!r} != {fresh['env'][k]!r}")
    if diffs:
        raise SystemExit(f"--resume: {path} was measured with other settings ({'; '.join(diffs)}); "
                         "rerun with the saved run's arguments (its command is in the file) or pick a new --out")
    saved["skipped"] = fresh["skipped"]
    saved.setdefault("resumed_by", []).append(fresh["command"])
    return saved


def verdict(entry: dict[str, Any]) -> str:
    m = entry["methods"]
    if "paretoq" not in m:
        return ""
    pq = m["paretoq"]["final_ppl"]
    others = {k: v["final_ppl"] for k, v in m.items() if k != "paretoq"}
    beaten = [k for k, v in others.items() if pq < v]
    parts = [f"ParetoQ {pq:.1f} vs " + ", ".join(f"{k} {v:.1f}" for k, v in others.items())]
    if others and len(beaten) == len(others):
        parts.append(f"ParetoQ beats {'both' if len(others) == 2 else 'all others'}")
    else:
        parts.append("ParetoQ does NOT beat " + ", ".join(k for k in others if k not in beaten))
    return ": ".join(parts)


def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:,.0f}" if x >= 1000 else f"{x:.2f}"


def write_results(report: dict[str, Any], out: Path, plot: bool = True) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    b, ev = report["budget"], report["eval"]
    lines = [f"# ParetoQ QAT vs RTN vs torchao QAT: {report['model']}, per output channel", "",
             f"Command: `{report['command']}`"
             + "".join(f"; interrupted and finished by `{c}`" for c in report.get("resumed_by", [])), "",
             f"- Budget, every trained method: **{b['steps']} steps x {b['batch_size']} x {b['seq_len']} tokens** = "
             f"{b['tokens']:,} tokens of {b['train_data']} (same seed, same windows, same order); {b['optimizer']}."
             + ("" if b.get("paretoq_scale_lr") is None else
                f" ParetoQ's scales (weight_alpha) form their own AdamW group at peak lr {b['paretoq_scale_lr']:g}, "
                "same schedule (`--scale-lr`); every other parameter, of every method, trains at the lr in each heading.")
             + (f" **Reduced from the issue's {b['issue_steps']} steps** to fit the CPU time available."
                if b["reduced_from_issue"] else ""),
             f"- Perplexity: WikiText-2 test, first {ev['windows']} windows of {ev['seq_len']} tokens (fxquant's "
             f"protocol), at steps {', '.join(map(str, ev['steps']))}; {ev['mode']}. Float model: "
             f"{_fmt(report['float_ppl'])}.",
             "- RTN: fxquant's ParetoQ quantizer at its initial scale (alpha = max|W| per row), no training: the "
             "same level set as ParetoQ QAT ({+-0.25, +-0.75} alpha at 2 bits, {-2/3, 0, 2/3} alpha ternary).",
             "- torchao: `QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int2, 'per_channel', "
             "is_symmetric=True))` on the same linears, dynamic per-row scale max|W|/1.5, levels {-2,-1,0,1} x scale, "
             "evaluated fake-quantized (its convert step without a base config only restores float linears). "
             "torchao has no ternary dtype: the ternary rows use the same int2 config (one level more than "
             "ternary, in torchao's favour), i.e. the same run as at 2 bits.",
             f"- torch {report['env']['torch']}, torchao {report['env']['torchao'] or 'not installed'}, "
             f"{report['env']['threads']} threads ({report['env']['machine']}, {report['env']['cpus']} CPUs)."]
    if report["skipped"]:
        lines.append(f"- Skipped: {'; '.join(report['skipped'])}.")
    for label, entry in report["widths"].items():
        steps = ev["steps"]
        lines += ["", f"## {width_label(entry['bits'])} (lr {entry['lr']:g}, "
                      f"{entry.get('quantized_linears', '?')} linears quantized)", "",
                  "| method | trained steps | s/step | " + " | ".join(f"step {s}" for s in steps) + " |",
                  "| --- | ---: | ---: | " + " | ".join("---:" for _ in steps) + " |"]
        for name, m in entry["methods"].items():
            at = {c["step"]: c["ppl"] for c in m["curve"]}
            step_s = m.get("step_seconds_median")
            lines.append(f"| {m['label']} | {m['trained_steps']} | {'-' if step_s is None else f'{step_s:.2f}'} | "
                         + " | ".join(_fmt(at.get(s)) for s in steps) + " |")
        if entry.get("verdict"):
            lines += ["", f"**Verdict at this budget:** {entry['verdict']}."]
        notes = [m["note"] for m in entry["methods"].values() if m.get("note") and m.get("reused_from_width")]
        lines += [f"\n{n}." for n in notes]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if plot:
        plot_curves(report, out.with_suffix(".png"))


def plot_curves(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    widths = list(report["widths"].items())
    if not widths:
        return
    fig, axes = plt.subplots(1, len(widths), figsize=(5.5 * len(widths), 4), squeeze=False)
    for ax, (label, entry) in zip(axes[0], widths):
        for name, m in entry["methods"].items():
            xs = [c["step"] for c in m["curve"]]
            ys = [c["ppl"] for c in m["curve"]]
            ax.plot(xs, ys, marker="o", label=m["label"], linestyle="--" if name == "rtn" else "-")
        if report.get("float_ppl"):
            ax.axhline(report["float_ppl"], color="grey", linestyle=":", label="float")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("WikiText-2 test perplexity (log)")
        ax.set_title(f"{report['model']} {width_label(entry['bits'])}, per channel")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
