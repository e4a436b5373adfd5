"""OUT/predictions/: Parquet shards written atomically (temp file, then rename), so a reader or a
resumed run never sees half a file, and resume can trust every `*.parquet` it finds."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batch_infer.schema import SCHEMA, SCHEMA_VERSION

PREDICTIONS_DIR = "predictions"
TMP_SUFFIX = ".tmp"


def shard_paths(out: Path) -> list[Path]:
    return sorted((out / PREDICTIONS_DIR).glob("*.parquet"))


def remove_partial_shards(out: Path) -> int:
    """Delete temp files left by a killed run; they were never part of the output."""
    leftovers = list((out / PREDICTIONS_DIR).glob(f"*{TMP_SUFFIX}"))
    for p in leftovers:
        p.unlink(missing_ok=True)
    return len(leftovers)


def completed_paths(out: Path) -> set[str]:
    done: set[str] = set()
    for shard in shard_paths(out):
        done.update(pq.read_table(shard, columns=["path"]).column("path").to_pylist())
    return done


def read_predictions(out: Path) -> pa.Table:
    shards = shard_paths(out)
    if not shards:
        return SCHEMA.empty_table()
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


class ShardWriter:
    """Buffers output tables and commits them as shards of about `rows_per_shard` rows.

    A shard is also committed after `flush_seconds`, bounding what a killed run can lose.
    """

    def __init__(self, out: Path, run_id: str, run_meta: dict, model_card: dict,
                 rows_per_shard: int = 8192, flush_seconds: float = 30.0):
        self.dir = out / PREDICTIONS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        self.rows_per_shard = rows_per_shard
        self.flush_seconds = flush_seconds
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
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.rows_per_shard or time.monotonic() - self.last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.pending_rows:
            return
        table = pa.concat_tables(self.pending).cast(SCHEMA).replace_schema_metadata(self.metadata)
        final = self.dir / f"part-{self.run_id}-{self.seq:05d}.parquet"
        tmp = final.with_name(final.name + TMP_SUFFIX)
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the rename must never publish a file whose bytes are not on disk
        os.replace(tmp, final)
        self.seq += 1
        self.rows_written += table.num_rows
        self.pending, self.pending_rows = [], 0
