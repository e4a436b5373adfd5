"""OUT/predictions/: committed Parquet shards, each published by a rename, so a reader never sees half
a file and resume can trust every `*.parquet` it finds.

In-flight files live in OUT/_staging/, outside predictions/: directory readers (pyarrow datasets,
pandas, DuckDB globs, Spark) never list them. Every commit keeps "one row per file" true for a reader
listing predictions/ at any moment:
- new files' rows: a new shard, renamed into predictions/;
- re-read error rows (`--resume`): the old shard minus those rows plus their new rows, renamed over
  the old shard (one rename replaces both);
- the first shard of an `--overwrite` run: a fresh predictions/ holding it is swapped in for the old
  one (two renames; between them predictions/ is absent for an instant, never mixed).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch_infer.schema import SCHEMA, SCHEMA_VERSION
from kmnist_core.errors import KmnistError

PREDICTIONS_DIR = "predictions"
STAGING_DIR = "_staging"


def shard_paths(out: Path) -> list[Path]:
    return sorted((out / PREDICTIONS_DIR).glob("*.parquet"))


def recover(out: Path) -> None:
    """Tidy what a killed run left behind (call with OUT locked): undo an overwrite swap that stopped
    between its two renames, and delete in-flight files, which were never part of the output."""
    staging, predictions = out / STAGING_DIR, out / PREDICTIONS_DIR
    replaced = sorted(staging.glob("replaced-*"))
    if replaced and not predictions.exists():
        os.replace(replaced[-1], predictions)
    shutil.rmtree(staging, ignore_errors=True)


def publish(table: pa.Table, final: Path, staging: Path) -> None:
    """Write `table` in staging, fsync it, and rename it to `final` (replacing a file there)."""
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / f"{final.name}.{os.getpid()}"
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the rename must never publish a file whose bytes are not on disk
        os.replace(tmp, final)
    except BaseException:
        # On a full disk this frees what the failed write took, so run.json can still record the failure.
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class Committed:
    """What earlier runs committed: every row's key (path_bytes), and the error rows' shard and kind."""

    keys: set[bytes] = field(default_factory=set)
    errors: dict[bytes, tuple[str, str]] = field(default_factory=dict)


def committed(out: Path) -> Committed:
    found = Committed()
    for shard in shard_paths(out):
        table = pq.read_table(shard, columns=["path_bytes", "error_kind"])
        found.keys.update(table.column("path_bytes").to_pylist())
        errors = table.filter(table.column("error_kind").is_valid())
        for key, kind in zip(errors.column("path_bytes").to_pylist(), errors.column("error_kind").to_pylist()):
            found.errors[key] = (shard.name, kind)
    return found


def read_predictions(out: Path) -> pa.Table:
    shards = shard_paths(out)
    if not shards:
        return SCHEMA.empty_table()
    other = schema_versions(out) - {SCHEMA_VERSION}
    if other:
        raise KmnistError(f"{out} holds output schema {', '.join(sorted(other))}; this kmnist-batch reads schema "
                          f"{SCHEMA_VERSION} (predict it again with --overwrite)")
    return pa.concat_tables([pq.read_table(s, schema=SCHEMA) for s in shards])


def shard_metadata(out: Path) -> tuple[list[dict], dict]:
    """From the shards' key-value metadata: each distinct run (oldest first) and the latest model card."""
    runs, card = {}, {}
    for shard in shard_paths(out):
        meta = pq.read_schema(shard).metadata or {}
        if b"kmnist_batch.run" in meta:
            run = json.loads(meta[b"kmnist_batch.run"])
            runs[run["run_id"]] = run
            card = json.loads(meta[b"kmnist_batch.model_card"])
    return sorted(runs.values(), key=lambda r: r["run_id"]), card


def schema_versions(out: Path) -> set[str]:
    return {(pq.read_schema(s).metadata or {}).get(b"kmnist_batch.schema_version", b"?").decode()
            for s in shard_paths(out)}


class ShardWriter:
    """Buffers new rows and commits them as shards of about `rows_per_shard` rows.

    A shard is also committed after `flush_seconds`, bounding what a killed run can lose. With
    `replace_existing` (--overwrite), the first commit swaps a new predictions/ in for the earlier one
    and deletes it, with the `stale` paths that described it: until then the earlier output stays.
    """

    def __init__(self, out: Path, run_id: str, run_meta: dict, model_card: dict, rows_per_shard: int = 8192,
                 flush_seconds: float = 30.0, replace_existing: bool = False, stale: tuple[Path, ...] = ()):
        self.dir = out / PREDICTIONS_DIR
        self.staging = out / STAGING_DIR
        self.run_id = run_id
        self.rows_per_shard = rows_per_shard
        self.flush_seconds = flush_seconds
        self.replace_existing = replace_existing
        self.stale = stale
        if not replace_existing:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.metadata = {
            "kmnist_batch.schema_version": SCHEMA_VERSION,
            "kmnist_batch.run": json.dumps(run_meta, ensure_ascii=False),
            "kmnist_batch.model_card": json.dumps(model_card, ensure_ascii=False),
        }
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.seq = 0
        self.rows_written = 0
        self.last_flush = time.monotonic()

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.rows_per_shard or time.monotonic() - self.last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.pending_rows:
            return
        table = pa.concat_tables(self.pending).cast(SCHEMA).replace_schema_metadata(self.metadata)
        name = f"part-{self.run_id}-{self.seq:05d}.parquet"
        if self.replace_existing:
            self.swap_in(table, name)
        else:
            publish(table, self.dir / name, self.staging)
        self.seq += 1
        self.rows_written += table.num_rows
        self.pending, self.pending_rows = [], 0

    def close(self) -> None:
        """Commit what is buffered; an --overwrite run that found no files still replaces the old output."""
        self.flush()
        if self.replace_existing:
            self.swap_in(None, "")

    def swap_in(self, table: pa.Table | None, name: str) -> None:
        fresh, replaced = self.staging / f"new-{self.run_id}", self.staging / f"replaced-{self.run_id}"
        fresh.mkdir(parents=True, exist_ok=True)
        if table is not None:
            publish(table, fresh / name, self.staging)
        if self.dir.exists():
            os.replace(self.dir, replaced)
        os.replace(fresh, self.dir)
        self.replace_existing = False
        for path in (replaced, *self.stale):
            shutil.rmtree(path, ignore_errors=True)


class ShardRewriter:
    """Puts the new rows of re-read files into the committed shards that held their old rows.

    `targets` maps each re-read file's key to its old row's shard. A shard is rewritten (old rows minus
    the re-read ones, plus their new rows, one rename) as soon as all its re-read rows are back; `flush`
    rewrites the rest with whatever came back.
    """

    def __init__(self, out: Path, targets: dict[bytes, str]):
        self.dir = out / PREDICTIONS_DIR
        self.staging = out / STAGING_DIR
        self.targets = targets
        self.expected = Counter(targets.values())
        self.pending: dict[str, list[pa.Table]] = defaultdict(list)
        self.arrived: Counter = Counter()
        self.rows_replaced = 0

    def take(self, table: pa.Table) -> pa.Table:
        """Keeps the rows that replace committed ones; returns the others (files new to OUT)."""
        if not self.targets:
            return table
        shards = [self.targets.get(k) for k in table.column("path_bytes").to_pylist()]
        if not any(shards):
            return table
        for shard in set(shards) - {None}:
            rows = table.filter(pa.array([s == shard for s in shards]))
            self.pending[shard].append(rows)
            self.arrived[shard] += rows.num_rows
            if self.arrived[shard] == self.expected[shard]:
                self.rewrite(shard)
        return table.filter(pa.array([s is None for s in shards]))

    def flush(self) -> None:
        for shard in list(self.pending):
            self.rewrite(shard)

    def rewrite(self, shard: str) -> None:
        new = pa.concat_tables(self.pending.pop(shard)).cast(SCHEMA)
        path = self.dir / shard
        old = pq.read_table(path)
        stale = pc.is_in(old.column("path_bytes"), value_set=new.column("path_bytes").combine_chunks())
        merged = pa.concat_tables([old.filter(pc.invert(stale)).cast(SCHEMA), new])
        publish(merged.replace_schema_metadata(old.schema.metadata), path, self.staging)
        self.rows_replaced += new.num_rows
