"""ParetoQ quantization-aware training: the built-in trainer, safe resumable checkpoints, and ``fxquant qat``.

Users with their own loop (or the Hugging Face ``Trainer``) only need :func:`fxquant.paretoq.prepare_qat` and
:func:`fxquant.paretoq.convert`. This module is for everyone else:

    fxquant qat --model smollm2 --recipe paretoq-w2 --steps 300 --out smollm2-w2/

The recipe is the paper's: AdamW without weight decay over every parameter (latent weights, scales and the float
parts), a cosine schedule to zero, lr 2e-5 for ≤ 2 bits and 1e-5 for 3–4 bits. ``scale_lr`` gives the ParetoQ
scales (``weight_alpha``) a learning rate of their own: at the paper's lr, Adam moves a scale of ~0.6 by at most
~2e-5 a step, so over a CPU-sized budget of a few hundred steps the scales stay where ``init_alpha`` put them (and
after global gradient clipping their gradients sit at Adam's ``eps``). The built-in ternary and 2-bit recipes set
``scale_lr: 3e-2``: on SmolLM2, 100 steps (``examples/results/qat_smollm2_scale_lr.md``) then reach perplexity
1,052 (2-bit) and 3,101 (ternary) where the shared lr reached 4,126 and 5.6e5; the 3- and 4-bit ones set
``scale_lr: 5e-3`` (50 steps: 267 and 34.06 against 1,840 and 43.03). Batches are random windows of
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

from . import train_state
from .errors import DataError, FxquantError, RecipeError, TrainingError

__all__ = ["QATConfig", "QATHistory", "default_lr", "train_qat", "save_qat_checkpoint", "load_qat_checkpoint",
           "make_optimizer", "add_qat_parser", "cmd_qat", "calibration_ids", "full_state_dict"]

log = logging.getLogger("fxquant")

CHECKPOINT_STATE = "qat_state.safetensors"
CHECKPOINT_META = "qat_state.json"


def default_lr(bits: float) -> float:
    """The paper's learning rate: 2e-5 at ≤ 2 bits, 1e-5 at 3–4 bits."""
    return 2e-5 if bits <= 2 else 1e-5


#: how :func:`train_qat` spreads a run over the ranks of ``torch.distributed`` (ignored in a single process)
SHARDINGS = ("ddp", "fsdp")


@dataclass
class QATConfig:
    """Settings of :func:`train_qat` (defaults: the paper's optimizer, a CPU-sized budget).

    ``batch_size`` is the *global* batch: under ``torch.distributed`` each of the ``world_size`` ranks trains on
    ``batch_size / world_size`` windows of it. ``sharding`` picks DistributedDataParallel (``"ddp"``, every rank
    holds the whole model) or FSDP2 (``"fsdp"``: parameters, gradients and optimizer moments sharded).
    """

    steps: int = 200
    lr: float | None = None          # None: default_lr(bits)
    scale_lr: float | None = None    # peak lr of the ParetoQ scales (weight_alpha); None: the same as lr (the paper)
    batch_size: int = 4
    seq_len: int = 256
    seed: int = 0
    eval_every: int = 0              # 0: evaluate only at the end (when eval ids are given)
    eval_windows: int = 4
    eval_seq_len: int = 512
    save_every: int = 0              # 0: no intermediate checkpoints
    keep_last: int = 0               # keep only the newest N checkpoints (0: keep every one)
    grad_clip: float | None = 1.0
    progress: bool = True
    sharding: str = "ddp"            # under torch.distributed: "ddp" (replicated) or "fsdp" (FSDP2, sharded)

    def __post_init__(self) -> None:
        if self.sharding not in SHARDINGS:
            raise RecipeError(f"QAT sharding must be 'ddp' or 'fsdp', got {self.sharding!r}",
                              "--sharding ddp (every GPU holds the model) or --sharding fsdp (sharded)")
        for name in ("steps", "batch_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise RecipeError(f"QAT {name} must be a positive integer, got {value!r}", f"e.g. --{name.replace('_', '-')} 4")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise RecipeError(f"QAT learning rate must be a positive number, got {self.lr!r}", "e.g. --lr 2e-5")
        if self.scale_lr is not None and (isinstance(self.scale_lr, bool) or not isinstance(self.scale_lr, (int, float))
                                          or not (self.scale_lr > 0 and math.isfinite(self.scale_lr))):
            raise RecipeError(f"QAT scale learning rate must be a positive number, got {self.scale_lr!r}",
                              "e.g. --scale-lr 1e-2, or leave it out to train the scales at --lr")
        if isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int) or self.keep_last < 0:
            raise RecipeError(f"QAT keep_last must be a number of checkpoints >= 0 (0: keep all), got {self.keep_last!r}",
                              "e.g. --keep-last 2")


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


def make_optimizer(model: nn.Module, lr: float, steps: int,
                   scale_lr: float | None = None) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no weight decay) over every trainable parameter, cosine from the peak lr to zero over ``steps``.

    ``scale_lr``: the ParetoQ scales (parameters named ``weight_alpha``) form a second group with this peak lr
    (same schedule); None keeps one group at ``lr``, the paper's recipe.
    """
    from .paretoq import trainable_parameters
    params = list(trainable_parameters(model))
    if not params:
        raise RecipeError("the model has no trainable parameter", "do not freeze the model before QAT")
    # the fused kernel: one pass over each parameter instead of a dozen elementwise ops (on a 2-core CPU the
    # unfused step of SmolLM2 took ~14 s); DTensor shards (FSDP2) and other tensor subclasses keep the default
    fused = all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") and p.is_floating_point()
                for p in params)
    groups: list[dict[str, Any]] = [{"params": params, "lr": lr}]
    if scale_lr is not None:
        # by name, which FSDP2's sharded parameters keep (their identity changes)
        scale_ids = {id(p) for name, p in model.named_parameters() if name.rpartition(".")[2] == "weight_alpha"}
        if not scale_ids:
            raise RecipeError("scale_lr is set but the model has no ParetoQ scales (weight_alpha parameters)",
                              "call fxquant.paretoq.prepare_qat(model, recipe) first, or leave scale_lr out")
        groups = [{"params": [p for p in params if id(p) not in scale_ids], "lr": lr},
                  {"params": [p for p in params if id(p) in scale_ids], "lr": scale_lr}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, fused=fused or None)
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
def _qat_fingerprint(model: nn.Module, optimizer: torch.optim.Optimizer,
                     config: Any = None) -> dict[str, Any]:
    """What a resumed QAT run must share with the saved one: the model's tensors (names, shapes, dtypes), each
    QAT linear's ParetoQ spec, the optimizer's hyper-parameters and, when the trainer passes it, its config."""
    from .paretoq import qat_modules
    groups = [{k: g.get(k) for k in ("initial_lr", "betas", "eps", "weight_decay")} | {"params": len(g["params"])}
              for g in optimizer.param_groups]
    return train_state.fingerprint("qat", config, model.state_dict(),
                                   ignore=train_state.RUN_CONTROL | {"eval_every", "eval_windows", "eval_seq_len",
                                                                      "sharding"},
                                   specs={n: m.spec.describe() for n, m in qat_modules(model).items()},
                                   optimizer=groups)


def save_qat_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        step: int, generator: torch.Generator, extra: dict[str, Any] | None = None, *,
                        config: Any = None) -> Path:
    """Write a resumable QAT state to the folder ``path`` with :mod:`fxquant.train_state`: the model's state
    dict, the AdamW moments, the scheduler, the data generator, the step, ``extra``, and a fingerprint (add the
    :class:`QATConfig` as ``config`` to have its fields checked on resume too)."""
    return train_state.save_train_state(path, kind="qat", step=step, tensors=model.state_dict(), optimizer=optimizer,
                                        scheduler=scheduler, generators={"data": generator}, extras=extra or {},
                                        fingerprint=_qat_fingerprint(model, optimizer, config))


def load_qat_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        generator: torch.Generator, *, config: Any = None) -> dict[str, Any]:
    """Restore what :func:`save_qat_checkpoint` wrote into a model prepared the same way (``path``: a
    ``step-<N>/`` folder, or a checkpoint directory: its latest complete one); returns ``{"step", "extra",
    "path"}``. A checkpoint of another model, recipe or optimizer raises :class:`TrainingError`."""
    folder = Path(path)
    if (folder / CHECKPOINT_META).is_file():
        raise TrainingError(f"{folder} is a QAT checkpoint of an older fxquant ({CHECKPOINT_META}), which this "
                            f"version does not read", "start the run again")
    folder = train_state.resolve_resume(folder, None, "QAT")
    state = train_state.load_train_state(folder, kind="qat", fingerprint=_qat_fingerprint(model, optimizer, config))
    target = model.state_dict()
    train_state.copy_tensors(target, state.tensors, f"QAT checkpoint {folder}")
    state.restore(optimizer=optimizer, scheduler=scheduler, generators={"data": generator})
    return {"step": state.step, "extra": state.extras, "path": str(folder)}


# ---- the trainer --------------------------------------------------------------------------------------------------------
def train_qat(model: nn.Module, ids: torch.Tensor, config: QATConfig | None = None, *, bits: float | None = None,
              eval_ids: torch.Tensor | None = None, checkpoint_dir: str | os.PathLike | None = None,
              resume: str | os.PathLike | None = None,
              on_step: Callable[[int, float], None] | None = None) -> QATHistory:
    """Train a model prepared with :func:`~fxquant.paretoq.prepare_qat` on random windows of ``ids``.

    ``bits`` picks the default learning rate when ``config.lr`` is None (read from the model when omitted).
    ``resume`` continues from a checkpoint folder; ``checkpoint_dir`` receives one (``step-<N>/``) every
    ``config.save_every`` steps and at the end. Returns the loss of every step run and the evaluations.

    Under ``torch.distributed`` (e.g. launched by ``torchrun``; call it on every rank with the same model, data and
    config): every rank draws the same global batch of ``config.batch_size`` windows from the same seeded
    generator and trains on its contiguous slice, so the data order does not depend on the world size. The model
    is wrapped in ``DistributedDataParallel`` (``config.sharding="ddp"``; ``model`` itself stays a plain module)
    or sharded in place with FSDP2 (``"fsdp"``: each decoder layer and the root; afterwards ``model`` holds
    DTensor shards, and :func:`full_state_dict` gathers them). The gradient is the single-process gradient of the
    global batch, clipping uses the global norm, the losses are global means, and every rank returns the same
    history. Rank 0 alone shows the progress bar and writes checkpoints (plain state-dict keys, resumable with any
    world size); it alone evaluates under DDP (under FSDP every rank takes part in the sharded forward pass).
    ``resume``: every rank loads the same checkpoint.
    """
    from .paretoq import qat_modules
    config = config or QATConfig()
    ids = torch.as_tensor(ids).reshape(-1).long()
    if ids.numel() <= config.seq_len:
        raise DataError(f"calibration text has {ids.numel()} tokens, not more than one {config.seq_len}-token window",
                        "use more text (WikiText-2 validation by default) or a smaller --seq-len")
    rank, world = _dist_info()
    _check_global_batch(config.batch_size, world)
    local = config.batch_size // world
    fsdp = world > 1 and config.sharding == "fsdp"
    if bits is None and config.lr is None:
        mods = qat_modules(model)
        if not mods:
            raise TrainingError("train_qat: the model has no ParetoQ layers, so there is no bit width to take the "
                                "paper's learning rate from",
                                "call fxquant.paretoq.prepare_qat(model, recipe) first, or pass bits= or "
                                "QATConfig(lr=...) for a model quantized some other way")
        bits = next(iter(mods.values())).spec.bits
    lr = config.lr if config.lr is not None else default_lr(bits)
    device = next(model.parameters()).device
    optimizer, scheduler = make_optimizer(model, lr, config.steps, config.scale_lr)
    gen = torch.Generator().manual_seed(config.seed)
    history = QATHistory()
    step = 0
    resume = train_state.resolve_resume(resume, checkpoint_dir, "QAT")  # "auto": the latest, or from scratch
    if resume is not None:  # every rank loads the same checkpoint into the plain model (before DDP / FSDP2)
        meta = load_qat_checkpoint(resume, model, optimizer, scheduler, gen, config=config)
        step = history.start_step = int(meta["step"])
        log.info("resumed QAT from %s at step %d", resume, step)
    if fsdp:
        # FSDP2 replaces the parameters by sharded ones: a new optimizer over them, holding this rank's shards of
        # the (possibly resumed) state; the schedule carries over
        full_optim, sched_state = optimizer.state_dict(), scheduler.state_dict()
        _fully_shard(model)
        optimizer, scheduler = make_optimizer(model, lr, config.steps, config.scale_lr)
        if resume is not None:
            optimizer.load_state_dict(_shard_optimizer_state(full_optim, optimizer))
            scheduler.load_state_dict(sched_state)
        del full_optim
    net = model
    if world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    was_training = model.training
    net.train()
    start = time.perf_counter()
    bar = None
    if config.progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.steps, initial=step, desc=f"QAT {bits}-bit", unit="step")

    def evaluate(at: int) -> None:
        if eval_ids is None:
            return
        from .evaluate import perplexity
        ppl, windows = float("nan"), 0
        if rank == 0 or fsdp:  # DDP: the plain module on rank 0; FSDP: the sharded forward needs every rank
            model.eval()
            with torch.no_grad():
                r = perplexity(model, ids=eval_ids, windows=config.eval_windows, seq_len=config.eval_seq_len,
                               progress=False)
            model.train()
            ppl, windows = r.ppl, r.windows
        if world > 1:  # the other ranks wait here for rank 0's number
            ppl = _broadcast_float(ppl, device)
        history.evals.append({"step": at, "ppl": ppl})
        if bar is not None:
            bar.write(f"step {at}: perplexity {ppl:.3f} on {windows} windows")

    def save(at: int) -> None:
        path = Path(checkpoint_dir) / f"step-{at:06d}"
        if fsdp:  # gathering the shards is collective; rank 0 keeps the full tensors and writes them
            model_state, optim_state = _gather_state(model, optimizer, keep=rank == 0)
            if rank == 0:
                save_qat_checkpoint(path, _GatheredModel(model, model_state), _gathered_optimizer(optimizer, optim_state),
                                    scheduler, at, gen, config=config)
        elif rank == 0:
            save_qat_checkpoint(path, model, optimizer, scheduler, at, gen, config=config)
        if rank == 0 and config.keep_last:
            train_state.prune_checkpoints(checkpoint_dir, config.keep_last, kind="qat", protect=path)
        if world > 1:
            _barrier()

    try:
        while step < config.steps:
            batch = _batch(ids, config.batch_size, config.seq_len, gen)
            batch = batch[rank * local: (rank + 1) * local].to(device)
            loss = _loss(net, batch)
            # the global mean: every rank's slice is the same size, so the mean of the per-rank means
            reported = _global_mean(loss.detach(), world) if world > 1 else loss.detach()
            if not torch.isfinite(reported):
                raise FxquantError(f"QAT loss became {reported.item()} at step {step}",
                                   "lower the learning rate (--lr) or check the model for NaN/Inf weights")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP and FSDP2 average the gradients over the ranks: the global batch's gradient
            if config.grad_clip:
                # DDP: the gradients are already synchronised; FSDP2: DTensor gradients, the norm is reduced
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            history.losses.append(float(reported))
            if on_step is not None:
                on_step(step, history.losses[-1])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{history.losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                evaluate(step)
            if checkpoint_dir is not None and config.save_every and step % config.save_every == 0:
                save(step)
        evaluate(step)
        if checkpoint_dir is not None:
            save(step)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    history.seconds = time.perf_counter() - start
    return history


# ---- torch.distributed -------------------------------------------------------------------------------------------------
def _dist_info() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_global_batch(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise RecipeError(f"QAT batch size {batch_size} (the global batch) does not divide among {world} processes",
                          f"use a multiple of the number of processes, e.g. --batch-size {world * max(1, batch_size // world)}")


def _barrier() -> None:
    import torch.distributed as dist
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _global_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    import torch.distributed as dist
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / world


def _broadcast_float(value: float, device: torch.device) -> float:
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def _decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: Hugging Face's ``_no_split_modules`` (the decoder layers),
    else the entries of the longest ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if not blocks:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        blocks = list(max(lists, key=len)) if lists else []
    return blocks


def _fully_shard(model: nn.Module) -> None:
    """FSDP2 in place: every decoder block, then the root (embeddings, final norm, head)."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError as exc:  # torch < 2.6
        raise RecipeError(f"--sharding fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard), missing in torch "
                          f"{torch.__version__}", "upgrade torch to 2.6 or newer, or use --sharding ddp") from exc
    if isinstance(model, FSDPModule):
        return  # sharded by the caller
    for block in _decoder_blocks(model):
        fully_shard(block)
    fully_shard(model)


def _full(t: Any, keep: bool) -> Any:
    """The whole tensor behind a DTensor shard (collective), on CPU where ``keep``, else None."""
    from torch.distributed.tensor import DTensor
    if not isinstance(t, torch.Tensor):
        return t
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu() if keep else None


def _gather_state(model: nn.Module, optimizer: torch.optim.Optimizer, keep: bool) -> tuple[dict, dict]:
    """Full model and optimizer state dicts of an FSDP2-sharded run. Collective: every rank calls it in the same
    order, one tensor at a time (peak memory: one unsharded tensor); only where ``keep`` are the results held."""
    model_state = {k: _full(v, keep) for k, v in model.state_dict().items()}
    osd = optimizer.state_dict()
    state = {i: {k: _full(osd["state"][i][k], keep) for k in sorted(osd["state"][i])} for i in sorted(osd["state"])}
    return model_state, {"state": state, "param_groups": osd["param_groups"]}


def _shard_optimizer_state(full: dict, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state dict of the plain model (full tensors, the same on every rank) laid out for the
    optimizer of the FSDP2-sharded model: each per-parameter tensor shaped like its parameter becomes this rank's
    shard (no communication). Parameters keep their order under ``fully_shard``, so the indices still match."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def shard(v: Any, p: torch.Tensor) -> Any:
        if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape):
            return distribute_tensor(v.to(device=p.device), p.device_mesh, p.placements, src_data_rank=None)
        return v

    state = {i: {k: shard(v, params[int(i)]) for k, v in s.items()} for i, s in full["state"].items()}
    return {"state": state, "param_groups": full["param_groups"]}


class _GatheredModel:
    """An FSDP2-sharded model as :func:`save_qat_checkpoint` sees it: ``state_dict()`` is the gathered full state
    (plain tensors, plain keys); everything else (its modules, for the fingerprint) is the model's."""

    def __init__(self, model: nn.Module, full_state: dict[str, torch.Tensor]):
        self._model, self._full_state = model, full_state

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._full_state


def _gathered_optimizer(optimizer: torch.optim.Optimizer, full_state: dict) -> torch.optim.Optimizer:
    """An optimizer of the same type and hyper-parameters holding the gathered full state (on rank 0, to be
    saved): its parameters are empty placeholders, since only its state dict is read."""
    import inspect
    accepted = inspect.signature(type(optimizer).__init__).parameters
    groups = [{"params": [torch.empty(0, dtype=p.dtype) for p in g["params"]]} for g in optimizer.param_groups]
    # defaults the constructor takes (AdamW's defaults hold Adam's decoupled_weight_decay, not an AdamW argument);
    # load_state_dict then restores every group's hyper-parameters as saved
    copy = type(optimizer)(groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted})
    copy.load_state_dict(full_state)
    return copy


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain state dict of a model trained by :func:`train_qat`, sharded (FSDP2) or not: full CPU tensors on
    rank 0, an empty dict on the other ranks. Collective under FSDP2: call it on every rank."""
    rank, _ = _dist_info()
    state = {k: _full(v, rank == 0) for k, v in model.state_dict().items()}
    return state if rank == 0 else {}


# ---- the command ------------------------------------------------------------------------------------------------------
def add_qat_parser(sub: Any) -> Any:
    """Add ``fxquant qat`` to the CLI's subparsers (``build_parser`` calls this)."""
    p = sub.add_parser("qat", help="ParetoQ quantization-aware training, then packed low-bit weights",
                       description="Train a ParetoQ recipe (paretoq-w1, -w1.58, -w2, -w3, -w4) with the paper's "
                                   "optimizer (AdamW, no weight decay, cosine to zero, lr 2e-5 <= 2 bit / 1e-5 3-4 bit; "
                                   "the ternary and 2-bit recipes train their scales at 3e-2, see --scale-lr) "
                                   "on WikiText-2 validation windows, evaluate on WikiText-2 test windows, and "
                                   "optionally save the quantized model.")
    p.add_argument("--model", default="smollm2", help="built-in name, model folder, .gguf file or hub id")
    p.add_argument("--recipe", default="paretoq-w2", help="a ParetoQ recipe (default paretoq-w2)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's, 200)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-5 <= 2 bit, 1e-5 above)")
    p.add_argument("--scale-lr", type=float, default=None,
                   help="peak learning rate of the ParetoQ scales (default: the recipe's: 3e-2 for paretoq-w1.58 and "
                        "-w2, whose scales start at max|W|; the paper's shared --lr for the others)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training window (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order (default 0)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: only before and after)")
    p.add_argument("--eval-windows", type=int, default=4, help="512-token WikiText-2 test windows per evaluation")
    p.add_argument("--calib", default=None, help="calibration text file (default: WikiText-2 validation)")
    p.add_argument("--data", default=None, help="evaluation text (default: WikiText-2 test)")
    p.add_argument("--checkpoint-dir", default=None, help="folder for resumable checkpoints (step-<N>/ inside)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (with --checkpoint-dir)")
    p.add_argument("--keep-last", type=int, default=0,
                   help="keep only the newest N checkpoints in --checkpoint-dir (default 0: keep every one)")
    p.add_argument("--resume", default=None, help="continue from this checkpoint folder (a step-<N>/ folder), a checkpoint "
                   "directory (its latest complete checkpoint), or 'auto' (the latest in --checkpoint-dir, else start)")
    p.add_argument("--out", default=None, help="save the quantized model here (safetensors + packed codes)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the losses and perplexities as JSON")
    p.add_argument("--sharding", choices=SHARDINGS, default="ddp",
                   help="under torchrun: ddp (every process holds the model; default) or fsdp (FSDP2 shards it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    p.set_defaults(func=cmd_qat)
    return p


def cmd_qat(args: Any) -> int:
    """``fxquant qat``. Under ``torchrun`` every process runs it: it joins the process group (gloo on CPU, nccl
    on CUDA with one GPU per process, ``LOCAL_RANK``), trains with :func:`train_qat` (``--batch-size`` is the
    global batch), and only rank 0 evaluates the starting points, prints, and writes ``--out`` and ``--json``."""
    created = _init_distributed()
    try:
        return _cmd_qat(args)
    finally:
        if created:
            import torch.distributed as dist
            # every rank leaves together: a rank that tears gloo down while rank 0 still writes --out/--json
            # was seen to abort ("terminate called without an active exception") on a loaded machine
            dist.barrier()
            dist.destroy_process_group()


def _init_distributed() -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment); True when this call
    created it. CUDA: backend nccl, this process on GPU ``LOCAL_RANK``; otherwise gloo on the CPU."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise FxquantError("WORLD_SIZE is set but this torch build has no torch.distributed",
                           "run fxquant qat without torchrun, or install a torch build with distributed support")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise FxquantError(f"process LOCAL_RANK={local} has no GPU: this machine has {torch.cuda.device_count()}",
                               "run torchrun with --nproc-per-node at most the number of GPUs")
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")
    return True


def _cmd_qat(args: Any) -> int:
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
    scale_lr = args.scale_lr if args.scale_lr is not None else recipe.options.get("scale_lr")
    config = QATConfig(steps=steps, lr=args.lr, scale_lr=scale_lr, batch_size=args.batch_size,
                       seq_len=args.seq_len, seed=args.seed,
                       eval_every=args.eval_every, eval_windows=args.eval_windows, progress=not args.no_progress,
                       save_every=args.save_every, keep_last=args.keep_last, sharding=getattr(args, "sharding", "ddp"))
    rank, world = _dist_info()
    _check_global_batch(config.batch_size, world)  # before the slow load
    device = torch.device("cpu")
    import torch.distributed as dist
    if world > 1 and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    lm = load_model(args.model, device=device)
    if not lm.is_causal_lm:
        raise FxquantError(f"{args.model} is not a causal LM", "fxquant qat trains causal LMs (next-token loss)")
    torch.manual_seed(args.seed)
    ids = tokenize_text(lm.tokenizer, calibration_text(args.calib)[0])
    eval_ids = tokenize_text(lm.tokenizer, eval_text(args.data)[0])

    def ppl() -> float:  # the starting points: rank 0 alone, on its whole model (the others wait below)
        with torch.no_grad():
            return perplexity(lm.model, ids=eval_ids, windows=args.eval_windows, progress=False).ppl if rank == 0 \
                else float("nan")

    float_ppl = ppl()
    prepare_qat(lm.model, recipe)
    start_ppl = ppl()
    if world > 1:
        _barrier()
    history = train_qat(lm.model, ids, config, bits=recipe.weight.bits, eval_ids=eval_ids,
                        checkpoint_dir=args.checkpoint_dir, resume=args.resume)
    final = history.evals[-1]["ppl"] if history.evals else float("nan")
    model = lm.model
    if world > 1 and config.sharding == "fsdp":
        # the trained model is sharded over the processes: gather it (collective) into a plain copy on rank 0
        state = full_state_dict(lm.model)
        if rank == 0:
            model = load_model(args.model).model
            prepare_qat(model, recipe)
            model.load_state_dict(state)
        del state
    if rank != 0:
        return 0
    convert(model, packed=False)
    quantized = paretoq_weights(model)
    packed_bytes = sum(q.packed_nbytes() for q in quantized.values())
    float_bytes = sum(q.codes.numel() * 2 for q in quantized.values())
    print(f"\nmodel: {args.model}  recipe: {recipe.name}  steps: {steps}  ({history.seconds:.0f}s"
          + (f", {world} processes, {config.sharding}" if world > 1 else "") + ")")
    print(f"perplexity on {args.eval_windows} WikiText-2 test windows: fp32 {float_ppl:.3f}, "
          f"fake-quant at init {start_ppl:.3f}, after QAT {final:.3f}")
    print(f"quantized linears: {len(quantized)}, packed {packed_bytes / 2**20:.2f} MiB "
          f"({packed_bytes / float_bytes:.3f} of their fp16 bytes)")
    if args.out:
        from .checkpoint import save_quantized
        out = save_quantized(model, lm.tokenizer, args.out, recipe=recipe, quantized=quantized, overwrite=True)
        print(f"wrote {out}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        report = {"model": args.model, "recipe": recipe.name, "steps": steps, "config": asdict(config),
                  "world_size": world,
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
