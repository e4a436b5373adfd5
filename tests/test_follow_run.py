"""Following a predict run from outside, end to end on a real local Ray and the real CLI (issue 16):
the log of a run whose stdout goes to a file, and `kmnist-batch status` while it runs, after kill -9,
and after the resume command it printed has finished the run.

Small trees run in-process (the local executor); committed chunks of 300 files move the count."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.test_faults import SLOW, slow_tree, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
CLI = str(Path(sys.executable).parent / "kmnist-batch")
PROGRESS = re.compile(r"^\d\d:\d\d:\d\d progress ([\d,]+)/([~\d,?]+)")


def status(out: Path) -> dict:
    done = subprocess.run([CLI, "status", str(out), "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_predict_with_stdout_to_a_file_logs_a_start_line_and_progress_lines(tmp_path, kmnist_dev):
    files = slow_tree(tmp_path / "in", kmnist_dev.test.images, 2000)
    out, log = tmp_path / "out", tmp_path / "predict.log"
    with open(log, "w") as stdout:
        done = subprocess.run([CLI, "predict", str(tmp_path / "in"), "--out", str(out), "--batch-size", "64",
                               "--rows-per-shard", "300", "--progress-every", "1", *SLOW], stdout=stdout, stderr=subprocess.PIPE, text=True,
                              timeout=240)
    assert done.returncode == 0, done.stderr
    lines = log.read_text(encoding="utf-8").splitlines()
    assert "start predict run" in lines[0] and f"{len(files):,} files found" in lines[0]
    assert "model 5d977e926e757428" in lines[0] and "1 worker" in lines[0]
    progress = [PROGRESS.match(line) for line in lines]
    counts = [(int(m[1].replace(",", "")), m[2]) for m in progress if m]
    assert len(counts) >= 2, lines
    assert all(total == f"{len(files):,}" for _, total in counts)
    assert any(0 < n < len(files) for n, _ in counts), counts  # the log shows the run moving, not just its end
    end = next(i for i, line in enumerate(lines) if re.match(rf"^\d\d:\d\d:\d\d completed {len(files):,}/", line))
    assert max(i for i, m in enumerate(progress) if m) < end and lines[end + 1].startswith("files ")  # then the summary
    assert "errors 4 (truncated 4)" in lines[end]
    assert status(out)["state"] == "completed"


def test_status_while_running_after_kill_9_and_after_the_resume_command(tmp_path, kmnist_dev):
    files = slow_tree(tmp_path / "in", kmnist_dev.test.images, 2000)
    out = tmp_path / "out"
    with open(tmp_path / "predict.log", "w") as stdout:
        proc = subprocess.Popen([CLI, "predict", str(tmp_path / "in"), "--out", str(out), "--batch-size", "64",
                                 "--progress-every", "1", "--rows-per-shard", "300", *SLOW], stdout=stdout,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def progressing() -> bool:
            try:
                return json.loads((out / "_progress.json").read_text())["done"] > 0
            except (OSError, ValueError, KeyError):
                return False

        wait_for(progressing)
        s = status(out)
        assert s["state"] == "running" and s["alive_judged_by"] == "lock", s
        lock = json.loads((out / ".lock").read_text())
        assert s["holder"]["pid"] == lock["pid"] and s["run_id"] == lock["run_id"]
        assert 0 < s["progress"]["done"] and s["progress"]["total"] == len(files)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its driver process and the local Ray they started
        proc.wait()

    s = status(out)
    assert s["state"] == "interrupted" and "killed" in s["reason"] and f"pid {lock['pid']}" in s["reason"]
    command = shlex.split(s["resume_command"])
    assert command[:2] == ["kmnist-batch", "predict"] and "--resume" in command
    assert command[command.index("--batch-size") + 1] == "64" and command[command.index("--out") + 1] == str(out)

    done = subprocess.run([CLI, *command[1:]], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    s = status(out)
    assert s["state"] == "completed" and "resume_command" not in s
    keys = pq.read_table(out / "predictions", columns=["path_bytes"]).column("path_bytes").to_pylist()
    assert len(keys) == len(files) and set(keys) == files


def test_on_ray_the_listing_streams_and_the_count_ahead_gives_the_total_and_eta_early(tmp_path, kmnist_dev):
    files = slow_tree(tmp_path / "in", kmnist_dev.test.images, 2000)
    out = tmp_path / "out"
    done = subprocess.run([CLI, "predict", str(tmp_path / "in"), "--out", str(out), "--executor", "ray",
                           "--rows-per-shard", "300", "--progress-every", "1", *SLOW],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "files: still listing" in lines[0] and re.search(r"Ray \d+\.\d+\.\d+\.\d+:\d+ \(dashboard ", lines[0]), lines[0]
    progress = [line for line in lines if PROGRESS.match(line)]
    assert len(progress) >= 2, lines
    # The dispatching listing ends only with the run; the count run ahead of it (2,004 files: milliseconds)
    # gives the total, marked as an estimate, and an ETA while crops are still to do.
    assert all(PROGRESS.match(line)[2] in (f"~{len(files):,}", f"{len(files):,}") for line in progress), progress
    moving = [line for line in progress if 0 < int(PROGRESS.match(line)[1].replace(",", "")) < len(files)]
    assert moving and all("ETA -" not in line for line in moving), progress
    assert re.search(rf"^\d\d:\d\d:\d\d completed {len(files):,}/{len(files):,} in ", "\n".join(lines), re.M)
    record = json.loads((out / "_progress.json").read_text())
    assert record["status"] == "completed" and record["total"] == record["done"] == len(files)
    assert record["start"]["workers"] >= 1 and record["start"]["ray_address"]
