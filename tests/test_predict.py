"""`predict` against a real local Ray: real files, real Parquet, read back without Ray."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from batch_infer.dispatch import pool_size
from batch_infer.job import PredictOptions, run_predict
from kmnist_core.errors import KmnistError
from kmnist_core.out_lock import LOCK_FILE
from kmnist_core.predictions import read_predictions
from reviews.report import write_report_set
from tests.crop_tree import HOLD_ENV, hold_file, mixed_tree, plain_tree, release
from tests.processes import CLI
from tests.test_cli import invoke

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, kmnist_dev):
    root = tmp_path_factory.mktemp("scans")
    d = kmnist_dev
    expected = mixed_tree(root, d.test.images, d.test.labels, d.classes.chars)
    return root, expected


@pytest.fixture(scope="module")
def mixed_run(mixed, ray_session, tmp_path_factory):
    root, expected = mixed
    out = tmp_path_factory.mktemp("out")
    summary = run_predict([root], out, PredictOptions(batch_size=8, executor="ray"))
    assert summary["executor"] == "ray"
    return out, summary, expected


def test_one_row_per_image_file_with_errors_as_rows(mixed_run):
    out, summary, expected = mixed_run
    df = read_predictions(out).to_pandas()
    assert sorted(df.rel_path) == sorted([*expected["good"], *expected["errors"]])
    assert not df.path.duplicated().any()
    errors = df[df.error.notna()].set_index("rel_path")
    for rel, kind in expected["errors"].items():
        kinds = kind if isinstance(kind, tuple) else (kind,)
        assert errors.loc[rel, "error_kind"] in kinds, rel
        row = errors.loc[rel]
        assert pd.isna(row.pred_char) and pd.isna(row.confidence) and row.topk_chars is None
        assert pd.isna(row.ood_score) and pd.isna(row.ink_x)
        assert row.needs_review and row.review_reason == "error"
    assert summary["discovery"]["skipped"]["hidden"] == expected["hidden"]
    assert summary["discovery"]["skipped"]["not_image_extension"] == expected["non_image"]


def test_real_crops_in_every_form_are_recognized(mixed_run):
    out, _, expected = mixed_run
    df = read_predictions(out).to_pandas().set_index("rel_path")
    good = df.loc[list(expected["good"])]
    assert good.error.isna().all()
    correct = sum(good.loc[rel, "pred_char"] == char for rel, char in expected["good"].items())
    assert correct >= len(expected["good"]) - 2, good[["pred_char", "confidence"]]
    assert good.loc["book1/page1/scan.PNG", "inverted"] and not good.loc["book1/page1/light.png", "inverted"]
    assert (good.loc["book2/日本 語/tall crop.png", ["width", "height"]].tolist()) == [48, 96]
    assert good.loc["book2/exif.jpg", ["width", "height"]].tolist() == [28, 28]
    assert (good.loc["book2/日本 語/tall crop.png", ["ink_w", "ink_h"]] <= [48, 96]).all()
    assert good.ink_x.notna().all() and good.ood_score.notna().all()
    assert (good.needs_review == good.review_reason.notna()).all()
    row = good.loc["book1/page1/light.png"]
    assert len(row.topk_chars) == 3 and row.topk_chars[0] == row.pred_char
    assert row.topk_confidences[0] == pytest.approx(row.confidence)
    assert row.margin == pytest.approx(row.topk_confidences[0] - row.topk_confidences[1], abs=1e-6)
    assert len(row.sha256) == 64 and row.node_id


def test_parquet_is_plain_arrow_readable_without_ray(mixed_run):
    out, _, _ = mixed_run
    script = textwrap.dedent(f"""
        import json, sys
        import duckdb, pandas as pd, pyarrow as pa, pyarrow.parquet as pq
        t = pq.read_table({str(out / 'predictions')!r})
        assert pa.types.is_list(t.schema.field("topk_chars").type), t.schema
        assert pa.types.is_list(t.schema.field("topk_confidences").type)
        meta = pq.read_schema(sorted(__import__("glob").glob({str(out / 'predictions' / '*.parquet')!r}))[0]).metadata
        assert meta[b"kmnist_batch.schema_version"] == b"4"
        assert t.schema.field("ink_x").type == pa.int32() and t.schema.field("review_reason").type == pa.string()
        assert json.loads(meta[b"kmnist_batch.model_card"])["classes"][0]["char"] == "お"
        df = pd.read_parquet({str(out / 'predictions')!r})
        n = duckdb.sql("select count(*) from read_parquet('{out}/predictions/*.parquet') where error is null").fetchall()[0][0]
        top = duckdb.sql("select topk_chars[1] = pred_char from read_parquet('{out}/predictions/*.parquet') where error is null").fetchall()
        assert all(r[0] for r in top)
        assert "ray" not in sys.modules
        print(len(df), n)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    total, ok = map(int, r.stdout.split())
    assert total == len(read_predictions(out)) and ok == total - 4


def test_run_json_and_summary(mixed_run):
    out, summary, expected = mixed_run
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["status"] == "completed" and run["model_card"]["model_id"] == run["model_id"]
    assert run["options"]["batch_size"] == 8
    for name in ("confidence_histogram.png", "class_distribution.png", "review_sheet-error-1.png", "review.html",
                 "by_folder.csv", "summary.json"):
        assert (out / "summary" / name).stat().st_size > 0, name
    s = json.loads((out / "summary" / "summary.json").read_text(encoding="utf-8"))
    assert s["files_seen"] == len(expected["good"]) + len(expected["errors"])
    assert s["errors"] == 4 and s["errors_by_kind"]["too_large"] == 1
    assert s["skipped"]["hidden"] == 2 and s["needs_review"] >= 4
    assert s["review_reasons"]["error"] == 4 and sum(s["review_reasons"].values()) == s["needs_review"]
    folders = pd.read_csv(out / "summary" / "by_folder.csv")
    assert folders.review_error.sum() == 4 and (folders.filter(like="review_").sum(axis=1) == folders.needs_review).all()


def test_report_regenerates_from_parquet_alone(mixed_run, tmp_path):
    out, _, _ = mixed_run
    copy = tmp_path / "copy"
    shutil.copytree(out / "predictions", copy / "predictions")
    s = write_report_set(copy)  # no run.json, no summary/
    assert s["files_seen"] == len(read_predictions(out)) and s["skipped"]["hidden"] == 2
    assert (copy / "summary" / "review.html").exists()
    r = invoke("report", copy)
    assert r.exit_code == 0 and "needs review" in r.stdout, r.output


def test_non_empty_out_is_refused_without_resume_or_overwrite(mixed, mixed_run, ray_session):
    root, _ = mixed
    out, _, _ = mixed_run
    with pytest.raises(KmnistError, match="--resume"):
        run_predict([root], out, PredictOptions())
    with pytest.raises(KmnistError, match="contradict"):
        run_predict([root], out, PredictOptions(resume=True, overwrite=True))


def test_resume_of_finished_run_rereads_only_transient_error_rows(mixed, mixed_run, ray_session):
    root, _ = mixed
    out, first, _ = mixed_run
    before = read_predictions(out).to_pandas()
    transient = before.error_kind.isin(["truncated", "unreadable"]).sum()
    assert transient == 1  # the truncated PNG; empty, not_image and too_large are permanent
    again = run_predict([root], out, PredictOptions(resume=True, read_retries=0, executor="local"))
    assert again["rows_written"] == 0 and again["rows_replaced"] == transient
    assert again["already_done"] == first["rows_written"] - transient
    after = read_predictions(out).to_pandas()
    assert len(after) == len(before) and not after.path_bytes.duplicated().any()


def chunk_workers(ray) -> dict[str, dict]:
    """This driver's prediction actors (any state) from Ray's GCS actor table, by actor id. (The public
    state API needs the dashboard, which the session's Ray runs without.)"""
    from ray._private import state

    job = ray.get_runtime_context().get_job_id()
    return {k: v for k, v in state.actors().items() if v["ActorClassName"] == "RayChunkWorker" and v["JobID"] == job}


def test_killed_model_worker_is_retried_and_output_is_exact(tmp_path, kmnist_dev, ray_session):
    files = plain_tree(tmp_path / "in", kmnist_dev.test.images, 3000)
    earlier = set(chunk_workers(ray_session))  # actors of earlier runs in this session: not ours to kill
    killed, done = [], []

    def kill_a_model_actor_once(stats):
        """At the first committed chunk (others are still queued on both workers), SIGKILL a worker of this run."""
        done.append(stats["rows"])
        if killed:
            return
        ours = [a for k, a in chunk_workers(ray_session).items() if k not in earlier and a["State"] == "ALIVE"]
        os.kill(ours[0]["Pid"], signal.SIGKILL)
        killed.append((ours[0]["ActorID"], sum(done)))

    out = tmp_path / "out"
    summary = run_predict([tmp_path / "in"], out, PredictOptions(batch_size=64, rows_per_shard=256, executor="ray"),
                          kill_a_model_actor_once)
    assert summary["executor"] == "ray" and killed and killed[0][1] < len(files)  # the kill happened mid-job
    ours = {k: a for k, a in chunk_workers(ray_session).items() if k not in earlier}
    assert ours[killed[0][0]]["State"] == "DEAD"
    assert len(ours) == pool_size(ray_session, 1.0, 0.0) + 1  # the pool, and one replacement for the killed worker
    df = read_predictions(out).to_pandas()
    assert len(df) == len(files) and not df.path.duplicated().any() and df.error.isna().all()
    assert summary["rows_written"] == len(files)


def wait_until_unlocked(out: Path) -> None:
    """SIGKILL returns before the killed job's process has exited: the kernel drops its lock on OUT when it has."""
    deadline = time.monotonic() + 60
    with open(out / LOCK_FILE, "rb") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, "the killed run still holds OUT's lock"
                time.sleep(0.02)


def test_resume_after_kill_9_gives_exactly_one_row_per_file(tmp_path, kmnist_dev):
    """The run is held busy on its last chunk (a hold file, listed last) while the test kills it."""
    files = plain_tree(tmp_path / "in", kmnist_dev.test.images, 1200, per_folder=400)
    held = hold_file(tmp_path / "in" / "zz", kmnist_dev.test.images[0])
    files.append(held)
    out = tmp_path / "out"
    args = [CLI, "predict", str(tmp_path / "in"), "--out", str(out), "--batch-size", "64", "--rows-per-shard", "200"]
    proc = subprocess.Popen(args, env={**os.environ, **HOLD_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "predictions").glob("*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended although its last chunk is held"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the child running the job
        proc.wait()
    wait_until_unlocked(out)
    first = read_predictions(out).to_pandas()
    assert 0 < len(first) < len(files), "the run was not interrupted mid-way"

    with pytest.raises(KmnistError, match="--resume"):  # refuses to clobber without --resume
        run_predict([tmp_path / "in"], out, PredictOptions(executor="local"))
    release(held)
    again = run_predict([tmp_path / "in"], out, PredictOptions(resume=True, executor="local"))
    assert again["already_done"] == len(first) and again["rows_written"] == len(files) - len(first)
    df = read_predictions(out).to_pandas()
    assert len(df) == len(files) and not df.path.duplicated().any()
    assert set(df.path) == {str(p) for p in files}
    # What the killed run committed was kept, not recomputed.
    assert (df.run_id == first.run_id.iloc[0]).sum() == len(first)
    assert not list((out / "predictions").glob("*.tmp")) and not list((out / "predictions").glob(".*"))


def test_cli_predict_missing_input_is_one_line(tmp_path):
    r = subprocess.run([CLI, "predict", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"error: input {tmp_path / 'nope'} does not exist"


def test_a_worker_whose_probe_disagrees_with_the_drivers_policy_fails_its_chunk_loudly(tmp_path, kmnist_dev, ray_session):
    """A Ray worker on a CPU that fails the int8 probe the driver's CPU passed (the saturating copy stands for
    that CPU) does not switch to fp32 on its own: its chunk fails with one line that says why, nothing is
    committed, and the error is one a user can act on."""
    from batch_infer.dispatch import run_on_ray
    from batch_infer.job import failure_reason, user_facing
    from batch_infer.worker import ChunkTask
    from kmnist_core.model_dir import build_predictor, load_bundle
    from kmnist_core.storage import resolve
    from tests.test_int8_twin import saturating_copy
    from tests.test_policy import crop_listing, job_for

    driver = build_predictor(load_bundle("default"), device="cpu").policy
    bundle = load_bundle(saturating_copy(tmp_path))
    (tmp_path / "out" / "predictions").mkdir(parents=True)
    task = ChunkTask("c0", b"", b"", crop_listing(tmp_path, kmnist_dev.test.images[:4]))
    with pytest.raises(Exception) as failed:
        list(run_on_ray(ray_session, bundle, job_for(tmp_path, driver), [task], 1, 0.5, 0.0))
    assert user_facing(failed.value)
    reason = failure_reason(failed.value, resolve(tmp_path / "out"))
    assert reason.startswith("chunk c0: this worker") and "fails its probe" in reason and "--precision fp32" in reason
    assert "\n" not in reason and not list((tmp_path / "out" / "predictions").iterdir())

