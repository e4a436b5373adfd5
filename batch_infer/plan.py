"""Resume: which chunks of the listing need work, decided one chunk at a time from shard footers.

- A chunk whose id is committed is done; if its shard holds error rows worth re-reading (transient
  kinds, or all with --retry-errors), the chunk is sent again to re-read just those rows.
- A chunk whose id is new may still cover files an earlier run committed, in a chunk that has since
  changed (files were added or removed near it): those files are found in the committed shards whose
  listing range overlaps the chunk's and are left out, so no file gets a second row.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Iterator

from batch_infer.chunks import Chunk
from batch_infer.discover import order_key
from batch_infer.stages import TRANSIENT_KINDS
from batch_infer.worker import ChunkTask
from kmnist_core import predictions
from kmnist_core.storage import Location

CACHED_SHARDS = 8  # committed shards' keys kept while consecutive new chunks overlap them


class Plan:
    def __init__(self, out: Location, previous: dict[str, predictions.ChunkRecord], retry_errors: bool):
        self.out = out
        self.previous = previous
        self.retry_errors = retry_errors
        self.ranges = [(order_key(r.first), order_key(r.last), r) for r in previous.values()]
        self.keys_cache: OrderedDict[str, set[bytes]] = OrderedDict()
        self.files_listed = self.already_done = self.files_to_predict = self.rows_to_reread = 0

    def rereads(self, record: predictions.ChunkRecord) -> int:
        if self.retry_errors:
            return sum(record.errors.values())
        return sum(n for kind, n in record.errors.items() if kind in TRANSIENT_KINDS)

    def committed_keys(self, record: predictions.ChunkRecord) -> set[bytes]:
        if record.shard not in self.keys_cache:
            table = predictions.read_shard(predictions.predictions_dir(self.out), record.shard, ["path_bytes"])
            self.keys_cache[record.shard] = set(table.column("path_bytes").to_pylist())
            if len(self.keys_cache) > CACHED_SHARDS:
                self.keys_cache.popitem(last=False)
        return self.keys_cache[record.shard]

    def tasks(self, chunks: Iterable[Chunk]) -> Iterator[ChunkTask]:
        for chunk in chunks:
            self.files_listed += len(chunk.files)
            record = self.previous.get(chunk.id)
            if record is not None:
                again = self.rereads(record)
                self.already_done += len(chunk.files) - again
                if again:
                    self.rows_to_reread += again
                    yield ChunkTask(chunk.id, chunk.first, chunk.last, chunk.table([]),
                                    redo_kinds=frozenset(TRANSIENT_KINDS), redo_all_errors=self.retry_errors)
                continue
            files = chunk.files
            if self.ranges:
                first, last = order_key(chunk.first), order_key(chunk.last)
                done: set[bytes] = set()
                for low, high, r in self.ranges:
                    if low <= last and first <= high:
                        done |= self.committed_keys(r)
                if done:
                    files = [f for f in files if f.path_bytes not in done]
                    self.already_done += len(chunk.files) - len(files)
            if files:
                self.files_to_predict += len(files)
                yield ChunkTask(chunk.id, chunk.first, chunk.last, chunk.table(files))
