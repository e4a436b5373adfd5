"""A run's identity and its record, OUT/run.json: what predict writes at its start and end (status,
reason, options, figures), what the supervisor marks failed when the process died, what `status` and
`report` read. The one place that names the file and reads or writes it; and the name of tune's end
record, OUT/grid.json, which tune writes and `status` reads (run records of both stages live here)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

from kmnist_core import storage
from kmnist_core.files import json_text
from kmnist_core.storage import Location

RUN_FILE = "run.json"
GRID_FILE = "grid.json"  # a tune run's summary at its end: trials, by status, best


def new_run_id() -> str:
    """The UTC start time, then a random suffix: run ids sort in the order runs started."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def write_run(out: Location, record: dict) -> None:
    """Replace OUT/run.json in one step (a rename, or one PUT on an object store)."""
    storage.write_bytes_atomic(out.join(RUN_FILE), json_text(record).encode("utf-8"))


def end_run(out: Location, record: dict) -> None:
    """Best effort: on a full disk even run.json may not be writable, and the error line still tells."""
    try:
        write_run(out, record)
    except OSError:
        pass


def read_run(out: Location) -> dict | None:
    """OUT/run.json, or None when there is none (or it is not JSON: a run that never wrote one whole)."""
    try:
        return json.loads(storage.read_bytes(out.join(RUN_FILE)))
    except (FileNotFoundError, ValueError):
        return None
