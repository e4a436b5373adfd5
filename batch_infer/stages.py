"""The two Ray Data stages: decode (stateless tasks) and predict (actors holding the model).

Files are read and decoded here rather than with `ray.data.read_images`, which fails the whole job on
one bad file (or, with max_errored_blocks, silently drops every good image in the same block). Every
input row leaves each stage as exactly one output row; a bad file becomes a row with `error` set.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pyarrow as pa

from batch_infer.schema import SCHEMA
from kmnist_core.preprocess import DEFAULT_MAX_PIXELS, DecodeError, decode_bytes


DECODED_SCHEMA = pa.schema([
    ("path", pa.string()), ("path_bytes", pa.binary()), ("rel_path", pa.string()), ("input_root", pa.string()),
    ("pixels", pa.binary()),  # size*size uint8, light ink on dark; empty on error
    ("sha256", pa.string()), ("size_bytes", pa.int64()), ("width", pa.int32()), ("height", pa.int32()),
    ("inverted", pa.bool_()), ("error", pa.string()), ("error_kind", pa.string()),
])
DECODED_FIELDS = ("pixels", "sha256", "size_bytes", "width", "height", "inverted", "error", "error_kind")
# Kinds a file can show for a while and then lose: still being copied (truncated), a storage hiccup
# such as EIO or ESTALE on NFS (unreadable). The others are properties of the bytes and stay.
TRANSIENT_KINDS = frozenset({"unreadable", "truncated"})


def decode_file(path: bytes, input_size: int, max_pixels: int) -> tuple:
    """One file's DECODED_FIELDS: model-ready pixels and provenance, or an error and its kind."""
    sha = size = None
    try:
        with open(path, "rb") as f:
            data = f.read()
        sha, size = hashlib.sha256(data).hexdigest(), len(data)
        img = decode_bytes(data, input_size, max_pixels)
        return img.pixels.tobytes(), sha, size, img.width, img.height, img.inverted, None, None
    except DecodeError as e:
        return b"", sha, size, None, None, None, str(e), e.kind
    except OSError as e:
        return b"", sha, size, None, None, None, f"unreadable: {e.strerror or e}", "unreadable"


def decode_batch(batch: pa.Table, input_size: int, max_pixels: int = DEFAULT_MAX_PIXELS, retries: int = 0,
                 backoff_s: float = 0.5) -> pa.Table:
    """Read and decode each file; files failing with a transient kind are read again up to `retries`
    times, after backoff_s, 2*backoff_s, ... (one wait per batch, not per file). Arrow in and out, so
    nulls stay nulls (numpy batches would turn them into NaN)."""
    paths = batch.column("path_bytes").to_pylist()
    results = [decode_file(p, input_size, max_pixels) for p in paths]
    for attempt in range(retries):
        again = [i for i, r in enumerate(results) if r[-1] in TRANSIENT_KINDS]
        if not again:
            break
        time.sleep(backoff_s * 2**attempt)
        for i in again:
            results[i] = decode_file(paths[i], input_size, max_pixels)
    columns = {name: batch.column(name).cast(DECODED_SCHEMA.field(name).type)
               for name in ("path", "path_bytes", "rel_path", "input_root")}
    for name, values in zip(DECODED_FIELDS, zip(*results) if results else [[]] * len(DECODED_FIELDS)):
        columns[name] = pa.array(values, type=DECODED_SCHEMA.field(name).type)
    return pa.Table.from_pydict(columns, schema=DECODED_SCHEMA)


def pixel_array(column: pa.ChunkedArray, size: int) -> np.ndarray:
    """The decoded rows' pixels as (n_ok, size, size) uint8, straight from the Arrow buffers.

    Error rows hold empty binaries, so the data buffer is exactly the good rows' pixels, in order.
    """
    col = column.combine_chunks()
    offsets = np.frombuffer(col.buffers()[1], np.int32)[col.offset : col.offset + len(col) + 1]
    data = np.frombuffer(col.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    return data.reshape(-1, size, size)


class PredictorActor:
    """Holds one loaded model; turns decoded batches into finished output rows (an Arrow table)."""

    def __init__(self, card: dict, weights_ref: list, run_id: str, review_below: float, device: str = "cpu",
                 threads: int = 0, topk: int = 3):
        import ray
        import torch

        from kmnist_core.model_dir import build_predictor

        if threads:
            torch.set_num_threads(threads)
        # The weights travel through the object store, so workers need no access to the model directory.
        # (Wrapped in a list so Ray does not inline them into the actor's constructor arguments.)
        self.model = build_predictor(card, ray.get(weights_ref[0]), device)
        self.run_id = run_id
        self.review_below = review_below
        self.topk = min(topk, len(self.model.classes))
        self.node_id = ray.get_runtime_context().get_node_id()
        self.chars = np.array(self.model.classes.chars, dtype=object)
        self.codepoints = np.array(self.model.classes.codepoints, dtype=object)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        ok = batch.column("error").is_null().to_numpy(zero_copy_only=False)
        size = self.model.input_size
        probs = np.zeros((n, len(self.chars)), np.float32)
        if ok.any():
            probs[ok] = self.model.probabilities(pixel_array(batch.column("pixels"), size))
        top = np.argsort(-probs, axis=1, kind="stable")[:, : self.topk]
        top_p = np.take_along_axis(probs, top, axis=1)
        confidence = top_p[:, 0]
        margin = top_p[:, 0] - (top_p[:, 1] if self.topk > 1 else 0)
        null_if_error = lambda values, type_: pa.array(values, type=type_, mask=~ok)  # noqa: E731
        # Lists built from flat arrays and offsets: no Python object per row.
        offsets = pa.array(np.arange(0, (n + 1) * self.topk, self.topk, dtype=np.int32))
        list_column = lambda values, type_: pa.ListArray.from_arrays(  # noqa: E731
            offsets, pa.array(values.ravel(), type=type_), mask=pa.array(~ok))
        columns = {name: batch.column(name) for name in
                   ("path", "path_bytes", "rel_path", "input_root", "sha256", "size_bytes", "width", "height", "inverted")}
        columns.update({
            "pred_index": null_if_error(top[:, 0].astype(np.int32), pa.int32()),
            "pred_char": null_if_error(self.chars[top[:, 0]], pa.string()),
            "pred_codepoint": null_if_error(self.codepoints[top[:, 0]], pa.string()),
            "confidence": null_if_error(confidence, pa.float32()),
            "topk_indices": list_column(top.astype(np.int32), pa.int32()),
            "topk_chars": list_column(self.chars[top], pa.string()),
            "topk_confidences": list_column(top_p, pa.float32()),
            "margin": null_if_error(margin.astype(np.float32), pa.float32()),
            "needs_review": pa.array(~ok | (confidence < self.review_below), pa.bool_()),
            "error": batch.column("error"),
            "error_kind": batch.column("error_kind"),
            "model_id": pa.array([self.model.model_id] * n, pa.string()),
            "run_id": pa.array([self.run_id] * n, pa.string()),
            "node_id": pa.array([self.node_id] * n, pa.string()),
        })
        return pa.Table.from_pydict(columns, schema=SCHEMA)
