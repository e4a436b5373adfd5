"""Run `predict` in a child process so that even a death Python cannot catch ends clearly.

When a driver loses its Ray cluster, Ray's C++ core ends the process itself once the GCS has been
unreachable for a while (about 60 s, measured): no Python exception, no `finally`, so run.json would
say "running" forever. The kernel's OOM killer is the same. The parent waits; the child tells it how it
ended in an explicit record (a line on a pipe: completed, a user's error, interrupted, or a bug, whose
traceback the child has printed). A child that dies without sending one was killed: the parent records
the run as failed in run.json and prints the one `error:` line.

The parent forks before it touches OUT or creates any client (an object store's, Ray's): the child does
all of that itself, and the parent only reads and writes run.json once the child is gone.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from kmnist_core import storage
from kmnist_core.out_lock import store_holder, take_if_free
from kmnist_core.run_record import read_run, write_run

OUTCOMES = ("completed", "user_error", "interrupted", "bug")


def run_supervised(out: str, work: Callable[[], tuple[int, str]]) -> tuple[int, str | None]:
    """Run `work` (returns an exit code and one of OUTCOMES) in a child process. Returns the exit code
    and, when the child died without sending its outcome, the error to print."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        code, outcome = 1, "bug"
        try:
            code, outcome = work()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.write(write_end, json.dumps({"outcome": outcome, "code": code}).encode() + b"\n")
            os._exit(code)
    os.close(write_end)
    # Ctrl-C reaches the whole foreground process group; a signal sent to this pid alone is passed on.
    forward = lambda signum, frame: os.kill(child, signal.SIGINT)  # noqa: E731
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    # Read once the child is gone: its record (a few bytes) waits in the pipe; processes it started (a
    # local Ray) may still hold the pipe open, so waiting for end-of-file could wait for them.
    os.set_blocking(read_end, False)
    try:
        told = os.read(read_end, 4096)
    except BlockingIOError:
        told = b""
    finally:
        os.close(read_end)
    if told.strip():
        return code, None  # the child ended its run itself and said how (a bug's traceback is printed)
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    reason = f"the predict process {how} before ending its run (lost the Ray cluster, or out of memory?)"
    mark_failed(out, child, reason)
    return (code if code > 0 else 1), f"{reason}; committed rows are kept; run again with --resume to finish"


def mark_failed(out: str, child: int, reason: str) -> bool:
    """Record `reason` in run.json if the child's run is still marked running there."""
    location = storage.resolve(out)
    if not location.local:
        return mark_failed_in_store(location, child, reason)
    try:
        # no lock file: the child stopped before it locked OUT; a held one: someone else started on OUT meanwhile
        with take_if_free(Path(location.path)) as holder:
            return mark_run(location, holder, child, reason)
    except (OSError, ValueError):
        return False


def mark_failed_in_store(out: storage.Location, child: int, reason: str) -> bool:
    """The same on an object store, where the lock is an object naming its holder."""
    try:
        return mark_run(out, store_holder(out), child, reason)
    except (OSError, ValueError):
        return False


def mark_run(out: storage.Location, holder: dict | None, child: int, reason: str) -> bool:
    """Mark the child's run failed in run.json, if the lock and the record both say it is the child's and
    still running."""
    run = read_run(out) or {}
    if not holder or holder.get("pid") != child or run.get("run_id") != holder.get("run_id") or run.get("status") != "running":
        return False
    write_run(out, {**run, "status": "failed", "reason": reason})
    return True
