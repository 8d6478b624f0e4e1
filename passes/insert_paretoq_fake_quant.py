"""``insert_fake_quant``: put a ParetoQ fake-quantizer between every selected linear weight and its linears.

Contract
--------
* **requires** at least one linear-like op (``aten.linear``/``addmm``/``mm``/``matmul``) reading a parameter.
* **call** — for every weight tensor read by linears only (tied parameters are one weight), selected by
  ``include``/``exclude`` (the RTN pass's glob rules; ``lm_head`` stays float by default; embeddings and norms
  are never linear weights), it

  - adds the trainable scale as a new placeholder ``<weight placeholder>_alpha`` with
    :meth:`CapturedGraph.add_tensor`, FQN ``<weight fqn>_alpha`` (the state-dict key of the eager
    :class:`fxquant.paretoq.QATLinear`), initialised by :func:`fxquant.paretoq.init_alpha` (or taken from
    ``alphas`` when given);
  - inserts one node ``fxquant.paretoq.paretoq_fake_quant(W, alpha, bits, group_size)`` before the weight's first
    use and rewires every linear that read ``W`` to read it instead (a linear written ``x @ W.T`` reads it through
    its transpose; a weight stored ``[in, out]``, GPT-2's Conv1D read by ``addmm``/``mm``, is fake-quantized as
    its ``[out, in]`` transpose — ``t(fake_quant(t(W)))`` — so its scales are per output channel too);
  - annotates the new node: ``fxmeta(node)["paretoq"] = {"weight": fqn, "alpha": fqn + "_alpha", "spec": ...,
    "bits": ..., "group_size": ...}`` and records the same in ``ctx.artifacts["paretoq_fake_quant"][fqn]``.

  The graph then computes the fake-quant model (what QAT trains); ``train_qat`` trains it and
  ``convert_fake_quant`` replaces the nodes by quantized weights.
* A weight it cannot handle is reported, never skipped silently: a warning naming the layer and the reason, and
  ``ctx.artifacts["paretoq_skipped"]``. NaN/Inf weights raise :class:`~fxquant.errors.WeightError`.
* **ensures** every recorded node exists, reads its weight and scale placeholders, and the scale has the shape
  ``[out, groups]``.
"""
from __future__ import annotations

import logging
import re
from typing import Sequence

import torch
from torch import fx

from fxquant.capture import CapturedGraph, fxmeta
from fxquant.errors import PassError, QuantSpecError
from fxquant.paretoq import ParetoQSpec, init_alpha, paretoq_fake_quant
from fxquant.passes.quantize_weights_rtn import LINEAR_OPS, matches, nothing_quantized, resolve_weight
from fxquant.pipeline import Pass, PassContext, PassResult

__all__ = ["InsertParetoQFakeQuant", "fake_quant_nodes"]

log = logging.getLogger("fxquant")


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def fake_quant_nodes(cg: CapturedGraph) -> list[fx.Node]:
    """The ParetoQ fake-quant nodes of the graph, in graph order."""
    return [n for n in cg.gm.graph.nodes if n.op == "call_function" and n.target is paretoq_fake_quant]


class InsertParetoQFakeQuant(Pass):
    """ParetoQ fake-quant nodes (1/1.58/2/3/4 bit, learnable per-channel or per-group scales) on linear weights."""

    name = "insert_fake_quant"
    description = "insert ParetoQ fake-quantizers with learnable scales on linear weights (lm_head stays float)"

    def __init__(self, spec: ParetoQSpec, exclude: Sequence[str] = ("lm_head*",), include: Sequence[str] | None = None,
                 alphas: dict[str, torch.Tensor] | None = None):
        if not isinstance(spec, ParetoQSpec):
            raise QuantSpecError(f"InsertParetoQFakeQuant needs a ParetoQSpec, got {type(spec).__name__}",
                                 "build one with fxquant.paretoq.ParetoQSpec(bits=2)")
        if isinstance(exclude, str) or (include is not None and isinstance(include, str)):
            raise TypeError("include/exclude are sequences of patterns, e.g. exclude=['lm_head'], not one string")
        for pattern in [*exclude, *(include or ())]:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise QuantSpecError(f"bad regular expression in weight pattern {pattern!r}: {exc}") from exc
        self.spec = spec
        self.exclude = tuple(exclude)
        self.include = None if include is None else tuple(include)
        self.alphas = dict(alphas or {})

    def __repr__(self) -> str:
        return f"<pass {self.name} {self.spec.describe()} exclude={list(self.exclude)}>"

    def selected(self, fqn: str) -> bool:
        if self.include is not None and not any(matches(fqn, p) for p in self.include):
            return False
        return not any(matches(fqn, p) for p in self.exclude)

    def requires(self, cg: CapturedGraph, ctx: PassContext) -> None:
        if not any(n.op == "call_function" and n.target in LINEAR_OPS for n in cg.gm.graph.nodes):
            raise PassError(f"{self.name}: the graph of {cg.model_class or 'the model'} has no linear layer",
                            "ParetoQ quantizes linear weights only; check that the model was captured whole")
        if fake_quant_nodes(cg):
            raise PassError(f"{self.name}: the graph already holds ParetoQ fake-quant nodes",
                            "run insert_fake_quant once per pipeline")

    def call(self, cg: CapturedGraph, ctx: PassContext) -> PassResult:
        graph = cg.gm.graph
        records: dict = ctx.artifacts.setdefault("paretoq_fake_quant", {})
        skipped: dict[str, str] = ctx.artifacts.setdefault("paretoq_skipped", {})

        def skip(key: str, reason: str) -> None:
            log.warning("%s: not quantizing %s: %s", self.name, key, reason)
            skipped[key] = reason

        uses = []
        for node in graph.nodes:
            if node.op == "call_function" and node.target in LINEAR_OPS:
                found = resolve_weight(cg, node)
                if isinstance(found, str):
                    skip(node.name, f"{node.target} node {node.name}: {found}")
                elif found is not None:
                    uses.append(found)

        aliases: dict[tuple, list[str]] = {}
        for ph_name, tensor in cg.tensors.items():
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 2:
                aliases.setdefault(_storage_key(tensor), []).append(ph_name)
        by_key: dict[tuple, list] = {}
        for use in uses:
            by_key.setdefault(_storage_key(cg.tensors[use.placeholder.name]), []).append(use)

        placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
        order = {n: i for i, n in enumerate(graph.nodes)}
        n_done = n_excluded = 0
        for key, group in by_key.items():
            first = group[0]
            fqn = cg.fqn_of(first.placeholder)
            names = aliases.get(key, [first.placeholder.name])
            fqns = [cg.fqn[n] for n in names if n in cg.fqn]
            if not all(self.selected(f) for f in fqns):
                n_excluded += 1
                continue
            layouts = {u.in_out for u in group}
            if len(layouts) > 1:
                skip(fqn, "it is read both as [out, in] and as [in, out] by different layers")
                continue
            in_out = first.in_out
            reads = {u.node for u in group} | {u.via for u in group if u.via is not None}
            other = [u for n in names if n in placeholders for u in placeholders[n].users if u not in reads]
            if other:
                skip(fqn, "it is also read by " + ", ".join(f"{u.name} ({u.target})" for u in other[:3])
                     + " (tied weights?); quantizing it would change that use too — untie the weights to quantize it")
                continue
            weight = cg.tensors[first.placeholder.name]
            w_oi = weight.t() if in_out else weight
            alpha = self.alphas.get(fqn)
            alpha = init_alpha(w_oi, self.spec) if alpha is None else alpha.detach().to(torch.float32).clone()
            group_size = self.spec.group_size or 0
            alpha_node = cg.add_tensor(f"{first.placeholder.name}_alpha", alpha.to(weight.device), fqn=f"{fqn}_alpha")
            first_use = min(reads, key=order.__getitem__)             # a transpose view comes before its linear
            val = first.placeholder.meta.get("val")
            with graph.inserting_before(first_use):
                src = first.placeholder
                if in_out:                                            # Conv1D: quantize Wᵀ ([out, in])
                    src = graph.call_function(torch.ops.aten.t.default, (first.placeholder,))
                    if val is not None:
                        src.meta["val"] = val.t()
                fq = graph.call_function(paretoq_fake_quant, (src, alpha_node, self.spec.bits, group_size))
                if val is not None:
                    fq.meta["val"] = val.t() if in_out else val
                out = fq
                if in_out:                                            # ... and read it back as [in, out]
                    out = graph.call_function(torch.ops.aten.t.default, (fq,))
                    if val is not None:
                        out.meta["val"] = val
            note = {"weight": fqn, "alpha": f"{fqn}_alpha", "spec": self.spec.describe(), "bits": self.spec.bits,
                    "group_size": self.spec.group_size}
            if in_out:
                note["layout"] = "in_out"
            fxmeta(fq)["paretoq"] = dict(note)
            for use in group:
                # ``x @ W.T`` (Falcon's FalconLinear): the fake-quant goes under the transpose, W stays [out, in]
                (use.via if use.via is not None else use.node).replace_input_with(use.placeholder, out)
            records[fqn] = {**note, "weight_placeholder": first.placeholder.name, "alpha_placeholder": alpha_node.name,
                            "node": fq.name, "aliases": list(names)}
            n_done += 1
        if n_done == 0 and (n_excluded or skipped):
            raise nothing_quantized(self.name, cg, n_excluded, skipped, self.exclude, self.include)
        stats = {"inserted": n_done, "skipped": len(skipped), "excluded": n_excluded, "spec": self.spec.describe()}
        return PassResult(modified=n_done > 0, stats=stats)

    def ensures(self, cg: CapturedGraph, ctx: PassContext) -> None:
        nodes = {n.name: n for n in fake_quant_nodes(cg)}
        for fqn, rec in ctx.artifacts.get("paretoq_fake_quant", {}).items():
            node = nodes.get(rec["node"])
            if node is None:
                raise PassError(f"{self.name}: the fake-quant node of {fqn} ({rec['node']}) is missing")
            w, a = node.args[0], node.args[1]
            in_out = rec.get("layout") == "in_out"
            if in_out:
                w = w.args[0] if isinstance(w, fx.Node) and w.target is torch.ops.aten.t.default else None
            if w is None or w.name != rec["weight_placeholder"] or a.name != rec["alpha_placeholder"]:
                raise PassError(f"{self.name}: {node.name} does not read {fqn} and its scale")
            weight, alpha = cg.tensors[w.name], cg.tensors[a.name]
            if in_out:
                weight = weight.t()
            n_groups = -(-weight.shape[1] // self.spec.effective_group_size(weight.shape[1]))
            if tuple(alpha.shape) != (weight.shape[0], n_groups):
                raise PassError(f"{self.name}: scale of {fqn} has shape {tuple(alpha.shape)}, "
                                f"expected {(weight.shape[0], n_groups)}")
