"""A model lowered to integer-only arithmetic, as something a user can call, evaluate and generate with.

:class:`IntegerOnlyModel` wraps the lowered :class:`~fxquant.capture.CapturedGraph` (``input_ids`` -> logits or
last hidden state; every layer in integers between the quantize at the embedding and the dequantize at the end).
It answers ``model(input_ids=...)`` with an object that has ``.logits`` (causal LMs) or ``.last_hidden_state``
(encoders), and ``generate(ids, max_new_tokens)`` greedily.

A graph lowered with ``kv_cache`` (``IntegerOnlyConfig(kv_cache=True)``, on in the ``illm-*`` recipes) also takes
the past keys and values — int8 codes with their per-token dyadic scales, as the attention reads them — and
returns them extended: :meth:`IntegerOnlyModel.step` runs only the new tokens, and ``generate`` prefills once and
then decodes one token per call. Every op is causal per token (both DI-MatMul products included), so a step's
logits are bit for bit those of the whole sequence run again (tested). Without a cache every generated token
re-runs the whole prefix.

On the CPU the reference ops allocate many large int64 temporaries; creating the model keeps the C heap's large
blocks in the process (:func:`fxquant.hostmem.keep_heap`, ``FXQUANT_KEEP_HEAP=0`` turns it off), which took
SmolLM2's evaluation from 32.6 to 6.1 s per 512-token window.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from .capture import CapturedGraph
from .hostmem import keep_heap

__all__ = ["IntegerOnlyModel"]


class IntegerOnlyModel(torch.nn.Module):
    """The integer-only graph as a module (no parameters of its own: the integer constants live in the graph)."""

    def __init__(self, cg: CapturedGraph, *, causal: bool = True, config: Any = None):
        super().__init__()
        self.cg = cg
        self.causal = causal
        self.config = config
        self._device = torch.device("cpu")
        self._names = [n.name for n in cg.gm.graph.nodes if n.op == "placeholder"]
        keep_heap()

    @property
    def has_kv_cache(self) -> bool:
        return bool(self.cg.meta.get("kv_cache"))

    def _call(self, feed: dict[str, torch.Tensor]) -> Any:
        t = self.cg.tensors
        return self.cg.gm(*[feed[n] if n in feed else t[n] for n in self._names])

    def run(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The graph on ``input_ids`` (a plain tensor function: ``torch.compile(model.run, backend="fxquant")``);
        a KV-cached graph starts from an empty cache and its extended cache is dropped."""
        if self.has_kv_cache:
            return self.step(input_ids)[0]
        out = self._call({self.cg.user_inputs[0]: input_ids})
        return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out

    def step(self, input_ids: torch.Tensor, cache: dict[str, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the new tokens ``input_ids`` after ``cache`` (``None``: nothing before them); returns their logits
        and the cache extended by them. The cache is the graph's own inputs by name: ``past_length`` and each
        attention's past key/value codes and scales."""
        if not self.has_kv_cache:
            raise TypeError("this integer-only graph was lowered without a KV cache (kv_cache: false)")
        from fxquant.passes.lower_integer_only import empty_kv_cache  # noqa: PLC0415
        spec = self.cg.meta["kv_cache"]
        if cache is None:
            cache = empty_kv_cache(self.cg, int(input_ids.shape[0]), input_ids.device)
        out = self._call({self.cg.user_inputs[0]: input_ids, **cache})
        names = [n for e in spec["entries"] for n in e["inputs"]]
        nout = int(spec["outputs"])
        new = dict(zip(names, out[nout:]))
        new[spec["past_length"]] = cache[spec["past_length"]] + int(input_ids.shape[1])
        return out[0], new

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: Any) -> "IntegerOnlyModel":  # type: ignore[override]
        self._device = torch.device(device)
        for name, t in list(self.cg.tensors.items()):
            self.cg.tensors[name] = t.to(self._device)
        # torch.export bakes the capture device into factory/assert ops (arange(device=cpu), ...): retarget them
        for node in list(self.cg.gm.graph.nodes):
            if node.op == "call_function" and "_assert_tensor_metadata" in str(node.target):
                self.cg.gm.graph.erase_node(node)     # capture-time dtype/device assertions
                continue
            if isinstance(node.kwargs.get("device"), torch.device):
                node.kwargs = {**node.kwargs, "device": self._device}
            if any(isinstance(a, torch.device) for a in node.args):
                node.args = tuple(self._device if isinstance(a, torch.device) else a for a in node.args)
        self.cg.gm.recompile()
        return self

    def parameters(self, recurse: bool = True):  # noqa: D102 - for code that asks for a device
        yield torch.empty(0, device=self._device)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> SimpleNamespace:
        """Logits (causal LM) or last hidden state (encoder). Padded rows of a batch (``attention_mask``) are run one
        by one without their padding, since the graph attends to every token it is given."""
        ids = input_ids.to(self._device)
        if attention_mask is not None and not bool(attention_mask.all()):
            outs = []
            for row, mask in zip(ids, attention_mask.to(torch.bool)):
                h = self.run(row[mask][None])
                full = h.new_zeros((1, row.numel(), *h.shape[2:]))
                full[0, mask] = h[0]
                outs.append(full)
            out = torch.cat(outs)
        else:
            out = self.run(ids)
        return SimpleNamespace(logits=out) if self.causal else SimpleNamespace(last_hidden_state=out)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, eos_token_id: int | None = None,
                 **_: Any) -> torch.Tensor:
        """Greedy decoding: with a KV cache one prefill and then one token per call, else the integer graph re-run
        on the growing sequence."""
        if not self.causal:
            raise TypeError("an encoder cannot generate text")
        ids = input_ids.to(self._device)
        cache = None
        new = ids
        for _ in range(max_new_tokens):
            if self.has_kv_cache:
                logits, cache = self.step(new, cache)
            else:
                logits = self.run(ids)
            new = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, new], dim=1)
            if eos_token_id is not None and bool((new == eos_token_id).all()):
                break
        return ids
