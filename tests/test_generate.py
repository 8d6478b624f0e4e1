"""A quantized SmolLM2 is still a working Hugging Face model: generate() with the KV cache answers sensibly."""
from __future__ import annotations

import copy

import pytest
import torch

import fxquant


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["rtn-w4g128"])
def test_quantized_smollm2_generates_sensibly(smollm2, recipe):
    model = copy.deepcopy(smollm2.model)
    result = fxquant.quantize(model, recipe)
    assert len(result.quantized) == 30 * 7  # every linear of every layer; lm_head (tied) stays float
    tok = smollm2.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    # the KV cache gives the same tokens as recomputing the whole prefix each step
    with torch.no_grad():
        nocache = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(out[0, : ids.shape[1] + 8], nocache[0])
