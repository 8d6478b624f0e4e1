"""lower_quantized_linears: replace each quantized linear by its format's ``fxquant::linear_<format>`` op.

Contract
--------
* **requires** — quantized weights are known: on a captured graph, linear nodes annotated by the RTN pass
  (``node.meta["fxquant"]["quant"] = {"weight": fqn, ...}``) with their :class:`QuantizedWeight` in
  ``ctx.artifacts["quantized_weights"][fqn]``; inside the torch.compile backend, a resolver that maps a weight
  tensor to its codes (a remembered quantization, or data-free RTN from the recipe).
* **does** — packs every such weight once (:func:`fxquant.backends.registry.packed_for`: cached on the
  weight tensor, so recompilations never pack again), adds the packed tensors to the graph as constants and
  rewrites the linear into one call of the format's custom op. It logs one line for every linear it could not
  lower, with the reason (no format holds the spec, the weight is shared with a non-linear user such as a tied
  embedding, the weight tensor is unknown, a scaled ``addmm``, ...).
* **ensures** — no annotated linear is left unlowered unless it was reported; the graph lints.

The rewrite rules, one per ATen form of a linear (the capture graph keeps ``aten.linear``; AOTAutograd with
Inductor's decompositions produces ``mm``/``addmm`` on a transposed weight)::

    aten.linear(x, W, b?)                   -> fxquant.linear_<fmt>(x, *packed(W), b)
    aten.mm(x, permute(W, [1, 0]) | t(W))   -> fxquant.linear_<fmt>(x, *packed(W), None)
    aten.addmm(b, x, permute(W) | t(W))     -> fxquant.linear_<fmt>(x, *packed(W), b)   # beta = alpha = 1
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import fx

from fxquant.capture import CapturedGraph, fxmeta
from fxquant.errors import PassError
from fxquant.pipeline import Pass, PassContext, PassResult
from fxquant.quant import QuantizedWeight

__all__ = ["LowerQuantizedLinears", "LinearSite", "Lowering", "find_linear_sites", "lower_linear_sites",
           "LoweringReport"]

log = logging.getLogger("fxquant")
aten = torch.ops.aten


@dataclass
class LinearSite:
    """One linear in the graph: ``node`` computes ``x @ W^T (+ bias)`` with ``W`` read from ``weight``."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    #: the transpose between ``W`` and ``mm``/``addmm`` (None for ``aten.linear``)
    transpose: fx.Node | None = None
    #: ``W`` is stored ``[in, out]`` and read as it is by ``addmm(b, x, W)`` / ``mm(x, W)`` (GPT-2's Conv1D); its
    #: quantized weight is that of ``Wᵀ``
    in_out: bool = False


#: what to do with one linear: run the packed op, use a float constant (CPU policy), or keep it and say why
@dataclass
class Lowering:
    action: Literal["op", "float", "keep"]
    packed: Any = None  # PackedWeight for "op"
    #: the dequantized float weight for "float", in the layout the site reads (``[in, out]`` for ``in_out``)
    weight: torch.Tensor | None = None
    reason: str = ""
    name: str = ""


@dataclass
class LoweringReport:
    lowered: dict[str, str] = field(default_factory=dict)  # weight name -> format
    as_float: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # weight name -> reason

    def stats(self) -> dict[str, Any]:
        formats: dict[str, int] = {}
        for fmt in self.lowered.values():
            formats[fmt] = formats.get(fmt, 0) + 1
        return {"lowered": len(self.lowered), "as_float": len(self.as_float), "kept": len(self.kept), **formats}


def _is_transpose(node: Any) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target is aten.t.default:
        return True
    return node.target is aten.permute.default and list(node.args[1]) == [1, 0]


def find_linear_sites(graph: fx.Graph) -> tuple[list[LinearSite], list[tuple[fx.Node, str]]]:
    """All linears of ``graph`` in one of the three ATen forms, and the ``mm``s that look like one but are not."""
    sites: list[LinearSite] = []
    rejected: list[tuple[fx.Node, str]] = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.linear.default:
            x, w = node.args[0], node.args[1]
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            sites.append(LinearSite(node, x, w, b))
        elif node.target is aten.mm.default and _is_transpose(node.args[1]):
            sites.append(LinearSite(node, node.args[0], node.args[1].args[0], None, node.args[1]))
        elif node.target is aten.addmm.default and (_is_transpose(node.args[2]) or _is_stored(node.args[2])):
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                rejected.append((node, "addmm with beta/alpha != 1 is not a plain linear"))
                continue
            if _is_transpose(node.args[2]):
                sites.append(LinearSite(node, node.args[1], node.args[2].args[0], node.args[0], node.args[2]))
            else:                                                     # Conv1D: addmm(b, x, W[in, out])
                sites.append(LinearSite(node, node.args[1], node.args[2], node.args[0], in_out=True))
        elif node.target is aten.mm.default and _is_stored(node.args[1]):
            sites.append(LinearSite(node, node.args[0], node.args[1], None, in_out=True))
    return sites, rejected


def _is_stored(node: Any) -> bool:
    """A graph input or attribute (where parameters come from), two-dimensional."""
    if not isinstance(node, fx.Node) or node.op not in ("placeholder", "get_attr"):
        return False
    val = node.meta.get("val")
    return val is None or getattr(val, "dim", lambda: 2)() == 2


def _fake_mode_of(nodes: list[fx.Node]) -> Any:
    from torch._guards import detect_fake_mode
    vals = [n.meta.get("val") for n in nodes if isinstance(n, fx.Node) and n.meta.get("val") is not None]
    return detect_fake_mode(vals)


def _set_val(node: fx.Node, fn: Callable[..., Any], args: tuple) -> None:
    """Give a new node its ``meta["val"]`` by running ``fn`` on fake versions of its arguments."""
    fake_mode = _fake_mode_of([a for a in args if isinstance(a, fx.Node)])
    if fake_mode is None:
        return

    def to_fake(a: Any) -> Any:
        if isinstance(a, fx.Node):
            v = a.meta.get("val")
            if isinstance(v, torch.Tensor) and not isinstance(v, torch._subclasses.FakeTensor):
                return fake_mode.from_tensor(v)
            return v
        return a

    with fake_mode:
        node.meta["val"] = fn(*[to_fake(a) for a in args])


def lower_linear_sites(gm: fx.GraphModule, sites: list[LinearSite], resolve: Callable[[LinearSite], Lowering],
                       add_constant: Callable[[str, torch.Tensor], fx.Node]) -> LoweringReport:
    """Apply ``resolve``'s decision to every site; ``add_constant(name, tensor)`` makes a graph node for a tensor.

    Constants are shared: a packed weight used by several linears is added once.
    """
    graph = gm.graph
    report = LoweringReport()
    const_nodes: dict[int, fx.Node] = {}

    def const(name: str, t: torch.Tensor) -> fx.Node:
        if id(t) not in const_nodes:
            const_nodes[id(t)] = add_constant(name, t)
        return const_nodes[id(t)]

    for site in sites:
        decision = resolve(site)
        name = decision.name or site.weight.name
        if decision.action == "keep":
            report.kept[name] = decision.reason
            continue
        base = re.sub(r"\W", "_", name)
        with graph.inserting_before(site.node):
            if decision.action == "float":
                wnode = const(f"{base}_dequantized", decision.weight)
                if site.transpose is None:   # linear(x, W), or an [in, out] weight given in that layout
                    site.node.replace_input_with(site.weight, wnode)
                else:
                    new_t = graph.call_function(site.transpose.target, (wnode, *site.transpose.args[1:]))
                    _set_val(new_t, site.transpose.target, new_t.args)
                    site.node.replace_input_with(site.transpose, new_t)
                report.as_float.append(name)
                continue
            packed = decision.packed
            fmt = packed.fmt
            args: list[Any] = [site.x]
            for tname in fmt.tensor_names:
                t = packed.tensors[tname]
                args.append(None if t is None else const(f"{base}_{tname}", t))
            args.append(site.bias)
            args.extend(packed.attrs[a] for a in fmt.attr_args)
            new = graph.call_function(fmt.op, tuple(args))
            _set_val(new, fmt.op, tuple(args))
            new.meta["fxquant"] = {"lowered": {"weight": name, "format": fmt.name, "spec": str(packed.spec)}}
        site.node.replace_all_uses_with(new)
        graph.erase_node(site.node)
        report.lowered[name] = fmt.name
    graph.eliminate_dead_code()
    gm.recompile()
    return report


def only_linear_users(weight: fx.Node, sites_of_weight: list[LinearSite]) -> bool:
    """True if every use of ``weight`` is one of these linears (directly, or through their transposes)."""
    allowed = {s.node for s in sites_of_weight} | {s.transpose for s in sites_of_weight if s.transpose is not None}
    for user in weight.users:
        if user in allowed:
            continue
        if _is_transpose(user) and all(u in allowed for u in user.users):
            continue
        return False
    return True


class LowerQuantizedLinears(Pass):
    """On a captured graph: every RTN-annotated linear becomes a packed ``fxquant::linear_<format>`` call."""

    name = "lower_quantized_linears"
    description = "replace quantized linears by packed custom ops (fxquant::linear_<format>), packing once"

    def __init__(self, formats: tuple[str, ...] | None = None):
        #: restrict lowering to these format names (default: the best registered format for each spec)
        self.formats = formats

    def requires(self, cg: CapturedGraph, ctx: PassContext) -> None:
        annotated = [n for n in cg.gm.graph.nodes if "quant" in n.meta.get("fxquant", {})]
        if annotated and not isinstance(ctx.artifacts.get("quantized_weights"), dict):
            raise PassError(f"{len(annotated)} linear(s) are annotated as quantized but ctx.artifacts has no "
                            "'quantized_weights' table",
                            "run quantize_weights_rtn (or another quantizing pass) in the same pipeline first")

    def call(self, cg: CapturedGraph, ctx: PassContext) -> PassResult:
        from fxquant.backends import registry

        table: dict[str, QuantizedWeight] = ctx.artifacts.get("quantized_weights", {}) or {}
        sites, _ = find_linear_sites(cg.gm.graph)
        sites = [s for s in sites if "quant" in s.node.meta.get("fxquant", {})]
        by_weight: dict[fx.Node, list[LinearSite]] = {}
        for s in sites:
            by_weight.setdefault(s.weight, []).append(s)

        def resolve(site: LinearSite) -> Lowering:
            ann = fxmeta(site.node)["quant"]
            fqn = ann.get("weight") or cg.fqn_of(site.weight) or site.weight.name
            qw = table.get(fqn)
            if qw is None:
                return Lowering("keep", reason=f"no QuantizedWeight for {fqn!r} in ctx.artifacts", name=fqn)
            if not only_linear_users(site.weight, by_weight[site.weight]):
                return Lowering("keep", reason="the weight is also read by a non-linear node (tied embedding?)",
                                name=fqn)
            fmt, why = registry.select_format(qw.spec)
            if fmt is None or (self.formats is not None and fmt.name not in self.formats):
                return Lowering("keep", reason=why or f"format {fmt.name} not enabled", name=fqn)
            weight = cg.tensor_of(site.weight)
            anchor = weight if weight is not None else qw.codes
            packed = registry.packed_for(anchor, qw.spec, lambda: registry.pack(qw, fmt), device=qw.codes.device,
                                         kind=fmt.name)
            return Lowering("op", packed=packed, name=fqn)

        def add_constant(name: str, t: torch.Tensor) -> fx.Node:
            return cg.add_tensor(name, t)

        report = lower_linear_sites(cg.gm, sites, resolve, add_constant)
        for name, why in report.kept.items():
            log.warning("lower_quantized_linears: kept %s as a float linear: %s", name, why)
        ctx.artifacts.setdefault("lowering", {}).update(report.lowered)
        ctx.artifacts["lowering_kept"] = dict(report.kept)
        return PassResult(modified=bool(report.lowered), stats=report.stats())

    def ensures(self, cg: CapturedGraph, ctx: PassContext) -> None:
        kept = ctx.artifacts.get("lowering_kept", {})
        for node in cg.gm.graph.nodes:
            ann = node.meta.get("fxquant", {}).get("quant")
            if ann and node.op == "call_function" and node.target is aten.linear.default:
                if ann.get("weight") not in kept:
                    raise PassError(f"linear {node.name} ({ann.get('weight')}) is quantized but was neither lowered "
                                    "nor reported", "this is a bug in lower_quantized_linears")
