"""Safe checkpoints: packed weights in safetensors, everything else in JSON, never a pickle.

``save_quantized`` (``fxquant quantize --out DIR``) writes a folder a Hugging Face user recognises::

    DIR/config.json                  the model's config + a ``quantization_config`` block (quant_method "fxquant",
                                     recipe, method, format(s), bits, group size, fxquant version, file checksums)
    DIR/generation_config.json       as save_pretrained writes it
    DIR/tokenizer*.json ...          the tokenizer files
    DIR/model.safetensors            every tensor that is NOT a quantized weight (embeddings, norms, biases,
                                     lm_head when it stays float), with Hugging Face names
    DIR/fxquant_packed.safetensors   the quantized weights at their bit width + their scales / zero points
    DIR/fxquant_runtime.safetensors  FSBR models only: the SwiGLU act-smooth scales (the SiLU reads ``gate' ⊘ s``);
                                     the activation quantizers' widths and modules are in ``quantization_config.runtime``
    DIR/fxquant_manifest.json        one entry per quantized weight (kind, spec, shape, tensor names) and the
                                     SHA-256 of every safetensors file

Packed layouts (one encoder, one decoder, round-trip tested for every kind and width):

* ``int`` (RTN, TEQ, FSBR, I-LLM weights): codes made unsigned (``code + 2^(b-1)`` when symmetric), stored as
  ``b`` bit planes — plane ``i`` holds bit ``i`` of every code, 8 codes per byte, little-endian — so a ``b``-bit
  weight takes exactly ``b/8`` bytes per element for every ``b`` from 1 to 8; float32 scales; zero points as uint8;
* ``fp`` (FP6 E3M2 / E2M3, FP5, FP4): the element codes as bit planes at the format's width, float32 scales (the
  kernel's 4+2 planes are rebuilt from them on load);
* ``paretoq`` (1, 1.58, 2, 3, 4 bit): the packed planes of :mod:`fxquant.backends.lowbit` (ternary 5 per byte),
  float32 scales.

Loading (:func:`load_quantized`, ``fxquant.load``) checks every file against its SHA-256 (a truncated or modified
file is reported, never loaded), refuses pickles, rebuilds each quantized weight object, writes its dequantized
value (the one numerics shared with fake-quant and the kernels) into the model, and tells the torch.compile
backend about it — so the loaded model's outputs are bit-identical to the saved one's, and
``torch.compile(model, backend="fxquant")`` lowers it to the packed kernels. An ``illm-*`` checkpoint is lowered
to integers again on load (the lowering is deterministic and data-free); an ``fsbr-*`` checkpoint gets its
activation fake-quant hooks and act-smooth hooks back (:mod:`fxquant.actquant`), so it computes what was saved.

The folder is written to a temporary sibling and renamed at the end: an interrupted write never leaves a
half-written output directory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError, PassError, WeightError
from .models import LoadedModel

log = logging.getLogger("fxquant")

MANIFEST = "fxquant_manifest.json"
PACKED = "fxquant_packed.safetensors"
#: act-smooth scales of FSBR models (what the hooks of ``fxquant.actquant`` need beyond the weights)
RUNTIME = "fxquant_runtime.safetensors"
FORMAT = "fxquant-packed-v2"

__all__ = ["save_quantized", "load_quantized", "verify_files", "QuantizedCheckpoint", "pack_bitplanes",
           "unpack_bitplanes", "encode_weight", "decode_weight", "MANIFEST", "PACKED", "FORMAT"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- bit planes -----------------------------------------------------------------------------------------------------
def pack_bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[O, C]`` (< 2^bits) → uint8 ``[bits, O, ceil(C / 8)]``: plane ``i`` holds bit ``i`` of
    every code, code ``8j + t`` of a row at bit ``t`` of byte ``j``."""
    if codes.dim() != 2:
        raise WeightError(f"pack_bitplanes takes 2-D codes, got shape {tuple(codes.shape)}")
    if not 1 <= bits <= 8:
        raise WeightError(f"bit planes hold 1 to 8 bits, got {bits}")
    c = codes.to(torch.int32)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise WeightError(f"codes must lie in 0..{(1 << bits) - 1} to fit {bits} bit planes, "
                          f"got {int(c.min())}..{int(c.max())}")
    rows, cols = c.shape
    pad = -cols % 8
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.view(rows, -1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=c.device))
    planes = [(((c >> i) & 1) * weights).sum(-1).to(torch.uint8) for i in range(bits)]
    return torch.stack(planes).contiguous()


def unpack_bitplanes(planes: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitplanes`: int32 codes ``[O, cols]``."""
    if planes.dim() != 3 or planes.dtype != torch.uint8:
        raise WeightError(f"bit planes must be uint8 [bits, rows, bytes], got {planes.dtype} {tuple(planes.shape)}")
    bits, rows, nbytes = planes.shape
    if cols > nbytes * 8:
        raise WeightError(f"{cols} columns do not fit {nbytes} bytes of bit planes", "the checkpoint is corrupted")
    shifts = torch.arange(8, dtype=torch.int32, device=planes.device)
    out = torch.zeros(rows, nbytes * 8, dtype=torch.int32, device=planes.device)
    for i in range(bits):
        bit = (planes[i].to(torch.int32).unsqueeze(-1) >> shifts) & 1
        out |= bit.view(rows, -1) << i
    return out[:, :cols].contiguous()


# ---- one quantized weight <-> tensors + JSON -------------------------------------------------------------------------
def encode_weight(name: str, q: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A quantized weight object → (its manifest entry, its tensors named ``<name>.<field>``)."""
    from .fpformats import FP6PackedWeight, FPQuantizedWeight, format_label
    from .paretoq import ParetoQWeight
    from .quant import QuantizedWeight
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(q, QuantizedWeight):
        s = q.spec
        offset = 1 << (s.bits - 1) if s.symmetric else 0
        tensors[f"{name}.planes"] = pack_bitplanes(q.codes.to(torch.int32) + offset, s.bits)
        tensors[f"{name}.scale"] = q.scale
        if q.zero is not None:
            tensors[f"{name}.zero"] = q.zero.to(torch.uint8)
        entry = {"kind": "int", "bits": s.bits, "symmetric": s.symmetric, "spec_group_size": s.group_size,
                 "per_tensor": s.per_tensor, "group_size": int(q.group_size)}
    elif isinstance(q, (FP6PackedWeight, FPQuantizedWeight)):
        # the element codes at the format's own width (FP4 in 4 bits, not in the kernel's 6-bit container);
        # the 4+2 planes are rebuilt on load
        tensors.update({f"{name}.planes": pack_bitplanes(q.codes, q.format.bits), f"{name}.scale": q.scale})
        entry = {"kind": "fp", "format": format_label(q.format), "bits": q.format.bits, "in_features": int(q.shape[1]),
                 "group_size": q.group_size, "dtype": str(q.dtype).removeprefix("torch."),
                 "scale_search": q.scale_search}
    elif isinstance(q, ParetoQWeight):
        from fxquant.backends.lowbit import pack_codes
        for i, plane in enumerate(pack_codes(q.spec.bits, q.codes)):
            tensors[f"{name}.plane{i}"] = plane
        tensors[f"{name}.scale"] = q.scale
        entry = {"kind": "paretoq", "bits": q.spec.bits, "spec_group_size": q.spec.group_size,
                 "group_size": int(q.group_size)}
    else:
        raise WeightError(f"{name}: cannot store a {type(q).__name__} in an fxquant checkpoint",
                          "quantize with an rtn-*, teq-*, fsbr-*, illm-*, fp6/fp5/fp4 or paretoq-* recipe")
    entry["shape"] = [int(d) for d in q.shape]
    entry["tensors"] = sorted(tensors)
    return entry, {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def decode_weight(name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_weight` (structure checked: a foreign or corrupted entry raises ModelLoadError)."""
    from .fpformats import FPQuantizedWeight, get_format, pack_fp6
    from .paretoq import ParetoQSpec, ParetoQWeight
    from .quant import QuantizedWeight, QuantSpec
    try:
        get = {k.split(".")[-1]: tensors[k] for k in entry["tensors"]}
        rows, cols = entry["shape"]
        kind = entry["kind"]
        if kind == "int":
            spec = QuantSpec(bits=entry["bits"], symmetric=entry["symmetric"], group_size=entry["spec_group_size"],
                             per_tensor=entry["per_tensor"])
            codes = unpack_bitplanes(get["planes"], cols)
            if spec.symmetric:
                codes = (codes - (1 << (spec.bits - 1))).to(torch.int8)
            else:
                codes = codes.to(torch.uint8)
            zero = get["zero"].to(torch.int32) if "zero" in get else None
            return QuantizedWeight(codes, get["scale"], zero, spec, entry["group_size"])
        if kind == "fp":
            fmt = get_format(entry["format"])
            codes = unpack_bitplanes(get["planes"], cols).to(torch.uint8)
            return pack_fp6(FPQuantizedWeight(codes, get["scale"], fmt, entry["group_size"],
                                              getattr(torch, entry.get("dtype", "float32")),
                                              entry.get("scale_search", "absmax")))
        if kind == "paretoq":
            from fxquant.backends.lowbit import unpack_codes
            spec = ParetoQSpec(entry["bits"], entry["spec_group_size"])
            planes = [get[f"plane{i}"] for i in range(len(entry["tensors"]) - 1)]
            codes = unpack_codes(spec.bits, *planes, in_features=cols).to(torch.uint8)
            return ParetoQWeight(codes[:rows].contiguous(), get["scale"], spec, entry["group_size"])
    except ModelLoadError:
        raise
    except (KeyError, TypeError, ValueError, WeightError) as exc:
        raise ModelLoadError(f"quantized weight {name} in the checkpoint is malformed: {exc}".splitlines()[0],
                             "the checkpoint is corrupted or from an incompatible fxquant version; quantize again") from exc
    raise ModelLoadError(f"quantized weight {name} has unknown kind {entry.get('kind')!r}",
                         "the checkpoint was written by a newer fxquant; upgrade fxquant")


# ---- save -----------------------------------------------------------------------------------------------------------
def _quantization_config(recipe: Any, layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from . import __version__
    qc: dict[str, Any] = {"quant_method": "fxquant", "fxquant_version": __version__, "checkpoint_format": FORMAT}
    if recipe is not None:
        d = recipe.to_dict()
        qc.update(recipe=recipe.name, method=recipe.method)
        for k in ("bits", "group_size", "symmetric", "per_tensor", "format", "options", "exclude"):
            if k in d:
                qc[k] = d[k]
    kinds = sorted({e["kind"] for e in layers.values()})
    qc["formats"] = sorted({f"{e['kind']}{e['bits']}" if e["kind"] != "fp" else e["format"] for e in layers.values()})
    qc["quantized_layers"] = len(layers)
    if kinds:
        qc["kinds"] = kinds
    return qc


def save_quantized(model: torch.nn.Module, tokenizer: Any, out: str | Path, *, recipe: Any = None,
                   quantized: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (quantized in place by :func:`fxquant.quantize`) as an fxquant checkpoint folder.

    ``quantized`` is :attr:`QuantizeResult.quantized` (parameter name → quantized weight object). A weight whose
    value in the model is not exactly its quantized object's dequantized value is stored in float instead (with a
    warning), so that a reload is always bit-identical.
    """
    from safetensors.torch import save_file
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ModelLoadError(f"output folder {out} exists and is not empty", "choose a new --out, or pass --overwrite")
    if not hasattr(model, "save_pretrained") or getattr(model, "config", None) is None:
        raise ModelLoadError(f"{type(model).__name__} is not a Hugging Face model (no save_pretrained / config)",
                             "checkpoints are written for transformers models; save other models' state_dict yourself")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        params = dict(model.named_parameters(remove_duplicate=False))
        layers: dict[str, dict[str, Any]] = {}
        packed: dict[str, torch.Tensor] = {}
        kept_float = []
        for fqn, q in sorted((quantized or {}).items()):
            p = params.get(fqn)
            if p is None:
                continue
            if tuple(p.shape) != tuple(q.shape) or not torch.equal(p.detach().cpu(), q.dequantize(p.dtype).cpu()):
                kept_float.append(fqn)
                continue
            entry, tensors = encode_weight(fqn, q)
            entry["dtype"] = str(p.dtype).removeprefix("torch.")
            layers[fqn] = entry
            packed.update(tensors)
        if kept_float:
            log.warning("%d quantized weights differ from their packed values in the model and are stored in float: %s",
                        len(kept_float), ", ".join(kept_float[:4]))
        # every tensor that is not a packed weight, with its Hugging Face name (tied weights once: save_pretrained)
        state = {k: v for k, v in model.state_dict().items() if k not in layers}
        qc = _quantization_config(recipe, layers)
        from .actquant import runtime_state
        runtime = runtime_state(model)
        if runtime is not None:
            # what the model's hooks do beyond its weights (activation fake-quant, the SwiGLU act-smooth's σ(g ⊘ s)):
            # without it the reloaded model would compute another function
            qc["runtime"] = runtime[0]
        model.config.quantization_config = qc
        try:
            model.save_pretrained(tmp, state_dict=state)
        finally:
            del model.config.quantization_config
        stray = next(tmp.glob("*.bin"), None)
        if stray is not None:  # transformers >= 5 writes safetensors only; never ship a pickle if that changes
            raise ModelLoadError(f"save_pretrained wrote a pickle ({stray.name})", "upgrade transformers")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = {}
        if packed:
            save_file(packed, str(tmp / PACKED), metadata={"format": FORMAT})
        if runtime is not None and runtime[1]:
            save_file(runtime[1], str(tmp / RUNTIME), metadata={"format": FORMAT})
        for f in sorted(tmp.glob("*.safetensors")):
            files[f.name] = _sha256(f)
        # checksums in config.json too, where a Hugging Face user looks first
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["quantization_config"]["checksums"] = {k: f"sha256:{v}" for k, v in files.items()}
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        from . import __version__
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "fxquant_version": __version__,
                                                "recipe": qc.get("recipe"), "files": files, "layers": layers,
                                                "float_layers": kept_float}, indent=2))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---- load -----------------------------------------------------------------------------------------------------------
def refuse_pickles(path: Path) -> None:
    """An fxquant checkpoint never holds a pickle: a folder with one is refused before anything is read."""
    from .models import PICKLE_SUFFIXES
    found = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if found:
        raise ModelLoadError(f"{path} holds pickled files ({', '.join(found)}); fxquant never unpickles",
                             "remove them, or re-create the checkpoint with fxquant quantize --out (safetensors only)")


# ---- load (reading) --------------------------------------------------------------------------------------------------------
def verify_files(path: Path) -> dict:
    """Check every file named in the manifest against its SHA-256; return the manifest ({} if there is none)."""
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
    for f in path.glob("*.safetensors"):
        if f.name not in manifest.get("files", {}):
            raise ModelLoadError(f"{f} is not listed in {MANIFEST}", "remove files you added to the checkpoint folder")
    return manifest


@dataclass
class QuantizedCheckpoint(LoadedModel):
    """A loaded fxquant checkpoint: the model (weights at their quantized values), its tokenizer, the quantized
    weight objects, and — for integer-only recipes — the integer model."""

    quantized: dict[str, Any] = field(default_factory=dict)
    quantization_config: dict[str, Any] = field(default_factory=dict)
    integer_model: Any = None

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.integer_model or self.model


def load_quantized(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
                   ) -> QuantizedCheckpoint:
    """Load a folder written by :func:`save_quantized` (hashes checked, no pickles). ``dtype=None`` keeps the dtype
    each weight was saved in (bit-identical outputs); another dtype casts after dequantization."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .models import _kind_of
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a checkpoint folder (no config.json)", "pass a folder written by fxquant quantize --out")
    refuse_pickles(path)
    manifest = verify_files(path)
    config = AutoConfig.from_pretrained(path)
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        # transformers would look for a quantizer named "fxquant"; we rebuild the quantized weights ourselves
        del config.quantization_config
    qc = dict(qc or {})
    sums = qc.get("checksums")
    if sums is not None and manifest and sums != {k: f"sha256:{v}" for k, v in manifest.get("files", {}).items()}:
        raise ModelLoadError(f"the checksums in {path / 'config.json'} do not match {MANIFEST}",
                             "the checkpoint was modified; quantize again")
    if manifest and manifest.get("format", "fxquant-packed-v1") != FORMAT:
        raise ModelLoadError(f"{path} is a {manifest.get('format', 'fxquant-packed-v1')} checkpoint; this fxquant "
                             f"reads {FORMAT}", "quantize the model again with this version")
    layers = manifest.get("layers", {})
    kind = _kind_of(config)
    cls = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    saved_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype)
    load_dtype = dtype or saved_dtype
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the quantized weights are "missing" from model.safetensors by design
    try:
        model = cls.from_pretrained(path, config=config, dtype=load_dtype, use_safetensors=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    quantized: dict[str, Any] = {}
    if layers:
        tensors = load_file(str(path / PACKED))
        params = dict(model.named_parameters(remove_duplicate=False))
        for fqn, entry in layers.items():
            if fqn not in params:
                raise ModelLoadError(f"quantized weight {fqn} does not exist in {type(model).__name__}",
                                     "the checkpoint's config.json and packed weights do not belong together")
            q = decode_weight(fqn, entry, tensors)
            if tuple(q.shape) != tuple(params[fqn].shape):
                raise ModelLoadError(f"quantized weight {fqn} has shape {tuple(q.shape)}, the model expects "
                                     f"{tuple(params[fqn].shape)}", "the checkpoint is corrupted; quantize again")
            wdtype = dtype or getattr(torch, entry.get("dtype", "float32"))
            with torch.no_grad():
                params[fqn].data = q.dequantize(wdtype)
            quantized[fqn] = q
    model = model.to(device).eval()
    from .api import _remember_for_backend
    _remember_for_backend(model, quantized)
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.fxquant_quantization = qc
    if qc.get("runtime"):
        from .actquant import install_runtime
        extra = load_file(str(path / RUNTIME)) if (path / RUNTIME).is_file() else {}
        try:
            install_runtime(model, qc["runtime"], extra)
        except (PassError, AttributeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{path}: cannot re-install the activation quantizers / act-smooth hooks: {exc}",
                                 "the checkpoint does not belong to this model class, or is corrupted; quantize again") from exc
    ckpt = QuantizedCheckpoint(model=model, tokenizer=tokenizer, name=str(path), kind=kind, source=str(path),
                               quantized=quantized, quantization_config=qc)
    if qc.get("method") == "illm":
        ckpt.integer_model = _relower_integer_only(model, qc, quantized)
    log.info("loaded fxquant checkpoint %s: %d packed weights (%s)", path, len(quantized), ", ".join(qc.get("formats", [])))
    return ckpt


def _relower_integer_only(model: torch.nn.Module, qc: dict[str, Any], quantized: dict[str, Any]):
    """Capture the loaded model and run the integer-only lowering with the saved recipe's options (data-free)."""
    from fxquant.passes.lower_integer_only import LowerIntegerOnly

    from .capture import capture
    from .intmodel import IntegerOnlyModel
    from .pipeline import PassContext, Pipeline
    from .recipes import illm_integer_config
    cg = capture(model)
    ctx = PassContext(recipe=None, calibration=None)
    ctx.artifacts["quantized_weights"] = dict(quantized)
    Pipeline([LowerIntegerOnly(illm_integer_config(qc.get("options", {})))]).run(cg, ctx)
    causal = hasattr(model, "lm_head") or type(model).__name__.endswith("ForCausalLM")
    return IntegerOnlyModel(cg, causal=causal, config=getattr(model, "config", None))
