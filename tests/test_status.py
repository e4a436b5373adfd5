"""`kmnist-batch status` on hand-made OUT folders in every state: a live run (the lock held by a real
child process), completed, failed, killed (run.json says running, nobody holds the lock), a tune OUT,
and an OUT on a real S3-protocol server (moto; alive judged by the lock object's holder and heartbeat)."""

from __future__ import annotations

import dataclasses
import json
import shlex
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from batch_infer.progress import RunProgress
from batch_infer.status import run_status, status_text
from kmnist_core.errors import KmnistError
from kmnist_core.progress import PROGRESS_FILE
from tests.object_store import client

RUN_ID = "20261202T180000-abcdef"
OPTIONS = {"model": "runs/study", "address": None, "executor": "auto", "batch_size": 1024, "workers": 2,
           "cpus_per_worker": 1.0, "gpus_per_worker": 0.0, "review_below": 0.95, "resume": False, "overwrite": False,
           "retry_errors": False, "read_retries": 2, "retry_backoff_s": 0.5, "rows_per_shard": 4096}
RESUME_ARGS = ["--model", "runs/study", "--workers", "2", "--review-below", "0.95"]  # what predict records


def write(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload), encoding="utf-8")


def run_json(out: Path, status: str, **extra) -> dict:
    record = {"run_id": RUN_ID, "inputs": ["/data/scans a", "/data/b"], "options": OPTIONS, "resume_args": RESUME_ARGS,
              "status": status,
              "started": "2026-12-02T18:00:00+00:00", **extra}
    write(out / "run.json", record)
    return record


def progress_json(out: Path, status: str = "running", updated: float | None = None, **extra) -> None:
    updated = time.time() if updated is None else updated
    write(out / PROGRESS_FILE, {"kind": "predict", "status": status, "run_id": RUN_ID, "every_s": 1.0,
                                "updated_unix": updated, "updated": "2026-12-02T18:01:00+00:00",
                                "holder": {"host": socket.gethostname(), "pid": 4242}, "done": 1500, "total": 2000,
                                "percent": 75.0, "rate_interval": 1000.0, "rate_overall": 750.0, "eta_s": 0.7,
                                "errors": 3, "errors_by_kind": {"truncated": 3}, "needs_review": 5,
                                "review_by_reason": {"blank": 5}, **extra})


def killed_lock(out: Path, run_id: str = RUN_ID, pid: int = 4242) -> None:
    """What a killed run leaves: its name in OUT/.lock, no flock held."""
    write(out / ".lock", {"run_id": run_id, "host": socket.gethostname(), "pid": pid, "since": "2026-12-02T18:00:00+00:00"})


@pytest.fixture
def holder(tmp_path):
    """A real process holding OUT/.lock the way out_lock.hold does; yields (out, process)."""
    out = tmp_path / "out"
    out.mkdir()
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from kmnist_core import out_lock
        with out_lock.hold(Path({str(out)!r}), {RUN_ID!r}):
            print("locked", flush=True)
            sys.stdin.read()  # until the test kills it (or ends: its stdin closes)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    yield out, child
    child.kill()
    child.wait()
    child.stdin.close()


def test_running_reports_progress_and_the_holder_then_killed_reports_interrupted(holder):
    out, child = holder
    run_json(out, "running")
    progress_json(out)
    s = run_status(out)
    assert s["state"] == "running" and s["alive_judged_by"] == "lock"
    assert s["holder"]["pid"] == child.pid and s["holder"]["host"] == socket.gethostname()
    assert s["progress"]["done"] == 1500 and "resume_command" not in s
    text = status_text(s)
    assert f"RUNNING (host {socket.gethostname()}, pid {child.pid}" in text
    assert "progress  1,500/2,000 (75.0%); 1,000 crops/s last interval, 750 overall; ETA 1s" in text

    child.kill()  # kill -9: no finally runs, the records still say running, the kernel drops the flock
    child.wait()
    s = run_status(out)
    assert s["state"] == "interrupted" and f"pid {child.pid}" in s["reason"] and "killed" in s["reason"]
    assert s["resume_command"] == ("kmnist-batch predict '/data/scans a' /data/b --out " + str(out)
                                   + " --resume --model runs/study --workers 2 --review-below 0.95")
    assert "to finish kmnist-batch predict" in status_text(s) and "last record" in status_text(s)


def test_killed_run_from_its_leftovers_alone(tmp_path):
    run_json(tmp_path, "running")
    killed_lock(tmp_path)
    s = run_status(tmp_path)
    assert s["state"] == "interrupted" and "pid 4242" in s["reason"] and "--resume" in s["resume_command"]


def test_completed(tmp_path):
    run_json(tmp_path, "completed", rows_written=2000, rows_replaced=0, elapsed_s=3.2, crops_per_s=625.0,
             finished="2026-12-02T18:00:04+00:00")
    progress_json(tmp_path, status="completed", updated=time.time() - 3600, done=2000, percent=100.0)
    (tmp_path / ".lock").write_bytes(b"")  # a clean end empties the lock file
    s = run_status(tmp_path)
    assert s["state"] == "completed" and s["summary"]["rows_written"] == 2000 and "resume_command" not in s
    assert "finished  2026-12-02T18:00:04+00:00: 2,000 rows written, 0 replaced, in 3s, 625 crops/s" in status_text(s)


def test_failed_gives_the_reason_and_the_resume_command(tmp_path):
    run_json(tmp_path, "failed", reason="cannot write /o: No space left on device", rows_committed=8192)
    s = run_status(tmp_path)
    assert s["state"] == "failed" and s["reason"] == "cannot write /o: No space left on device"
    assert s["resume_command"].endswith("--resume --model runs/study --workers 2 --review-below 0.95")
    assert "committed 8,192 rows by this run" in status_text(s)


def shard(out: Path, name: str, run_id: str) -> None:
    """A committed shard as predict writes it: its run in the footer's key-value metadata."""
    table = pa.table({"path": ["/x.png"]}).replace_schema_metadata(
        {"kmnist_batch.run": json.dumps({"run_id": run_id}), "kmnist_batch.model_card": "{}"})
    (out / "predictions").mkdir(exist_ok=True)
    pq.write_table(table, out / "predictions" / name)


def test_an_overwrite_run_that_committed_nothing_is_run_again_with_overwrite(tmp_path):
    run_json(tmp_path, "interrupted", reason="interrupted (Ctrl-C or SIGTERM)", options={**OPTIONS, "overwrite": True})
    shard(tmp_path, "chunk-aaaa.parquet", "20261101T000000-000000")  # the earlier run's, still in place
    assert " --overwrite " in run_status(tmp_path)["resume_command"]
    shard(tmp_path, "chunk-bbbb.parquet", RUN_ID)  # this run's first shard was swapped in
    assert " --resume " in run_status(tmp_path)["resume_command"]


def test_a_new_run_holding_the_lock_before_writing_records_is_running(holder):
    out, child = holder
    write(out / "run.json", {"run_id": "20261101T000000-000000", "status": "completed", "inputs": ["/x"]})
    s = run_status(out)
    assert s["state"] == "running" and s["run_id"] == RUN_ID and s["progress"] is None


def test_the_records_written_by_run_progress_are_understood(holder):
    out, child = holder
    p = RunProgress(out, every_s=1.0, background=False, stream=open(os.devnull, "w"))
    p.start({"run_id": RUN_ID, "inputs": ["/data/a"], "files": 10, "options": OPTIONS, "resume_args": RESUME_ARGS})
    p.chunk_done({"rows": 4, "errors_by_kind": {}, "review_by_reason": {}})
    assert run_status(out)["progress"]["done"] == 0  # the record is rewritten once per interval, not per chunk
    child.kill()
    child.wait()
    s = run_status(out)  # killed before run.json existed: the command comes from the start info
    assert s["state"] == "interrupted" and s["resume_command"].startswith("kmnist-batch predict /data/a --out")


def test_a_streaming_listing_shows_the_estimated_total_from_the_count_ahead(holder):
    out, child = holder
    clock = iter(range(1000, 2000)).__next__  # one second per reading
    p = RunProgress(out, every_s=1.0, background=False, stream=open(os.devnull, "w"), clock=clock)
    p.start({"run_id": RUN_ID, "inputs": ["/data/a"], "files": None, "options": OPTIONS, "resume_args": RESUME_ARGS})
    p.listing(400)
    p.counted(4000)
    p.chunk_done({"rows": 1000, "errors_by_kind": {}, "review_by_reason": {}})
    text = status_text(run_status(out))
    assert "progress  1,000/~4,000 (25.0%)" in text and "ETA -" not in text, text


def test_tune_out(tmp_path):
    from kmnist_core.options import option_args
    from tune.options import GridConfig

    cfg = GridConfig(lrs=(0.01, 0.001), batch_sizes=(32, 64), epochs=2, data_dir="/d")
    start = {"config": dataclasses.asdict(cfg), "resume_args": option_args(cfg)}  # as run_grid records them
    write(tmp_path / PROGRESS_FILE, {"kind": "tune", "status": "running", "run_id": RUN_ID, "every_s": 1.0,
                                     "updated_unix": time.time(), "start": start, "trials_total": 4,
                                     "done": 1, "running": 2, "pending": 1, "errored": 0,
                                     "best": {"val_acc": 0.8123, "lr": 0.001, "batch_size": 32}, "eta_s": 30})
    killed_lock(tmp_path)
    s = run_status(tmp_path)
    assert s["kind"] == "tune" and s["state"] == "interrupted"
    assert s["resume_command"] == (f"kmnist-batch tune --out {tmp_path} --resume --lr 0.01,0.001 --batch-size 32,64 "
                                   "--epochs 2 --data-dir /d")
    assert "trials    1/4 done, 2 running, 1 pending, 0 errored; best val 0.8123 (lr 0.001 batch 32)" in status_text(s)
    import typer.main

    from jobs.cli import app

    parsed = typer.main.get_command(app).commands["tune"].make_context("tune", shlex.split(s["resume_command"])[2:]).params
    assert (parsed["lr"], parsed["batch_size"], parsed["epochs"], str(parsed["data_dir"])) == ("0.01,0.001", "32,64", 2, "/d")


def put(fs: pafs.FileSystem, key: str, payload: dict) -> None:
    with fs.open_output_stream(key) as f:
        f.write(json.dumps(payload).encode())


def test_object_store_out_is_alive_while_its_holder_beats(s3_server, monkeypatch, tmp_path):
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, s3_server[key])
    fs = client(s3_server)
    fs.create_dir("status-test")
    uri = "s3://status-test/run1"
    with pytest.raises(KmnistError, match="holds no kmnist-batch run"):
        run_status(uri)  # nothing there yet: a missing object reads as absent, not as an error
    p = RunProgress(uri, every_s=1.0, background=False, stream=open(os.devnull, "w"))
    p.start({"run_id": RUN_ID, "inputs": ["s3://status-test/crops"], "files": 10, "options": OPTIONS, "resume_args": RESUME_ARGS})
    put(fs, "status-test/run1/run.json", {"run_id": RUN_ID, "inputs": ["s3://status-test/crops"], "options": OPTIONS,
                                          "resume_args": RESUME_ARGS, "status": "running"})
    holder = {"run_id": RUN_ID, "host": "another-host", "pid": 4242, "since": "2026-12-02T18:00:00+00:00"}
    put(fs, "status-test/run1/.lock", {**holder, "heartbeat": time.time()})
    s = run_status(uri)
    assert s["state"] == "running" and s["alive_judged_by"] == "heartbeat" and s["holder"]["host"] == "another-host"
    assert s["progress"]["total"] == 10 and s["out"] == uri

    beat = time.time() - 600
    put(fs, "status-test/run1/.lock", {**holder, "heartbeat": beat})  # the other host went silent
    s = run_status(uri, now=beat + 600)
    assert s["state"] == "interrupted" and "last heartbeat was 10m00s ago" in s["reason"]
    assert s["resume_command"] == (f"kmnist-batch predict s3://status-test/crops --out {uri} --resume "
                                   "--model runs/study --workers 2 --review-below 0.95")


def test_not_a_run():
    with pytest.raises(KmnistError, match="holds no kmnist-batch run"):
        run_status("/nonexistent/out")


def test_predict_resume_command_repeats_every_option_that_differs_from_its_default(tmp_path):
    from batch_infer.options import PredictOptions
    from batch_infer.status import predict_resume_command
    from kmnist_core.options import option_args
    from kmnist_core.storage import resolve

    opts = PredictOptions(model="m", batch_size=64, review_below=0.9, export=("alto",), manifest="boxes.csv",
                          resume=True, read_retries=0)
    record = json.loads(json.dumps({"inputs": ["/pages"], "options": dataclasses.asdict(opts),
                                    "resume_args": option_args(opts)}))  # as predict records them
    command = shlex.split(predict_resume_command(resolve(tmp_path), "OUT", record))
    assert command[:5] == ["kmnist-batch", "predict", "--out", "OUT", "--resume"]
    rest = command[5:]
    pairs = dict(zip(rest[::2], rest[1::2]))
    assert pairs == {"--model": "m", "--batch-size": "64", "--review-below": "0.9", "--read-retries": "0",
                     "--manifest": "boxes.csv", "--export": "alto"}
    # The command parses with the real CLI.
    import typer.main

    from jobs.cli import app

    typer.main.get_command(app).commands["predict"].make_context("predict", command[2:])


def test_cli_json(tmp_path):
    from typer.testing import CliRunner

    from jobs.cli import app

    run_json(tmp_path, "running")
    killed_lock(tmp_path)
    done = CliRunner().invoke(app, ["status", str(tmp_path), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["state"] == "interrupted"
    done = CliRunner().invoke(app, ["status", str(tmp_path / "nothing")])
    assert done.exit_code == 2 and done.stderr.startswith("error: ") and "holds no kmnist-batch run" in done.stderr


def test_a_run_record_writes_what_status_reads(tmp_path):
    """RunRecord writes run.json at the start and at the end; status reads the same run back through
    run_record.read_state, and every shard's footer carries run.json's fields as the run began."""
    from types import SimpleNamespace

    from batch_infer.options import PredictOptions
    from kmnist_core.run_record import RunRecord
    from kmnist_core.storage import resolve

    policy = SimpleNamespace(record=lambda: {"precision": "fp32", "precision_note": "", "review_below": 0.9,
                                             "ood_threshold": None})
    card = SimpleNamespace(model_id="m1", raw={"model_id": "m1"})
    out = resolve(tmp_path)
    record = RunRecord.begin(RUN_ID, card, policy, ["/data/a"], out.uri, PredictOptions(model="m"), None)
    record.write_running(out)
    started = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert list(started)[:4] == ["run_id", "schema_version", "model_id", "precision"]
    assert json.loads(record.footer()[b"kmnist_batch.run"]) == {k: v for k, v in started.items()
                                                               if k not in ("status", "model_card")}
    assert record.progress_start(10, {}, 0)["resume_args"] == ["--model", "m"]
    record.write_completed(out, {"rows_written": 10, "rows_replaced": 0, "finished": "2026-12-02T18:00:04+00:00"})
    s = run_status(tmp_path)
    assert s["state"] == "completed" and s["run_id"] == RUN_ID and s["summary"]["rows_written"] == 10
    record.write_end(out, "failed", "cannot write", 4, "")
    s = run_status(tmp_path)
    assert s["state"] == "failed" and s["resume_command"].endswith("--resume --model m")
