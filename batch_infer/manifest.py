"""Manifest input: a CSV or Parquet table of crops or of boxes on page scans, read instead of walking folders.

Three layouts, told apart by their columns:
- **crop files**: `path` (one crop file per row) and any other columns;
- **boxes on pages**: `path` (a page image) plus `x`, `y`, `width`, `height` (page pixels, after EXIF
  orientation): one row per box, cut from the page in the worker (kmnist_core/pages.py);
- **Kaggle Kuzushiji** (`image_id`, `labels`; `labels` = repeated `Unicode X Y Width Height`): boxes on
  pages, the page found as `image_id` plus an image extension next to the CSV (or under `pages_dir`); the
  Unicode given becomes the `truth` column (the character itself).

Paths: a relative path resolves against the manifest's folder; absolute paths and URIs are kept. The
manifest itself may be local or on an object store (read through pyarrow.fs).

Every other column is passed through to the output rows unchanged, with its type. A column whose name
is an output column (kmnist_core/schema.py, plus the page columns below) is refused, not renamed: a
downstream join should find the manifest's names exactly as they were.

The row key (`path_bytes`, `path`): for a crop row, the resolved path; for a box row, the page's path
plus a W3C media fragment, `page.png#xywh=X,Y,W,H`. It does not depend on the manifest's row order, so
a re-sorted manifest resumes cleanly; two boxes with the same page and coordinates are refused.

Reading order is geometry only, so it is computed here, per page over all its boxes, and travels with
the listing (`reading_index`, `column_index`): a worker that gets part of a page on resume still writes
the right positions. The driver holds the manifest table (a few hundred bytes per row).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from itertools import repeat
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs

from batch_infer.chunks import boundary_hash
from batch_infer.discover import ListedFile, order_key
from kmnist_core import storage
from kmnist_core.errors import KmnistError
from kmnist_core.page_ids import page_ids
from kmnist_core.pages import reading_order
from kmnist_core.schema import PAGE_COLUMNS, SCHEMA, box_key

BOX_INPUT = ("x", "y", "width", "height")
KAGGLE_INPUT = ("image_id", "labels")
PAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")  # tried in this order for Kaggle


@dataclass(frozen=True)
class Manifest:
    rows: pa.Table  # the listing: schema.KEY_COLUMNS, PAGE_COLUMNS when boxes, then the pass-through columns
    boxes: bool
    passthrough: list[str]
    source: str  # the manifest's URI or absolute path


@dataclass(frozen=True)
class ManifestSource:
    """A manifest as read through storage in one step (open_manifest), before any table work: where it is,
    its table and, for a Kaggle manifest, the files of its page folder."""

    uri: str  # the manifest's URI or absolute path
    folder: str  # its folder: where its relative paths resolve
    table: pa.Table  # as written (read_table)
    pages: str | None = None  # a Kaggle manifest's page folder (--pages, or the manifest's own folder)
    page_names: tuple[str, ...] = ()  # the files in it
    paths: tuple[str, ...] = ()  # another manifest's `path` column, resolved (storage.resolve_against)


def read_table(source: str) -> tuple[storage.Location, pa.Table]:
    """Where the manifest is, and its table. Parquet keeps its types. A CSV has none: its columns are read as
    the text written (inferring would turn an id 00123 into 123), and the box coordinates are parsed as
    numbers afterwards."""
    import pyarrow.dataset as pads  # here: it imports pandas (~40 MB), which a run without a manifest never needs

    loc = storage.resolve(source)
    if not storage.exists(loc):
        raise KmnistError(f"--manifest {loc.uri} does not exist")
    name = loc.path.lower()
    fs = loc.fs or pafs.LocalFileSystem()
    try:
        if name.endswith((".parquet", ".pq")):
            return loc, pads.dataset(loc.path, filesystem=fs, format="parquet").to_table()
        if not name.endswith((".csv", ".tsv")):
            raise KmnistError(f"--manifest {loc.uri}: expected a .csv, .tsv or .parquet file")
        parse = pacsv.ParseOptions(delimiter="\t" if name.endswith(".tsv") else ",")
        names = pads.dataset(loc.path, filesystem=fs, format=pads.CsvFileFormat(parse_options=parse)).schema.names
        fmt = pads.CsvFileFormat(parse_options=parse, convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names}, strings_can_be_null=False))
        return loc, pads.dataset(loc.path, filesystem=fs, format=fmt).to_table()
    except (pa.ArrowInvalid, OSError) as e:
        raise KmnistError(f"cannot read --manifest {loc.uri}: {str(e).splitlines()[0]}") from None


def open_manifest(source: str, pages_dir: str | None) -> ManifestSource:
    """Everything a manifest needs from storage: its table and, for a Kaggle manifest (image_id,labels and
    no path), the names in its page folder; for another, its paths resolved against its folder."""
    loc, table = read_table(source)
    folder = os.path.dirname(loc.path) if loc.local else loc.uri.rsplit("/", 1)[0]
    names = table.column_names
    if set(KAGGLE_INPUT) <= set(names) and "path" not in names:
        pages = storage.resolve(pages_dir).uri if pages_dir else folder
        return ManifestSource(loc.uri, folder, table, pages, tuple(storage.list_names(storage.resolve(pages))))
    if pages_dir:
        raise KmnistError("--pages is for Kaggle-format manifests (image_id,labels); other manifests name each path")
    if "path" not in names:
        raise KmnistError(f"--manifest {loc.uri} has no 'path' column (columns: {', '.join(names)})")
    given = table.column("path").to_pylist()
    if any(p is None or not str(p).strip() for p in given):
        raise KmnistError("manifest has a row with an empty path")
    return ManifestSource(loc.uri, folder, table, paths=tuple(storage.resolve_against([str(p) for p in given], folder)))


def parse_kaggle(table: pa.Table, where: str, page_names: tuple[str, ...]) -> pa.Table:
    """Kaggle `image_id,labels` -> one row per box: path, x, y, width, height, image_id, truth; each
    image_id's page is the file of that name in `where` (the first of PAGE_EXTENSIONS there)."""
    stems: dict[str, str] = {}
    for name in page_names:
        stem, ext = os.path.splitext(name)
        if ext.lower() in PAGE_EXTENSIONS and (stem not in stems or PAGE_EXTENSIONS.index(ext.lower()) <
                                               PAGE_EXTENSIONS.index(os.path.splitext(stems[stem])[1].lower())):
            stems[stem] = name
    cols: dict[str, list] = {"path": [], "x": [], "y": [], "width": [], "height": [], "image_id": [], "truth": []}
    for image_id, labels in zip(table.column("image_id").to_pylist(), table.column("labels").to_pylist()):
        parts = str(labels or "").split()
        if len(parts) % 5:
            raise KmnistError(f"Kaggle manifest: labels of {image_id} are not groups of 'Unicode X Y Width Height'")
        name = stems.get(str(image_id), f"{image_id}{PAGE_EXTENSIONS[0]}")  # missing: its boxes get error rows
        for i in range(0, len(parts), 5):
            code, *xywh = parts[i : i + 5]
            try:
                char = chr(int(code[2:], 16)) if code.upper().startswith("U+") else code
                x, y, w, h = (int(v) for v in xywh)
            except ValueError:
                raise KmnistError(f"Kaggle manifest: bad box {' '.join(parts[i : i + 5])!r} in {image_id}") from None
            for k, v in zip(cols, (where.rstrip("/") + "/" + name, x, y, w, h, str(image_id), char)):
                cols[k].append(v)
    return pa.table({k: pa.array(v, pa.int32() if k in BOX_INPUT else pa.string()) for k, v in cols.items()})


def box_coordinates(table: pa.Table) -> dict[str, pa.Array]:
    """The manifest's BOX_INPUT columns as int32; an empty CSV cell is a missing coordinate (a bad_box row)."""
    coords = {}
    for c in BOX_INPUT:
        col = table.column(c)
        if pa.types.is_string(col.type):
            col = pc.utf8_trim_whitespace(col)
            col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
        try:
            coords[c] = col.cast(pa.int32())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise KmnistError(f"manifest column {c!r} must hold whole pixel numbers") from None
    return coords


def read_manifest(source: str, pages_dir: str | None = None) -> Manifest:
    """Read and check a manifest; returns the listing rows in listing order (by key)."""
    found = open_manifest(source, pages_dir)  # all its reading is done here: the rest is table work
    uri = found.uri
    folder = found.folder
    table = found.table
    paths = list(found.paths)
    if found.pages is not None:  # its page paths are built from the resolved page folder
        table = parse_kaggle(table, found.pages, found.page_names)
        paths = table.column("path").to_pylist()
    names = table.column_names
    given = [c for c in BOX_INPUT if c in names]
    if given and len(given) < 4:
        raise KmnistError(f"--manifest {uri}: boxes need all of x, y, width, height (missing "
                          f"{', '.join(c for c in BOX_INPUT if c not in names)})")
    boxes = bool(given)
    passthrough = [c for c in names if c != "path" and not (boxes and c in BOX_INPUT)]
    taken = set(SCHEMA.names) | (set(PAGE_COLUMNS.names) if boxes else set())
    clash = [c for c in passthrough if c in taken]
    if clash:
        raise KmnistError(f"manifest column {clash[0]!r} is also an output column; rename it in the manifest "
                          f"(output columns are listed in the README's schema)")
    if boxes:
        coords = box_coordinates(table)
        keys = [box_key(p, *v) for p, *v in zip(paths, *(coords[c].to_pylist() for c in BOX_INPUT))]
        reading_index, column_index = page_reading_order(paths, [coords[c] for c in BOX_INPUT])
        # Before anything is written: every page must have a file name of its own (kmnist_core/page_ids.py).
        page_ids(paths, repeat(folder), table.column("image_id").to_pylist() if "image_id" in names else None)
    else:
        keys = paths
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise KmnistError(f"manifest lists {len(keys) - len(set(keys))} rows twice (first: {dup})")
    key_bytes = [k.encode() for k in keys]
    columns: dict[str, pa.Array] = {
        "path": pa.array(keys, pa.string()), "path_bytes": pa.array(key_bytes, pa.binary()),
        "rel_path": pa.array([k[len(folder) + 1 :] if k.startswith(folder + "/") else k for k in keys], pa.string()),
        "input_root": pa.array([folder] * len(keys), pa.string()),
    }
    if boxes:
        columns["page"] = pa.array(paths, pa.string())
        for out_name, c in zip(("box_x", "box_y", "box_w", "box_h"), BOX_INPUT):
            columns[out_name] = coords[c]
        columns["reading_index"] = pa.array(reading_index, pa.int32())
        columns["column_index"] = pa.array(column_index, pa.int32())
    for c in passthrough:
        columns[c] = table.column(c)
    rows = pa.table(columns)
    order = sorted(range(len(keys)), key=lambda i: order_key(key_bytes[i]))
    return Manifest(rows.take(pa.array(order, pa.int64())), boxes, passthrough, uri)


def page_reading_order(pages: list[str], coords: list[pa.Array]) -> tuple[np.ndarray, np.ndarray]:
    """kmnist_core.pages.reading_order per page; a box with a missing or negative coordinate or no area
    gets -1 (it is a bad_box row)."""
    xywh = np.stack([c.to_numpy(zero_copy_only=False) if c.null_count == 0
                     else pc.fill_null(c, -1).to_numpy() for c in coords], axis=1).astype(np.float64)
    valid = np.all(np.stack([c.is_valid().to_numpy(zero_copy_only=False) for c in coords], axis=1), axis=1)
    # Boxes that cannot be on any page are left out of the order; one past the page's edge is only found
    # when the page is decoded, so it keeps its place (and reads as 〓 in the text).
    valid &= (xywh[:, 0] >= 0) & (xywh[:, 1] >= 0) & (xywh[:, 2] >= 1) & (xywh[:, 3] >= 1)
    index, column = np.full(len(pages), -1, np.int64), np.full(len(pages), -1, np.int64)
    by_page: dict[str, list[int]] = {}
    for i, p in enumerate(pages):
        if valid[i]:
            by_page.setdefault(p, []).append(i)
    for members in by_page.values():
        m = np.array(members)
        index[m], column[m] = reading_order(*xywh[m].T)
    return index, column


@dataclass(frozen=True)
class ManifestChunk:
    """The same interface as batch_infer.chunks.Chunk (batch_infer/plan.py takes either), over manifest rows."""

    id: str
    first: bytes
    last: bytes
    rows: pa.Table

    @property
    def files(self) -> list[ListedFile]:
        return [ListedFile(k, b"", b"") for k in self.rows.column("path_bytes").to_pylist()]

    def table(self, files=None) -> pa.Table:
        if files is None:
            return self.rows
        keys = pa.array([f.path_bytes for f in files], pa.binary())
        return self.rows.filter(pc.is_in(self.rows.column("path_bytes"), value_set=keys))


def make_chunk(rows: pa.Table) -> ManifestChunk:
    keys = rows.column("path_bytes").to_pylist()
    h = hashlib.blake2b(digest_size=8)
    for k in keys:
        h.update(len(k).to_bytes(4, "little"))
        h.update(k)
    return ManifestChunk(h.hexdigest(), keys[0], keys[-1], rows)


def manifest_chunks(manifest: Manifest, target: int) -> Iterator[ManifestChunk]:
    """Chunks of about `target` rows. Box rows: a page's boxes are always in one chunk (the worker decodes
    each page once); a chunk ends after a page once it holds target // 2 rows and the page's name hashes
    to a boundary, or at 2 * target rows: content-defined, as batch_infer/chunks.py, at page granularity."""
    rows = manifest.rows
    n = rows.num_rows
    if not n:
        return
    units = rows.column("page").to_pylist() if manifest.boxes else rows.column("path").to_pylist()
    low = max(1, target // 2)
    per_unit = max(1.0, n / max(1, len(set(units))))
    modulus = max(1, round(low / per_unit))
    start = 0
    for i in range(n):
        end_of_unit = i + 1 == n or units[i + 1] != units[i]
        size = i + 1 - start
        if end_of_unit and ((size >= low and boundary_hash(units[i].encode()) % modulus == 0) or size >= 2 * target):
            yield make_chunk(rows.slice(start, size))
            start = i + 1
    if start < n:
        yield make_chunk(rows.slice(start, n - start))
