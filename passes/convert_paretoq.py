"""``convert_fake_quant``: replace each ParetoQ fake-quant node by its quantized weight.

Contract
--------
* **requires** fake-quant nodes from ``insert_fake_quant`` (trained or not).
* **call** — for each node ``paretoq_fake_quant(W, alpha, bits, group)``: quantizes ``W`` with its (clamped)
  scales into a :class:`fxquant.paretoq.ParetoQWeight`, puts the exactly dequantized weight into ``cg.tensors``
  (for every alias of ``W``), rewires the linears to read ``W`` again, and removes the node and the scale
  placeholder. Each linear gets the same annotation the RTN pass writes,
  ``fxmeta(node)["quant"] = {"weight": fqn, "spec": "pq-w2", "bits": 2, "group_size": ..., "method": "paretoq"}``,
  and ``ctx.artifacts["quantized_weights"][fqn]`` holds the ParetoQWeight — so ``lower_quantized_linears`` and the
  compile backend lower it to the registry's packed format (:mod:`fxquant.backends.lowbit`) with no special case.
* **ensures** no fake-quant node is left, and ``cg.tensors`` holds exactly ``qw.dequantize(dtype)`` for every
  annotated linear — the fake-quant output, bit for bit.
"""
from __future__ import annotations

import torch

from fxquant.capture import CapturedGraph, fxmeta
from fxquant.errors import PassError
from fxquant.graphview import as_linear
from fxquant.paretoq import ParetoQSpec, ParetoQWeight, quantize_paretoq
from fxquant.passes.insert_paretoq_fake_quant import fake_quant_nodes
from fxquant.pipeline import Pass, PassContext, PassResult

__all__ = ["ConvertParetoQ"]


def _is_transpose(node: object) -> bool:
    from fxquant.passes.quantize_weights_rtn import _TRANSPOSES
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _TRANSPOSES


class ConvertParetoQ(Pass):
    """Fake-quant nodes -> quantized weights (codes + scales), ready for packing."""

    name = "convert_fake_quant"
    description = "replace ParetoQ fake-quant nodes by the quantized weights they compute (codes + scales recorded)"

    def requires(self, cg: CapturedGraph, ctx: PassContext) -> None:
        if not fake_quant_nodes(cg):
            raise PassError(f"{self.name}: the graph has no ParetoQ fake-quant node", "run insert_fake_quant first")

    def call(self, cg: CapturedGraph, ctx: PassContext) -> PassResult:
        graph = cg.gm.graph
        table: dict = ctx.artifacts.setdefault("quantized_weights", {})
        n = 0
        for node in fake_quant_nodes(cg):
            w_node, a_node, bits, group = node.args
            info = fxmeta(node).get("paretoq", {})
            in_out = info.get("layout") == "in_out"
            wt_node = None
            if in_out:          # t(fake_quant(t(W))): the quantizer saw Wᵀ; W is stored [in, out]
                wt_node, w_node = w_node, w_node.args[0]
            fqn = info.get("weight") or cg.fqn_of(w_node) or w_node.name
            spec = ParetoQSpec(bits, group or None)
            weight = cg.tensors[w_node.name]
            qw = quantize_paretoq(weight.t() if in_out else weight, cg.tensors[a_node.name], spec, name=fqn)
            deq = qw.dequantize(weight.dtype)
            deq = deq.t().contiguous() if in_out else deq
            aliases = ctx.artifacts.get("paretoq_fake_quant", {}).get(fqn, {}).get("aliases", [w_node.name])
            for alias in aliases:
                cg.tensors[alias] = deq
            if in_out:
                back = list(node.users)                     # the transposes back to [in, out]
                users = [u for b in back for u in b.users]
                for b in back:
                    b.replace_all_uses_with(w_node)
                    graph.erase_node(b)
                graph.erase_node(node)
                graph.erase_node(wt_node)
            else:
                users = list(node.users)
                node.replace_all_uses_with(w_node)
                graph.erase_node(node)
            if not a_node.users:
                graph.erase_node(a_node)
                cg.tensors.pop(a_node.name, None)
                cg.fqn.pop(a_node.name, None)
            note = {"weight": fqn, "spec": spec.describe(), "bits": spec.bits, "group_size": qw.group_size,
                    "method": "paretoq"}
            if in_out:
                note["layout"] = "in_out"
            for user in users:
                # a linear written x @ W.T reads the weight through its transpose: annotate the product
                targets = list(user.users) if _is_transpose(user) and not in_out else [user]
                for t in targets:
                    fxmeta(t)["quant"] = dict(note)
            table[fqn] = qw
            n += 1
        return PassResult(modified=n > 0, stats={"converted": n})

    def ensures(self, cg: CapturedGraph, ctx: PassContext) -> None:
        if fake_quant_nodes(cg):
            raise PassError(f"{self.name}: fake-quant nodes are left in the graph")
        table = ctx.artifacts.get("quantized_weights", {})
        for node in cg.gm.graph.nodes:
            note = node.meta.get("fxquant", {}).get("quant")
            if not note or note.get("method") != "paretoq":
                continue
            qw = table.get(note["weight"])
            if not isinstance(qw, ParetoQWeight) or qw.spec.bits != note["bits"]:
                raise PassError(f"{self.name}: {note['weight']}: no ParetoQWeight of {note['bits']} bits recorded")
            lin = as_linear(node, lambda n: n.op == "placeholder" and n.name in cg.tensors)
            if lin is None:
                raise PassError(f"{self.name}: {node.name} is annotated as a ParetoQ linear but reads no weight")
            current = cg.tensors[lin.weight.name]
            expected = qw.dequantize(current.dtype)
            if lin.layout == "in_out":
                expected = expected.t()
            if current.shape != expected.shape or not torch.equal(current, expected):
                raise PassError(f"{self.name}: cg.tensors of {note['weight']} is not its dequantized weight",
                                "the pass must store qw.dequantize(dtype)")
