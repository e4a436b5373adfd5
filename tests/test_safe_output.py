"""Durable decisions and safe output, on real files (no Ray): a durable write fsyncs the folder after its
rename; a file of reviews/ that holds no decisions is set aside (locally and on an object store) while
the others count; dead writers' temp files go, a live writer's stay; names are escaped for a terminal;
CSV cells cannot run as spreadsheet formulas."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import stat
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kmnist_core import storage
from kmnist_core.card import read_card
from kmnist_core.model_dir import DEFAULT_MODEL_DIR
from kmnist_core.safe_text import csv_cell, csv_frame, terminal
from reviews import store
from tests.object_store import client, put_objects
from tests.test_object_store import bucket, s3_env  # noqa: F401 (fixtures)

CHARS = read_card(DEFAULT_MODEL_DIR).classes.chars


def batch(*keys: bytes, reviewer: str = "alice") -> pa.Table:
    return store.decision_table([{"key": k, "path": k.decode(), "label": CHARS[0], "reviewer": reviewer,
                                      "decided_at": datetime(2026, 1, 1, tzinfo=timezone.utc)} for k in keys], CHARS)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def not_decisions() -> dict[str, bytes]:
    """Files a reviews/ folder may meet that hold no decisions, each for another reason."""
    good = parquet_bytes(batch(b"/x.png"))
    nullable = pa.schema([f.with_nullable(True) for f in store.SCHEMA])
    return {
        "text.parquet": b"key,label\n/a.png,x\n",  # not Parquet
        "cut.parquet": good[: len(good) // 2],  # a copy cut short
        "empty.parquet": b"",
        "other.parquet": parquet_bytes(pa.table({"x": [1, 2]})),  # another table's Parquet
        "nullkey.parquet": parquet_bytes(batch(b"/y.png").cast(nullable).set_column(
            0, pa.field("key", pa.binary()), pa.array([None], pa.binary()))),  # a null where every decision has a value
        "types.parquet": parquet_bytes(batch(b"/z.png").set_column(
            4, "decided_at", pa.array(["yesterday"]))),  # decided_at that is no time
    }


# ------------------------------------------------------------------------------------------ durable


class Fsyncs:
    """Every os.fsync made: (file or dir, the path of what was fsynced, whether `target` existed then)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bool]] = []
        self.target = Path("/nonexistent")


@pytest.fixture
def fsyncs(monkeypatch) -> Fsyncs:
    """os.fsync recorded (the real one still runs)."""
    seen, real = Fsyncs(), os.fsync

    def record(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        seen.calls.append((kind, os.readlink(f"/proc/self/fd/{fd}"), seen.target.exists()))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return seen


def test_a_durable_write_fsyncs_the_folder_after_the_rename_and_a_fast_one_fsyncs_nothing(tmp_path, fsyncs):
    fsyncs.target = tmp_path / "a.bin"
    storage.write_bytes_atomic(storage.resolve(tmp_path / "a.bin"), b"one", fsync=True)
    assert fsyncs.calls == [("file", f"{tmp_path}/.a.bin.{os.getpid()}.tmp", False),  # the bytes, before the rename
                            ("dir", str(tmp_path), True)]  # the folder, after it: the rename is on disk
    assert (tmp_path / "a.bin").read_bytes() == b"one"
    fsyncs.calls.clear()
    storage.write_bytes_atomic(storage.resolve(tmp_path / "b.bin"), b"two")
    storage.make_dirs(storage.resolve(tmp_path / "c" / "d"))
    assert fsyncs.calls == [] and (tmp_path / "b.bin").read_bytes() == b"two" and (tmp_path / "c" / "d").is_dir()


def test_a_decision_batch_is_durable_with_the_folders_it_creates(tmp_path, fsyncs):
    out = tmp_path / "out"
    store.append(storage.resolve(out), batch(b"/a.png"))
    # out/ and out/reviews/ were created: each is on disk in its parent; then the file, then its rename.
    assert [(kind, path) for kind, path, _ in fsyncs.calls if kind == "dir"] == \
        [("dir", str(tmp_path)), ("dir", str(out)), ("dir", str(out / "reviews"))]
    assert [kind for kind, _, _ in fsyncs.calls] == ["dir", "dir", "file", "dir"]
    fsyncs.calls.clear()
    store.append(storage.resolve(out), batch(b"/b.png"))  # reviews/ exists: its entry in out/ is fsynced all the same
    assert [(kind, path) for kind, path, _ in fsyncs.calls if kind == "dir"] == \
        [("dir", str(out)), ("dir", str(out / "reviews"))]
    assert [kind for kind, _, _ in fsyncs.calls] == ["dir", "file", "dir"]
    assert store.read_history(storage.resolve(out)).num_rows == 2


# ------------------------------------------------------------------------------ files of no decisions


def test_files_that_hold_no_decisions_are_set_aside_with_a_warning_and_the_rest_count(tmp_path, capsys):
    out = storage.resolve(tmp_path / "out")
    good = [store.append(out, batch(b"/a.png")), store.append(out, batch(b"/b.png", reviewer="bob"))]
    reviews = tmp_path / "out" / "reviews"
    bad = not_decisions()
    for name, data in bad.items():
        (reviews / name).write_bytes(data)
    (reviews / "_quarantine").mkdir()
    (reviews / "_quarantine" / "text.parquet").write_bytes(b"set aside earlier")  # never overwritten

    history = store.read_history(out)
    assert sorted(history["key"].to_pylist()) == [b"/a.png", b"/b.png"]
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == len(bad)
    for name in bad:
        line = next(w for w in warnings if f"{reviews / name} " in w)
        assert line.startswith("warning: ") and "holds no review decisions (" in line and ": moved to " in line
    assert "(no column key, path, label" in next(w for w in warnings if "other.parquet" in w)
    assert "non-nullable" in next(w for w in warnings if "nullkey.parquet" in w)
    assert sorted(p.name for p in reviews.glob("*.parquet")) == sorted(good)
    assert store.quarantined(out) == sorted([*bad, "text.parquet.1"])
    assert (reviews / "_quarantine" / "text.parquet").read_bytes() == b"set aside earlier"
    assert (reviews / "_quarantine" / "text.parquet.1").read_bytes() == bad["text.parquet"]  # moved, not lost

    # Set aside once: the next reader warns of nothing; any column subset reads the same files.
    assert store.read_history(out, ["key"]).num_rows == 2 and capsys.readouterr().err == ""
    # "_quarantine" keeps out of a Parquet dataset reader's way too (pandas, pyarrow, Spark read reviews/).
    assert pq.read_table(reviews).num_rows == 2


def test_a_file_that_cannot_be_read_now_stays_in_place_and_is_warned_about_once(tmp_path, capsys):
    out = storage.resolve(tmp_path / "out")
    store.append(out, batch(b"/a.png"))
    stuck = tmp_path / "out" / "reviews" / "stuck.parquet"
    stuck.mkdir()  # its bytes cannot be read (as a file without read permission, but for root too)
    warned: set[str] = set()
    folder = store.reviews_dir(out)
    assert store.read_batch(folder, stuck.name, warned=warned) is None
    assert store.read_batch(folder, stuck.name, warned=warned) is None
    err = capsys.readouterr().err
    assert err.count("warning: cannot read") == 1 and f"{stuck} (" in err and "left out until it can be read" in err
    assert store.read_history(out).num_rows == 1 and stuck.exists() and store.quarantined(out) == []
    stuck.rmdir()
    stuck.write_bytes(parquet_bytes(batch(b"/b.png")))
    assert store.read_history(out).num_rows == 2  # readable now: it counts


def test_a_read_only_out_warns_and_leaves_the_file_in_place(tmp_path, capsys, monkeypatch):
    out = storage.resolve(tmp_path / "out")
    store.append(out, batch(b"/a.png"))
    reviews = tmp_path / "out" / "reviews"
    (reviews / "junk.parquet").write_bytes(b"junk")

    def read_only(*args) -> None:  # what a read-only mount answers (for root too, unlike a chmod)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "rename", read_only)
    assert store.read_history(out).num_rows == 1
    err = capsys.readouterr().err
    assert "junk.parquet holds no review decisions" in err and "left out; it could not be moved" in err
    assert (reviews / "junk.parquet").exists()


@pytest.mark.timeout(120)
def test_on_an_object_store_a_file_of_no_decisions_is_copied_aside_then_deleted(bucket, s3_env, capsys):  # noqa: F811
    out = storage.resolve(f"s3://{bucket}/out")
    good = store.append(out, batch(b"/a.png"))
    put_objects(s3_env, [(f"{bucket}/out/reviews/junk.parquet", b"junk")])
    assert store.read_history(out)["key"].to_pylist() == [b"/a.png"]
    assert f"s3://{bucket}/out/reviews/junk.parquet holds no review decisions" in capsys.readouterr().err
    assert storage.list_names(store.reviews_dir(out)) == [good]
    assert store.quarantined(out) == ["junk.parquet"]
    with client(s3_env).open_input_stream(f"{bucket}/out/reviews/_quarantine/junk.parquet") as f:
        assert f.read() == b"junk"


# ------------------------------------------------------------------------------------------ temp files


def dead_pid() -> int:
    """The pid of a process that has ended (reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_of_dead_writers_go_a_live_writer_s_stay(tmp_path):
    folder = tmp_path / "reviews"
    folder.mkdir()
    dead, now = dead_pid(), time.time()
    ages = {f".a.parquet.{dead}.tmp": 20 * 60,  # its writer died 20 minutes ago: goes
            f".b.parquet.{os.getpid()}.tmp": 20 * 60,  # a live writer (this process), however slow: stays
            f".c.parquet.{dead}.tmp": 30,  # dead pid, but young: perhaps a writer on another machine: stays
            f".d.parquet.{os.getpid()}.tmp": 2 * 24 * 3600,  # two days: no write takes that long, a reused pid
            ".e.parquet.tmp": 20 * 60,  # not write_bytes_atomic's: stays
            "f.parquet": 20 * 60}
    for name, age in ages.items():
        (folder / name).write_bytes(b"x")
        os.utime(folder / name, (now - age, now - age))
    assert sorted(storage.remove_stale_temps(storage.resolve(folder))) == [f".a.parquet.{dead}.tmp",
                                                                          f".d.parquet.{os.getpid()}.tmp"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([f".b.parquet.{os.getpid()}.tmp",
                                                               f".c.parquet.{dead}.tmp", ".e.parquet.tmp", "f.parquet"])
    # read_history tidies reviews/ the same way.
    os.utime(folder / f".c.parquet.{dead}.tmp", (now - 3600, now - 3600))
    store.read_history(storage.resolve(tmp_path))
    assert not (folder / f".c.parquet.{dead}.tmp").exists() and (folder / f".b.parquet.{os.getpid()}.tmp").exists()


# ------------------------------------------------------------------------------------------ terminal


def test_terminal_escapes_every_control_character_and_only_those():
    assert terminal("お/き.png") == "お/き.png" and terminal("a b\\c") == "a b\\c"
    assert terminal("a\x1b[2Jb\x07\x00\t\n\r\x7f") == "a\\u001b[2Jb\\u0007\\u0000\\u0009\\u000a\\u000d\\u007f"
    assert terminal("\x85\x9b31m") == "\\u0085\\u009b31m"  # C1: NEL, CSI
    assert terminal("abc\u202egnp.exe\u2066\u2069\u200e\u200f\u061c") == \
        "abc\\u202egnp.exe\\u2066\\u2069\\u200e\\u200f\\u061c"  # bidi controls ("Trojan Source")
    assert terminal(b"\xff.png".decode("utf-8", "surrogateescape")) == "\\udcff.png"  # a non-UTF-8 name
    assert terminal("one\ntwo\x1b", newlines=True) == "one\ntwo\\u001b"
    value = {"path": "a\x7f\u202e\x9b\udcff\n"}
    text = json.dumps(value, ensure_ascii=False, indent=2)
    assert json.loads(terminal(text, newlines=True)) == value  # JSON stays JSON of the same values


# ------------------------------------------------------------------------------------------ CSV


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised_numbers_stay_numbers(tmp_path):
    assert [csv_cell(v) for v in ["=1+2", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "a=b", "", None, -1, -0.5, 3]] == \
        ["'=1+2", "'+1", "'-1", "'@SUM(A1)", "'\tx", "'\rx", "a=b", "", None, -1, -0.5, 3]
    frame = pd.DataFrame({"folder": ["=cmd|' /C calc'!A0", "plain", None], "files": [-3, 4, 5],
                          "mean": [-0.25, None, 0.5], "text": pd.array(["@x", "-y", "z"], dtype="string")})
    csv_frame(frame).to_csv(tmp_path / "t.csv", index=False)
    assert frame["folder"][0] == "=cmd|' /C calc'!A0"  # a copy: the caller's frame is left as it was
    with open(tmp_path / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["folder"] for r in rows] == ["'=cmd|' /C calc'!A0", "plain", ""]
    assert [r["text"] for r in rows] == ["'@x", "'-y", "z"]
    assert [r["files"] for r in rows] == ["-3", "4", "5"] and [r["mean"] for r in rows] == ["-0.25", "", "0.5"]
