"""The public entry points: ``quantize`` a model with a recipe, ``evaluate`` it, ``save`` it."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .capture import CapturedGraph, capture
from .errors import RecipeError
from .evaluate import weight_bytes
from .pipeline import PassContext, PassRecord
from .recipes import Recipe, get_recipe

log = logging.getLogger("fxquant")


@dataclass
class QuantizeResult:
    """What :func:`quantize` returns: the model (quantized in place) and what the pipeline did."""

    model: torch.nn.Module
    recipe: Recipe
    captured: CapturedGraph | None
    records: list[PassRecord] = field(default_factory=list)
    #: parameter FQN -> quantized weight object (codes, scales, zero points)
    quantized: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def weight_bytes(self) -> int:
        return weight_bytes(self.model, self.quantized)

    @property
    def structure(self):
        return self.artifacts.get("structure")

    @property
    def integer_model(self):
        """The integer-only model (:class:`~fxquant.intmodel.IntegerOnlyModel`) when the recipe lowered the graph
        to integers (``illm-*``), else None. ``model`` keeps the float model with the rounded weights."""
        if self.artifacts.get("_integer_model") is not None:
            return self.artifacts["_integer_model"]
        if "integer_only" not in self.artifacts or self.captured is None:
            return None
        if "_integer_model" not in self.artifacts:
            from .intmodel import IntegerOnlyModel
            config = getattr(self.model, "config", None)
            causal = hasattr(self.model, "lm_head") or type(self.model).__name__.endswith("ForCausalLM")
            self.artifacts["_integer_model"] = IntegerOnlyModel(self.captured, causal=causal, config=config)
        return self.artifacts["_integer_model"]

    @property
    def eval_model(self) -> torch.nn.Module:
        """What to evaluate: the integer-only model if there is one, else the (fake-)quantized model."""
        return self.integer_model or self.model

    def save(self, out: str, tokenizer: Any = None, *, overwrite: bool = False):
        """Write the quantized model as an fxquant checkpoint folder (safetensors + JSON; see
        :mod:`fxquant.checkpoint`); ``fxquant.load(out)`` restores it bit for bit."""
        from .checkpoint import save_quantized
        return save_quantized(self.model, tokenizer, out, recipe=self.recipe, quantized=self.quantized,
                              overwrite=overwrite)


def quantize(model: torch.nn.Module, recipe: str | Recipe | dict = "rtn-w4g128", calibration: Any = None, *,
             verify: bool | None = None, debug_dir: str | None = None, capture_model: bool = True) -> QuantizeResult:
    """Quantize ``model`` in place with ``recipe`` and return a :class:`QuantizeResult`.

    The model is captured to an FX graph, the recipe's passes run on the graph (analysis, then the
    method's rewrites), and the rewritten weights are written back into the model, which stays a normal
    ``nn.Module`` (a Hugging Face model keeps ``generate()`` and its KV cache).
    """
    recipe = get_recipe(recipe)
    start = time.perf_counter()
    if not recipe.data_free and calibration is None:
        raise RecipeError(f"recipe {recipe.name!r} needs calibration data",
                          "pass calibration=<text or token ids> (the CLI uses WikiText-2 validation by default)")
    if recipe.is_float and not capture_model:
        return QuantizeResult(model=model, recipe=recipe, captured=None)
    _release_free_memory()
    cg = capture(model)
    # passes overwrite the model's weights in place: no second copy of the model (peak = model + one weight);
    # the debugger (fxquant debug) runs the passes functionally instead, to compare before and after each one
    ctx = PassContext(recipe=recipe, calibration=calibration, options={"inplace_weights": True})
    pipeline = recipe.pipeline()
    records = pipeline.run(cg, ctx, debug_dir=debug_dir, verify=verify)
    copied = cg.write_back()
    quantized = dict(ctx.artifacts.get("quantized_weights", {}))
    _remember_for_backend(model, quantized)
    log.info("recipe %s: %d passes, %d tensors written back", recipe.name, len(records), copied)
    return QuantizeResult(model=model, recipe=recipe, captured=cg, records=records,
                          quantized=quantized, artifacts=ctx.artifacts,
                          seconds=time.perf_counter() - start)


def _release_free_memory() -> None:
    """Return freed heap pages to the OS before a large job (a model load leaves hundreds of MiB of freed but
    resident memory behind in glibc's arenas), so that the job's peak is its own."""
    import gc
    gc.collect()
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        # glibc raises its mmap threshold each time a large block is freed, after which the per-weight temporaries
        # land on the heap and fragment it (+100-300 MiB of freed-but-resident memory on SmolLM2); a fixed
        # threshold keeps every block over 1 MiB in its own mapping, returned to the OS when freed
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _remember_for_backend(model: torch.nn.Module, quantized: dict[str, Any]) -> None:
    """Tell the torch.compile backend which parameters hold quantized values (it sees tensors, not names), so
    ``torch.compile(model, backend="fxquant")`` lowers an offline-quantized model without a recipe."""
    from fxquant.backends.registry import remember_quantized
    from .fpformats import FPQuantizedWeight
    from .paretoq import ParetoQWeight
    from .quant import QuantizedWeight
    params = dict(model.named_parameters(remove_duplicate=False))
    in_out = _in_out_weights(model)
    for fqn, qw in quantized.items():
        p = params.get(fqn)
        if p is None or not isinstance(qw, (QuantizedWeight, FPQuantizedWeight, ParetoQWeight)):
            continue
        if fqn in in_out and tuple(p.shape) == tuple(qw.shape)[::-1]:
            remember_quantized(p, qw, in_out=True)          # Conv1D: qw quantized the [out, in] transpose
        elif fqn not in in_out and tuple(p.shape) == tuple(qw.shape):
            remember_quantized(p, qw)


def _in_out_weights(model: torch.nn.Module) -> set[str]:
    """Names of the weights stored ``[in, out]`` (transformers' ``Conv1D``, GPT-2)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return set()
    return {f"{name}.weight" if name else "weight" for name, mod in model.named_modules() if isinstance(mod, Conv1D)}
