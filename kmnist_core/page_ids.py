"""One stable, unique, safe name per page: what its ALTO file, overlay, `pages.parquet` row and Kaggle
export row are called.

A page's id is the manifest's `image_id` when the manifest has one (Kaggle manifests always do), else its
path relative to the manifest's folder without the extension (`vol1/0001.jpg` -> `vol1/0001`); a page
outside that folder keeps its whole path, less the scheme (`s3://b/vol1/0001.jpg` -> `b/vol1/0001`).
Archives name pages per volume, so the folders are part of the name: two volumes' `0001.jpg` are two
pages. An id must be usable as a relative file name on every store: no empty, `.` or `..` part, no
control or bidi character, no backslash; an `image_id` also no `/`. Two pages whose ids differ only in
case would overwrite each other on a case-insensitive disk, so they collide too. Every such problem is
refused before anything is written (`read_manifest` checks, the page outputs name files with the same
function).
"""

from __future__ import annotations

import os
import posixpath
import unicodedata
from itertools import repeat
from typing import Iterable

from kmnist_core.errors import KmnistError

MAX_ID_BYTES = 200  # a file name is at most 255 bytes on common file systems; .xml/.png and temp marks fit


def unsafe_reason(page_id: str, allow_folders: bool) -> str | None:
    """Why `page_id` cannot name a file safely, or None."""
    if not page_id:
        return "it is empty"
    if len(page_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        return f"it is longer than {MAX_ID_BYTES} bytes"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in page_id):
        return "it holds a control character"
    if "\\" in page_id or (not allow_folders and "/" in page_id):
        return "it holds a path separator"
    parts = page_id.split("/")
    if any(p in ("", ".", "..") for p in parts) or ".." in page_id:
        return "it holds an empty, '.' or '..' part"
    if any(p.startswith(".") or p != p.strip() for p in parts):
        return "a part starts with '.' or has leading or trailing spaces"
    return None


def path_id(page: str, root: str) -> str:
    """A page's path relative to `root` (its manifest's folder) without the extension; the whole path less
    its scheme for a page outside `root`."""
    sep = "/" if "://" in page else os.sep
    prefix = root.rstrip(sep) + sep
    rel = page[len(prefix) :] if page.startswith(prefix) else page.split("://", 1)[-1].lstrip(sep)
    return posixpath.splitext(rel.replace(os.sep, "/"))[0]


def shown(text: str) -> str:
    return repr(text)  # one line, control characters escaped


def page_ids(pages: Iterable[str], roots: Iterable[str], image_ids: Iterable[str | None] | None = None) -> dict[str, str]:
    """page -> its id (module doc), for rows given as parallel sequences (one entry per box or page).
    Raises KmnistError naming the page(s) when an id is unsafe, two pages share one, or a page has two."""
    ids: dict[str, str] = {}
    given = repeat(None) if image_ids is None else ("" if i is None else str(i) for i in image_ids)
    for page, root, image_id in zip(pages, roots, given):
        page_id = path_id(page, root) if image_id is None else image_id
        known = ids.setdefault(page, page_id)
        if known != page_id:
            raise KmnistError(f"page {shown(page)} has two image_id values, {shown(known)} and {shown(page_id)}")
    owners: dict[str, str] = {}
    for page, page_id in sorted(ids.items()):
        why = unsafe_reason(page_id, allow_folders=image_ids is None)
        if why:
            raise KmnistError(f"page id {shown(page_id)} of {shown(page)} cannot name a file: {why}")
        other = owners.setdefault(page_id.casefold(), page)
        if other != page:
            raise KmnistError(f"pages {shown(other)} and {shown(page)} would both be named {shown(page_id)} "
                              f"(ALTO, overlays and the Kaggle export): give them distinct image_id values")
    return ids
