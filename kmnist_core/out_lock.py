"""One writer per OUT: a run holds an exclusive lock on OUT/.lock for its whole life.

The lock is flock(2): the kernel drops it when the holder exits, however it dies (kill -9 included),
so a killed run never leaves OUT locked; on NFS, Linux turns flock into NFS byte-range locks, which the
server drops when the client's lease runs out. The file also names the holder (host, pid, run id,
since), so a refused run can say who has OUT, and a run that finds a name there but no lock knows the
previous run was killed and takes over. A clean end empties the file.

An object store has no locks, so there OUT/.lock is an object naming its holder, refreshed every
HEARTBEAT_S. A run refuses an OUT whose holder is alive: the same host and a live pid, or another host
whose heartbeat is recent (STALE_S). A holder that is gone (kill -9: same host, dead pid; or a silent
heartbeat) is taken over. Two runs started in the same instant could both take it: object stores offer
no atomic create here, so start one run per OUT.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from kmnist_core import storage
from kmnist_core.errors import KmnistError
from kmnist_core.storage import Location

LOCK_FILE = ".lock"  # a leading dot: directory readers and discovery skip it
HEARTBEAT_S = 30.0
STALE_S = 120.0


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


def store_holder(out: Location) -> dict | None:
    try:
        return json.loads(storage.read_bytes(out.join(LOCK_FILE)) or b"null")
    except (OSError, ValueError):
        return None


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22): with the pid, it
    names one process even after the pid is reused. None without /proc (macOS) or for a gone process."""
    try:
        return int(Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_running(pid, started: int | None = None) -> bool:
    """A live process, not a zombie (a killed holder whose parent died too may stay one in a container),
    and, when its start time is known, the same process that recorded it (not a reuse of its pid)."""
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    try:
        fields = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return True  # no /proc (macOS): the signal probe is all there is
    return fields[0] != "Z" and (started is None or int(fields[19]) == started)


def holder_alive(holder: dict | None) -> bool:
    """For an object-store lock: is the run that wrote this record still running?"""
    if not holder:
        return False
    if holder.get("host") == socket.gethostname():
        return pid_running(holder.get("pid"), holder.get("pid_start"))
    return time.time() - float(holder.get("heartbeat", 0)) < STALE_S


def held_here(holder: dict | None) -> bool:
    """The record names a run of this very process. flock on NFS becomes a per-process lock, so a second
    run in the same process would get it too: the record, emptied at every clean end, tells."""
    return bool(holder) and holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid() \
        and holder.get("pid_start") == process_start(os.getpid())


def took(fd: int, mode: int) -> bool:
    """Take the flock `mode` (LOCK_SH or LOCK_EX) on `fd` without waiting; False when a live process holds it."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def probe(out: Path) -> tuple[bool, dict | None]:
    """(is OUT/.lock held by a live process, the holder the file names) for a local OUT; (False, None)
    when there is no OUT or no lock file yet. Takes a shared lock for an instant, never waits. The one
    place outside `hold` that tries the flock: `refuse_if_busy`, `status` and the supervisor ask here."""
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False, None
    try:
        held = not took(fd, fcntl.LOCK_SH)
        return held, read_holder(fd)  # when not held, under the shared lock: no run writes the record meanwhile
    finally:
        os.close(fd)  # releases the probe's shared lock


@contextmanager
def take_if_free(out: Path) -> Iterator[dict | None]:
    """Hold OUT/.lock exclusively for the block, without writing to it, and yield the holder the file
    still names (a run that died without a clean end leaves its record there). Raises OSError when there
    is no lock file or a live process holds it (BlockingIOError): nobody may start on OUT meanwhile."""
    fd = os.open(out / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield read_holder(fd)
    finally:
        os.close(fd)  # releases the lock


def refuse_if_busy(out: Path | Location) -> None:
    """Fail fast, before the slow checks (torch, the model), when another run holds OUT. Only a probe:
    `hold` takes the lock itself later."""
    if isinstance(out, Location):
        if not out.local:
            holder = store_holder(out)
            if holder_alive(holder):
                raise KmnistError(busy_message(out.uri, holder))
            return
        out = Path(out.path)
    held, holder = probe(out)
    if held or held_here(holder):
        raise KmnistError(busy_message(out, holder))


def holder_record(run_id: str) -> dict:
    return {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid()),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


@contextmanager
def hold_store(out: Location, run_id: str) -> Iterator[dict | None]:
    previous = store_holder(out)
    if holder_alive(previous):
        raise KmnistError(busy_message(out.uri, previous))
    me = holder_record(run_id)
    lock = out.join(LOCK_FILE)
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.write_bytes_atomic(lock, json.dumps({**me, "heartbeat": time.time()}).encode())
            except OSError:
                pass  # a missed beat only makes the lock look stale sooner
            if stop.wait(HEARTBEAT_S):
                return

    storage.write_bytes_atomic(lock, json.dumps({**me, "heartbeat": time.time()}).encode())
    thread = threading.Thread(target=beat, name="out-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield previous
    finally:
        stop.set()
        thread.join()
        storage.delete(lock)


@contextmanager
def hold(out: Path | Location, run_id: str) -> Iterator[dict | None]:
    """Lock OUT for this run or raise KmnistError naming the holder. Yields the record of a previous
    holder that was killed without releasing (None after a clean end)."""
    if isinstance(out, Location):
        if not out.local:
            with hold_store(out, run_id) as previous:
                yield previous
            return
        out = Path(out.path)
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise KmnistError(f"cannot write to {out}: {e.strerror}") from None
    try:
        if not took(fd, fcntl.LOCK_EX):
            raise KmnistError(busy_message(out, read_holder(fd)))
        previous = read_holder(fd)
        if held_here(previous):
            raise KmnistError(busy_message(out, previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_record(run_id)).encode(), 0)
        try:
            yield previous
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock
