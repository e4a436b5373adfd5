"""The int8 twin is built explicitly (train, `kmnist-batch model int8`), never by loading a model, and is
run only where it passes its probe on the CPU at hand."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from jobs.cli import app
from kmnist_core.datasets import load_dataset
from kmnist_core.errors import KmnistError
from kmnist_core.int8 import (INT8_FILE, MAX_WEIGHT, PROBE_FILE, PROBE_TOLERANCE, calibration_sample, quantize,
                              quantize_model, weight_range)
from kmnist_core.models import load_torch_model, optimize_for_inference, predict_logits
from kmnist_core.onnx_export import FP32_FILE, MAX_LOGIT_DIFF, decisions, export_onnx, fp32_twin_bytes, input_unfold, sha256
from kmnist_core.ort_model import OrtModel, block_unfold, unfold
from kmnist_core.policy import calibration_for
from kmnist_core.pooled_conv import pool_first_conv
from kmnist_core.model_dir import CARD_FILE, DEFAULT_MODEL_DIR, load_bundle, load_model, read_model_files
from tests.test_int8 import bare_copy
from tests.processes import CLI


def test_loading_never_builds_or_writes_a_twin(tmp_path, trained_model_dir):
    model_dir = bare_copy(trained_model_dir, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    auto = load_model(model_dir)
    assert auto.precision == "fp32" and "no int8 twin" in auto.precision_note
    assert "kmnist-batch model int8" in auto.precision_note
    with pytest.raises(KmnistError, match="has no int8 twin"):
        load_model(model_dir, precision="int8")
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before


def test_model_int8_builds_the_twin_deterministically(tmp_path, trained_model_dir):
    model_dir = bare_copy(trained_model_dir, tmp_path / "m")
    runner = CliRunner()
    r = runner.invoke(app, ["model", "int8", str(model_dir)])
    assert r.exit_code == 0, r.output
    assert "validation top-1 agreement" in r.output
    card = json.loads((model_dir / CARD_FILE).read_text(encoding="utf-8"))
    first = {name: (model_dir / name).read_bytes() for name in (INT8_FILE, PROBE_FILE)}
    assert sha256(first[INT8_FILE]) == card["int8"]["sha256"] and sha256(first[PROBE_FILE]) == card["int8"]["probe"]["sha256"]
    assert card["int8"]["gate"]["cpu"]["machine"] and "flags" in card["int8"]["gate"]["cpu"]
    assert not [p.name for p in model_dir.iterdir() if p.name.startswith(".")]  # no temp file left
    # The same weights and training images give the same bytes again.
    assert runner.invoke(app, ["model", "int8", str(model_dir)]).exit_code == 0
    assert {name: (model_dir / name).read_bytes() for name in first} == first
    assert load_model(model_dir, precision="int8").probe["passed"]


def test_model_int8_on_a_read_only_directory_is_one_error_line(tmp_path, trained_model_dir, monkeypatch):
    model_dir = bare_copy(trained_model_dir, tmp_path / "ro")
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    real_write = Path.write_bytes

    def read_only(self, data):  # a read-only mount (the suite may run as root, where chmod does not bind)
        if self.parent == model_dir:
            raise OSError(30, "Read-only file system", str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    r = CliRunner().invoke(app, ["model", "int8", str(model_dir)])
    assert r.exit_code == 2 and "error: cannot write the int8 twin" in r.output and "Read-only" in r.output
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before


def saturating_copy(tmp_path: Path) -> Path:
    """The default model as a CPU whose int8 kernels saturate would see it: its probe's build-time int8
    logits differ from what the twin computes here by more than the tolerance (the card names the file)."""
    from kmnist_core.model_dir import DEFAULT_MODEL_DIR

    model_dir = tmp_path / "sat"
    shutil.copytree(DEFAULT_MODEL_DIR, model_dir)
    with np.load(model_dir / PROBE_FILE, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["int8_logits"] = arrays["int8_logits"] + 4 * PROBE_TOLERANCE
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    (model_dir / PROBE_FILE).write_bytes(buffer.getvalue())
    card = json.loads((model_dir / CARD_FILE).read_text(encoding="utf-8"))
    card["int8"]["probe"]["sha256"] = sha256(buffer.getvalue())
    (model_dir / CARD_FILE).write_text(json.dumps(card), encoding="utf-8")
    return model_dir


def test_a_twin_failing_its_probe_runs_fp32_and_says_so(tmp_path):
    model_dir = saturating_copy(tmp_path)
    assert load_bundle(model_dir).precision.used == "int8"  # the card's gate passed where it was built
    auto = load_model(model_dir)
    assert auto.precision == "fp32" and auto.int8 is None
    assert not auto.probe["passed"] and auto.probe["max_abs_logit_deviation"] > PROBE_TOLERANCE
    assert "fails its probe on this CPU" in auto.precision_note and "running fp32" in auto.precision_note
    forced = load_model(model_dir, precision="int8")  # asked for explicitly: runs, with the warning
    assert forced.precision == "int8" and "fails its probe" in forced.precision_note
    assert load_model("default").probe["passed"]  # the shipped twin passes here


def test_predict_names_the_fallback_in_run_json_and_the_start_line(tmp_path, kmnist_dev):
    from PIL import Image

    model_dir = saturating_copy(tmp_path)
    crops = tmp_path / "crops"
    crops.mkdir()
    for i in range(5):
        Image.fromarray(kmnist_dev.test.images[i]).save(crops / f"{i}.png")
    out = tmp_path / "out"
    # A real process: predict forks its worker, which a test process with torch's threads must not do.
    r = subprocess.run([CLI, "predict", str(crops), "--out", str(out),
                        "--model", str(model_dir)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    start = next(line for line in r.stdout.splitlines() if " start predict run " in line)
    assert "fp32 (the int8 twin fails its probe on this CPU" in start
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["precision"] == "fp32" and "fails its probe on this CPU" in run["precision_note"]


def test_twin_weights_fit_in_7_bits_so_no_cpu_saturates(trained_model_dir):
    """|weight| <= 64: AVX2's VPMADDUBSW sums two uint8 x int8 products in int16 (255 * 64 * 2 < 32,768),
    so AVX2, AVX-512 and VNNI kernels all compute the same exact sums; full-range weights would not."""
    for model_dir in (DEFAULT_MODEL_DIR, trained_model_dir):
        card = json.loads((model_dir / CARD_FILE).read_text(encoding="utf-8"))
        low, high = weight_range((model_dir / INT8_FILE).read_bytes())
        assert -MAX_WEIGHT <= low < 0 < high <= MAX_WEIGHT and 255 * MAX_WEIGHT * 2 < 2**15
        assert card["int8"]["gate"]["weight_range"] == [low, high] and "reduce_range" in card["int8"]["method"]


def test_a_card_fitted_out_of_fold_keeps_its_thresholds_for_int8(tmp_path, trained_model_dir):
    """`int8_refit: false` (thresholds from out-of-fold predictions, the model trained on val too): the twin
    runs on the card's own temperature and thresholds instead of a refit on trained-on images."""
    model_dir = bare_copy(trained_model_dir, tmp_path / "m")
    card = json.loads((model_dir / CARD_FILE).read_text(encoding="utf-8"))
    card["calibration"].update(int8_refit=False, temperature=0.8, review_below=0.93, ood_threshold=-0.5)
    (model_dir / CARD_FILE).write_text(json.dumps(card), encoding="utf-8")
    assert CliRunner().invoke(app, ["model", "int8", str(model_dir)]).exit_code == 0
    int8 = load_model(model_dir, precision="int8")
    assert int8.precision == "int8"
    assert (int8.calibration.temperature, int8.calibration.review_below, int8.calibration.ood_threshold) == (0.8, 0.93, -0.5)


def default_torch_model():
    """The default model's torch module as inference runs it (batch norm folded)."""
    card, weights = read_model_files("default")
    return optimize_for_inference(load_torch_model(card, weights, "default"))


def test_the_shipped_fp32_twin_is_the_default_model_exported_and_decides_as_torch_does(kmnist_dev):
    """model.fp32.onnx is the default weights exported (the bytes export gives here), its card section names
    it, and on ONNX Runtime it decides every kmnist-dev test crop as the torch model does."""
    shipped = (DEFAULT_MODEL_DIR / FP32_FILE).read_bytes()
    model = default_torch_model()
    assert fp32_twin_bytes(model, 28) == shipped
    card = load_bundle("default").card
    assert card.fp32_onnx.sha256 == sha256(shipped) and card.fp32_onnx.enabled
    images = kmnist_dev.test.images
    ours, theirs = OrtModel(shipped).logits(images), predict_logits(model, images, "cpu")
    assert np.abs(ours - theirs).max() < MAX_LOGIT_DIFF
    for calib in (card.calibration, calibration_for(card, "int8")):
        np.testing.assert_array_equal(decisions(ours, calib), decisions(theirs, calib))


def test_the_unfolded_first_conv_computes_the_same_logits(kmnist_dev):
    """The shipped twin reads its first conv's 3x3 neighbourhoods as 9 channels (unfold_first_conv), and runs
    that conv and the max pool after it on 2x2 blocks (pool_first_conv): quantized from the same model on
    the same images, the plain export and the unpooled twin give bit for bit the same logits."""
    shipped = (DEFAULT_MODEL_DIR / INT8_FILE).read_bytes()
    assert input_unfold(shipped) == 3
    model = default_torch_model()
    sample = calibration_sample(load_dataset(load_bundle("default").card.int8.calibration_data["dataset"]).train.images)
    unfolded, plain = quantize_model(model, 28, sample), quantize(export_onnx(model, 28), sample)
    per_pixel = quantize(fp32_twin_bytes(model, 28), sample, pooled=False)
    assert unfolded == shipped == pool_first_conv(per_pixel) and input_unfold(plain) == 1
    assert pool_first_conv(plain) == plain and pool_first_conv(shipped) == shipped  # nothing to rewrite
    images = kmnist_dev.test.images[:300]
    # a buffer smaller than the call: the batches reuse it, edges left at the conv's zero padding
    pooled = OrtModel(unfolded)
    np.testing.assert_array_equal(pooled.logits(images, batch_size=128), OrtModel(plain).logits(images))
    np.testing.assert_array_equal(pooled.logits(images), OrtModel(per_pixel).logits(images))
    assert pooled.blocks == 2
    x = np.arange(2 * 16, dtype=np.float32).reshape(2, 1, 4, 4)
    u = unfold(x, 3)
    assert u.shape == (2, 9, 4, 4) and np.array_equal(u[:, 4], x[:, 0])  # the centre tap is the image
    assert u[0, 0, 1, 1] == x[0, 0, 0, 0] and u[0, 0, 0, 0] == 0 and u[0, 8, 3, 3] == 0  # up-left; padded edges
    b = block_unfold(x, 3, 2)  # each 2x2 block's 4x4 neighbourhood, from one pixel up-left of its corner
    assert b.shape == (2, 16, 2, 2) and np.array_equal(b[:, 5], x[:, 0, ::2, ::2])  # (1, 1): the corner itself
    assert b[0, 0, 0, 0] == 0 and b[0, 0, 1, 1] == x[0, 0, 1, 1] and b[0, 15, 1, 1] == 0 and b[0, 15, 0, 0] == x[0, 0, 2, 2]