"""What the decisions of an OUT say, computed from their history (reviews/store.py read_history): keys
reviewers disagree on (`conflicts`, and the lines `review --conflicts` prints) and the audit of the
auto-accepted rows against the card's promise (`audit_summary`, `audit_text`). Nothing here reads or
writes files.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from kmnist_core.calibration import rate_upper_bound
from kmnist_core.card import ModelCard
from kmnist_core.policy import calibration_for
from kmnist_core.safe_text import terminal
from reviews.store import NOT_A_CHARACTER, SPECIAL_LABELS, UNREADABLE, latest, latest_by


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
    """What `review --conflicts` prints: one line per conflicting key, `path: label (reviewer) / label
    (reviewer)`, then how many keys there are. Paths and reviewer names are data: terminal() escapes them."""
    lines = [f"{terminal(r['path'])}: {terminal(r['labels'])}" for r in found.select(["path", "labels"]).to_pylist()]
    return "\n".join([*lines, f"{found.num_rows:,} keys with different labels from different reviewers"])


AUDIT_LEVEL = 0.95  # the audit interval: two-sided, as a measurement is reported (the card's promise is one-sided)


def review_promise(card: ModelCard, precision: str | None = None) -> dict | None:
    """What the card promises of auto-accepted rows (fitted on validation): the int8 twin's own when
    `precision` is int8 and its refit is current, else the fp32 model's; None for a card without one."""
    return calibration_for(card, precision or "fp32").review_promise


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
