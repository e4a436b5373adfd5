"""Writing files so that a reader, or a crash, never meets half of one. Used by every stage: model
directories, run records, summaries, grid results.

A temp file's name starts with "." so directory readers (pyarrow, pandas, DuckDB, Spark) and the
crop discovery skip it while it exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def temp_name(path: Path) -> Path:
    """Where `path` is written before its rename: a hidden name beside it."""
    return path.with_name(f".{path.name}.tmp")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = temp_name(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def json_text(payload: dict) -> str:
    return json.dumps(payload, indent=2, ensure_ascii=False) + "\n"


def write_json_atomic(path: Path, payload: dict) -> None:
    write_bytes_atomic(path, json_text(payload).encode("utf-8"))
