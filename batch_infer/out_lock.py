"""One writer per OUT: a run holds an exclusive lock on OUT/.lock for its whole life.

The lock is flock(2): the kernel drops it when the holder exits, however it dies (kill -9 included),
so a killed run never leaves OUT locked; on NFS, Linux turns flock into NFS byte-range locks, which the
server drops when the client's lease runs out. The file also names the holder (host, pid, run id,
since), so a refused run can say who has OUT, and a run that finds a name there but no lock knows the
previous run was killed and takes over. A clean end empties the file.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from kmnist_core.errors import KmnistError

LOCK_FILE = ".lock"  # a leading dot: directory readers and discovery skip it
_held: set[str] = set()  # flock on NFS acts per process: refuse a second run in this process ourselves


def read_holder(fd: int) -> dict | None:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8")
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def busy_message(out: Path, holder: dict | None) -> str:
    who = (f"run {holder.get('run_id')} (host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')})"
           if holder else "another run")
    return f"{out} is in use by {who}; wait for it to finish or stop it, or choose another --out"


def refuse_if_busy(out: Path) -> None:
    """Fail fast, before the slow checks (torch, the model), when another run holds OUT. Only a probe:
    `hold` takes the lock itself later."""
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return  # no OUT or no lock file yet: nobody holds it
    try:
        if os.path.realpath(out) in _held:
            raise KmnistError(busy_message(out, read_holder(fd)))
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KmnistError(busy_message(out, read_holder(fd))) from None
    finally:
        os.close(fd)


@contextmanager
def hold(out: Path, run_id: str) -> Iterator[dict | None]:
    """Lock OUT for this run or raise KmnistError naming the holder. Yields the record of a previous
    holder that was killed without releasing (None after a clean end)."""
    key = os.path.realpath(out)
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise KmnistError(f"cannot write to {out}: {e.strerror}") from None
    try:
        if key in _held:
            raise KmnistError(busy_message(out, read_holder(fd)))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KmnistError(busy_message(out, read_holder(fd))) from None
        previous = read_holder(fd)
        me = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
              "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        _held.add(key)
        try:
            yield previous
        finally:
            _held.discard(key)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock
