"""``quantize_weights_rtn``: round-to-nearest integer quantization of every linear weight.

Contract
--------
* **requires** at least one linear-like op (``aten.linear``, ``aten.addmm``, ``aten.mm``, ``aten.matmul``)
  in the graph.
* **call** quantizes, once per tensor, every parameter that feeds the weight operand of such an op and is
  selected by ``include`` / ``exclude`` (with the scales and zero points computed from its range, or, where
  ``round_weights_gptq`` ran before, exactly the ones it rounded the weight to: ``ctx.artifacts["weight_scales"]``,
  annotated ``"rounding": "gptq"``); puts the dequantized weight (a new tensor, the weight's own dtype) into
  ``cg.tensors`` (the model's parameter is untouched until ``cg.write_back()``); annotates each consumer node
  with ``fxmeta(node)["quant"] = {"weight", "spec", "bits", "group_size", ...}``; and stores the
  :class:`~fxquant.quant.QuantizedWeight` (always in ``[out, in]`` layout) in
  ``ctx.artifacts["quantized_weights"][fqn]``.
* A weight it cannot handle is never skipped silently: it is logged as a warning naming the layer and the reason
  and recorded in ``ctx.artifacts["rtn_skipped"]`` (``{fqn or node name: reason}``).
* **ensures** for every annotated node: the stored codes lie in the configured range, the stored bit width is
  the configured one, and ``cg.tensors`` holds exactly the dequantized weight.

Weight layouts
--------------
``aten.linear(x, W)`` has ``W[out, in]``. GPT-2's ``Conv1D`` exports as ``aten.addmm(b, x, W)`` with
``W[in, out]``; ``aten.mm(x, W)`` / ``aten.matmul(x, W)`` likewise. Those are quantized as ``Wᵀ`` so that groups
still run along the *input* dimension, and the dequantized tensor is transposed back. ``addmm``/``mm`` reading
``t(W)`` / ``transpose(W, 0, 1)`` / ``permute(W, [1, 0])`` of an ``[out, in]`` parameter are handled too.

Tied weights
------------
torch.export may give tied parameters one placeholder (used by several linears) or several placeholders holding
the same tensor (GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``). Either way the tensor is quantized
once, and only when *every* use of it is a linear-like weight operand: an lm_head tied to the token embedding
would otherwise quantize the embedding table too, so it is reported as skipped (untie it first to quantize it).

Selecting weights
-----------------
``include`` and ``exclude`` are glob patterns (:func:`fnmatch.fnmatchcase`, case-sensitive; ``*``, ``?``,
``[seq]``), not regular expressions; write ``re:<regex>`` for a regular expression (``re.search``). A glob
matches a parameter if it matches the whole FQN (``model.layers.0.mlp.up_proj.weight``) or any dotted suffix of
it or of its module name, so ``lm_head``, ``up_proj``, ``mlp.*`` and ``layers.0.*`` all do what they say.
A weight is quantized if it matches some ``include`` pattern (all weights when ``include`` is None) and no
``exclude`` pattern. The default keeps ``lm_head`` in float, as Neural Compressor and GPTQ do; pass
``exclude=()`` to quantize it.
"""
from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import fx

from fxquant.capture import CapturedGraph, fxmeta
from fxquant.errors import PassError, QuantSpecError
from fxquant.pipeline import Pass, PassContext, PassResult, replace_weight
from fxquant.quant import QuantizedWeight, QuantSpec, quantize_weight

log = logging.getLogger("fxquant")

aten = torch.ops.aten

#: linear-like ops -> index of their weight operand; True where the weight is stored [in, out]
LINEAR_OPS: dict = {
    aten.linear.default: (1, False),   # linear(x, W[out, in], bias)
    aten.addmm.default: (2, True),     # addmm(bias, x, W[in, out])  (GPT-2 Conv1D)
    aten.mm.default: (1, True),        # mm(x, W[in, out])
    aten.matmul.default: (1, True),    # matmul(x, W[in, out])
}

#: views that turn an [out, in] parameter into the [in, out] operand of addmm/mm
_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}


def matches(fqn: str, pattern: str) -> bool:
    """Whether ``pattern`` (a glob, or ``re:<regex>``) selects the parameter ``fqn`` (see the module docstring)."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], fqn) is not None
    module = fqn.rsplit(".", 1)[0] if "." in fqn else fqn
    for name in (fqn, module):
        parts = name.split(".")
        if any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts))):
            return True
    return False


@dataclass
class _WeightUse:
    """How a linear-like node reads its weight: the parameter placeholder and whether it is [in, out]."""

    node: fx.Node          # the linear/addmm/mm node
    placeholder: fx.Node   # the parameter placeholder behind the weight operand
    via: fx.Node | None    # the transpose view between them, if any
    in_out: bool           # True: the parameter is stored [in, out] (Conv1D); quantize its transpose


def _is_plain_transpose(node: fx.Node) -> bool:
    if node.target is aten.transpose.int:
        dims = {d % 2 for d in node.args[1:3]} if all(isinstance(d, int) for d in node.args[1:3]) else set()
        return dims == {0, 1}
    if node.target is aten.permute.default:
        return list(node.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0])
    return True  # t / numpy_T of a 2-D tensor


def _is_param(cg: CapturedGraph, node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "placeholder" and node.name in cg.tensors


def resolve_weight(cg: CapturedGraph, node: fx.Node) -> _WeightUse | str | None:
    """The parameter behind ``node``'s weight operand, or a sentence saying why it cannot be quantized.

    None for an ``mm``/``addmm``/``matmul`` that multiplies two activations (attention scores, ...): it has no
    weight, so there is nothing to report. A ``linear`` always has one.
    """
    index, in_out = LINEAR_OPS[node.target]
    if len(node.args) <= index or not isinstance(node.args[index], fx.Node):
        return "its weight operand is not a graph value"
    arg: fx.Node = node.args[index]
    if node.target is not aten.linear.default and not _is_param(cg, arg):
        # activation @ activation, unless the operand is computed right from a parameter (then say so)
        if arg.op == "call_function" and any(_is_param(cg, a) for a in arg.all_input_nodes):
            if not (arg.target in _TRANSPOSES and len(arg.all_input_nodes) == 1):
                return f"its weight is {arg.target} of a parameter, which RTN does not follow"
        else:
            return None
    via = None
    if (arg.op == "call_function" and arg.target in _TRANSPOSES and in_out and arg.args
            and isinstance(arg.args[0], fx.Node) and arg.args[0].op == "placeholder"):
        if not _is_plain_transpose(arg):
            return f"its weight is a permutation ({arg.target}) of a parameter that is not a 2-D transpose"
        via, arg, in_out = arg, arg.args[0], False
    if arg.op != "placeholder" or arg.name in cg.user_inputs:
        what = f"the output of {arg.target}" if arg.op == "call_function" else f"the input {arg.name!r}"
        return f"its weight is {what}, not a parameter (computed in the graph; quantize its source instead)"
    if cg.fqn_of(arg) is None:
        return f"its weight {arg.name!r} is a lifted constant, not a named parameter"
    tensor = cg.tensor_of(arg)
    if tensor is None:
        return f"its weight placeholder {arg.name!r} has no tensor"
    if tensor.dim() != 2:
        return f"its weight has shape {tuple(tensor.shape)}, not 2-D"
    if not tensor.is_floating_point():
        return f"its weight is {tensor.dtype}, not floating point (already quantized?)"
    return _WeightUse(node, arg, via, in_out)


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _describe_use(user: fx.Node) -> str:
    target = user.target if user.op == "call_function" else user.op
    return f"{user.name} ({target})"


def nothing_quantized(pass_name: str, cg: CapturedGraph, n_excluded: int, skipped: dict[str, str],
                      exclude: Sequence[str], include: Sequence[str] | None) -> PassError:
    """The error of a weight pass that found linears but quantized none of them: a "quantized" model that is still
    entirely float is a silently wrong result, so it is refused, saying which patterns or reasons left each out."""
    what = f"the graph of {cg.model_class or 'the model'}"
    parts = []
    if n_excluded:
        pats = f"exclude={list(exclude)}" + (f", include={list(include)}" if include is not None else "")
        parts.append(f"{n_excluded} excluded by the recipe's patterns ({pats})")
    if skipped:
        first = next(iter(skipped.items()))
        parts.append(f"{len(skipped)} skipped (e.g. {first[0]}: {first[1]})")
    return PassError(f"{pass_name}: no linear weight of {what} was quantized: " + ("; ".join(parts) or "none found"),
                     "narrow the recipe's exclude (and include) patterns so that they leave some linear weights, "
                     "e.g. exclude: [lm_head*]")


class QuantizeWeightsRTN(Pass):
    """Round-to-nearest integer weight quantization (Neural Compressor's RTN convention, see fxquant.quant)."""

    name = "quantize_weights_rtn"
    description = "round-to-nearest integer weight quantization of every linear (lm_head stays float by default)"

    def __init__(self, spec: QuantSpec, exclude: Sequence[str] = ("lm_head",),
                 include: Sequence[str] | None = None):
        if not isinstance(spec, QuantSpec):
            raise QuantSpecError(f"QuantizeWeightsRTN needs a QuantSpec, got {type(spec).__name__}")
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

    def __repr__(self) -> str:
        return f"<pass {self.name} {self.spec.describe()} exclude={list(self.exclude)}>"

    def selected(self, fqn: str) -> bool:
        if self.include is not None and not any(matches(fqn, p) for p in self.include):
            return False
        return not any(matches(fqn, p) for p in self.exclude)

    # ---- contract ------------------------------------------------------------------------------
    def requires(self, cg: CapturedGraph, ctx: PassContext) -> None:
        if not any(n.op == "call_function" and n.target in LINEAR_OPS for n in cg.gm.graph.nodes):
            raise PassError(f"{self.name}: the graph of {cg.model_class or 'the model'} has no linear layer "
                            "(aten.linear/addmm/mm/matmul)",
                            "RTN quantizes linear weights only; check that the model was captured whole")

    def call(self, cg: CapturedGraph, ctx: PassContext) -> PassResult:
        graph = cg.gm.graph
        quantized: dict[str, QuantizedWeight] = ctx.artifacts.setdefault("quantized_weights", {})
        skipped: dict[str, str] = ctx.artifacts.setdefault("rtn_skipped", {})

        n_skipped = 0

        def skip(key: str, reason: str) -> None:
            nonlocal n_skipped
            log.warning("%s: not quantizing %s: %s", self.name, key, reason)
            skipped[key] = reason
            n_skipped += 1

        # 1. every linear-like node and the parameter behind its weight
        uses: list[_WeightUse] = []
        for node in graph.nodes:
            if node.op != "call_function" or node.target not in LINEAR_OPS:
                continue
            found = resolve_weight(cg, node)
            if found is None:
                continue
            if isinstance(found, str):
                skip(node.name, f"{node.target} node {node.name}: {found}")
            else:
                uses.append(found)

        # 2. group by tensor storage: tied parameters (one placeholder or several) are one weight
        aliases: dict[tuple, list[str]] = {}
        for ph_name, tensor in cg.tensors.items():
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 2:
                aliases.setdefault(_storage_key(tensor), []).append(ph_name)
        by_key: dict[tuple, list[_WeightUse]] = {}
        for use in uses:
            by_key.setdefault(_storage_key(cg.tensors[use.placeholder.name]), []).append(use)

        placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
        n_quantized = n_excluded = 0
        for key, group in by_key.items():
            first = group[0]
            fqn = cg.fqn_of(first.placeholder)
            names = aliases.get(key, [first.placeholder.name])
            fqns = [cg.fqn[n] for n in names if n in cg.fqn]
            if not all(self.selected(f) for f in fqns):  # a tied weight stays float if any of its names is excluded
                n_excluded += 1
                continue
            layouts = {u.in_out for u in group}
            if len(layouts) > 1:
                skip(fqn, "it is read both as [out, in] and as [in, out] by different layers")
                continue
            weight_reads = {u.node for u in group} | {u.via for u in group if u.via is not None}
            other = [u for n in names if n in placeholders for u in placeholders[n].users
                     if u not in weight_reads]
            if other:
                tied = ", ".join(f for f in fqns if f != fqn)
                skip(fqn, ("it is also read by " + ", ".join(_describe_use(u) for u in other[:3])
                           + (f" (tied with {tied})" if tied else "")
                           + "; quantizing it would change that use too — untie the weights to quantize it"))
                continue
            original = cg.tensors[first.placeholder.name]
            # NaN/Inf or otherwise unquantizable weights raise WeightError: a clear error, not a skipped layer
            # the scales round_weights_gptq rounded to, if it ran: its weights lie on that grid
            fixed = ctx.artifacts.get("weight_scales", {}).get(fqn)
            qw = quantize_weight(original.t() if first.in_out else original, self.spec, name=fqn,
                                 **({"scale": fixed["scale"], "zero": fixed["zero"]} if fixed is not None else {}))
            deq = qw.dequantize(original.dtype)
            replace_weight(cg, ctx, names, (deq.t() if first.in_out else deq).contiguous())
            del deq
            quantized[fqn] = qw
            note = {"weight": fqn, "spec": self.spec.describe(), "bits": self.spec.bits,
                    "group_size": qw.group_size}
            if fixed is not None:
                note["rounding"] = "gptq"
            if first.in_out:
                note["layout"] = "in_out"
            for use in group:
                fxmeta(use.node)["quant"] = dict(note)
            n_quantized += 1

        if n_quantized == 0 and (n_excluded or n_skipped):
            raise nothing_quantized(self.name, cg, n_excluded, {k: skipped[k] for k in list(skipped)[-n_skipped:]}
                                    if n_skipped else {}, self.exclude, self.include)
        stats = {"quantized": n_quantized, "skipped": n_skipped, "excluded": n_excluded}
        # the graph is unchanged; the tensors behind it and the annotations are what changed
        return PassResult(modified=n_quantized > 0, stats=stats)

    def ensures(self, cg: CapturedGraph, ctx: PassContext) -> None:
        quantized: dict[str, QuantizedWeight] = ctx.artifacts.get("quantized_weights", {})
        for node in cg.gm.graph.nodes:
            note = node.meta.get("fxquant", {}).get("quant")
            if not note or note.get("spec") != self.spec.describe():
                continue
            fqn = note["weight"]
            qw = quantized.get(fqn)
            if qw is None:
                raise PassError(f"{self.name}: node {node.name} is annotated with {fqn} but no quantized weight "
                                "was recorded", "a later pass dropped ctx.artifacts['quantized_weights']")
            if qw.spec.bits != self.spec.bits or note["bits"] != self.spec.bits:
                raise PassError(f"{self.name}: {fqn} stored at {qw.spec.bits} bits (annotated {note['bits']}), "
                                f"configured {self.spec.bits}", "the stored width must be the configured width")
            problem = qw.code_range_error()
            if problem:
                raise PassError(f"{self.name}: {fqn}: {problem}", "the quantizer produced out-of-range codes")
            use = resolve_weight(cg, node)
            if not isinstance(use, _WeightUse):
                raise PassError(f"{self.name}: annotated node {node.name} no longer reads a parameter: {use}")
            current = cg.tensors[use.placeholder.name]
            expected = qw.dequantize(current.dtype)
            if use.in_out:
                expected = expected.t()
            if current.shape != expected.shape or not torch.equal(current, expected):
                raise PassError(f"{self.name}: cg.tensors[{use.placeholder.name!r}] is not the dequantized {fqn}",
                                "the pass must store qw.dequantize(dtype) in cg.tensors")
