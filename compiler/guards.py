"""Checks shared by every stage that can go wrong on real input: a loss that stops being finite, a job that will
not fit in memory. Each raises an :class:`~fxquant.errors.FxquantError` whose hint says what to do."""
from __future__ import annotations

import math
import os

import torch

from .errors import ResourceError, TrainingError

__all__ = ["check_finite_loss", "available_memory_bytes", "check_memory"]


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


def available_memory_bytes() -> int | None:
    """Memory the process could still allocate: ``MemAvailable`` from /proc/meminfo, capped by a cgroup limit
    (containers), or None where neither can be read."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
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


def check_memory(needed_bytes: int, what: str, *, available: int | None = None) -> None:
    """Refuse to start a job that needs more memory than is available (``FXQUANT_SKIP_MEMORY_CHECK=1`` skips)."""
    if os.environ.get("FXQUANT_SKIP_MEMORY_CHECK", "") not in ("", "0"):
        return
    avail = available_memory_bytes() if available is None else available
    if avail is not None and needed_bytes > avail:
        gib = 2 ** 30
        raise ResourceError(
            f"{what} needs about {needed_bytes / gib:.1f} GiB of memory but only {avail / gib:.1f} GiB is available",
            "free memory, use a smaller model or --dtype bfloat16, or set FXQUANT_SKIP_MEMORY_CHECK=1 to try anyway")
