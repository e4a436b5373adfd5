"""OUT as a local folder or an object-store URI (s3://, gs://, file://): the few small files another
process reads to follow a run (run.json, _progress.json) go through here, so `status` works on both.

Local files are replaced by a rename; an object store has no rename, but a single PUT is atomic (an
object appears whole or not at all), so a reader never meets half a record either way.
"""

from __future__ import annotations

import json
from pathlib import Path

from kmnist_core.files import json_text, write_json_atomic


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def _fs_path(location: str, name: str):
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(location)
    return filesystem, root.rstrip("/") + "/" + name


def write_json_at(location: str | Path, name: str, payload: dict) -> None:
    if not is_uri(location):
        write_json_atomic(Path(location) / name, payload)
        return
    filesystem, path = _fs_path(str(location), name)
    with filesystem.open_output_stream(path) as f:  # one PUT
        f.write(json_text(payload).encode("utf-8"))


def read_text_at(location: str | Path, name: str) -> str | None:
    """The file's text, or None when it does not exist."""
    if not is_uri(location):
        try:
            return (Path(location) / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
    from pyarrow import fs

    filesystem, path = _fs_path(str(location), name)
    if filesystem.get_file_info(path).type != fs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def read_json_at(location: str | Path, name: str) -> dict | None:
    """The file as JSON; None when it is missing or not (yet) valid JSON."""
    text = read_text_at(location, name)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def list_names_at(location: str | Path, folder: str, suffix: str) -> list[str]:
    """Names of the files ending in `suffix` directly under location/folder ([] when it is absent)."""
    if not is_uri(location):
        d = Path(location) / folder
        return sorted(p.name for p in d.glob(f"*{suffix}")) if d.is_dir() else []
    from pyarrow import fs

    filesystem, path = _fs_path(str(location), folder)
    infos = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == fs.FileType.File and i.base_name.endswith(suffix))
