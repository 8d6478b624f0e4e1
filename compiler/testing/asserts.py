"""Checks for pass authors: equivalence, bit-exactness, integer-only graphs and exact folding.

Each check raises ``AssertionError`` with a message that says what differs, where and by how much (so a
hypothesis failure report is readable on its own), and returns a small report when it passes, so a test
can also assert on the numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx

from fxquant.capture import CapturedGraph
from fxquant.debug import compare
from fxquant.pipeline import Pass, PassContext, PassRecord, Pipeline
from fxquant.verify import FLOAT_ONLY_OPS, INTEGER_BOUNDARY, check_integer_region

from .strategies import copy_captured

__all__ = ["EquivalenceReport", "assert_equivalent", "assert_bit_exact", "assert_integer_only", "assert_fold_exact",
           "run_pass", "run_graph", "with_tensors", "linear_weight_placeholders", "FLOAT_ONLY_OPS",
           "INTEGER_BOUNDARY"]


def run_graph(cg: CapturedGraph, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``cg(*inputs)`` under ``no_grad``."""
    with torch.no_grad():
        return cg(*inputs)


def with_tensors(cg: CapturedGraph, replace: Mapping[str, torch.Tensor] | Callable[[str, torch.Tensor], Any]
                 ) -> CapturedGraph:
    """A copy of ``cg`` with some tensors replaced: by placeholder name, or ``replace(fqn, tensor)`` returning
    the new tensor (or None to keep it). Handy to build the expected result of a quantizing pass."""
    out = copy_captured(cg, clone_tensors=False)
    for ph, tensor in list(out.tensors.items()):
        if callable(replace):
            fqn = out.fqn.get(ph)
            new = replace(fqn, tensor) if fqn is not None else None
        else:
            new = replace.get(ph)
        if new is not None:
            out.tensors[ph] = new
    return out


def run_pass(pass_: Pass, cg: CapturedGraph, ctx: PassContext | None = None) -> PassRecord:
    """Run one pass through :class:`~fxquant.pipeline.Pipeline` with the verifier on (``graph.lint()``, the
    pass's ``requires`` and ``ensures``), as the real pipeline runs it."""
    return Pipeline([pass_]).run(cg, ctx if ctx is not None else PassContext(), debug_dir="", verify=True)[0]


@dataclass
class EquivalenceReport:
    pass_name: str
    max_abs_error: float
    scale: float
    relative_error: float
    sqnr_db: float
    record: PassRecord | None
    transformed: CapturedGraph
    context: PassContext = field(repr=False, default_factory=PassContext)


def _mismatch(expected: torch.Tensor, actual: torch.Tensor) -> str:
    diff = (expected.double() - actual.double()).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    flat = int(diff.reshape(-1).argmax())
    index = list(torch.unravel_index(torch.tensor(flat), expected.shape)) if expected.dim() else []
    where = tuple(int(i) for i in index)
    return (f"worst element {where}: expected {float(expected.reshape(-1)[flat]):.8g}, "
            f"got {float(actual.reshape(-1)[flat]):.8g}")


def _check_close(expected: torch.Tensor, actual: torch.Tensor, tol: float, what: str) -> tuple[float, float, float, float]:
    if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
        got = tuple(actual.shape) if isinstance(actual, torch.Tensor) else type(actual).__name__
        raise AssertionError(f"{what}: output shape changed: expected {tuple(expected.shape)}, got {got}")
    sqnr, max_err = compare(expected, actual)
    scale = float(expected.detach().double().abs().max()) if expected.numel() else 0.0
    rel = max_err / max(scale, 1e-30) if max_err else 0.0
    if math.isnan(max_err) or rel > tol:
        raise AssertionError(
            f"{what}: outputs differ: max abs error {max_err:.4g} = {rel:.3g} x the output's max |value| "
            f"({scale:.4g}), tolerance {tol:g}; SQNR {sqnr:.2f} dB; {_mismatch(expected, actual)}")
    return sqnr, max_err, scale, rel


def assert_equivalent(pass_: Pass, graph: CapturedGraph, inputs: Sequence[torch.Tensor] | torch.Tensor,
                      tol: float = 1e-5, *, expected: Callable[[CapturedGraph], torch.Tensor] | None = None,
                      ctx: PassContext | None = None) -> EquivalenceReport:
    """Run ``pass_`` on a copy of ``graph`` and check it computes what it should on ``inputs``.

    Without ``expected`` the pass must leave the function unchanged (an analysis or equivalence-preserving
    rewrite): the transformed output must equal the original's. With ``expected(original_copy) -> tensor`` the
    transformed output must equal that instead (a quantizing pass whose semantics are known, e.g. "every
    linear weight fake-quantized"). Equal means ``max |out - ref| <= tol * max |ref|`` (``tol=0``: bit for bit).

    ``graph`` itself is never modified. The pass runs with the verifier on (``requires``/``ensures``/lint).
    """
    feed = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    name = getattr(pass_, "name", type(pass_).__name__)
    reference = run_graph(graph, feed) if expected is None else expected(copy_captured(graph))
    transformed = copy_captured(graph)
    ctx = ctx if ctx is not None else PassContext()
    record = run_pass(pass_, transformed, ctx)
    actual = run_graph(transformed, feed)
    sqnr, max_err, scale, rel = _check_close(reference, actual, tol,
                                             f"pass {name} (+{record.added} -{record.removed} ~{record.replaced} "
                                             f"nodes, stats {record.stats})")
    return EquivalenceReport(name, max_err, scale, rel, sqnr, record, transformed, ctx)


def assert_fold_exact(fold: Pass | Callable[[CapturedGraph], Any], graph: CapturedGraph,
                      inputs: Sequence[torch.Tensor] | torch.Tensor, tol: float = 1e-5, *,
                      ctx: PassContext | None = None) -> EquivalenceReport:
    """Folding per-channel scales must leave the float function unchanged, and must actually fold something.

    ``fold`` is a :class:`Pass` (run with ``ctx``, where it finds its scales) or a function ``fold(cg)`` that
    rewrites the copy it is given. Besides the equivalence check of :func:`assert_equivalent`, at least one
    tensor must have changed: a fold that silently does nothing would otherwise pass every test.
    """
    feed = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    name = getattr(fold, "name", getattr(fold, "__name__", type(fold).__name__))
    reference = run_graph(graph, feed)
    folded = copy_captured(graph)
    ctx = ctx if ctx is not None else PassContext()
    record = run_pass(fold, folded, ctx) if isinstance(fold, Pass) else None
    if record is None:
        fold(folded)  # type: ignore[operator]
        folded.gm.graph.lint()
        folded.gm.recompile()
    changed = [folded.fqn.get(k, k) for k, v in folded.tensors.items()
               if k not in graph.tensors or v.shape != graph.tensors[k].shape or not torch.equal(v, graph.tensors[k])]
    if not changed and folded.gm.code == graph.gm.code:
        raise AssertionError(f"fold {name} changed no tensor and no node: nothing was folded "
                             "(were the scales where the fold looks for them?)")
    actual = run_graph(folded, feed)
    sqnr, max_err, scale, rel = _check_close(reference, actual, tol,
                                             f"fold {name} (changed {', '.join(changed[:6]) or 'the graph'})")
    return EquivalenceReport(name, max_err, scale, rel, sqnr, record, folded, ctx)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (so that -0.0 != 0.0 and NaN payloads count)."""
    views = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}
    return t.contiguous().view(views[t.dtype]) if t.dtype in views else t


def _bit_mismatch(what: str, expected: torch.Tensor, actual: torch.Tensor) -> None:
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"{what}: expected a tensor, got {type(actual).__name__}")
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(f"{what}: expected {expected.dtype} {tuple(expected.shape)}, "
                             f"got {actual.dtype} {tuple(actual.shape)}")
    bad = _bits(expected) != _bits(actual.to(expected.device))
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        e, a = expected[first], actual[first]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} values differ in their bits; first at "
                             f"{first}: expected {float(e)!r} (bits {int(_bits(e.reshape(1))[0]):#x}), "
                             f"got {float(a)!r} (bits {int(_bits(a.reshape(1))[0]):#x})")


def assert_bit_exact(fake_quant: torch.Tensor, packed: Any, kernel: Callable[[Any], torch.Tensor] | None = None, *,
                     x: torch.Tensor | None = None, matmul: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
                     tol: float = 1e-5) -> None:
    """fxquant's "one numerics": fake-quant, the packed format and the kernel agree bit for bit.

    * ``packed.dequantize(fake_quant.dtype)`` (a :class:`~fxquant.quant.QuantizedWeight`, a registry
      ``PackedWeight`` or an ``FP6PackedWeight``; a plain tensor is taken as already dequantized) must equal
      ``fake_quant`` in every bit;
    * ``kernel(packed)``, the kernel's own dequantization (e.g. a Triton dequant kernel), likewise;
    * ``matmul(x, packed)`` (the kernel's matmul), when given with ``x``, must match ``F.linear(x, fake_quant)``
      to float tolerance ``tol`` (relative to the output's max), since accumulation order may differ.
    """
    dtype = fake_quant.dtype
    deq = packed if isinstance(packed, torch.Tensor) else packed.dequantize(dtype)
    _bit_mismatch("packed.dequantize() vs fake-quant", fake_quant, deq)
    if kernel is not None:
        _bit_mismatch(f"kernel {getattr(kernel, '__name__', 'kernel')} vs fake-quant", fake_quant, kernel(packed))
    if matmul is not None:
        if x is None:
            raise ValueError("assert_bit_exact: matmul needs x (the activation to multiply)")
        expected = torch.nn.functional.linear(x, fake_quant.to(x.dtype))
        _check_close(expected, matmul(x, packed), tol, f"matmul {getattr(matmul, '__name__', 'matmul')}")


# ---- integer-only ------------------------------------------------------------------------------------------------
def assert_integer_only(gm: fx.GraphModule | CapturedGraph, *,
                        boundary: Callable[[fx.Node], str | None] | None = None,
                        tensors: Mapping[str, torch.Tensor] | None = None) -> int:
    """No floating-point op or tensor between the integer boundaries of ``gm`` (see
    :func:`fxquant.verify.check_integer_region`, which this wraps as a test assertion). Returns the number of
    region nodes checked; raises ``AssertionError`` listing the offenders, and if there is no boundary at all,
    so the check can never pass vacuously."""
    report = check_integer_region(gm, boundary=boundary, tensors=tensors)
    if report.problems:
        raise AssertionError(report.render())
    return report.checked


def linear_weight_placeholders(cg: CapturedGraph) -> list[str]:
    """Placeholder names of the weights of every ``aten.linear`` in ``cg`` (for building expectations)."""
    out = []
    for node in cg.gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.linear.default:
            w = node.args[1]
            if isinstance(w, fx.Node) and w.op == "placeholder" and w.name not in out:
                out.append(w.name)
    return out

