"""The crops people labelled in a predict run: each key's latest decision (reviews/store.py) joined to
its prediction row, the file (or the page box) read and decoded exactly as predict decoded it, by the same
decode stages (batch_infer/stages.py, box_stage.py) with predict's default read retries.

A decision is used only for the bytes its reviewer saw: a file whose sha256 is no longer the row's (replaced
since predict read it) is left out, as are keys with no prediction row (an --overwrite that no longer lists
them), files that no longer decode, and crops with no ink (predict never puts those to the model).
`unreadable` decisions are left out too; `not_a_character` ones become outlier-exposure negatives. Each is
counted in the OUT's source record.

Memory is bounded by the reviewed rows: shards are read one at a time, with only the columns a decode needs,
and filtered to the reviewed keys before the next is read.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch_infer.box_stage import decode_box_batch, page_batches
from batch_infer.options import PredictOptions
from batch_infer.stages import DECODED_SCHEMA, decode_batch, pixel_array
from kmnist_core import predictions, storage
from kmnist_core.classmap import ClassMap
from kmnist_core.errors import KmnistError
from kmnist_core.labelled_crops import MIN_REVIEWED, ReviewedCrops, combine
from kmnist_core.schema import KEY_COLUMNS, SCHEMA
from reviews import store

ROW_FACTS = ("sha256", "run_id", "model_id")  # of the prediction row: the bytes the reviewer saw, and who made it
DECODE_BATCH = 1024  # rows read at a time: bounds the file bytes held at once, as predict's --batch-size does


def reviewed_rows(out: storage.Location, keys: pa.Array) -> pa.Table:
    """The prediction rows of `keys`, sorted by key: the listing columns (the keys and any a manifest
    carried: page, box, pass-through) and ROW_FACTS."""
    folder = predictions.predictions_dir(out)
    parts = []
    for name in predictions.shard_names(out):
        loc = folder.join(name)
        manifest_columns = [n for n in pq.read_schema(loc.path, filesystem=loc.fs).names if n not in SCHEMA.names]
        shard = predictions.read_shard(folder, name, [*KEY_COLUMNS, *ROW_FACTS, *manifest_columns])
        parts.append(shard.filter(pc.is_in(shard["path_bytes"], value_set=keys)))
    return pa.concat_tables(parts, promote_options="permissive").sort_by("path_bytes")


def decode_rows(rows: pa.Table, input_size: int) -> pa.Table:
    """Each row's decoded fields (batch_infer/stages.py DECODED_SCHEMA), in `rows`' order. Box rows must be
    sorted by page: each page is decoded once for all its boxes, as a predict worker does."""
    listing = rows.drop_columns(list(ROW_FACTS))
    options = PredictOptions()
    if "box_x" in listing.column_names:
        decode, slices = decode_box_batch, page_batches(listing, DECODE_BATCH)
    else:
        decode, slices = decode_batch, [(start, DECODE_BATCH) for start in range(0, listing.num_rows, DECODE_BATCH)]
    parts = [decode(listing.slice(start, length), input_size, retries=options.read_retries,
                    backoff_s=options.retry_backoff_s) for start, length in slices]
    return pa.concat_tables(parts) if parts else DECODED_SCHEMA.empty_table()


def reviewed_crops(out: str, classes: ClassMap, input_size: int) -> ReviewedCrops:
    """The crops of OUT's latest decisions in the model's input form, with their source record: OUT's uri,
    the run and model ids of the rows, decisions per label kind, crops used and crops left out with why."""
    location = storage.resolve(out)
    if not predictions.shard_names(location):
        raise KmnistError(f"{location.uri} is not a predict run: it holds no predictions "
                          f"({predictions.PREDICTIONS_DIR}/*.parquet)")
    history = store.read_history(location)
    latest = store.latest(history)
    if latest.num_rows == 0:
        raise KmnistError(f"{location.uri} has no review decisions ({store.REVIEWS_DIR}/*.parquet"
                          + (", every one withdrawn" if history.num_rows else "")
                          + f"): settle its flagged rows with `kmnist-batch review {out}` or import labels first")
    try:
        store.check_labels(latest["label"].to_pylist(), classes.chars)
    except KmnistError as e:
        raise KmnistError(f"{location.uri}: {e}") from None

    label_of = dict(zip(latest["key"].to_pylist(), latest["label"].to_pylist()))
    unreadable = pc.equal(latest["label"], store.UNREADABLE).to_numpy(zero_copy_only=False)
    rows = reviewed_rows(location, latest["key"].filter(pa.array(~unreadable)))
    if "page" in rows.column_names:
        rows = rows.sort_by([("page", "ascending"), ("path_bytes", "ascending")])
    decoded = decode_rows(rows, input_size)

    ok = decoded["error"].is_null().to_numpy(zero_copy_only=False)
    pixels = np.zeros((rows.num_rows, input_size, input_size), np.uint8)
    pixels[ok] = pixel_array(decoded["pixels"], input_size)
    blank = decoded["blank"].fill_null(False).to_numpy(zero_copy_only=False)
    unchanged = pc.fill_null(pc.equal(decoded["sha256"], rows["sha256"]), False).to_numpy(zero_copy_only=False)
    usable = ok & ~blank & unchanged
    labels = np.array([label_of[k] for k in rows["path_bytes"].to_pylist()], dtype=object)
    negative = usable & (labels == store.NOT_A_CHARACTER)
    character = usable & ~negative
    index = {c: i for i, c in enumerate(classes.chars)}
    used_chars = labels[character]

    given = latest["label"].to_pylist()
    source = {
        "out": location.uri,
        "run_ids": sorted(set(rows["run_id"].to_pylist())),
        "model_ids": sorted(set(rows["model_id"].to_pylist())),
        "decisions": latest.num_rows,
        "labels": {"character": sum(label not in store.SPECIAL_LABELS for label in given),
                   store.NOT_A_CHARACTER: given.count(store.NOT_A_CHARACTER),
                   store.UNREADABLE: given.count(store.UNREADABLE)},
        "by_decision_kind": {k: int(v) for k, v in zip(*np.unique(latest["kind"].to_numpy(zero_copy_only=False),
                                                                    return_counts=True))},
        "used": {"characters": int(character.sum()), "negatives": int(negative.sum())},
        "by_character": {c: int((used_chars == c).sum()) for c in classes.chars if (used_chars == c).any()},
        "left_out": {store.UNREADABLE: int(unreadable.sum()),
                     "no_prediction_row": int((~unreadable).sum()) - rows.num_rows,
                     "changed_since_predict": int((ok & ~unchanged).sum()),
                     "undecodable": int((~ok).sum()),
                     "blank": int((ok & unchanged & blank).sum())},
    }
    return ReviewedCrops(pixels[character], np.array([index[c] for c in used_chars], np.int64),
                         pixels[negative], (source,))


def gather_reviews(outs: list[str], classes: ClassMap, input_size: int, minimum: int = MIN_REVIEWED) -> ReviewedCrops:
    """The reviewed crops of every OUT, as one set (kmnist_core/labelled_crops.py combine: refused under `minimum`)."""
    return combine([reviewed_crops(out, classes, input_size) for out in outs], minimum)
