"""ParetoQ quantization-aware training: the built-in trainer, safe resumable checkpoints, and ``fxquant qat``.

Users with their own loop (or the Hugging Face ``Trainer``) only need :func:`fxquant.paretoq.prepare_qat` and
:func:`fxquant.paretoq.convert`. This module is for everyone else:

    fxquant qat --model smollm2 --recipe paretoq-w2 --steps 300 --out smollm2-w2/

The recipe is the paper's: AdamW without weight decay over every parameter (latent weights, scales and the float
parts), a cosine schedule to zero, lr 2e-5 for ≤ 2 bits and 1e-5 for 3–4 bits. Batches are random windows of
the calibration text (WikiText-2 *validation*); the periodic evaluation is the perplexity protocol of
:mod:`fxquant.evaluate` on a few windows of WikiText-2 *test*. Everything random draws from one seeded
generator, whose state is part of the checkpoint, so a run resumed from a checkpoint ends bit for bit where the
uninterrupted run ends.

Checkpoints are safetensors (model state, optimizer moments, the data generator's state) plus JSON (step,
optimizer hyper-parameters, scheduler state): nothing is unpickled.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import DataError, FxquantError, RecipeError

__all__ = ["QATConfig", "QATHistory", "default_lr", "train_qat", "save_qat_checkpoint", "load_qat_checkpoint",
           "make_optimizer", "add_qat_parser", "cmd_qat", "calibration_ids"]

log = logging.getLogger("fxquant")

CHECKPOINT_STATE = "qat_state.safetensors"
CHECKPOINT_META = "qat_state.json"


def default_lr(bits: float) -> float:
    """The paper's learning rate: 2e-5 at ≤ 2 bits, 1e-5 at 3–4 bits."""
    return 2e-5 if bits <= 2 else 1e-5


@dataclass
class QATConfig:
    """Settings of :func:`train_qat` (defaults: the paper's optimizer, a CPU-sized budget)."""

    steps: int = 200
    lr: float | None = None          # None: default_lr(bits)
    batch_size: int = 4
    seq_len: int = 256
    seed: int = 0
    eval_every: int = 0              # 0: evaluate only at the end (when eval ids are given)
    eval_windows: int = 4
    eval_seq_len: int = 512
    save_every: int = 0              # 0: no intermediate checkpoints
    grad_clip: float | None = 1.0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise RecipeError(f"QAT {name} must be a positive integer, got {value!r}", f"e.g. --{name.replace('_', '-')} 4")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise RecipeError(f"QAT learning rate must be a positive number, got {self.lr!r}", "e.g. --lr 2e-5")


@dataclass
class QATHistory:
    """What a run did: the loss of every step and the perplexity at each evaluation."""

    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    start_step: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibration_ids(tokenizer: Any, text: str) -> torch.Tensor:
    from .evaluate import tokenize_text
    return tokenize_text(tokenizer, text)


def make_optimizer(model: nn.Module, lr: float, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no weight decay) over every trainable parameter, cosine from ``lr`` to zero over ``steps``."""
    from .paretoq import trainable_parameters
    params = list(trainable_parameters(model))
    if not params:
        raise RecipeError("the model has no trainable parameter", "do not freeze the model before QAT")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps)))
    return opt, sched


def _batch(ids: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=gen)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=batch, labels=batch)
    loss = out.loss if hasattr(out, "loss") else out[0]
    if loss is None:
        raise FxquantError(f"{type(model).__name__} returned no loss for labels=input_ids",
                           "the built-in trainer needs a causal LM; train other models with your own loop")
    return loss


# ---- checkpoints ------------------------------------------------------------------------------------------------------
def save_qat_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        step: int, generator: torch.Generator, extra: dict[str, Any] | None = None) -> Path:
    """Write a resumable QAT state to the folder ``path`` (safetensors + JSON; written atomically per file)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().clone().contiguous().cpu()  # clones: tied weights share storage
    opt_state = optimizer.state_dict()
    for idx, state in opt_state["state"].items():
        for k, v in state.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"optim.{idx}.{k}"] = t.detach().clone().contiguous().cpu()
    tensors["generator_state"] = generator.get_state()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt_state["param_groups"]]
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {"format": "fxquant-qat-v1", "step": step, "param_groups": groups, "scheduler": sched,
            "extra": extra or {}}
    tmp = path / (CHECKPOINT_STATE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "fxquant-qat-v1"})
    os.replace(tmp, path / CHECKPOINT_STATE)
    (path / (CHECKPOINT_META + ".tmp")).write_text(json.dumps(meta, indent=1, default=float))
    os.replace(path / (CHECKPOINT_META + ".tmp"), path / CHECKPOINT_META)
    return path


def load_qat_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        generator: torch.Generator) -> dict[str, Any]:
    """Restore what :func:`save_qat_checkpoint` wrote into a model prepared the same way; returns its metadata."""
    from safetensors.torch import load_file
    path = Path(path)
    if not (path / CHECKPOINT_STATE).is_file() or not (path / CHECKPOINT_META).is_file():
        raise FxquantError(f"{path} is not a QAT checkpoint (no {CHECKPOINT_STATE} / {CHECKPOINT_META})",
                           "pass the folder written by --save-every / save_qat_checkpoint")
    try:
        meta = json.loads((path / CHECKPOINT_META).read_text())
        tensors = load_file(str(path / CHECKPOINT_STATE))
    except Exception as exc:  # noqa: BLE001 - corrupted files raise various errors
        raise FxquantError(f"QAT checkpoint {path} is corrupted: {exc}".splitlines()[0], "start again or use an older one") from exc
    if meta.get("format") != "fxquant-qat-v1":
        raise FxquantError(f"{path} holds {meta.get('format')!r}, not an fxquant QAT checkpoint", "start again")
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FxquantError(f"QAT checkpoint {path} does not fit this model (missing {list(missing)[:3]}, "
                           f"unexpected {list(unexpected)[:3]})",
                           "resume with the same model and recipe the checkpoint was trained with")
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    generator.set_state(tensors["generator_state"])
    return meta


# ---- the trainer --------------------------------------------------------------------------------------------------------
def train_qat(model: nn.Module, ids: torch.Tensor, config: QATConfig | None = None, *, bits: float | None = None,
              eval_ids: torch.Tensor | None = None, checkpoint_dir: str | os.PathLike | None = None,
              resume: str | os.PathLike | None = None,
              on_step: Callable[[int, float], None] | None = None) -> QATHistory:
    """Train a model prepared with :func:`~fxquant.paretoq.prepare_qat` on random windows of ``ids``.

    ``bits`` picks the default learning rate when ``config.lr`` is None (read from the model when omitted).
    ``resume`` continues from a checkpoint folder; ``checkpoint_dir`` receives one (``step-<N>/``) every
    ``config.save_every`` steps and at the end. Returns the loss of every step run and the evaluations.
    """
    from .paretoq import qat_modules
    config = config or QATConfig()
    ids = torch.as_tensor(ids).reshape(-1).long()
    if ids.numel() <= config.seq_len:
        raise DataError(f"calibration text has {ids.numel()} tokens, not more than one {config.seq_len}-token window",
                        "use more text (WikiText-2 validation by default) or a smaller --seq-len")
    if bits is None:
        mods = qat_modules(model)
        bits = next(iter(mods.values())).spec.bits if mods else 4
    lr = config.lr if config.lr is not None else default_lr(bits)
    device = next(model.parameters()).device
    optimizer, scheduler = make_optimizer(model, lr, config.steps)
    gen = torch.Generator().manual_seed(config.seed)
    history = QATHistory()
    step = 0
    if resume is not None:
        meta = load_qat_checkpoint(resume, model, optimizer, scheduler, gen)
        step = history.start_step = int(meta["step"])
        log.info("resumed QAT from %s at step %d", resume, step)
    was_training = model.training
    model.train()
    start = time.perf_counter()
    bar = None
    if config.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.steps, initial=step, desc=f"QAT {bits}-bit", unit="step")

    def evaluate(at: int) -> None:
        if eval_ids is None:
            return
        from .evaluate import perplexity
        model.eval()
        r = perplexity(model, ids=eval_ids, windows=config.eval_windows, seq_len=config.eval_seq_len, progress=False)
        model.train()
        history.evals.append({"step": at, "ppl": r.ppl})
        if bar is not None:
            bar.write(f"step {at}: perplexity {r.ppl:.3f} on {r.windows} windows")

    try:
        while step < config.steps:
            batch = _batch(ids, config.batch_size, config.seq_len, gen).to(device)
            loss = _loss(model, batch)
            if not torch.isfinite(loss):
                raise FxquantError(f"QAT loss became {loss.item()} at step {step}",
                                   "lower the learning rate (--lr) or check the model for NaN/Inf weights")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            history.losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, history.losses[-1])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{history.losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                evaluate(step)
            if checkpoint_dir is not None and config.save_every and step % config.save_every == 0:
                save_qat_checkpoint(Path(checkpoint_dir) / f"step-{step:06d}", model, optimizer, scheduler, step, gen)
        evaluate(step)
        if checkpoint_dir is not None:
            save_qat_checkpoint(Path(checkpoint_dir) / f"step-{step:06d}", model, optimizer, scheduler, step, gen)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    history.seconds = time.perf_counter() - start
    return history


# ---- the command ------------------------------------------------------------------------------------------------------
def add_qat_parser(sub: Any) -> Any:
    """Add ``fxquant qat`` to the CLI's subparsers (``build_parser`` calls this)."""
    p = sub.add_parser("qat", help="ParetoQ quantization-aware training, then packed low-bit weights",
                       description="Train a ParetoQ recipe (paretoq-w1, -w1.58, -w2, -w3, -w4) with the paper's "
                                   "optimizer (AdamW, no weight decay, cosine to zero, lr 2e-5 <= 2 bit / 1e-5 3-4 bit) "
                                   "on WikiText-2 validation windows, evaluate on WikiText-2 test windows, and "
                                   "optionally save the quantized model.")
    p.add_argument("--model", default="smollm2", help="built-in name, model folder, .gguf file or hub id")
    p.add_argument("--recipe", default="paretoq-w2", help="a ParetoQ recipe (default paretoq-w2)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's, 200)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-5 <= 2 bit, 1e-5 above)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training window (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order (default 0)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: only before and after)")
    p.add_argument("--eval-windows", type=int, default=4, help="512-token WikiText-2 test windows per evaluation")
    p.add_argument("--calib", default=None, help="calibration text file (default: WikiText-2 validation)")
    p.add_argument("--data", default=None, help="evaluation text (default: WikiText-2 test)")
    p.add_argument("--checkpoint-dir", default=None, help="folder for resumable checkpoints (step-<N>/ inside)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (with --checkpoint-dir)")
    p.add_argument("--resume", default=None, help="continue from this checkpoint folder (a step-<N>/ folder)")
    p.add_argument("--out", default=None, help="save the quantized model here (safetensors + packed codes)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the losses and perplexities as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    p.set_defaults(func=cmd_qat)
    return p


def cmd_qat(args: Any) -> int:
    from .data import calibration_text, eval_text
    from .evaluate import perplexity, tokenize_text
    from .models import load_model
    from .paretoq import ParetoQSpec, convert, paretoq_weights, prepare_qat
    from .recipes import get_recipe

    recipe = get_recipe(args.recipe)
    if not isinstance(recipe.weight, ParetoQSpec):
        raise RecipeError(f"fxquant qat trains ParetoQ recipes, not {recipe.name!r}",
                          "use paretoq-w1, paretoq-w1.58, paretoq-w2, paretoq-w3 or paretoq-w4")
    steps = args.steps if args.steps is not None else int(recipe.options.get("steps", 200))
    config = QATConfig(steps=steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                       eval_every=args.eval_every, eval_windows=args.eval_windows, progress=not args.no_progress,
                       save_every=args.save_every)
    lm = load_model(args.model)
    if not lm.is_causal_lm:
        raise FxquantError(f"{args.model} is not a causal LM", "fxquant qat trains causal LMs (next-token loss)")
    torch.manual_seed(args.seed)
    ids = tokenize_text(lm.tokenizer, calibration_text(args.calib)[0])
    eval_ids = tokenize_text(lm.tokenizer, eval_text(args.data)[0])
    float_ppl = perplexity(lm.model, ids=eval_ids, windows=args.eval_windows, progress=False).ppl
    prepare_qat(lm.model, recipe)
    start_ppl = perplexity(lm.model, ids=eval_ids, windows=args.eval_windows, progress=False).ppl
    history = train_qat(lm.model, ids, config, bits=recipe.weight.bits, eval_ids=eval_ids,
                        checkpoint_dir=args.checkpoint_dir, resume=args.resume)
    final = history.evals[-1]["ppl"] if history.evals else float("nan")
    convert(lm.model, packed=False)
    quantized = paretoq_weights(lm.model)
    packed_bytes = sum(q.packed_nbytes() for q in quantized.values())
    float_bytes = sum(q.codes.numel() * 2 for q in quantized.values())
    print(f"\nmodel: {args.model}  recipe: {recipe.name}  steps: {steps}  ({history.seconds:.0f}s)")
    print(f"perplexity on {args.eval_windows} WikiText-2 test windows: fp32 {float_ppl:.3f}, "
          f"fake-quant at init {start_ppl:.3f}, after QAT {final:.3f}")
    print(f"quantized linears: {len(quantized)}, packed {packed_bytes / 2**20:.2f} MiB "
          f"({packed_bytes / float_bytes:.3f} of their fp16 bytes)")
    if args.out:
        from .checkpoint import save_quantized
        out = save_quantized(lm.model, lm.tokenizer, args.out, recipe=recipe, quantized=quantized, overwrite=True)
        print(f"wrote {out}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        report = {"model": args.model, "recipe": recipe.name, "steps": steps, "config": asdict(config),
                  "ppl_fp32": float_ppl, "ppl_init": start_ppl, "ppl_final": final, "packed_bytes": packed_bytes,
                  "fp16_bytes": float_bytes, **history.to_dict()}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fxquant.qat ...``: the ``fxquant qat`` command on its own (same arguments)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="fxquant")
    add_qat_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["qat", *(argv if argv is not None else sys.argv[1:])])
    return _run(args)


def _run(args: Any) -> int:
    """Run a parsed command the way ``fxquant.cli.main`` does: one-line errors unless ``--debug``."""
    import sys
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    try:
        return args.func(args)
    except FxquantError as exc:
        if args.debug:
            raise
        print(f"fxquant: error: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else ""), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
