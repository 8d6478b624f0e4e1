"""fxquant: a quantization compiler for large language models on torch.fx.

``fxquant`` is the ``compiler/`` folder: capture, the pass base and pipeline, recipes, the public API,
the torch.compile backend, the CLI and the debugging tools. ``fxquant.passes`` holds one module per pass,
``fxquant.backends`` the custom ops, their reference implementations and the Triton kernels.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .capture import CapturedGraph, capture, fxmeta
from .errors import (CaptureError, DataError, FxquantError, ModelLoadError, PassError, QuantSpecError,
                     OutputError, RecipeError, ResourceError, TrainingError, WeightError)
from .models import BUILTIN_MODELS, DEFAULT_MODEL, LoadedModel, load_model
from .pipeline import Pass, PassContext, PassResult, Pipeline
from .api import QuantizeResult, quantize
from .recipes import Recipe, get_recipe
from .checkpoint import QuantizedCheckpoint, load_quantized as load, save_quantized as save

__all__ = [
    "__version__", "CapturedGraph", "capture", "fxmeta", "Pass", "PassContext", "PassResult", "Pipeline",
    "quantize", "QuantizeResult", "load", "save", "QuantizedCheckpoint", "Recipe", "get_recipe", "load_model", "LoadedModel", "BUILTIN_MODELS", "DEFAULT_MODEL",
    "FxquantError", "CaptureError", "DataError", "ModelLoadError", "PassError", "QuantSpecError", "RecipeError",
    "WeightError", "TrainingError", "ResourceError", "OutputError",
]
from . import backend as _backend  # noqa: E402,F401 - registers torch.compile(backend="fxquant")
