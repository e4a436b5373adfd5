"""The decode stage for box rows (a page manifest, batch_infer/manifest.py): each page of the batch is
read and decoded once, all its boxes are cut from it in memory (kmnist_core/pages.py), then it is dropped.

Rows come out as batch_infer/stages.py's decoded rows, so the predict stage and the output are the same
as for crop files. A page that cannot be read or decoded gives every one of its boxes an error row with
the page's error kind; a box not on its page is an error row of kind `bad_box`. `sha256` and
`size_bytes` are the page file's, `width`/`height` the box's.
"""

from __future__ import annotations

import hashlib
import os
import time

import pyarrow as pa

from batch_infer.stages import NO_IMAGE, TRANSIENT_KINDS, decoded_table, read_file
from kmnist_core.pages import PAGE_MAX_PIXELS, Page, decode_page, prepare_box
from kmnist_core.preprocess import DecodeError


def page_key(page: str) -> bytes:
    return page.encode() if "://" in page else os.fsencode(page)


def load_page(page: str, max_pixels: int, retries: int, backoff_s: float) -> tuple[Page | None, str | None, int | None,
                                                                                     str | None, str | None]:
    """(page, sha256, size, error, error_kind); a transient failure is tried again up to `retries` times."""
    for attempt in range(retries + 1):
        data = read_file(page_key(page))
        sha = size = None
        try:
            if isinstance(data, OSError):
                raise data
            sha, size = hashlib.sha256(data).hexdigest(), len(data)
            return decode_page(data, max_pixels), sha, size, None, None
        except DecodeError as e:
            error, kind = f"page {e}", e.kind
        except OSError as e:
            error, kind = f"page unreadable: {e.strerror or e}", "unreadable"
        if kind not in TRANSIENT_KINDS or attempt == retries:
            return None, sha, size, error, kind
        time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def decode_box_batch(batch: pa.Table, input_size: int, max_pixels: int = PAGE_MAX_PIXELS, retries: int = 0,
                     backoff_s: float = 0.5) -> pa.Table:
    """Decoded rows (batch_infer/stages.py DECODED_SCHEMA plus the listing's other columns) for box rows."""
    pages = batch.column("page").to_pylist()
    coords = [batch.column(c).to_pylist() for c in ("box_x", "box_y", "box_w", "box_h")]
    rows_of: dict[str, list[int]] = {}
    for i, p in enumerate(pages):
        rows_of.setdefault(p, []).append(i)
    results: list[tuple | None] = [None] * batch.num_rows
    for page_name, rows in rows_of.items():
        page, sha, size, error, kind = load_page(page_name, max_pixels, retries, backoff_s)
        for i in rows:
            x, y, w, h = (c[i] for c in coords)
            if page is None:
                results[i] = (b"", sha, size, *NO_IMAGE, error, kind)
                continue
            try:
                img = prepare_box(page, x, y, w, h, input_size)
            except DecodeError as e:
                results[i] = (b"", sha, size, *NO_IMAGE, str(e), e.kind)
                continue
            ink = img.ink_box or (None,) * 4
            results[i] = (img.pixels.tobytes(), sha, size, img.width, img.height, img.inverted, img.blank, *ink,
                          None, None)
    return decoded_table(batch, results)


def page_batches(listing: pa.Table, batch_size: int) -> list[tuple[int, int]]:
    """(start, length) slices of about `batch_size` rows that never split a page (listing sorted by key,
    so a page's boxes are consecutive)."""
    pages = listing.column("page").to_pylist()
    slices, start = [], 0
    for i in range(len(pages)):
        if (i + 1 == len(pages) or pages[i + 1] != pages[i]) and i + 1 - start >= batch_size:
            slices.append((start, i + 1 - start))
            start = i + 1
    if start < len(pages):
        slices.append((start, len(pages) - start))
    return slices
