"""The report outputs of an OUT as one set, made visible in one step: whole or absent, never half.

A report (`kmnist-batch report`, and every predict run at its end) writes OUT/final/, OUT/summary/, the
page outputs (pages.parquet, pages_kaggle.csv, alto/, summary/pages/) from ONE read of the review history
into a generation folder of its own, `OUT/.reports/<generation>/`, writes `report.json` there last (the
completion marker: what was read, the files and their sizes), and then publishes it in one step:

- on a file system, the symbolic link `OUT/report` is pointed at the new generation by renaming a new
  link over it (atomic); `OUT/final`, `OUT/summary`, `OUT/alto`, `OUT/pages.parquet` and
  `OUT/pages_kaggle.csv` are fixed links into `OUT/report/`, so every earlier path keeps working and
  always shows one complete set;
- on an object store (no rename, no links), `OUT/report.json` names the current generation and is
  written last (one PUT is atomic); readers go through `current()`.

A crash at any point leaves the previous complete set published (and a partial generation that the next
report deletes). The previous generation is kept until the next publish, so a reader that resolved the
old set mid-read can finish.
"""

from __future__ import annotations

import json
import os
import secrets
from datetime import datetime, timezone

import pyarrow.fs as pafs

from kmnist_core import storage
from kmnist_core.files import json_text
from kmnist_core.storage import Location

GENERATIONS = ".reports"
LINK = "report"  # file system: the current generation
MARKER = "report.json"  # in a generation: written last; on an object store OUT/report.json points at it
PUBLISHED = ("final", "summary", "alto", "pages.parquet", "pages_kaggle.csv")  # file system: links into report/


def generations(out: Location) -> Location:
    return out.join(GENERATIONS)


def new_generation(out: Location) -> Location:
    """An empty folder for a report being built; its name sorts by creation time."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    gen = generations(out).join(f"{stamp}-{secrets.token_hex(4)}")
    storage.make_dirs(gen)
    return gen


def files_under(folder: Location) -> dict[str, int]:
    """Relative path -> size of every file under `folder`."""
    if folder.local:
        found = {}
        for root, _, names in os.walk(folder.path):
            for name in names:
                path = os.path.join(root, name)
                found[os.path.relpath(path, folder.path).replace(os.sep, "/")] = os.path.getsize(path)
        return dict(sorted(found.items()))
    infos = folder.fs.get_file_info(pafs.FileSelector(folder.path, recursive=True, allow_not_found=True))
    return dict(sorted((i.path[len(folder.path) + 1 :], i.size) for i in infos if i.type == pafs.FileType.File))


def sync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: str) -> None:
    """fsync every file and folder under `path` (bottom up), so the rename that publishes them publishes bytes on disk."""
    for root, dirs, names in os.walk(path, topdown=False):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        sync_dir(root)


def publish(out: Location, gen: Location, record: dict) -> dict:
    """Mark `gen` complete and make it the current report (module doc); returns the marker written."""
    marker = {**record, "generation": gen.path.rsplit("/" if not gen.local else os.sep, 1)[-1],
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": files_under(gen)}
    storage.write_bytes_atomic(gen.join(MARKER), json_text(marker).encode("utf-8"), fsync=True)
    if gen.local:
        sync_tree(gen.path)
        tmp = os.path.join(out.path, f".{LINK}.{os.getpid()}.tmp")
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.path.join(GENERATIONS, marker["generation"]), tmp)
        link = os.path.join(out.path, LINK)
        if os.path.isdir(link) and not os.path.islink(link):  # a copy of OUT that followed the links
            storage.delete_tree(storage.resolve(link))
        os.replace(tmp, link)
        link_published_names(out, set(marker["files"]))
        sync_dir(out.path)
    else:
        storage.write_bytes_atomic(out.join(MARKER), json_text({"generation": marker["generation"]}).encode("utf-8"))
    prune(out, keep={marker["generation"], *previous(out, marker["generation"])})
    return marker


def link_published_names(out: Location, files: set[str]) -> None:
    """OUT/final etc. as links into OUT/report/, for the names this report has (`files`: its relative
    paths); the others go. A folder or file left by an earlier version, or by a copy of OUT that followed
    the links, is replaced."""
    for name in PUBLISHED:
        path = os.path.join(out.path, name)
        target = os.path.join(LINK, name)
        if not any(f == name or f.startswith(name + "/") for f in files):
            if os.path.islink(path) or os.path.isfile(path):
                os.unlink(path)
            elif os.path.isdir(path):
                storage.delete_tree(storage.resolve(path))
            continue
        if os.path.islink(path) and os.readlink(path) == target:
            continue
        tmp = os.path.join(out.path, f".{name}.{os.getpid()}.link")
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(target, tmp)
        if os.path.isdir(path) and not os.path.islink(path):
            storage.delete_tree(storage.resolve(path))
        os.replace(tmp, path)


def previous(out: Location, current_name: str) -> list[str]:
    """The complete generation published just before `current_name`, if any (kept for readers mid-read)."""
    done = [n for n in generation_names(out) if n < current_name and storage.exists(generations(out).join(n, MARKER))]
    return done[-1:]


def generation_names(out: Location) -> list[str]:
    folder = generations(out)
    if folder.local:
        try:
            return sorted(n for n in os.listdir(folder.path) if not n.startswith("."))
        except FileNotFoundError:
            return []
    infos = folder.fs.get_file_info(pafs.FileSelector(folder.path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def prune(out: Location, keep: set[str]) -> None:
    """Delete every generation but `keep`: older sets and those a killed report left half-built."""
    for name in generation_names(out):
        if name not in keep:
            storage.delete_tree(generations(out).join(name))


def withdraw(out: Location) -> None:
    """No report any more (an --overwrite run replaced the rows it described): unpublish, then delete."""
    if out.local:
        link_published_names(out, set())
        link = os.path.join(out.path, LINK)
        if os.path.islink(link):
            os.unlink(link)
        elif os.path.isdir(link):
            storage.delete_tree(storage.resolve(link))
    else:
        storage.delete(out.join(MARKER))
    prune(out, keep=set())


def current(out: Location) -> Location | None:
    """The folder of the current complete report (resolved once: read a whole set through it), or None."""
    if out.local:
        link = os.path.join(out.path, LINK)
        if not os.path.isdir(link):
            return None
        # A copy of OUT made by a tool that follows links holds the report itself: read it there.
        gen = storage.resolve(os.path.realpath(link) if os.path.islink(link) else link)
    else:
        try:
            pointer = json.loads(storage.read_bytes(out.join(MARKER)))
        except (FileNotFoundError, OSError, ValueError):
            return None
        gen = generations(out).join(pointer["generation"])
    return gen if storage.exists(gen.join(MARKER)) else None


def current_record(out: Location) -> dict | None:
    """The current report's marker (module doc), or None when no complete report exists."""
    gen = current(out)
    return json.loads(storage.read_bytes(gen.join(MARKER))) if gen else None
