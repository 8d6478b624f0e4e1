"""
Weight-only quantized GEMM: how fast are fxquant's kernels?
===========================================================

In this example you will learn

* how a linear layer's weight is quantized (:func:`fxquant.quant.quantize_weight`) and **packed** for a kernel
  (:func:`fxquant.backends.registry.pack`): int8 codes, or int4 codes two per byte, plus float32 scales;
* how to **check** a quantized GEMM against its reference (exact dequantization, then ``F.linear``);
* how to **measure** it against ``torch.matmul`` on float weights (FP16 on a GPU, FP32 on the CPU), and why the
  number that matters in decode is the *achieved memory bandwidth*, compared with what a plain device-to-device
  copy reaches on the same machine;
* what a whole model gains: decode tokens/s of SmolLM2 compiled with ``backend="fxquant"`` against eager.

Run it::

    python examples/bench_kernels.py            # full grid on a CUDA GPU
    python examples/bench_kernels.py --quick    # a small subset (the CPU default)
    fxquant bench --rows 1,16 --shapes 4096x4096   # the same program, installed with fxquant (writes bench-results/)

The code lives in :mod:`fxquant.benchmark` (so that ``fxquant bench`` works after a plain ``pip install``); read it
there: ``run_gemm`` (check, then time one GEMM at every ``M``), ``bench`` (CUDA-graph replays with the L2 flushed),
``copy_bandwidth``, ``run_e2e`` (decode tokens/s) and ``markdown`` (the report).

Results go to ``examples/results/bench_<device>.json`` and ``.md``.
"""
from __future__ import annotations

import os
from pathlib import Path

from fxquant.benchmark import (FORMATS, ROWS, SHAPES, bench, bench_launch, copy_bandwidth,  # noqa: F401 (re-exported)
                               decode_tps, device_name, main, markdown, run_e2e, run_gemm)

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(default_out=RESULTS)
