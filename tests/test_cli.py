"""The command line: listing, one-line errors, eval with JSON, quantize with dumps and a loadable checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

from fxquant.cli import main


def test_recipes_lists_names(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ["fp32", "rtn-w8", "rtn-w4", "rtn-w4g128", "rtn-w3g128", "rtn-w2g64", "rtn-w4g128a"]:
        assert any(line.split()[0] == name for line in out.splitlines())


@pytest.mark.parametrize("recipe,needle", [
    ("rtn-w9", "1 to 8"), ("rtn-w4g0", "positive integer"), ("rtn-w4g-3", "positive integer"),
    ("bogus", "unknown recipe"),
])
def test_bad_recipe_is_one_line(capsys, recipe, needle):
    assert main(["eval", "--recipe", recipe, "--windows", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err and "Traceback" not in err


def test_missing_model_path_is_one_line(capsys, tmp_path):
    assert main(["eval", "--model", str(tmp_path / "nowhere"), "--windows", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and err.count("\n") == 0


def test_help_explains_every_option(capsys):
    for cmd in (["eval"], ["quantize"], ["generate"]):
        with pytest.raises(SystemExit):
            main([*cmd, "--help"])
        out = capsys.readouterr().out
        for opt in ("--model", "--recipe"):
            assert opt in out


@pytest.mark.slow
def test_eval_writes_json_with_baseline(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--model", "smollm2", "--recipe", "rtn-w8", "--windows", "2", "--baseline",
                 "--no-progress", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    for key in ("model", "recipe", "ppl", "tokens", "weight_bytes"):
        assert key in data
    assert data["recipe"] == "rtn-w8" and data["tokens"] == 2 * 511
    base = data["baseline"]["ppl"]
    assert abs(data["ppl"] / base - 1) < 0.01  # 8-bit RTN is within 1% of float on two windows
    assert data["weight_bytes"] < data["baseline"]["weight_bytes"]
    table = capsys.readouterr().out
    assert "fp32" in table and "rtn-w8" in table


@pytest.mark.slow
def test_quantize_dumps_and_saves_a_loadable_checkpoint(tmp_path, monkeypatch, capsys):
    dump = tmp_path / "dump"
    monkeypatch.setenv("FXQUANT_DEBUG", str(dump))
    out = tmp_path / "q"
    assert main(["quantize", "--model", "smollm2", "--recipe", "rtn-w4g128", "--out", str(out)]) == 0
    names = sorted(p.name for p in dump.iterdir())
    assert names[:3] == ["000_capture.py", "001_analyze_structure.py", "002_quantize_weights_rtn.py"]
    assert "summary.json" in names
    assert "quantize_weights_rtn" in (dump / "summary.txt").read_text()
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "fxquant" and qc["bits"] == 4 and qc["group_size"] == 128
    assert (out / "fxquant_packed.safetensors").is_file()
    assert not list(out.glob("*.bin"))

    from fxquant import load_model
    lm = load_model(str(out))
    from fxquant.quant import QuantSpec, quantize_weight
    w = lm.model.model.layers[3].mlp.down_proj.weight.detach()
    # the saved weights lie exactly on the 4-bit grid: re-quantizing them is the identity
    assert torch.equal(quantize_weight(w, QuantSpec(4, group_size=128)).dequantize(), w)
    # and the non-empty output folder is refused without --overwrite
    assert main(["quantize", "--model", "smollm2", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
