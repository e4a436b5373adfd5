"""Inputs and OUT on an object store: a real S3-protocol server on 127.0.0.1 (moto), real runs, and the
Parquet read back from s3:// by pyarrow in a process that never imports Ray.

Runs that must be killed or held are real CLI processes kept busy by hold files (tests/crop_tree.py:
a held object is read once `<key>.release` exists); the rest run in-process with the server's
environment set for the test."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
from typing import Callable, Iterator

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batch_infer.job import PredictOptions, run_predict
from kmnist_core.out_lock import pid_running
from jobs.cli import app
from kmnist_core.errors import KmnistError
from tests.crop_tree import HOLD_ENV, hold_file, plain_tree
from tests.object_store import client, new_bucket, put_objects, report_root, upload_tree
from tests.processes import CliProcesses, wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> dict:
    """The server's environment, for this process too (in-process runs reach it the standard way)."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def bucket(s3_env) -> str:
    return new_bucket(s3_env)



def release_object(env: dict, uri: str) -> None:
    put_objects(env, [(uri.removeprefix("s3://") + ".release", b"")])


def shard_infos(env: dict, bucket: str) -> list[pafs.FileInfo]:
    infos = client(env).get_file_info(pafs.FileSelector(f"{bucket}/out/predictions", allow_not_found=True))
    return [i for i in infos if i.base_name.endswith(".parquet")]


def shard_runs(env: dict, bucket: str) -> dict[str, str]:
    """Each committed shard's name and the run that wrote it (from its footer)."""
    fs = client(env)
    return {i.base_name: json.loads(pq.read_schema(i.path, filesystem=fs).metadata[b"kmnist_batch.run"])["run_id"]
            for i in shard_infos(env, bucket)}


def read_json(env: dict, key: str) -> dict:
    """An object's JSON; {} while it does not exist, or when it was replaced while being read (pyarrow
    reads in ranged GETs, which may then mix two versions)."""
    try:
        with client(env).open_input_stream(key) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return {}


def lock_holder(env: dict, bucket: str) -> dict:
    """The holder named by OUT/.lock (read again if a heartbeat replaced it while it was being read)."""
    holder: dict = {}
    wait_for(lambda: bool(holder.update(read_json(env, f"{bucket}/out/.lock")) or holder))
    return holder


@pytest.fixture
def start(s3_env) -> Iterator[Callable[..., subprocess.Popen]]:
    """Starts held CLI predict runs against the server, each in a process group of its own; whatever is
    left of them at the end is killed."""
    procs = CliProcesses({**s3_env, **HOLD_ENV})
    yield functools.partial(procs, "predict")
    procs.close()


def read_back(env: dict, uri: str) -> dict:
    """Rows, summary and run record read from the object store with pyarrow alone (as a downstream reader
    would), through a client of its own."""
    fs = client(env)
    root = uri.removeprefix("s3://")
    t = pq.read_table(f"{root}/predictions", filesystem=fs, columns=["path", "error_kind", "pred_char", "run_id"])
    with fs.open_input_stream(f"{report_root(fs, root)}/summary/summary.json") as f:
        summary = json.loads(f.read())
    with fs.open_input_stream(f"{root}/run.json") as f:
        run = json.loads(f.read())
    return {"paths": t.column("path").to_pylist(), "errors": t.column("error_kind").drop_null().to_pylist(),
            "run_ids": sorted(set(t.column("run_id").to_pylist())), "summary": summary, "status": run["status"]}


def test_predict_from_s3_to_s3_gives_one_row_per_object(s3_env, bucket, tmp_path, kmnist_dev, monkeypatch):
    plain_tree(tmp_path / "crops", kmnist_dev.test.images, 200)
    (tmp_path / "crops" / "f000" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "crops" / "notes.txt").write_text("not an image")
    objects = upload_tree(s3_env, tmp_path / "crops", bucket, "crops")
    images = {o for o in objects if o.endswith(".png")}
    monkeypatch.chdir(tmp_path)
    run_predict([f"s3://{bucket}/crops"], f"s3://{bucket}/out", PredictOptions(executor="local"))
    assert [p.name for p in tmp_path.iterdir()] == ["crops"]  # nothing local: no folder named "s3:"
    back = read_back(s3_env, f"s3://{bucket}/out")
    assert sorted(back["paths"]) == sorted(images)  # rows keep the full URI
    assert len(back["errors"]) == 1  # the broken PNG: an error row, not a failed job
    assert back["status"] == "completed" and back["summary"]["files_seen"] == len(images)
    assert back["summary"]["skipped"] == {"not_image_extension": 1} and back["summary"]["duplicate_paths"] == 0
    summary = f"{report_root(client(s3_env), f'{bucket}/out')}/summary"
    summary_objects = {i.base_name for i in client(s3_env).get_file_info(pafs.FileSelector(summary))}
    assert {"review.html", "by_folder.csv", "confidence_histogram.png"} <= summary_objects
    assert not any(i.base_name == ".lock" for i in client(s3_env).get_file_info(pafs.FileSelector(f"{bucket}/out")))

    r = CliRunner().invoke(app, ["report", f"s3://{bucket}/out"])
    assert r.exit_code == 0 and f"s3://{bucket}/out/predictions" in r.output, r.output


def test_kill_9_then_resume_against_s3_is_exactly_once(s3_env, bucket, tmp_path, kmnist_dev, start):
    plain_tree(tmp_path / "crops", kmnist_dev.test.images, 300, per_folder=100)
    hold_file(tmp_path / "crops" / "zz", kmnist_dev.test.images[0])  # sorts last: its chunk cannot commit
    objects = upload_tree(s3_env, tmp_path / "crops", bucket, "crops")
    held = f"s3://{bucket}/crops/zz/busy.hold.png"
    out = f"s3://{bucket}/out"
    proc = start(f"s3://{bucket}/crops", "--out", out, "--rows-per-shard", "50")
    wait_for(lambda: len(shard_infos(s3_env, bucket)) >= 2, proc)
    holder = lock_holder(s3_env, bucket)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    t = pq.read_table(f"{bucket}/out/predictions", filesystem=client(s3_env), columns=["path"])
    assert 0 < len(t) < len(objects) and held not in t.column("path").to_pylist()  # cut off mid-way

    wait_for(lambda: not pid_running(holder["pid"]))  # a killed process takes a moment to go
    with pytest.raises(KmnistError, match="--resume"):  # the killed run's lock is taken over, not obeyed
        run_predict([f"s3://{bucket}/crops"], out, PredictOptions(executor="local"))
    run_predict([f"s3://{bucket}/crops"], out, PredictOptions(resume=True, executor="local"))
    back = read_back(s3_env, out)
    assert len(back["paths"]) == len(objects) and set(back["paths"]) == objects
    assert back["summary"]["duplicate_paths"] == 0


def test_overwrite_on_s3_deletes_old_shards_after_its_first_commit_and_refuses_a_live_holder(
        s3_env, bucket, tmp_path, kmnist_dev, start):
    """No rename on an object store: the old shards stay until the new run's first shard is committed,
    then go; meanwhile a second run is refused, since the lock object's holder is alive."""
    plain_tree(tmp_path / "old", kmnist_dev.test.images, 200)
    upload_tree(s3_env, tmp_path / "old", bucket, "old")
    out = f"s3://{bucket}/out"
    earlier = run_predict([f"s3://{bucket}/old"], out, PredictOptions(rows_per_shard=50, executor="local"))
    old = shard_runs(s3_env, bucket)
    assert len(old) >= 2 and set(old.values()) == {earlier["run_id"]}

    plain_tree(tmp_path / "new", kmnist_dev.test.images, 200, per_folder=100)
    hold_file(tmp_path / "new" / "a", kmnist_dev.test.images[0])  # in the first chunk, which runs alone
    hold_file(tmp_path / "new" / "zz", kmnist_dev.test.images[1])  # in the last chunk
    new = upload_tree(s3_env, tmp_path / "new", bucket, "new")
    proc = start(f"s3://{bucket}/new", "--out", out, "--overwrite", "--rows-per-shard", "50")
    wait_for(lambda: read_json(s3_env, f"{bucket}/out/run.json").get("status") == "running", proc)
    holder = lock_holder(s3_env, bucket)
    for opts in (PredictOptions(resume=True, executor="local"), PredictOptions(overwrite=True, executor="local")):
        with pytest.raises(KmnistError, match=f"is in use by run {holder['run_id']}"):
            run_predict([f"s3://{bucket}/old"], out, opts)
    assert shard_runs(s3_env, bucket) == old  # nothing deleted up front

    release_object(s3_env, f"s3://{bucket}/new/a/busy.hold.png")
    wait_for(lambda: not {i.base_name for i in shard_infos(s3_env, bucket)} & set(old), proc)
    now = shard_runs(s3_env, bucket)
    assert now and set(now.values()) == {holder["run_id"]}  # the first new shard is there, no old one
    assert read_json(s3_env, f"{bucket}/out/run.json")["status"] == "running"  # held in its last chunk: the run goes on

    release_object(s3_env, f"s3://{bucket}/new/zz/busy.hold.png")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    back = read_back(s3_env, out)
    assert set(back["paths"]) == new and len(back["paths"]) == len(new) and back["run_ids"] == [holder["run_id"]]


@pytest.mark.training
def test_tune_storage_on_s3(s3_env, bucket, tmp_path, small_dev, ray_session):
    """`tune --storage s3://...`: Tune's trial results and checkpoints go to the object store."""
    import shutil

    import numpy as np

    from kmnist_core.datasets import BUNDLED_DIR

    data = tmp_path / "data"
    data.mkdir()
    d = small_dev
    np.savez_compressed(data / "kmnist-dev-imgs.npz", arr_0=np.concatenate([d.train.images, d.val.images, d.test.images]))
    np.savez_compressed(data / "kmnist-dev-labels.npz",
                        arr_0=np.concatenate([d.train.labels, d.val.labels, d.test.labels]).astype(np.uint8))
    shutil.copy(BUNDLED_DIR / "kmnist_classmap.csv", data)
    r = CliRunner().invoke(app, ["tune", "--out", str(tmp_path / "grid"), "--storage", f"s3://{bucket}/tune",
                                 "--lr", "0.001", "--batch-size", "64", "--epochs", "1", "--data-dir", str(data)])
    assert r.exit_code == 0, r.output[-3000:]
    stored = client(s3_env).get_file_info(pafs.FileSelector(f"{bucket}/tune", recursive=True))
    assert any(i.base_name.startswith("checkpoint") for i in stored), [i.path for i in stored][:20]
    assert (tmp_path / "grid" / "best" / "model.pt").exists()
