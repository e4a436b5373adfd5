"""OUT/predictions/: one committed Parquet shard per listing chunk (batch_infer/chunks.py), written by the
worker that predicted it, so a reader never sees half a file and resume can trust every shard it finds.

- A shard is named by its chunk's id (`chunk-<id>.parquet`): a retried or repeated chunk rewrites the
  same name, so a row can never be committed twice. Locally it is written under a hidden temp name
  beside its final name, fsynced and renamed; on an object store it is one PUT. Directory readers
  (pyarrow datasets, pandas, DuckDB globs, Spark) skip hidden and `_` names.
- Each shard's footer says which chunk it is (id, first and last key, rows, error rows by kind), so
  resume reads footers, never every committed path.
- `--resume` re-reading error rows rewrites their chunk's shard whole (old rows minus those plus their
  new rows, one rename or PUT).
- The first shard of a local `--overwrite` run is written in OUT/_staging/new-<run>/, which is then
  swapped in for the old predictions/ (two renames; between them predictions/ is absent for an
  instant, never mixed). On an object store, where nothing can be renamed, the old shards are deleted
  right after the new run's first shard is committed: a reader listing in that instant may see both.
- `_run-<run_id>.json` in predictions/ records each run (what discovery found and skipped), so the
  folder alone is enough to rebuild the summary.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from kmnist_core import storage
from kmnist_core.card import ModelCard
from kmnist_core.errors import KmnistError
from kmnist_core.files import json_text
from kmnist_core.schema import FOOTER_CHUNK, FOOTER_MODEL_CARD, FOOTER_RUN, FOOTER_SCHEMA_VERSION, SCHEMA, SCHEMA_VERSION
from kmnist_core.storage import Location

PREDICTIONS_DIR = "predictions"
STAGING_DIR = "_staging"
RUN_RECORD = "_run-{run_id}.json"
CHUNK_KEY = FOOTER_CHUNK


def predictions_dir(out: Location) -> Location:
    return out.join(PREDICTIONS_DIR)


def shard_name(chunk_id: str) -> str:
    return f"chunk-{chunk_id}.parquet"


def shard_names(out: Location) -> list[str]:
    return storage.list_names(predictions_dir(out), ".parquet")


@dataclass(frozen=True)
class ChunkRecord:
    """A committed shard as its footer describes it."""

    id: str
    first: bytes
    last: bytes
    rows: int
    errors: dict[str, int] = field(default_factory=dict)  # error rows by kind
    shard: str = ""


def value_counts(column: pa.ChunkedArray | pa.Array) -> dict:
    """{value: rows} of a column's non-null values."""
    return {v["values"]: v["counts"] for v in column.drop_null().value_counts().to_pylist()} if len(column) else {}


def chunk_meta(chunk_id: str, first: bytes, last: bytes, table: pa.Table) -> bytes:
    return json.dumps({"id": chunk_id, "first": first.hex(), "last": last.hex(), "rows": table.num_rows,
                       "errors": value_counts(table.column("error_kind"))}).encode()


def footer(out: Location, name: str) -> dict[bytes, bytes]:
    loc = predictions_dir(out).join(name)
    return pq.read_schema(loc.path, filesystem=loc.fs).metadata or {}


def footers(out: Location) -> dict[str, dict[bytes, bytes]]:
    """Every shard's key-value metadata (read in parallel: one or two GETs each on an object store).

    Every shard of a run carries the same model card and run record (~14 KB): equal values are kept once.
    Over 2,681 shards (about a 10,000,000-crop run's) a copy each took 36 MB."""
    names = shard_names(out)
    values: dict[bytes, bytes] = {}
    with ThreadPoolExecutor(8 if not out.local else 2) as pool:
        return {name: {k: values.setdefault(v, v) for k, v in meta.items()}
                for name, meta in zip(names, pool.map(lambda n: footer(out, n), names))}


def chunk_records(metas: dict[str, dict[bytes, bytes]]) -> dict[str, ChunkRecord]:
    records = {}
    for name, meta in metas.items():
        if CHUNK_KEY in meta:
            m = json.loads(meta[CHUNK_KEY])
            records[m["id"]] = ChunkRecord(m["id"], bytes.fromhex(m["first"]), bytes.fromhex(m["last"]), m["rows"],
                                           m["errors"], name)
    return records


def run_metadata(metas: dict[str, dict[bytes, bytes]]) -> tuple[list[dict], ModelCard | None]:
    """Each distinct run (oldest first) and the latest model card, from shard footers."""
    runs, card = {}, None
    for meta in metas.values():
        if FOOTER_RUN in meta:
            run = json.loads(meta[FOOTER_RUN])
            runs[run["run_id"]] = run
            card = json.loads(meta[FOOTER_MODEL_CARD]) or None
    return sorted(runs.values(), key=lambda r: r["run_id"]), ModelCard.from_json(card, "a shard's model card") if card else None


def schema_versions(metas: dict[str, dict[bytes, bytes]]) -> set[str]:
    return {meta.get(FOOTER_SCHEMA_VERSION, b"?").decode() for meta in metas.values()}


def refuse_other_schema(out: Location, metas: dict[str, dict[bytes, bytes]], doing: str) -> None:
    other = schema_versions(metas) - {SCHEMA_VERSION}
    if other:
        raise KmnistError(f"{out.uri} holds output schema {', '.join(sorted(other))}; this kmnist-batch {doing} "
                          f"schema {SCHEMA_VERSION}: use --overwrite or another --out")


@dataclass(frozen=True)
class Opened:
    """A predict OUT as its readers open it (open_predictions): every committed shard's footer, the runs
    that wrote them (oldest first) and the latest model card (None: the shards carry none)."""

    metas: dict[str, dict[bytes, bytes]]
    runs: list[dict]
    card: ModelCard | None

    @property
    def latest(self) -> dict:
        """The newest run's footer record ({} when none)."""
        return self.runs[-1] if self.runs else {}


def open_predictions(out: Location, need_card: bool = False) -> Opened:
    """Open the predict run in OUT for reading (the review app, an import, a report); anything else is
    refused with one line: a folder that cannot be read, one with no committed shard, shards of another
    schema, and (`need_card`) shards that carry no model card."""
    try:
        metas = footers(out)
    except (OSError, pa.ArrowInvalid) as e:
        raise KmnistError(f"cannot read the predictions in {out.uri}: {e}") from None
    if not metas:
        raise KmnistError(f"{out.uri} is not a predict output: it holds no predictions ({PREDICTIONS_DIR}/*.parquet; "
                          f"a run that has not committed a shard yet: see `kmnist-batch status`)")
    refuse_other_schema(out, metas, "reads")
    runs, card = run_metadata(metas)
    if need_card and card is None:
        raise KmnistError(f"{out.uri} is not a predict output: its shards carry no model card")
    return Opened(metas, runs, card)


def output_schema(table: pa.Table) -> pa.Schema:
    """SCHEMA, then any columns a manifest adds (page columns, pass-through columns) with their own types."""
    return pa.schema([*SCHEMA, *(f for f in table.schema if f.name not in SCHEMA.names)])


def encode_shard(table: pa.Table, metadata: dict[bytes, bytes]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table.cast(output_schema(table)).replace_schema_metadata(metadata), buf, compression="zstd")
    return buf.getvalue()


def publish(folder: Location, name: str, data: bytes) -> None:
    """Commit a shard: whole or not at all, replacing a shard of the same name."""
    storage.write_bytes_atomic(folder.join(name), data, fsync=True)


def read_shard(folder: Location, name: str, columns: list[str] | None = None) -> pa.Table:
    loc = folder.join(name)
    if columns is None:  # SCHEMA's types, and a manifest's columns as written
        schema = pq.read_schema(loc.path, filesystem=loc.fs)
        return pq.read_table(loc.path, filesystem=loc.fs, schema=pa.schema([*SCHEMA, *(f for f in schema if f.name not in SCHEMA.names)]))
    return pq.read_table(loc.path, filesystem=loc.fs, columns=columns)


def iter_tables(out: Location, columns: list[str]) -> Iterator[pa.Table]:
    """The committed rows, a shard at a time, only `columns`: memory bounded by one shard."""
    folder = predictions_dir(out)
    for name in shard_names(out):
        yield read_shard(folder, name, columns)


def read_predictions(out: str | os.PathLike | Location) -> pa.Table:
    """All committed rows in one table: for small outputs, tests and notebooks."""
    out = out if isinstance(out, Location) else storage.resolve(out)
    metas = footers(out)
    if not metas:
        return SCHEMA.empty_table()
    refuse_other_schema(out, metas, "reads")
    return pa.concat_tables([read_shard(predictions_dir(out), n) for n in metas])


def write_run_record(out: Location, run: dict) -> None:
    storage.write_bytes_atomic(predictions_dir(out).join(RUN_RECORD.format(run_id=run["run_id"])),
                               json_text(run).encode("utf-8"))


def latest_run_record(out: Location) -> dict:
    names = [n for n in storage.list_names(predictions_dir(out), ".json") if n.startswith("_run-")]
    return json.loads(storage.read_bytes(predictions_dir(out).join(names[-1]))) if names else {}


def recover(out: Location) -> None:
    """Tidy what a killed local run left (call with OUT locked): undo an overwrite swap that stopped
    between its two renames, and delete in-flight files, which were never part of the output."""
    if not out.local:
        return  # nothing is staged on an object store: a PUT that did not finish left no object
    staging, predictions = os.path.join(out.path, STAGING_DIR), predictions_dir(out).path
    replaced = sorted(n for n in os.listdir(staging) if n.startswith("replaced-")) if os.path.isdir(staging) else []
    if replaced and not os.path.exists(predictions):
        os.replace(os.path.join(staging, replaced[-1]), predictions)
    shutil.rmtree(staging, ignore_errors=True)
    if os.path.isdir(predictions):
        for name in os.listdir(predictions):
            if name.startswith(".") and name.endswith(".tmp"):
                os.unlink(os.path.join(predictions, name))


def staging_dir(out: Location, run_id: str) -> Location:
    """Where a local --overwrite run commits its first shard, before it replaces predictions/."""
    return Location(None, os.path.join(out.path, STAGING_DIR, f"new-{run_id}"), os.path.join(out.path, STAGING_DIR, f"new-{run_id}"))


def swap_in(out: Location, run_id: str, old_shards: list[str]) -> None:
    """Make the overwrite run's first shard the whole output; the earlier output goes (its report is
    withdrawn by the caller: reviews/report_set.py)."""
    if out.local:
        fresh = staging_dir(out, run_id).path
        os.makedirs(fresh, exist_ok=True)  # a run that found no files still replaces the old output
        replaced = os.path.join(out.path, STAGING_DIR, f"replaced-{run_id}")
        predictions = predictions_dir(out).path
        if os.path.exists(predictions):
            os.replace(predictions, replaced)
        os.replace(fresh, predictions)
        shutil.rmtree(os.path.join(out.path, STAGING_DIR), ignore_errors=True)
    else:
        for name in old_shards:
            storage.delete(predictions_dir(out).join(name))
