"""The pass base, the ordered pipeline, the verifier and FXQUANT_DEBUG dumps."""
from __future__ import annotations

import json

import pytest
import torch

import fxquant
from fxquant import Pass, PassContext, PassError, PassResult, Pipeline


class ScaleOutput(Pass):
    """Multiplies the graph output by 1.0 (adds one node): a harmless rewrite to observe the pipeline."""

    name = "scale_output"

    def call(self, cg, ctx):
        graph = cg.gm.graph
        out = next(n for n in graph.nodes if n.op == "output")
        value = out.args[0][0]
        with graph.inserting_before(out):
            mul = graph.call_function(torch.ops.aten.mul.Tensor, (value, 1.0))
        out.args = ((mul,),)
        return PassResult(True, {"rewritten": 1})

    def ensures(self, cg, ctx):
        out = next(n for n in cg.gm.graph.nodes if n.op == "output")
        if out.args[0][0].target != torch.ops.aten.mul.Tensor:
            raise PassError("output is not scaled")


class Noop(Pass):
    name = "do_nothing"

    def call(self, cg, ctx):
        return PassResult(False)


class LeavesDanglingPlaceholder(Pass):
    name = "broken_pass"

    def call(self, cg, ctx):
        first = next(iter(cg.gm.graph.nodes))
        with cg.gm.graph.inserting_before(first):
            cg.gm.graph.placeholder("orphan")
        return PassResult(True)


class ReturnsNothing(Pass):
    name = "returns_nothing"

    def call(self, cg, ctx):
        return None


class NeedsStructure(Pass):
    name = "needs_structure"

    def requires(self, cg, ctx):
        if "structure" not in ctx.artifacts:
            raise PassError("needs_structure requires analyze_structure to run first")

    def call(self, cg, ctx):
        return PassResult(False)


def test_pipeline_runs_in_order_and_records(tiny_llama):
    cg = fxquant.capture(tiny_llama)
    x = torch.randint(0, 128, (1, 7))
    ref = cg(x)
    records = Pipeline([Noop(), ScaleOutput()]).run(cg, verify=True)
    assert [r.name for r in records] == ["do_nothing", "scale_output"]
    assert records[0].modified is False and records[0].added == 0
    assert records[1].modified is True and records[1].added == 1 and records[1].removed == 0
    assert records[1].stats == {"rewritten": 1}
    assert torch.equal(cg(x), ref)


def test_debug_dir_writes_numbered_files_and_summary(tiny_llama, tmp_path):
    cg = fxquant.capture(tiny_llama)
    Pipeline([Noop(), ScaleOutput()]).run(cg, debug_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["000_capture.py", "001_do_nothing.py", "002_scale_output.py", "summary.json", "summary.txt"]
    assert "aten.mul.Tensor" in (tmp_path / "002_scale_output.py").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [p["name"] for p in summary["passes"]] == ["do_nothing", "scale_output"]
    assert summary["passes"][1]["added"] == 1
    assert "scale_output" in (tmp_path / "summary.txt").read_text()


def test_env_var_turns_on_dumps(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("FXQUANT_DEBUG", str(tmp_path / "dump"))
    cg = fxquant.capture(tiny_llama)
    Pipeline([ScaleOutput()]).run(cg)
    assert (tmp_path / "dump" / "001_scale_output.py").is_file()


def test_verifier_catches_a_broken_pass(tiny_llama):
    cg = fxquant.capture(tiny_llama)
    with pytest.raises(PassError, match="broken_pass.*orphan"):
        Pipeline([LeavesDanglingPlaceholder()]).run(cg, verify=True)


def test_pass_must_return_pass_result(tiny_llama):
    cg = fxquant.capture(tiny_llama)
    with pytest.raises(PassError, match="returns_nothing"):
        Pipeline([ReturnsNothing()]).run(cg)


def test_requires_is_checked_before_the_pass(tiny_llama):
    cg = fxquant.capture(tiny_llama)
    with pytest.raises(PassError, match="analyze_structure"):
        Pipeline([NeedsStructure()]).run(cg, PassContext())


def test_pass_names_are_checked():
    bad = Noop()
    bad.name = "Bad Name"
    with pytest.raises(PassError, match="snake_case"):
        Pipeline([bad])


def test_verifier_is_on_in_tests():
    import os
    assert os.environ.get("FXQUANT_VERIFY") == "1"
