"""Find the image files under the inputs: recursive, case-insensitive extensions, hidden files and
non-images skipped and counted, symlink loops never followed twice."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kmnist_core.errors import KmnistError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".pgm", ".ppm", ".pnm"})


@dataclass
class Discovery:
    files: list[dict] = field(default_factory=list)  # {"path", "rel_path", "input_root"}
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def to_dict(self) -> dict:
        return {"files": len(self.files), "skipped": dict(self.skipped)}


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk(root: Path, found: Discovery) -> None:
    """Depth-first over `root`, following symlinked folders once each (by real path)."""
    root_str = os.path.abspath(root)
    visited: set[str] = set()
    stack = [root_str]
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
            if entry.name.startswith("."):
                found.skipped["hidden"] += 1
            elif entry.is_dir(follow_symlinks=True):
                subfolders.append(entry.path)
            elif not entry.is_file(follow_symlinks=True):
                found.skipped["not_a_file"] += 1  # broken links, sockets, fifos
            elif not is_image_name(entry.name):
                found.skipped["not_image_extension"] += 1
            else:
                found.files.append({"path": entry.path, "rel_path": os.path.relpath(entry.path, root_str),
                                    "input_root": root_str})
        stack.extend(reversed(subfolders))  # visit in name order, so a real folder is seen before later links to it


def discover(inputs: list[str | Path]) -> Discovery:
    """Image files under each input (a folder, or a single file). A missing input is an error."""
    found = Discovery()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            walk(path, found)
        elif path.is_file():
            absolute = os.path.abspath(path)
            found.files.append({"path": absolute, "rel_path": path.name, "input_root": os.path.dirname(absolute)})
        else:
            raise KmnistError(f"input {item} does not exist")
    # One row per file even if inputs overlap (a folder and its parent both given).
    unique = {f["path"]: f for f in found.files}
    found.skipped["duplicate_input"] += len(found.files) - len(unique)
    found.skipped = Counter({k: v for k, v in found.skipped.items() if v})
    found.files = list(unique.values())
    return found
