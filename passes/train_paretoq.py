"""``train_qat``: quantization-aware training of the ParetoQ fake-quant model on calibration text.

Contract
--------
* **requires** ``insert_fake_quant`` ran (``ctx.artifacts["paretoq_fake_quant"]``), the captured graph still has
  its eager model (``cg.model``), and ``ctx.calibration`` holds token ids (a 1-D tensor or a list of ints) or text
  (tokenized with ``ctx.options["tokenizer"]``, else the model's own tokenizer when it can be found).
* **call** trains in eager mode, where autograd, the KV cache and the user's dtype behave as the model's
  authors intended: :func:`fxquant.paretoq.prepare_qat` swaps the graph's selected linears for ``QATLinear``
  (starting from the graph's scales), :func:`fxquant.qat.train_qat` runs the paper's optimizer for
  ``recipe.options["steps"]`` steps (default 200; ``lr``, ``scale_lr``, ``batch_size``, ``seq_len``, ``seed``
  also read from the options), then the linears are swapped back (same Parameter objects) and the trained weights
  and scales are put into ``cg.tensors``. The graph is unchanged: it still computes the fake-quant model, now with trained tensors.
  The loss history is ``ctx.artifacts["qat_history"]``.
* **ensures** every scale placeholder holds a finite, positive tensor of its original shape.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from fxquant.calibration import calibration_ids
from fxquant.capture import CapturedGraph
from fxquant.errors import DataError, PassError
from fxquant.paretoq import ParetoQSpec, QATLinear, prepare_qat, qat_modules
from fxquant.pipeline import Pass, PassContext, PassResult

__all__ = ["TrainParetoQ", "calibration_ids_for"]

log = logging.getLogger("fxquant")


def calibration_ids_for(calibration: Any, model: torch.nn.Module, tokenizer: Any = None) -> torch.Tensor:
    """Token ids (1-D long tensor) from ids or text (:func:`fxquant.calibration.calibration_ids`)."""
    return calibration_ids(calibration, model, tokenizer)


class TrainParetoQ(Pass):
    """Train latent weights and scales of the fake-quant model with the paper's recipe (eager-mode QAT)."""

    name = "train_qat"
    description = "ParetoQ QAT: AdamW (no decay), cosine to zero, on calibration windows; scales and weights train"

    def requires(self, cg: CapturedGraph, ctx: PassContext) -> None:
        if not ctx.artifacts.get("paretoq_fake_quant"):
            raise PassError(f"{self.name}: no ParetoQ fake-quant node to train", "run insert_fake_quant first")
        if cg.model is None:
            raise PassError(f"{self.name}: the captured graph has no eager model to train",
                            "capture the model with fxquant.capture(model) (it keeps a reference)")
        if ctx.calibration is None:
            raise DataError("ParetoQ QAT needs calibration data",
                            "pass calibration=<text or token ids> (the CLI uses WikiText-2 validation)")

    def call(self, cg: CapturedGraph, ctx: PassContext) -> PassResult:
        from fxquant.qat import QATConfig, train_qat

        records = ctx.artifacts["paretoq_fake_quant"]
        first = next(iter(records.values()))
        spec = ParetoQSpec(first["bits"], first["group_size"])
        options = dict(getattr(ctx.recipe, "options", {}) or {})
        model = cg.model
        ids = calibration_ids_for(ctx.calibration, model, ctx.options.get("tokenizer") or options.get("tokenizer"))
        alphas = {fqn: cg.tensors[rec["alpha_placeholder"]] for fqn, rec in records.items()}
        modules = [fqn[: -len(".weight")] for fqn in records]
        was_training = model.training
        # the graph shows each selected module computing x @ Wᵀ (+ b): nn.Linear subclasses (FalconLinear) too
        prepare_qat(model, spec, include=modules, exclude=(), alphas=alphas, linear_subclasses=True)
        try:
            prepared = qat_modules(model)
            if set(prepared) != set(modules):
                raise PassError(f"{self.name}: the graph's quantized weights and the model's nn.Linear modules differ "
                                f"({sorted(set(modules) ^ set(prepared))[:3]})",
                                "ParetoQ QAT trains torch.nn.Linear modules; other linear-like modules are not supported")
            config = QATConfig(steps=int(options.get("steps", 200)), lr=options.get("lr"),
                               scale_lr=options.get("scale_lr"),
                               batch_size=int(options.get("batch_size", 4)), seq_len=int(options.get("seq_len", 256)),
                               seed=int(options.get("seed", 0)), progress=bool(options.get("progress", False)),
                               save_every=int(options.get("save_every", 0) or 0),
                               keep_last=int(options.get("keep_last", 0) or 0))
            history = train_qat(model, ids, config, bits=spec.bits, checkpoint_dir=options.get("checkpoint_dir"),
                                resume=options.get("resume"))
            ctx.artifacts["qat_history"] = history
            for fqn, rec in records.items():
                cg.tensors[rec["alpha_placeholder"]] = prepared[fqn[: -len(".weight")]].weight_alpha.detach().clone()
        finally:
            for name, m in qat_modules(model).items():
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, m.to_linear())
            del model._fxquant_paretoq
            model.train(was_training)
        # every trained parameter (weights, norms, embeddings) replaces the graph's tensor of the same name
        named = dict(model.named_parameters(remove_duplicate=False))
        refreshed = 0
        for ph, fqn in cg.fqn.items():
            p = named.get(fqn)
            if p is not None and cg.tensors.get(ph) is not p:
                cg.tensors[ph] = p.detach()
                refreshed += 1
        losses = history.losses
        return PassResult(modified=True, stats={"steps": len(losses), "loss_first": round(losses[0], 4),
                                                "loss_last": round(losses[-1], 4), "refreshed": refreshed})

    def ensures(self, cg: CapturedGraph, ctx: PassContext) -> None:
        for fqn, rec in ctx.artifacts.get("paretoq_fake_quant", {}).items():
            alpha = cg.tensors.get(rec["alpha_placeholder"])
            if alpha is None or not bool(torch.isfinite(alpha).all()):
                raise PassError(f"{self.name}: the trained scale of {fqn} is missing or not finite",
                                "lower the learning rate (recipe option lr)")
        if any(isinstance(m, QATLinear) for m in (cg.model.modules() if cg.model is not None else ())):
            raise PassError(f"{self.name}: QATLinear modules were left in the model")
