"""The integer-only verifier: proves that no floating-point op or tensor remains between the integer boundaries.

The boundaries are annotated by the lowering (``node.meta["fxquant"]["integer_boundary"]`` = ``"enter"`` on an
op that turns floats into integers — ``fxquant::quantize_rows`` / ``quantize_fixed`` — and ``"exit"`` on one that
turns integers back into floats, ``fxquant::dequantize``). The *integer region* is every node on a path from an
enter to an exit. Inside it, by node targets and dtypes:

* every tensor a node produces is an integer or bool tensor (``meta["val"]``, filled by running the graph once
  on a small input when the lowering did not record it);
* no op is a float-only op (:data:`FLOAT_ONLY_OPS`: exp, rsqrt, softmax, ..., and ``div`` without a rounding mode);
* no op takes a Python float constant;
* no float tensor flows in from outside the region (a float weight, scale or table that was not quantized).

Used by the pass itself (its ``ensures``), by the tests (``fxquant.testing.assert_integer_only``) and by users:
``fxquant verify --integer-only --model M --recipe illm-w8a8``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import fx

from .capture import CapturedGraph
from .errors import PassError

__all__ = ["INTEGER_BOUNDARY", "FLOAT_ONLY_OPS", "IntegerRegionReport", "check_integer_region",
           "verify_integer_only", "propagate_meta", "IntegerOnlyViolation"]

#: ``node.meta["fxquant"][INTEGER_BOUNDARY]`` is ``"enter"`` on a node that turns floats into integers and
#: ``"exit"`` on one that turns integers back into floats
INTEGER_BOUNDARY = "integer_boundary"

#: ATen ops that only exist as floating-point math: never allowed between integer boundaries
FLOAT_ONLY_OPS = frozenset({
    "exp", "exp2", "expm1", "log", "log2", "log1p", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "erf",
    "softmax", "_softmax", "log_softmax", "_log_softmax", "gelu", "silu", "layer_norm", "native_layer_norm",
    "rms_norm", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "reciprocal", "pow", "mean", "var", "std", "div_", "true_divide",
})


class IntegerOnlyViolation(PassError):
    """A float op or tensor was found between the integer boundaries."""


def _op(node: fx.Node) -> str:
    packet = getattr(node.target, "_overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(node.target, "__name__", str(node.target))


def _dtype(node: Any) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _default_boundary(node: fx.Node) -> str | None:
    return node.meta.get("fxquant", {}).get(INTEGER_BOUNDARY)


def _is_float(node: fx.Node, tensors: Mapping[str, torch.Tensor]) -> bool:
    dt = _dtype(node)
    if dt is None and node.op == "placeholder" and node.name in tensors:
        dt = tensors[node.name].dtype
    return dt is not None and dt.is_floating_point


@dataclass
class IntegerRegionReport:
    """What :func:`check_integer_region` found."""

    checked: int
    enters: int
    exits: int
    problems: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        if self.ok:
            top = ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items(), key=lambda kv: -kv[1])[:12])
            return (f"integer-only: OK — {self.checked} nodes between {self.enters} enter and {self.exits} exit "
                    f"boundaries, no float op or tensor ({top})")
        return (f"{len(self.problems)} float op(s)/tensor(s) between the integer boundaries:\n  "
                + "\n  ".join(self.problems[:20]) + ("\n  ..." if len(self.problems) > 20 else ""))


def check_integer_region(gm: fx.GraphModule | CapturedGraph, *,
                         boundary: Callable[[fx.Node], str | None] | None = None,
                         tensors: Mapping[str, torch.Tensor] | None = None) -> IntegerRegionReport:
    """Walk ``gm`` and list every float op or tensor between its integer boundaries (see the module doc)."""
    if isinstance(gm, CapturedGraph):
        tensors = gm.tensors if tensors is None else tensors
        gm = gm.gm
    tensors = tensors or {}
    boundary = boundary or _default_boundary
    nodes = list(gm.graph.nodes)
    kind = {n: boundary(n) for n in nodes}
    enters = [n for n in nodes if kind[n] == "enter"]
    exits = [n for n in nodes if kind[n] == "exit"]
    if not enters or not exits:
        return IntegerRegionReport(0, len(enters), len(exits), [
            f"no integer region: {len(enters)} enter and {len(exits)} exit boundaries (annotate "
            f"node.meta['fxquant']['{INTEGER_BOUNDARY}'] or pass boundary=)"])
    downstream: set[fx.Node] = set()
    stack = list(enters)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in downstream and kind[u] != "exit":
                downstream.add(u)
                stack.append(u)
    upstream: set[fx.Node] = set()
    stack = list(exits)
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in upstream and kind[a] != "enter":
                upstream.add(a)
                stack.append(a)
    region = (downstream & upstream) | {n for n in enters if any(u in upstream or kind[u] == "exit" for u in n.users)}
    problems: list[str] = []
    ops: dict[str, int] = {}
    for n in nodes:
        if n not in region:
            if kind[n] == "exit":
                for a in n.all_input_nodes:
                    if a in region and _is_float(a, tensors):
                        problems.append(f"{n.name}: exit boundary reads float {a.name} from the integer region")
            continue
        if kind[n] == "enter" and n.op == "call_function":
            continue  # the enter op reads floats by definition; its outputs (getitems) are checked
        dt = _dtype(n)
        if dt is not None and dt.is_floating_point:
            problems.append(f"{n.name} ({_op(n)}) produces {dt}")
        if n.op == "call_function":
            op = _op(n)
            ops[op] = ops.get(op, 0) + 1
            if op in FLOAT_ONLY_OPS or (op == "div" and n.kwargs.get("rounding_mode") is None
                                        and (len(n.args) < 3 or n.args[2] is None)):
                problems.append(f"{n.name}: {op} is a floating-point op")
            floats = [a for a in (*n.args, *n.kwargs.values()) if isinstance(a, float)]
            if floats:
                problems.append(f"{n.name} ({op}) takes float constant(s) {floats}")
            for a in n.all_input_nodes:
                if a not in region and kind[a] != "enter" and _is_float(a, tensors):
                    problems.append(f"{n.name} ({op}) reads float tensor {a.name} from outside the integer region")
    return IntegerRegionReport(len(region), len(enters), len(exits), problems, ops)


def propagate_meta(cg: CapturedGraph, example: torch.Tensor | tuple[torch.Tensor, ...] | None = None) -> None:
    """Fill ``meta["val"]`` (a meta-device tensor: dtype and shape) of every node by running the graph once on a
    small input (``example``: the token ids, or a tuple with one tensor per user input; default: 1 x 8 token ids)."""
    if example is None:
        vocab = int(getattr(getattr(cg.model, "config", None), "vocab_size", 2) or 2)
        example = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    examples = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    if cg.meta.get("kv_cache") and len(examples) == 1:     # token ids only: the first call, with an empty cache
        from fxquant.passes.lower_integer_only import empty_kv_cache  # noqa: PLC0415
        cache = empty_kv_cache(cg, int(examples[0].shape[0]), examples[0].device)
        examples = (examples[0], *[cache[n] for n in cg.user_inputs[1:]])
    if len(examples) != len(cg.user_inputs):
        raise IntegerOnlyViolation(f"the graph takes {len(cg.user_inputs)} input(s) ({', '.join(cg.user_inputs)}), "
                                   f"the example gives {len(examples)}",
                                   "pass one example tensor per input, as a tuple")
    feed = dict(zip(cg.user_inputs, examples))
    args = []
    for n in cg.gm.graph.nodes:
        if n.op == "placeholder":
            args.append(feed[n.name] if n.name in feed else cg.tensors[n.name])

    class _Prop(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                n.meta["val"] = out.to("meta")
            return out

    with torch.no_grad():
        _Prop(cg.gm).run(*args)


def verify_integer_only(cg: CapturedGraph, example: torch.Tensor | tuple[torch.Tensor, ...] | None = None
                        ) -> IntegerRegionReport:
    """Raise :class:`IntegerOnlyViolation` unless ``cg`` is integer-only between its boundaries (``example``: see
    :func:`propagate_meta`)."""
    if any(n.op == "call_function" and not isinstance(n.meta.get("val"), torch.Tensor)
           and _op(n) not in ("getitem", "sym_size") for n in cg.gm.graph.nodes):
        propagate_meta(cg, example)
    report = check_integer_region(cg)
    if not report.ok:
        raise IntegerOnlyViolation(report.render(), "a lowering rule emitted a float op: report a bug with the "
                                   "FXQUANT_DEBUG=1 graph dump")
    return report
