"""A networkx view of an FX graph, and the small graph helpers the analysis passes share.

Passes rewrite the FX graph itself; this view is for *asking questions* about it (ancestors, descendants,
paths) with networkx's algorithms, and for drawing it in the debug report. Nodes of the view are FX node
names; edges follow data flow (producer -> user). Each view node carries ``op``, ``target`` (a short
string such as ``aten.linear.default``), ``shape`` (strings, since sizes may be symbolic), ``dtype`` and,
for parameter/buffer placeholders, ``fqn``. The view is a snapshot: rebuild it after rewriting the graph.

The helpers classify ATen nodes by what they mean, not by what the model calls them: a *linear* is
``aten.linear`` / ``addmm`` / ``mm`` whose weight is a parameter placeholder, a *shape op* moves or
relabels data without computing (view, transpose, ``to``, dropout in eval mode, ...).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import networkx as nx
import sympy
import torch
from torch import fx

aten = torch.ops.aten

#: ops that only move, relabel or copy data (or assert on it): a per-channel scale passes through them
#: unchanged, and they never mix values. ``to`` may change the dtype, which does not change that.
SHAPE_OPS: frozenset[str] = frozenset({
    "view", "_unsafe_view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "contiguous",
    "clone", "alias", "detach", "to", "_to_copy", "_assert_tensor_metadata", "slice", "t", "flatten",
    "unflatten", "lift_fresh_copy", "type_as",
})

#: ops that pass their first input through unchanged (no layout change at all)
IDENTITY_OPS: frozenset[str] = frozenset({
    "contiguous", "clone", "alias", "detach", "to", "_to_copy", "lift_fresh_copy",
    "type_as",                     # a cast to the second tensor's dtype (Gemma's norms)
})


def op_name(node: fx.Node) -> str:
    """The ATen op's base name (``aten.view.default`` -> ``view``; ``operator.getitem`` -> ``getitem``).

    Empty for placeholders and outputs. Used for table lookups, so overloads collapse to one name.
    """
    if node.op != "call_function":
        return ""
    target = node.target
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "_overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", str(target))


def target_str(node: fx.Node) -> str:
    """A readable target (``aten.linear.default``, ``getitem``, or the node's op for non-calls)."""
    if node.op != "call_function":
        return node.op
    if node.target is operator.getitem:
        return "getitem"
    return str(node.target)


def is_dropout_identity(node: fx.Node) -> bool:
    """``aten.dropout(x, p, train=False)`` (what export records in eval mode) is the identity."""
    if op_name(node) not in ("dropout", "native_dropout"):
        return False
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return train is False


def is_identity(node: fx.Node) -> bool:
    """Passes its first input through with the same layout (copies, dtype casts, eval-mode dropout)."""
    return op_name(node) in IDENTITY_OPS or is_dropout_identity(node)


def is_shape_op(node: fx.Node) -> bool:
    return op_name(node) in SHAPE_OPS or is_dropout_identity(node)


def tensor_val(node: object) -> torch.Tensor | None:
    """The fake tensor export recorded for ``node`` (``meta['val']``), if it is a tensor."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def is_tensor(node: object) -> bool:
    return tensor_val(node) is not None


# ---- symbolic sizes made concrete -----------------------------------------------------------------------
_PRIMES = (1009, 1013, 1019, 1021, 1031, 1033, 1039, 1049, 1051, 1061, 1063, 1069, 1087, 1091, 1093, 1097)
#: one value per symbol for the whole process, so shapes of different nodes stay comparable
_SYMBOL_VALUES: dict[sympy.Symbol, sympy.Integer] = {}


def _symbol_value(symbol: sympy.Symbol) -> sympy.Integer:
    if symbol not in _SYMBOL_VALUES:
        k = len(_SYMBOL_VALUES)
        _SYMBOL_VALUES[symbol] = sympy.Integer(_PRIMES[k % len(_PRIMES)] + 1000 * (k // len(_PRIMES)))
    return _SYMBOL_VALUES[symbol]


def _concrete(size: object) -> int:
    if not isinstance(size, torch.SymInt):
        return int(size)  # type: ignore[call-overload]
    expr = size.node.expr
    if not expr.free_symbols:
        return int(expr)
    return int(expr.xreplace({s: _symbol_value(s) for s in expr.free_symbols}))


def concrete_shape(node: object) -> tuple[int, ...] | None:
    """The node's shape with every free symbol (batch, sequence length) replaced by a large prime.

    Reshape analysis groups dimensions by equal products; with symbols set to large distinct primes (the
    same prime for a symbol wherever it appears), products of model dimensions (powers of two, head counts)
    never collide with token dimensions.
    """
    val = tensor_val(node)
    if val is None:
        return None
    return tuple(_concrete(s) for s in val.shape)


def shape_str(node: object) -> tuple[str, ...] | None:
    val = tensor_val(node)
    return None if val is None else tuple(str(s) for s in val.shape)


# ---- linears ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearOp:
    """A matrix multiply by a parameter: ``aten.linear`` (weight ``[out, in]``) or ``addmm``/``mm``/``matmul``
    whose weight is ``[in, out]`` (GPT-2's Conv1D) or ``t(param)`` (a decomposed ``nn.Linear``, Falcon's
    ``x @ W.T``)."""

    node: fx.Node
    input: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    #: ``"out_in"`` (nn.Linear layout) or ``"in_out"`` (Conv1D layout): where the input channels are
    layout: str
    in_features: int
    out_features: int


def _param_through_views(node: object, is_param) -> tuple[fx.Node, bool] | None:
    """(placeholder, transposed) if ``node`` is a parameter placeholder, possibly behind ``t``/``to``."""
    transposed = False
    while isinstance(node, fx.Node):
        if is_param(node):
            return node, transposed
        name = op_name(node)
        if name in ("t", "numpy_T") or (name == "transpose" and len(concrete_shape(node) or ()) == 2):
            transposed = not transposed
        elif name == "permute" and list(node.args[1]) == [1, 0]:
            transposed = not transposed
        elif not is_identity(node):
            return None
        node = node.args[0]
    return None


def as_linear(node: fx.Node, is_param) -> LinearOp | None:
    """Describe ``node`` as a linear by a parameter weight, or None.

    ``is_param(node) -> bool`` says which placeholders are model parameters (a matmul of two activations,
    like attention's ``q @ kᵀ``, is not a linear).
    """
    name = op_name(node)
    if name == "linear":
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        found = _param_through_views(w, is_param)
        if found is None or not isinstance(x, fx.Node):
            return None
        shape = concrete_shape(w) or (0, 0)  # the argument is [out, in], whatever the parameter's layout
        layout = "in_out" if found[1] else "out_in"
        return LinearOp(node, x, found[0], b if isinstance(b, fx.Node) else None, layout, shape[1], shape[0])
    if name in ("addmm", "mm", "matmul"):
        if name == "addmm":
            b, x, w = node.args[0], node.args[1], node.args[2]
        else:                                  # matmul(x, W.T): Falcon's FalconLinear
            b, (x, w) = None, node.args[:2]
        found = _param_through_views(w, is_param)
        if found is None or not isinstance(x, fx.Node):
            return None
        shape = concrete_shape(w) or (0, 0)
        # mm(x, W) with W = [in, out]; W = t(P) means P is [out, in]
        layout = "out_in" if found[1] else "in_out"
        return LinearOp(node, x, found[0], b if isinstance(b, fx.Node) else None, layout, shape[0], shape[1])
    return None


# ---- the networkx view -----------------------------------------------------------------------------------
def _input_nodes(node: fx.Node) -> Iterator[fx.Node]:
    seen: set[str] = set()
    for arg in node.all_input_nodes:
        if arg.name not in seen:
            seen.add(arg.name)
            yield arg


def build_graphview(gm: fx.GraphModule | fx.Graph, fqn: Mapping[str, str] | None = None) -> nx.DiGraph:
    """A ``DiGraph`` of ``gm``'s graph: one node per FX node (by name), one edge per data dependency.

    ``fqn`` (placeholder name -> model parameter name, as in ``CapturedGraph.fqn``) labels parameter
    placeholders. Edge attribute ``arg`` is the producer's position among the user's inputs.
    """
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    fqn = fqn or {}
    view = nx.DiGraph()
    for node in graph.nodes:
        val = tensor_val(node)
        attrs = {
            "op": node.op,
            "target": target_str(node),
            "shape": shape_str(node),
            "dtype": str(val.dtype).replace("torch.", "") if val is not None else None,
        }
        if node.name in fqn:
            attrs["fqn"] = fqn[node.name]
        view.add_node(node.name, **attrs)
        for position, arg in enumerate(_input_nodes(node)):
            view.add_edge(arg.name, node.name, arg=position)
    return view


def walk_back_shape_ops(node: object) -> object:
    """Follow first inputs through shape ops (and eval-mode dropout) to the tensor that computed the value."""
    while isinstance(node, fx.Node) and is_shape_op(node) and node.args:
        node = node.args[0]
    return node


def tensor_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` that compute with it (``_assert_tensor_metadata`` and ``sym_size`` are skipped)."""
    return [u for u in node.users if op_name(u) not in ("_assert_tensor_metadata", "sym_size", "sym_numel",
                                                        "sym_stride")]


def flat_tensor_args(node: fx.Node) -> list[tuple[int, fx.Node]]:
    """(argument position, node) for every tensor argument, lists flattened (``cat([a, b])`` gives 0, 0)."""
    out: list[tuple[int, fx.Node]] = []
    for i, arg in enumerate(node.args):
        items: Iterable[object] = arg if isinstance(arg, (list, tuple)) else (arg,)
        for item in items:
            if isinstance(item, fx.Node):
                out.append((i, item))
    return out
