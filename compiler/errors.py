"""Errors that fxquant raises on bad input.

Every error says what went wrong *and* what to do about it (the ``hint``), so a CLI user sees one
clear line instead of a traceback. Subclasses name the stage that refused the input.
"""
from __future__ import annotations


class FxquantError(Exception):
    """Base class: ``message`` says what is wrong, ``hint`` says what to do."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message}\n  hint: {hint}")


class RecipeError(FxquantError, ValueError):
    """A recipe name, file or field is invalid or contradicts itself."""


class QuantSpecError(FxquantError, ValueError):
    """A quantization spec asks for something that does not exist (bits, group size, ...)."""


class WeightError(FxquantError, ValueError):
    """A weight cannot be quantized as it is (NaN/Inf values, wrong rank, ...)."""


class ModelLoadError(FxquantError):
    """A model name, path or file could not be loaded."""


class CaptureError(FxquantError):
    """torch.export could not capture the model."""


class PassError(FxquantError):
    """A pass's requirement or guarantee failed, or the graph no longer verifies after it."""


class DataError(FxquantError):
    """Evaluation or calibration text is missing, empty or too short."""


class TrainingError(FxquantError):
    """Training (TEQ, FSBR, QAT) cannot go on: the loss became NaN/Inf, a checkpoint does not match the run, ..."""


class ResourceError(FxquantError):
    """The machine cannot do what was asked: not enough memory, a kernel format on a device that cannot run it."""


class OutputError(FxquantError):
    """The output cannot be written: the folder is not empty, is a file, the disk is full, permission denied, ..."""
