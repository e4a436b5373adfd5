"""Following a predict run from outside, end to end with the real CLI (issue 16): the log of a run whose
stdout goes to a file, and `kmnist-batch status` while it runs, after kill -9, and after the resume
command it printed has finished the run.

Each run's last crop in listing order is a hold file (tests/crop_tree.py): its chunk is not read until
the test releases it, so the run is mid-way, with chunks committed, for as long as the test looks."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from kmnist_core.card import read_card
from kmnist_core.model_dir import DEFAULT_MODEL_DIR
from tests.crop_tree import HOLD_ENV, hold_file, plain_tree, release
from tests.processes import CLI, finishing, wait_for

pytestmark = pytest.mark.timeout(300)
PROGRESS = re.compile(r"^\d\d:\d\d:\d\d progress ([\d,]+)/([~\d,?]+)")
PREDICT = ["--batch-size", "64", "--rows-per-shard", "100", "--progress-every", "0.2", "--read-retries", "0"]


def start(log: Path, *args: object) -> subprocess.Popen:
    """`kmnist-batch predict ARGS` as a real process (its own session: the test kills it with its child),
    honouring hold files; stdout to `log`, stderr beside it (.err)."""
    with open(log, "w") as stdout, open(log.with_suffix(".err"), "w") as stderr:
        return subprocess.Popen([CLI, "predict", *map(str, args)], stdout=stdout, stderr=stderr,
                                start_new_session=True, env={**os.environ, **HOLD_ENV})


def status(out: Path) -> dict:
    """`kmnist-batch status OUT --json`, in this process."""
    from typer.testing import CliRunner

    from jobs.cli import app

    done = CliRunner().invoke(app, ["status", str(out), "--json"])
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


def held_tree(root: Path, images: np.ndarray) -> tuple[set[bytes], Path]:
    """600 crops in 4 folders, a truncated PNG in each (4 error rows), and a hold file sorted last:
    at 100 rows a shard, at least three chunks are committed before the held one. Returns every
    file's key and the hold file."""
    files = {os.fsencode(p) for p in plain_tree(root, images, 600, per_folder=150)}
    buf = (root / "f000" / "000000.png").read_bytes()
    for folder in sorted(root.iterdir()):
        (folder / "cut.png").write_bytes(buf[: len(buf) // 2])
        files.add(os.fsencode(folder / "cut.png"))
    held = hold_file(root / "zz", images[0])
    return files | {os.fsencode(held)}, held


def lock_dropped(out: Path) -> bool:
    """Whether the kernel has dropped the run's flock on OUT/.lock (it does once the killed processes
    have exited, which a kill -9 only starts)."""
    try:
        f = open(out / ".lock", "rb")
    except FileNotFoundError:
        return True
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def counts(lines: list[str]) -> list[tuple[int, str]]:
    """(done, total as printed) of every progress line."""
    return [(int(m[1].replace(",", "")), m[2]) for m in map(PROGRESS.match, lines) if m]


def test_predict_with_stdout_to_a_file_logs_a_start_line_and_progress_lines(tmp_path, kmnist_dev):
    files, held = held_tree(tmp_path / "in", kmnist_dev.test.images)
    out, log = tmp_path / "out", tmp_path / "predict.log"
    proc = start(log, tmp_path / "in", "--out", out, *PREDICT)
    lines = lambda: log.read_text(encoding="utf-8").splitlines()  # noqa: E731
    with finishing(proc, held):
        def moving() -> bool:  # the log shows the run moving, not just its end
            seen = counts(lines())
            return len(seen) >= 2 and any(0 < n < len(files) for n, _ in seen)

        wait_for(moving)
    assert proc.returncode == 0, log.with_suffix(".err").read_text()
    lines = lines()
    assert "start predict run" in lines[0] and f"{len(files):,} files found" in lines[0]
    assert f"model {read_card(DEFAULT_MODEL_DIR).model_id}" in lines[0] and "1 worker" in lines[0]
    assert all(total == f"{len(files):,}" for _, total in counts(lines))
    end = next(i for i, line in enumerate(lines) if re.match(rf"^\d\d:\d\d:\d\d completed {len(files):,}/", line))
    assert max(i for i, line in enumerate(lines) if PROGRESS.match(line)) < end and lines[end + 1].startswith("files ")
    assert "errors 4 (truncated 4)" in lines[end]
    assert status(out)["state"] == "completed"


def test_status_while_running_after_kill_9_and_after_the_resume_command(tmp_path, kmnist_dev):
    files, held = held_tree(tmp_path / "in", kmnist_dev.test.images)
    out = tmp_path / "out"
    proc = start(tmp_path / "predict.log", tmp_path / "in", "--out", out, *PREDICT)
    try:
        def progressing() -> bool:
            try:
                return json.loads((out / "_progress.json").read_text())["done"] > 0
            except (OSError, ValueError, KeyError):
                return False

        wait_for(progressing)
        s = status(out)
        lock = json.loads((out / ".lock").read_text())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its supervised child, mid-run on the held chunk
        proc.wait()
        wait_for(lambda: lock_dropped(out))
    assert s["state"] == "running" and s["alive_judged_by"] == "lock", s
    assert s["holder"]["pid"] == lock["pid"] and s["run_id"] == lock["run_id"]
    assert 0 < s["progress"]["done"] < len(files) and s["progress"]["total"] == len(files)

    s = status(out)
    assert s["state"] == "interrupted" and "killed" in s["reason"] and f"pid {lock['pid']}" in s["reason"]
    command = shlex.split(s["resume_command"])
    assert command[:2] == ["kmnist-batch", "predict"] and "--resume" in command
    assert command[command.index("--batch-size") + 1] == "64" and command[command.index("--out") + 1] == str(out)
    done_before = len(pq.read_table(out / "predictions", columns=["path_bytes"]))
    assert 0 < done_before < len(files)  # the kill cut the run off

    release(held)
    # As a user runs it: a new process (in this one, a session Ray already running would make `auto` use it).
    done = subprocess.run([CLI, *command[1:]], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    s = status(out)
    assert s["state"] == "completed" and "resume_command" not in s
    keys = pq.read_table(out / "predictions", columns=["path_bytes"]).column("path_bytes").to_pylist()
    assert len(keys) == len(files) and set(keys) == files


@pytest.mark.ray
@pytest.mark.own_ray  # the CLI starts a local Ray of its own
def test_on_ray_the_listing_streams_and_the_count_ahead_gives_the_total_and_eta_early(tmp_path, kmnist_dev):
    """A real process with its own local Ray: Ray's workers take the hold setting from the environment
    they start in, which the session's Ray started without."""
    files, held = held_tree(tmp_path / "in", kmnist_dev.test.images)
    out, log = tmp_path / "out", tmp_path / "predict.log"
    proc = start(log, tmp_path / "in", "--out", out, "--executor", "ray", *PREDICT)
    lines = lambda: log.read_text(encoding="utf-8").splitlines()  # noqa: E731

    def moving_with_an_eta() -> bool:
        progress = [line for line in lines() if PROGRESS.match(line)]
        return len(progress) >= 2 and any(0 < counts([line])[0][0] < len(files) and "ETA -" not in line
                                          for line in progress)

    with finishing(proc, held):
        wait_for(moving_with_an_eta)
    assert proc.returncode == 0, log.with_suffix(".err").read_text()
    lines = lines()
    assert "files: still listing" in lines[0] and re.search(r"Ray \d+\.\d+\.\d+\.\d+:\d+ \(dashboard ", lines[0]), lines[0]
    # The dispatching listing ends only with the run; the count run ahead of it (milliseconds) gives the
    # total, marked as an estimate, and an ETA while crops are still to do.
    assert all(total in (f"~{len(files):,}", f"{len(files):,}") for _, total in counts(lines)), lines
    assert re.search(rf"^\d\d:\d\d:\d\d completed {len(files):,}/{len(files):,} in ", "\n".join(lines), re.M)
    record = json.loads((out / "_progress.json").read_text())
    assert record["status"] == "completed" and record["total"] == record["done"] == len(files)
    assert record["start"]["workers"] >= 1 and record["start"]["ray_address"]
