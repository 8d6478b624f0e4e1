"""Recipes by name and from files; bad recipes give one-line errors that say what is allowed."""
from __future__ import annotations

import json

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
    ("method: gptq\nbits: 4\n", "unknown method"),
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
