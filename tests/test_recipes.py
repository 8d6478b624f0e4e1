"""Recipes by name and from files; bad recipes give one-line errors that say what is allowed."""
from __future__ import annotations

import json
import re

import pytest

from fxquant.errors import RecipeError
from fxquant.recipes import get_recipe, named_recipes


@pytest.mark.parametrize("name,bits,group,sym", [
    ("rtn-w8", 8, None, True), ("rtn-w4", 4, None, True), ("rtn-w4g128", 4, 128, True),
    ("rtn-w3g128", 3, 128, True), ("rtn-w2g64", 2, 64, True), ("rtn-w4g128a", 4, 128, False),
    ("rtn-w1g32a", 1, 32, False), ("rtn-w5g32a", 5, 32, False),
])
def test_names_parse(name, bits, group, sym):
    r = get_recipe(name)
    assert r.method == "rtn" and r.name == name
    assert (r.weight.bits, r.weight.group_size, r.weight.symmetric) == (bits, group, sym)
    assert r.data_free


def test_fp32_is_float():
    r = get_recipe("fp32")
    assert r.is_float and r.weight is None


def test_listing_has_the_named_recipes():
    names = named_recipes()
    for name in ["fp32", "rtn-w8", "rtn-w4", "rtn-w4g128", "rtn-w3g128", "rtn-w2g64", "rtn-w4g128a"]:
        assert name in names and names[name]


@pytest.mark.parametrize("name,needle", [
    ("rtn-w9", "1 to 8"), ("rtn-w0", "1 to 8"), ("rtn-w4g0", "positive"), ("rtn-w4g-1", "positive"),
    ("rtn-w1", "symmetric"), ("nonsense", "unknown recipe"),
])
def test_bad_names_say_what_is_allowed(name, needle):
    with pytest.raises(RecipeError) as info:
        get_recipe(name)
    assert needle in str(info.value)
    assert info.value.message.count("\n") == 0  # one line


def test_unknown_name_lists_known_ones():
    with pytest.raises(RecipeError) as info:
        get_recipe("rtn-int4")
    assert "rtn-w4g128" in info.value.hint


def test_yaml_and_json_files(tmp_path):
    y = tmp_path / "mine.yaml"
    y.write_text("method: rtn\nbits: 3\ngroup_size: 32\nsymmetric: false\nexclude: [lm_head*, '*.down_proj.*']\n")
    r = get_recipe(str(y))
    assert r.name == "mine" and r.weight.bits == 3 and r.weight.group_size == 32 and not r.weight.symmetric
    assert "*.down_proj.*" in r.exclude
    j = tmp_path / "other.json"
    j.write_text(json.dumps({"name": "j4", "method": "rtn", "bits": 4}))
    assert get_recipe(str(j)).weight.bits == 4


@pytest.mark.parametrize("content,needle", [
    ("method: fp32\nbits: 4\n", "contradicts itself"),
    ("method: rtn\n", "needs bits"),
    ("method: rtn\nbits: 4\ngroup_size: 0\n", "positive"),
    ("method: rtn\nbits: 12\n", "1 to 8"),
    ("method: rtn\nbits: 4\ngroup_size: 64\nper_tensor: true\n", "per_tensor"),
    ("method: rtn\nbits: four\n", "integer"),
    ("method: rtn\nbits: 4\ncolour: red\n", "unknown key"),
    ("method: awq\nbits: 4\n", "unknown method"),
    ("- just\n- a list\n", "mapping"),
    ("method: [rtn\n", "not valid"),
])
def test_bad_files(tmp_path, content, needle):
    f = tmp_path / "r.yaml"
    f.write_text(content)
    with pytest.raises(RecipeError, match=needle):
        get_recipe(str(f))


def test_missing_file():
    with pytest.raises(RecipeError, match="does not exist"):
        get_recipe("no/such/recipe.yaml")


# ---- recipe files for every method (issue #4) ---------------------------------------------------------------------
import ast  # noqa: E402
import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fxquant.errors import QuantSpecError  # noqa: E402
from fxquant.recipes import (CHECKPOINT_OPTIONS, Recipe, illm_integer_config, load_recipe_file,  # noqa: E402
                             method_options)

ROOT = Path(__file__).resolve().parents[1]
NAMED = [n for n in named_recipes() if "<" not in n]
TRAINED = ("teq", "fsbr", "illm", "paretoq")
METHODS = ("fp32", "rtn", "fp", "gptq", "teq", "fsbr", "illm", "paretoq")


def same(a: Recipe, b: Recipe) -> None:
    """Two recipes that run the same: method, weight spec, options, exclusions and passes."""
    assert (a.method, a.weight, a.options, a.exclude) == (b.method, b.weight, b.options, b.exclude)
    assert a.pipeline().names == b.pipeline().names


def yaml_file(tmp_path, data: dict, name: str = "r.yaml") -> str:
    f = tmp_path / name
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(f)


def test_every_method_family_has_a_named_recipe():
    assert {get_recipe(n).method for n in NAMED} == set(METHODS)


@pytest.mark.parametrize("name", NAMED)
def test_every_named_recipe_validates_and_reads_only_known_options(name):
    r = get_recipe(name)
    assert r.validate() is r
    assert set(r.options) <= method_options(r.method), set(r.options) - method_options(r.method)
    assert r.pipeline().names[0] == "analyze_structure"


@pytest.mark.parametrize("name", NAMED)
def test_a_file_spelling_out_a_named_recipe_builds_the_same_recipe(name, tmp_path):
    built_in = get_recipe(name)
    data = built_in.to_dict()
    from_yaml = get_recipe(yaml_file(tmp_path, data))
    same(from_yaml, built_in)
    assert from_yaml.name == name  # the name: key wins over the file name
    j = tmp_path / "r.json"
    j.write_text(json.dumps(data))
    same(load_recipe_file(j), built_in)
    # the short form: a base and nothing else
    base_only = get_recipe(yaml_file(tmp_path, {"base": name}, "b.yaml"))
    same(base_only, built_in)
    assert base_only.name == "b" and base_only.description == built_in.description


@pytest.mark.parametrize("data,equivalent", [
    ({"base": "teq-w4g128", "group_size": None}, "teq-w4"),
    ({"base": "teq-w4g128", "bits": 3}, "teq-w3g128"),
    ({"base": "teq-w4g128", "format": "e3m2", "group_size": None, "options": {"gptq": True}}, "teq-fp6"),
    ({"base": "teq-fp6", "bits": 4, "group_size": 128, "options": {"gptq": False}}, "teq-w4g128"),
    ({"method": "teq", "bits": 2, "group_size": 64,
      "options": {"steps": 1000, "lr": 1.0e-3, "seq_len": 512, "batch_size": 4, "seed": 0, "gptq": False}}, "teq-w2g64"),
    ({"method": "teq", "format": "fp6",
      "options": {"steps": 1000, "lr": 0.001, "seq_len": 512, "batch_size": 4, "seed": 0, "gptq": True}}, "teq-fp6"),
    ({"base": "fp6", "group_size": 128}, "fp6g128"),
    ({"method": "fp", "format": "fp6_e2m3"}, "fp6-e2m3"),
    ({"method": "fp", "format": "fp5", "bits": 5}, "fp5"),
    ({"method": "fp", "format": "e2m1"}, "fp4"),
    ({"base": "paretoq-w2", "bits": 1.58}, "paretoq-w1.58"),
    ({"method": "paretoq", "bits": 3, "options": {"steps": 200}}, "paretoq-w3"),
    ({"base": "fsbr-w8a8", "bits": 4, "options": {"act_bits": 4}}, "fsbr-w4a4"),
    ({"method": "fsbr", "bits": 4, "options": {"act_bits": 8, "epochs": 10, "samples": 128, "seq_len": 512, "seed": 0}},
     "fsbr-w4a8"),
    ({"base": "illm-w8a8", "bits": 4, "options": {"alpha": 0.5, "gptq": True}}, "illm-w4a8"),
    ({"method": "illm", "bits": 4, "options": {"act_bits": 4, "fsbr": True, "epochs": 0, "alpha": 0.5, "samples": 16,
                                               "seq_len": 512, "seed": 0, "gptq": True}}, "illm-w4a4"),
    ({"base": "rtn-w4g128", "symmetric": False}, "rtn-w4g128a"),
    ({"method": "fp32"}, "fp32"),
])
def test_base_with_overrides_and_plain_files_equal_the_named_recipe(data, equivalent, tmp_path):
    same(get_recipe(yaml_file(tmp_path, data)), get_recipe(equivalent))
    same(get_recipe(dict(data)), get_recipe(equivalent))


def test_a_base_keeps_its_options_and_the_file_overrides_some():
    r = get_recipe({"base": "teq-w4g128", "options": {"steps": 100, "distill": 0.5}, "exclude": ["lm_head*", "*.0.*"]})
    assert r.options == {**get_recipe("teq-w4g128").options, "steps": 100, "distill": 0.5}
    assert r.exclude == ("lm_head*", "*.0.*") and r.weight == get_recipe("teq-w4g128").weight
    assert "teq-w4g128" in r.description
    assert get_recipe("teq-w4g128").options["steps"] == 1000  # the built-in is not changed


def test_illm_without_fsbr_from_a_file_is_data_free():
    r = get_recipe({"base": "illm-w8a8", "options": {"fsbr": False}})
    assert r.data_free and r.pipeline().names == ["analyze_structure", "quantize_weights_rtn", "lower_integer_only"]


# -- property: a file is accepted exactly when the weight spec is valid, and then gives that spec ----------------------
GROUPS = st.one_of(st.none(), st.integers(-2, 300))


@settings(max_examples=150, deadline=None)
@given(method=st.sampled_from(["rtn", "teq"]), bits=st.integers(0, 10), group=GROUPS, sym=st.booleans(),
       per_tensor=st.booleans())
def test_integer_weight_keys_round_trip(method, bits, group, sym, per_tensor):
    from fxquant.quant import QuantSpec
    data = {"method": method, "bits": bits, "group_size": group, "symmetric": sym, "per_tensor": per_tensor}
    try:
        want = QuantSpec(bits=bits, symmetric=sym, group_size=group, per_tensor=per_tensor)
    except QuantSpecError:
        with pytest.raises(RecipeError):
            get_recipe(data)
        return
    r = get_recipe(yaml.safe_load(yaml.safe_dump(data)))
    assert r.method == method and r.weight == want
    if method == "rtn" and not per_tensor and (group is None or group > 0):
        same(r, get_recipe(f"rtn-w{bits}" + (f"g{group}" if group else "") + ("" if sym else "a")))
    same(get_recipe(r.to_dict()), r)


@settings(max_examples=100, deadline=None)
@given(method=st.sampled_from(["fp", "teq"]), fmt=st.sampled_from(["e3m2", "fp6", "e2m3", "fp5", "e2m2", "e3m1", "fp4",
                                                                   "e2m1", "fp6_e3m2", "fp5_e3m1", "E3M2", "e4m4"]),
       group=GROUPS, search=st.sampled_from(["absmax", "mse", "best"]))
def test_minifloat_weight_keys_round_trip(method, fmt, group, search):
    from fxquant.fpformats import FPQuantSpec
    data = {"method": method, "format": fmt, "group_size": group, "scale_search": search}
    try:
        want = FPQuantSpec(format=fmt, group_size=group, scale_search=search)
    except QuantSpecError:
        with pytest.raises(RecipeError):
            get_recipe(data)
        return
    r = get_recipe(data)
    assert r.method == method and r.weight == want
    assert r.pipeline().names[-1] == "split_fp6_weights"
    same(get_recipe(yaml.safe_load(yaml.safe_dump(r.to_dict()))), r)
    with pytest.raises(RecipeError, match="contradicts itself: bits"):
        get_recipe({**data, "bits": want.bits + 1})


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 1.58, 2, 3, 4, 1.0, 0, 1.5, 5, 8, "2"]), group=GROUPS)
def test_paretoq_weight_keys_round_trip(bits, group):
    from fxquant.paretoq import ParetoQSpec
    data = {"method": "paretoq", "bits": bits, "group_size": group}
    try:
        want = ParetoQSpec(bits, group)
    except QuantSpecError:
        with pytest.raises(RecipeError):
            get_recipe(data)
        return
    r = get_recipe(data)
    assert r.weight == want and r.pipeline().names == ["analyze_structure", "insert_fake_quant", "train_qat",
                                                       "convert_fake_quant"]
    same(get_recipe(yaml.safe_load(yaml.safe_dump(r.to_dict()))), r)


# -- options: only the keys the method's passes read ----------------------------------------------------------------
KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=14)


@settings(max_examples=150, deadline=None)
@given(method=st.sampled_from(METHODS), key=KEYS)
def test_an_option_the_method_does_not_read_is_refused(method, key):
    if key in method_options(method):
        return
    base = {"fp32": "fp32", "rtn": "rtn-w4", "fp": "fp6", "gptq": "gptq-w4g128", "teq": "teq-w4g128", "fsbr": "fsbr-w8a8",
            "illm": "illm-w8a8", "paretoq": "paretoq-w2"}[method]
    with pytest.raises(RecipeError) as info:
        get_recipe({"base": base, "options": {key: 1}})
    err = info.value
    assert repr(key) in err.message and f"method {method}" in err.message and err.message.count("\n") == 0
    allowed = method_options(method)
    if allowed:
        assert all(k in err.hint for k in allowed)
    # a named recipe whose options were changed afterwards is refused too, before any pass is built
    r = get_recipe(base)
    r.options[key] = 1
    with pytest.raises(RecipeError, match=re.escape(repr(key))):
        get_recipe(r)
    with pytest.raises(RecipeError, match=re.escape(repr(key))):
        r.pipeline()


@settings(max_examples=60, deadline=None)
@given(method=st.sampled_from(TRAINED), data=st.data())
def test_a_misspelt_option_suggests_the_right_one(method, data):
    key = data.draw(st.sampled_from(sorted(k for k in method_options(method) if len(k) >= 5)))
    i = data.draw(st.integers(0, len(key) - 2))
    typo = key[:i] + key[i + 1] + key[i] + key[i + 2:]  # two letters swapped
    if typo in method_options(method):
        return
    with pytest.raises(RecipeError, match="did you mean"):
        base = {"teq": "teq-w4", "fsbr": "fsbr-w4a8", "illm": "illm-w4a8", "paretoq": "paretoq-w2"}[method]
        get_recipe({"base": base, "options": {typo: 1}})


def test_the_option_sets_come_from_the_config_dataclasses():
    from fxquant.passes.fsbr import FSBRConfig
    from fxquant.passes.lower_integer_only import IntegerOnlyConfig
    from fxquant.passes.round_weights_gptq import GPTQConfig
    from fxquant.passes.search_weight_clipping import ClipConfig
    from fxquant.passes.train_teq_scales import TEQConfig
    from fxquant.qat import QATConfig
    fields = lambda cls: {f.name for f in dataclasses.fields(cls)}  # noqa: E731
    assert method_options("teq") == fields(TEQConfig) | fields(ClipConfig) | fields(GPTQConfig) | {"gptq", "tokenizer"}
    assert method_options("gptq") == fields(GPTQConfig) | {"seq_len", "progress", "tokenizer"}
    assert method_options("fsbr") == fields(FSBRConfig) | fields(GPTQConfig) | {"gptq", "tokenizer"}
    illm_lowering = method_options("illm") - method_options("fsbr") - {"fsbr"}
    assert illm_lowering <= fields(IntegerOnlyConfig)
    assert method_options("paretoq") - {"checkpoint_dir", "resume", "tokenizer"} <= fields(QATConfig)
    for m in ("rtn", "fp", "fp32"):
        assert method_options(m) == frozenset()
    for m in TRAINED:  # checkpointing and the calibration tokenizer, for every trained method
        assert {*CHECKPOINT_OPTIONS, "tokenizer", "progress"} <= method_options(m), m


def _option_reads(path: Path) -> set[str]:
    """String keys read from recipe options in a source file: ``options.get("k")``, ``self.options.get("k")``,
    ``recipe.options.get("k")``, ``o.get("k")``, ``options["k"]`` (``ctx.options``, the pass context's, excluded)."""
    def is_recipe_options(node) -> bool:
        if isinstance(node, ast.Name):
            return node.id in ("options", "o")
        return isinstance(node, ast.Attribute) and node.attr == "options" and not (
            isinstance(node.value, ast.Name) and node.value.id == "ctx")
    keys = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and is_recipe_options(node.func.value) and node.args and isinstance(node.args[0], ast.Constant)):
            keys.add(node.args[0].value)
        if (isinstance(node, ast.Subscript) and is_recipe_options(node.value)
                and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
            keys.add(node.slice.value)
    return keys


def test_the_allowed_options_are_what_the_passes_read():
    """Every option a pass reads is allowed (else a recipe could not set it), and ParetoQ's pass — which has no
    config dataclass of its own — reads exactly the allowed keys (else an allowed key would silently do nothing)."""
    assert _option_reads(ROOT / "passes" / "train_paretoq.py") == method_options("paretoq")
    assert _option_reads(ROOT / "passes" / "train_teq_scales.py") <= method_options("teq")
    assert _option_reads(ROOT / "passes" / "fsbr.py") <= method_options("fsbr")
    assert _option_reads(ROOT / "compiler" / "recipes.py") <= method_options("illm") | method_options("teq")


def test_illm_integer_config_reads_its_options():
    from fxquant.passes.lower_integer_only import IntegerOnlyConfig
    assert illm_integer_config({}) == IntegerOnlyConfig(kv_cache="auto")    # a cache where the model allows one
    cfg = illm_integer_config({"act_bits": 4, "inner_bits": 12, "attn_bits": 6, "exp_order": 1, "softmax_clip": 10,
                               "epochs": 3, "kv_cache": False})
    assert (cfg.act_bits, cfg.inner_bits, cfg.attn_bits, cfg.exp_order, cfg.softmax_clip) == (4, 12, 6, 1, 10.0)
    assert cfg.kv_cache is False
    with pytest.raises(RecipeError, match="kv_cache must be true, false or 'auto'"):
        get_recipe({"base": "illm-w8a8", "options": {"kv_cache": "yes"}})


@pytest.mark.parametrize("options,needle", [
    ({"steps": -1}, "TEQ steps must be a non-negative integer"),
    ({"steps": 10.5}, "option steps must be an integer"),
    ({"lr": "1e-3"}, "option lr must be a number"),         # YAML's 1e-3 is a string
    ({"distill": 2.0}, "distill weight must lie in [0, 1]"),
    ({"save_every": 5}, "needs a checkpoint_dir"),
    ({"progress": "yes"}, "option progress must be true or false"),
])
def test_option_values_are_checked_when_the_recipe_is_built(options, needle):
    with pytest.raises(RecipeError) as info:
        get_recipe({"base": "teq-w4g128", "options": options})
    assert needle in info.value.message and info.value.message.startswith("recipe 'teq-w4g128': ")


@pytest.mark.parametrize("base,options,needle", [
    ("fsbr-w8a8", {"act_bits": 20}, "activation bits must lie in 2..16"),
    ("fsbr-w8a8", {"epochs": -1}, "epochs >= 0"),
    ("illm-w8a8", {"exp_order": 3}, "exp_order must be 1 or 2"),
    ("illm-w8a8", {"fsbr": "no"}, "option fsbr must be true or false"),
    ("paretoq-w2", {"steps": 0}, "QAT steps must be a positive integer"),
    ("paretoq-w2", {"lr": -1.0}, "learning rate must be a positive number"),
    ("paretoq-w2", {"save_every": 3}, "needs a checkpoint_dir"),
    ("paretoq-w2", {"lr": "2e-5"}, "option lr must be a number, or null"),
    ("paretoq-w2", {"scale_lr": "1e-2"}, "option scale_lr must be a number, or null for lr's"),
    ("paretoq-w2", {"scale_lr": 0.0}, "scale learning rate must be a positive number"),
])
def test_option_values_of_every_trained_method_are_checked(base, options, needle):
    with pytest.raises(RecipeError, match=re.escape(needle)):
        get_recipe({"base": base, "options": options})


def test_a_top_level_option_key_says_where_it_belongs():
    with pytest.raises(RecipeError, match=re.escape("unknown key(s) steps")) as info:
        get_recipe({"method": "teq", "bits": 4, "steps": 100})
    assert "steps is an option: put it under options:" in info.value.hint


def _readme_examples() -> list[str]:
    """The one-line recipe files of the README's "Recipes" section (its yaml block), read from the README itself."""
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("### Recipes"):]
    block = section[section.index("```yaml") + len("```yaml"):]
    return [line for line in block[:block.index("```")].strip().splitlines() if line.strip()]


#: one per method family
README_EXAMPLES = _readme_examples()


def test_the_readme_has_one_example_per_method_family():
    import yaml
    methods = set()
    for line in README_EXAMPLES:
        data = yaml.safe_load(line)
        methods.add(data.get("method") or get_recipe(data["base"]).method)
    assert methods == set(METHODS) - {"fp32"}, methods


@pytest.mark.parametrize("line", README_EXAMPLES)
def test_the_readme_examples_build(line, tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(line + "\n")
    r = get_recipe(str(f))
    assert r.name == "r" and r.pipeline().names[0] == "analyze_structure"
    same(get_recipe(yaml.safe_load(yaml.safe_dump(r.to_dict()))), r)


def test_the_yaml_1e_minus_3_trap_is_explained(tmp_path):
    f = tmp_path / "lr.yaml"
    f.write_text("base: teq-w4g128\noptions:\n  lr: 1e-3\n")
    with pytest.raises(RecipeError, match="lr must be a number") as info:
        get_recipe(str(f))
    assert "1.0e-3" in info.value.hint


# -- contradictions ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content,needle", [
    ("method: rtn\nbits: 4\nformat: e3m2\n", "contradicts itself: format is a minifloat setting"),
    ("method: rtn\nbits: 4\nscale_search: mse\n", "contradicts itself: scale_search"),
    ("method: rtn\nbits: 1.58\n", "bits must be an integer 1-8 for method rtn, got 1.58"),
    ("method: paretoq\nbits: 2\nper_tensor: true\n", "contradicts itself: per_tensor: True with method paretoq"),
    ("method: paretoq\nbits: 2\nsymmetric: false\n", "contradicts itself: symmetric: False with method paretoq"),
    ("method: paretoq\nbits: 2\nformat: e3m2\n", "contradicts itself: format"),
    ("method: paretoq\nbits: 6\n", "ParetoQ bits must be one of"),
    ("method: teq\nbits: 4\noptions: {act_bits: 8}\n", "unknown option 'act_bits' for method teq"),
    ("method: teq\nbits: 4\nact_bits: 8\n", "unknown key(s) act_bits"),
    ("method: teq\n", "needs bits (integer weights) or format"),
    ("method: teq\nformat: e3m2\nsymmetric: true\n", "contradicts itself: symmetric is an integer setting"),
    ("method: fp\nformat: e2m1\nbits: 6\n", "contradicts itself: bits: 6 and format fp4_e2m1 (4 bits)"),
    ("method: fp\nbits: 6\n", "needs a minifloat format"),
    ("method: fp\nformat: e5m5\n", "unknown minifloat format"),
    ("method: fp32\nformat: e3m2\n", "contradicts itself: method fp32 with format"),
    ("method: fp32\noptions: {steps: 3}\n", "method fp32 takes no options"),
    ("method: rtn\nbits: 4\noptions: {steps: 3}\n", "method rtn takes no options"),
    ("method: fsbr\nbits: 4\nper_tensor: true\n", "contradicts itself: per_tensor with method fsbr"),
    ("method: illm\nbits: 8\ngroup_size: 128\n", "contradicts itself: method illm with group_size: 128"),
    ("method: illm\nbits: 8\nsymmetric: false\n", "method illm with symmetric: False"),
    ("method: illm\nbits: 8\noptions: {fsbr: false, epochs: 2}\n", "contradicts itself: fsbr: false skips FSBR, so "
                                                                 "epochs: 2 would do nothing"),
    ("base: illm-w8a8\noptions: {fsbr: false, checkpoint_dir: ck}\n", "so checkpoint_dir: 'ck' would do nothing"),
    ("base: teq-w4g128\nmethod: rtn\n", "base teq-w4g128 is method teq, but method is rtn"),
    ("base: other.yaml\n", "base must be a built-in recipe name"),
    ("base: teq-w9\n", "base 'teq-w9': unknown recipe"),
    ("base: teq-w4g128\noptions: [1, 2]\n", "options must be a mapping"),
    ("method: paretoq\nbits: 2\noptions: {grad_clip: 0.5}\n", "unknown option 'grad_clip' for method paretoq"),
])
def test_contradictions_and_misplaced_keys_are_refused(content, needle, tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(content)
    with pytest.raises(RecipeError) as info:
        get_recipe(str(f))
    assert needle in info.value.message, info.value.message
    assert info.value.message.count("\n") == 0 and info.value.hint


def test_recipes_built_directly_are_checked_too():
    from fxquant.quant import QuantSpec
    with pytest.raises(RecipeError, match="unknown option 'stpes' for method teq"):
        Recipe(name="x", method="teq", weight=QuantSpec(bits=4), options={"stpes": 3})
    with pytest.raises(RecipeError, match="method paretoq takes a ParetoQSpec"):
        Recipe(name="x", method="paretoq", weight=QuantSpec(bits=4))
    with pytest.raises(RecipeError, match="symmetric per-channel"):
        Recipe(name="x", method="illm", weight=QuantSpec(bits=8, group_size=64))
    with pytest.raises(RecipeError, match="unknown method 'awq'"):
        Recipe(name="x", method="awq", weight=QuantSpec(bits=4))


def test_quantize_refuses_changed_options_before_capturing():
    import torch
    import fxquant
    recipe = get_recipe("teq-w4g128")
    recipe.options["stpes"] = 10

    class NoCapture(torch.nn.Module):
        def forward(self, x):  # pragma: no cover - quantize must stop before running or capturing it
            raise AssertionError("captured")
    with pytest.raises(RecipeError, match="did you mean 'steps'"):
        fxquant.quantize(NoCapture(), recipe, calibration=torch.zeros(600, dtype=torch.long))


# -- the CLI's training flags write options that validate --------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["teq-w4g128", "teq-fp6", "fsbr-w8a8", "illm-w8a8", "paretoq-w2", "FILE"])
def test_cli_steps_and_checkpoint_flags_pass_validation(recipe, tmp_path, monkeypatch):
    import fxquant.data
    import fxquant.recipes
    from fxquant.cli import main
    from fxquant.errors import DataError
    from_file = recipe == "FILE"
    if from_file:
        recipe = yaml_file(tmp_path, {"base": "teq-w2g64", "options": {"distill": 0.25}}, "mine.yaml")
    seen = []
    real = fxquant.recipes.get_recipe

    def spy(x):
        r = real(x)
        seen.append(r)
        return r

    def stop(*args, **kwargs):  # the CLI reads the calibration text after setting the options, before loading
        seen.append("stopped")
        raise DataError("stop here", "test")
    monkeypatch.setattr(fxquant.recipes, "get_recipe", spy)
    monkeypatch.setattr(fxquant.data, "calibration_text", stop)
    ck = str(tmp_path / "ck")
    assert main(["quantize", "--recipe", recipe, "--steps", "7", "--checkpoint-dir", ck, "--save-every", "2",
                 "--resume", "auto", "--out", str(tmp_path / "o")]) != 0
    assert seen[-1] == "stopped"  # every flag was accepted: the CLI went on to read the calibration text
    r = [x for x in seen if isinstance(x, Recipe)][-1]  # the outer call returns last (a base is built inside it)
    assert r.options[("epochs" if r.method in ("fsbr", "illm") else "steps")] == 7
    assert (r.options["checkpoint_dir"], r.options["save_every"], r.options["resume"]) == (ck, 2, "auto")
    assert r.options.get("distill") == (0.25 if from_file else None)
    r.validate()
    r.pipeline()


def test_paretoq_recipes_train_their_scales_at_their_own_lr_and_null_gives_the_papers_back():
    from fxquant.recipes import LSQ_SCALE_LR, SEQ_SCALE_LR
    for name in ("paretoq-w1.58", "paretoq-w2"):
        assert get_recipe(name).options["scale_lr"] == SEQ_SCALE_LR == 3e-2
        assert "own lr 0.03" in get_recipe(name).description
    for name in ("paretoq-w3", "paretoq-w4"):
        assert get_recipe(name).options["scale_lr"] == LSQ_SCALE_LR == 5e-3
        assert "own lr 0.005" in get_recipe(name).description
    assert "scale_lr" not in get_recipe("paretoq-w1").options   # binary: the paper's shared lr
    assert get_recipe({"base": "paretoq-w2", "options": {"scale_lr": None}}).options["scale_lr"] is None
    # a file's width decides, not its base's: 2-bit base -> 4-bit LSQ takes LSQ's, 2-bit -> binary drops it,
    # a 1-bit base -> ternary gains SEQ's
    assert get_recipe({"base": "paretoq-w2", "bits": 4}).options["scale_lr"] == LSQ_SCALE_LR
    assert "scale_lr" not in get_recipe({"base": "paretoq-w2", "bits": 1}).options
    assert get_recipe({"base": "paretoq-w1", "bits": 1.58}).options["scale_lr"] == SEQ_SCALE_LR
    assert get_recipe({"method": "paretoq", "bits": 2}).options["scale_lr"] == SEQ_SCALE_LR
    assert get_recipe({"base": "paretoq-w2", "bits": 4, "options": {"scale_lr": 1e-3}}).options["scale_lr"] == 1e-3
