"""Calibration data and running a model on it: the helpers every data-driven pass shares.

Calibration text or ids become one 1-D id tensor (:func:`calibration_ids`), then overlapping windows
(:func:`calibration_windows`), some held out (:func:`split_holdout`).

TEQ's init and clip search collect activation statistics with forward hooks over whole-model forwards; GPTQ's
staged mode stops each forward once the block being rounded has run; FSBR, TEQ's block objective and GPTQ's
sequential mode cache the inputs of the first decoder layer and then run the layers one by one. All of them run
the model the same way — eval mode, one window at a time, no KV cache, optionally on substituted tensors through
:func:`torch.func.functional_call` — and that way lives here, once.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from fxquant.errors import DataError, PassError

__all__ = ["StopForward", "model_logits", "run_windows", "layer_inputs", "spread_windows", "find_tokenizer",
           "calibration_ids", "calibration_windows", "split_holdout"]


class StopForward(Exception):
    """Raised by a hook to end a forward early (what came before it has been collected)."""


def model_logits(model: torch.nn.Module, params: Mapping[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """``model``'s logits on ``input_ids`` with ``params`` substituted for its own tensors (``{}``: its own), no KV
    cache; differentiable when ``params`` are."""
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    if hasattr(getattr(model, "config", None), "use_cache"):
        kwargs["use_cache"] = False
    out = torch.func.functional_call(model, dict(params), args=(), kwargs=kwargs, strict=False)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None:
        raise PassError(f"fxquant's data-driven passes need a causal LM that returns logits; "
                        f"{type(model).__name__} does not",
                        "use an AutoModelForCausalLM, or a module whose forward(input_ids) returns logits")
    return logits


@torch.no_grad()
def run_windows(model: torch.nn.Module, params: Mapping[str, torch.Tensor], windows: torch.Tensor,
                hooks: Sequence[Any] = (), stop_at: torch.nn.Module | None = None) -> None:
    """Run ``model`` with ``params`` on each window (a row of ``windows``) in eval mode, for what its forward hooks
    collect; with ``stop_at``, each forward ends once that module has run. ``hooks`` (handles) are removed and the
    model's training mode restored afterwards, whatever happens. The windows move to the params' device."""
    handles = list(hooks)
    if stop_at is not None:
        def stop(*_: Any) -> None:
            raise StopForward
        handles.append(stop_at.register_forward_hook(stop))
    first = next(iter(params.values()), None)
    if first is None:
        first = next(model.parameters(), None)
    if first is not None:
        windows = windows.to(first.device)
    was_training = model.training
    model.eval()
    try:
        for i in range(windows.shape[0]):
            try:
                model_logits(model, params, windows[i:i + 1])
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


@torch.no_grad()
def layer_inputs(model: torch.nn.Module, layer: torch.nn.Module, windows: torch.Tensor,
                 params: Mapping[str, torch.Tensor] | None = None) -> list[tuple[torch.Tensor, dict]]:
    """``(hidden_states, kwargs)`` that ``layer`` receives on each window (each forward stops there): what a
    layer-by-layer pass runs the layer on. The kwargs (attention mask, position embeddings, ...) are the model's
    own for that window, without the KV cache."""
    cached: list[tuple[torch.Tensor, dict]] = []

    def grab(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        cached.append((hidden.detach(), kw))
        raise StopForward
    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    run_windows(model, params or {}, windows, hooks=(handle,))
    return cached


def spread_windows(windows: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` of ``windows`` (all when there are fewer), evenly spread from the first to the last."""
    return windows[torch.linspace(0, windows.shape[0] - 1, min(n, windows.shape[0])).long()]


# ---- calibration data ------------------------------------------------------------------------------------
def find_tokenizer(model: torch.nn.Module) -> Any:
    """The tokenizer of ``model`` from its config's name/path (and a lone ``.gguf`` there), or None."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not name:
        return None
    try:
        from transformers import AutoTokenizer
        folder = Path(str(name))
        ggufs = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
        if len(ggufs) == 1 and not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(folder), gguf_file=ggufs[0].name)
        return AutoTokenizer.from_pretrained(str(name))
    except Exception as exc:  # noqa: BLE001 - any loader failure means "not found"
        logging.getLogger("fxquant").debug("no tokenizer for %s: %s", name, exc)
        return None


def calibration_ids(calibration: Any, model: torch.nn.Module | None = None, tokenizer: Any = None) -> torch.Tensor:
    """Calibration data as one 1-D tensor of token ids.

    Accepts token ids (a tensor, a list of tensors/lists), a dict with ``input_ids``, ``(text, tokenizer)``, or
    text (tokenized with ``tokenizer``, else with the tokenizer found from the model's name).
    """
    if isinstance(calibration, tuple) and len(calibration) == 2 and isinstance(calibration[0], str):
        calibration, tokenizer = calibration
    if isinstance(calibration, Mapping):
        if "input_ids" in calibration:
            calibration = calibration["input_ids"]
        elif "text" in calibration:
            tokenizer = calibration.get("tokenizer", tokenizer)
            calibration = calibration["text"]
    if isinstance(calibration, str):
        tok = tokenizer or (find_tokenizer(model) if model is not None else None)
        if tok is None:
            raise DataError("calibration text was given but no tokenizer to turn it into token ids "
                            "(none was found from the model's name or path)",
                            "pass calibration=(text, tokenizer), or token ids "
                            "(fxquant.evaluate.tokenize_text(tokenizer, text)), or recipe option tokenizer")
        ids = tok(calibration, return_tensors="pt", add_special_tokens=False).input_ids.reshape(-1)
    elif isinstance(calibration, torch.Tensor):
        ids = calibration.reshape(-1)
    elif isinstance(calibration, (list, tuple)) and calibration:
        ids = torch.cat([torch.as_tensor(c).reshape(-1) for c in calibration])
    else:
        raise DataError(f"calibration data of type {type(calibration).__name__} cannot be used",
                        "pass text with a tokenizer, or token ids")
    if ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
        raise DataError(f"calibration token ids must be a non-empty integer tensor, got {ids.dtype} [{ids.numel()}]")
    return ids.long()


def calibration_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """All windows of ``seq_len`` tokens that start at multiples of ``seq_len // 2`` (overlapping halves)."""
    if ids.numel() < seq_len:
        raise DataError(f"calibration has {ids.numel()} tokens, fewer than one {seq_len}-token window",
                        "pass more calibration text, or a smaller seq_len option")
    stride = max(1, seq_len // 2)
    starts = range(0, ids.numel() - seq_len + 1, stride)
    return torch.stack([ids[s: s + seq_len] for s in starts])


def split_holdout(windows: torch.Tensor, holdout: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(training windows, held-out windows or None)``. The windows overlap by half (:func:`calibration_windows`),
    so the held-out ones are every other window at the end, and the training ones stop where they start: no
    held-out token is ever trained on. At most a quarter of the windows is held out (none if that is zero)."""
    n = min(int(holdout), windows.shape[0] // 8)
    if n <= 0:
        return windows, None
    first = windows.shape[0] - 2 * n
    return windows[:first], windows[first + 1::2]
