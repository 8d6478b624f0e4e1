"""fxquant.hostmem: the glibc heap parameters that keep large CPU temporaries mapped (no timing here: the effect is
counted in page faults, which do not depend on how busy the machine is)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError, AttributeError):
        return False


_GLIBC = _glibc()

# one DI-ClippedSoftmax over 9 heads x 256 x 256 scores, five times after a warm-up; prints the minor page faults
_WORK = """
import resource, sys, torch
from fxquant.backends import intops
from fxquant.hostmem import keep_heap, heap_kept
if sys.argv[1] == "keep":
    print(keep_heap(), keep_heap(), heap_kept())
g = torch.Generator().manual_seed(0)
s = torch.randint(-30000, 30000, (1, 9, 256, 256), dtype=torch.int16, generator=g)
m, k = torch.full((1, 9, 256, 1), 20000), torch.full((1, 9, 256, 1), 24)
mask = torch.ones(256, 256, dtype=torch.bool).tril()
intops.di_clipped_softmax(s, m, k, mask)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    intops.di_clipped_softmax(s, m, k, mask)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _run(mode: str, **env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _WORK, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, timeout=300)
    return out.stdout.split()


@pytest.mark.skipif(not _GLIBC, reason="glibc's mallopt only")
def test_a_kept_heap_stops_the_page_faults_of_large_temporaries():
    kept = _run("keep")
    assert kept[:3] == ["True", "True", "True"]              # set once, the second call is a no-op that agrees
    default = _run("default")
    assert int(kept[3]) < 0.5 * int(default[0]), (kept, default)   # measured: 0.01-0.3 of the default's


def test_fxquant_keep_heap_0_turns_it_off():
    off = _run("keep", FXQUANT_KEEP_HEAP="0")
    assert off[:3] == ["False", "False", "False"]
