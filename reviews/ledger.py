"""The decisions as one review server sees them, and its own decisions written to OUT/reviews/.

Reading: every file in reviews/ is read once; listing the folder again (at most every REFRESH_S) picks
up the files other servers, reviewers and imports publish, and only those are read. A file that holds no
decisions is set aside with a warning (reviews.store.read_batch), never failing a page; the temp
files of writers that died mid-write are removed when the server starts. Per key the
standing decision is the latest in read_history's order (decided_at, then file name, then row), so the
server shows what `report` will fold in; a withdrawn decision (label null) leaves the key undecided.

Writing: a request's decisions are on disk (reviews.store.append: fsync, then rename) before the
request is answered, so the browser shows "saved" only for what a kill -9 cannot lose. Requests that
arrive while a file is being written are group-committed: the next writer publishes all of them in one
file. The browser sends a burst of keys as one request, so a file holds one burst of keystrokes (one
key, or a whole page accepted with `a`).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from kmnist_core import storage
from kmnist_core.storage import Location
from reviews import store
from reviews.queue import key_hashes

REFRESH_S = 1.0


@dataclass(frozen=True)
class Standing:
    """A key's latest decision and where it sits in the history's order."""

    order: tuple[int, str, int]  # decided_at (µs), file name, row
    label: str | None
    reviewer: str
    kind: str


@dataclass
class Ticket:
    table: pa.Table
    done: bool = False
    name: str = ""
    error: BaseException | None = None


class Ledger:
    def __init__(self, out: Location):
        self.out = out
        self.folder = store.reviews_dir(out)
        self.lock = threading.Lock()  # guards batches and standing
        self.batches: dict[str, pa.Table] = {}  # every file read: the history, for the audit figure
        self.standing: dict[int, Standing] = {}  # key hash -> its latest decision
        self.pending: list[Ticket] = []
        self.pending_lock = threading.Lock()
        self.write_lock = threading.Lock()  # one file being written at a time
        self.listed_at = float("-inf")
        self.warned: set[str] = set()  # files that could not be read: warned about once, read again each listing
        storage.remove_stale_temps(self.folder)
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> dict[int, bool]:
        """Read the files published since the last listing; returns the keys whose standing changed
        (hash -> settled now)."""
        if not force and time.monotonic() - self.listed_at < REFRESH_S:
            return {}
        self.listed_at = time.monotonic()
        new = [n for n in storage.list_names(self.folder, ".parquet") if n not in self.batches]
        with ThreadPoolExecutor(2 if self.out.local else 8) as pool:
            tables = list(pool.map(lambda n: store.read_batch(self.folder, n, warned=self.warned), new))
        changed: dict[int, bool] = {}
        for name, table in zip(new, tables):
            if table is not None:
                changed.update(self.absorb(name, table))
        return changed

    def absorb(self, name: str, table: pa.Table) -> dict[int, bool]:
        """Fold one published file into the standing decisions (once per file name)."""
        with self.lock:
            if name in self.batches:
                return {}
            self.batches[name] = table
            keys = key_hashes(table["key"].to_pylist())
            stamps = table["decided_at"].cast(pa.int64()).to_pylist()
            changed = {}
            for row, (key, stamp, label, reviewer, kind) in enumerate(zip(
                    keys.tolist(), stamps, *(table[c].to_pylist() for c in ("label", "reviewer", "kind")))):
                order = (stamp, name, row)
                held = self.standing.get(key)
                if held is None or held.order < order:
                    self.standing[key] = Standing(order, label, reviewer, kind)
                    changed[key] = label is not None
            return changed

    def settled_keys(self) -> np.ndarray:
        """Hashes of every key with a standing decision."""
        with self.lock:
            return np.array([k for k, s in self.standing.items() if s.label is not None], np.uint64)

    def decision(self, key: int) -> Standing | None:
        with self.lock:
            held = self.standing.get(key)
            return held if held is not None and held.label is not None else None

    def history(self) -> pa.Table:
        with self.lock:
            return store.history_of(dict(self.batches))

    def commit(self, table: pa.Table) -> tuple[str, dict[int, bool]]:
        """Publish `table` (with whatever else is pending) and fold it in; returns the file name and
        the keys whose standing changed. Returns only once the file is on disk."""
        ticket = Ticket(table)
        with self.pending_lock:
            self.pending.append(ticket)
        with self.write_lock:
            if not ticket.done:  # nobody wrote it while this request waited: write all that is pending
                with self.pending_lock:
                    batch, self.pending = self.pending, []
                try:
                    combined = pa.concat_tables([t.table for t in batch])
                    name = store.append(self.out, combined)
                    self.absorb(name, combined)
                    for t in batch:
                        t.name = name
                except BaseException as e:  # every request of the batch learns that it was not saved
                    for t in batch:
                        t.error = e
                finally:
                    for t in batch:
                        t.done = True
        if ticket.error is not None:
            raise ticket.error
        keys = key_hashes(table["key"].to_pylist())
        with self.lock:
            return ticket.name, {int(k): self.standing[int(k)].label is not None for k in keys}
