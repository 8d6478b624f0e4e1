"""examples/bench_qat.py (issue #5): RTN vs ParetoQ QAT vs torchao QAT, on the tiny LLaMA in a few steps.

The torchao part runs only where torchao is installed (it is an optional ``bench`` extra); without it, the script
must still run the other methods and say that it skipped torchao.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_model_folder

ROOT = Path(__file__).resolve().parent.parent
STEPS, EVERY = 4, 2


def _bench():
    spec = importlib.util.spec_from_file_location("bench_qat_example", ROOT / "examples" / "bench_qat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, methods: str, *extra: str) -> tuple[dict, Path]:
    folder, text = make_tiny_model_folder(tmp_path)
    out = tmp_path / "results" / ("qat_tiny_extra" if extra else "qat_tiny")
    report = _bench().main(["--model", str(folder), "--calib", str(text), "--data", str(text), "--methods", methods,
                            "--steps", str(STEPS), "--eval-every", str(EVERY), "--batch-size", "2", "--seq-len", "32",
                            "--eval-windows", "2", "--eval-seq-len", "64", "--lr", "1e-3", "--threads", "1",
                            "--no-progress", "--out", str(out), *extra])
    return report, out


def _check(report: dict, out: Path, methods: list[str]) -> None:
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["budget"]["steps"] == STEPS and saved["budget"]["reduced_from_issue"]
    assert math.isfinite(saved["float_ppl"])
    assert set(saved["widths"]) == {"2", "1.58"}
    for label, entry in saved["widths"].items():
        assert set(entry["methods"]) == set(methods), label
        for name, m in entry["methods"].items():
            steps = [c["step"] for c in m["curve"]]
            assert steps == [0, 2, 4], (label, name)
            assert all(math.isfinite(c["ppl"]) and c["ppl"] > 1 for c in m["curve"]), (label, name)
            assert m["trained_steps"] == (0 if name == "rtn" else STEPS)
            if name != "rtn":
                assert len(m["losses"]) == STEPS and all(math.isfinite(x) for x in m["losses"])
        # ParetoQ starts from RTN: the step-0 point of its curve is the RTN model
        assert entry["methods"]["paretoq"]["curve"][0]["ppl"] == pytest.approx(entry["methods"]["rtn"]["final_ppl"])
        assert entry["verdict"].startswith("ParetoQ")
    md = out.with_suffix(".md").read_text()
    assert "Command: `python examples/bench_qat.py" in md and "Reduced from the issue's 300 steps" in md
    assert report["widths"].keys() == saved["widths"].keys()


def test_bench_qat_without_torchao(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchao", None)  # as in CI: torchao not installed
    report, out = _run(tmp_path, "rtn,paretoq,torchao")
    assert "torchao QAT: SKIPPED" in capsys.readouterr().out
    assert report["skipped"] == ["torchao: not installed"]
    _check(report, out, ["rtn", "paretoq"])
    assert "Skipped: torchao: not installed" in out.with_suffix(".md").read_text()


def test_bench_qat_with_torchao(tmp_path):
    pytest.importorskip("torchao.quantization.qat")
    report, out = _run(tmp_path, "rtn,paretoq,torchao")
    _check(report, out, ["rtn", "paretoq", "torchao"])
    two, ternary = report["widths"]["2"]["methods"]["torchao"], report["widths"]["1.58"]["methods"]["torchao"]
    assert "int2" in two["quantizer"] and ternary["reused_from_width"] == "2"
    assert ternary["curve"] == two["curve"]
    # torchao and ParetoQ saw the same data: the same number of steps and tokens, and the same quantized linears
    assert len(two["losses"]) == len(report["widths"]["2"]["methods"]["paretoq"]["losses"])


def test_bench_qat_scale_lr_trains_only_paretoq_scales_at_their_own_lr(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    plain, _ = _run(tmp_path, "rtn,paretoq")
    report, out = _run(tmp_path, "rtn,paretoq", "--scale-lr", "0.05")
    _check(report, out, ["rtn", "paretoq"])
    assert report["budget"]["paretoq_scale_lr"] == 0.05 and plain["budget"]["paretoq_scale_lr"] is None
    md = out.with_suffix(".md").read_text()
    assert "ParetoQ QAT (fxquant), scales at lr 0.05" in md and "own AdamW group at peak lr 0.05" in md
    for width in ("2", "1.58"):
        fast, slow = report["widths"][width]["methods"]["paretoq"], plain["widths"][width]["methods"]["paretoq"]
        assert fast["curve"][0] == slow["curve"][0]      # the same start (RTN) ...
        assert fast["losses"][0] == slow["losses"][0]    # ... and the same first batch
        assert fast["losses"][1:] != slow["losses"][1:]  # then the scales' own lr changes the run


def test_bench_qat_runs_a_width_torchao_is_not_compared_at(tmp_path, monkeypatch, capsys):
    """--widths 4: RTN and ParetoQ run; torchao (compared at 2-bit and ternary only) is skipped with a line."""
    folder, text = make_tiny_model_folder(tmp_path)
    bench = _bench()
    # torchao "available" whether or not it is installed: the width check must skip it before it is ever used
    monkeypatch.setattr(bench, "_import_torchao", lambda: {"version": "stand-in"})
    report = bench.main(["--model", str(folder), "--calib", str(text), "--data", str(text), "--widths", "4",
                         "--steps", "2", "--eval-every", "0", "--batch-size", "2", "--seq-len", "32",
                         "--eval-windows", "1", "--eval-seq-len", "64", "--lr", "1e-3", "--threads", "1",
                         "--no-progress", "--no-plot", "--out", str(tmp_path / "w4")])
    entry = report["widths"]["4"]
    assert report["skipped"] == ["torchao at 4-bit: no torchao config is compared at this width (2-bit and ternary only)"]
    assert "torchao at 4-bit" in capsys.readouterr().out
    assert set(entry["methods"]) == {"rtn", "paretoq"} and entry["methods"]["paretoq"]["trained_steps"] == 2


def test_bench_qat_resume_finishes_an_interrupted_run_as_one_run_would(tmp_path, monkeypatch, capsys):
    """--resume keeps the finished (width, method) pairs, trains only the missing one, and gets its exact numbers."""
    monkeypatch.setitem(sys.modules, "torchao", None)
    whole, out = _run(tmp_path, "rtn,paretoq")
    # interrupt: the ternary ParetoQ run never finished
    saved = json.loads(out.with_suffix(".json").read_text())
    del saved["widths"]["1.58"]["methods"]["paretoq"], saved["widths"]["1.58"]["verdict"]
    out.with_suffix(".json").write_text(json.dumps(saved))
    bench = _bench()
    trained = []
    real_train = bench.train_qat
    monkeypatch.setattr(bench, "train_qat", lambda *a, **k: trained.append(k["bits"]) or real_train(*a, **k))
    folder, text = make_tiny_model_folder(tmp_path)
    argv = ["--model", str(folder), "--calib", str(text), "--data", str(text), "--methods", "rtn,paretoq",
            "--steps", str(STEPS), "--eval-every", str(EVERY), "--batch-size", "2", "--seq-len", "32",
            "--eval-windows", "2", "--eval-seq-len", "64", "--lr", "1e-3", "--threads", "1",
            "--no-progress", "--out", str(out)]
    resumed = bench.main([*argv, "--resume"])
    assert trained == [1.58]                                   # only the missing run trained
    assert "resumed: rtn, paretoq at 2-bit kept" in capsys.readouterr().out
    _check(resumed, out, ["rtn", "paretoq"])
    for width in ("2", "1.58"):
        for name in ("rtn", "paretoq"):
            a, b = whole["widths"][width]["methods"][name], resumed["widths"][width]["methods"][name]
            assert a["curve"] == b["curve"] and a.get("losses") == b.get("losses"), (width, name)
        assert resumed["widths"][width]["verdict"] == whole["widths"][width]["verdict"]
    assert resumed["float_ppl"] == whole["float_ppl"] and len(resumed["resumed_by"]) == 1
    assert "interrupted and finished by `python examples/bench_qat.py" in out.with_suffix(".md").read_text()

    # a resume with another budget would mix unlike runs in one table: refused, saying what differs
    argv[argv.index("--steps") + 1] = str(STEPS + 2)
    with pytest.raises(SystemExit, match=r"other settings \(budget\.steps 4 != 6.*eval\.steps"):
        bench.main([*argv, "--resume"])
