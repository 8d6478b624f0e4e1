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


def test_bench_times_small_gemms_and_writes_the_report(tmp_path, capsys):
    """`fxquant bench` on this machine with tiny shapes: every format checked against its reference, then timed at
    each M against torch.matmul; the JSON and the Markdown report land in --out."""
    assert main(["bench", "--shapes", "64x96,40x72", "--rows", "1,3", "--no-e2e", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("bench_*.json")
    data = json.loads(js.read_text())
    rows = data["gemm"]
    assert {(r["N"], r["K"], r["M"]) for r in rows} == {(n, k, m) for n, k in ((64, 96), (40, 72)) for m in (1, 3)}
    assert len(rows) == 8 and all(r["ms_quant"] > 0 and r["ms_float"] > 0 and r["speedup"] > 0 for r in rows)
    assert data["command"].startswith("fxquant bench") or "bench" in data["command"]
    md = js.with_suffix(".md").read_text()
    assert "| int4 (w4g128) | 64 | 96 | 1 |" in md and data["device"] in md


@pytest.mark.parametrize("args,needle", [(["--shapes", "64by96"], "cannot read shapes"),
                                         (["--rows", "0"], "positive integer")])
def test_bench_refuses_bad_shapes_in_one_line(tmp_path, capsys, args, needle):
    assert main(["bench", *args, "--no-e2e", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.count("\n") == 0
