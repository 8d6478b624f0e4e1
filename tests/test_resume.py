"""Resumable training and determinism (issue #9): TEQ, FSBR and QAT write checkpoints every N steps; a run
SIGKILLed mid-way (in a subprocess) and resumed ends with the uninterrupted run's scales bit for bit; a checkpoint
of another recipe is refused; a half-written checkpoint is never used; the same seed gives bit-identical packed
weights and another seed other scales.

The child process imports this module and runs the same ``run_*`` function as the in-process run, with
``FXQUANT_TEST_KILL_AFTER_STEP`` telling its ``on_step`` callback when to SIGKILL itself. Both sides run on one
thread, so float sums are ordered the same way.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from fxquant.errors import TrainingError
from fxquant.train_state import (META_FILE, TENSORS_FILE, is_complete, latest_checkpoint, load_train_state,
                                 save_train_state)

KILL_ENV = "FXQUANT_TEST_KILL_AFTER_STEP"

CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch
import test_resume
torch.set_num_threads(1)  # after conftest (imported by test_resume) set its own count
kill_at = int(os.environ[{env!r}])

def on_step(step, loss):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

getattr(test_resume, "run_" + sys.argv[1])(checkpoint_dir=sys.argv[2], save_every=int(sys.argv[3]), on_step=on_step)
sys.exit(3)  # not killed: the test fails on the return code
"""


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _start_killed(method: str, checkpoint_dir: Path, save_every: int, kill_at: int, tmp_path: Path):
    """Start ``run_<method>`` in a child that SIGKILLs itself after step ``kill_at`` (the test runs the
    uninterrupted reference meanwhile). The child hashes strings with another seed than this process, so an
    order that depends on a set's iteration shows up as a difference."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent), env=KILL_ENV))
    seed = "7" if os.environ.get("PYTHONHASHSEED") != "7" else "8"
    return subprocess.Popen([sys.executable, str(script), method, str(checkpoint_dir), str(save_every)],
                            env={**os.environ, KILL_ENV: str(kill_at), "PYTHONHASHSEED": seed},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _killed(proc: subprocess.Popen, checkpoint_dir: Path) -> list[str]:
    """Wait for the child, check that SIGKILL ended it, and return the checkpoints it left."""
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, err[-3000:])
    return sorted(p.name for p in checkpoint_dir.iterdir())


# ---- the three trainings, as the child runs them -------------------------------------------------------------------
QAT_STEPS = 8


def _qat_ids() -> torch.Tensor:
    base = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(0))
    return base.repeat(100)[:2000]


def run_qat(checkpoint_dir=None, save_every=0, resume=None, on_step=None, seed=0, bits=1.58, keep_last=0):
    from fxquant.paretoq import ParetoQSpec, prepare_qat
    from fxquant.qat import QATConfig, train_qat
    model = make_tiny_llama(seed=1)
    prepare_qat(model, ParetoQSpec(bits))
    cfg = QATConfig(steps=QAT_STEPS, batch_size=2, seq_len=32, lr=2e-3, seed=seed, save_every=save_every,
                    keep_last=keep_last, progress=False)
    hist = train_qat(model, _qat_ids(), cfg, checkpoint_dir=checkpoint_dir, resume=resume, on_step=on_step)
    return model, hist


@functools.lru_cache(maxsize=None)
def _captured():
    """A two-layer tiny LLaMA, captured once per process (TEQ and FSBR only read it)."""
    from fxquant.capture import capture
    from fxquant.passes.analyze_structure import AnalyzeStructure
    from fxquant.pipeline import PassContext
    cg = capture(make_tiny_llama(layers=2, hidden=32, heads=4, kv_heads=2, inter=64, seed=7))
    ctx = PassContext()
    AnalyzeStructure().call(cg, ctx)
    ids = torch.randint(0, 128, (600,), generator=torch.Generator().manual_seed(3))
    return cg, ctx.artifacts["structure"], ids


TEQ_STEPS = 8


def run_teq(checkpoint_dir=None, save_every=0, resume=None, on_step=None, lr=1e-2, seed=0, keep_last=0):
    from fxquant.passes.fold_equivalent_scales import plan_scales
    from fxquant.passes.train_teq_scales import TEQConfig, train_scales, weight_quantizer
    from fxquant.quant import QuantSpec
    cg, structure, ids = _captured()
    spec = QuantSpec(bits=3, group_size=16)
    cfg = TEQConfig(steps=TEQ_STEPS, lr=lr, seq_len=16, batch_size=2, distill=0.5, seed=seed, progress=False,
                    save_every=save_every, checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
                    resume=resume, keep_last=keep_last, check_every=3)   # a held-out check (step 3) falls before the resumed step 4
    return train_scales(cg, plan_scales(cg, structure), weight_quantizer(spec), ids, cfg, quantizer_name=repr(spec),
                        on_step=on_step)


FSBR_STEPS = 2 * 2 * 3  # layers x epochs x samples


def run_fsbr(checkpoint_dir=None, save_every=0, resume=None, on_step=None, act_bits=8, keep_last=0):
    from fxquant.passes.fsbr import FSBRConfig, plan_fsbr, train_fsbr
    from fxquant.quant import QuantSpec
    cg, structure, ids = _captured()
    cfg = FSBRConfig(act_bits=act_bits, epochs=2, samples=3, seq_len=16, progress=False, save_every=save_every,
                     checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir), resume=resume,
                     keep_last=keep_last, norm_align_train=True)
    # asymmetric weights: both clipping logits (lo and hi) are trained and checkpointed; the norm-input alignments
    # train as groups of their own and must resume bit for bit too
    return train_fsbr(cg, plan_fsbr(cg, structure), QuantSpec(bits=4, symmetric=False, group_size=16), ids, cfg,
                      on_step=on_step)


def _fsbr_params(record) -> dict[str, torch.Tensor]:
    out = {f"scale.{k}": v for k, v in record.scales.items()}
    for fqn, (lo, hi) in record.extra["clip"].items():
        out[f"hi.{fqn}"], out[f"lo.{fqn}"] = hi, lo
    return out


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, differ


# ---- kill and resume ---------------------------------------------------------------------------------------------
def test_qat_killed_and_resumed_ends_with_the_same_scales(tmp_path):
    from fxquant.paretoq import scales
    ckpt = tmp_path / "ckpt"
    child = _start_killed("qat", ckpt, 2, 5, tmp_path)
    want_model, want = run_qat()
    assert _killed(child, ckpt) == ["step-000002", "step-000004"]
    assert latest_checkpoint(ckpt) == ckpt / "step-000004"
    assert sorted(p.name for p in (ckpt / "step-000004").iterdir()) == sorted([TENSORS_FILE, META_FILE])

    model, hist = run_qat(checkpoint_dir=ckpt, save_every=2, resume=ckpt)  # a directory: its latest checkpoint
    assert hist.start_step == 4 and hist.losses == want.losses[4:]
    _assert_equal(scales(model), scales(want_model))
    _assert_equal(model.state_dict(), want_model.state_dict())
    # not vacuous: the scales at the checkpoint are not the final ones
    mid = load_train_state(ckpt / "step-000004", kind="qat").tensors
    assert all(not torch.equal(mid[k], v) for k, v in scales(want_model).items())
    assert latest_checkpoint(ckpt) == ckpt / "step-000008"


def test_teq_killed_and_resumed_ends_with_the_same_scales(tmp_path):
    ckpt = tmp_path / "ckpt"
    child = _start_killed("teq", ckpt, 2, 5, tmp_path)
    want = run_teq()
    assert _killed(child, ckpt) == ["step-000002", "step-000004"]
    got = run_teq(checkpoint_dir=ckpt, save_every=2, resume=True)
    _assert_equal(got.scales, want.scales)
    assert got.losses == want.losses and len(got.losses) == TEQ_STEPS  # the first 4 come from the checkpoint
    assert len(want.extra["heldout_checks"]) == 2 and got.extra == want.extra  # checks at 3 and 6, best carried over
    mid = load_train_state(ckpt / "step-000004", kind="teq").tensors
    assert all(not torch.equal(mid[f"scale.{k}"], v) for k, v in want.scales.items())
    # resuming from the final checkpoint trains nothing and returns the same result
    again = run_teq(checkpoint_dir=ckpt, resume="auto")
    _assert_equal(again.scales, want.scales)


def test_fsbr_killed_and_resumed_ends_with_the_same_parameters(tmp_path):
    ckpt = tmp_path / "ckpt"
    child = _start_killed("fsbr", ckpt, 5, 11, tmp_path)
    want = run_fsbr()
    assert len(want.losses) == 2 * 2
    # step 5: layer 0, epoch 2, sample 3 (best epoch so far kept); step 10: layer 0 finished, layer 1 in epoch 2
    assert _killed(child, ckpt) == ["step-000005", "step-000010"]
    meta = load_train_state(ckpt / "step-000010", kind="fsbr").extras
    assert (meta["layer"], meta["epoch"], meta["sample"]) == (1, 1, 1) and meta["best_loss"] is not None
    got = run_fsbr(checkpoint_dir=ckpt, save_every=5, resume=True)
    _assert_equal(_fsbr_params(got), _fsbr_params(want))
    assert got.losses == want.losses
    # from the earlier checkpoint too (inside layer 0, so layer 1 starts from the replayed inputs)
    early = run_fsbr(resume=ckpt / "step-000005")
    _assert_equal(_fsbr_params(early), _fsbr_params(want))
    mid = load_train_state(ckpt / "step-000010", kind="fsbr").tensors
    # q/k scales get no gradient in the fake-quant objective (Q and K are not quantized there): they stay at 1
    layer1 = [k for k in want.scales if ".layers.1." in k and not k.endswith(".q_k")]
    assert layer1 and all(not torch.equal(mid[f"cur.scale.{k}"], want.scales[k]) for k in layer1)


# ---- refusals ------------------------------------------------------------------------------------------------------
def test_resuming_another_recipe_fails_with_a_training_error(tmp_path):
    run_teq(checkpoint_dir=tmp_path / "teq", save_every=4)
    with pytest.raises(TrainingError, match=r"different teq run: config\.lr: checkpoint 0\.01, this run 0\.005"):
        run_teq(resume=tmp_path / "teq" / "step-000004", lr=5e-3)
    run_qat(checkpoint_dir=tmp_path / "qat", save_every=4)
    with pytest.raises(TrainingError, match=r"different qat run: specs\..*'pq-w1\.58', this run 'pq-w2'"):
        run_qat(resume=tmp_path / "qat" / "step-000004", bits=2)
    with pytest.raises(TrainingError, match="holds a qat checkpoint, not a teq one"):
        run_teq(resume=tmp_path / "qat" / "step-000004")
    with pytest.raises(TrainingError, match="not a training checkpoint"):
        run_teq(resume=tmp_path / "nowhere")


def test_fsbr_resume_with_other_activation_bits_is_refused(tmp_path):
    run_fsbr(checkpoint_dir=tmp_path, save_every=6)
    with pytest.raises(TrainingError, match=r"config\.act_bits: checkpoint 8, this run 4") as info:
        run_fsbr(resume=tmp_path / "step-000006", act_bits=4)
    assert info.value.hint and "--resume" in info.value.hint


def test_a_checkpoint_cut_short_by_a_kill_is_never_used(tmp_path):
    w = torch.nn.Parameter(torch.arange(4.0))
    opt = torch.optim.Adam([w], lr=0.1)
    w.sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    save_train_state(tmp_path / "step-000001", kind="teq", step=1, tensors={"w": w}, optimizer=opt,
                     generators={"data": gen}, extras={"best": 1.5})
    done = tmp_path / "step-000002"
    save_train_state(done, kind="teq", step=2, tensors={"w": w * 2})
    assert latest_checkpoint(tmp_path) == done and is_complete(done)
    # a kill between the tensor file's replace and the JSON's: new tensors beside the old JSON
    save_train_state(tmp_path / "scratch", kind="teq", step=2, tensors={"w": w * 3})
    shutil.copy(tmp_path / "scratch" / TENSORS_FILE, done / TENSORS_FILE)
    assert not is_complete(done) and latest_checkpoint(tmp_path) == tmp_path / "step-000001"
    with pytest.raises(TrainingError, match="incomplete"):
        load_train_state(done, kind="teq")
    # a kill before the JSON was written: no checkpoint at all; a leftover temporary file changes nothing
    (tmp_path / "step-000003").mkdir()
    shutil.copy(tmp_path / "scratch" / TENSORS_FILE, tmp_path / "step-000003" / TENSORS_FILE)
    (tmp_path / "step-000003" / (META_FILE + ".tmp99")).write_text("{")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000001"
    # and the good one restores the tensors, the Adam state, the generator and the extras exactly
    state = load_train_state(latest_checkpoint(tmp_path), kind="teq")
    w2 = torch.nn.Parameter(torch.zeros(4))
    opt2 = torch.optim.Adam([w2], lr=0.1)
    gen2 = torch.Generator()
    state.restore(optimizer=opt2, generators={"data": gen2})
    assert torch.equal(state.tensors["w"], w.detach()) and state.extras == {"best": 1.5}
    assert torch.equal(opt2.state[w2]["exp_avg_sq"], opt.state[w]["exp_avg_sq"])
    assert torch.equal(opt2.state[w2]["step"], opt.state[w]["step"])
    assert torch.equal(torch.rand(3, generator=gen2), torch.rand(3, generator=gen))


# ---- determinism ---------------------------------------------------------------------------------------------------
def _teq_recipe(seed: int, **options):
    from fxquant.api import quantize
    from fxquant.recipes import get_recipe
    model = make_tiny_llama(layers=1, hidden=32, heads=4, kv_heads=2, inter=64)
    recipe = get_recipe("teq-w3g128")
    recipe.options.update(steps=4, seq_len=16, batch_size=1, lr=1e-2, seed=seed, progress=False, **options)
    ids = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(0))
    return quantize(model, recipe, calibration=ids)


def test_same_seed_same_packed_weights_through_the_teq_recipe(tmp_path):
    a = _teq_recipe(0, save_every=2, checkpoint_dir=str(tmp_path))  # checkpointing does not change the result
    b = _teq_recipe(0)
    assert set(a.quantized) == set(b.quantized) and len(a.quantized) == 7
    for k, qa in a.quantized.items():
        qb = b.quantized[k]
        assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.scale, qb.scale), k
    one, other = run_teq(seed=0).scales, run_teq(seed=1).scales
    assert all(not torch.equal(v, other[k]) for k, v in one.items())
    # the recipe options resume too: from step 2, to the same packed weights
    shutil.rmtree(tmp_path / "step-000004")
    d = _teq_recipe(0, checkpoint_dir=str(tmp_path), resume=True)
    assert d.artifacts["teq"].losses == a.artifacts["teq"].losses
    assert all(torch.equal(d.quantized[k].codes, q.codes) and torch.equal(d.quantized[k].scale, q.scale)
               for k, q in a.quantized.items())


def test_same_seed_same_packed_weights_after_qat_convert():
    from fxquant.paretoq import PackedLinear, convert, scales
    packed = []
    for _ in range(2):
        model, _ = run_qat(seed=4)
        convert(model)
        mods = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
        assert len(mods) == 7
        packed.append({f"{n}.{i}": t for n, m in mods.items() for i, t in enumerate(m.packed_args())})
    _assert_equal(packed[0], packed[1])
    other, _ = run_qat(seed=5)
    first, _ = run_qat(seed=4)
    assert all(not torch.equal(v, scales(other)[k]) for k, v in scales(first).items())


# ---- the CLI flags -------------------------------------------------------------------------------------------------
def test_cli_checkpoint_flags_resume_to_the_same_packed_weights(tmp_path, capsys):
    """`fxquant quantize --checkpoint-dir --save-every` then `--resume <step-2>` writes the same checkpoint as the
    uninterrupted run, and --resume on a data-free recipe is refused."""
    from safetensors.torch import load_file

    from fxquant.checkpoint import PACKED
    from fxquant.cli import main
    from conftest import make_tiny_model_folder
    folder, calib = make_tiny_model_folder(tmp_path)
    base = ["quantize", "--model", str(folder), "--recipe", "teq-w4g128", "--steps", "4", "--calib", str(calib)]
    ck = tmp_path / "ck"
    assert main([*base, "--checkpoint-dir", str(ck), "--save-every", "2", "--out", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in ck.iterdir()) == ["step-000002", "step-000004"]
    assert main([*base, "--resume", str(ck / "step-000002"), "--out", str(tmp_path / "b")]) == 0
    a, b = load_file(str(tmp_path / "a" / PACKED)), load_file(str(tmp_path / "b" / PACKED))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["quantize", "--model", str(folder), "--recipe", "rtn-w4", "--resume", "auto",
                 "--out", str(tmp_path / "c")]) == 2
    assert "does not train" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# ---- keeping only the newest checkpoints -----------------------------------------------------------------------------
def _steps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_keep_last_prunes_older_checkpoints_of_its_kind_only(tmp_path):
    """keep_last N leaves the N newest complete checkpoints of the kind being written; an incomplete folder,
    another kind's checkpoint and files fxquant did not write are left alone, and the checkpoint just written is
    kept even when an older step is being re-trained (resumed from an earlier checkpoint)."""
    from fxquant.train_state import prune_checkpoints, save_train_state, step_dir
    t = {"w": torch.arange(4.0)}
    save_train_state(step_dir(tmp_path, 1), kind="fsbr", step=1, tensors=t)            # another kind
    (tmp_path / "step-000002").mkdir()                                                  # incomplete
    (tmp_path / "step-000002" / TENSORS_FILE).write_bytes(b"cut short")
    for step in (3, 4, 5, 6):
        save_train_state(step_dir(tmp_path, step), kind="teq", step=step, tensors=t, keep_last=2)
    assert _steps(tmp_path) == ["step-000001", "step-000002", "step-000005", "step-000006"]
    assert all(is_complete(tmp_path / f"step-00000{i}") for i in (1, 5, 6))
    # a foreign file in an old checkpoint's folder survives (the checkpoint itself does not)
    (tmp_path / "step-000005" / "notes.txt").write_text("mine")
    save_train_state(step_dir(tmp_path, 7), kind="teq", step=7, tensors=t, keep_last=2)
    assert _steps(tmp_path) == ["step-000001", "step-000002", "step-000005", "step-000006", "step-000007"]
    assert (tmp_path / "step-000005" / "notes.txt").read_text() == "mine" and not is_complete(tmp_path / "step-000005")
    # resumed from step 4 (gone) in spirit: writing step 5 again keeps it and the newest other one (step 7)
    save_train_state(step_dir(tmp_path, 5), kind="teq", step=5, tensors=t, keep_last=2)
    assert is_complete(tmp_path / "step-000005") and is_complete(tmp_path / "step-000007")
    assert not (tmp_path / "step-000006").exists()
    assert latest_checkpoint(tmp_path).name == "step-000007"
    with pytest.raises(TrainingError, match="keep_last"):
        prune_checkpoints(tmp_path, 0, kind="teq")


def test_keep_last_in_teq_qat_and_fsbr_runs_and_the_result_is_unchanged(tmp_path):
    """The trainers prune as they save; the result equals a run that keeps every checkpoint, and the newest
    checkpoint still resumes."""
    from fxquant.qat import QATConfig
    full = run_teq(checkpoint_dir=tmp_path / "teq-all", save_every=1)
    assert len(_steps(tmp_path / "teq-all")) == TEQ_STEPS
    two = run_teq(checkpoint_dir=tmp_path / "teq-two", save_every=1, keep_last=2)
    assert _steps(tmp_path / "teq-two") == [f"step-{TEQ_STEPS - 1:06d}", f"step-{TEQ_STEPS:06d}"]
    _assert_equal(two.scales, full.scales)

    model_all, _ = run_qat(checkpoint_dir=tmp_path / "qat-all", save_every=1)
    model_one, _ = run_qat(checkpoint_dir=tmp_path / "qat-one", save_every=1, keep_last=1)
    assert _steps(tmp_path / "qat-one") == [f"step-{QAT_STEPS:06d}"]
    _assert_equal(model_one.state_dict(), model_all.state_dict())
    model_res, _ = run_qat(checkpoint_dir=tmp_path / "qat-one", save_every=1, keep_last=1, resume="auto")
    _assert_equal(model_res.state_dict(), model_all.state_dict())   # resumed at the end: nothing left to train
    with pytest.raises(Exception, match="keep_last"):
        QATConfig(keep_last=-1)

    fsbr_all = run_fsbr(checkpoint_dir=tmp_path / "fsbr-all", save_every=2)
    fsbr_one = run_fsbr(checkpoint_dir=tmp_path / "fsbr-one", save_every=2, keep_last=1)
    assert len(_steps(tmp_path / "fsbr-all")) == FSBR_STEPS // 2
    assert _steps(tmp_path / "fsbr-one") == [f"step-{FSBR_STEPS:06d}"]
    _assert_equal(_fsbr_params(fsbr_one), _fsbr_params(fsbr_all))


def test_keep_last_options_and_flags_are_checked(tmp_path, capsys):
    from fxquant.cli import main
    from fxquant.errors import RecipeError
    from fxquant.recipes import get_recipe
    for name in ("teq-w4g128", "fsbr-w8a8", "paretoq-w2"):
        r = get_recipe(name)
        r.options.update(keep_last=-1)
        with pytest.raises(RecipeError, match="keep_last"):
            r.validate()
        r.options.update(keep_last=2, checkpoint_dir=str(tmp_path))
        r.validate()
    from conftest import make_tiny_model_folder
    folder, calib = make_tiny_model_folder(tmp_path)
    base = ["quantize", "--model", str(folder), "--recipe", "teq-w4g128", "--steps", "2", "--calib", str(calib),
            "--out", str(tmp_path / "o")]
    assert main([*base, "--keep-last", "2"]) == 2
    assert "--keep-last needs --checkpoint-dir" in capsys.readouterr().err
    assert main([*base, "--keep-last", "0", "--checkpoint-dir", str(tmp_path / "c")]) == 2
    assert "at least 1" in capsys.readouterr().err
