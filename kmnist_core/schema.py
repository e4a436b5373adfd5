"""The Parquet output schema: a contract with downstream pipelines. Bump SCHEMA_VERSION on any change.

The one place for the schema's facts: the columns (SCHEMA), a row's key columns (KEY_COLUMNS, the listing a
worker reads: LISTING_SCHEMA), a box row's page columns (PAGE_COLUMNS), the keys of every shard's footer
(FOOTER_*, `footer`), and the key of a box on a page (`box_key`, `parse_box_key`).
"""

from __future__ import annotations

import json
import re

import pyarrow as pa

# 2: ink box, ood_score, review_reason; prediction fields null on blank crops too.
# 3: rows unchanged; one shard per listing chunk (chunk-<id>.parquet) with its chunk record in the footer.
# 4: precision (int8 or fp32: the runtime that produced the row; a run whose driver's CPU fails the int8 probe runs fp32,
#    and an int8 run computes its rows near a decision in fp32).
SCHEMA_VERSION = "4"

SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),  # absolute path as discovered, as text (batch_infer/paths.py)
    pa.field("path_bytes", pa.binary(), nullable=False),  # the exact file name: the row's key
    pa.field("rel_path", pa.string(), nullable=False),  # relative to input_root
    pa.field("input_root", pa.string(), nullable=False),
    pa.field("sha256", pa.string()),  # of the file bytes; null if unreadable
    pa.field("size_bytes", pa.int64()),
    pa.field("width", pa.int32()),  # original, after EXIF orientation
    pa.field("height", pa.int32()),
    pa.field("inverted", pa.bool_()),  # dark ink on light paper was detected and inverted
    pa.field("ink_x", pa.int32()),  # the character's box in the original (after EXIF) pixels that the
    pa.field("ink_y", pa.int32()),  # model read; null when blank or an error
    pa.field("ink_w", pa.int32()),
    pa.field("ink_h", pa.int32()),
    pa.field("pred_index", pa.int32()),
    pa.field("pred_char", pa.string()),
    pa.field("pred_codepoint", pa.string()),
    pa.field("confidence", pa.float32()),  # calibrated probability of pred_index
    pa.field("topk_indices", pa.list_(pa.int32())),
    pa.field("topk_chars", pa.list_(pa.string())),
    pa.field("topk_confidences", pa.list_(pa.float32())),
    pa.field("margin", pa.float32()),  # top-1 minus top-2 confidence
    pa.field("ood_score", pa.float32()),  # higher = less like any of the model's characters
    pa.field("needs_review", pa.bool_(), nullable=False),  # review_reason is not null
    pa.field("review_reason", pa.string()),  # error, blank, unknown_character, low_confidence; null = accepted
    pa.field("error", pa.string()),  # null when the file was predicted
    pa.field("error_kind", pa.string()),  # empty, not_image, truncated, too_large, corrupt, unreadable
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("precision", pa.string(), nullable=False),  # int8 or fp32
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("node_id", pa.string()),  # Ray node that ran the model
])

# Where a row's crop was found; `path_bytes`, the exact name, is the row's key. A listing (what a worker
# reads: batch_infer/chunks.py, manifest.py) is these columns, then a manifest's own.
KEY_COLUMNS = ("path", "path_bytes", "rel_path", "input_root")
LISTING_SCHEMA = pa.schema([(name, SCHEMA.field(name).type) for name in KEY_COLUMNS])

# Output columns of a box row (a manifest of boxes, batch_infer/manifest.py) beyond SCHEMA's (width/height there
# are the box's size).
PAGE_COLUMNS = pa.schema([
    pa.field("page", pa.string()),  # the page image's path or URI
    pa.field("box_x", pa.int32()), pa.field("box_y", pa.int32()),  # the box in page pixels
    pa.field("box_w", pa.int32()), pa.field("box_h", pa.int32()),
    pa.field("reading_index", pa.int32()),  # position in the page's text, from 0
    pa.field("column_index", pa.int32()),  # column, 0 = rightmost
])

# Every shard's footer (Parquet key-value metadata): the schema version, the run that wrote it (run.json's
# fields as the run began, its decision policy included), the model card, and the chunk it holds.
FOOTER_SCHEMA_VERSION = b"kmnist_batch.schema_version"
FOOTER_RUN = b"kmnist_batch.run"
FOOTER_MODEL_CARD = b"kmnist_batch.model_card"
FOOTER_CHUNK = b"kmnist_batch.chunk"  # predict's shards only (kmnist_core/predictions.py chunk_meta)


def footer(run: dict, card: dict) -> dict[bytes, bytes]:
    """The footer of the shards of one run (FOOTER_CHUNK is added per shard)."""
    return {FOOTER_SCHEMA_VERSION: SCHEMA_VERSION.encode(), FOOTER_RUN: json.dumps(run, ensure_ascii=False).encode(),
            FOOTER_MODEL_CARD: json.dumps(card, ensure_ascii=False).encode()}


# A box on a page (a manifest of boxes, batch_infer/manifest.py): its key is the page's path plus a W3C
# media fragment, `page.png#xywh=X,Y,W,H`.
BOX_KEY = re.compile(rb"^(.*)#xywh=(\d+),(\d+),(\d+),(\d+)$", re.DOTALL)


def box_key(page: str, x, y, w, h) -> str:
    return f"{page}#xywh={x},{y},{w},{h}"


def parse_box_key(key: bytes) -> tuple[bytes, tuple[int, int, int, int]] | None:
    """A box row's page key and box (x, y, width, height); None for a key that is not a box on a page."""
    box = BOX_KEY.match(key)
    return (box[1], tuple(int(v) for v in box.groups()[1:])) if box else None  # type: ignore[return-value]
