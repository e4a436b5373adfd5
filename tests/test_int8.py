"""The int8 CPU path (kmnist_core/int8.py): the shipped int8 model keeps the default model's accuracy,
every trained model directory gets a checked int8 twin, precision auto falls back to fp32 when the check
fails. Building a twin explicitly and the probe: tests/test_int8_twin.py."""

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kmnist_core import calibration, int8
from kmnist_core.errors import KmnistError
from kmnist_core.experiment import build_twin
from kmnist_core.int8 import INT8_FILE, OrtModel, check_twin, sha256
from kmnist_core.model_dir import CARD_FILE, DEFAULT_MODEL_DIR, build_predictor, load_bundle, load_model, read_model_files
from kmnist_core.precision import Int8Twin, Precision

CLI = str(Path(sys.executable).parent / "kmnist-batch")


def test_default_model_ships_its_int8_twin_with_unchanged_accuracy(kmnist_dev):
    card, weights = read_model_files("default")
    section = card.int8
    assert sha256((DEFAULT_MODEL_DIR / INT8_FILE).read_bytes()) == section["sha256"]
    assert section["enabled"] and section["fallback"] is None
    assert section["calibration_data"] == {"dataset": "kmnist-dev", "split": "train", "images": 2048, "seed": 0}
    fp32, q = load_model("default", precision="fp32"), load_model("default")  # auto on CPU: int8
    assert (fp32.precision, q.precision) == ("fp32", "int8")
    test = kmnist_dev.test
    f, i = fp32.logits(test.images), q.logits(test.images)
    agreement = float((f.argmax(1) == i.argmax(1)).mean())
    acc_f, acc_i = (float((x.argmax(1) == test.labels).mean()) for x in (f, i))
    ece_f = calibration.expected_calibration_error(calibration.softmax(f, fp32.temperature), test.labels)
    ece_i = calibration.expected_calibration_error(calibration.softmax(i, q.temperature), test.labels)
    # The bar on kmnist-dev test (a 1,000-image subset of the official test split). ECE on 1,000 crops at
    # 99 % accuracy moves by ~0.2 point when the temperature moves by 2 % (the fp32 model alone does), so
    # the quantization's own effect is measured at one temperature: int8's logits against fp32's.
    assert agreement >= 0.999 and acc_f - acc_i <= 0.001 + 1e-9 and abs(ece_i - ece_f) <= 0.005
    nll = lambda logits: float(-np.log(calibration.softmax(logits, q.temperature)[np.arange(len(logits)), test.labels]).mean())  # noqa: E731
    assert abs(nll(i) - nll(f)) <= 0.1 * nll(f)
    # The card's figures are the ones measured here.
    assert section["test"]["agreement"] == pytest.approx(agreement)
    assert section["test"]["int8"]["accuracy"] == pytest.approx(acc_i)
    # int8 has its own temperature and thresholds, refitted on int8 validation logits.
    assert q.temperature == section["calibration"]["temperature"] != fp32.temperature
    assert q.review_below == section["calibration"]["review_below"]


def test_int8_predictor_from_a_bundle_in_another_process_shape(kmnist_dev):
    bundle = load_bundle("default", precision="int8")
    assert bundle.precision == Precision("int8", "int8") and bundle.twin is not None
    p = build_predictor(pickle.loads(pickle.dumps(bundle)), threads=1)  # what a Ray worker receives
    assert p.precision == "int8" and p.int8.fixed_threads == 1 and p.probe["passed"]
    images = kmnist_dev.test.images[:64]
    np.testing.assert_array_equal(p.logits(images), load_model("default").logits(images))
    preds = p.predict([images[0]])
    assert preds[0].char == p.classes.chars[int(p.logits(images[:1]).argmax())]
    onnx = bundle.twin.onnx
    with pytest.raises(KmnistError, match="model.int8.onnx hashes to"):
        check_twin(Int8Twin(onnx[:-1] + bytes([onnx[-1] ^ 1]), bundle.twin.probe), bundle.card.int8, "model")
    assert build_predictor(load_bundle("default", precision="fp32")).precision == "fp32"


def test_ort_threads_follow_torch_or_an_explicit_count(kmnist_dev):
    onnx = (DEFAULT_MODEL_DIR / INT8_FILE).read_bytes()
    images = kmnist_dev.test.images[:8]
    before = torch.get_num_threads()
    try:
        follows, fixed = OrtModel(onnx), OrtModel(onnx, threads=2)
        torch.set_num_threads(1)  # what Ray's OMP_NUM_THREADS=1 amounts to in a worker
        follows.logits(images), fixed.logits(images)
        assert (follows.threads, fixed.threads) == (1, 2)
        torch.set_num_threads(2)
        follows.logits(images)
        assert follows.threads == 2
    finally:
        torch.set_num_threads(before)


def test_trained_directory_has_its_int8_twin(trained_model_dir):
    card = json.loads((trained_model_dir / CARD_FILE).read_text(encoding="utf-8"))
    section = card["int8"]
    assert sha256((trained_model_dir / INT8_FILE).read_bytes()) == section["sha256"]
    assert section["calibration_data"]["split"] == "train" and section["gate"]["split"] == "val"
    assert section["enabled"] == (section["gate"]["agreement"] >= 0.999
                                  and section["gate"]["accuracy_fp32"] - section["gate"]["accuracy_int8"] <= 0.001 + 1e-12)
    for side in ("fp32", "int8"):
        assert {"accuracy", "ece_after", "temperature", "review"} <= set(section["test"][side])
    assert load_model(trained_model_dir).precision == ("int8" if section["enabled"] else "fp32")


def test_failed_check_falls_back_to_fp32_and_the_card_says_why(tmp_path, trained_model_dir, monkeypatch):
    monkeypatch.setattr(int8, "MIN_AGREEMENT", 1.01)  # no int8 model can pass: the fallback must engage
    model_dir = tmp_path / "strict"
    shutil.copytree(trained_model_dir, model_dir)
    build_twin(str(model_dir))
    auto = load_model(model_dir)
    section = json.loads((model_dir / CARD_FILE).read_text(encoding="utf-8"))["int8"]
    assert not section["enabled"] and "agreement" in section["fallback"] and "precision auto runs fp32" in section["fallback"]
    assert auto.precision == "fp32" and auto.int8 is None and auto.precision_note == section["fallback"]
    assert load_model(model_dir, precision="int8").precision == "int8"  # asked for explicitly: still runs
    with pytest.raises(KmnistError, match="unknown precision 'int4'"):
        load_model(model_dir, precision="int4")


def test_evaluate_reports_int8_against_fp32(tmp_path):
    out = tmp_path / "eval"
    r = subprocess.run([CLI, "evaluate", "--model", "default", "--split", "test", "--precision", "int8", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "precision int8" in r.stdout and "int8 vs fp32: top-1 agreement" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    c = metrics["int8_vs_fp32"]
    assert metrics["precision"] == "int8" and c["n"] == 1000 and c["agreement"] >= 0.999
    assert metrics["accuracy"] == pytest.approx(c["int8"]["accuracy"])
    assert c["card_check"]["enabled"] is True
