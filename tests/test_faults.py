"""Fault injection against a real local Ray and the real CLI: one test per way an archive run used to
lose or corrupt data (issue 12). Each checks exactly one row per file and that committed shards survive.
Parquet is read back with pyarrow only; the concurrent reader runs in a process that never imports Ray."""

from __future__ import annotations

import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batch_infer.job import PredictOptions, run_predict
from batch_infer.output import read_predictions
from batch_infer.paths import unescape_name
from kmnist_core.errors import KmnistError
from tests.crop_tree import plain_tree

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
CLI = str(Path(sys.executable).parent / "kmnist-batch")
SJIS_NAMES = ["日本語の文字.png", "くずし字/あ.png", "ｶﾀｶﾅ.png"]  # encoded as CP932 on disk, as Japanese Windows zips do


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def sjis_tree(root: Path, images: np.ndarray, n_plain: int) -> set[bytes]:
    """`n_plain` ordinary crops plus crops whose names (and one folder) are Shift-JIS bytes."""
    files = {os.fsencode(p) for p in plain_tree(root, images, n_plain)}
    for i, name in enumerate(SJIS_NAMES):
        raw = os.fsencode(root) + b"/sjis/" + name.encode("cp932")
        os.makedirs(os.path.dirname(raw), exist_ok=True)
        with open(raw, "wb") as f:
            f.write(png_bytes(images[i]))
        files.add(raw)
    return files


def slow_tree(root: Path, images: np.ndarray, n: int) -> set[bytes]:
    """`n` crops plus a truncated PNG per folder of 500. With SLOW, each decode batch holding one
    waits 1 + 2 s re-reading it, so a run lasts long enough to be interrupted while using no CPU."""
    files = {os.fsencode(p) for p in plain_tree(root, images, n)}
    whole = png_bytes(np.tile(images[0], (8, 8)))
    for folder in sorted(root.iterdir()):
        (folder / "stall.png").write_bytes(whole[: len(whole) // 2])
        files.add(os.fsencode(folder / "stall.png"))
    return files


SLOW = ["--read-retries", "2", "--retry-backoff", "1"]


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "predict", *map(str, args)], capture_output=True, text=True, timeout=240, **kw)


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([CLI, "predict", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def one_error_line(stderr: str, needle: str) -> str:
    """The CLI's promise on failure: one `error:` line and no traceback (Ray's W-level token notice
    may precede it)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], stderr
    return errors[0]


def wait_for(condition, timeout=120.0, every=0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(every)
    raise AssertionError("timed out waiting")


def start_slow_run(tmp_path: Path, images: np.ndarray, n: int,
                   rows_per_shard: int) -> tuple[set[bytes], Path, list, subprocess.Popen]:
    """A slow tree of `n` crops and a predict run into tmp_path/out, returned once its first shard is
    committed (files, out, the run's arguments for a later --resume, the running process)."""
    files = slow_tree(tmp_path / "in", images, n)
    out = tmp_path / "out"
    args = [tmp_path / "in", "--out", out, "--batch-size", "64", "--rows-per-shard", str(rows_per_shard), *SLOW]
    proc = start(*args)
    wait_for(lambda: len(shards(out)) >= 1)
    return files, out, args, proc


def shards(out: Path) -> list[Path]:
    return sorted((out / "predictions").glob("*.parquet"))


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text(encoding="utf-8"))


def assert_exactly_once(out: Path, files: set[bytes]) -> None:
    t = pq.read_table(out / "predictions")
    keys = t.column("path_bytes").to_pylist()
    assert len(keys) == len(files) and set(keys) == files


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def committed_rows(out: Path) -> dict[str, int]:
    return {p.name: pq.read_metadata(p).num_rows for p in shards(out)}


# Row 1 of the issue's table, and item 9's kill -9 + --resume.
def test_shift_jis_names_get_rows_and_survive_kill_9_and_resume(tmp_path, kmnist_dev):
    files = sjis_tree(tmp_path / "in", kmnist_dev.test.images, 2000) | slow_tree(tmp_path / "in", kmnist_dev.test.images, 0)
    out = tmp_path / "out"
    args = [tmp_path / "in", "--out", out, "--batch-size", "64", "--rows-per-shard", "200", *SLOW]
    proc = start(*args)
    wait_for(lambda: len(shards(out)) >= 2)
    killed_run = json.loads((out / ".lock").read_text())["run_id"]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    first = committed_rows(out)
    assert 0 < sum(first.values()) < len(files), "the run was not interrupted mid-way"

    r = cli(*args, "--resume", "--read-retries", "0")
    assert r.returncode == 0, r.stderr
    assert_exactly_once(out, files)
    assert {k: v for k, v in committed_rows(out).items() if k in first} == first  # kept, not recomputed
    assert run_json(out)["took_over_lock_from"]["run_id"] == killed_run  # the killed run's lock, taken over

    df = pq.read_table(out / "predictions").to_pandas()
    sjis = df[[p.encode() != b for p, b in zip(df.path, df.path_bytes)]]  # the escaped names
    assert len(sjis) == len(SJIS_NAMES) and sjis.error.isna().all() and sjis.pred_char.notna().all()
    for path, raw in zip(sjis.path, sjis.path_bytes):
        assert "\\x" in path and unescape_name(path) == raw  # readable text, reversible to the exact bytes
        assert Path(os.fsdecode(raw)).read_bytes()[:4] == b"\x89PNG"

    r = cli(*args, "--resume", "--read-retries", "0")  # a finished job: every file, Shift-JIS ones included, is recognised as done
    assert r.returncode == 0, r.stderr
    stalls = sum(k.endswith(b"/stall.png") for k in files)  # truncated: --resume reads those again
    assert run_json(out)["already_done"] == len(files) - stalls and run_json(out)["rows_replaced"] == stalls
    assert_exactly_once(out, files)


# Row 2: a mistyped input with --overwrite, and an --overwrite run that fails before its first commit.
def test_overwrite_keeps_earlier_results_until_the_new_run_commits(tmp_path, kmnist_dev, ray_session):
    plain_tree(tmp_path / "in", kmnist_dev.test.images, 300)
    out = tmp_path / "out"
    run_predict([tmp_path / "in"], out, PredictOptions(rows_per_shard=100))
    before, run_before = committed_rows(out), (out / "run.json").read_bytes()

    r = cli(tmp_path / "wrong-folder", "--out", out, "--overwrite")
    assert r.returncode == 2
    one_error_line(r.stderr, "wrong-folder does not exist")
    assert committed_rows(out) == before and (out / "run.json").read_bytes() == run_before
    assert (out / "summary" / "summary.json").exists()

    # Interrupted after it started but before its first shard: the earlier results are all still there.
    proc = start(tmp_path / "in", "--out", out, "--overwrite", "--rows-per-shard", "100000")
    wait_for(lambda: run_json(out)["status"] == "running")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    one_error_line(stderr, "earlier predictions in OUT are untouched")
    assert committed_rows(out) == before
    assert run_json(out)["status"] == "interrupted"

    # A successful --overwrite replaces them: only its own rows remain.
    plain_tree(tmp_path / "other", kmnist_dev.test.images, 50)
    summary = run_predict([tmp_path / "other"], out, PredictOptions(overwrite=True))
    df = read_predictions(out).to_pandas()
    assert len(df) == 50 and set(df.run_id) == {summary["run_id"]} and not (out / "_staging").exists()


# Row 3 (and the "second run is refused within seconds"), row 4 (readers during the run), and
# item 8 (a healthy run prints no E-level line from Ray).
def test_second_run_is_refused_while_readers_see_only_whole_shards(tmp_path, kmnist_dev):
    files = slow_tree(tmp_path / "in", kmnist_dev.test.images, 2000)
    out = tmp_path / "out"
    reader = textwrap.dedent(f"""
        import sys, time
        import duckdb, pandas as pd, pyarrow.parquet as pq
        out, reads, most = {str(out)!r}, 0, 0
        while True:
            done = open(out + "/run.json").read().find('"status": "running"') < 0
            t = pq.read_table(out + "/predictions")
            df = pd.read_parquet(out + "/predictions")
            n = duckdb.sql(f"select count(*) from read_parquet('{{out}}/predictions/*.parquet')").fetchall()[0][0]
            if done:  # while running, a commit may land between two reads
                assert len(t) == len(df) == n
            keys = t.column("path_bytes").to_pylist()
            assert len(keys) == len(set(keys)), "a file has two rows"
            reads, most = reads + 1, max(most, len(keys))
            if done:
                break
            time.sleep(0.05)
        assert "ray" not in sys.modules
        print(reads, most)
    """)
    first = start(tmp_path / "in", "--out", out, "--batch-size", "64", "--rows-per-shard", "300", *SLOW)
    wait_for(lambda: len(shards(out)) >= 1)
    watcher = subprocess.Popen([sys.executable, "-c", reader], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    holder = json.loads((out / ".lock").read_text())

    t0 = time.time()
    second = cli(tmp_path / "in", "--out", out, "--resume")
    refused_after = time.time() - t0
    assert second.returncode == 2 and refused_after < 30
    line = one_error_line(second.stderr, "is in use by run")
    assert all(str(v) in line for v in (holder["run_id"], holder["pid"], holder["host"], holder["since"]))
    assert parent_pid(holder["pid"]) == first.pid  # the CLI's worker process (batch_infer/supervise.py)

    _, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stderr
    assert_exactly_once(out, files)
    reads, most = map(int, watcher.communicate(timeout=120)[0].split() or [0, 0])
    assert watcher.returncode == 0 and reads >= 3 and most > 0, watcher.stderr
    assert not re.search(r"^\[[^\]]* E \d+ \d+\]", stderr, re.M) and "core_worker.cc" not in stderr, stderr
    assert "Traceback" not in stderr and not (out / "_staging").exists()


# Row 5: the disk fills up mid-run (RLIMIT_FSIZE set on the running driver: writes fail with EFBIG,
# the same path as ENOSPC, without root).
def test_full_disk_mid_run_fails_clearly_and_resume_finishes(tmp_path, kmnist_dev):
    files, out, args, proc = start_slow_run(tmp_path, kmnist_dev.test.images, 3000, 1200)
    shard_size = shards(out)[0].stat().st_size
    limit = shard_size // 2  # below a shard, well above run.json
    assert limit > 3 * (out / "run.json").stat().st_size, shard_size
    driver = json.loads((out / ".lock").read_text())["pid"]  # the CLI's worker process, which writes OUT
    resource.prlimit(driver, resource.RLIMIT_FSIZE, (limit, limit))
    kept = committed_rows(out)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 2
    one_error_line(stderr, "File too large")
    run = run_json(out)
    assert run["status"] == "failed" and "File too large" in run["reason"]
    now = committed_rows(out)
    assert {k: now[k] for k in kept} == kept and sum(now.values()) < len(files)
    assert run["rows_committed"] == sum(now.values())

    r = cli(*args, "--resume", "--read-retries", "0")
    assert r.returncode == 0, r.stderr
    assert_exactly_once(out, files)


# Row 6: a file still being copied when the run reads it is read again, whole, within the run; and
# --resume re-reads transient error rows, --retry-errors every error row, each replaced exactly once.
def test_file_still_being_copied_is_read_again_within_the_run(tmp_path, kmnist_dev, ray_session):
    plain_tree(tmp_path / "in", kmnist_dev.test.images, 100)
    whole = png_bytes(np.tile(kmnist_dev.test.images[0], (4, 4)))
    copying = tmp_path / "in" / "f000" / "copying.png"
    copying.write_bytes(whole[: len(whole) // 2])
    os.utime(copying, (0, time.time()))  # atime before mtime: the first read updates it (relatime)
    completed = []

    def finish_copy_after_first_read():
        wait_for(lambda: copying.stat().st_atime > 0, timeout=120, every=0.01)
        copying.write_bytes(whole)
        completed.append(time.time())

    copier = threading.Thread(target=finish_copy_after_first_read, daemon=True)
    copier.start()
    out = tmp_path / "out"
    run_predict([tmp_path / "in"], out, PredictOptions(read_retries=4, retry_backoff_s=0.5))
    copier.join(5)
    assert completed, "the file was never read while incomplete"
    row = read_predictions(out).to_pandas().set_index("rel_path").loc["f000/copying.png"]
    assert pd.isna(row.error) and row.width == 112 and len(row.sha256) == 64


def test_resume_rereads_error_rows_exactly_once(tmp_path, kmnist_dev, ray_session):
    plain_tree(tmp_path / "in", kmnist_dev.test.images, 200)
    good = png_bytes(np.tile(kmnist_dev.test.images[1], (8, 8)))
    truncated, not_image = tmp_path / "in" / "late.png", tmp_path / "in" / "was-text.png"
    truncated.write_bytes(good[: len(good) // 2])
    not_image.write_text("not yet an image")
    out = tmp_path / "out"
    run_predict([tmp_path / "in"], out, PredictOptions(read_retries=0, rows_per_shard=50))
    kinds = lambda: read_predictions(out).to_pandas().set_index("rel_path").error_kind  # noqa: E731
    assert kinds()["late.png"] == "truncated" and kinds()["was-text.png"] == "not_image"
    truncated.write_bytes(good)  # both files are whole now
    not_image.write_bytes(good)

    again = run_predict([tmp_path / "in"], out, PredictOptions(resume=True))
    assert again["rows_replaced"] == 1 and again["rows_written"] == 0
    assert pd.isna(kinds()["late.png"]) and kinds()["was-text.png"] == "not_image"  # permanent: not retried
    assert len(read_predictions(out)) == 202

    again = run_predict([tmp_path / "in"], out, PredictOptions(resume=True, retry_errors=True))
    assert again["rows_replaced"] == 1
    df = read_predictions(out).to_pandas()
    assert len(df) == 202 and not df.path_bytes.duplicated().any() and df.error.isna().all()
    assert df.set_index("rel_path").loc["was-text.png", "run_id"] == again["run_id"]
    with pytest.raises(KmnistError, match="with --resume"):
        run_predict([tmp_path / "in"], out, PredictOptions(retry_errors=True))


# Row 7: model.pt replaced under an existing model_card.json.
def test_weights_that_do_not_match_their_card_are_refused(tmp_path, trained_model_dir):
    import torch

    swapped = tmp_path / "model"
    shutil.copytree(trained_model_dir, swapped)
    state = torch.load(swapped / "model.pt", weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 0.01  # same architecture, different weights: torch loads them fine
    torch.save(state, swapped / "model.pt")
    (tmp_path / "in").mkdir()
    r = cli(tmp_path / "in", "--out", tmp_path / "out", "--model", swapped)
    assert r.returncode == 2
    one_error_line(r.stderr, "not the ones its card names")
    assert not (tmp_path / "out").exists()  # refused before OUT was created


# Item 5: Ctrl-C mid-run.
def test_ctrl_c_mid_run_is_interrupted_and_resume_finishes(tmp_path, kmnist_dev):
    files, out, args, proc = start_slow_run(tmp_path, kmnist_dev.test.images, 2000, 300)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    one_error_line(stderr, "interrupted")
    run = run_json(out)
    assert run["status"] == "interrupted" and run["rows_committed"] == sum(committed_rows(out).values())
    assert 0 < run["rows_committed"] < len(files)
    r = cli(*args, "--resume", "--read-retries", "0")
    assert r.returncode == 0, r.stderr
    assert_exactly_once(out, files)


# Item 5, a lost Ray cluster: Ray's C++ core ends the driver itself about 60 s after losing the GCS
# (measured with `ray start --head` stopped mid-run: exit status 1, no Python exception). Any such
# death is the same to the CLI; here the worker process is killed outright, as the OOM killer would.
def test_driver_death_python_cannot_catch_is_recorded_as_failed(tmp_path, kmnist_dev):
    files, out, args, proc = start_slow_run(tmp_path, kmnist_dev.test.images, 2000, 300)
    os.kill(json.loads((out / ".lock").read_text())["pid"], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of the local Ray the killed process started
    except ProcessLookupError:
        pass
    assert proc.returncode == 1
    one_error_line(stderr, "killed by signal 9 before ending its run")
    run = run_json(out)
    assert run["status"] == "failed" and "signal 9" in run["reason"]
    r = cli(*args, "--resume", "--read-retries", "0")
    assert r.returncode == 0, r.stderr
    assert_exactly_once(out, files)
