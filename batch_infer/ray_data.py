"""kmnist-batch as a stage in a Ray Data pipeline of your own (docs/ray_data.md).

`CropPredictor` is a callable class for `ds.map_batches(..., compute=ActorPoolStrategy(...),
batch_format="pyarrow")`: each row's crop (a `bytes` column of encoded image bytes, an `image` column of
arrays or Hugging Face-style {bytes, path} structs, or only a `path` to read) becomes one row of the
prediction columns of kmnist_core/schema.py, decoded and flagged for review exactly as `kmnist-batch
predict` does (the same decode_files / RowBuilder). A crop that cannot be decoded is a row with `error`
set, never an exception. The row's other columns pass through unchanged, after the prediction columns.

`predict_dataset` is the one-call form (the model travels to the actors through the object store, the
pool leaves CPUs for Ray Data's reads); `write_predictions` writes its rows as the CLI's Parquet files.

Keys: a `path` column becomes the rows' `path` (text; a binary column's exact bytes are kept in
`path_bytes` and shown escaped in `path`, batch_infer/paths.py). There is no input root, so `rel_path`
repeats `path` and `input_root` is "". Without a `path` column the four key columns are empty: rows are
identified by the columns passed through (an id of your own).

This module is only for Ray Data users: nothing on the CLI's path imports it (or ray.data).
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch_infer.dispatch import pool_size
from batch_infer.options import PredictOptions
from batch_infer.paths import name_text
from batch_infer.stages import DECODED_SCHEMA, RowBuilder, decode_batch, decode_files, decoded_fields, decoded_table
from batch_infer.worker import counts
from kmnist_core import out_lock, predictions, storage
from kmnist_core.errors import KmnistError
from kmnist_core.policy import DecisionPolicy, PolicyDisagrees
from kmnist_core.precision import ModelBundle
from kmnist_core.preprocess import DEFAULT_MAX_PIXELS, DecodeError, PreparedImage, prepare_image
from kmnist_core.run_record import decided_by, new_run_id
from kmnist_core.schema import FOOTER_RUN, KEY_COLUMNS, SCHEMA, footer

if TYPE_CHECKING:
    import ray
    import ray.data

SOURCES = ("bytes", "image")  # where a row's crop is, in this order of preference; else its `path` is read
# Names an input column cannot have: they are the output's own (or the decoded stage's).
RESERVED = frozenset(SCHEMA.names) | frozenset(DECODED_SCHEMA.names)
# The options of `predict` that mean something for a Dataset (PredictOptions: same defaults and checks).
DATASET_OPTIONS = ("precision", "batch_size", "workers", "cpus_per_worker", "gpus_per_worker", "review_below",
                   "ood_threshold")
# Ray Data's read and write tasks take 1 logical CPU each: the actor pool leaves this share of the
# cluster's CPUs (at least one) free for them. On 2 CPUs, two actors at 1 CPU each leave none and the
# job waits for ever, logging only that it is backpressured (measured, Ray 2.60).
TASK_CPU_SHARE = 0.25


def key_columns(batch: pa.Table) -> dict[str, list]:
    """The four key columns for the batch's rows, from its `path` column (text or exact bytes) or empty."""
    n = batch.num_rows
    if "path" not in batch.column_names:
        return {"path": [""] * n, "path_bytes": [b""] * n, "rel_path": [""] * n, "input_root": [""] * n}
    column = batch.column("path")
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        raw = [p or b"" for p in column.to_pylist()]
        text = [name_text(p) for p in raw]
    else:
        text = [p or "" for p in column.cast(pa.string()).to_pylist()]
        raw = [p.encode("utf-8") for p in text]
    return {"path": text, "path_bytes": raw, "rel_path": text, "input_root": [""] * n}


def crop_source(batch: pa.Table) -> str:
    for name in SOURCES:
        if name in batch.column_names:
            return name
    if "path" in batch.column_names:
        return "path"
    raise KmnistError(f"CropPredictor needs a `bytes` column (encoded image bytes), an `image` column or a `path` "
                      f"column to read; the batch has {', '.join(batch.column_names) or 'no columns'}")


def listing(batch: pa.Table, source: str) -> pa.Table:
    """The key columns, then every column but the crop's source and `path`, unchanged."""
    passed = [f for f in batch.schema if f.name not in (source, "path")]
    clash = sorted(f.name for f in passed if f.name in RESERVED)
    if clash:
        raise KmnistError(f"input columns {', '.join(clash)} have the names of kmnist-batch's own columns; "
                          f"rename them first (ds.rename_columns)")
    columns = {name: pa.array(values, DECODED_SCHEMA.field(name).type) for name, values in key_columns(batch).items()}
    columns.update({f.name: batch.column(f.name) for f in passed})
    return pa.Table.from_pydict(columns, schema=pa.schema([*(DECODED_SCHEMA.field(k) for k in KEY_COLUMNS), *passed]))


def encoded_bytes(column: pa.ChunkedArray) -> list[bytes] | None:
    """Each row's encoded image bytes when the column holds them (binary, or a Hugging Face image struct
    {bytes, path}); None when it holds arrays. A null is empty bytes (an `empty` error row)."""
    if pa.types.is_struct(column.type) and column.type.get_field_index("bytes") >= 0:
        column = pc.struct_field(column, "bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        return None
    return [b or b"" for b in column.to_pylist()]


def image_arrays(column: pa.ChunkedArray) -> list:
    """Each row's image as a numpy array: Ray's tensor columns (as read_images gives: one shape, or
    variable-shaped) and nested lists."""
    arrays: list = []
    for chunk in column.chunks:
        if isinstance(chunk.type, pa.ExtensionType):  # Ray's tensor types convert themselves, row by row
            arrays.extend(chunk.to_numpy(zero_copy_only=False))
        else:
            arrays.extend(None if v is None else np.asarray(v) for v in chunk.to_pylist())
    return arrays


def prepare_crop_array(array: np.ndarray | None, size: int) -> PreparedImage | DecodeError:
    """An image array as the model reads it: through PIL as a decoded file would be (any mode, size,
    polarity and margins), or the reason it cannot be."""
    from PIL import Image

    if array is None or not np.size(array):
        return DecodeError("empty", "no image")
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:  # (H, W, 1): grey
        array = array[..., 0]
    elif array.ndim == 3 and array.shape[0] == 1 and array.shape[-1] not in (3, 4):
        array = array[0]  # grey, padded to (1, H, W) by Ray where a column mixes grey and colour images
    try:
        return prepare_image(Image.fromarray(array), size)
    except DecodeError as e:
        return e
    except (TypeError, ValueError) as e:  # a shape or dtype PIL has no mode for
        return DecodeError("bad_array", f"array of shape {array.shape}, {array.dtype}: {e}")


def decode(batch: pa.Table, input_size: int) -> pa.Table:
    """The decoded stage's table (batch_infer/stages.py) for a batch of crops in any of the input forms."""
    source = crop_source(batch)
    keys = listing(batch, source)
    if source == "path":  # read the files as predict does: local names or object-store URIs
        return decode_batch(keys, input_size)
    column = batch.column(source)
    data = encoded_bytes(column)
    if data is not None:
        return decoded_table(keys, decode_files(data, input_size, DEFAULT_MAX_PIXELS))
    return decoded_table(keys, [decoded_fields(prepare_crop_array(a, input_size), None, None)
                                for a in image_arrays(column)])


def footer_metadata(rows: RowBuilder) -> dict[bytes, bytes]:
    """What every table CropPredictor returns carries in its schema metadata, and write_predictions puts in
    each shard's footer: the CLI's footer (kmnist_core/schema.py), with the policy its rows were decided by."""
    return footer({**decided_by(rows.run_id, rows.model.model_id, rows.policy), "executor": "ray-data"},
                  rows.model.card.raw)


class CropPredictor:
    """Crops in, prediction rows out: one row per input row, for `ds.map_batches(CropPredictor,
    fn_constructor_kwargs={"model": ...}, compute=ray.data.ActorPoolStrategy(size=n), batch_format="pyarrow")`.

    `model`: a ModelBundle, or an ObjectRef of one (how predict_dataset sends it: through the object store,
    so actors need no access to the model directory), or a model directory / "default" loaded in each
    actor at `precision` on `device` ("cuda" with num_gpus). `batch_size`: crops per model call;
    `threads`: torch and ONNX Runtime threads (0: Ray's default for the actor, OMP_NUM_THREADS);
    `review_below`, `ood_threshold`: None for the model's own thresholds; `run_id`: the rows' run_id (None:
    one per actor). `policy`: the decision policy of the pipeline's driver (predict_dataset's), which the
    actor follows, or refuses, failing each batch, where its CPU fails the int8 probe the driver's passed;
    without one, each actor decides its own (its probe, the thresholds given). The footer records the
    policy the rows were decided by.
    """

    def __init__(self, model: str | os.PathLike | ModelBundle | ray.ObjectRef = "default", *, precision: str = "auto",
                 device: str = "cpu", batch_size: int = 1024, threads: int = 0, review_below: float | None = None,
                 ood_threshold: float | None = None, run_id: str | None = None, policy: DecisionPolicy | None = None):
        import ray
        from kmnist_core.model_dir import build_predictor, load_bundle

        if isinstance(model, ray.ObjectRef):
            model = ray.get(model)
        bundle = model if isinstance(model, ModelBundle) else load_bundle(model, precision, device)
        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        self.input_size = bundle.card.input_size
        self.batch_size = batch_size
        self.refusal: PolicyDisagrees | None = None
        try:
            predictor = build_predictor(bundle, threads=threads or None, policy=policy, review_below=review_below,
                                        ood_threshold=ood_threshold)
        except PolicyDisagrees as e:
            self.refusal = e
            return
        self.rows = RowBuilder(predictor, run_id or new_run_id(), node_id)
        self.metadata = footer_metadata(self.rows)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.refusal is not None:
            raise self.refusal
        if not isinstance(batch, pa.Table):
            raise TypeError(f"CropPredictor takes pyarrow batches: map_batches(..., batch_format=\"pyarrow\"), "
                            f"got {type(batch).__name__}")
        # Model batches of batch_size bound the actor's memory whatever batch Ray Data hands over; an
        # empty batch still goes through once, so it returns the output columns.
        parts = [self.rows(decode(batch.slice(start, self.batch_size), self.input_size))
                 for start in range(0, max(batch.num_rows, 1), self.batch_size)]
        return pa.concat_tables(parts).replace_schema_metadata(self.metadata)


def actor_pool(ray, opts: PredictOptions) -> tuple[int, float]:
    """How many actors, and the logical CPUs each reserves. As many actors as predict's pool would have
    (batch_infer/dispatch.py pool_size), but together they reserve at most the cluster's CPUs less
    TASK_CPU_SHARE (at least one), so Ray Data's read and write tasks always find room."""
    workers = opts.workers or pool_size(ray, opts.cpus_per_worker, opts.gpus_per_worker)
    cpus = ray.cluster_resources().get("CPU", 1.0)
    for_actors = cpus - max(1.0, cpus * TASK_CPU_SHARE)
    return workers, max(0.01, min(opts.cpus_per_worker, for_actors / workers))


def predict_dataset(ds: "ray.data.Dataset", model: str | os.PathLike = "default", **options) -> "ray.data.Dataset":
    """`ds` with each row's crop replaced by the prediction columns (see CropPredictor), lazily, as Ray
    Data datasets are. `options` are predict's, with the same defaults and checks: precision, batch_size,
    workers, cpus_per_worker, gpus_per_worker, review_below, ood_threshold.

    The model is loaded and checked here, once (a model that cannot load fails now, not in every actor),
    and reaches the actors through the object store. Output order follows Ray Data's (not the input's
    unless `DataContext.execution_options.preserve_order`): join on `path` or a column of your own.
    """
    unknown = sorted(set(options) - set(DATASET_OPTIONS))
    if unknown:
        raise TypeError(f"predict_dataset() takes the options {', '.join(DATASET_OPTIONS)}; not {', '.join(unknown)}")
    opts = PredictOptions(model=os.fspath(model), **options)
    opts.validate()
    from kmnist_core.model_dir import load_for_run
    from kmnist_core.ray_runtime import init_ray

    ray, _ = init_ray()
    import ray.data

    # The pipeline's policy, decided once here (as predict's driver does) and followed by every actor.
    bundle, driver = load_for_run(opts.model_request())
    policy = driver.policy
    workers, cpus = actor_pool(ray, opts)
    threads = max(1, int(opts.cpus_per_worker)) if bundle.device == "cpu" else 1  # as predict's workers
    return ds.map_batches(
        CropPredictor, batch_size=opts.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs={"model": ray.put(bundle), "batch_size": opts.batch_size, "threads": threads,
                               "policy": policy, "run_id": new_run_id()},
        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus, num_gpus=opts.gpus_per_worker or None)


def plain_column(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """An extension-typed column (Ray's tensor columns) as nested lists: plain Arrow, which every reader
    takes; Ray's own Parquet writer keeps its extension type, which pandas without Ray reads as opaque bytes."""
    if not isinstance(column.type, pa.ExtensionType):
        return column
    rows = [v for chunk in column.chunks for v in chunk.to_numpy(zero_copy_only=False)]
    return pa.chunked_array([pa.array([None if v is None else np.asarray(v).tolist() for v in rows])])


def write_shard(batch: pa.Table, folder: str) -> pa.Table:
    """Commit one batch of CropPredictor's rows as a Parquet shard (whole or not at all, kmnist_core/predictions.py);
    returns its name and counts."""
    meta = batch.schema.metadata or {}
    if FOOTER_RUN not in meta:
        raise KmnistError("write_predictions writes CropPredictor's rows; this batch does not carry their "
                          f"kmnist_batch footer (columns: {', '.join(batch.column_names)})")
    stats = {"shard": [], "rows": [], "counts": []}
    if batch.num_rows:
        table = pa.table({name: plain_column(batch.column(name)) for name in batch.column_names})
        name = f"part-{uuid.uuid4().hex}.parquet"
        predictions.publish(storage.resolve(folder), name, predictions.encode_shard(table, meta))
        stats = {"shard": [name], "rows": [table.num_rows], "counts": [json.dumps(counts(table))]}
    return pa.table(stats, schema=pa.schema([("shard", pa.string()), ("rows", pa.int64()), ("counts", pa.string())]))


def write_predictions(ds: "ray.data.Dataset", out: str | os.PathLike, rows_per_file: int = 4096) -> dict:
    """Write CropPredictor's rows (predict_dataset's output) into OUT/predictions/ as `kmnist-batch predict`
    does: Parquet shards of plain Arrow types (Ray's tensor columns as nested lists) with the kmnist_batch.*
    footer, each committed whole, so pandas, pyarrow, DuckDB or `kmnist-batch report OUT` read them as the
    CLI's output. OUT must hold no predictions yet; it is locked while the shards are written.

    Unlike predict's shards, these are named at random: a write task that Ray retries after it committed
    leaves its rows twice (as Ray Data's own sinks do). Returns rows, shards and the error and review counts."""
    from batch_infer.job import check_out, make_out
    from kmnist_core.ray_runtime import init_ray

    if rows_per_file < 1:
        raise KmnistError("rows_per_file must be >= 1")
    init_ray()
    loc = storage.resolve(out)
    check_out(loc)
    make_out(loc)
    with out_lock.hold(loc, new_run_id()):
        if predictions.shard_names(loc):
            raise KmnistError(f"{loc.uri} already holds predictions; write to an OUT without any")
        folder = predictions.predictions_dir(loc)
        storage.make_dirs(folder)
        written = ds.map_batches(write_shard, fn_kwargs={"folder": folder.uri}, batch_size=rows_per_file,
                                 batch_format="pyarrow").take_all()
    errors, review = Counter(), Counter()
    for shard in written:
        c = json.loads(shard["counts"])
        errors.update(c["errors_by_kind"])
        review.update(c["review_by_reason"])
    return {"out": loc.uri, "rows": sum(s["rows"] for s in written), "shards": len(written),
            "errors_by_kind": dict(errors), "review_by_reason": dict(review)}
