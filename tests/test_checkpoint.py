"""Checkpoints: every packed format round-trips bit for bit, pickles are refused, tampering is detected."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxquant
from fxquant.checkpoint import (MANIFEST, PACKED, decode_weight, encode_weight, load_quantized, pack_bitplanes,
                                save_quantized, unpack_bitplanes)
from fxquant.errors import ModelLoadError

from conftest import make_tiny_llama

IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 128, (4000,), generator=torch.Generator().manual_seed(2))


def _logits(model, ids=IDS):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out[0]


@given(bits=st.integers(1, 8), rows=st.integers(1, 5), cols=st.integers(1, 70), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_bitplanes_round_trip_and_take_bits_over_8_bytes(bits, rows, cols, seed):
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=torch.Generator().manual_seed(seed))
    planes = pack_bitplanes(codes, bits)
    assert planes.dtype == torch.uint8 and tuple(planes.shape) == (bits, rows, -(-cols // 8))
    assert torch.equal(unpack_bitplanes(planes, cols), codes.to(torch.int32))


def test_bitplanes_refuse_codes_that_do_not_fit():
    with pytest.raises(Exception, match="must lie in 0..7"):
        pack_bitplanes(torch.tensor([[8]]), 3)


def _recipe(name):
    recipe = fxquant.get_recipe(name)
    if recipe.method == "paretoq":
        recipe.options.update(steps=2, seq_len=32, batch_size=2)
    return recipe


@pytest.mark.parametrize("name", ["rtn-w8", "rtn-w4g128", "rtn-w3g32a", "rtn-w2g64a", "fp6", "fp6g64", "fp5", "fp4",
                                  "paretoq-w1", "paretoq-w1.58", "paretoq-w3", "illm-w8a8"])
def test_save_load_is_bit_identical_for_every_format(tmp_path, name):
    model = make_tiny_llama(layers=2)
    result = fxquant.quantize(model, _recipe(name), calibration=CALIB)
    before = _logits(result.eval_model)
    out = result.save(tmp_path / "ckpt")
    assert not list(tmp_path.glob(".ckpt.tmp-*")), "the temporary folder must be renamed away"
    ckpt = fxquant.load(out)
    assert set(ckpt.quantized) == set(result.quantized) and len(ckpt.quantized) == 14
    assert torch.equal(_logits(ckpt.eval_model), before)
    if name.startswith("illm"):
        assert ckpt.integer_model is not None
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "fxquant" and cfg["recipe"] == name and cfg["fxquant_version"] == fxquant.__version__
    assert cfg["checksums"][PACKED].startswith("sha256:")
    # the quantized weights are stored packed only: model.safetensors has no q_proj weight
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any(k.endswith("q_proj.weight") for k in f.keys())


def test_packed_file_holds_the_bit_width(tmp_path):
    """4-bit per-channel codes take half a byte per weight (plus one float32 scale per row)."""
    model = make_tiny_llama(layers=1)
    result = fxquant.quantize(model, "rtn-w4")
    out = result.save(tmp_path / "w4")
    manifest = json.loads((out / MANIFEST).read_text())
    numel = sum(e["shape"][0] * e["shape"][1] for e in manifest["layers"].values())
    rows = sum(e["shape"][0] for e in manifest["layers"].values())
    from safetensors.torch import load_file
    tensors = load_file(str(out / PACKED))
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == numel // 2 + 4 * rows


def test_smollm2_mixed_formats_round_trip(smollm2, tmp_path):
    """One SmolLM2 checkpoint holding every format (int 8/4/3 sym+asym grouped, FP6, FP4, ParetoQ 1.58/2): the
    reloaded model's logits equal the saved model's bit for bit."""
    from fxquant.fpformats import FPQuantSpec, pack_fp6, quantize_fp
    from fxquant.paretoq import ParetoQSpec, init_alpha, quantize_paretoq
    from fxquant.quant import QuantSpec, quantize_weight
    model = copy.deepcopy(smollm2.model)
    makers = {
        "q_proj": lambda w: quantize_weight(w, QuantSpec(4, symmetric=False, group_size=128)),
        "k_proj": lambda w: quantize_weight(w, QuantSpec(3, group_size=64)),
        "v_proj": lambda w: pack_fp6(quantize_fp(w, FPQuantSpec())),
        "o_proj": lambda w: quantize_fp(w, FPQuantSpec("fp4", group_size=64)),
        "gate_proj": lambda w: quantize_paretoq(w, init_alpha(w, ParetoQSpec(1.58)), ParetoQSpec(1.58)),
        "up_proj": lambda w: quantize_paretoq(w, init_alpha(w, ParetoQSpec(2, 128)), ParetoQSpec(2, 128)),
        "down_proj": lambda w: quantize_weight(w, QuantSpec(8)),
    }
    quantized = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            kind = name.split(".")[-2]
            if kind in makers and "layers." in name:
                q = makers[kind](p.detach())
                p.copy_(q.dequantize(p.dtype))
                quantized[name] = q
    ids = smollm2.tokenizer("The tower is 324 metres tall, about the same height as", return_tensors="pt").input_ids
    before = _logits(model, ids)
    out = save_quantized(model, smollm2.tokenizer, tmp_path / "mixed", quantized=quantized)
    size = sum(f.stat().st_size for f in out.iterdir())
    ckpt = fxquant.load(out)
    assert len(ckpt.quantized) == len(quantized) == 7 * 30
    assert torch.equal(_logits(ckpt.model, ids), before)
    assert ckpt.tokenizer.decode(ids[0]) == smollm2.tokenizer.decode(ids[0])
    assert size < 0.5 * 4 * sum(p.numel() for p in model.parameters())  # far below the float32 model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = make_tiny_llama(layers=1)
    result = fxquant.quantize(model, "rtn-w4g128")
    return result.save(tmp_path_factory.mktemp("ck") / "w4"), _logits(model)


def _copy(saved, tmp_path):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(saved[0], dst)
    return dst


@pytest.mark.parametrize("pickle_name", ["pytorch_model.bin", "optimizer.pt", "state.pkl"])
def test_a_pickle_in_the_folder_is_refused(saved, tmp_path, pickle_name):
    dst = _copy(saved, tmp_path)
    (dst / pickle_name).write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ModelLoadError, match="pickled files .*never unpickles"):
        load_quantized(dst)


@pytest.mark.parametrize("target", [PACKED, "model.safetensors"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_modified_or_truncated_file_is_reported(saved, tmp_path, target, damage):
    dst = _copy(saved, tmp_path)
    f = dst / target
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) - 7]
    f.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="does not match its SHA-256"):
        load_quantized(dst)


def test_missing_and_unlisted_files_are_reported(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    os.rename(dst / PACKED, dst / "extra.safetensors")
    with pytest.raises(ModelLoadError, match="is missing"):
        load_quantized(dst)
    dst2 = _copy(saved, tmp_path / "b")
    (dst2 / "extra.safetensors").write_bytes((dst2 / PACKED).read_bytes())
    with pytest.raises(ModelLoadError, match="not listed"):
        load_quantized(dst2)


def test_a_malformed_manifest_entry_is_reported(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    manifest = json.loads((dst / MANIFEST).read_text())
    first = next(iter(manifest["layers"].values()))
    first["shape"] = [first["shape"][0], first["shape"][1] * 4]
    (dst / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="malformed|shape"):
        load_quantized(dst)


def test_load_model_reads_a_checkpoint(saved):
    lm = fxquant.load_model(str(saved[0]))
    assert isinstance(lm, fxquant.QuantizedCheckpoint)
    assert torch.equal(_logits(lm.model), saved[1])


def test_an_unknown_weight_object_is_refused():
    with pytest.raises(Exception, match="cannot store"):
        encode_weight("x.weight", object())


def test_decode_rejects_a_foreign_kind():
    with pytest.raises(ModelLoadError, match="unknown kind"):
        decode_weight("x.weight", {"kind": "nf4", "tensors": [], "shape": [1, 1]}, {})


def test_an_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch
    model = make_tiny_llama(layers=1)
    result = fxquant.quantize(model, "rtn-w4")

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        result.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_quantize_then_eval_the_checkpoint(tmp_path, capsys):
    """`fxquant eval --model DIR` evaluates a saved checkpoint as it is (its recipe, packed size); asking to
    quantize it again, or for a float baseline it does not hold, is refused."""
    from conftest import make_tiny_model_folder

    from fxquant.cli import main
    folder, text = make_tiny_model_folder(tmp_path)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(folder), "--recipe", "rtn-w4g128", "--out", str(out)]) == 0
    report = tmp_path / "r.json"
    common = ["--windows", "2", "--seq-len", "64", "--data", str(text), "--no-progress"]
    assert main(["eval", "--model", str(out), *common, "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["recipe"] == "rtn-w4g128" and data["windows"] == 2
    float_bytes = sum(p.numel() * 4 for p in make_tiny_llama(layers=1, hidden=32, inter=64, vocab=30522).parameters())
    assert data["weight_bytes"] < float_bytes
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--recipe", "rtn-w8", *common]) == 2
    assert "already quantized with 'rtn-w4g128'" in capsys.readouterr().err
    assert main(["eval", "--model", str(out), "--baseline", *common]) == 2
    assert "--baseline" in capsys.readouterr().err


def test_manifest_and_config_checksums_must_agree(saved, tmp_path):
    """Re-hashing a modified file into the manifest alone is caught by the copy of the hashes in config.json."""
    from fxquant.checkpoint import _sha256
    dst = _copy(saved, tmp_path)
    f = dst / PACKED
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest["files"][PACKED] = _sha256(f)
    (dst / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="checksums in .*config.json do not match"):
        load_quantized(dst)


def test_searched_fp6_scales_survive_save_and_load(tmp_path):
    """teq-fp6 with clip_scale_up stores scales above absmax in the packed weights; the checkpoint keeps them (it
    stores scales, it does not re-derive them from the weights), so the loaded model is bit-identical."""
    model = make_tiny_llama(layers=2)
    recipe = fxquant.get_recipe({"base": "teq-fp6", "options": {
        "steps": 0, "init": "ones", "seq_len": 16, "batch_size": 1, "clip_windows": 4, "clip_scale_up": True,
        "progress": False}})
    result = fxquant.quantize(model, recipe, calibration=CALIB)
    ups = result.artifacts["weight_scale_ratios"]
    assert ups, "the search should pick some ratio above 1 on random weights"
    before = _logits(result.eval_model)
    ckpt = fxquant.load(result.save(tmp_path / "ckpt"))
    assert torch.equal(_logits(ckpt.eval_model), before)
    for fqn in ups:
        assert torch.equal(ckpt.quantized[fqn].scale, result.quantized[fqn].scale)


@pytest.mark.parametrize("name", ["gptq-w4g128", "gptq-fp6"])
def test_gptq_scales_survive_save_and_load(tmp_path, name):
    """GPTQ's weights need not reach their grid's top value, so a checkpoint that re-derived scales from the
    weights would change them; it stores the packed codes and GPTQ's scales, and the reload is bit-identical."""
    model = make_tiny_llama(layers=2)
    recipe = fxquant.get_recipe({"base": name, "options": {"seq_len": 16, "gptq_windows": 4, "progress": False}})
    result = fxquant.quantize(model, recipe, calibration=CALIB)
    before = _logits(result.eval_model)
    ckpt = fxquant.load(result.save(tmp_path / "ckpt"))
    assert torch.equal(_logits(ckpt.eval_model), before)
    scales = result.artifacts["weight_scales"]
    assert set(scales) == set(ckpt.quantized)
    for fqn, entry in scales.items():
        assert torch.equal(ckpt.quantized[fqn].scale, entry["scale"])
