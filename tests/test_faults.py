"""Fault injection against real runs: one test per way an archive run used to lose or corrupt data
(issue 12). Each checks exactly one row per file and that committed shards survive.

Runs that are killed, interrupted or starved of disk are real CLI processes on Ray (`--executor ray`,
drivers joining the session's Ray), kept busy by a hold file (tests/crop_tree.py) until the test has
acted, so nothing depends on the machine's speed; what needs no process of its own (resumes, refusals,
in-run re-reads) runs in-process.
Parquet is read back with pyarrow only; the concurrent reader runs in a process that never imports Ray.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import io
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batch_infer.chunks import chunked
from batch_infer.discover import iter_files
from batch_infer.job import PredictOptions, run_predict
from batch_infer.paths import unescape_name
from kmnist_core.errors import KmnistError
from kmnist_core.predictions import read_predictions
from tests.crop_tree import HOLD_ENV, hold_file, plain_tree, release
from tests.processes import CLI, CliProcesses, wait_for

pytestmark = pytest.mark.timeout(180)
SJIS_NAMES = ["日本語の文字.png", "くずし字/あ.png", "ｶﾀｶﾅ.png"]  # encoded as CP932 on disk, as Japanese Windows zips do
ROWS_PER_SHARD = 100
# A driver that joins a running Ray passes this job config's environment to its workers (it is how
# `ray job submit` hands over a runtime_env): the session Ray's workers hold hold files for these runs.
HOLD_JOB = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": HOLD_ENV}})}
RESUME = PredictOptions(resume=True, batch_size=64, rows_per_shard=ROWS_PER_SHARD, read_retries=0, executor="local")


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def crops(tmp_path_factory, kmnist_dev) -> Path:
    """600 crops in 3 folders, written once for the module; tests hard-link them (`linked_tree`) and
    add their own files to the copy, never to this tree."""
    root = tmp_path_factory.mktemp("crops")
    plain_tree(root, kmnist_dev.test.images, 600, per_folder=200)
    return root


def linked_tree(crops: Path, root: Path) -> set[bytes]:
    """A copy of `crops` at `root` made of hard links; returns the keys of its files."""
    shutil.copytree(crops, root, copy_function=os.link)
    return {os.fsencode(p) for p in root.rglob("*.png")}


def add_sjis_names(root: Path, images: np.ndarray) -> set[bytes]:
    """Crops whose names (and one folder) are Shift-JIS bytes."""
    files = set()
    for i, name in enumerate(SJIS_NAMES):
        raw = os.fsencode(root) + b"/sjis/" + name.encode("cp932")
        os.makedirs(os.path.dirname(raw), exist_ok=True)
        with open(raw, "wb") as f:
            f.write(png_bytes(images[i]))
        files.add(raw)
    return files


def held_last(root: Path, image: np.ndarray) -> Path:
    """A hold file in a folder that sorts last: every chunk before the last one can commit, the last
    cannot until the test releases it."""
    return hold_file(root / "zz", image)


def held_tree(crops: Path, root: Path, image: np.ndarray) -> tuple[set[bytes], Path]:
    """The module's crops linked under `root` and a hold file sorted last (`held_last`): (every file a run
    over `root` must give a row, the hold file)."""
    files = linked_tree(crops, root)
    held = held_last(root, image)
    return files | {os.fsencode(held)}, held


def wait_unlocked(out: Path) -> None:
    """Wait until a killed run's processes are gone: the kernel drops their lock on OUT/.lock."""
    def free() -> bool:
        with open(out / ".lock") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

    wait_for(free)


def settle(root: Path, out: Path, proc: subprocess.Popen) -> None:
    """Wait until a run over `root` (held by `held_last`) has committed every chunk but the last and its
    driver has counted them all: from then on nothing moves until the test releases the hold."""
    chunks = sum(1 for _ in chunked(iter_files([str(root)], Counter()), ROWS_PER_SHARD))

    def counted() -> int:
        try:
            return json.loads((out / "_progress.json").read_text())["done"]
        except (OSError, ValueError):
            return -1

    wait_for(lambda: len(shards(out)) == chunks - 1 and counted() == sum(committed_rows(out).values()), proc)


@pytest.fixture
def ray_run(ray_session) -> list[str]:
    """CLI options for a run on the session's Ray, as a driver joining a cluster (one worker, small
    model batches, no re-reads: a truncated file is an error row at once). OUT/_progress.json is
    rewritten every 0.1 s, so a test can see what the driver has counted (`settle`)."""
    return ["--executor", "ray", "--address", ray_session.get_runtime_context().gcs_address, "--workers", "1",
            "--batch-size", "64", "--rows-per-shard", str(ROWS_PER_SHARD), "--read-retries", "0", "--quiet",
            "--progress-every", "0.1"]


@pytest.fixture
def start() -> Iterator[Callable[..., subprocess.Popen]]:
    """Starts held CLI predict runs (the CLI and its worker process, the driver, in a process group of
    their own); whatever is left of them at the end is killed."""
    procs = CliProcesses({**os.environ, **HOLD_ENV, **HOLD_JOB})
    yield functools.partial(procs, "predict")
    procs.close()


def one_error_line(stderr: str, needle: str) -> str:
    """The CLI's promise on failure: one `error:` line and no traceback (Ray's W-level token notice
    may precede it)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], stderr
    return errors[0]


def shards(out: Path) -> list[Path]:
    return sorted((out / "predictions").glob("*.parquet"))


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text(encoding="utf-8"))


def lock_holder(out: Path) -> dict:
    return json.loads((out / ".lock").read_text())


def assert_exactly_once(out: Path, files: set[bytes]) -> None:
    keys = pq.read_table(out / "predictions").column("path_bytes").to_pylist()
    assert len(keys) == len(files) and set(keys) == files


def committed_rows(out: Path) -> dict[str, int]:
    return {p.name: pq.read_metadata(p).num_rows for p in shards(out)}


def assert_cut_off_on_ray(out: Path, files: set[bytes], held: Path) -> dict[str, int]:
    """The run stopped mid-way: some shards, not all rows, none for the held file; and Ray actors
    wrote them (a local run leaves node_id null). Returns the committed rows by shard."""
    committed = committed_rows(out)
    t = pq.read_table(out / "predictions", columns=["path_bytes", "node_id"])
    assert 0 < sum(committed.values()) < len(files) and os.fsencode(held) not in t.column("path_bytes").to_pylist()
    assert t.column("node_id").null_count == 0
    return committed


@contextlib.contextmanager
def small_fs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `where`: a disk that really fills up (ENOSPC) or really is read-only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# Row 1 of the issue's table, and item 9's kill -9 + --resume.
def test_shift_jis_names_get_rows_and_survive_kill_9_and_resume(tmp_path, crops, kmnist_dev, start, ray_run):
    root, out = tmp_path / "in", tmp_path / "out"
    files = linked_tree(crops, root) | add_sjis_names(root, kmnist_dev.test.images)
    late = root / "f000" / "late.png"  # still truncated at the end: --resume reads it again each time
    whole = png_bytes(np.tile(kmnist_dev.test.images[0], (8, 8)))
    late.write_bytes(whole[: len(whole) // 2])
    held = held_last(root, kmnist_dev.test.images[5])
    files |= {os.fsencode(late), os.fsencode(held)}
    proc = start(root, "--out", out, *ray_run)
    settle(root, out, proc)  # late.png's chunk included
    killed_run = lock_holder(out)["run_id"]  # the run cannot have ended: its last chunk is held
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the driver; the driver's actors die with it
    wait_unlocked(out)
    first = assert_cut_off_on_ray(out, files, held)

    again = run_predict([root], out, RESUME)
    assert_exactly_once(out, files)
    assert {k: v for k, v in committed_rows(out).items() if k in first} == first  # kept, not recomputed
    assert again["took_over_lock_from"]["run_id"] == killed_run  # the killed run's lock, taken over
    assert again["already_done"] == sum(first.values()) - 1 and again["rows_replaced"] == 1  # late.png, read again

    df = pq.read_table(out / "predictions").to_pandas()
    sjis = df[[p.encode() != b for p, b in zip(df.path, df.path_bytes)]]  # the escaped names
    assert len(sjis) == len(SJIS_NAMES) and sjis.error.isna().all() and sjis.pred_char.notna().all()
    for path, raw in zip(sjis.path, sjis.path_bytes):
        assert "\\x" in path and unescape_name(path) == raw  # readable text, reversible to the exact bytes
        assert Path(os.fsdecode(raw)).read_bytes()[:4] == b"\x89PNG"

    # A finished job: every file, Shift-JIS ones included, is recognised as done.
    done = run_predict([root], out, RESUME)
    assert done["already_done"] == len(files) - 1 and done["rows_replaced"] == 1 and done["rows_written"] == 0
    assert_exactly_once(out, files)


# Row 2: a mistyped input with --overwrite, and an --overwrite run stopped (SIGTERM, as `ray job stop`
# and service managers send) before its first commit.
def test_overwrite_keeps_earlier_results_until_the_new_run_commits(tmp_path, crops, kmnist_dev, start):
    root, out = tmp_path / "in", tmp_path / "out"
    linked_tree(crops, root)
    run_predict([root], out, PredictOptions(rows_per_shard=ROWS_PER_SHARD, executor="local"))
    before, run_before = committed_rows(out), (out / "run.json").read_bytes()

    with pytest.raises(KmnistError, match="wrong-folder does not exist"):
        run_predict([tmp_path / "wrong-folder"], out, PredictOptions(overwrite=True))
    assert committed_rows(out) == before and (out / "run.json").read_bytes() == run_before
    assert (out / "summary" / "summary.json").exists()

    # The first chunk (which an --overwrite run commits alone) holds a file the run cannot read yet.
    hold_file(root / "a", kmnist_dev.test.images[0])
    proc = start(root, "--out", out, "--overwrite", "--rows-per-shard", ROWS_PER_SHARD)
    wait_for(lambda: run_json(out)["status"] == "running", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert one_error_line(stderr, "earlier predictions in OUT are untouched").startswith("error: interrupted")
    assert committed_rows(out) == before
    assert run_json(out)["status"] == "interrupted"

    # A successful --overwrite replaces them: only its own rows remain.
    plain_tree(tmp_path / "other", kmnist_dev.test.images, 50)
    summary = run_predict([tmp_path / "other"], out, PredictOptions(overwrite=True, executor="local"))
    df = read_predictions(out).to_pandas()
    assert len(df) == 50 and set(df.run_id) == {summary["run_id"]} and not (out / "_staging").exists()


READER = """
import sys, time
import duckdb, pandas as pd, pyarrow.parquet as pq
out = sys.argv[1]
while True:
    done = open(out + "/run.json").read().find('"status": "running"') < 0
    t = pq.read_table(out + "/predictions")
    df = pd.read_parquet(out + "/predictions")
    n = duckdb.sql(f"select count(*) from read_parquet('{out}/predictions/*.parquet')").fetchall()[0][0]
    if done:  # while running, a commit may land between two reads
        assert len(t) == len(df) == n
    keys = t.column("path_bytes").to_pylist()
    assert len(keys) == len(set(keys)), "a file has two rows"
    print(len(keys), flush=True)
    if done:
        break
    time.sleep(0.05)
assert "ray" not in sys.modules
"""

# A second `predict` into a busy OUT, run in a fresh interpreter as the CLI would: it must be refused
# before the worker process that loads torch is forked.
REFUSE = """
import os, sys
from jobs.cli import app
os.fork = lambda: sys.exit("forked a worker before refusing")
try:
    app(sys.argv[1:])
except SystemExit as e:
    code = e.code
assert "torch" not in sys.modules and "ray" not in sys.modules, "loaded torch or Ray before refusing"
sys.exit(code)
"""


# Row 3 (a second run is refused at once), row 4 (readers during the run), and item 8 (a healthy run
# on Ray prints no E-level line from Ray).
def test_second_run_is_refused_while_readers_see_only_whole_shards(tmp_path, crops, kmnist_dev, start, ray_run):
    root, out = tmp_path / "in", tmp_path / "out"
    files, held = held_tree(crops, root, kmnist_dev.test.images[0])
    first = start(root, "--out", out, *ray_run)
    wait_for(lambda: len(shards(out)) >= 1, first)
    watcher = subprocess.Popen([sys.executable, "-c", READER, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    seen_running = [int(watcher.stdout.readline() or -1) for _ in range(3)]  # the run is held meanwhile
    assert all(0 < n < len(files) for n in seen_running), (seen_running, watcher.stderr.read())

    holder = lock_holder(out)
    second = subprocess.run([sys.executable, "-c", REFUSE, "predict", str(root), "--out", str(out), "--resume"],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 2, second.stderr
    line = one_error_line(second.stderr, "is in use by run")
    assert all(str(v) in line for v in (holder["run_id"], holder["pid"], holder["host"], holder["since"]))
    ppid = int(Path(f"/proc/{holder['pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid == first.pid  # the lock is the CLI's worker process's (batch_infer/supervise.py)

    release(held)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert_exactly_once(out, files)
    assert run_json(out)["executor"] == "ray"
    rest, errors = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, errors
    assert int(rest.split()[-1]) == len(files)  # its last read, after the run ended, saw every row
    assert not re.search(r"^\[[^\]]* E \d+ \d+\]", stderr, re.M) and "core_worker.cc" not in stderr, stderr
    assert "Traceback" not in stderr and not (out / "_staging").exists()


FAILED_RUN_EXTRA = 8 * 1024  # what a failed run.json adds to the running one: reason, traceback (about 2.3 KB)


def room_for_run_json_not_shard(disk: Path, out: Path) -> int:
    """Free space to leave: a failed run.json fits, no shard does. Both carry the model card (run.json
    about 21 KB with the default model's, a shard's footer about 41 KB), so the room is measured from this
    run's own files, not fixed: a fixed 20 KB stopped fitting run.json when the card grew (cf85b55)."""
    block = os.statvfs(disk).f_frsize
    footer = min(pq.read_metadata(p).serialized_size for p in shards(out))  # every shard is bigger than this
    room = footer // block * block
    needed = (out / "run.json").stat().st_size + FAILED_RUN_EXTRA  # written aside, then renamed over the old
    assert room >= -(-needed // block) * block, (room, needed, footer)
    assert min(p.stat().st_size for p in shards(out)) > room
    return room


# Row 5: the disk fills up mid-run. A real ENOSPC: OUT on a small tmpfs, filled once every chunk but
# the held last one has committed, leaving room for run.json but not for a shard.
def test_full_disk_mid_run_fails_clearly_and_resume_finishes(tmp_path, crops, kmnist_dev, start, ray_run):
    root = tmp_path / "in"
    files, held = held_tree(crops, root, kmnist_dev.test.images[0])
    with small_fs(tmp_path / "disk", "16m") as disk:
        out = disk / "out"
        proc = start(root, "--out", out, *ray_run)
        settle(root, out, proc)
        kept = assert_cut_off_on_ray(out, files, held)
        room = room_for_run_json_not_shard(disk, out)
        with open(disk / "filler", "wb") as f:
            f.write(b"\0" * (free_bytes(disk) - room))
        assert free_bytes(disk) == room
        release(held)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2
        one_error_line(stderr, "No space left on device")
        run = run_json(out)
        assert run["status"] == "failed" and "No space left on device" in run["reason"]
        assert committed_rows(out) == kept and run["rows_committed"] == sum(kept.values())
        assert not list((out / "predictions").glob(".*.tmp"))  # the failed write's space was given back

        (disk / "filler").unlink()
        run_predict([root], out, RESUME)
        assert_exactly_once(out, files)


# A read-only OUT: refused with one clear reason, the earlier output untouched.
def test_read_only_out_is_refused_and_left_as_it_was(tmp_path, crops):
    root = tmp_path / "in"
    shutil.copytree(crops / "f000", root, copy_function=os.link)
    with small_fs(tmp_path / "disk", "16m") as disk:
        run_predict([root], disk / "out", PredictOptions(executor="local"))
        before = {p: p.read_bytes() for p in (disk / "out").rglob("*") if p.is_file()}
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(KmnistError, match=r"cannot write to .*out: Read-only file system"):
            run_predict([root], disk / "out", PredictOptions(resume=True, executor="local"))
        with pytest.raises(KmnistError, match=r"cannot create --out .*new: Read-only file system"):
            run_predict([root], disk / "new", PredictOptions(executor="local"))
        assert {p: p.read_bytes() for p in (disk / "out").rglob("*") if p.is_file()} == before


def wait_for_read(path: Path) -> Callable[[], bool]:
    """Watch `path` with inotify; the returned call blocks until a reader has opened and closed it
    (True), or 120 s pass (False). Access times would need a filesystem that keeps them (not noatime)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    in_close_nowrite = 0x10
    assert fd >= 0 and libc.inotify_add_watch(fd, os.fsencode(path), in_close_nowrite) >= 0, os.strerror(ctypes.get_errno())

    def wait() -> bool:
        try:
            return bool(select.select([fd], [], [], 120)[0])
        finally:
            os.close(fd)

    return wait


# Row 6: a file still being copied when the run reads it is read again, whole, within the run.
def test_file_still_being_copied_is_read_again_within_the_run(tmp_path, kmnist_dev, monkeypatch):
    root = tmp_path / "in"
    plain_tree(root, kmnist_dev.test.images, 100)
    whole = png_bytes(np.tile(kmnist_dev.test.images[0], (4, 4)))
    copying = root / "f000" / "copying.png"
    copying.write_bytes(whole[: len(whole) // 2])
    # Read right after copying.png, in the same batch: the batch's re-reads wait for its release.
    held = hold_file(root / "f000", kmnist_dev.test.images[1], "copying2.hold.png")
    monkeypatch.setattr("batch_infer.stages.TEST_HOLD", True)
    read_once = wait_for_read(copying)
    completed = []

    def finish_copy_after_first_read() -> None:
        if read_once():
            (root / "whole.tmp").write_bytes(whole)
            os.replace(root / "whole.tmp", copying)  # a copy tool's final rename: whole at once
            completed.append(True)
        release(held)

    copier = threading.Thread(target=finish_copy_after_first_read, daemon=True)
    copier.start()
    out = tmp_path / "out"
    run_predict([root], out, PredictOptions(read_retries=1, retry_backoff_s=0.01, executor="local"))
    copier.join(5)
    assert completed, "the file was never read while incomplete"
    row = read_predictions(out).to_pandas().set_index("rel_path").loc["f000/copying.png"]
    assert pd.isna(row.error) and row.width == 112 and row.sha256 == hashlib.sha256(whole).hexdigest()


# ... and --resume re-reads transient error rows, --retry-errors every error row, each replaced exactly once.
def test_resume_rereads_error_rows_exactly_once(tmp_path, kmnist_dev):
    plain_tree(tmp_path / "in", kmnist_dev.test.images, 200)
    good = png_bytes(np.tile(kmnist_dev.test.images[1], (8, 8)))
    truncated, not_image = tmp_path / "in" / "late.png", tmp_path / "in" / "was-text.png"
    truncated.write_bytes(good[: len(good) // 2])
    not_image.write_text("not yet an image")
    out = tmp_path / "out"
    run_predict([tmp_path / "in"], out, PredictOptions(read_retries=0, rows_per_shard=50, executor="local"))
    kinds = lambda: read_predictions(out).to_pandas().set_index("rel_path").error_kind  # noqa: E731
    assert kinds()["late.png"] == "truncated" and kinds()["was-text.png"] == "not_image"
    truncated.write_bytes(good)  # both files are whole now
    not_image.write_bytes(good)

    again = run_predict([tmp_path / "in"], out, PredictOptions(resume=True, executor="local"))
    assert again["rows_replaced"] == 1 and again["rows_written"] == 0
    assert pd.isna(kinds()["late.png"]) and kinds()["was-text.png"] == "not_image"  # permanent: not retried
    assert len(read_predictions(out)) == 202

    again = run_predict([tmp_path / "in"], out, PredictOptions(resume=True, retry_errors=True, executor="local"))
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
    with pytest.raises(KmnistError, match="not the ones its card names"):
        run_predict([tmp_path / "in"], tmp_path / "out", PredictOptions(model=str(swapped), executor="local"))
    assert not (tmp_path / "out").exists()  # refused before OUT was created


# Item 5: Ctrl-C mid-run.
def test_ctrl_c_mid_run_is_interrupted_and_resume_finishes(tmp_path, crops, kmnist_dev, start, ray_run):
    root, out = tmp_path / "in", tmp_path / "out"
    files, held = held_tree(crops, root, kmnist_dev.test.images[0])
    proc = start(root, "--out", out, *ray_run)
    settle(root, out, proc)  # so the driver knows of every committed row (Ray actors commit on their own)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    one_error_line(stderr, "interrupted")
    run = run_json(out)
    committed = assert_cut_off_on_ray(out, files, held)
    assert run["status"] == "interrupted" and run["rows_committed"] == sum(committed.values())
    run_predict([root], out, RESUME)
    assert_exactly_once(out, files)


# A shell starts a background job (`kmnist-batch predict ... &` in a script, nohup) with SIGINT ignored. The
# CLI's child inherited that and ignored the SIGINT the CLI passes on, so the job never stopped (and the
# suite hung in the two tests above whenever it was itself started in the background).
IGNORING_SIGINT = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); os.execv(sys.argv[1], sys.argv[1:])"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_run_started_with_sigint_ignored_still_stops(tmp_path, kmnist_dev, signum):
    root, out = tmp_path / "in", tmp_path / "out"
    plain_tree(root, kmnist_dev.test.images, 20)
    hold_file(root / "a", kmnist_dev.test.images[0])
    proc = subprocess.Popen([sys.executable, "-c", IGNORING_SIGINT, CLI, "predict", str(root), "--out", str(out)],
                            env={**os.environ, **HOLD_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        wait_for(lambda: (out / "run.json").exists() and run_json(out)["status"] == "running", proc)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:  # the CLI and whatever it forked: nothing held is left behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 130, stderr
    one_error_line(stderr, "interrupted")
    assert run_json(out)["status"] == "interrupted"


# `ray job stop` sends SIGTERM to every process of the job: the CLI and its child, a Ray driver, where
# ray.init had made SIGTERM a sys.exit(): the run ended as a bug (exit 1, a traceback), run.json "failed"
# or left "running".
def test_sigterm_to_every_process_of_a_ray_run_is_an_interrupt(tmp_path, crops, kmnist_dev, start, ray_run):
    root, out = tmp_path / "in", tmp_path / "out"
    files, held = held_tree(crops, root, kmnist_dev.test.images[0])
    proc = start(root, "--out", out, *ray_run)
    wait_for(lambda: len(shards(out)) >= 1, proc)
    os.kill(lock_holder(out)["pid"], signal.SIGTERM)  # the child first: it is surely there still
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    one_error_line(stderr, "interrupted")
    assert run_json(out)["status"] == "interrupted"
    assert_cut_off_on_ray(out, files, held)


# Item 5, a lost Ray cluster: Ray's C++ core ends the driver itself about 60 s after losing the GCS
# (measured with `ray start --head` stopped mid-run: exit status 1, no Python exception). Any such
# death is the same to the CLI; here the worker process is killed outright, as the OOM killer would.
def test_driver_death_python_cannot_catch_is_recorded_as_failed(tmp_path, crops, kmnist_dev, start, ray_run):
    root, out = tmp_path / "in", tmp_path / "out"
    files, held = held_tree(crops, root, kmnist_dev.test.images[0])
    proc = start(root, "--out", out, *ray_run)
    wait_for(lambda: len(shards(out)) >= 1, proc)
    os.kill(lock_holder(out)["pid"], signal.SIGKILL)  # the CLI's worker process: held, so still there
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    one_error_line(stderr, "killed by signal 9 before ending its run")
    run = run_json(out)
    assert run["status"] == "failed" and "signal 9" in run["reason"]
    assert_cut_off_on_ray(out, files, held)
    run_predict([root], out, RESUME)
    assert_exactly_once(out, files)
