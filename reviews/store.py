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
from kmnist_core.calibration import rate_upper_bound
from kmnist_core.card import ModelCard
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


def conflicts(history: pa.Table) -> pa.Table:
    """Keys whose reviewers disagree: each reviewer's latest label per key, where more than one label remains.
    A reviewer changing their own mind is not a conflict; a withdrawn decision takes that reviewer out.
    `current`: the label that counts now (the key's latest decision; null when that was a withdrawal)."""
    if history.num_rows == 0:
        return pa.table({"key": pa.array([], pa.binary()), "path": pa.array([], pa.string()),
                         "labels": pa.array([], pa.string()), "reviewers": pa.array([], pa.string()),
                         "current": pa.array([], pa.string())})
    per_reviewer = latest_by(history, ["key", "reviewer"])
    per_reviewer = per_reviewer.filter(pc.is_valid(per_reviewer["label"]))
    rows = per_reviewer.select(["key", "path", "label", "reviewer"]).to_pylist()
    by_key: dict[bytes, list[dict]] = {}
    for r in rows:
        by_key.setdefault(r["key"], []).append(r)
    found = [rs for rs in by_key.values() if len({r["label"] for r in rs}) > 1]
    found.sort(key=lambda rs: rs[0]["key"])
    now = latest(history)
    current = dict(zip(now["key"].to_pylist(), now["label"].to_pylist())) if found else {}
    return pa.table({
        "key": pa.array([rs[0]["key"] for rs in found], pa.binary()),
        "path": pa.array([rs[0]["path"] for rs in found], pa.string()),
        "labels": pa.array([" / ".join(f"{r['label']} ({r['reviewer']})" for r in sorted(rs, key=lambda r: r["reviewer"]))
                            for rs in found], pa.string()),
        "reviewers": pa.array([", ".join(sorted({r["reviewer"] for r in rs})) for rs in found], pa.string()),
        "current": pa.array([current.get(rs[0]["key"]) for rs in found], pa.string()),
    })


def conflicts_text(found: pa.Table) -> str:
    """`review --conflicts`: a header, then one tab-separated line per conflicting key (path, each
    reviewer's label, the label that counts now); a line saying so when there is none."""
    if found.num_rows == 0:
        return "no conflicts: no key was given different labels"
    lines = ["path\tlabels (reviewer)\tcounts now"]
    for r in found.select(["path", "labels", "current"]).to_pylist():
        lines.append(f"{terminal(r['path'])}\t{terminal(r['labels'])}\t{terminal(r['current'] or 'none (withdrawn)')}")
    return "\n".join(lines)


def latest_by(history: pa.Table, keys: list[str]) -> pa.Table:
    """The last row of `history` (in decision order) for each combination of `keys`, in decision order."""
    if history.num_rows == 0:
        return history
    numbered = history.append_column("_i", pa.array(range(history.num_rows), pa.int64()))
    last = numbered.group_by(keys).aggregate([("_i", "max")])["_i_max"]
    return history.take(np.sort(last.to_numpy()))


AUDIT_LEVEL = 0.95  # the audit interval: two-sided, as a measurement is reported (the card's promise is one-sided)


def review_promise(card: ModelCard, precision: str | None = None) -> dict | None:
    """What the card promises of auto-accepted rows (fitted on validation): the int8 twin's own when
    `precision` is int8 and its refit is current, else the fp32 model's; None for a card without one."""
    return card.calibration_for(precision or "fp32").review_promise


def clopper_pearson(hits: int, n: int, level: float = AUDIT_LEVEL) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval of a rate measured as hits / n: each end a one-sided bound at
    (1 + level) / 2."""
    one_sided = (1 + level) / 2
    low = 0.0 if hits == 0 else 1.0 - rate_upper_bound(n - hits, n, one_sided)
    return low, rate_upper_bound(hits, n, one_sided)


def audit_summary(history: pa.Table, card: ModelCard | None, precision: str | None = None) -> dict | None:
    """The measured error rate of the auto-accepted rows of a run, from its audit decisions, next to the
    card's promise; None when no audit decision counts.

    Counted: each key's latest decision of kind "audit" (a withdrawn one takes the key out), made on a
    row that was auto-accepted (review_reason null) by the card's model; audits of another model's rows
    (an OUT predicted again with --overwrite) are only counted in `other_model`.
    Wrong: the reviewer's label differs from the character the model gave the row (`pred_char` as the
    reviewer saw it). `not_a_character` and `unreadable` count as wrong too: auto-accepting a row promises
    it is that character, and a crop nobody can read cannot be confirmed as one.
    `error_rate` comes with its two-sided 95 % Clopper-Pearson interval. The card promises precision >=
    target (one-sided, at its confidence level), so error rate <= 1 - target: `verdict` is "kept" when
    the interval's upper end is at or below that, "broken" when its lower end is above it, "open" in
    between (audit more rows). The rate is that of all auto-accepted rows when every one had the same
    chance to be sampled (a simple random sample, or one stratified in proportion).
    """
    audits = history.filter(pc.equal(history["kind"], "audit"))
    audits = latest_by(audits, ["key"])
    audits = audits.filter(pc.and_(pc.is_valid(audits["label"]), pc.is_null(audits["review_reason"])))
    if card is not None:
        ours = audits.filter(pc.fill_null(pc.equal(audits["model_id"], card.model_id), False))
        other_model, audits = audits.num_rows - ours.num_rows, ours
    else:
        other_model = 0
    n = audits.num_rows
    if n == 0:
        return None
    labels, predicted = audits["label"].to_pylist(), audits["pred_char"].to_pylist()
    wrong_by = {"other_character": 0, NOT_A_CHARACTER: 0, UNREADABLE: 0}
    for label, pred in zip(labels, predicted):
        if label != pred:
            wrong_by[label if label in SPECIAL_LABELS else "other_character"] += 1
    wrong = sum(wrong_by.values())
    low, high = clopper_pearson(wrong, n)
    promise = review_promise(card, precision) if card is not None else None
    summary = {"audited": n, "wrong": wrong, "wrong_by": wrong_by, "error_rate": wrong / n,
               "interval": [low, high], "interval_level": AUDIT_LEVEL, "model_id": card.model_id if card else None,
               "other_model": other_model, "promise": None, "verdict": None}
    if promise and promise.get("target_precision") is not None:
        max_error = 1.0 - float(promise["target_precision"])
        summary["promise"] = {"max_error_rate": max_error, "target_precision": promise["target_precision"],
                              "confidence_level": promise.get("confidence_level"),
                              "validation_precision_lower_bound": promise.get("precision_lower_bound"),
                              "validation_auto_accepted_share": promise.get("auto_accepted_share")}
        summary["verdict"] = "kept" if high <= max_error else "broken" if low > max_error else "open"
    return summary


VERDICTS = {"kept": "the promise holds", "broken": "the promise is broken on this archive",
            "open": "not settled: audit more rows"}


def audit_text(audit: dict) -> str:
    """The audit figure in one line (status, report)."""
    low, high = audit["interval"]
    text = (f"{audit['audited']:,} auto-accepted rows checked, {audit['wrong']:,} wrong: error rate "
            f"{audit['error_rate']:.2%} (95% CI {low:.2%}-{high:.2%})")
    promise = audit.get("promise")
    if promise:
        text += f"; the card promises <= {promise['max_error_rate']:.2%}: {VERDICTS[audit['verdict']]}"
    if audit.get("other_model"):
        text += f" ({audit['other_model']:,} audits of another model's rows not counted)"
    return text
