"""OUT/final/: the predictions with the review decisions (reviews/store.py) folded in, what an
archive publishes. `kmnist-batch report OUT` (and every predict run, at its end) rewrites it, as part of
the report set (reviews/report_set.py: a new generation, published whole).

One file per predictions shard, under the shard's name, one row per prediction row in the shard's
order: the key columns (`path`, `path_bytes`; on pages `page`, `box_x`, `box_y`, `box_w`, `box_h`,
`reading_index`), what the model said (`pred_char`, `review_reason`), and

- `final_char`: the reviewer's label when the row was decided (null for `not_a_character` and
  `unreadable`); else the model's character when it auto-accepted the row; else null (a flagged row
  nobody decided: error, blank, unknown character, low confidence);
- `final_source`: `review` (decided: also an audited auto-accepted row), `model` (auto-accepted, not
  decided), null (flagged, not decided);
- `review_label` (the decision's label, `not_a_character` and `unreadable` included), `reviewer`,
  `reviewed_at`: null when not decided.

The latest decision per key wins; decisions are matched by key whatever model or run they were made
on (a label is a fact about the crop). The folder is written fresh in each report generation, so files
of shards that no longer exist (an --overwrite run) are simply not there.
Memory: one shard's key columns and the latest decision per key (key, label, reviewer, time).
"""

from __future__ import annotations

import io
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kmnist_core import predictions, storage
from kmnist_core.card import ModelCard
from kmnist_core.review_reasons import REVIEW_REASONS
from kmnist_core.schema import PAGE_COLUMNS
from kmnist_core.storage import Location
from reviews import stats, store

FINAL_DIR = "final"
BOX_COLUMNS = ["page", "box_x", "box_y", "box_w", "box_h", "reading_index"]
FOLDED = pa.schema([
    pa.field("final_char", pa.string()),
    pa.field("final_source", pa.string()),  # review, model, or null
    pa.field("review_label", pa.string()),
    pa.field("reviewer", pa.string()),
    pa.field("reviewed_at", pa.timestamp("us", tz="UTC")),
])
# Of each decision: what folding needs, plus what the counts, conflicts and the audit read.
HISTORY_COLUMNS = ["key", "path", "label", "reviewer", "decided_at", "kind", "model_id", "run_id", "pred_char",
                   "review_reason"]
READ = ["path", "path_bytes", "pred_char", "review_reason", "model_id", "run_id"]


def match(rows: pa.Table, decided: pa.Table) -> pa.Array:
    """For each row, the index of its decision in `decided` (null: none)."""
    return pc.index_in(rows["path_bytes"], value_set=decided["key"].combine_chunks())


def fold(rows: pa.Table, decided: pa.Table, index: pa.Array | None = None) -> pa.Table:
    """`rows` (path_bytes, pred_char, review_reason) with FOLDED's columns appended (module doc).
    `decided`: one decision per key, none withdrawn (store.latest); `index`: match(rows, decided),
    when the caller has it already."""
    index = match(rows, decided) if index is None else index
    has = pc.is_valid(index)
    label = decided["label"].take(index)  # null where the row was not decided
    special = pc.fill_null(pc.is_in(label, value_set=pa.array(store.SPECIAL_LABELS)), False)
    accepted = pc.is_null(rows["review_reason"])
    null_text = pa.scalar(None, pa.string())
    model_char = pc.if_else(accepted, rows["pred_char"], null_text)
    final_char = pc.if_else(has, pc.if_else(special, null_text, label), model_char)
    source = pc.if_else(has, pa.scalar("review"), pc.if_else(accepted, pa.scalar("model"), null_text))
    columns = [final_char, source, label, decided["reviewer"].take(index), decided["decided_at"].take(index)]
    for field, column in zip(FOLDED, columns):
        rows = rows.append_column(field, pc.cast(column, field.type))
    return rows


def final_schema(rows: pa.Schema) -> pa.Schema:
    keys = [f for f in predictions.SCHEMA if f.name in ("path", "path_bytes")]
    boxes = [PAGE_COLUMNS.field(n) for n in BOX_COLUMNS if n in rows.names]
    what = [predictions.SCHEMA.field("pred_char"), predictions.SCHEMA.field("review_reason")]
    return pa.schema([*keys, *boxes, *what, *FOLDED])


class Tally:
    """What the decisions settled (reviewed and left per review reason, corrections, rows predicted
    again since their decision), summed over the folded shards."""

    def __init__(self):
        self.flagged: Counter = Counter()
        self.reviewed: Counter = Counter()
        self.labels: Counter = Counter()
        self.predicted_again: Counter = Counter()  # decided rows predicted again since, by the run that did
        self.auto_accepted = self.corrected = self.matched = self.other_model = 0

    def add(self, folded: pa.Table, seen: pa.Table) -> None:
        """`seen`: per row, the model_id and run_id its decision was made on (null: not decided)."""
        decided = pc.is_valid(folded["review_label"])
        reason = pc.fill_null(folded["review_reason"], "")  # "": auto-accepted
        self.flagged.update(predictions.value_counts(folded["review_reason"]))
        self.reviewed.update(predictions.value_counts(reason.filter(decided)))
        self.labels.update(predictions.value_counts(folded["review_label"].filter(decided)))
        self.auto_accepted += int(pc.sum(pc.equal(reason, "").cast(pa.int64())).as_py() or 0)
        self.matched += int(pc.sum(decided.cast(pa.int64())).as_py() or 0)
        changed = pc.fill_null(pc.not_equal(folded["review_label"], folded["pred_char"]), True)
        self.corrected += int(pc.sum(pc.and_(decided, changed).cast(pa.int64())).as_py() or 0)
        other_model = pc.fill_null(pc.not_equal(seen["model_id"], folded["model_id"]), True)
        self.other_model += int(pc.sum(pc.and_(decided, other_model).cast(pa.int64())).as_py() or 0)
        other_run = pc.and_(decided, pc.fill_null(pc.not_equal(seen["run_id"], folded["run_id"]), True))
        self.predicted_again.update(predictions.value_counts(folded["run_id"].filter(other_run)))

    def summary(self, decided: int) -> dict:
        return {
            "decided_rows": self.matched,
            "by_reason": {r: {"flagged": self.flagged.get(r, 0), "reviewed": self.reviewed.get(r, 0),
                              "left": self.flagged.get(r, 0) - self.reviewed.get(r, 0)} for r in REVIEW_REASONS},
            "auto_accepted": {"rows": self.auto_accepted, "reviewed": self.reviewed.get("", 0)},
            "corrected": self.corrected,  # decided with a label other than the model's character
            "labels": {label: self.labels.get(label, 0) for label in store.SPECIAL_LABELS},
            # Decided rows predicted again since the decision (--overwrite, or --resume re-reading an error
            # row), by the run that did; and of them, those predicted by another model now.
            "predicted_again": sum(self.predicted_again.values()),
            "predicted_again_by_run": dict(sorted(self.predicted_again.items())),
            "made_on_another_model": self.other_model,
            "not_in_predictions": decided - self.matched,  # keys no prediction row has (any more)
        }


def write_final(out: Location, target: Location, history: pa.Table, decided: pa.Table,
                card: ModelCard | None = None, precision: str | None = None) -> dict:
    """Write `target`/final/ (module doc) from OUT's committed shards and `history` (the review history,
    store.read_history with HISTORY_COLUMNS; `decided`: its store.latest); returns the review figures
    summary.json keeps: decisions, reviewers, reviewed and left per reason, corrections, conflicts, and the
    audit of auto-accepted rows against `card`'s promise (stats.audit_summary)."""
    folder = target.join(FINAL_DIR)
    storage.make_dirs(folder)
    tally = Tally()
    for name in predictions.shard_names(out):
        loc = predictions.predictions_dir(out).join(name)
        present = pq.read_schema(loc.path, filesystem=loc.fs).names
        rows = predictions.read_shard(predictions.predictions_dir(out), name, READ + [c for c in BOX_COLUMNS if c in present])
        index = match(rows, decided)
        folded = fold(rows, decided, index)
        tally.add(folded, decided.select(["model_id", "run_id"]).take(index))
        schema = final_schema(rows.schema)
        table = folded.select(schema.names).cast(schema)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        storage.write_bytes_atomic(folder.join(name), buf.getvalue())
    return {"decisions": history.num_rows,
            "reviewers": predictions.value_counts(decided["reviewer"]),
            **tally.summary(decided.num_rows),
            "conflicts": stats.conflicts(history).num_rows,
            "audit": stats.audit_summary(history, card, precision)}


def review_lines(reviews: dict) -> list[tuple[str, str]]:
    """(label, text) lines of the review figures (write_final's, or status's from the decisions alone,
    where `flagged` and `left` may be None: the run's counts are not known there)."""
    by = reviews["by_reason"]
    reviewed = sum(v["reviewed"] for v in by.values())
    if all(v["flagged"] is not None for v in by.values()):
        flagged, left = sum(v["flagged"] for v in by.values()), sum(v["left"] for v in by.values())
        text = f"{reviewed:,} of {flagged:,} flagged rows decided, {left:,} left"
        per_reason = [f"{r} {v['left']:,} left of {v['flagged']:,}" for r, v in by.items() if v["flagged"]]
    else:
        text = f"{reviewed:,} flagged rows decided"
        per_reason = [f"{r} {v['reviewed']:,}" for r, v in by.items() if v["reviewed"]]
    if per_reason:
        text += f" ({', '.join(per_reason)})"
    extra = [f"{reviews['auto_accepted']['reviewed']:,} auto-accepted rows reviewed"]
    if reviews.get("corrected") is not None:
        extra.append(f"{reviews['corrected']:,} corrected")
    reviewers = reviews.get("reviewers") or {}
    extra.append(f"by {len(reviewers)} reviewer{'s' if len(reviewers) != 1 else ''}")
    if reviews.get("conflicts"):
        extra.append(f"{reviews['conflicts']:,} keys with conflicting labels")
    lines = [("reviewed", f"{text}; {'; '.join(extra)}")]
    if reviews.get("predicted_again") or reviews.get("not_in_predictions"):
        lines.append(("reviews", f"decided rows predicted again since: {reviews.get('predicted_again') or 0:,} "
                                 f"({reviews.get('made_on_another_model') or 0:,} by another model); "
                                 f"decisions on keys no prediction row has: {reviews.get('not_in_predictions') or 0:,}"))
    if reviews.get("audit"):
        lines.append(("audit", stats.audit_text(reviews["audit"])))
    return lines
