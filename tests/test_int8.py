"""The int8 CPU path (kmnist_core/int8.py): the shipped int8 model keeps the default model's accuracy,
every trained model directory gets a checked int8 twin, precision auto falls back to fp32 when the check
fails or there is no twin, and `predict --precision` reaches the rows. Building a twin explicitly and
the probe: tests/test_int8_twin.py."""

import dataclasses
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from kmnist_core import calibration, int8
from kmnist_core.datasets import load_dataset
from kmnist_core.errors import KmnistError
from kmnist_core.experiment import build_twin
from kmnist_core.int8 import INT8_FILE, PROBE_FILE
from kmnist_core.onnx_export import sha256
from kmnist_core.ort_model import OrtModel
from kmnist_core.model_dir import CARD_FILE, DEFAULT_MODEL_DIR, build_predictor, load_bundle, load_model, read_model_files
from kmnist_core.precision import Precision, resolve_precision
from kmnist_core.predictions import read_predictions
from tests.test_cli import invoke


def test_default_model_ships_its_int8_twin_with_unchanged_accuracy(kmnist_dev):
    card, weights = read_model_files("default")
    section = card.int8
    assert sha256((DEFAULT_MODEL_DIR / INT8_FILE).read_bytes()) == section.sha256
    assert section.enabled and section.fallback is None
    assert section.calibration_data == {"dataset": "kmnist-pooled", "split": "train", "images": 2048, "seed": 0}
    assert section.to_json() == card.raw["int8"]  # the card's JSON, key for key, is its dataclass's
    fp32, q = load_model("default", precision="fp32"), load_model("default")  # auto on CPU: int8
    assert (fp32.precision, q.precision) == ("fp32", "int8")
    test = load_dataset(section.calibration_data["dataset"]).test  # the split the card's figures are on
    # the twin alone against the fp32 model, both as is (no views), as the card measured it
    f, i = fp32.fp32_logits(test.images), q.int8.logits(test.images)
    agreement = float((f.argmax(1) == i.argmax(1)).mean())
    acc_f, acc_i = (float((x.argmax(1) == test.labels).mean()) for x in (f, i))
    ece_f = calibration.expected_calibration_error(calibration.softmax(f, fp32.temperature), test.labels)
    ece_i = calibration.expected_calibration_error(calibration.softmax(i, q.temperature), test.labels)
    # The bar on kmnist-pooled test (~1,000 images of both official splits). ECE on 1,000 crops at
    # 99 % accuracy moves by ~0.2 point when the temperature moves by 2 % (the fp32 model alone does), so
    # the quantization's own effect is measured at one temperature: int8's logits against fp32's.
    assert agreement >= 0.999 and acc_f - acc_i <= 0.001 + 1e-9 and abs(ece_i - ece_f) <= 0.005
    # The default was trained on all 14,000 images, test included, so its NLL there is tiny: the
    # bound is 10 % of it or 0.002 nats, whichever is larger.
    nll = lambda logits: float(-np.log(calibration.softmax(logits, q.temperature)[np.arange(len(logits)), test.labels]).mean())  # noqa: E731
    assert abs(nll(i) - nll(f)) <= max(0.1 * nll(f), 0.002)
    # The card's figures are the ones measured here.
    assert section.test["agreement"] == pytest.approx(agreement)
    assert section.test["int8"]["accuracy"] == pytest.approx(acc_i)
    # Its thresholds come from out-of-fold predictions (int8_refit false): int8 runs on them, not on a
    # refit on images it was trained on.
    assert card.raw["calibration"]["int8_refit"] is False
    assert (q.temperature, q.review_below, q.ood_threshold) == (fp32.temperature, fp32.review_below, fp32.ood_threshold)
    assert q.review_below == section.calibration["review_below"]


def test_int8_predictor_from_a_bundle_as_a_worker_receives_it(kmnist_dev, tmp_path):
    bundle = load_bundle("default", precision="int8")
    assert bundle.precision == Precision("int8", "int8") and bundle.twin is not None
    p = build_predictor(pickle.loads(pickle.dumps(bundle)), threads=1)  # what a Ray worker receives
    assert p.precision == "int8" and p.int8.threads == p.fp32.threads == 1 and p.probe["passed"]
    images = kmnist_dev.test.images[:64]
    np.testing.assert_array_equal(p.logits(images), load_model("default").logits(images))
    preds = p.predict([images[0]])
    assert preds[0].char == p.classes.chars[int(p.logits(images[:1]).argmax())]
    tampered = Path(shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "tampered"))
    onnx = (tampered / INT8_FILE).read_bytes()
    (tampered / INT8_FILE).write_bytes(onnx[:-1] + bytes([onnx[-1] ^ 1]))
    with pytest.raises(KmnistError, match="int8 model of .* is not the one its card names: model.int8.onnx hashes to"):
        load_bundle(tampered)
    assert build_predictor(load_bundle("default", precision="fp32")).precision == "fp32"


def test_ort_threads_follow_omp_num_threads_or_an_explicit_count(kmnist_dev, monkeypatch):
    onnx = (DEFAULT_MODEL_DIR / INT8_FILE).read_bytes()
    images = kmnist_dev.test.images[:8]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray sets in a one-CPU worker
    follows, fixed = OrtModel(onnx), OrtModel(onnx, threads=2)
    follows.logits(images), fixed.logits(images)
    assert (follows.threads, fixed.threads) == (1, 2)
    assert follows.session.get_session_options().intra_op_num_threads == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert OrtModel(onnx).threads == len(os.sched_getaffinity(0))


def bare_copy(model_dir: Path, dest: Path) -> Path:
    """A model directory as written before int8 existed: no int8 files, no int8 card section."""
    shutil.copytree(model_dir, dest)
    for name in (INT8_FILE, PROBE_FILE):
        (dest / name).unlink()
    card = json.loads((dest / CARD_FILE).read_text(encoding="utf-8"))
    del card["int8"]
    (dest / CARD_FILE).write_text(json.dumps(card), encoding="utf-8")
    return dest


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
    model_dir = bare_copy(trained_model_dir, tmp_path / "strict")
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
    r = invoke("evaluate", "--model", "default", "--split", "test", "--precision", "int8", "--out", out)
    assert r.exit_code == 0, r.output
    assert "precision int8" in r.stdout and "int8 vs fp32: top-1 agreement" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    c = metrics["int8_vs_fp32"]
    assert metrics["precision"] == "int8" and c["n"] == 1000 and c["agreement"] >= 0.999
    assert metrics["accuracy"] == pytest.approx(c["int8"]["accuracy"])
    assert c["card_check"]["enabled"] is True


@pytest.fixture(scope="module")
def crops(tmp_path_factory, kmnist_dev) -> Path:
    """Twelve real test characters as 28x28 crop files."""
    root = tmp_path_factory.mktemp("crops")
    for i, img in enumerate(kmnist_dev.test.images[:12]):
        Image.fromarray(img).save(root / f"{i:02d}.png")
    return root


def predicted(out: Path) -> tuple[dict, dict, pd.DataFrame]:
    """run.json, the run record in the first shard's footer, and the rows by file name."""
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    shard = sorted((out / "predictions").glob("*.parquet"))[0]
    footer = json.loads(pq.read_schema(shard).metadata[b"kmnist_batch.run"])
    return run, footer, read_predictions(out).to_pandas().set_index("rel_path").sort_index()


@pytest.mark.parametrize("asked,runs", [("fp32", "fp32"), ("int8", "int8"), ("auto", "int8")])
def test_predict_precision_reaches_the_rows_and_run_json(tmp_path, crops, asked, runs):
    """Each row's confidence is the one the model gives at that precision (int8 and fp32 differ), and
    run.json and the shard footers name it; auto is int8 on CPU for a model that passed its check. At
    int8, rows near a decision are the fp32 model's, and say so."""
    out = tmp_path / "out"
    r = invoke("predict", crops, "--out", out, "--precision", asked, "--executor", "local")
    assert r.exit_code == 0, r.output
    run, footer, rows = predicted(out)
    assert run["precision"] == footer["precision"] == runs and run["options"]["precision"] == asked
    model = load_model("default", precision=runs)
    other = load_model("default", precision="fp32" if runs == "int8" else "int8")
    pixels = np.stack([model.prepare(Image.open(crops / name)).pixels for name in rows.index])
    a = model.assess(pixels)
    # every row names the runtime that produced it
    assert list(rows["precision"]) == ["fp32" if f else runs for f in a.fp32_rows]
    assert (rows["precision"] == runs).sum() >= 10  # these are clear crops: int8 decides most of them
    expected = a.probabilities.max(1)
    np.testing.assert_allclose(rows["confidence"].to_numpy(), expected, rtol=0, atol=1e-6)
    # ... which the other precision's rows would not be.
    assert np.abs(other.assess(pixels).probabilities.max(1) - expected).max() > 1e-4


def test_int8_rows_near_a_decision_are_decided_by_fp32(tmp_path, crops):
    """A row whose int8 confidence lies just over the review threshold in use (here predict's
    --review-below) is recomputed in fp32; the same row under a threshold far below it stays int8."""
    q, fp32 = load_model("default", precision="int8"), load_model("default", precision="fp32")
    names = sorted(p.name for p in crops.iterdir())
    pixels = np.stack([q.prepare(Image.open(crops / name)).pixels for name in names])
    twin = q.int8.logits(pixels)
    clear = ~int8.near_decision(twin, q.temperature, -1.0, q.ood_method, None)  # top-1 far from the top-2
    assert clear.sum() >= 8
    confidence = calibration.softmax(twin, q.temperature).max(1)
    row = int(np.flatnonzero(clear)[np.argmin(confidence[clear])])  # the least sure clear crop
    near_threshold = confidence[row] - int8.RECHECK_ABOVE / 2
    far_threshold = confidence[row] - 2 * int8.RECHECK_BELOW
    # An out-of-set threshold no crop is near (max-softmax scores lie in [-1, -0.1]): the review band decides.
    a = q.with_thresholds(review_below=near_threshold, ood_threshold=1.0).assess(pixels)
    assert a.fp32_rows[row] and not a.fp32_rows[clear & (confidence >= near_threshold + int8.RECHECK_ABOVE)].any()
    # fp32's probabilities (to float rounding: torch's kernels depend a little on the batch size)
    np.testing.assert_allclose(a.probabilities[a.fp32_rows], fp32.assess(pixels).probabilities[a.fp32_rows], atol=1e-6)
    assert not q.with_thresholds(review_below=far_threshold, ood_threshold=1.0).assess(pixels).fp32_rows[row]
    for threshold, expected in ((near_threshold, "fp32"), (far_threshold, "int8")):
        out = tmp_path / f"out-{expected}"
        r = invoke("predict", crops, "--out", out, "--precision", "int8", "--review-below", f"{threshold:.6f}",
                   "--ood-threshold", "1", "--executor", "local")
        assert r.exit_code == 0, r.output
        assert predicted(out)[2].loc[names[row], "precision"] == expected


def test_auto_precision_is_fp32_on_cuda_and_follows_the_check():
    """The decision alone (a pure function): on CUDA auto runs fp32, int8 is CPU only."""
    card, _ = read_model_files("default")
    twin = load_bundle("default", precision="int8").twin
    decide = lambda requested, device, card=card, twin=twin: resolve_precision(requested, device, card, twin, "m").used  # noqa: E731
    assert decide("auto", "cpu") == "int8"
    assert decide("auto", "cuda") == decide("auto", "cuda:1") == "fp32"
    assert "CPU path" in resolve_precision("auto", "cuda", card, twin, "m").note
    assert decide("fp32", "cpu") == "fp32"
    with pytest.raises(KmnistError, match="CPU only"):
        decide("int8", "cuda")
    assert decide("auto", "cpu", card=card.with_sections(int8=dataclasses.replace(card.int8, enabled=False))) == "fp32"
    assert decide("auto", "cpu", twin=None) == "fp32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the decision alone is tested without)")
def test_auto_precision_runs_fp32_on_a_gpu():
    assert load_bundle("default", "auto", "cuda").precision.used == "fp32"
    assert load_model("default", device="cuda").precision == "fp32"


def test_without_a_twin_or_its_training_data_auto_runs_fp32_and_int8_is_refused(tmp_path, trained_model_dir, crops):
    """A model directory from before int8, trained on data this machine does not have: auto runs fp32 and
    says why, asking for int8 is a clear error given before OUT is created, `kmnist-batch model int8`
    says what data is missing, and nothing is written into the directory."""
    model_dir = bare_copy(trained_model_dir, tmp_path / "m")
    card = json.loads((model_dir / CARD_FILE).read_text(encoding="utf-8"))
    card["training"]["dataset"] = "kmnist"  # the official set, trained on elsewhere
    card["training"]["config"]["data_dir"] = str(tmp_path / "no-data")
    (model_dir / CARD_FILE).write_text(json.dumps(card), encoding="utf-8")
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}

    auto = load_model(model_dir)
    assert auto.precision == "fp32" and "no int8 twin" in auto.precision_note
    with pytest.raises(KmnistError, match="has no int8 twin"):
        load_model(model_dir, precision="int8")

    out = tmp_path / "out"
    r = invoke("predict", crops, "--out", out, "--model", model_dir, "--executor", "local")
    assert r.exit_code == 0, r.output
    run, footer, rows = predicted(out)
    assert run["precision"] == footer["precision"] == "fp32" and len(rows) == 12 and "no int8 twin" in run["precision_note"]
    refused = tmp_path / "refused"
    r = invoke("predict", crops, "--out", refused, "--model", model_dir, "--precision", "int8", "--executor", "local")
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and "has no int8 twin" in r.stderr, r.output
    assert not refused.exists()
    r = invoke("model", "int8", model_dir)
    assert r.exit_code == 2 and "missing data file" in r.stderr, r.output
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
