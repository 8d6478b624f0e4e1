"""The fxquant pytest plugin (entry point ``pytest11: fxquant``), active wherever fxquant is installed.

It gives

* **hypothesis profiles** ``ci`` (25 examples, derandomized: the same examples on every run, so CI is
  reproducible), ``dev`` (50, random) and ``thorough`` (500, random; for a nightly or before a release). Graph
  captures are slow for hypothesis's taste, so every profile turns off the deadline and the too-slow check.
  The profile is chosen by ``--hypothesis-profile`` (hypothesis's own option) or ``$HYPOTHESIS_PROFILE``, and
  is ``ci`` otherwise. Opt out with ``-p no:fxquant``;
* **fixtures**: ``fxquant_block`` (a captured random transformer block: GQA attention with RoPE, SwiGLU MLP,
  RMSNorm), ``fxquant_gelu_block`` (LayerNorm, biases, GELU MLP, matmul-softmax attention),
  ``fxquant_llama`` (a captured tiny Hugging Face LLaMA), and ``fxquant_verify`` (turns the pipeline verifier
  on for the test, as fxquant's own suite always does).

A pass test then reads::

    from hypothesis import given
    from fxquant.testing import assert_equivalent, strategies as fst

    @given(block=fst.captured_blocks())
    def test_my_pass_keeps_the_function(block):
        assert_equivalent(MyPass(), block.cg, block.inputs, tol=1e-5)
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, settings

PROFILES = ("ci", "dev", "thorough")
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=_SLOW_OK)
settings.register_profile("dev", max_examples=50, deadline=None, suppress_health_check=_SLOW_OK)
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=_SLOW_OK)


def pytest_configure(config: pytest.Config) -> None:
    # hypothesis's own plugin loads --hypothesis-profile; only choose one when the user did not
    if config.getoption("hypothesis_profile", default=None):
        return
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header(config: pytest.Config) -> str:
    return f"fxquant: hypothesis profile {settings._current_profile}"  # noqa: SLF001 - no public getter


@pytest.fixture
def fxquant_block() -> Any:
    """A captured pre-norm transformer block: RMSNorm, GQA attention (sdpa) with RoPE, SwiGLU MLP."""
    from fxquant.testing import strategies as fst
    config = fst.BlockConfig(hidden=32, heads=4, kv_heads=2, intermediate=48, norm="rmsnorm_hf", mlp="swiglu",
                             bias=False, rope=True, attention="sdpa")
    return fst.make_block(config, seed=0)


@pytest.fixture
def fxquant_gelu_block() -> Any:
    """A captured block with LayerNorm, biases, a GELU MLP and matmul-softmax attention (MHA, no RoPE)."""
    from fxquant.testing import strategies as fst
    config = fst.BlockConfig(hidden=32, heads=4, kv_heads=4, intermediate=64, norm="layernorm", mlp="gelu",
                             bias=True, rope=False, attention="matmul")
    return fst.make_block(config, seed=0)


@pytest.fixture
def fxquant_llama() -> Any:
    """A captured tiny random LlamaForCausalLM (1 layer, GQA) and token ids to run it on."""
    from transformers import LlamaConfig

    from fxquant.testing import strategies as fst
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return fst.make_tiny_llama(config, seed=0)


@pytest.fixture
def fxquant_verify(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run the pipeline verifier (lint + every pass's ``ensures``) in this test."""
    monkeypatch.setenv("FXQUANT_VERIFY", "1")
    yield

