"""Checks shared by every stage that can go wrong on real input: a loss that stops being finite, a job that will
not fit in memory, a device that does not exist. Each raises an :class:`~fxquant.errors.FxquantError` whose hint
says what to do.

Environment:

* ``FXQUANT_MEMORY_LIMIT_BYTES`` — treat at most this much memory as available (bytes, or with a ``K``/``M``/``G``/``T``
  suffix in powers of 1024, e.g. ``8G``): to keep fxquant inside a budget smaller than the machine, and for tests;
* ``FXQUANT_SKIP_MEMORY_CHECK=1`` — never refuse a job for lack of memory (the estimate may be pessimistic).
"""
from __future__ import annotations

import math
import os

import torch

from .errors import ResourceError, TrainingError

__all__ = ["check_finite_loss", "available_memory_bytes", "memory_limit_from_env", "check_memory", "check_device"]


def check_finite_loss(loss: torch.Tensor | float, step: int, where: str) -> float:
    """Return ``loss`` as a float, or raise :class:`TrainingError` if it is NaN or infinite.

    ``where`` names the training loop (``"TEQ"``, ``"FSBR layer 3"``, ``"QAT"``) so the message says which one
    diverged and at which step; the hint lists the usual causes.
    """
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    if not math.isfinite(value):
        raise TrainingError(
            f"{where}: the loss became {value} at step {step}",
            "lower the learning rate, check the calibration text and the model's weights for NaN/Inf, or resume "
            "from an earlier checkpoint (--resume)")
    return value


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def memory_limit_from_env() -> int | None:
    """``FXQUANT_MEMORY_LIMIT_BYTES`` as a number of bytes (None when unset); a malformed value is an error."""
    raw = os.environ.get("FXQUANT_MEMORY_LIMIT_BYTES", "").strip()
    if not raw:
        return None
    text = raw.upper().removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in _UNITS and text[-1:] else ""
    number = text[:-1] if unit else text
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ResourceError(f"FXQUANT_MEMORY_LIMIT_BYTES must be a number of bytes, got {raw!r}",
                            "e.g. FXQUANT_MEMORY_LIMIT_BYTES=8G (or 8589934592), or unset it")
    return int(value)


def available_memory_bytes() -> int | None:
    """Memory the process could still allocate: ``MemAvailable`` from /proc/meminfo, capped by a cgroup limit
    (containers) and by ``FXQUANT_MEMORY_LIMIT_BYTES``, or None where none of them can be read."""
    avail = memory_limit_from_env()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    avail = free if avail is None else min(avail, free)
                    break
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(path).read().strip()
        except OSError:
            continue
        if raw.isdigit():
            used = 0
            for upath in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
                try:
                    used = int(open(upath).read().strip())
                    break
                except (OSError, ValueError):
                    continue
            room = int(raw) - used
            avail = room if avail is None else min(avail, room)
        break
    return avail


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def check_memory(needed_bytes: int, what: str, *, available: int | None = None, hint: str | None = None) -> None:
    """Refuse to start a job that needs more memory than is available (``FXQUANT_SKIP_MEMORY_CHECK=1`` skips).

    ``what`` names the job (``"loading smollm2 in float32"``); ``hint`` replaces the default advice (free memory,
    a smaller model or dtype)."""
    if os.environ.get("FXQUANT_SKIP_MEMORY_CHECK", "") not in ("", "0"):
        return
    avail = available_memory_bytes() if available is None else available
    if avail is not None and needed_bytes > avail:
        raise ResourceError(
            f"{what} needs about {_size(needed_bytes)} of memory but only {_size(avail)} is available",
            (hint or "free memory, use a smaller model or --dtype bfloat16")
            + "; FXQUANT_SKIP_MEMORY_CHECK=1 tries anyway")


def check_device(device: str | torch.device, what: str = "the model") -> torch.device:
    """``device`` as a :class:`torch.device`, or :class:`ResourceError` if this machine does not have it.

    Checked before anything is loaded or packed: moving a model to a missing GPU otherwise fails after the slow
    part, with torch's "Torch not compiled with CUDA enabled" assertion.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ResourceError(f"cannot put {what} on {device!r}: not a device name ({exc})".splitlines()[0],
                            "use cpu, cuda or cuda:<index>") from exc
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ResourceError(f"cannot put {what} on {dev}: this machine has no CUDA device "
                                f"(torch {torch.__version__}, CUDA {'built in' if torch.version.cuda else 'not built in'})",
                                "use device='cpu', or run on a machine with an NVIDIA GPU and a CUDA build of torch")
        if dev.index is not None and dev.index >= n:
            raise ResourceError(f"cannot put {what} on {dev}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})",
                                f"use one of cuda:0..cuda:{n - 1}, or check CUDA_VISIBLE_DEVICES")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ResourceError(f"cannot put {what} on mps: Apple's Metal backend is not available here",
                                "use device='cpu'")
    elif dev.type not in ("cpu", "meta"):
        raise ResourceError(f"cannot put {what} on {dev}: fxquant runs on cpu and cuda only",
                            "use device='cpu' or 'cuda'")
    return dev
