"""Safe checkpoints: safetensors + JSON, never pickles.

``save_quantized`` writes a folder a Hugging Face user recognises:

* ``config.json`` with a ``quantization_config`` block (``quant_method: fxquant``, recipe, bits, group size,
  fxquant version) — ``from_pretrained`` ignores what it does not know;
* ``model.safetensors`` — the model with its quantized weights (values exactly on the quantization grid), so
  plain transformers loads it;
* ``fxquant_packed.safetensors`` — the integer codes, scales and zero points of every quantized weight, with
  ``fxquant_manifest.json`` naming them and the SHA-256 of each file;
* the tokenizer files.

The folder is written to a temporary sibling and renamed at the end, so an interrupted write never leaves a
half-written output directory.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError

MANIFEST = "fxquant_manifest.json"
PACKED = "fxquant_packed.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_quantized(model: torch.nn.Module, tokenizer: Any, out: str | Path, *, recipe: Any = None,
                   quantized: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    from . import __version__
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ModelLoadError(f"output folder {out} exists and is not empty", "choose a new --out, or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        qc: dict[str, Any] = {"quant_method": "fxquant", "fxquant_version": __version__}
        if recipe is not None:
            qc.update(recipe.to_dict())
            qc["recipe"] = recipe.name
        model.config.quantization_config = qc
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            del model.config.quantization_config
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tensors: dict[str, torch.Tensor] = {}
        layers = {}
        for fqn, q in (quantized or {}).items():
            # integer weights: codes/scale/zero; FP6 weights: the two bit planes and the scale
            fields = ("hi2", "lo4", "scale") if hasattr(q, "hi2") else ("codes", "scale", "zero")
            entry: dict[str, Any] = {}
            for f in fields:
                t = getattr(q, f, None)
                if t is not None:
                    entry[f] = f"{fqn}.{f}"
                    tensors[entry[f]] = t.contiguous().cpu()
            entry["spec"] = q.spec.describe() if hasattr(q.spec, "describe") else str(q.spec)
            entry["group_size"] = int(q.group_size) if q.group_size else None
            layers[fqn] = entry
        files = {}
        if tensors:
            save_file(tensors, str(tmp / PACKED), metadata={"format": "fxquant-packed-v1"})
            files[PACKED] = _sha256(tmp / PACKED)
        for f in sorted(tmp.glob("*.safetensors")):
            files.setdefault(f.name, _sha256(f))
        (tmp / MANIFEST).write_text(json.dumps({"fxquant_version": __version__, "recipe": qc.get("recipe"),
                                                "files": files, "layers": layers}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def verify_files(path: Path) -> dict:
    """Check every file named in the manifest against its SHA-256; return the manifest."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return {}
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{manifest_path} is not valid JSON", "the checkpoint is corrupted; quantize again") from exc
    for name, digest in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise ModelLoadError(f"checkpoint file {f} is missing", "the checkpoint is incomplete; quantize again")
        if _sha256(f) != digest:
            raise ModelLoadError(f"checkpoint file {f} does not match its SHA-256 in {MANIFEST} (truncated or modified)",
                                 "the checkpoint is corrupted; quantize again")
    return manifest


def load_quantized(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a folder written by :func:`save_quantized` (hashes checked, no pickles)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .models import LoadedModel, _kind_of, _refuse_pickles
    path = Path(path)
    _refuse_pickles(path)
    verify_files(path)
    config = AutoConfig.from_pretrained(path)
    # transformers would look for a quantizer named "fxquant"; the weights in model.safetensors are already the
    # quantized values, so the block is informational for transformers and we load without it.
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        del config.quantization_config
    kind = _kind_of(config)
    cls = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    model = cls.from_pretrained(path, config=config, dtype=dtype, use_safetensors=True).to(device).eval()
    model.config.fxquant_quantization = qc
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=str(path), kind=kind, source=str(path))
