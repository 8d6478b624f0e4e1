"""Resumable training state, shared by TEQ, FSBR and QAT: safe on disk, atomic, checked on resume.

A checkpoint is one folder (``<checkpoint_dir>/step-000040/``) holding two files:

* ``state.safetensors`` — every tensor: the named trainable tensors (``tensor.<name>``), the optimizer's
  per-parameter state (``optim.<index>.<key>``: Adam/AdamW moments, step counts) and the state of each random
  generator that draws the training data (``generator.<name>``);
* ``state.json`` — everything else: the format, the kind of training (``"teq"``, ``"fsbr"``, ``"qat"``), the step,
  the optimizer's param groups and non-tensor state, the LR scheduler's state (without its lambdas, which are code),
  a small dict of ``extras`` (e.g. FSBR's layer, epoch and best loss), the run's *fingerprint*, and a random
  ``nonce`` that is also in the safetensors header.

Nothing is ever unpickled (safetensors + JSON only). Each file is written under a temporary name, flushed to
disk and ``os.replace``d; the JSON goes last, and a checkpoint counts as complete only when its JSON names the
nonce of the safetensors beside it. A run killed during a save therefore leaves at worst an incomplete folder
that :func:`latest_checkpoint` skips, and every earlier checkpoint is untouched.

The fingerprint (:func:`fingerprint`: the settings that determine the result, the names and shapes of the
tensors, a digest of the calibration data) is compared on resume: a checkpoint written by another recipe or
model raises :class:`~fxquant.errors.TrainingError` naming what differs, instead of silently training a hybrid.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .errors import TrainingError

__all__ = ["FORMAT", "TENSORS_FILE", "META_FILE", "RUN_CONTROL", "TrainState", "fingerprint", "tensor_digest",
           "save_train_state", "load_train_state", "copy_tensors", "step_dir", "is_complete", "latest_checkpoint",
           "resolve_resume", "check_checkpoint_options", "prune_checkpoints"]

log = logging.getLogger("fxquant")

FORMAT = "fxquant-train-state-v1"
TENSORS_FILE = "state.safetensors"
META_FILE = "state.json"
#: settings that control *how* a run is carried out, not *what* it computes: left out of fingerprints
RUN_CONTROL = frozenset({"progress", "save_every", "checkpoint_dir", "resume", "tokenizer", "keep_last"})
_STEP_DIR = re.compile(r"^step-(\d+)$")
_RESUME_HINT = ("resume with the recipe, options, calibration data and model the checkpoint was written with, or "
                "start again without --resume (or with another --checkpoint-dir)")


# ---- fingerprints -----------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON data; objects without a data form become their type's name (never an address)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, torch.Size):
        return list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__,
                **{f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return tensor_digest({"": value})
    return f"<{type(value).__qualname__}>"


def tensor_digest(tensors: Mapping[str, torch.Tensor] | torch.Tensor) -> str:
    """A short SHA-256 of tensors' names, dtypes, shapes and bytes (e.g. the calibration token ids)."""
    if isinstance(tensors, torch.Tensor):
        tensors = {"": tensors}
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(kind: str, config: Any = None, tensors: Mapping[str, torch.Tensor] | None = None, *,
                ignore: Iterable[str] = RUN_CONTROL, **fields: Any) -> dict[str, Any]:
    """What makes two runs the same run: ``kind``, the ``config``'s fields (a dataclass or mapping, minus the
    run-control fields in ``ignore``), the names, shapes and dtypes of ``tensors``, and any other ``fields``."""
    skip = set(ignore)
    out: dict[str, Any] = {"kind": kind}
    if config is not None:
        items = ({f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
                 if dataclasses.is_dataclass(config) else dict(config))
        out["config"] = {k: _jsonable(v) for k, v in sorted(items.items()) if k not in skip}
    if tensors is not None:
        out["tensors"] = {k: [list(v.shape), str(v.dtype)] for k, v in sorted(tensors.items())}
    for k, v in fields.items():
        out[k] = _jsonable(v)
    return json.loads(json.dumps(out))  # the form it has after a round trip through the checkpoint


def _differences(saved: Any, current: Any, where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[str] = []
        if where.endswith("tensors"):  # name sets: report the first few missing / extra names
            gone, new = sorted(set(saved) - set(current)), sorted(set(current) - set(saved))
            if gone:
                out.append(f"{where}: {len(gone)} in the checkpoint only (e.g. {gone[:3]})")
            if new:
                out.append(f"{where}: {len(new)} in this run only (e.g. {new[:3]})")
        # otherwise a field known to only one side (an optional part, a newer writer) is not compared
        for k in (k for k in saved if k in current):
            out += _differences(saved[k], current[k], f"{where}.{k}" if where else k)
        return out
    if isinstance(saved, float) and isinstance(current, float) and math.isnan(saved) and math.isnan(current):
        return []
    if saved != current:
        return [f"{where}: checkpoint {saved!r}, this run {current!r}"]
    return []


# ---- writing ----------------------------------------------------------------------------------------------------
def step_dir(checkpoint_dir: str | os.PathLike, step: int) -> Path:
    """``<checkpoint_dir>/step-000040``: the folder of the checkpoint taken after ``step`` steps."""
    return Path(checkpoint_dir) / f"step-{int(step):06d}"


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _replace(tmp: Path, final: Path) -> None:
    _fsync(tmp)
    os.replace(tmp, final)


def save_train_state(path: str | os.PathLike, *, kind: str, step: int,
                     tensors: Mapping[str, torch.Tensor] | None = None,
                     optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                     generators: Mapping[str, torch.Generator] | None = None,
                     extras: Mapping[str, Any] | None = None,
                     fingerprint: Mapping[str, Any] | None = None, keep_last: int = 0) -> Path:
    """Write one checkpoint folder (see the module docstring) and return it.

    ``tensors`` are cloned to the CPU (tied weights share storage, which safetensors refuses); ``extras`` must be
    JSON data (floats round-trip exactly). The folder may already exist (a re-run of the same step): its files
    are replaced one by one and the nonce keeps a half-replaced folder from counting as complete. With
    ``keep_last`` N > 0, once this checkpoint is complete the older ones of the same kind in its parent folder
    beyond the newest N are deleted (:func:`prune_checkpoints`).
    """
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat: dict[str, torch.Tensor] = {}
    for name, t in (tensors or {}).items():
        flat[f"tensor.{name}"] = t.detach().to("cpu", copy=True).contiguous()
    meta: dict[str, Any] = {"format": FORMAT, "kind": kind, "step": int(step)}
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars: dict[str, Any] = {}
        for idx, state in sd["state"].items():
            for key, v in state.items():
                if isinstance(v, torch.Tensor):
                    flat[f"optim.{idx}.{key}"] = v.detach().to("cpu", copy=True).contiguous()
                else:
                    scalars[f"{idx}.{key}"] = v
        meta["optimizer"] = {"type": type(optimizer).__name__, "param_groups": sd["param_groups"], "scalars": scalars}
    if scheduler is not None:
        sd = dict(scheduler.state_dict())
        lambdas = sd.pop("lr_lambdas", None)
        meta["scheduler"] = {"type": type(scheduler).__name__, "state": sd,
                             "lambdas": None if lambdas is None else len(lambdas)}
    for name, gen in (generators or {}).items():
        flat[f"generator.{name}"] = gen.get_state().clone()
    meta["extras"] = dict(extras or {})
    meta["fingerprint"] = dict(fingerprint or {})
    meta["nonce"] = nonce = uuid.uuid4().hex
    try:
        text = json.dumps(meta, indent=1)
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"cannot write the {kind} checkpoint {path}: {exc}",
                            "report a bug: a training state field is not JSON data") from exc
    suffix = f".tmp{os.getpid()}"
    tmp = path / (TENSORS_FILE + suffix)
    save_file(flat, str(tmp), metadata={"format": FORMAT, "kind": kind, "nonce": nonce})
    _replace(tmp, path / TENSORS_FILE)
    tmp = path / (META_FILE + suffix)
    tmp.write_text(text)
    _replace(tmp, path / META_FILE)  # last: from now on the folder is a complete checkpoint
    if keep_last:
        prune_checkpoints(path.parent, keep_last, kind=kind, protect=path)
    return path


def prune_checkpoints(checkpoint_dir: str | os.PathLike, keep_last: int, *, kind: str,
                      protect: str | os.PathLike | None = None) -> list[Path]:
    """Delete the complete ``step-<N>/`` checkpoints of ``kind`` in ``checkpoint_dir`` but the ``keep_last`` with
    the largest ``N``; return the folders deleted. ``protect`` (the checkpoint just written) is always kept and
    counts as one of the ``keep_last`` — it may not be the largest ``N`` when a run resumed from an older one.

    Only what a checkpoint consists of is removed (its two files and leftover temporary files of them); a folder
    holding anything else keeps that, with a warning. Incomplete folders and other kinds' checkpoints are never
    touched, so a run killed mid-save still finds the newest complete checkpoint to resume from.
    """
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise TrainingError(f"keep_last must be a number of checkpoints >= 1, got {keep_last!r}")
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    keep = Path(protect).resolve() if protect is not None else None
    found = []
    for p in folder.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and p.resolve() != keep and is_complete(p) and (_read_meta(p) or {}).get("kind") == kind:
            found.append((int(m.group(1)), p))
    removed = []
    for _, p in sorted(found, reverse=True)[keep_last - (keep is not None):]:
        ours = [f for f in p.iterdir() if f.name in (TENSORS_FILE, META_FILE)
                or f.name.startswith((TENSORS_FILE + ".tmp", META_FILE + ".tmp"))]
        (p / META_FILE).unlink()            # first: from now on the folder is not a complete checkpoint
        for f in ours:
            f.unlink(missing_ok=True)
        try:
            p.rmdir()
        except OSError:
            log.warning("pruned checkpoint %s: left the folder, it holds files fxquant did not write", p)
        removed.append(p)
    return removed


# ---- reading ----------------------------------------------------------------------------------------------------
def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _header_nonce(path: Path) -> str | None:
    from safetensors import safe_open
    try:
        with safe_open(str(path / TENSORS_FILE), framework="pt") as f:
            return (f.metadata() or {}).get("nonce")
    except Exception:  # noqa: BLE001 - a missing or truncated file raises various errors
        return None


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a whole checkpoint: a readable JSON whose nonce the safetensors header repeats."""
    path = Path(path)
    meta = _read_meta(path)
    return meta is not None and meta.get("nonce") is not None and _header_nonce(path) == meta["nonce"]


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The complete ``step-<N>/`` folder with the largest ``N`` in ``checkpoint_dir`` (None if there is none)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return None
    steps = sorted(((int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))),
                   reverse=True)
    for _, p in steps:
        if is_complete(p):
            return p
        log.warning("skipping incomplete checkpoint %s (killed while saving?)", p)
    return None


def resolve_resume(resume: Any, checkpoint_dir: str | os.PathLike | None, where: str) -> Path | None:
    """The checkpoint folder a ``resume`` option names, or None to start from scratch.

    ``None``/``False``: start from scratch. ``True``/``"auto"``: the latest complete checkpoint in
    ``checkpoint_dir``, or from scratch when there is none yet (so a restarted job can always pass it). A path:
    that checkpoint folder, or the latest checkpoint inside a checkpoint directory; anything else is an error.
    """
    if resume is None or resume is False or resume == "":
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() == "auto"):
        if checkpoint_dir is None:
            raise TrainingError(f"{where}: resume=auto needs a checkpoint directory to look in",
                                "set checkpoint_dir (--checkpoint-dir), or pass the checkpoint folder to resume from")
        found = latest_checkpoint(checkpoint_dir)
        if found is None:
            log.info("%s: no checkpoint in %s yet, starting from scratch", where, checkpoint_dir)
        return found
    if not isinstance(resume, (str, os.PathLike)):
        raise TrainingError(f"{where}: resume must be a checkpoint folder, true or 'auto', got {resume!r}",
                            "e.g. --resume ckpt/step-000040, or --resume auto with --checkpoint-dir ckpt")
    path = Path(resume)
    if (path / META_FILE).is_file():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise TrainingError(f"{where}: {path} is not a training checkpoint (no {META_FILE}) and holds no complete "
                            f"step-<N>/ checkpoint",
                            "pass a step-<N>/ folder written with --save-every / --checkpoint-dir")
    return found


def check_checkpoint_options(save_every: Any, checkpoint_dir: Any, resume: Any, where: str, keep_last: Any = 0) -> None:
    """Validate the checkpoint options a training config carries (raises TrainingError)."""
    if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 0:
        raise TrainingError(f"{where}: save_every must be a number of steps >= 0 (0: no intermediate checkpoints), "
                            f"got {save_every!r}", "e.g. options: {save_every: 50, checkpoint_dir: ckpt/}")
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TrainingError(f"{where}: checkpoint_dir must be a folder path, got {checkpoint_dir!r}")
    if save_every and checkpoint_dir is None:
        raise TrainingError(f"{where}: save_every={save_every} needs a checkpoint_dir to write to",
                            "set checkpoint_dir (--checkpoint-dir)")
    if not (resume is None or isinstance(resume, (bool, str, os.PathLike))):
        raise TrainingError(f"{where}: resume must be a checkpoint folder, true or 'auto', got {resume!r}")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise TrainingError(f"{where}: keep_last must be a number of checkpoints >= 0 (0: keep all), got {keep_last!r}",
                            "e.g. options: {save_every: 50, keep_last: 2, checkpoint_dir: ckpt/}")


@dataclass
class TrainState:
    """A checkpoint read back: the step, the named tensors, the extras; :meth:`restore` puts the optimizer,
    scheduler and generator states back."""

    path: Path
    kind: str
    step: int
    tensors: dict[str, torch.Tensor]
    extras: dict[str, Any]
    meta: dict[str, Any] = field(repr=False)
    raw: dict[str, torch.Tensor] = field(repr=False)

    def _fail(self, what: str, exc: Exception | None = None) -> TrainingError:
        detail = f": {exc}".splitlines()[0] if exc is not None else ""
        return TrainingError(f"checkpoint {self.path} does not fit this run: {what}{detail}", _RESUME_HINT)

    def restore(self, *, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                generators: Mapping[str, torch.Generator] | None = None) -> None:
        """Load the optimizer state (moments, step counts, param groups), the scheduler state and the generators'
        states that :func:`save_train_state` wrote. Each asked-for part must be in the checkpoint."""
        if optimizer is not None:
            saved = self.meta.get("optimizer")
            if saved is None:
                raise self._fail("it holds no optimizer state")
            if saved.get("type") != type(optimizer).__name__:
                raise self._fail(f"optimizer {saved.get('type')} in the checkpoint, {type(optimizer).__name__} here")
            state: dict[int, dict[str, Any]] = {}
            for k, v in self.raw.items():
                if k.startswith("optim."):
                    _, idx, key = k.split(".", 2)
                    state.setdefault(int(idx), {})[key] = v
            for k, v in saved.get("scalars", {}).items():
                idx, key = k.split(".", 1)
                state.setdefault(int(idx), {})[key] = v
            groups = [{k: (tuple(v) if k == "betas" and isinstance(v, list) else v) for k, v in g.items()}
                      for g in saved["param_groups"]]
            try:
                optimizer.load_state_dict({"state": state, "param_groups": groups})
            except (ValueError, KeyError, RuntimeError) as exc:
                raise self._fail("the optimizer state", exc) from exc
        if scheduler is not None:
            saved = self.meta.get("scheduler")
            if saved is None:
                raise self._fail("it holds no LR scheduler state")
            sd = dict(saved["state"])
            if saved.get("lambdas") is not None:
                sd["lr_lambdas"] = [None] * int(saved["lambdas"])  # the lambdas are code: the new run's are kept
            scheduler.load_state_dict(sd)
        for name, gen in (generators or {}).items():
            key = f"generator.{name}"
            if key not in self.raw:
                raise self._fail(f"it holds no state of the generator {name!r}")
            try:
                gen.set_state(self.raw[key])
            except RuntimeError as exc:
                raise self._fail(f"the state of generator {name!r}", exc) from exc


def load_train_state(path: str | os.PathLike, *, kind: str,
                     fingerprint: Mapping[str, Any] | None = None) -> TrainState:
    """Read a checkpoint folder written by :func:`save_train_state` for training ``kind``, and check that it is
    complete and that its fingerprint matches this run's ``fingerprint`` (fields both know are compared)."""
    from safetensors.torch import load_file
    path = Path(path)
    if not (path / META_FILE).is_file() or not (path / TENSORS_FILE).is_file():
        raise TrainingError(f"{path} is not a training checkpoint (no {META_FILE} / {TENSORS_FILE})",
                            "pass a step-<N>/ folder written with --save-every / --checkpoint-dir")
    meta = _read_meta(path)
    if meta is None:
        raise TrainingError(f"{path}/{META_FILE} is not an fxquant training checkpoint ({FORMAT}) or is corrupted",
                            "resume from another step-<N>/ folder, or start again")
    if meta.get("kind") != kind:
        raise TrainingError(f"{path} holds a {meta.get('kind')} checkpoint, not a {kind} one", _RESUME_HINT)
    try:
        raw = load_file(str(path / TENSORS_FILE))
    except Exception as exc:  # noqa: BLE001 - a truncated file raises various errors
        raise TrainingError(f"checkpoint {path} is corrupted: {exc}".splitlines()[0],
                            "resume from an earlier step-<N>/ folder, or start again") from exc
    if _header_nonce(path) != meta.get("nonce"):
        raise TrainingError(f"checkpoint {path} is incomplete: {TENSORS_FILE} and {META_FILE} come from different "
                            f"saves (killed while saving?)", "resume from an earlier step-<N>/ folder")
    if fingerprint is not None:
        diffs = _differences(meta.get("fingerprint", {}), json.loads(json.dumps(dict(fingerprint))))
        if diffs:
            more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
            raise TrainingError(f"checkpoint {path} was written by a different {kind} run: "
                                + "; ".join(diffs[:4]) + more, _RESUME_HINT)
    tensors = {k[len("tensor."):]: v for k, v in raw.items() if k.startswith("tensor.")}
    return TrainState(path=path, kind=kind, step=int(meta["step"]), tensors=tensors,
                      extras=dict(meta.get("extras") or {}), meta=meta, raw=raw)


def copy_tensors(dst: Mapping[str, torch.Tensor], src: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy ``src`` into ``dst`` in place (same names, same shapes; dtype and device are ``dst``'s)."""
    missing, extra = sorted(set(dst) - set(src)), sorted(set(src) - set(dst))
    if missing or extra:
        raise TrainingError(f"{where}: the checkpoint's tensors do not match this run (missing {missing[:3]}, "
                            f"unexpected {extra[:3]})", _RESUME_HINT)
    bad = [k for k in dst if tuple(dst[k].shape) != tuple(src[k].shape)]
    if bad:
        k = bad[0]
        raise TrainingError(f"{where}: tensor {k} is {list(src[k].shape)} in the checkpoint, "
                            f"{list(dst[k].shape)} here", _RESUME_HINT)
    with torch.no_grad():
        for k, t in dst.items():
            t.copy_(src[k])
