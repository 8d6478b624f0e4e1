"""``split_fp6_weights``: quantize linear weights to a minifloat (FP6 E3M2 by default) and split the codes 4+2.

Contract
--------
* **requires** at least one linear-like op in the graph (the same ops as ``quantize_weights_rtn``).
* **call** quantizes, once per tensor, every parameter that feeds a linear weight operand and is selected by
  ``include`` / ``exclude`` (the RTN pass's glob rules; ``lm_head`` stays float by default) with
  ``fxquant.fpformats.quantize_fp`` (row or group scales; times the scale ratios above 1 that
  ``search_weight_clipping`` left in ``ctx.artifacts["weight_scale_ratios"]``, if any; or exactly the scales
  ``round_weights_gptq`` rounded the weight to, from ``ctx.artifacts["weight_scales"]``), then splits each 6-bit
  code into the contiguous 2-bit plane ``[S E2]`` and 4-bit plane ``[E1 E0 M1 M0]`` of :class:`~fxquant.fpformats.FP6PackedWeight`
  (the order is documented there; it is the order the Triton kernel's wide loads expect). It

  - puts the dequantized weight (a new tensor, the weight's dtype) into ``cg.tensors`` — the model's parameter is
    untouched until ``cg.write_back()``;
  - annotates each consumer: ``fxmeta(node)["quant"] = {"weight": fqn, "format": "fp6_e3m2", "group_size": ...,
    "bits": 6, "packing": "fp6_4+2", "scale_search": ...}`` (plus ``"scale_ratio": "searched"`` where searched
    ratios were applied, ``"rounding": "gptq"`` where GPTQ's scales were and ``"layout": "in_out"`` for a Conv1D weight);
  - stores the packed object in ``ctx.artifacts["quantized_weights"][fqn]``.

  FP5 / FP4 formats are split the same way: their codes are shifted into a 6-bit container (zero mantissa bits
  appended: the same value), so the FP6 kernel serves them too, at 6 bits of storage.
* A weight it cannot handle is never skipped silently: a warning names the layer and the reason and
  ``ctx.artifacts["split_fp6_skipped"]`` records it (``{fqn or node name: reason}``). NaN/Inf weights raise
  :class:`~fxquant.errors.WeightError` instead (a clear error, never a silently wrong model).
* **ensures** every annotated node's weight round-trips: unpacking the planes gives back codes in range, and
  ``cg.tensors`` holds exactly ``packed.dequantize(dtype)``.
"""
from __future__ import annotations

import logging
import re
from typing import Sequence

import torch

from fxquant.capture import CapturedGraph, fxmeta
from fxquant.errors import PassError, QuantSpecError
from fxquant.fpformats import (FP6PackedWeight, FPQuantSpec, container_format, pack_fp6, pack_fp6_planes,
                               quantize_fp, unpack_fp6_planes)
from fxquant.passes.quantize_weights_rtn import LINEAR_OPS, matches, nothing_quantized, resolve_weight
from fxquant.pipeline import Pass, PassContext, PassResult, replace_weight

log = logging.getLogger("fxquant")

__all__ = ["SplitFP6Weights", "pack_fp6_planes", "unpack_fp6_planes", "FP6_PACKING"]

#: the annotation's ``packing`` value for this layout
FP6_PACKING = "fp6_4+2"


def _storage_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's memory: tied parameters share it (one weight, quantized once)."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


class SplitFP6Weights(Pass):
    """Minifloat weight quantization with the 4+2 bit-plane split (ZeroQuant(4+2) / FP6-LLM)."""

    name = "split_fp6_weights"
    description = "FP6 (E3M2 by default) weights with row/group scales, codes split into 2-bit and 4-bit planes"

    def __init__(self, spec: FPQuantSpec | None = None, exclude: Sequence[str] = ("lm_head",),
                 include: Sequence[str] | None = None):
        spec = FPQuantSpec() if spec is None else spec
        if not isinstance(spec, FPQuantSpec):
            raise QuantSpecError(f"SplitFP6Weights needs an FPQuantSpec, got {type(spec).__name__}",
                                 "build one with fxquant.fpformats.FPQuantSpec(format='e3m2', group_size=None)")
        container_format(spec.format)  # refuses formats that do not fit the 6-bit planes
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
        gran = f"g{self.spec.group_size}" if self.spec.group_size else "per-channel"
        return f"<pass {self.name} {self.spec.label} {gran} exclude={list(self.exclude)}>"

    def selected(self, fqn: str) -> bool:
        if self.include is not None and not any(matches(fqn, p) for p in self.include):
            return False
        return not any(matches(fqn, p) for p in self.exclude)

    # ---- contract ------------------------------------------------------------------------------
    def requires(self, cg: CapturedGraph, ctx: PassContext) -> None:
        if not any(n.op == "call_function" and n.target in LINEAR_OPS for n in cg.gm.graph.nodes):
            raise PassError(f"{self.name}: the graph of {cg.model_class or 'the model'} has no linear layer "
                            "(aten.linear/addmm/mm/matmul)",
                            "FP6 splitting quantizes linear weights only; check that the model was captured whole")

    def call(self, cg: CapturedGraph, ctx: PassContext) -> PassResult:
        graph = cg.gm.graph
        stored: dict = ctx.artifacts.setdefault("quantized_weights", {})
        skipped: dict[str, str] = ctx.artifacts.setdefault("split_fp6_skipped", {})

        def skip(key: str, reason: str) -> None:
            log.warning("%s: not quantizing %s: %s", self.name, key, reason)
            skipped[key] = reason

        # 1. every linear-like node and the parameter behind its weight operand
        uses = []
        for node in graph.nodes:
            if node.op != "call_function" or node.target not in LINEAR_OPS:
                continue
            found = resolve_weight(cg, node)
            if found is None:  # activation @ activation: no weight
                continue
            if isinstance(found, str):
                skip(node.name, f"{node.target} node {node.name}: {found}")
            else:
                uses.append(found)

        # 2. tied parameters (one placeholder or several over one storage) are one weight
        aliases: dict[tuple, list[str]] = {}
        for ph_name, tensor in cg.tensors.items():
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 2:
                aliases.setdefault(_storage_key(tensor), []).append(ph_name)
        by_key: dict[tuple, list] = {}
        for use in uses:
            by_key.setdefault(_storage_key(cg.tensors[use.placeholder.name]), []).append(use)

        placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
        n_done = n_excluded = 0
        for key, group in by_key.items():
            first = group[0]
            fqn = cg.fqn_of(first.placeholder)
            names = aliases.get(key, [first.placeholder.name])
            fqns = [cg.fqn[n] for n in names if n in cg.fqn]
            if not all(self.selected(f) for f in fqns):
                n_excluded += 1
                continue
            if len({u.in_out for u in group}) > 1:
                skip(fqn, "it is read both as [out, in] and as [in, out] by different layers")
                continue
            reads = {u.node for u in group} | {u.via for u in group if u.via is not None}
            other = [u for n in names if n in placeholders for u in placeholders[n].users if u not in reads]
            if other:
                skip(fqn, "it is also read by " + ", ".join(f"{u.name} ({u.target})" for u in other[:3])
                     + "; quantizing it would change that use too — untie the weights to quantize it")
                continue
            original = cg.tensors[first.placeholder.name]
            weight = original.t() if first.in_out else original
            # scale ratios above 1 that search_weight_clipping chose from calibration activations (teq-fp6)
            ratio = ctx.artifacts.get("weight_scale_ratios", {}).get(fqn)
            # the scales round_weights_gptq rounded to (the ratios, if any, are in them); its weights lie on that grid
            fixed = ctx.artifacts.get("weight_scales", {}).get(fqn)
            if fixed is not None:
                packed = pack_fp6(quantize_fp(weight, self.spec, name=fqn, scale=fixed["scale"]))
            else:
                packed = pack_fp6(quantize_fp(weight, self.spec, name=fqn, scale_ratio=ratio))  # WeightError on NaN/Inf
            deq = packed.dequantize(original.dtype)
            replace_weight(cg, ctx, names, (deq.t() if first.in_out else deq).contiguous())
            del deq
            stored[fqn] = packed
            note = {"weight": fqn, "format": self.spec.label, "group_size": self.spec.group_size,
                    "bits": self.spec.format.bits, "packing": FP6_PACKING, "scale_search": self.spec.scale_search}
            if ratio is not None:
                note["scale_ratio"] = "searched"
            if fixed is not None:
                note["rounding"] = "gptq"
            if first.in_out:
                note["layout"] = "in_out"
            for use in group:
                fxmeta(use.node)["quant"] = dict(note)
            n_done += 1

        if n_done == 0 and (n_excluded or skipped):
            raise nothing_quantized(self.name, cg, n_excluded, skipped, self.exclude, self.include)
        stats = {"quantized": n_done, "skipped": len(skipped), "excluded": n_excluded, "format": self.spec.label}
        # the graph is unchanged: the tensors behind it and the annotations are what changed
        return PassResult(modified=n_done > 0, stats=stats)

    def ensures(self, cg: CapturedGraph, ctx: PassContext) -> None:
        stored = ctx.artifacts.get("quantized_weights", {})
        for node in cg.gm.graph.nodes:
            note = node.meta.get("fxquant", {}).get("quant")
            if not note or note.get("packing") != FP6_PACKING:
                continue
            fqn = note["weight"]
            packed = stored.get(fqn)
            if not isinstance(packed, FP6PackedWeight):
                raise PassError(f"{self.name}: node {node.name} is annotated with {fqn} but no FP6PackedWeight was "
                                "recorded", "a later pass replaced ctx.artifacts['quantized_weights']")
            codes = unpack_fp6_planes(packed.hi2, packed.lo4, packed.in_features)
            if int(codes.max()) >= 64 or packed.format.bits != note["bits"]:
                raise PassError(f"{self.name}: {fqn}: stored codes/bits do not match the annotation {note}")
            use = resolve_weight(cg, node)
            if isinstance(use, str) or use is None:
                raise PassError(f"{self.name}: annotated node {node.name} no longer reads a parameter: {use}")
            current = cg.tensors[use.placeholder.name]
            expected = packed.dequantize(current.dtype)
            if use.in_out:
                expected = expected.t()
            if current.shape != expected.shape or not torch.equal(current, expected):
                raise PassError(f"{self.name}: cg.tensors[{use.placeholder.name!r}] is not the dequantized {fqn}",
                                "the pass must store packed.dequantize(dtype) in cg.tensors")
