"""``fxquant pareto`` / ``fxquant qat`` plumbing: the front, the size accounting, the plot, the parsers."""
from __future__ import annotations

import argparse
import math

import pytest
import torch
from conftest import make_tiny_llama

from fxquant.errors import RecipeError
from fxquant.pareto import add_pareto_parser, packed_model_bytes, pareto_front, plot_pareto
from fxquant.paretoq import ParetoQSpec, convert, paretoq_weights, prepare_qat
from fxquant.qat import QATConfig, add_qat_parser, default_lr


def _pt(name, size, ppl, method="rtn"):
    return {"recipe": name, "method": method, "bits": 4, "size_bytes": size, "linear_bytes": size // 2, "ppl": ppl}


def test_front_keeps_exactly_the_undominated_points():
    pts = [_pt("a", 100, 10.0), _pt("b", 50, 12.0), _pt("c", 60, 13.0),  # c: larger and worse than b
           _pt("d", 20, 40.0), _pt("e", 20, 50.0), _pt("f", 10, float("nan")), _pt("g", 100, 10.0)]
    assert pareto_front(pts) == [0, 1, 3, 6]  # a and g tie: neither strictly dominates the other


def test_packed_size_counts_packed_linears_and_fp16_rest():
    model = make_tiny_llama(seed=0)
    prepare_qat(model, ParetoQSpec(2))
    convert(model, packed=False)
    q = paretoq_weights(model)
    total, linear = packed_model_bytes(model, q)
    n_linear = sum(v.codes.numel() for v in q.values())
    assert linear == sum(v.packed_nbytes() for v in q.values())
    # 2-bit codes (4 a byte) + one fp32 scale per row
    assert linear == sum(v.codes.shape[0] * (-(-v.codes.shape[1] // 4) + 4) for v in q.values())
    assert linear < n_linear * 2 / 6
    other = sum(p.numel() for n, p in model.named_parameters() if n not in q)
    assert total == linear + 2 * other


def test_plot_writes_png(tmp_path):
    pts = [_pt("fp32", 270e6, 18.0, "fp32"), _pt("rtn-w4", 80e6, 40.0), _pt("paretoq-w2", 45e6, 300.0, "paretoq")]
    path = plot_pareto(pts, pareto_front(pts), tmp_path / "p.png", "test")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"


def test_parsers_and_defaults():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_qat_parser(sub)
    add_pareto_parser(sub)
    a = parser.parse_args(["qat", "--model", "m", "--recipe", "paretoq-w1.58", "--steps", "5", "--resume", "ck/step-000002"])
    assert (a.model, a.recipe, a.steps, a.resume, a.scale_lr) == ("m", "paretoq-w1.58", 5, "ck/step-000002", None)
    assert parser.parse_args(["qat", "--scale-lr", "1e-2"]).scale_lr == 1e-2
    b = parser.parse_args(["pareto", "--model", "m", "--recipes", "rtn-w4", "paretoq-w2", "--steps", "3"])
    assert b.recipes == ["rtn-w4", "paretoq-w2"] and b.steps == 3
    assert default_lr(2) == 2e-5 and default_lr(1.58) == 2e-5 and default_lr(3) == 1e-5
    with pytest.raises(RecipeError, match="steps"):
        QATConfig(steps=0)
    with pytest.raises(RecipeError, match="learning rate"):
        QATConfig(lr=-1.0)
    assert math.isclose(QATConfig().steps, 200)


def test_cosine_schedule_ends_at_zero():
    from fxquant.qat import make_optimizer
    model = torch.nn.Linear(4, 4)
    opt, sched = make_optimizer(model, 1e-3, steps=10)
    lrs = []
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs[4] == pytest.approx(5e-4)
    assert opt.param_groups[0]["weight_decay"] == 0.0
