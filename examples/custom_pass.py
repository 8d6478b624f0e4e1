"""
Writing a custom fxquant pass and testing it with the harness
=============================================================

In this tutorial you will write a small graph pass, **cross-layer equalization** (Nagel et al., *Data-Free
Quantization*, 2019), and test it with ``fxquant.testing`` in a few lines. You will learn

* how a pass states its contract (``requires`` / ``call`` / ``ensures``) and uses what ``analyze_structure``
  found instead of matching parameter names;
* how :func:`fxquant.testing.assert_fold_exact` checks on random transformer blocks (outlier channels
  included) that folding a scale leaves the float model unchanged;
* how the harness catches a plausible-looking but **wrong** version of the same pass, and how hypothesis
  shrinks the failure to a minimal example you can read.

Run it with ``python examples/custom_pass.py``; ``tests/test_harness.py`` runs the same checks.

The idea
--------
For two linears with an elementwise ``f`` between them, ``y = W2 f(W1 x + b1)``, and any per-channel
``s > 0``::

    W2 f(W1 x + b1) = (W2 diag(s)) f((diag(1/s) W1) x + b1 / s)      if f(z / s) = f(z) / s

That holds when ``f`` is the identity or ReLU (positively homogeneous), and for the gated product of SwiGLU,
``silu(g) * (up / s) = (silu(g) * up) / s``. It does **not** hold for GELU or SiLU. Equalization chooses
``s = sqrt(r1 / r2)`` (``r1``: max |row| of W1, ``r2``: max |column| of W2) so both weights get the same
per-channel range, which makes them easier to quantize per tensor.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import fx

import fxquant
from fxquant import CapturedGraph, Pass, PassContext, PassResult
from fxquant.errors import PassError
from fxquant.graphview import as_linear

# %%
# The helper both versions share: fold ``s`` into the producer's rows (and bias) and the consumer's columns.


def equalize(cg: CapturedGraph, producer: str, consumer: str, channels: tuple[int, int] | None = None) -> None:
    """Fold ``s = sqrt(r1 / r2)`` between two linear nodes (by FX node name), on ``channels`` of the producer."""
    nodes = {n.name: n for n in cg.gm.graph.nodes}

    def is_param(n: fx.Node) -> bool:
        return n.op == "placeholder" and n.name in cg.tensors

    p, c = as_linear(nodes[producer], is_param), as_linear(nodes[consumer], is_param)
    if p is None or c is None or p.layout != "out_in" or c.layout != "out_in":
        raise PassError(f"equalize: {producer} -> {consumer} is not a pair of nn.Linear-layout linears")
    w1, w2 = cg.tensors[p.weight.name], cg.tensors[c.weight.name]
    lo, hi = channels or (0, w1.shape[0])
    r1 = w1[lo:hi].abs().amax(dim=1)
    r2 = w2[:, lo:hi].abs().amax(dim=0)
    s = torch.where((r1 > 0) & (r2 > 0), (r1 / r2.clamp_min(1e-12)).sqrt(), torch.ones_like(r1))
    new1, new2 = w1.clone(), w2.clone()
    new1[lo:hi] /= s[:, None]
    new2[:, lo:hi] *= s[None, :]
    cg.tensors[p.weight.name], cg.tensors[c.weight.name] = new1, new2  # new tensors: the model is untouched
    if p.bias is not None:
        b = cg.tensors[p.bias.name].clone()
        b[lo:hi] /= s
        cg.tensors[p.bias.name] = b


# %%
# The correct pass
# ----------------
# It does not pattern-match ops itself: ``analyze_structure`` already decided which producer -> consumer pairs
# are linear per channel (it stops at GELU and SiLU), so the pass only folds those pairs. Attention pairs are
# left out for brevity (with GQA one value channel feeds several heads).

class EqualizeCrossLayer(Pass):
    """Cross-layer equalization on every pair analyze_structure found that a positive scale commutes with."""

    name = "equalize_cross_layer"
    description = "fold s = sqrt(r1 / r2) between linear pairs linear per channel (identity, ReLU, gated product)"
    kinds = ("linear", "activation", "gated")

    def requires(self, cg: CapturedGraph, ctx: PassContext) -> None:
        if "structure" not in ctx.artifacts:
            raise PassError(f"{self.name} needs the pairs of analyze_structure", "run AnalyzeStructure() first")

    def call(self, cg: CapturedGraph, ctx: PassContext) -> PassResult:
        pairs = [p for p in ctx.artifacts["structure"].pairs if p.kind in self.kinds and p.n_rep == 1]
        for pair in pairs:
            equalize(cg, pair.producer_node, pair.consumer_node, tuple(pair.channels))
        return PassResult(modified=bool(pairs), stats={"equalized": len(pairs)})


class AnalyzeThenEqualize(Pass):
    """Analysis and equalization as one unit, so a test can hand the harness a single pass."""

    name = "analyze_then_equalize"

    def __init__(self, equalizer: Pass):
        self.equalizer = equalizer

    def call(self, cg: CapturedGraph, ctx: PassContext) -> PassResult:
        from fxquant.passes.analyze_structure import AnalyzeStructure
        AnalyzeStructure().call(cg, ctx)
        self.equalizer.requires(cg, ctx)
        return self.equalizer.call(cg, ctx)


# %%
# The wrong pass
# --------------
# A shortcut that looks reasonable: match ``linear -> activation -> linear`` by op name and fold, for ReLU *and*
# GELU ("GELU is nearly ReLU"). It is exactly right on ReLU MLPs and silently wrong on GELU ones.

_ACTIVATIONS = {torch.ops.aten.relu.default, torch.ops.aten.gelu.default}


class EqualizeAcrossAnyActivation(Pass):
    """WRONG on purpose: folds across GELU, which does not commute with a per-channel scale."""

    name = "equalize_across_any_activation"

    def call(self, cg: CapturedGraph, ctx: PassContext) -> PassResult:
        def is_param(n: fx.Node) -> bool:
            return n.op == "placeholder" and n.name in cg.tensors

        found = []
        for act in cg.gm.graph.nodes:
            if act.op != "call_function" or act.target not in _ACTIVATIONS:
                continue
            producer = act.args[0]
            consumers = [u for u in act.users if as_linear(u, is_param) is not None]
            if isinstance(producer, fx.Node) and as_linear(producer, is_param) is not None and len(consumers) == 1:
                found.append((producer.name, consumers[0].name))
        for producer, consumer in found:
            equalize(cg, producer, consumer)
        return PassResult(modified=bool(found), stats={"equalized": len(found)})


# %%
# Testing it: five lines
# ----------------------
# ``captured_blocks`` draws random pre-norm transformer blocks (RMSNorm or LayerNorm, GQA attention with or
# without RoPE, SwiGLU / GELU / ReLU MLPs, biases or not, outlier channels) already captured to FX graphs.
# ``assert_fold_exact`` runs the pass on a copy, checks the output is unchanged and that something was folded.
# Under pytest the plugin picks the example budget (``--hypothesis-profile ci|dev|thorough``).

from hypothesis import given, settings  # noqa: E402

from fxquant.testing import assert_fold_exact, strategies as fst  # noqa: E402


def make_property(pass_factory: Callable[[], Pass], mlps: tuple[str, ...]):
    """The property test, for any equalization pass (a factory: each example gets a fresh pass).

    ``mlps``: the MLP kinds to draw. Every block drawn must give the pass something to fold (else
    ``assert_fold_exact`` fails: a fold that does nothing proves nothing), so the correct pass is tested on
    ReLU and SwiGLU blocks; the wrong one on ReLU and GELU blocks, where it folds across the activation."""
    @given(block=fst.captured_blocks(fst.block_configs(mlps=mlps)))
    def equalization_keeps_the_function(block):
        assert_fold_exact(pass_factory(), block.cg, block.inputs, tol=1e-4)
    return equalization_keeps_the_function


def correct_pass() -> Pass:
    return AnalyzeThenEqualize(EqualizeCrossLayer())


# %%
# Check against the torch reference, then measure what equalization buys
# ------------------------------------------------------------------------
# Equalization helps where per-channel ranges differ a lot, as after batch-norm folding (the paper's case).
# We make such a ReLU MLP by scaling a few fc1 rows up 32x and the matching fc2 columns down (the function is
# unchanged), then compare 4-bit per-tensor weights before and after equalization.

def measure() -> None:
    from fxquant.quant import QuantSpec, fake_quantize
    from fxquant.testing import linear_weight_placeholders, run_graph, with_tensors

    block = fst.make_block(fst.BlockConfig(hidden=32, heads=4, kv_heads=4, intermediate=64, norm="layernorm",
                                           mlp="relu", bias=True, rope=False), seed=3)
    with torch.no_grad():  # the capture shares these tensors with the module
        rows = torch.tensor([1, 7, 30])
        block.module.mlp.fc1.weight[rows] *= 32.0
        block.module.mlp.fc1.bias[rows] *= 32.0
        block.module.mlp.fc2.weight[:, rows] /= 32.0
    spec = QuantSpec(bits=4, per_tensor=True)
    reference = block.reference()
    equalized = fxquant.testing.copy_captured(block.cg)
    ctx = PassContext()
    fxquant.testing.run_pass(AnalyzeThenEqualize(EqualizeCrossLayer()), equalized, ctx)
    torch.testing.assert_close(run_graph(equalized, block.inputs), reference, rtol=1e-4, atol=1e-4)

    def quantized(cg: CapturedGraph) -> torch.Tensor:
        weights = linear_weight_placeholders(cg)
        return run_graph(with_tensors(cg, {ph: fake_quantize(cg.tensors[ph], spec) for ph in weights}), block.inputs)

    from fxquant.debug import sqnr_db
    before, after = sqnr_db(reference, quantized(block.cg)), sqnr_db(reference, quantized(equalized))
    print(f"W4 per-tensor SQNR of the block output: {before:.2f} dB plain, {after:.2f} dB after equalization "
          f"({ctx.artifacts.get('structure').counts()['pairs']} pairs found)")


if __name__ == "__main__":
    settings.register_profile("example", max_examples=10, deadline=None, derandomize=True)
    settings.load_profile("example")
    make_property(correct_pass, ("relu", "swiglu"))()
    print("EqualizeCrossLayer keeps the function on random blocks: ok")
    try:
        make_property(EqualizeAcrossAnyActivation, ("relu", "gelu"))()
    except AssertionError as exc:
        notes = "\n".join(getattr(exc, "__notes__", []))
        print("EqualizeAcrossAnyActivation is caught:\n  " + str(exc).splitlines()[0][:200] + "\n" + notes[:600])
    else:
        raise SystemExit("the harness did not catch the wrong pass")
    measure()
