"""One chunk end to end, inside a worker: read and decode its files, predict, and commit its shard.

The same `ChunkWorker` runs in the driver's own process for small local jobs and as a Ray actor for
everything else (batch_infer/dispatch.py), so both paths give the same rows. The driver sends only
the chunk's listing and gets back a few counts; rows never pass through it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from kmnist_core import predictions as output
from kmnist_core.arrow_memory import lean_arrow
from batch_infer.box_stage import decode_box_batch, page_batches
from kmnist_core.schema import KEY_COLUMNS, SCHEMA
from batch_infer.stages import RowBuilder, decode_batch
from kmnist_core import storage
from kmnist_core.model_dir import build_predictor
from kmnist_core.predictor import Predictor
from kmnist_core.policy import DecisionPolicy, PolicyDisagrees
from kmnist_core.precision import ModelBundle
from kmnist_core.review_reasons import REVIEW_REASONS


@dataclass(frozen=True)
class JobSpec:
    """What every worker of a run needs; small, sent once per worker."""

    out: str  # OUT, a local path or a URI
    run_id: str
    policy: DecisionPolicy  # the driver's: precision and thresholds every worker decides with (or refuses)
    read_retries: int
    retry_backoff_s: float
    batch_size: int
    metadata: dict[bytes, bytes]  # the footer every shard carries (kmnist_core/schema.py footer)


@dataclass(frozen=True)
class ChunkTask:
    chunk_id: str
    first: bytes  # the chunk's range of the listing (recorded in its shard's footer)
    last: bytes
    listing: pa.Table  # the files to predict (batch_infer/chunks.py LISTING_SCHEMA)
    folder: str = ""  # where to commit; "" = OUT/predictions
    redo_kinds: frozenset | None = None  # set: re-read this committed chunk's error rows of these kinds
    redo_all_errors: bool = False  # with redo: every error row


def counts(table: pa.Table) -> dict:
    """What the driver learns of a committed chunk."""
    by_reason = output.value_counts(table.column("review_reason"))
    return {"errors_by_kind": output.value_counts(table.column("error_kind")),
            "review_by_reason": {r: by_reason.get(r, 0) for r in REVIEW_REASONS}}


class ChunkWorker:
    """Predicts and commits chunks under the driver's policy. A worker that cannot follow it (its CPU fails
    the int8 probe the driver's passed) fails every chunk it is given, loudly, rather than deciding its
    rows under other thresholds than the run records."""

    def __init__(self, bundle: ModelBundle, job: JobSpec, threads: int = 0, node_id: str | None = None,
                 predictor: Predictor | None = None):
        """`predictor`: one built in this process under the job's policy (an in-process run: the driver's);
        else the worker builds its own from `bundle`."""
        lean_arrow()
        self.job = job
        self.input_size = bundle.card.input_size
        self.refusal: PolicyDisagrees | None = None
        try:
            predictor = predictor or build_predictor(bundle, threads=threads or None, policy=job.policy)
            self.rows = RowBuilder(predictor, job.run_id, node_id)
        except PolicyDisagrees as e:
            self.refusal = e
        self.out = storage.resolve(job.out)

    def predict(self, listing: pa.Table) -> pa.Table:
        """Output rows for the listed files, a model batch at a time (bounds the worker's memory). Box rows
        of a page manifest go in batches of whole pages, so each page is decoded once."""
        if "box_x" in listing.column_names:
            decode, slices = decode_box_batch, page_batches(listing, self.job.batch_size)
        else:
            decode = decode_batch
            slices = [(start, self.job.batch_size) for start in range(0, listing.num_rows, self.job.batch_size)]
        parts = [self.rows(decode(listing.slice(start, length), self.input_size, retries=self.job.read_retries,
                                  backoff_s=self.job.retry_backoff_s))
                 for start, length in slices]
        return pa.concat_tables(parts) if parts else SCHEMA.empty_table()

    def run(self, task: ChunkTask) -> dict:
        """Predict and commit one chunk; returns its counts."""
        if self.refusal is not None:
            raise PolicyDisagrees(f"chunk {task.chunk_id}: {self.refusal}")
        started = time.perf_counter()
        folder = storage.resolve(task.folder) if task.folder else output.predictions_dir(self.out)
        name = output.shard_name(task.chunk_id)
        if task.redo_kinds is not None:
            old = output.read_shard(folder, name)
            kinds = old.column("error_kind")
            redo = kinds.is_valid() if task.redo_all_errors else pc.is_in(kinds, value_set=pa.array(sorted(task.redo_kinds)))
            redo = pc.fill_null(redo, False)
            again = old.filter(redo)
            # The listing columns: the keys plus any a manifest carried (page, box, pass-through), kept as written.
            listing = [c for c in again.column_names if c in KEY_COLUMNS or c not in SCHEMA.names]
            new = self.predict(again.select(listing))
            table = pa.concat_tables([old.filter(pc.invert(redo)), new])
        else:
            table = new = self.predict(task.listing)
        meta = {**self.job.metadata, output.CHUNK_KEY: output.chunk_meta(task.chunk_id, task.first, task.last, table)}
        output.publish(folder, name, output.encode_shard(table, meta))
        redone = task.redo_kinds is not None
        return {"chunk_id": task.chunk_id, "rows": 0 if redone else new.num_rows, "replaced": new.num_rows if redone else 0,
                **counts(new), "seconds": time.perf_counter() - started}
