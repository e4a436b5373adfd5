"""Cutting the listing into chunks: the unit of work, of commit (one Parquet shard each) and of resume.

A chunk's identity must survive a resume even when files were added or removed since the first run,
so boundaries are content-defined (as in rsync or restic), not every N files: after a chunk holds at
least `target // 2` files, it ends at a file whose name hashes to 0 modulo `target // 2`, or at
`2 * target` files. A file added to a folder therefore changes only the chunk it lands in (and, rarely,
the next one or two), never the chunks after it. A chunk's id hashes the exact keys it holds, so the
same files always give the same id and the same shard name.

On resume (batch_infer/job.py), a chunk whose id is already committed is skipped without reading its
shard. A chunk whose id is new but whose range of the listing overlaps committed shards (its files
changed) is predicted minus the files those shards already hold, so each file still has one row.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import pyarrow as pa

from batch_infer.discover import ListedFile
from batch_infer.paths import name_text
from kmnist_core.schema import LISTING_SCHEMA



@dataclass(frozen=True)
class Chunk:
    id: str
    first: bytes  # first and last key in listing order: the range of the listing the chunk covers
    last: bytes
    files: list[ListedFile]

    def table(self, files: Iterable[ListedFile] | None = None) -> pa.Table:
        """The listing rows (all, or the given subset) as the table the workers read."""
        files = self.files if files is None else list(files)
        roots = {f.input_root: name_text(f.input_root) for f in files}
        return pa.Table.from_pydict({
            "path": [name_text(f.path_bytes) for f in files],
            "path_bytes": [f.path_bytes for f in files],
            "rel_path": [name_text(f.rel_path) for f in files],
            "input_root": [roots[f.input_root] for f in files],
        }, schema=LISTING_SCHEMA)


def boundary_hash(key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def chunk_id(files: list[ListedFile]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for f in files:
        h.update(len(f.path_bytes).to_bytes(4, "little"))
        h.update(f.path_bytes)
    return h.hexdigest()


def make_chunk(files: list[ListedFile]) -> Chunk:
    return Chunk(chunk_id(files), files[0].path_bytes, files[-1].path_bytes, files)


def chunked(files: Iterable[ListedFile], target: int) -> Iterator[Chunk]:
    """Content-defined chunks of about `target` files (between target // 2 and 2 * target)."""
    low = max(1, target // 2)
    current: list[ListedFile] = []
    for f in files:
        current.append(f)
        if (len(current) >= low and boundary_hash(f.path_bytes) % low == 0) or len(current) >= 2 * target:
            yield make_chunk(current)
            current = []
    if current:
        yield make_chunk(current)
