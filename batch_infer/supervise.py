"""Run `predict` in a child process so that even a death Python cannot catch ends clearly.

When a driver loses its Ray cluster, Ray's C++ core ends the process itself once the GCS has been
unreachable for a while (about 60 s, measured): no Python exception, no `finally`, so run.json would
say "running" forever. The kernel's OOM killer is the same. The parent waits; the child tells it how it
ended in an explicit record (a line on a pipe: completed, a user's error, interrupted, or a bug, whose
traceback the child has printed). A child that dies without sending one was killed: the parent records
the run as failed in run.json and prints the one `error:` line.

The parent forks before it touches OUT or creates any client (an object store's, Ray's): the child does
all of that itself, and the parent only reads and writes run.json once the child is gone.

Stopping: a Ctrl-C or SIGTERM that reaches the parent is passed on to the child as SIGINT, and the child
ends its run as interrupted. The parent's handler is in place before the fork (a signal that lands while
it forks is passed on once the child exists, instead of killing the parent alone and leaving the child
running unwatched); both signals are unblocked, and the child sets its own handlers rather than keep what
it inherited: a shell starts a background job (`cmd &`, a script's `nohup ... &`) with SIGINT ignored,
`ray job submit` starts its entrypoint with SIGINT blocked, and a child that inherited either never stopped
on the SIGINT the parent passed on. The child ends its run on the first stop signal and lets the
others be meanwhile (`Stop`): a Ctrl-C reaches it twice, from the terminal and from the parent.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from kmnist_core import storage
from kmnist_core.errors import Interrupted
from kmnist_core.out_lock import store_holder, take_if_free
from kmnist_core.run_record import read_run, write_run

OUTCOMES = ("completed", "user_error", "interrupted", "bug")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_supervised(out: str, work: Callable[[], tuple[int, str]]) -> tuple[int, str | None]:
    """Run `work` (returns an exit code and one of OUTCOMES) in a child process. Returns the exit code
    and, when the child died without sending its outcome, the error to print."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    parent, child = os.getpid(), 0
    early: set[int] = set()  # processes a stop signal reached before they could act on it

    def forward(signum, frame):
        # Ctrl-C reaches the whole foreground process group; a signal sent to this pid alone is passed on.
        if os.getpid() == parent and child:
            with contextlib.suppress(ProcessLookupError):  # reaped meanwhile
                os.kill(child, signal.SIGINT)
        else:  # during the fork, or in the child before it set its own handlers
            early.add(os.getpid())

    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    # `ray job submit` starts its entrypoint with SIGINT blocked: unblocked here and so in the child
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    child = os.fork()
    if child == 0:
        run_child(read_end, write_end, work, early)
    os.close(write_end)
    if parent in early:  # stopped while forking: the child exists now
        os.kill(child, signal.SIGINT)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    pid, child = child, 0  # reaped: from now on its pid may be another process's
    for signum, handler in previous.items():
        if handler is not None:  # None: not set from Python, cannot be set back from here
            signal.signal(signum, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
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
    mark_failed(out, pid, reason)
    return (code if code > 0 else 1), f"{reason}; committed rows are kept; run again with --resume to finish"


class Stop:
    """The child's SIGINT and SIGTERM handler: a KeyboardInterrupt, on which `work` ends the run as
    interrupted, once. A Ctrl-C reaches the child twice (the terminal sends it to the whole process group,
    and the parent passes its own on; `ray job stop` sends SIGTERM to both), and a second KeyboardInterrupt
    landing while the first is handled would cut the run's record short (run.json left "running").

    Python drops a KeyboardInterrupt that lands in a finalizer or a weakref callback (it prints "Exception
    ignored in ..."): `unraisable` stops the child again at the next safe point when every one raised so
    far was dropped, and says nothing when one is already ending the run."""

    def __init__(self):
        self.raised = self.dropped = 0
        self.default_hook = sys.unraisablehook

    def __call__(self, signum, frame) -> None:
        if isinstance(sys.exc_info()[1], (KeyboardInterrupt, Interrupted)):
            return  # already ending the run on an earlier one
        self.raised += 1
        raise KeyboardInterrupt

    def unraisable(self, hook_args) -> None:
        if not isinstance(hook_args.exc_value, KeyboardInterrupt):
            return self.default_hook(hook_args)
        self.dropped += 1
        if self.dropped == self.raised:
            _thread.interrupt_main(signal.SIGINT)


def run_child(read_end: int, write_end: int, work: Callable[[], tuple[int, str]], early: set[int]) -> None:
    """The child's side: run `work`, send its outcome on the pipe and exit (never returns). `early` holds
    this process's pid if a stop signal reached it before it had its own handlers."""
    result = None
    try:
        os.close(read_end)
        # Its own handlers, whatever it inherited (SIGINT ignored in a background job). SIGTERM too: `ray job
        # stop` and service managers send it, and it ends the run the same way as Ctrl-C ("interrupted").
        stop = Stop()
        sys.unraisablehook = stop.unraisable
        for signum in STOP_SIGNALS:
            signal.signal(signum, stop)
        if os.getpid() in early:
            raise KeyboardInterrupt
        result = work()
    except KeyboardInterrupt:
        if result is None:  # stopped before `work` could catch it: nothing was started
            result = Interrupted.exit_code, "interrupted"
            print("error: interrupted", file=sys.stderr)
    finally:
        for signum in STOP_SIGNALS:  # the run has ended: a late signal must not stop its record on the way out
            signal.signal(signum, signal.SIG_IGN)
        code, outcome = result or (1, "bug")
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(write_end, json.dumps({"outcome": outcome, "code": code}).encode() + b"\n")
        os._exit(code)


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
