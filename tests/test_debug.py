"""fxquant debug: per-pass dumps, diffs, JSON and the HTML report (rendered in headless Chromium)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from fxquant.cli import main
from fxquant.debug import debug_recipe, sqnr_db
from fxquant.debug_html import SECTIONS

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def chromium_or_skip() -> str:
    """Chromium's path; skips where it is absent, but fails in CI (.ci/run installs Debian's chromium)."""
    if CHROMIUM is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but chromium is not installed: `apt-get install -y chromium` (make ci-setup)")
        pytest.skip("chromium is not installed (apt-get install -y chromium); the report is not rendered")
    return CHROMIUM


def render(html: Path, screenshot: Path | None = None) -> tuple[str, str]:
    """(rendered DOM, browser log) of ``html`` in headless Chromium, no network, no profile left behind."""
    exe = chromium_or_skip()
    with tempfile.TemporaryDirectory() as profile:
        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--window-size=1400,2600",
                "--hide-scrollbars"]
        if screenshot is not None:
            args.append(f"--screenshot={screenshot}")
        else:
            args.append("--dump-dom")
        done = subprocess.run([*args, html.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


def check_rendered(dom: str, log: str) -> None:
    assert 'data-fxquant-report="ready"' in dom, "the report's script did not finish (or a section is missing)"
    for section in SECTIONS:
        assert f'id="{section}"' in dom
    assert dom.count("<svg") >= 4  # two error lines, the bars, the heat map or the structure
    console = [ln for ln in log.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("debug")
    model = make_tiny_llama(layers=2)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    return debug_recipe(model, "rtn-w4g32", inputs=ids, out_dir=out), model, ids


def test_report_files_and_numbers(tiny_report):
    report, model, ids = tiny_report
    out = report.out_dir
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000_capture.py", "001_analyze_structure.diff", "001_analyze_structure.py",
                     "002_quantize_weights_rtn.diff", "002_quantize_weights_rtn.py", "report.html", "report.json"]
    data = json.loads((out / "report.json").read_text())
    analyze, rtn = data["passes"]
    assert analyze["logits_exact"] and analyze["layers_changed"] == 0 and analyze["added"] == 0
    assert analyze["diff_added_lines"] > 0 and "structure" in (out / "001_analyze_structure.diff").read_text()
    assert rtn["stats"]["quantized"] == 14 and not rtn["logits_exact"] and rtn["layers_changed"] == 14
    assert "+" in (out / "002_quantize_weights_rtn.diff").read_text()  # the quant annotations appear
    # the logits SQNR is the one of the model with fake-quantized weights, computed independently here
    from fxquant.quant import fake_quantize
    ref = model(ids).logits
    quant = make_tiny_llama(layers=2)
    with torch.no_grad():
        for name, p in quant.named_parameters():
            if p.dim() == 2 and "proj" in name:
                p.copy_(fake_quantize(p, report.recipe.weight))
        expected = sqnr_db(ref, quant(ids).logits)
    assert math.isclose(rtn["logits_sqnr_db"], expected, abs_tol=1e-3)
    # ranking: worst first by local SQNR, lm_head (excluded) exact and last
    layers = data["layers"]
    finite = [layer for layer in layers if not layer["exact"]]
    assert data["worst_layer"] == min(finite, key=lambda e: e["sqnr_db"])["name"]
    assert [e["sqnr_db"] for e in finite] == sorted(e["sqnr_db"] for e in finite)
    assert layers[-1]["name"] == "lm_head" and layers[-1]["exact"]
    assert model.model.layers[0].mlp.up_proj.weight.abs().sum() > 0 and torch.equal(ref, model(ids).logits)


def test_report_renders_in_chromium(tiny_report):
    report, _, _ = tiny_report
    dom, log = render(report.out_dir / "report.html")
    check_rendered(dom, log)
    assert f'<b id="worst-layer">{report.worst_layers[0]}</b>' in dom


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["debug", "--recipe", "rtn-w99", "--out", str(tmp_path)]) == 2
    assert "bits must be an integer from 1 to 8" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_cli_writes_dumps_json_html_and_names_the_worst_layer(tmp_path):
    out = tmp_path / "smollm2"
    assert main(["debug", "--model", "smollm2", "--recipe", "rtn-w4g128", "--out", str(out), "--samples", "1",
                 "--seq-len", "64"]) == 0
    for name in ("000_capture.py", "001_analyze_structure.py", "002_quantize_weights_rtn.py", "report.json",
                 "report.html"):
        assert (out / name).is_file(), name
    data = json.loads((out / "report.json").read_text())
    assert data["passes"][-1]["stats"]["quantized"] == 210  # 30 layers x 7 linears; lm_head stays float
    finite = [e for e in data["layers"] if not e["exact"]]
    assert len(finite) == 210
    assert data["worst_layer"] == min(finite, key=lambda e: e["sqnr_db"])["name"]
    dom, log = render(out / "report.html")
    check_rendered(dom, log)
    assert data["worst_layer"] in dom
