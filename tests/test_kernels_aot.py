"""Every Triton kernel of the registry compiles ahead of time for sm_80 and sm_90, without spills, and the
matrix-product paths use tensor cores — no GPU needed.

The interpreter (which runs the kernels in the CPU tests) accepts code that the real compiler rejects; this test
is what keeps the kernels real between GPU runs. ``triton.compile`` needs Triton's real JIT, so it runs in a
subprocess without ``TRITON_INTERPRET`` (conftest sets it for this process). Resource usage is read from the
cubins with the ``cuobjdump`` shipped in the triton wheel.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.triton

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@pytest.fixture(scope="module")
def aot_rows() -> list[dict]:
    if not CUOBJDUMP.exists():
        pytest.skip(f"the triton wheel has no cuobjdump at {CUOBJDUMP}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "fxquant.backends.triton_int"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_registered_format_with_kernels_is_compiled(aot_rows: list[dict]) -> None:
    from fxquant.backends import registry
    with_kernels = {f.name for f in registry.formats() if f.aot_variants is not None}
    assert with_kernels >= {"int4", "int8"}
    assert {r["format"] for r in aot_rows} == with_kernels
    assert {r["arch"] for r in aot_rows} == {80, 90}


def test_no_spills_and_tensor_cores(aot_rows: list[dict]) -> None:
    problems = []
    for r in aot_rows:
        tag = f"{r['name']} sm_{r['arch']}"
        if r["local"] or r["stack"]:
            problems.append(f"{tag}: spills (LOCAL {r['local']}, STACK {r['stack']}, {r['registers']} registers)")
        if r["registers"] > 255:
            problems.append(f"{tag}: {r['registers']} registers")
        if r["uses_dot"]:
            if r["arch"] == 80 and not r["mma"]:
                problems.append(f"{tag}: no mma in the PTX")
            if r["arch"] == 90 and not (r["wgmma"] or r["mma"]):
                problems.append(f"{tag}: neither wgmma nor mma in the PTX")
    assert not problems, "\n".join(problems)
