"""Review decisions: what people decided about predicted rows, kept as append-only data beside the predictions.

A decision is one row: the prediction row's key (`path_bytes`; a page box's key is its page path plus
`#xywh=...`, as in the predictions), the `label` given (a character of the model's card, `not_a_character`
or `unreadable`; null withdraws the key's earlier decisions, as an undo does), who decided and when, and
what the reviewer saw (model, predicted character, confidence, review reason).

Storage: `OUT/reviews/<UTC time>-<reviewer>-<random>.parquet`, each file a batch of decisions published
whole or not at all (temp + rename locally, one PUT on an object store) and never rewritten, so two
reviewers, two servers or an import can write at once and nothing is lost. The latest decision per key
wins (by `decided_at`, then file name, then row); the history stays. `predict --resume` and
`--overwrite` never touch `reviews/`. A saved batch survives a power cut: the file and the folder entry
of its rename are fsynced before `append` returns.

A file in `reviews/` that holds no decisions (not Parquet, damaged, another schema) blocks no reader: the
first to meet it moves it to `reviews/_quarantine/` with a warning, and the decisions of every other file
count (`kmnist-batch status` lists what was set aside). Readers also remove the temp files of writers that
died mid-write (kmnist_core.storage.remove_stale_temps).

What the history says (conflicts, the audit figure) is computed in reviews/stats.py.
"""

from __future__ import annotations

import getpass
import io
import re
import sys
import uuid
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kmnist_core import storage
from kmnist_core.errors import KmnistError
from kmnist_core.safe_text import terminal
from kmnist_core.storage import Location

REVIEWS_DIR = "reviews"
QUARANTINE_DIR = "_quarantine"  # "_": Parquet dataset readers (pyarrow, pandas, Spark) skip it in reviews/
NOT_A_CHARACTER = "not_a_character"
UNREADABLE = "unreadable"
SPECIAL_LABELS = (NOT_A_CHARACTER, UNREADABLE)
KINDS = ("review", "audit")  # audit: a seeded sample of auto-accepted rows, checked to measure their error rate

SCHEMA = pa.schema([
    pa.field("key", pa.binary(), nullable=False),  # the prediction row's path_bytes
    pa.field("path", pa.string()),  # the prediction row's path, for people and imports
    pa.field("label", pa.string()),  # a card character, not_a_character, unreadable; null: decision withdrawn
    pa.field("reviewer", pa.string(), nullable=False),
    pa.field("decided_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("kind", pa.string(), nullable=False),  # review or audit
    pa.field("source", pa.string(), nullable=False),  # "ui", or "import:<file name>"
    pa.field("model_id", pa.string()),  # what the reviewer saw: the row's model ...
    pa.field("run_id", pa.string()),
    pa.field("pred_char", pa.string()),  # ... its top-1 ...
    pa.field("confidence", pa.float32()),  # ... with its calibrated confidence ...
    pa.field("review_reason", pa.string()),  # ... and why it was flagged (null: auto-accepted)
])
SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
# Of the prediction row decided on: what a decision records of it (decision_row).
SEEN = ["path", "path_bytes", "model_id", "run_id", "pred_char", "confidence", "review_reason"]


def default_reviewer() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (a container without a passwd entry)
        return "reviewer"


def reviews_dir(out: Location) -> Location:
    return out.join(REVIEWS_DIR)


def allowed_labels(classes: tuple[str, ...]) -> set[str]:
    return {*classes, *SPECIAL_LABELS}


def check_labels(labels: list[str | None], classes: tuple[str, ...]) -> None:
    """Refuse a label outside the card (null is allowed: it withdraws a decision)."""
    allowed = allowed_labels(classes)
    bad = sorted({lab for lab in labels if lab is not None and lab not in allowed})
    if bad:
        raise KmnistError(f"label {bad[0]!r} is not one of the model's characters ({''.join(classes)}) "
                          f"nor {' / '.join(SPECIAL_LABELS)}")


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def decision_table(rows: list[dict], classes: tuple[str, ...]) -> pa.Table:
    """Decisions as a table of SCHEMA; each row a dict of SCHEMA's names (decided_at defaults to now)."""
    check_labels([r.get("label") for r in rows], classes)
    for r in rows:
        if r.get("kind", "review") not in KINDS:
            raise KmnistError(f"decision kind must be one of {', '.join(KINDS)}, not {r['kind']!r}")
    stamp = now_utc()
    columns = {f.name: [r.get(f.name) for r in rows] for f in SCHEMA}
    columns["decided_at"] = [r.get("decided_at") or stamp for r in rows]
    columns["kind"] = [r.get("kind") or "review" for r in rows]
    columns["source"] = [r.get("source") or "ui" for r in rows]
    return pa.table(columns, schema=SCHEMA)


def decision_row(row: dict, label: str | None, reviewer: str, kind: str, source: str) -> dict:
    """A decision on prediction row `row` (a dict holding SEEN's columns), for decision_table: its key
    and what the reviewer saw of it, with the label given (None withdraws), who gave it, the kind (review
    or audit) and the source ("ui", or "import:<file name>")."""
    return {"key": row["path_bytes"], "path": row["path"], "label": label, "reviewer": reviewer, "kind": kind,
            "source": source, **{c: row[c] for c in SEEN if c not in ("path", "path_bytes")}}


def append(out: Location, table: pa.Table) -> str:
    """Publish a batch of decisions as a new file under OUT/reviews/ (fsynced before it is visible);
    returns its name. Once this returns, the decisions survive a kill -9 of the writer."""
    if table.num_rows == 0:
        return ""
    table = table.cast(SCHEMA)
    reviewer = SAFE_NAME.sub("_", table["reviewer"][0].as_py())[:40] or "reviewer"
    name = f"{now_utc().strftime('%Y%m%dT%H%M%S%fZ')}-{reviewer}-{uuid.uuid4().hex[:8]}.parquet"
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    folder = reviews_dir(out)
    storage.make_dirs(folder, durable=True)
    storage.write_bytes_atomic(folder.join(name), buf.getvalue(), fsync=True)
    return name


def columns_schema(columns: list[str] | None) -> pa.Schema:
    """SCHEMA, or only `columns` of it (decided_at always: it orders the history)."""
    names = SCHEMA.names if columns is None else [n for n in SCHEMA.names if n in columns or n == "decided_at"]
    return pa.schema([SCHEMA.field(n) for n in names])


def warn(text: str) -> None:
    print(f"warning: {terminal(text)}", file=sys.stderr)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


def decision_batch(data: bytes) -> pa.Table:
    """The decisions in a file's bytes, as SCHEMA; an Arrow error or ValueError says why they are not."""
    table = pq.read_table(pa.BufferReader(data))
    missing = [n for n in SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"no column {', '.join(missing)}")
    return table.select(SCHEMA.names).cast(SCHEMA)  # the cast refuses a null where SCHEMA has none


def read_batch(folder: Location, name: str, columns: list[str] | None = None,
               warned: set[str] | None = None) -> pa.Table | None:
    """One published batch of decisions (only `columns`, to keep a large history small in memory); None
    when there are none to read, with a warning line on stderr naming the file and why:
    - a file that is not a batch of decisions (not Parquet, damaged, another schema, a null where every
      decision has a value) is moved to reviews/_quarantine/, out of every reader's way;
    - a file that cannot be read now (no permission, a network error) stays, to be read next time.
    `warned`: names warned about already, not again (the review server lists reviews/ every second).
    A file gone since the folder was listed (another reader moved it) is None without a word."""
    loc = folder.join(name)
    try:
        data = storage.read_bytes(loc)
    except FileNotFoundError:
        return None
    except OSError as e:  # the bytes could not be read: nothing is known about them
        problem = f"cannot read {loc.uri} ({one_line(e)}): its decisions are left out until it can be read"
    else:
        try:
            return decision_batch(data).select(columns_schema(columns).names)
        except (pa.ArrowException, OSError, ValueError) as e:  # no decisions (damaged Parquet: an OSError)
            problem = set_aside(folder, name, one_line(e))
    if problem is not None and (warned is None or name not in warned):
        warn(problem)
        if warned is not None:
            warned.add(name)
    return None


def set_aside(folder: Location, name: str, reason: str) -> str | None:
    """Move file `name` of reviews/ to reviews/_quarantine/ (under a name free there); returns the
    warning, or None when another reader moved it first (and warned)."""
    place = folder.join(QUARANTINE_DIR)
    target, n = name, 0
    try:
        while storage.exists(place.join(target)):  # never over an earlier file of the same name
            n += 1
            target = f"{name}.{n}"
        storage.move(folder.join(name), place.join(target))
    except FileNotFoundError:
        return None
    except OSError as e:  # a read-only OUT: left in place, and left out of the decisions all the same
        return (f"{folder.join(name).uri} holds no review decisions ({reason}): left out; it could not be moved "
                f"to {place.uri} ({one_line(e)})")
    return f"{folder.join(name).uri} holds no review decisions ({reason}): moved to {place.join(target).uri}, left out"


def quarantined(out: Location) -> list[str]:
    """Names of the files set aside from OUT/reviews/ because they held no decisions (read_batch)."""
    return storage.list_names(reviews_dir(out).join(QUARANTINE_DIR))


def read_history(out: Location, columns: list[str] | None = None) -> pa.Table:
    """Every decision ever made on OUT, oldest first (decided_at, then file name, then row); files that
    hold none are set aside (read_batch)."""
    folder = reviews_dir(out)
    storage.remove_stale_temps(folder)
    batches = {name: read_batch(folder, name, columns) for name in storage.list_names(folder, ".parquet")}
    return history_of({name: t for name, t in batches.items() if t is not None}, columns)


def history_of(batches: dict[str, pa.Table], columns: list[str] | None = None) -> pa.Table:
    """Batches (file name -> its decisions) as one history, oldest first: decided_at, then file name, then
    row. A reader that reads reviews/ a file at a time (the review server) gets read_history's order."""
    parts = []
    for i, name in enumerate(sorted(batches)):
        t = batches[name]
        parts.append(t.append_column("_order", pa.array([i * (1 << 32) + j for j in range(t.num_rows)], pa.int64())))
    if not parts:
        return columns_schema(columns).empty_table()
    history = pa.concat_tables(parts)
    history = history.sort_by([("decided_at", "ascending"), ("_order", "ascending")])
    return history.drop_columns(["_order"])


def latest(history: pa.Table) -> pa.Table:
    """One row per key: its latest decision; keys whose latest decision was withdrawn are left out."""
    table = latest_by(history, ["key"])
    return table.filter(pc.is_valid(table["label"]))


def latest_by(history: pa.Table, keys: list[str]) -> pa.Table:
    """The last row of `history` (in decision order) for each combination of `keys`, in decision order."""
    if history.num_rows == 0:
        return history
    numbered = history.append_column("_i", pa.array(range(history.num_rows), pa.int64()))
    last = numbered.group_by(keys).aggregate([("_i", "max")])["_i_max"]
    return history.take(np.sort(last.to_numpy()))
