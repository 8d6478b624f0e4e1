"""Bad input, one row each: fxquant fails early with one line that names the offending thing and says what to do,
never a traceback, and never leaves a half-written output folder (issue #9, "Bad input").

The CLI rows run ``fxquant.cli.main`` on a saved one-layer random LLaMA (MiniLM's WordPiece tokenizer), so each
costs at most a load and a capture of that tiny model; most fail before the model is read at all.
"""
from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

import fxquant
from fxquant.cli import main
from fxquant.errors import (CaptureError, DataError, FxquantError, ModelLoadError, PassError, ResourceError,
                            TrainingError, WeightError)

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ---- helpers ----------------------------------------------------------------------------------------------------------
def save_tiny(folder: Path, *, nan_at: tuple[int, int] | None = None) -> Path:
    """A one-layer random LLaMA with MiniLM's 30522-token vocabulary, saved as a model folder with a tokenizer."""
    from fxquant.models import builtin_path
    model = make_tiny_llama(layers=1, vocab=30522, seed=4)
    if nan_at is not None:
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[nan_at] = float("nan")
    model.save_pretrained(folder, safe_serialization=True)
    tok_dir, _ = builtin_path("minilm")
    for name in TOKENIZER_FILES:
        shutil.copy(tok_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny")


PROGRESS = re.compile(r"^[\w .-]+: +\d+%\|")  # a tqdm bar ("Loading weights: 100%|####| 12/12 ...")


def cli(capsys, argv: list[str], *, code: int = 2, prefix: str = "fxquant: error:", hint: bool = True) -> str:
    """Run the CLI; assert the exit code, exactly one non-empty stderr line (besides progress bars drawn before the
    failure) and it starts with ``prefix`` and carries a hint, and no traceback anywhere. Returns that line."""
    got = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.match(line)]
    assert got == code, (got, out, lines)
    assert len(lines) == 1, lines
    assert lines[0].startswith(prefix), lines[0]
    if hint:
        assert "(hint: " in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    """No output folder and no temporary sibling of it."""
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    if out.parent.exists():
        left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
        assert not left, left


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model: these rows must be refused before that."""
    import fxquant.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded; the bad input should have been refused before")
    monkeypatch.setattr(fxquant.models, "load_model", refuse)


# ---- 1. unsupported architecture -----------------------------------------------------------------------------------
def test_unsupported_architecture_is_named(tmp_path, capsys):
    folder = tmp_path / "alien"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba9000", "architectures": ["Mamba9000LM"]}))
    (folder / "model.safetensors").write_bytes(b"")  # never read: the config is refused first
    line = cli(capsys, ["eval", "--model", str(folder), "--windows", "1"])
    assert "unsupported architecture" in line and "mamba9000" in line and "Mamba9000LM" in line
    assert "upgrade transformers" in line
    with pytest.raises(ModelLoadError, match="unsupported architecture"):  # the same error from the Python API
        fxquant.load_model(str(folder))


# ---- 2. unsupported op (integer-only lowering) ----------------------------------------------------------------------
def test_integer_only_recipe_names_the_op_without_a_lowering_rule():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, hidden_act="mish")
    model = LlamaForCausalLM(cfg).eval()
    recipe = fxquant.get_recipe("illm-w8a8")
    recipe.options["fsbr"] = False  # data-free: RTN weights, then the lowering
    with pytest.raises(PassError) as info:
        fxquant.quantize(model, recipe)
    assert "no rule for aten.mish" in info.value.message
    assert "fsbr-w8a8" in info.value.hint and "RULES" in info.value.hint


# ---- 3. capture failure -------------------------------------------------------------------------------------------------
class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: torch.export cannot trace it
            return self.proj(x)
        return x


def test_capture_failure_names_the_model_and_the_construct():
    with pytest.raises(CaptureError) as info:
        fxquant.capture(DataDependent(), (torch.randn(2, 8),))
    msg = info.value.message
    assert "could not capture DataDependent" in msg
    assert "test_failures.py" in msg and "x.sum() > 0" in msg  # the failing line of the model's own code
    assert "control flow" in info.value.hint


# ---- 4. group size of 0 or below -------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["rtn-w4g0", "rtn-w4g-8", "FILE"])
def test_group_size_zero_or_below_is_refused(recipe, tmp_path, capsys, no_load):
    if recipe == "FILE":
        recipe = write(tmp_path / "g.yaml", "method: rtn\nbits: 4\ngroup_size: -1\n")
    line = cli(capsys, ["quantize", "--recipe", recipe, "--out", str(tmp_path / "out")])
    assert "group size must be a positive integer" in line
    assert_nothing_written(tmp_path / "out")


# ---- 5. bits out of range ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe,needle", [("rtn-w9", "from 1 to 8"), ("rtn-w0", "from 1 to 8"),
                                           ("rtn-w1", "symmetric integer quantization needs bits >= 2"),
                                           ("FILE", "from 1 to 8")])
def test_bits_out_of_range_are_refused(recipe, needle, tmp_path, capsys, no_load):
    if recipe == "FILE":
        recipe = write(tmp_path / "b.yaml", "method: rtn\nbits: 12\n")
    line = cli(capsys, ["quantize", "--recipe", recipe, "--out", str(tmp_path / "out")])
    assert needle in line
    assert ("bits: 2-8" if recipe.endswith(".yaml") else "rtn-w4g128") in line  # the hint shows what is valid
    assert_nothing_written(tmp_path / "out")


# ---- 6. NaN/Inf in the weights ------------------------------------------------------------------------------------------
def test_nan_weight_is_refused_naming_the_weight_and_position(tmp_path, capsys):
    folder = save_tiny(tmp_path / "nan", nan_at=(3, 7))
    out = tmp_path / "q"
    line = cli(capsys, ["quantize", "--model", str(folder), "--recipe", "rtn-w4g32", "--out", str(out)])
    assert "model.layers.0.mlp.up_proj.weight" in line and "1 non-finite value(s) (1 NaN, 0 Inf)" in line
    assert "[3, 7]" in line
    assert_nothing_written(out)
    from fxquant.quant import QuantSpec, quantize_weight
    w = torch.ones(4, 8)
    w[2, 5] = float("-inf")
    with pytest.raises(WeightError, match=r"'up' has 1 non-finite value\(s\) \(0 NaN, 1 Inf\) of 32, first at index \[2, 5\]"):
        quantize_weight(w, QuantSpec(4), name="up")


# ---- 7. NaN/Inf in the training loss --------------------------------------------------------------------------------------
def test_non_finite_training_loss_stops_training():
    from fxquant.guards import check_finite_loss
    with pytest.raises(TrainingError) as info:
        check_finite_loss(torch.tensor(float("inf")), 3, "TEQ")
    assert info.value.message == "TEQ: the loss became inf at step 3" and "learning rate" in info.value.hint
    assert check_finite_loss(torch.tensor(2.5), 0, "TEQ") == 2.5

    from fxquant.paretoq import ParetoQSpec, prepare_qat
    from fxquant.qat import QATConfig, train_qat
    model = make_tiny_llama(seed=1)
    with torch.no_grad():
        model.model.norm.weight[5] = float("nan")  # a float parameter: the logits, then the loss, become NaN
    prepare_qat(model, ParetoQSpec(2))
    ids = torch.randint(0, 128, (512,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(FxquantError) as info:
        train_qat(model, ids, QATConfig(steps=3, batch_size=2, seq_len=32, progress=False))
    assert "loss became nan" in info.value.message and "step 0" in info.value.message


# ---- 8. all-zero channels: handled, not an error -----------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["w4g16", "w4g16a", "w8", "w8a", "w2g16a", "w8t", "w3g24"])
def test_all_zero_channels_quantize_to_exact_zeros(spec):
    from fxquant.backends.registry import pack
    from fxquant.quant import QuantSpec, quantize_weight
    w = torch.randn(6, 64)
    w[1] = 0.0            # a whole output channel
    w[4, :16] = 0.0       # one group of a channel
    if spec.endswith("t"):
        w = torch.zeros(6, 64)  # per-tensor: the whole tensor
    qw = quantize_weight(w, QuantSpec.parse(spec))
    assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all()  # no 0/0 scale
    deq = qw.dequantize()
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[1], torch.zeros(64)) and torch.equal(deq[4, :16], torch.zeros(16))
    x = torch.randn(3, 64)
    y = pack(qw).linear(x)  # the packed format's reference op: the zero channel's output is exactly 0
    assert torch.equal(y[:, 1], torch.zeros(3))


@pytest.mark.parametrize("fmt", ["e3m2", "e2m3", "e2m1"])
def test_all_zero_channels_in_float_formats_stay_zero(fmt):
    from fxquant.fpformats import FPQuantSpec, pack_fp6, quantize_fp
    w = torch.randn(4, 64)
    w[2] = 0.0
    packed = pack_fp6(quantize_fp(w, FPQuantSpec(format=fmt, group_size=32)))
    deq = packed.dequantize(torch.float32)
    assert torch.isfinite(deq).all() and torch.equal(deq[2], torch.zeros(64))


# ---- 9. empty or too-short calibration text ------------------------------------------------------------------------------
def test_empty_calibration_text_is_refused_before_loading(tmp_path, capsys, no_load):
    calib = write(tmp_path / "calib.txt", "  \n\n")
    line = cli(capsys, ["quantize", "--recipe", "teq-w4g128", "--calib", calib, "--out", str(tmp_path / "o")])
    assert "calibration text" in line and "is empty" in line and "--calib" in line
    assert_nothing_written(tmp_path / "o")


def test_too_short_calibration_text_is_refused_before_training(tmp_path, capsys, tiny_dir, monkeypatch):
    import fxquant.api

    def no_capture(*a, **k):
        raise AssertionError("captured: the short calibration text should have been refused before")
    monkeypatch.setattr(fxquant.api, "capture", no_capture)
    calib = write(tmp_path / "calib.txt", "just a few words of calibration text")
    line = cli(capsys, ["quantize", "--model", str(tiny_dir), "--recipe", "teq-w4g128", "--calib", calib,
                        "--out", str(tmp_path / "o")])
    assert "too short" in line and "teq-w4g128" in line and "512" in line
    assert_nothing_written(tmp_path / "o")


# ---- 10. empty or too-short evaluation text -------------------------------------------------------------------------------
def test_empty_evaluation_text_is_refused_before_loading(tmp_path, capsys, no_load):
    line = cli(capsys, ["eval", "--data", write(tmp_path / "t.txt", ""), "--windows", "1"])
    assert "evaluation text" in line and "is empty" in line
    from fxquant.data import eval_text
    with pytest.raises(DataError, match="is empty"):
        eval_text(tmp_path / "t.txt")


def test_too_short_evaluation_text_is_refused_before_quantizing(tmp_path, capsys, tiny_dir):
    line = cli(capsys, ["eval", "--model", str(tiny_dir), "--recipe", "rtn-w8", "--seq-len", "64",
                        "--data", write(tmp_path / "t.txt", "a short text"), "--windows", "1"])
    assert "too short" in line and "64-token window" in line


def test_non_utf8_text_is_refused(tmp_path, capsys, no_load):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    line = cli(capsys, ["eval", "--data", str(bad)])
    assert "not UTF-8" in line


# ---- 11. missing data file ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--data", "--calib"])
def test_missing_data_file_is_refused_before_loading(flag, tmp_path, capsys, no_load):
    missing = str(tmp_path / "nowhere" / "wiki.txt")
    argv = (["eval", "--data", missing] if flag == "--data" else
            ["quantize", "--recipe", "teq-w4g128", "--calib", missing, "--out", str(tmp_path / "o")])
    line = cli(capsys, argv)
    assert "text not found at" in line and "nowhere" in line
    assert_nothing_written(tmp_path / "o")


# ---- 12. wrong model path ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,needle", [("missing", "does not exist"), ("file", "not a model folder"),
                                         ("empty-dir", "no config.json"), ("gguf", "does not exist"),
                                         ("offline-hub", "HF_HUB_OFFLINE is set")])
def test_wrong_model_path_is_named(kind, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = {"missing": str(tmp_path / "no" / "model"), "file": write(tmp_path / "model.txt", "hello"),
            "empty-dir": str(tmp_path), "gguf": str(tmp_path / "m.Q4.gguf"),
            "offline-hub": "fxquant-test-org/no-such-model"}[kind]
    line = cli(capsys, ["eval", "--model", path, "--windows", "1"])
    assert needle in line and path in line


# ---- 13. recipe that contradicts itself --------------------------------------------------------------------------------------
@pytest.mark.parametrize("content,needle", [
    ("method: fp32\nbits: 4\n", "contradicts itself: method fp32 with bits"),
    ("method: rtn\nbits: 4\ngroup_size: 64\nper_tensor: true\n", "exclusive"),
    ("method: rtn\nbits: 1\nsymmetric: true\n", "needs bits >= 2"),
    ("method: rtn\nbits: 4\nsymmetric: 'no'\n", "symmetric must be true or false"),
])
def test_recipe_that_contradicts_itself_is_refused(content, needle, tmp_path, capsys, no_load):
    line = cli(capsys, ["quantize", "--recipe", write(tmp_path / "r.yaml", content), "--out", str(tmp_path / "o")])
    assert needle in line
    assert_nothing_written(tmp_path / "o")


@pytest.mark.parametrize("recipe", ["rtn-w4g128", "gptq-w4g128"])   # gptq reads calibration data but has no steps
def test_steps_on_a_recipe_that_does_not_train_is_refused(recipe, tmp_path, capsys, no_load):
    line = cli(capsys, ["quantize", "--recipe", recipe, "--steps", "100", "--out", str(tmp_path / "o")])
    assert "--steps 100" in line and "does not train" in line and "use a trained recipe" in line
    line = cli(capsys, ["quantize", "--recipe", recipe, "--checkpoint-dir", str(tmp_path / "ck"),
                        "--out", str(tmp_path / "o")])
    assert "--checkpoint-dir" in line and "does not train" in line
    assert_nothing_written(tmp_path / "o")


# ---- 14. a kernel format on a device that cannot run it --------------------------------------------------------------------
def test_kernel_format_on_a_gpu_that_cannot_run_it_names_format_and_device():
    from fxquant.backends.registry import check_kernel_device
    with pytest.raises(ResourceError) as info:
        check_kernel_device("int4", "cuda:0", torch.bfloat16, capability=(7, 5))  # Turing: no bf16 instructions
    assert "format int4 on cuda:0" in info.value.message and "8.0" in info.value.message
    assert "7.5" in info.value.message and "kernels" in info.value.hint
    with pytest.raises(ResourceError, match=r"format fp6 on cuda:1: .*compute capability 7\.0 or newer.*6\.1"):
        check_kernel_device("fp6", "cuda:1", torch.float16, capability=(6, 1))  # Pascal: too old for Triton
    with pytest.raises(ResourceError, match="format int8 on cuda:0: .*got float64"):
        check_kernel_device("int8", "cuda:0", torch.float64, capability=(9, 0))
    check_kernel_device("int4", "cuda:0", torch.float16, capability=(7, 5))   # fp16 on Turing runs
    check_kernel_device("int4", "cuda:0", torch.bfloat16, capability=(9, 0))  # bf16 on Hopper runs
    check_kernel_device("int4", "cpu", torch.float64)                         # the CPU reference takes anything


def test_packed_weight_or_model_on_a_missing_device_is_refused(tiny_dir, monkeypatch):
    from fxquant.backends.registry import pack
    from fxquant.quant import QuantSpec, quantize_weight
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = f"cuda:{n}"  # one past the last GPU: missing on every machine
    packed = pack(quantize_weight(torch.randn(8, 32), QuantSpec(4, group_size=16)))
    with pytest.raises(ResourceError) as info:
        packed.to(missing)
    assert f"cannot put packed int4 weight on {missing}" in info.value.message
    assert "CUDA" in info.value.message and info.value.hint

    import transformers

    def refuse(*a, **k):
        raise AssertionError("weights were read before the device was checked")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(ResourceError, match=f"cannot put model .* on {missing}"):
        fxquant.load_model(str(tiny_dir), device=missing)


def test_compiling_with_kernels_always_where_they_cannot_run_fails_at_compile_time(monkeypatch):
    """The backend asks the same question before it lowers: with kernels="always" a device whose GPU is too old is
    refused when compiling, naming the format and the device (here: the real check, told the GPU is a Pascal)."""
    from fxquant.backends import registry
    real = registry.kernel_device_problem
    monkeypatch.setattr(registry, "kernel_device_problem",
                        lambda fmt, device, dtype, capability=None: real(fmt, "cuda:0", dtype, capability=(6, 1)))
    model = make_tiny_llama()
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="fxquant", options={"recipe": "rtn-w8", "kernels": "always"})
    with pytest.raises(Exception) as info, torch.no_grad():
        model(torch.randint(0, 128, (1, 5)))
    chain, exc = [], info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or getattr(exc, "inner_exception", None)
    errors = [e for e in chain if isinstance(e, ResourceError)]
    assert errors and "format int8 on cuda:0" in errors[0].message and "6.1" in errors[0].message
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_op_with_float64_activations_on_cuda_names_the_format():
    from fxquant.backends.registry import pack
    from fxquant.quant import QuantSpec, quantize_weight
    packed = pack(quantize_weight(torch.randn(8, 32), QuantSpec(8))).to("cuda")
    with pytest.raises(ResourceError, match="format int8 on cuda.*float64"):
        packed.linear(torch.randn(2, 32, dtype=torch.float64, device="cuda"))


# ---- 15. out-of-memory risk, detected before starting ------------------------------------------------------------------------
def test_out_of_memory_risk_is_refused_before_the_weights_are_read(tiny_dir, capsys, monkeypatch):
    import transformers
    from fxquant.models import LOAD_PEAK_FACTOR, check_load_memory, _safetensors_parameters

    def refuse(*a, **k):
        raise AssertionError("weights were read before the memory check")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setenv("FXQUANT_MEMORY_LIMIT_BYTES", "1M")
    line = cli(capsys, ["eval", "--model", str(tiny_dir), "--recipe", "rtn-w8", "--windows", "1"])
    assert "needs about" in line and "only 1.0 MiB is available" in line and "3.9M parameters in float32" in line
    assert "--dtype bfloat16" in line and "FXQUANT_SKIP_MEMORY_CHECK=1" in line

    # the estimate is exact for safetensors: parameters from the file headers x 4 bytes x the stated factor
    n = sum(p.numel() for p in make_tiny_llama(layers=1, vocab=30522).parameters())
    assert _safetensors_parameters(tiny_dir) == n
    assert check_load_memory("tiny", n, torch.float32, available=1 << 40) == int(n * 4 * LOAD_PEAK_FACTOR)
    assert check_load_memory("tiny", n, torch.bfloat16, available=1 << 40) == int(n * 2 * LOAD_PEAK_FACTOR)
    monkeypatch.setenv("FXQUANT_MEMORY_LIMIT_BYTES", "lots")
    with pytest.raises(ResourceError, match="FXQUANT_MEMORY_LIMIT_BYTES must be a number of bytes, got 'lots'"):
        check_load_memory("tiny", n, torch.float32)
    monkeypatch.setenv("FXQUANT_MEMORY_LIMIT_BYTES", "1M")
    monkeypatch.setenv("FXQUANT_SKIP_MEMORY_CHECK", "1")
    assert check_load_memory("tiny", n, torch.float32) > 1 << 20  # skipped: no error


def test_parameter_estimate_from_the_config_is_close():
    from transformers import AutoConfig
    from fxquant.models import builtin_path, estimate_parameters
    model = make_tiny_llama(layers=2)
    n = sum(p.numel() for p in model.parameters())
    assert abs(estimate_parameters(model.config) / n - 1) < 0.01
    folder, gguf = builtin_path("minilm")
    est = estimate_parameters(AutoConfig.from_pretrained(folder))
    assert abs(est / 22_713_728 - 1) < 0.02  # all-MiniLM-L6-v2's safetensors holds 22.7M parameters


def test_batch_that_does_not_fit_in_memory_is_refused_before_quantizing(tiny_dir, capsys, monkeypatch):
    monkeypatch.setenv("FXQUANT_MEMORY_LIMIT_BYTES", "1G")
    line = cli(capsys, ["eval", "--model", str(tiny_dir), "--recipe", "rtn-w8", "--batch-size", "64",
                        "--seq-len", "256", "--windows", "1"])
    assert "evaluating with --batch-size 64 --seq-len 256 needs about" in line and "smaller --batch-size" in line


def test_seq_len_longer_than_the_model_is_refused(tiny_dir, capsys):
    line = cli(capsys, ["eval", "--model", str(tiny_dir), "--seq-len", "1024", "--windows", "1"])
    assert "--seq-len 1024 does not fit" in line and "256 positions" in line


# ---- 16. interrupted write ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", ["disk-full", "ctrl-c"])
def test_interrupted_write_leaves_no_output_folder(failure, tiny_dir, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # part of the file is on disk when the write dies
        if failure == "disk-full":
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    out = tmp_path / "sub" / "q"
    if failure == "disk-full":
        line = cli(capsys, ["quantize", "--model", str(tiny_dir), "--recipe", "rtn-w4g32", "--out", str(out)])
        assert f"could not write {out}: No space left on device" in line and "nothing was written" in line
    else:
        cli(capsys, ["quantize", "--model", str(tiny_dir), "--recipe", "rtn-w4g32", "--out", str(out)],
            code=130, prefix="fxquant: interrupted", hint=False)
    assert_nothing_written(out)


# ---- 17. interrupted quantization, unexpected errors, out of memory --------------------------------------------------------------
@pytest.mark.parametrize("exc,code,prefix,needle", [
    (KeyboardInterrupt(), 130, "fxquant: interrupted", ""),
    (RuntimeError("boom\nsecond line"), 2, "fxquant: internal error:",
     "RuntimeError: boom (hint: rerun with --debug for the traceback and report it)"),
    (MemoryError(), 2, "fxquant: error:", "out of memory during `fxquant quantize` (MemoryError"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 bytes"), 2,
     "fxquant: error:", "out of memory during `fxquant quantize`"),
    (PermissionError(errno.EACCES, "Permission denied", "/srv/models/cache"), 2, "fxquant: error:",
     "Permission denied: /srv/models/cache (hint: check the path"),
])
def test_failures_during_quantize_are_one_line_and_write_nothing(exc, code, prefix, needle, tiny_dir, tmp_path,
                                                                   capsys, monkeypatch):
    import fxquant.api

    def fail(*a, **k):
        raise exc
    monkeypatch.setattr(fxquant.api, "capture", fail)
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(tiny_dir), "--recipe", "rtn-w8", "--out", str(out)]
    line = cli(capsys, argv, code=code, prefix=prefix, hint=code == 2)
    assert needle in line
    assert_nothing_written(out)
    if isinstance(exc, RuntimeError) and "boom" in str(exc):
        with pytest.raises(RuntimeError, match="boom"):  # --debug shows the real traceback
            main([*argv, "--debug"])


# ---- 18. pickled-only model folder -----------------------------------------------------------------------------------------------
def test_pickled_only_model_folder_is_refused_unread(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "pickled"
    folder.mkdir()
    make_tiny_llama().config.to_json_file(folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"not read")

    def refuse(*a, **k):
        raise AssertionError("a pickle was opened")
    monkeypatch.setattr(torch, "load", refuse)
    line = cli(capsys, ["eval", "--model", str(folder)])
    assert "only pickled weights (pytorch_model.bin)" in line and "safetensors" in line


# ---- 19. output folder exists and is not empty (or is a file) ------------------------------------------------------------------
@pytest.mark.parametrize("kind,needle", [("not-empty", "exists and is not empty"), ("file", "is a file"),
                                         ("under-a-file", "is a file, not a folder"), ("json", "cannot create --json")])
def test_bad_output_folder_is_refused_before_loading(kind, needle, tmp_path, capsys, no_load):
    out = tmp_path / "out"
    if kind == "not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        out.write_text("a file")
    target = out if kind in ("not-empty", "file") else out / "sub" / "q"
    argv = (["eval", "--json", str(out / "r.json")] if kind == "json" else ["quantize", "--out", str(target)])
    line = cli(capsys, argv)
    assert needle in line and str(out) in line
    assert (out / "keep.txt").read_text() == "mine" if kind == "not-empty" else out.read_text() == "a file"


# ---- 20. unknown recipe name; recipe file with an unknown field or method ---------------------------------------------------------
def test_unknown_recipe_name_lists_the_known_ones(tmp_path, capsys, no_load):
    line = cli(capsys, ["quantize", "--recipe", "awq-w4", "--out", str(tmp_path / "o")])
    assert "unknown recipe 'awq-w4'" in line and "rtn-w4g128" in line and "fp6" in line


@pytest.mark.parametrize("content,needle", [
    ("method: rtn\nbits: 4\ncolour: red\n", "unknown key(s) colour"),
    ("method: awq\nbits: 4\n", "unknown method 'awq'"),
    ("method: teq\nbits: 4\noptions: {stpes: 100}\n", "unknown option 'stpes' for method teq (did you mean 'steps'?)"),
    ("method: rtn\nbits: 4\nexclude: 7\n", "exclude must be a list of name patterns"),
])
def test_recipe_file_with_unknown_field_or_method_is_refused(content, needle, tmp_path, capsys, no_load):
    line = cli(capsys, ["quantize", "--recipe", write(tmp_path / "r.yaml", content), "--out", str(tmp_path / "o")])
    assert needle in line
    assert_nothing_written(tmp_path / "o")


# ---- 21. empty model / nothing to quantize ------------------------------------------------------------------------------------
def test_recipe_that_leaves_no_linear_to_quantize_is_refused(tiny_dir, tmp_path, capsys):
    recipe = write(tmp_path / "none.yaml", "method: rtn\nbits: 4\nexclude: ['*']\n")
    out = tmp_path / "q"
    line = cli(capsys, ["quantize", "--model", str(tiny_dir), "--recipe", recipe, "--out", str(out)])
    assert "no linear weight of the graph of LlamaForCausalLM was quantized" in line
    assert "excluded by the recipe's patterns (exclude=['*'])" in line and "narrow" in line
    assert_nothing_written(out)


def test_no_linear_anywhere_is_refused_by_every_weight_pass():
    from fxquant.fpformats import FPQuantSpec
    from fxquant.paretoq import ParetoQSpec
    from fxquant.passes.insert_paretoq_fake_quant import InsertParetoQFakeQuant
    from fxquant.passes.quantize_weights_rtn import QuantizeWeightsRTN
    from fxquant.passes.split_fp6_weights import SplitFP6Weights
    from fxquant.quant import QuantSpec
    cg = fxquant.capture(make_tiny_llama())
    for p in (QuantizeWeightsRTN(QuantSpec(4), exclude=["*"]), SplitFP6Weights(FPQuantSpec(), exclude=["*"]),
              InsertParetoQFakeQuant(ParetoQSpec(2), exclude=["*"])):
        with pytest.raises(PassError, match=f"{p.name}: no linear weight .* was quantized: 8 excluded"):
            fxquant.Pipeline([p]).run(cg, fxquant.PassContext())
    only_norm = fxquant.capture(torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.ReLU()), (torch.randn(2, 8),))
    with pytest.raises(PassError, match="has no linear layer"):
        fxquant.Pipeline([QuantizeWeightsRTN(QuantSpec(4))]).run(only_norm, fxquant.PassContext())


# ---- 22. numeric flags that cannot work ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["eval", "--steps", "-1", "--recipe", "teq-w4g128"], "--steps must be at least 0, got -1"),
    (["eval", "--windows", "0"], "--windows must be at least 1, got 0"),
    (["eval", "--seq-len", "1"], "--seq-len must be at least 2, got 1"),
    (["eval", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["generate", "--max-new-tokens", "-5"], "--max-new-tokens must be at least 1, got -5"),
])
def test_numeric_flags_that_cannot_work_are_refused(argv, needle, capsys, no_load):
    assert needle in cli(capsys, argv)


# ---- 23. corrupted checkpoint --------------------------------------------------------------------------------------------------
def test_corrupted_checkpoint_is_refused(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_dir), "--recipe", "rtn-w8", "--out", str(out)]) == 0
    capsys.readouterr()
    with open(out / "model.safetensors", "ab") as f:
        f.write(b"\0tampered")
    line = cli(capsys, ["eval", "--model", str(out), "--windows", "1"])
    assert "model.safetensors" in line and "SHA-256" in line
