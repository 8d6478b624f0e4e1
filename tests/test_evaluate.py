"""The perplexity protocol, the data lookup and the packed-size count."""
from __future__ import annotations

import math

import pytest
import torch

from fxquant.data import calibration_text, eval_text
from fxquant.errors import DataError
from fxquant.evaluate import perplexity, weight_bytes


class CharTokenizer:
    """One token per byte: enough to check the windowing protocol exactly."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = torch.tensor([list(text.encode()[:])], dtype=torch.long) % 128

        class Out:
            input_ids = ids
        return Out()


def _manual_ppl(model, ids, n, seq_len):
    nll, count = 0.0, 0
    for w in range(n):
        chunk = ids[w * seq_len:(w + 1) * seq_len][None]
        logits = model(chunk).logits[0, :-1]
        lp = torch.log_softmax(logits.float(), -1)
        nll -= lp.gather(-1, chunk[0, 1:, None]).sum().item()
        count += seq_len - 1
    return math.exp(nll / count), count


def test_protocol_matches_a_manual_computation(tiny_llama):
    text = "the quick brown fox jumps over the lazy dog. " * 30  # 1350 bytes -> 5 windows of 256, rest dropped
    tok = CharTokenizer()
    ids = tok(text).input_ids.reshape(-1)
    with torch.no_grad():
        expect, count = _manual_ppl(tiny_llama, ids, 5, 256)
    r = perplexity(tiny_llama, tok, text, seq_len=256, batch_size=2, progress=False)
    assert r.windows == 5 and r.tokens == count == 5 * 255
    assert r.ppl == pytest.approx(expect, rel=1e-6)
    r3 = perplexity(tiny_llama, tok, text, seq_len=256, windows=3, progress=False)
    assert r3.windows == 3 and r3.tokens == 3 * 255
    with torch.no_grad():
        assert r3.ppl == pytest.approx(_manual_ppl(tiny_llama, ids, 3, 256)[0], rel=1e-6)


def test_protocol_errors(tiny_llama):
    with pytest.raises(DataError, match="fewer than one"):
        perplexity(tiny_llama, CharTokenizer(), "too short", seq_len=512, progress=False)
    with pytest.raises(DataError, match="positive"):
        perplexity(tiny_llama, CharTokenizer(), "x" * 2000, seq_len=512, windows=0, progress=False)


def test_nan_model_is_reported(tiny_llama):
    with torch.no_grad():
        tiny_llama.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        perplexity(tiny_llama, CharTokenizer(), "x" * 600, seq_len=256, progress=False)


def test_data_lookup_order(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    (folder / "wikitext-2-raw").mkdir(parents=True)
    (folder / "wikitext-2").mkdir()
    (folder / "wikitext-2-raw" / "wiki.test.raw").write_text("test split text")
    (folder / "wikitext-2" / "valid.txt").write_text("validation text")
    monkeypatch.setenv("FXQUANT_DATA", str(folder))
    assert eval_text() == ("test split text", str(folder / "wikitext-2-raw" / "wiki.test.raw"))
    assert calibration_text()[0] == "validation text"
    # an explicit path wins over the environment
    other = tmp_path / "mine.txt"
    other.write_text("mine")
    assert eval_text(other)[0] == "mine"


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(DataError, match="not found"):
        eval_text(tmp_path / "nope")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        eval_text(empty)


def test_shared_data_is_found():
    text, source = eval_text()
    if "datasets" in source:
        pytest.skip("no local copy of the data")
    import hashlib
    assert source.endswith("wiki.test.raw")
    with open(source, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == (
            "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c")
    # read in text mode: the file's CRLF line ends become LF, as in the reference numbers
    assert "\r" not in text and len(text) == 1_285_622


def test_weight_bytes_counts_tied_once_and_packed(tiny_llama):
    from fxquant.quant import QuantSpec, quantize_weight
    full = sum(p.numel() * 4 for p in tiny_llama.parameters())
    assert weight_bytes(tiny_llama) == full
    w = tiny_llama.model.layers[0].mlp.up_proj.weight  # [128, 64]
    q = quantize_weight(w.detach(), QuantSpec(4, group_size=32))
    packed = weight_bytes(tiny_llama, {"model.layers.0.mlp.up_proj.weight": q})
    assert packed == full - w.numel() * 4 + (128 * 64 // 2 + 128 * 2 * 2)
