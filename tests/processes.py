"""Helpers for tests that run the real CLI as processes: where it is, waiting on a condition, and
starting held runs that are all killed at the end of the test."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from tests.crop_tree import release

CLI = str(Path(sys.executable).parent / "kmnist-batch")


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen | None = None, timeout: float = 240.0) -> None:
    """Poll until `condition` holds; fail at once if `proc` ended meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            stderr = proc.stderr.read()[-3000:] if proc.stderr else ""
            raise AssertionError(f"the process ended (status {proc.returncode}) first: {stderr}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


class CliProcesses:
    """Starts `kmnist-batch <command> ...` processes, each in a process group of its own (the CLI and
    whatever it forks), with pipes for its output; `close()` kills whatever is left of them."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.started: list[subprocess.Popen] = []

    def __call__(self, command: str, *args) -> subprocess.Popen:
        self.started.append(subprocess.Popen([CLI, command, *map(str, args)], env=self.env, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True, start_new_session=True))
        return self.started[-1]

    def close(self) -> None:
        for proc in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()


@contextlib.contextmanager
def finishing(proc: subprocess.Popen, held: Path, timeout: float = 240.0) -> Iterator[None]:
    """Whatever happens inside, release the hold file `held` afterwards and let `proc` finish its run
    (killed if it has not within `timeout`): a failed wait leaves no held run behind."""
    try:
        yield
    finally:
        release(held)
        try:
            proc.wait(timeout=timeout)
        finally:
            proc.kill()
