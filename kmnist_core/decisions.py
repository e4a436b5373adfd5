"""Review decisions: what people decided about predicted rows, kept as append-only data beside the predictions.

A decision is one row: the prediction row's key (`path_bytes`; a page box's key is its page path plus
`#xywh=...`, as in the predictions), the `label` given (a character of the model's card, `not_a_character`
or `unreadable`; null withdraws the key's earlier decisions, as an undo does), who decided and when, and
what the reviewer saw (model, predicted character, confidence, review reason).

Storage: `OUT/reviews/<UTC time>-<reviewer>-<random>.parquet`, each file a batch of decisions published
whole or not at all (temp + rename locally, one PUT on an object store) and never rewritten, so two
reviewers, two servers or an import can write at once and nothing is lost. The latest decision per key
wins (by `decided_at`, then file name, then row); the history stays. `predict --resume` and
`--overwrite` never touch `reviews/`.
"""

from __future__ import annotations

import getpass
import io
import re
import uuid
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kmnist_core import storage
from kmnist_core.card import ModelCard
from kmnist_core.errors import KmnistError
from kmnist_core.storage import Location

REVIEWS_DIR = "reviews"
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
    storage.make_dirs(folder)
    storage.write_bytes_atomic(folder.join(name), buf.getvalue(), fsync=True)
    return name


def read_file(folder: Location, name: str) -> pa.Table:
    """One published batch of decisions, as SCHEMA."""
    loc = folder.join(name)
    return pq.read_table(loc.path, filesystem=loc.fs).cast(SCHEMA)


def history_of(batches: dict[str, pa.Table]) -> pa.Table:
    """Batches (file name -> its decisions) as one history, oldest first: decided_at, then file name, then
    row. A reader that reads reviews/ a file at a time (the review server) gets read_history's order."""
    parts = []
    for i, name in enumerate(sorted(batches)):
        t = batches[name]
        parts.append(t.append_column("_order", pa.array([i * (1 << 32) + j for j in range(t.num_rows)], pa.int64())))
    if not parts:
        return SCHEMA.empty_table()
    history = pa.concat_tables(parts)
    history = history.sort_by([("decided_at", "ascending"), ("_order", "ascending")])
    return history.drop_columns(["_order"])


def read_history(out: Location) -> pa.Table:
    """Every decision ever made on OUT, oldest first (decided_at, then file name, then row)."""
    folder = reviews_dir(out)
    return history_of({name: read_file(folder, name) for name in storage.list_names(folder, ".parquet")})


def latest(history: pa.Table) -> pa.Table:
    """One row per key: its latest decision; keys whose latest decision was withdrawn are left out."""
    table = latest_by(history, ["key"])
    return table.filter(pc.is_valid(table["label"]))


def conflicts(history: pa.Table) -> pa.Table:
    """Keys whose reviewers disagree: each reviewer's latest label per key, where more than one label remains.
    A reviewer changing their own mind is not a conflict; a withdrawn decision takes that reviewer out."""
    if history.num_rows == 0:
        return pa.table({"key": pa.array([], pa.binary()), "path": pa.array([], pa.string()),
                         "labels": pa.array([], pa.string()), "reviewers": pa.array([], pa.string())})
    per_reviewer = latest_by(history, ["key", "reviewer"])
    per_reviewer = per_reviewer.filter(pc.is_valid(per_reviewer["label"]))
    rows = per_reviewer.select(["key", "path", "label", "reviewer"]).to_pylist()
    by_key: dict[bytes, list[dict]] = {}
    for r in rows:
        by_key.setdefault(r["key"], []).append(r)
    found = [rs for rs in by_key.values() if len({r["label"] for r in rs}) > 1]
    found.sort(key=lambda rs: rs[0]["key"])
    return pa.table({
        "key": pa.array([rs[0]["key"] for rs in found], pa.binary()),
        "path": pa.array([rs[0]["path"] for rs in found], pa.string()),
        "labels": pa.array([" / ".join(f"{r['label']} ({r['reviewer']})" for r in sorted(rs, key=lambda r: r["reviewer"]))
                            for rs in found], pa.string()),
        "reviewers": pa.array([", ".join(sorted({r["reviewer"] for r in rs})) for rs in found], pa.string()),
    })


def latest_by(history: pa.Table, keys: list[str]) -> pa.Table:
    """The last row of `history` (in decision order) for each combination of `keys`, in decision order."""
    if history.num_rows == 0:
        return history
    numbered = history.append_column("_i", pa.array(range(history.num_rows), pa.int64()))
    last = numbered.group_by(keys).aggregate([("_i", "max")])["_i_max"]
    return history.take(np.sort(last.to_numpy()))


def audit_summary(history: pa.Table, card: ModelCard) -> dict | None:
    """The measured error rate of auto-accepted rows: the latest audit decision per key against the
    prediction the reviewer saw, with a two-sided 95 % Clopper-Pearson interval, next to the card's
    promise (auto-accepted in-set crops right with at least its target precision). `unreadable` says
    nothing about the model and is left out; `not_a_character` on an auto-accepted row is an error.
    None when nothing was audited. (A minimal version for the review server; the report's may replace it.)"""
    from kmnist_core.calibration import rate_upper_bound  # here: calibration imports torch, which readers of decisions need not load

    audited = latest(history)
    audited = audited.filter(pc.equal(audited["kind"], "audit"))
    judged = [(r["label"], r["pred_char"]) for r in audited.select(["label", "pred_char"]).to_pylist()
              if r["label"] != UNREADABLE]
    if not judged:
        return None
    n = len(judged)
    errors = sum(label != pred for label, pred in judged)
    promise = (card.raw.get("calibration") or {}).get("review_promise") or {}
    target = promise.get("target_precision")
    return {
        "audited": n, "errors": errors, "unreadable": audited.num_rows - n, "error_rate": errors / n,
        # Two-sided 95 %: each bound one-sided at 97.5 %.
        "error_rate_ci95": [1.0 - rate_upper_bound(n - errors, n, 0.975), rate_upper_bound(errors, n, 0.975)],
        "promised_error_rate": None if target is None else 1.0 - target,
        "promised_confidence": promise.get("confidence_level"),
    }
