"""fxquant.testing: a property-based test harness for passes, shipped as a pytest plugin.

* :mod:`fxquant.testing.strategies` — hypothesis strategies: random transformer blocks captured as FX graphs
  (RMSNorm/LayerNorm, linears with and without bias, SwiGLU/GELU MLPs, attention with GQA and RoPE), tiny
  Hugging Face LLaMAs, weights and activations with outlier channels, per-channel scales, quantization specs;
* :mod:`fxquant.testing.asserts` — :func:`assert_equivalent`, :func:`assert_bit_exact`,
  :func:`assert_integer_only`, :func:`assert_fold_exact`;
* :mod:`fxquant.testing.plugin` — the pytest plugin (hypothesis profiles ``ci``/``dev``/``thorough`` and
  fixtures), registered as the ``pytest11`` entry point ``fxquant``.

Testing a pass of your own::

    from hypothesis import given
    from fxquant.testing import assert_equivalent, strategies as fst

    @given(block=fst.captured_blocks())
    def test_my_pass(block):
        assert_equivalent(MyPass(), block.cg, block.inputs, tol=1e-5)
"""
from __future__ import annotations

from . import strategies
from .asserts import (FLOAT_ONLY_OPS, INTEGER_BOUNDARY, EquivalenceReport, assert_bit_exact, assert_equivalent,
                      assert_fold_exact, assert_integer_only, linear_weight_placeholders, run_graph, run_pass,
                      with_tensors)
from .strategies import copy_captured

__all__ = [
    "strategies", "assert_equivalent", "assert_bit_exact", "assert_integer_only", "assert_fold_exact",
    "EquivalenceReport", "run_pass", "run_graph", "with_tensors", "linear_weight_placeholders", "copy_captured",
    "FLOAT_ONLY_OPS", "INTEGER_BOUNDARY",
]
