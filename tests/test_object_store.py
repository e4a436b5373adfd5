"""Inputs and OUT on an object store: a real S3-protocol server on 127.0.0.1 (moto), the real CLI, and the
Parquet read back from s3:// by pyarrow in a process that never imports Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tests.crop_tree import plain_tree

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
CLI = str(Path(sys.executable).parent / "kmnist-batch")


def s3(env: dict) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="test", secret_key="test",
                             allow_bucket_creation=True)


def upload_tree(env: dict, root: Path, bucket: str, prefix: str) -> set[str]:
    """Every file under `root` as an object under s3://bucket/prefix/; returns their URIs."""
    fs = s3(env)
    fs.create_dir(bucket)
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]

    def put(path: Path) -> str:
        key = f"{bucket}/{prefix}/{path.relative_to(root).as_posix()}"
        with fs.open_output_stream(key) as f:
            f.write(path.read_bytes())
        return f"s3://{key}"

    with ThreadPoolExecutor(16) as pool:
        return set(pool.map(put, files))


def read_back(env: dict, uri: str) -> dict:
    """Rows and summary read from the object store by a process without Ray."""
    script = textwrap.dedent(f"""
        import json, sys
        import pyarrow.dataset as ds, pyarrow.fs as pafs
        t = ds.dataset({uri + '/predictions'!r}, format="parquet").to_table(columns=["path", "error_kind", "pred_char"])
        fs, root = pafs.FileSystem.from_uri({uri!r})
        with fs.open_input_stream(root + "/summary/summary.json") as f:
            summary = json.loads(f.read())
        with fs.open_input_stream(root + "/run.json") as f:
            run = json.loads(f.read())
        assert "ray" not in sys.modules
        print(json.dumps({{"paths": t.column("path").to_pylist(), "errors": t.column("error_kind").drop_null().to_pylist(),
                          "summary": summary, "status": run["status"]}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_predict_from_s3_to_s3_gives_one_row_per_object(s3_server, tmp_path, kmnist_dev):
    plain_tree(tmp_path / "crops", kmnist_dev.test.images, 200)
    (tmp_path / "crops" / "f000" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "crops" / "notes.txt").write_text("not an image")
    bucket = f"b-{uuid.uuid4().hex[:8]}"
    objects = upload_tree(s3_server, tmp_path / "crops", bucket, "crops")
    images = {o for o in objects if o.endswith(".png")}
    r = subprocess.run([CLI, "predict", f"s3://{bucket}/crops", "--out", f"s3://{bucket}/out"], env=s3_server,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["crops"]  # nothing local: no folder named "s3:"
    back = read_back(s3_server, f"s3://{bucket}/out")
    assert sorted(back["paths"]) == sorted(images)  # rows keep the full URI
    assert len(back["errors"]) == 1  # the broken PNG: an error row, not a failed job
    assert back["status"] == "completed" and back["summary"]["files_seen"] == len(images)
    assert back["summary"]["skipped"] == {"not_image_extension": 1} and back["summary"]["duplicate_paths"] == 0
    summary_objects = {i.base_name for i in s3(s3_server).get_file_info(pafs.FileSelector(f"{bucket}/out/summary"))}
    assert {"review.html", "by_folder.csv", "confidence_histogram.png"} <= summary_objects
    assert not any(i.base_name == ".lock" for i in s3(s3_server).get_file_info(pafs.FileSelector(f"{bucket}/out")))

    r = subprocess.run([CLI, "report", f"s3://{bucket}/out"], env=s3_server, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"s3://{bucket}/out/predictions" in r.stdout, r.stderr


def test_kill_9_then_resume_against_s3_is_exactly_once(s3_server, tmp_path, kmnist_dev):
    plain_tree(tmp_path / "crops", kmnist_dev.test.images, 1500)
    bucket = f"b-{uuid.uuid4().hex[:8]}"
    objects = upload_tree(s3_server, tmp_path / "crops", bucket, "crops")
    out = f"s3://{bucket}/out"
    args = [CLI, "predict", f"s3://{bucket}/crops", "--out", out, "--rows-per-shard", "100"]
    proc = subprocess.Popen(args, env=s3_server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    fs = s3(s3_server)
    shards = lambda: [i for i in fs.get_file_info(pafs.FileSelector(f"{bucket}/out/predictions", allow_not_found=True))  # noqa: E731
                      if i.base_name.endswith(".parquet")]
    deadline = time.time() + 180
    while time.time() < deadline and len(shards()) < 2:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(shards())
    assert committed >= 2

    busy = subprocess.run(args, env=s3_server, capture_output=True, text=True, timeout=120)
    assert busy.returncode == 2 and "--resume" in busy.stderr  # the killed run's lock is taken over, not obeyed
    r = subprocess.run(args + ["--resume"], env=s3_server, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    back = read_back(s3_server, out)
    assert len(back["paths"]) == len(objects) and set(back["paths"]) == objects
    assert back["summary"]["duplicate_paths"] == 0
