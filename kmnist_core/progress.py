"""What predict and tune share to report a long run: a start line, then every `every_s` seconds one
progress line (or, on a terminal, a rich bar with the same figures), and the same figures rewritten
into OUT/_progress.json so another process (`kmnist-batch status`) can follow the run without Ray.

Emission is time-based and runs on a background thread: a run whose work stalls (a slow listing, a
long first batch) still prints its line and refreshes the record on time, which is what tells a
reader that the process is alive. `tick()` does one due emission; the thread calls it, and tests with
a fake clock call it themselves (`background=False`).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, TextIO

from kmnist_core import storage
from kmnist_core.files import json_text

PROGRESS_FILE = "_progress.json"  # a leading "_": Parquet readers and crop discovery skip it


def duration(seconds: float | None) -> str:
    """3h05m, 2m24s, 41s; '-' when unknown."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def counts_text(counts: dict[str, int]) -> str:
    """'truncated 2, not_image 1', largest first."""
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if v)


def iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, timezone.utc).isoformat(timespec="seconds")


class Reporter:
    """The timing, printing and record-writing half of a progress reporter. A subclass says what the
    figures are (`figures()`, a dict that goes into the record) and how they read (`line()`)."""

    kind = "?"  # "predict" or "tune": lets `status` tell the two kinds of OUT apart

    def __init__(self, out: str | Path, every_s: float = 30.0, quiet: bool = False, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 background: bool = True):
        if every_s <= 0:
            raise ValueError("the progress interval must be > 0 seconds")
        location = storage.resolve(out)
        self.out = location.uri  # absolute, as status shows it
        self._record = location.join(PROGRESS_FILE)  # a local rename, or one PUT on an object store
        self.every_s = float(every_s)
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stdout
        self.clock, self.wall = clock, wall
        self.background = background
        self.holder = {"host": socket.gethostname(), "pid": os.getpid()}
        self.status = "starting"
        self.reason: str | None = None  # why the run ended, when it failed
        self.started_at: float | None = None  # clock()
        self.started_wall: float | None = None
        self.last_emit: float | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None  # (rich Progress, task id) on a terminal
        self.info: dict = {}  # what the start line names (the subclass's start() sets it)
        self.clear()

    # -- what a subclass provides -------------------------------------------------------------
    def clear(self) -> None:
        """Set the subclass's figures as they stand before the run starts."""

    def figures(self, now: float) -> dict:
        raise NotImplementedError

    def line(self, figures: dict) -> str:
        raise NotImplementedError

    def bar_state(self, figures: dict) -> tuple[int, int | None]:
        """(completed, total) for the terminal bar."""
        raise NotImplementedError

    def identity(self) -> dict:
        """Fields of the record that do not change during the run (run id, start info)."""
        return {}

    # -- the shared machinery -----------------------------------------------------------------
    def _say(self, text: str) -> None:
        if self.quiet:
            return
        text = f"{datetime.fromtimestamp(self.wall(), timezone.utc):%H:%M:%S} {text}"  # logs rarely add a time
        if self._bar is not None:
            self._bar[0].console.print(text, highlight=False, markup=False)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()  # a log file must show the line now, not when the buffer fills

    def _open(self, start_line: str) -> None:
        with self._lock:
            self.started_at, self.started_wall = self.clock(), self.wall()
            self.last_emit = self.started_at
            self.status = "running"
            self._say(start_line)
            if not self.quiet and hasattr(self.stream, "isatty") and self.stream.isatty():
                self._start_bar()
            self._write_record(self.figures(self.started_at))
        if self.background:
            self._thread = threading.Thread(target=self._run, name=f"{self.kind}-progress", daemon=True)
            self._thread.start()

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        console = Console(file=self.stream)
        progress = Progress(TextColumn(self.kind), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[figures]}"), console=console, transient=True)
        self._bar = (progress, progress.add_task(self.kind, total=None, figures=""))
        progress.start()

    def _run(self) -> None:
        # Wake often enough to be on time without a busy loop; tick() decides whether a line is due.
        while not self._stop.wait(min(self.every_s, 1.0) / 4):
            self.tick()

    def tick(self) -> None:
        """Emit the progress line and rewrite the record if `every_s` has passed since the last time."""
        with self._lock:
            if self.status != "running" or self.clock() - self.last_emit < self.every_s:
                return
            self._emit()

    def _emit(self) -> None:
        now = self.clock()
        figures = self.figures(now)
        self.last_emit = now
        self.interval_done()
        if self._bar is not None:
            self._bar_update(figures)
        else:
            self._say(self.line(figures))
        self._write_record(figures)

    def interval_done(self) -> None:
        """Called after each emission: a subclass resets what it measures per interval."""

    def _bar_update(self, figures: dict) -> None:
        progress, task = self._bar
        completed, total = self.bar_state(figures)
        progress.update(task, completed=completed, total=total, figures=self.line(figures))

    def refresh_bar(self) -> None:
        """On a terminal, move the bar now (called as work finishes; the figures text keeps the interval's)."""
        if self._bar is not None:
            progress, task = self._bar
            progress.update(task, completed=self.bar_state(self.figures(self.clock()))[0])

    def _write_record(self, figures: dict) -> None:
        now = self.wall()
        record = {"kind": self.kind, "status": self.status, **self.identity(), "out": self.out,
                  "holder": self.holder, "every_s": self.every_s,
                  "started": iso(self.started_wall), "updated": iso(now), "updated_unix": round(now, 3), **figures}
        if self.reason:
            record["reason"] = self.reason
        try:
            storage.write_bytes_atomic(self._record, json_text(record).encode("utf-8"))
        except OSError:
            pass  # a full or read-only OUT fails the run itself, with its own error line; the record is a courtesy

    def _close(self, status: str, final_line: str | None, reason: str | None = None) -> None:
        self._stop.set()
        # is_alive: a Ctrl-C or SIGTERM that lands while _open starts the thread leaves one never started
        if self._thread is not None and self._thread is not threading.current_thread() and self._thread.is_alive():
            self._thread.join(timeout=5)
        with self._lock:
            if self.started_at is None or self.status != "running":
                return  # never started, or already closed
            self.status, self.reason = status, reason
            figures = self.figures(self.clock())
            if self._bar is not None:
                self._bar[0].stop()
                self._bar = None
            if final_line:
                self._say(final_line)
            self._write_record(figures)
