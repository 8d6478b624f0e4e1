"""Distributed ParetoQ QAT (issue #9): two CPU processes on gloo train exactly what one process trains on the same
global batch — under DDP and under FSDP2 — and their checkpoints resume anywhere.

The two workers are spawned once per module (``_runs``); each runs, in order: DDP 6 steps (checkpoints at 3 and 6),
FSDP2 6 steps (the same), FSDP2 resumed from the DDP step-3 checkpoint, DDP resumed from the FSDP2 step-3 checkpoint,
and an indivisible global batch. The parent process runs the single-process reference. The last distributed test
runs the ``fxquant qat`` command itself under ``torchrun`` (FSDP2) against one process.
"""
from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import make_tiny_llama

from fxquant.errors import RecipeError
from fxquant.paretoq import ParetoQSpec, prepare_qat, scales
from fxquant.qat import QATConfig, full_state_dict, train_qat

WORLD = 2
STEPS = 6
BITS = 2
# lr large enough that the scales move visibly in 6 steps; grad_clip small enough that clipping is active
CFG = dict(steps=STEPS, batch_size=4, seq_len=16, lr=5e-3, grad_clip=0.5, progress=False, seed=3)
RTOL, ATOL = 1e-5, 1e-6


def _ids(n: int = 2048, vocab: int = 128) -> torch.Tensor:
    base = torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(0))
    return base.repeat(n // 40 + 1)[:n]


def _model() -> torch.nn.Module:
    model = make_tiny_llama(layers=2, seed=7)  # the same init on every rank and in the reference
    prepare_qat(model, ParetoQSpec(BITS))
    return model


def _alphas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith("weight_alpha")}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        ids, results = _ids(), {}

        def run(name: str, sharding: str, **kw) -> None:
            model = _model()
            seen: list[list[list[int]]] = []  # the token ids this rank trained on, step by step
            model.model.embed_tokens.register_forward_pre_hook(
                lambda mod, args: seen.append(args[0].tolist()) if torch.is_grad_enabled() else None)
            hist = train_qat(model, ids, QATConfig(sharding=sharding, save_every=3, **CFG),
                             checkpoint_dir=os.path.join(out, name), **kw)
            state = full_state_dict(model)  # collective under FSDP2
            results[name] = {"losses": hist.losses, "start": hist.start_step, "batches": seen}
            if rank == 0:
                results[name]["layer0_q_alpha"] = state["model.layers.0.self_attn.q_proj.weight_alpha"].tolist()
                torch.save(_alphas(state), os.path.join(out, f"{name}.alphas.pt"))
            results[name]["fsdp_params"] = sum(type(p).__name__ == "DTensor" for p in model.parameters())

        run("ddp", "ddp")
        run("fsdp", "fsdp")
        run("fsdp_from_ddp", "fsdp", resume=os.path.join(out, "ddp", "step-000003"))
        run("ddp_from_fsdp", "ddp", resume=os.path.join(out, "fsdp", "step-000003"))
        try:
            train_qat(_model(), ids, QATConfig(**{**CFG, "batch_size": 3}))
            results["indivisible"] = None
        except RecipeError as exc:
            results["indivisible"] = exc.message
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("qat_dist")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return out, ranks


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the same global batch of 4, the same seed."""
    out = tmp_path_factory.mktemp("qat_single")
    model = _model()
    hist = train_qat(model, _ids(), QATConfig(save_every=3, **CFG), checkpoint_dir=out)
    return hist.losses, scales(model)


def _close(a, b) -> None:
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(runs, reference, name):
    out, ranks = runs
    ref_losses, ref_scales = reference
    assert len(ref_losses) == STEPS and ref_losses[-1] < ref_losses[0]
    for r in ranks:  # every rank reports the same global-mean losses
        assert len(r[name]["losses"]) == STEPS
        _close(r[name]["losses"], ref_losses)
    assert ranks[0][name]["losses"] == ranks[1][name]["losses"]
    # FSDP2 really sharded the model (DTensor parameters); DDP left it a plain module
    assert (ranks[0][name]["fsdp_params"] > 0) == (name == "fsdp")
    got = torch.load(out / f"{name}.alphas.pt", weights_only=True)
    assert set(got) == set(ref_scales) and len(got) == 2 * 7
    start = scales(_model())
    assert all(not torch.equal(ref_scales[k], start[k]) for k in ref_scales)  # the scales moved
    for k in ref_scales:
        torch.testing.assert_close(got[k], ref_scales[k], rtol=RTOL, atol=ATOL, msg=k)


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_checkpoint_written_by_two_processes_resumes_in_one(runs, reference, name):
    out, ranks = runs
    ref_losses, ref_scales = reference
    step3 = out / name / "step-000003"
    assert (out / name / "step-000006").is_dir() and step3.is_dir()
    model = _model()
    hist = train_qat(model, _ids(), QATConfig(**CFG), resume=step3)  # plain keys: loads into the plain model
    assert hist.start_step == 3
    _close(hist.losses, ref_losses[3:])
    for k, v in scales(model).items():
        torch.testing.assert_close(v, ref_scales[k], rtol=RTOL, atol=ATOL, msg=k)


def test_resume_under_ddp_and_fsdp_every_rank_loads_the_checkpoint(runs, reference):
    _, ranks = runs
    ref_losses, _ = reference
    for r in ranks:
        for name in ("fsdp_from_ddp", "ddp_from_fsdp"):
            assert r[name]["start"] == 3
            _close(r[name]["losses"], ref_losses[3:])
    assert len(ranks[0]["fsdp_from_ddp"]["layer0_q_alpha"]) == 64  # q_proj: 64 output rows, one scale each
    _close(ranks[0]["fsdp_from_ddp"]["layer0_q_alpha"], ranks[0]["ddp"]["layer0_q_alpha"])


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_each_rank_trains_its_contiguous_slice_of_the_global_batch(runs, name):
    from fxquant.qat import _batch
    _, ranks = runs
    gen = torch.Generator().manual_seed(CFG["seed"])  # the single process's data order
    for step in range(STEPS):
        want = _batch(_ids(), CFG["batch_size"], CFG["seq_len"], gen)
        got = [torch.tensor(r[name]["batches"][step]) for r in ranks]
        assert all(g.shape == (CFG["batch_size"] // WORLD, CFG["seq_len"]) for g in got)
        assert torch.equal(torch.cat(got), want), step


def test_global_batch_must_divide_among_ranks(runs):
    _, ranks = runs
    for r in ranks:
        assert r["indivisible"] is not None and "does not divide among 2 processes" in r["indivisible"]


def test_fxquant_qat_under_torchrun_fsdp_matches_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m fxquant.qat --sharding fsdp` on a saved tiny LLaMA: the same losses and final
    perplexity as `python -m fxquant.qat` in one process; rank 0 alone prints and writes --out / --json."""
    import random
    import shutil
    import subprocess

    from fxquant.models import builtin_path
    from fxquant.qat import main

    folder = tmp_path / "tiny"
    make_tiny_llama(layers=2, vocab=30522, seed=4).save_pretrained(folder, safe_serialization=True)
    tok_dir, _ = builtin_path("minilm")  # MiniLM's WordPiece tokenizer fits the 30522-token vocabulary
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok_dir / name, folder / name)
    words = "the cat sat on a mat while quiet rain fell over old stone bridges and rivers".split()
    rng = random.Random(0)
    (tmp_path / "calib.txt").write_text(" ".join(rng.choice(words) for _ in range(2000)))
    (tmp_path / "test.txt").write_text(" ".join(rng.choice(words) for _ in range(700)))
    args = ["--model", str(folder), "--recipe", "paretoq-w2", "--steps", "3", "--batch-size", "4", "--seq-len", "16",
            "--lr", "1e-3", "--eval-windows", "1", "--calib", str(tmp_path / "calib.txt"),
            "--data", str(tmp_path / "test.txt"), "--no-progress"]
    assert main([*args, "--json", str(tmp_path / "one.json")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
                           "-m", "fxquant.qat", *args, "--sharding", "fsdp", "--out", str(tmp_path / "out"),
                           "--json", str(tmp_path / "two.json")], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("model: ") == 1 and "2 processes, fsdp" in proc.stdout  # rank 0 prints, once
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["world_size"] == WORLD and two["config"]["sharding"] == "fsdp" and len(two["losses"]) == 3
    # the recipe's own scale lr reached the trainer (no --scale-lr given), and FSDP2 kept the scales' group
    assert one["config"]["scale_lr"] == two["config"]["scale_lr"] == 3e-2
    _close(two["losses"], one["losses"])
    _close([two["ppl_final"], two["ppl_init"]], [one["ppl_final"], one["ppl_init"]])
    assert (tmp_path / "out").is_dir() and any((tmp_path / "out").glob("*.safetensors"))


def test_sharding_is_validated_and_the_cli_has_the_flag():
    from fxquant.qat import add_qat_parser
    import argparse
    with pytest.raises(RecipeError, match="sharding"):
        QATConfig(sharding="zero3")
    parser = argparse.ArgumentParser()
    add_qat_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["qat", "--sharding", "fsdp"]).sharding == "fsdp"
    assert parser.parse_args(["qat"]).sharding == "ddp"
    with pytest.raises(SystemExit):
        parser.parse_args(["qat", "--sharding", "zero3"])
