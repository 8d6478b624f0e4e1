"""Quality measurement: WikiText-2 perplexity with a fixed, documented protocol, and packed weight size.

Perplexity protocol (the one the README's reference numbers use):

1. read the evaluation file as one string in text mode (universal newlines: the raw file's CRLF line ends
   become LF; no other cleaning, no line splitting);
2. tokenize it whole with the model's tokenizer, ``add_special_tokens=False``;
3. cut non-overlapping windows of ``seq_len`` (512) tokens from the start; the trailing partial window is dropped;
4. ``windows=N`` evaluates the first N windows (quick mode); ``None`` evaluates all of them;
5. each window is scored independently (no context carried over): the model predicts tokens 2..512 of the
   window from the tokens before them, so a window contributes ``seq_len - 1`` tokens;
6. perplexity = exp(total negative log-likelihood / total predicted tokens), accumulated in float64.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from .errors import DataError


@dataclass
class PerplexityResult:
    ppl: float
    tokens: int
    windows: int
    seq_len: int
    nll: float
    seconds: float


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of the whole text as one 1-D tensor (no special tokens added)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return ids.reshape(-1)


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer: Any = None, text: str | None = None, *, ids: torch.Tensor | None = None,
               windows: int | None = None, seq_len: int = 512, batch_size: int = 4, progress: bool = True,
               forward=None) -> PerplexityResult:
    """Perplexity of a causal LM by the protocol in this module's docstring.

    ``forward`` replaces ``model(input_ids).logits`` (e.g. a captured graph or a compiled model).
    """
    if ids is None:
        if text is None or tokenizer is None:
            raise DataError("perplexity needs text and a tokenizer, or token ids", "pass text= and tokenizer=")
        ids = tokenize_text(tokenizer, text)
    ids = ids.reshape(-1)
    available = ids.numel() // seq_len
    if windows is not None and windows <= 0:
        raise DataError(f"windows must be a positive number, got {windows}", "e.g. --windows 40, or omit it for all")
    if available == 0:
        raise DataError(f"the evaluation text has {ids.numel()} tokens, fewer than one {seq_len}-token window",
                        "use the full WikiText-2 test file, or a smaller --seq-len")
    n = available if windows is None else min(windows, available)
    device = next(model.parameters()).device
    chunks = ids[: n * seq_len].view(n, seq_len)
    fwd = forward or (lambda x: model(input_ids=x).logits)
    total_nll = 0.0
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc="perplexity", unit="win", leave=False)
    for b in range(0, n, batch_size):
        batch = chunks[b: b + batch_size].to(device)
        logits = fwd(batch).float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(-1, batch[:, 1:, None]).squeeze(-1)
        if not torch.isfinite(nll).all():
            raise DataError("the model produced NaN/Inf log-likelihoods",
                            "the quantized model is broken (check for NaN/Inf weights or an overflowing dtype)")
        total_nll += nll.double().sum().item()
        if bar is not None:
            bar.update(batch.shape[0])
            bar.set_postfix(ppl=f"{math.exp(total_nll / ((b + batch.shape[0]) * (seq_len - 1))):.3f}")
    if bar is not None:
        bar.close()
    tokens = n * (seq_len - 1)
    return PerplexityResult(ppl=math.exp(total_nll / tokens), tokens=tokens, windows=n, seq_len=seq_len,
                            nll=total_nll, seconds=time.perf_counter() - start)


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_bytes(model: torch.nn.Module, quantized: dict[str, Any] | None = None) -> int:
    """Bytes the model's parameters take when stored: quantized weights packed (codes + scales + zero points),
    everything else at its current dtype. Tied parameters count once."""
    quantized = quantized or {}
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        q = quantized.get(name)
        if q is None:
            total += tensor_nbytes(p)
        else:
            total += int(q.packed_nbytes() if hasattr(q, "packed_nbytes") else q.nbytes())
    return total


@torch.no_grad()
def encoder_similarity(reference: torch.nn.Module, model: torch.nn.Module, tokenizer: Any, text: str, *,
                       n: int = 256, max_length: int = 128) -> dict[str, Any]:
    """Quality of an encoder: mean cosine similarity between its mean-pooled sentence embeddings and the
    reference (float) model's, over the first ``n`` non-empty lines of ``text``."""
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20][:n]
    if not lines:
        raise DataError("the evaluation text has no sentences", "use the WikiText-2 test file")
    sims, tokens = [], 0
    for i in range(0, len(lines), 16):
        batch = tokenizer(lines[i:i + 16], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        tokens += int(mask.sum())
        pooled = []
        for m in (reference, model):
            h = m(**batch).last_hidden_state
            pooled.append((h * mask).sum(1) / mask.sum(1))
        sims.append(torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=-1))
    return {"cosine": float(torch.cat(sims).mean()), "sentences": len(lines), "tokens": tokens}
