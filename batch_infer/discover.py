"""Find the image files under the inputs: recursive, case-insensitive extensions, hidden files and
non-images skipped and counted, symlink loops never followed twice.

The walk runs on bytes, so a name that is not UTF-8 is found like any other (batch_infer/paths.py).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from batch_infer.paths import name_text
from kmnist_core.errors import KmnistError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".pgm", ".ppm", ".pnm"})


@dataclass
class Discovery:
    files: list[dict] = field(default_factory=list)  # {"path", "path_bytes", "rel_path", "input_root"}
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def to_dict(self) -> dict:
        return {"files": len(self.files), "skipped": dict(self.skipped)}


def is_image_name(name: str | bytes) -> bool:
    return os.path.splitext(os.fsdecode(name))[1].lower() in IMAGE_EXTENSIONS


def file_entry(path: bytes, rel_path: bytes, root: bytes) -> dict:
    return {"path": name_text(path), "path_bytes": path, "rel_path": name_text(rel_path), "input_root": name_text(root)}


def walk(root: Path, found: Discovery) -> None:
    """Depth-first over `root`, following symlinked folders once each (by real path)."""
    root_bytes = os.fsencode(os.path.abspath(root))
    visited: set[bytes] = set()
    stack = [root_bytes]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in visited:
            found.skipped["symlink_loop"] += 1
            continue
        visited.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            found.skipped["unreadable_folder"] += 1
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith(b"."):
                found.skipped["hidden"] += 1
            elif entry.is_dir(follow_symlinks=True):
                subfolders.append(entry.path)
            elif not entry.is_file(follow_symlinks=True):
                found.skipped["not_a_file"] += 1  # broken links, sockets, fifos
            elif not is_image_name(entry.name):
                found.skipped["not_image_extension"] += 1
            else:
                found.files.append(file_entry(entry.path, os.path.relpath(entry.path, root_bytes), root_bytes))
        stack.extend(reversed(subfolders))  # visit in name order, so a real folder is seen before later links to it


def discover(inputs: list[str | Path]) -> Discovery:
    """Image files under each input (a folder, or a single file). A missing input is an error."""
    found = Discovery()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            walk(path, found)
        elif path.is_file():
            absolute = os.fsencode(os.path.abspath(path))
            found.files.append(file_entry(absolute, os.path.basename(absolute), os.path.dirname(absolute)))
        else:
            raise KmnistError(f"input {name_text(os.fsencode(item))} does not exist")
    # One row per file even if inputs overlap (a folder and its parent both given).
    unique = {f["path_bytes"]: f for f in found.files}
    found.skipped["duplicate_input"] += len(found.files) - len(unique)
    found.skipped = Counter({k: v for k, v in found.skipped.items() if v})
    found.files = list(unique.values())
    return found
