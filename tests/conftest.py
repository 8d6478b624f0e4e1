"""Shared test setup.

* The pipeline verifier is always on in tests (``FXQUANT_VERIFY=1``).
* Without a CUDA GPU, Triton kernels run under the interpreter; ``TRITON_INTERPRET`` must be set before any
  kernel is defined, hence here, before fxquant is imported.
* ``smollm2`` / ``minilm`` load the real models once per session; ``tiny_llama`` builds a random one-layer
  LLaMA from a config (no download).
"""
from __future__ import annotations

import os

os.environ.setdefault("FXQUANT_VERIFY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2():
    from fxquant import load_model
    return load_model("smollm2")


@pytest.fixture(scope="session")
def minilm():
    from fxquant import load_model
    return load_model("minilm")


def make_tiny_llama(layers: int = 1, hidden: int = 64, heads: int = 4, kv_heads: int = 2, inter: int = 128,
                    vocab: int = 128, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def make_tiny_family(family: str, layers: int = 1, hidden: int = 64, vocab: int = 128, inter: int = 96,
                     **extra) -> torch.nn.Module:
    """A tiny random model of a Hugging Face family (llama, qwen2, qwen3, mistral, phi3, gemma, gemma2, neox, falcon,
    opt, gpt2, bert), built from its config (no download); ``extra`` goes into the config (e.g.
    ``partial_rotary_factor=0.5`` for phi3)."""
    import transformers as T
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=64, **extra)
    if family == "llama":
        return make_tiny_llama(layers=layers, hidden=hidden, inter=inter, vocab=vocab)
    if family == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(intermediate_size=inter, num_key_value_heads=2, **common)).eval()
    if family == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(intermediate_size=inter, num_key_value_heads=2,
                                                    **{"sliding_window": None, **common})).eval()
    if family == "phi3":
        return T.Phi3ForCausalLM(T.Phi3Config(intermediate_size=inter, num_key_value_heads=2, pad_token_id=0,
                                              bos_token_id=1, eos_token_id=2, **common)).eval()
    if family == "opt":
        return T.OPTForCausalLM(T.OPTConfig(ffn_dim=inter, word_embed_proj_dim=hidden, pad_token_id=1, bos_token_id=2,
                                            eos_token_id=2, **common)).eval()
    if family == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4,
                                              n_positions=64, n_inner=inter, bos_token_id=0, eos_token_id=0,
                                              **extra)).eval()
    if family == "qwen3":        # RMSNorm on q and k per head
        return T.Qwen3ForCausalLM(T.Qwen3Config(intermediate_size=inter, num_key_value_heads=2, head_dim=16,
                                                **common)).eval()
    if family == "gemma":        # norm gain 1 + w, embeddings times sqrt(hidden), tanh-GELU gate
        return T.GemmaForCausalLM(T.GemmaConfig(intermediate_size=inter, num_key_value_heads=2, head_dim=16,
                                                **common)).eval()
    if family == "gemma2":       # eager attention with tanh soft-caps on the scores and the logits, sliding window
        return T.Gemma2ForCausalLM(T.Gemma2Config(intermediate_size=inter, num_key_value_heads=2, head_dim=16,
                                                  query_pre_attn_scalar=16, sliding_window=6,
                                                  attn_implementation="eager", **common)).eval()
    if family == "neox":         # fused qkv, rotary on a quarter of each head, parallel attention + MLP
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(intermediate_size=inter, rotary_pct=0.25, **common)).eval()
    if family == "falcon":       # FalconLinear (x @ W.T), multi-query attention, parallel attention + MLP
        return T.FalconForCausalLM(T.FalconConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                                  num_attention_heads=4, new_decoder_architecture=False,
                                                  multi_query=True, **extra)).eval()
    if family == "bert":
        return T.BertModel(T.BertConfig(intermediate_size=inter, **common), add_pooling_layer=False).eval()
    raise ValueError(f"no tiny model for family {family!r}")


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


def make_tiny_model_folder(tmp_path):
    """A tiny random LLaMA saved with a real (MiniLM's WordPiece) tokenizer: enough for `fxquant quantize`."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from fxquant.models import builtin_path
    tok_dir, _ = builtin_path("minilm")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    folder = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, folder / f.name)
    text = tmp_path / "calib.txt"
    words = "the model of a tower is tall and the river runs by the old city walls in spring".split()
    g = torch.Generator().manual_seed(3)
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (3000,), generator=g)))
    return folder, text
