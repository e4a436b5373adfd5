"""The two stages a chunk goes through inside a worker (batch_infer/worker.py): decode, then predict.

Files are read and decoded here rather than with `ray.data.read_images`, which fails the whole job on
one bad file (or, with max_errored_blocks, silently drops every good image in the same block). Every
input row leaves each stage as exactly one output row; a bad file becomes a row with `error` set.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from kmnist_core.schema import KEY_COLUMNS, SCHEMA
from kmnist_core import storage
from kmnist_core.preprocess import DEFAULT_MAX_PIXELS, DecodeError, PreparedImage, decode_many
from kmnist_core.review_reasons import review_reasons


DECODED_SCHEMA = pa.schema([
    ("path", pa.string()), ("path_bytes", pa.binary()), ("rel_path", pa.string()), ("input_root", pa.string()),
    ("pixels", pa.binary()),  # size*size uint8, light ink on dark; empty on error
    ("sha256", pa.string()), ("size_bytes", pa.int64()), ("width", pa.int32()), ("height", pa.int32()),
    ("inverted", pa.bool_()), ("blank", pa.bool_()), ("ink_x", pa.int32()), ("ink_y", pa.int32()),
    ("ink_w", pa.int32()), ("ink_h", pa.int32()), ("error", pa.string()), ("error_kind", pa.string()),
])
DECODED_FIELDS = ("pixels", "sha256", "size_bytes", "width", "height", "inverted", "blank", "ink_x", "ink_y", "ink_w",
                  "ink_h", "error", "error_kind")
# Kinds a file can show for a while and then lose: still being copied (truncated), a storage hiccup
# such as EIO or ESTALE on NFS (unreadable). The others are properties of the bytes and stay.
TRANSIENT_KINDS = frozenset({"unreadable", "truncated"})
NO_IMAGE = (None,) * 8  # width .. ink_h of a file that did not decode


# Tests hold a run busy for exactly as long as they need (tests/crop_tree.py, `hold_file`): with
# KMNIST_BATCH_TEST_HOLD=1 in the environment, a file named *.hold.png is read only once a file of the
# same name plus ".release" exists. Unset in real runs, where it costs nothing.
TEST_HOLD = os.environ.get("KMNIST_BATCH_TEST_HOLD") == "1"
HOLD_SUFFIX = b".hold.png"


def wait_for_release(path: bytes) -> None:
    marker = path + b".release"
    exists = (lambda: storage.exists(storage.resolve(marker.decode()))) if storage.is_uri(path) else \
        (lambda: os.path.exists(marker))
    while not exists():
        time.sleep(0.02)


def read_file(path: bytes) -> bytes | OSError:
    """A file's bytes (a local name, or an object-store URI), or the error reading it."""
    if TEST_HOLD and path.endswith(HOLD_SUFFIX):
        wait_for_release(path)
    try:
        if storage.is_uri(path):
            return storage.read_bytes(storage.resolve(path.decode()))
        return read_local(path)
    except OSError as e:
        return e


def read_local(path: bytes) -> bytes:
    """A local file's bytes, read to its end: a first read of its size, then reads until one returns
    nothing (a network file system may return less than asked; a file may grow meanwhile). 7.1 against
    9.4 µs a crop for open().read(), whose buffered file object costs more than the reads
    (bench/read_local.py). Not a fixed first read of 64 KB, which saves the fstat (~1.2 µs) but leaves each
    crop's bytes in a 64 KB allocation shrunk in place: the holes between them cost a Ray chunk worker
    ~20 MB at 1,000,000 crops (tried 2026-12-08)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = [os.read(fd, os.fstat(fd).st_size or 1 << 16)]
        while parts[-1]:
            parts.append(os.read(fd, 1 << 16))
        return parts[0] if len(parts) == 2 else b"".join(parts)
    finally:
        os.close(fd)


def read_files(paths: list[bytes]) -> list[bytes | OSError]:
    """Local files are read in turn; object-store reads wait on the network, so they overlap."""
    if not any(storage.is_uri(p) for p in paths):
        return [read_file(p) for p in paths]
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(read_file, paths))


def decode_files(data: list[bytes | OSError], input_size: int, max_pixels: int) -> list[tuple]:
    """Each file's DECODED_FIELDS: model-ready pixels and provenance, or an error and its kind. The files
    read are decoded together (decode_many: crops of one shape share one pass of array arithmetic)."""
    readable = [i for i, d in enumerate(data) if not isinstance(d, OSError)]
    images = dict(zip(readable, decode_many([data[i] for i in readable], input_size, max_pixels)))
    results = []
    for i, d in enumerate(data):
        if isinstance(d, OSError):
            results.append((b"", None, None, *NO_IMAGE, f"unreadable: {d.strerror or d}", "unreadable"))
        else:
            results.append(decoded_fields(images[i], hashlib.sha256(d).hexdigest(), len(d)))
    return results


def decoded_fields(img: PreparedImage | DecodeError, sha: str | None, size: int | None) -> tuple:
    """One row's DECODED_FIELDS from its prepared image or decode error (and its file's hash and size)."""
    if isinstance(img, DecodeError):
        return (b"", sha, size, *NO_IMAGE, str(img), img.kind)
    ink = img.ink_box or (None,) * 4
    return (img.pixels.tobytes(), sha, size, img.width, img.height, img.inverted, img.blank, *ink, None, None)


def decode_batch(batch: pa.Table, input_size: int, max_pixels: int = DEFAULT_MAX_PIXELS, retries: int = 0,
                 backoff_s: float = 0.5) -> pa.Table:
    """Read and decode each file; files failing with a transient kind are read again up to `retries`
    times, after backoff_s, 2*backoff_s, ... (one wait per batch, not per file). Arrow in and out, so
    nulls stay nulls (numpy batches would turn them into NaN)."""
    paths = batch.column("path_bytes").to_pylist()
    results = decode_files(read_files(paths), input_size, max_pixels)
    for attempt in range(retries):
        again = [i for i, r in enumerate(results) if r[-1] in TRANSIENT_KINDS]
        if not again:
            break
        time.sleep(backoff_s * 2**attempt)
        for i, result in zip(again, decode_files(read_files([paths[i] for i in again]), input_size, max_pixels)):
            results[i] = result
    return decoded_table(batch, results)


def decoded_table(batch: pa.Table, results: list[tuple]) -> pa.Table:
    """The listing's key columns, each row's DECODED_FIELDS, then the listing's other columns (a
    manifest's page and pass-through columns, batch_infer/manifest.py) unchanged."""
    columns = {name: batch.column(name).cast(DECODED_SCHEMA.field(name).type)
               for name in KEY_COLUMNS}
    for name, values in zip(DECODED_FIELDS, zip(*results) if results else [[]] * len(DECODED_FIELDS)):
        columns[name] = pa.array(values, type=DECODED_SCHEMA.field(name).type)
    extra = [f for f in batch.schema if f.name not in columns]
    columns.update({f.name: batch.column(f.name) for f in extra})
    return pa.Table.from_pydict(columns, schema=pa.schema([*DECODED_SCHEMA, *extra]))


def pixel_array(column: pa.ChunkedArray, size: int) -> np.ndarray:
    """The decoded rows' pixels as (n_ok, size, size) uint8, straight from the Arrow buffers.

    Error rows hold empty binaries, so the data buffer is exactly the good rows' pixels, in order.
    """
    col = column.combine_chunks()
    offsets = np.frombuffer(col.buffers()[1], np.int32)[col.offset : col.offset + len(col) + 1]
    data = np.frombuffer(col.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    return data.reshape(-1, size, size)


class RowBuilder:
    """Holds one loaded model; turns decoded batches into finished output rows (an Arrow table), decided
    under the model's policy (kmnist_core/policy.py) and nothing else."""

    def __init__(self, model, run_id: str, node_id: str | None, topk: int = 3):
        self.model = model
        self.policy = model.policy
        self.run_id = run_id
        self.topk = min(topk, len(self.model.classes))
        self.node_id = node_id
        self.chars = np.array(self.model.classes.chars, dtype=object)
        self.codepoints = np.array(self.model.classes.codepoints, dtype=object)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        ok = batch.column("error").is_null().to_numpy(zero_copy_only=False)
        blank = batch.column("blank").fill_null(False).to_numpy(zero_copy_only=False)
        predicted = ok & ~blank  # blank crops decode fine but hold no character: no prediction
        size = self.model.input_size
        probs = np.zeros((n, len(self.chars)), np.float32)
        ood = np.zeros(n, np.float32)
        unknown = np.zeros(n, bool)
        fp32_rows = np.full(n, self.model.precision == "fp32")
        if ok.any():  # blank rows' pixels are background; run with the rest so the buffer stays one array
            a = self.model.assess(pixel_array(batch.column("pixels"), size))
            probs[ok], ood[ok], unknown[ok], fp32_rows[ok] = a.probabilities, a.ood_score, a.unknown, a.fp32_rows
        top = np.argsort(-probs, axis=1, kind="stable")[:, : self.topk]
        top_p = np.take_along_axis(probs, top, axis=1)
        confidence = np.where(predicted, top_p[:, 0], np.nan)
        margin = top_p[:, 0] - (top_p[:, 1] if self.topk > 1 else 0)
        reasons = review_reasons(~ok, blank, unknown & predicted, confidence, self.policy.review_below)
        null_unless_predicted = lambda values, type_: pa.array(values, type=type_, mask=~predicted)  # noqa: E731
        # Lists built from flat arrays and offsets: no Python object per row.
        offsets = pa.array(np.arange(0, (n + 1) * self.topk, self.topk, dtype=np.int32))
        list_column = lambda values, type_: pa.ListArray.from_arrays(  # noqa: E731
            offsets, pa.array(values.ravel(), type=type_), mask=pa.array(~predicted))
        columns = {name: batch.column(name) for name in (*KEY_COLUMNS, "sha256", "size_bytes", "width", "height",
                                                         "inverted", "ink_x", "ink_y", "ink_w", "ink_h")}
        columns.update({
            "pred_index": null_unless_predicted(top[:, 0].astype(np.int32), pa.int32()),
            "pred_char": null_unless_predicted(self.chars[top[:, 0]], pa.string()),
            "pred_codepoint": null_unless_predicted(self.codepoints[top[:, 0]], pa.string()),
            "confidence": null_unless_predicted(top_p[:, 0], pa.float32()),
            "topk_indices": list_column(top.astype(np.int32), pa.int32()),
            "topk_chars": list_column(self.chars[top], pa.string()),
            "topk_confidences": list_column(top_p, pa.float32()),
            "margin": null_unless_predicted(margin.astype(np.float32), pa.float32()),
            "ood_score": null_unless_predicted(ood, pa.float32()),
            "needs_review": pa.array(reasons != None, pa.bool_()),  # noqa: E711 (elementwise on an object array)
            "review_reason": pa.array(reasons, pa.string()),
            "error": batch.column("error"),
            "error_kind": batch.column("error_kind"),
            "model_id": pa.array([self.model.model_id] * n, pa.string()),
            "precision": pa.array(np.where(fp32_rows, "fp32", self.model.precision), pa.string()),
            "run_id": pa.array([self.run_id] * n, pa.string()),
            "node_id": pa.array([self.node_id] * n, pa.string()),
        })
        extra = [f for f in batch.schema if f.name not in DECODED_SCHEMA.names]
        columns.update({f.name: batch.column(f.name) for f in extra})  # a manifest's columns, after SCHEMA's
        return pa.Table.from_pydict(columns, schema=pa.schema([*SCHEMA, *extra]))
