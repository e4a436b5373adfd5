"""The decision policy (kmnist_core/policy.py): decided once from card + probe + overrides, recorded as the
rows used it, followed by every worker or refused loudly; and the one accept rule. In this process, no
Ray: the same ChunkWorker and CropPredictor run as Ray actors (tests/test_predict.py, test_ray_data.py)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batch_infer.job import PredictOptions, run_predict
from batch_infer.ray_data import CropPredictor
from batch_infer.worker import ChunkTask, ChunkWorker, JobSpec
from kmnist_core import calibration
from kmnist_core.evaluate import review_decisions
from kmnist_core.model_dir import build_predictor, load_bundle, load_model
from kmnist_core.policy import PolicyDisagrees, accepted, confident, decide_policy, out_of_set
from kmnist_core.precision import Precision
from kmnist_core.predictions import read_predictions
from kmnist_core.recipe_thresholds import accepted as oof_accepted
from kmnist_core.schema import FOOTER_RUN, LISTING_SCHEMA, footer
from tests.test_int8_twin import saturating_copy


def test_the_accept_rule_compares_confidence_in_float64_and_never_accepts_nan():
    just_over_one = float(np.nextafter(1.0, 2.0))  # the accept-nothing line of a model with no safe threshold
    conf = np.array([1.0, 0.5, np.nan], np.float32)
    assert not confident(conf, just_over_one).any()
    assert confident(conf, 0.5).tolist() == [True, True, False]
    assert accepted(np.array([True, False, False]), conf, 0.5).tolist() == [False, True, False]
    assert out_of_set(np.array([0.1, 0.3], np.float32), None).tolist() == [False, False]
    assert out_of_set(np.array([0.1, 0.3], np.float32), 0.2).tolist() == [False, True]


def test_evaluate_and_the_k_fold_fitting_use_the_same_rule():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (500, 10)).astype(np.float32)
    logits[0] = [60, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # softmax 1.0 in float32
    fitted = {"temperature": 0.9, "ood_score": "max-softmax", "ood_threshold": -0.6,
              "review_below": float(np.nextafter(1.0, 2.0))}
    assert not oof_accepted(fitted, logits).any()  # float32's 1.0 does not pass the line just above 1.0
    fitted["review_below"] = 0.8
    probs, unknown, taken = review_decisions(logits, fitted["temperature"], fitted)
    expected = ~(calibration.ood_score(logits, "max-softmax") > -0.6) & (probs.max(1).astype(np.float64) >= 0.8)
    assert np.array_equal(oof_accepted(fitted, logits), expected) and np.array_equal(taken, expected)
    assert 0 < expected.sum() < len(expected)


def test_a_policy_holds_the_users_thresholds_and_records_them():
    bundle = load_bundle("default")
    card_policy = decide_policy(bundle.card, bundle.precision)
    mine = decide_policy(bundle.card, bundle.precision, review_below=0.97, ood_threshold=-0.6)
    assert (mine.review_below, mine.ood_threshold, mine.overridden) == (0.97, -0.6, ("review_below", "ood_threshold"))
    assert mine.temperature == card_policy.temperature and mine.review_promise == card_policy.review_promise
    record = mine.record()
    assert record["review_below"] == 0.97 and record["ood_threshold"] == -0.6 and record["precision"] == "int8"
    assert record["thresholds_set_by_user"] == ["review_below", "ood_threshold"]
    assert card_policy.with_thresholds(ood_threshold=-0.6).overridden == ("ood_threshold",)
    predictor = load_model("default").with_thresholds(review_below=0.97)
    assert predictor.review_below == 0.97 and predictor.ood_threshold == card_policy.ood_threshold


def crop_listing(tmp_path, images: np.ndarray) -> pa.Table:
    folder = tmp_path / "crops"
    folder.mkdir()
    names = []
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:02d}.png")
        names.append(str(folder / f"{i:02d}.png"))
    return pa.table({"path": names, "path_bytes": [n.encode() for n in names], "rel_path": [n.rsplit("/", 1)[1] for n in names],
                     "input_root": [str(folder)] * len(names)}, schema=LISTING_SCHEMA)


def job_for(tmp_path, policy) -> JobSpec:
    return JobSpec(out=str(tmp_path / "out"), run_id="r", policy=policy, read_retries=0, retry_backoff_s=0.0,
                   batch_size=16, metadata=footer({"run_id": "r", **policy.record()}, {}))


def test_a_worker_whose_probe_fails_under_the_drivers_int8_policy_fails_its_chunks(tmp_path, kmnist_dev):
    """The driver's CPU passed the probe and decided int8; this worker's CPU fails it (the saturating copy):
    it refuses every chunk, naming the chunk and why, and commits nothing. Under an fp32 policy (a driver
    whose probe failed) the same worker runs, and its rows say fp32."""
    driver = build_predictor(load_bundle("default"), device="cpu", review_below=0.97).policy
    assert driver.used == "int8"
    worker_bundle = load_bundle(saturating_copy(tmp_path))
    listing = crop_listing(tmp_path, kmnist_dev.test.images[:6])
    task = ChunkTask("c0", b"", b"", listing)
    (tmp_path / "out" / "predictions").mkdir(parents=True)
    with pytest.raises(PolicyDisagrees, match=r"chunk c0: this worker .* would run fp32 \(the int8 twin fails its probe"):
        ChunkWorker(worker_bundle, job_for(tmp_path, driver)).run(task)
    assert not list((tmp_path / "out" / "predictions").iterdir())
    fp32 = decide_policy(worker_bundle.card, Precision("auto", "fp32", "the driver's probe failed"), review_below=0.97)
    stats = ChunkWorker(worker_bundle, job_for(tmp_path, fp32)).run(task)
    rows = pq.read_table(tmp_path / "out" / "predictions").to_pylist()
    assert stats["rows"] == len(rows) == 6 and {r["precision"] for r in rows} == {"fp32"}


def test_the_ray_data_stage_refuses_a_policy_its_cpu_cannot_follow(tmp_path):
    driver = build_predictor(load_bundle("default"), device="cpu").policy
    stage = CropPredictor(load_bundle(saturating_copy(tmp_path)), policy=driver, batch_size=4)
    with pytest.raises(PolicyDisagrees, match="fails its probe"):
        stage(pa.table({"bytes": pa.array([b""], pa.binary())}))


def test_a_run_whose_driver_falls_back_to_fp32_says_so_in_run_json_the_footers_and_every_row(tmp_path, kmnist_dev):
    """The int8 twin fails its probe here: the run decides fp32, records the fp32 thresholds it used, and
    every row says fp32 (run in this process: the local executor's worker is this process)."""
    model_dir = saturating_copy(tmp_path)
    listing = crop_listing(tmp_path, kmnist_dev.test.images[:12])
    out = tmp_path / "out"
    summary = run_predict([tmp_path / "crops"], out, PredictOptions(model=str(model_dir), executor="local",
                                                                     ood_threshold=-0.999))
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    fp32 = load_model(model_dir, precision="fp32").policy
    assert run["precision"] == summary["precision"] == "fp32" and "fails its probe on this CPU" in run["precision_note"]
    assert (run["review_below"], run["ood_threshold"], run["temperature"]) == (fp32.review_below, -0.999, fp32.temperature)
    assert run["thresholds_set_by_user"] == ["ood_threshold"]
    shard = next((out / "predictions").glob("*.parquet"))
    footer_run = json.loads(pq.read_schema(shard).metadata[FOOTER_RUN])
    assert {k: footer_run[k] for k in ("precision", "review_below", "ood_threshold")} == {
        "precision": "fp32", "review_below": fp32.review_below, "ood_threshold": -0.999}
    rows = read_predictions(out).to_pandas()
    assert len(rows) == listing.num_rows and set(rows.precision) == {"fp32"}
    unknown = rows.ood_score.to_numpy() > np.float32(-0.999)  # the user's threshold, not the card's
    assert 0 < unknown.sum() < len(rows)
    assert (rows.ood_score.to_numpy() > np.float32(fp32.ood_threshold)).sum() < unknown.sum()  # the card's flags fewer
    assert np.array_equal(rows.review_reason.to_numpy() == "unknown_character", unknown)
