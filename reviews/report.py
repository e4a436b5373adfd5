"""The report of an OUT: summary/ (plots, a per-folder table and summary.json), computed from the Parquet
output alone (rows plus the run options and model card in shard footers and predictions/_run-*.json;
run.json, when present, adds throughput), with final/ (the review decisions folded into the rows,
reviews/final.py; summary.json's `reviews` holds what they settled) and the page outputs
(reviews/pages_out.py). `write_report_set` builds them all from one read of the review history and
publishes them whole (reviews/report_set.py); `kmnist-batch report OUT` reruns it.

Memory is bounded by one shard: the rows are read a shard at a time, only the columns needed, and
folded into running counts, a confidence histogram, per-folder sums and, per review reason, the few
most doubtful rows the review sheet shows (only those crops are opened). Checking that no file has two
rows keeps 8 bytes per row (a 64-bit hash of each key).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import math
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kmnist_core import charts, predictions, storage
from kmnist_core.arrow_memory import arrow_on_one_thread
from kmnist_core.files import json_text
from kmnist_core.review_reasons import REVIEW_REASONS
from kmnist_core.run_record import read_run
from kmnist_core.safe_text import csv_cell
from kmnist_core.schema import KEY_COLUMNS
from kmnist_core.storage import Location
from reviews import report_set, store
from reviews.final import HISTORY_COLUMNS, write_final
from reviews.sheet import SHEET_LIMIT, sheet_order, write_review_sheet

SUMMARY_DIR = "summary"
BINS = np.linspace(0, 1, 41)
COLUMNS = [*KEY_COLUMNS, "pred_char", "confidence", "needs_review", "review_reason",
           "error_kind", "inverted", "model_id", "ood_score", "topk_chars", "topk_confidences",
           "ink_x", "ink_y", "ink_w", "ink_h"]
CHAR_BITS = 24  # a (folder, character) key: the folder's index above, the character's below
CHAR_MASK = (1 << CHAR_BITS) - 1
FOLDER_SUMS = ["files", "errors", "needs_review", *(f"review_{r}" for r in REVIEW_REASONS), "confidence_sum", "predicted"]


def top_folders(rel_path: pa.ChunkedArray) -> pa.Array:
    """The first folder of each relative path, "." for a file directly in its input root."""
    rel = pc.replace_substring(rel_path, "\\", "/")
    first = pc.list_element(pc.split_pattern(rel, "/", max_splits=1), 0)
    return pc.if_else(pc.match_substring(rel, "/"), first, pa.scalar("."))


def key_hashes(keys: pa.ChunkedArray) -> np.ndarray:
    return np.fromiter((int.from_bytes(hashlib.blake2b(k, digest_size=8).digest(), "little", signed=True)
                        for k in keys.to_pylist()), np.int64, count=len(keys))


class DuplicateKeys:
    """Counts keys seen more than once, in memory bounded by the largest shard rather than by the run: each
    key's 64-bit hash is spilled to one of BUCKETS temp files by its top BUCKET_BITS bits, and each file is
    counted alone, sorted in place. 10,000,000 rows: 1.2 MB a bucket, the count's peak 3.5 MB, where
    np.unique's copies took 11 MB, 16 buckets 39 MB and holding every hash 80 MB (sorting it as much again)."""

    BUCKET_BITS = 6
    BUCKETS = 1 << BUCKET_BITS

    def __init__(self):
        self.folder = tempfile.TemporaryDirectory(prefix="kmnist-keys-")
        self.files = [open(Path(self.folder.name, f"{b:02d}"), "wb") for b in range(self.BUCKETS)]

    def add(self, hashes: np.ndarray) -> None:
        bucket = (hashes.view(np.uint64) >> np.uint64(64 - self.BUCKET_BITS)).astype(np.intp)
        order = np.argsort(bucket, kind="stable")
        bounds = np.cumsum(np.bincount(bucket, minlength=self.BUCKETS))[:-1]
        for f, part in zip(self.files, np.split(hashes[order], bounds)):
            part.tofile(f)

    def count(self) -> int:
        try:
            for f in self.files:
                f.close()
            repeats = 0
            for f in self.files:
                hashes = np.fromfile(f.name, np.int64)
                hashes.sort()  # in place: np.unique's sorted copy and index arrays outweighed the bucket
                repeats += int(np.count_nonzero(hashes[1:] == hashes[:-1]))
            return repeats
        finally:
            self.folder.cleanup()


class Summary:
    """Running aggregates over the output rows, fed one shard at a time."""

    def __init__(self):
        self.rows = self.predicted = self.inverted = 0
        self.confidence_sum = 0.0
        self.errors_by_kind: Counter = Counter()
        self.reasons: Counter = Counter()
        self.chars: Counter = Counter()
        self.models: set[str] = set()
        self.histogram = np.zeros(len(BINS) - 1, np.int64)
        self.folders = FolderSums()
        self.sheet: dict[str, pa.Table] = {}
        self.keys = DuplicateKeys()

    def add(self, t: pa.Table) -> None:
        self.rows += t.num_rows
        self.keys.add(key_hashes(t.column("path_bytes")))
        predicted = t.column("pred_char").is_valid()
        ok = t.filter(predicted)
        self.predicted += ok.num_rows
        conf = ok.column("confidence").to_numpy()
        self.confidence_sum += float(conf.sum())
        self.histogram += np.histogram(conf, BINS)[0]
        self.inverted += int(pc.sum(ok.column("inverted")).as_py() or 0)
        for name, counter in (("error_kind", self.errors_by_kind), ("review_reason", self.reasons)):
            counter.update(predictions.value_counts(t.column(name)))
        self.chars.update(predictions.value_counts(ok.column("pred_char")))
        self.models.update(pc.unique(t.column("model_id")).to_pylist())
        self.folders.add(t, predicted)
        self.add_sheet(t)

    def add_sheet(self, t: pa.Table) -> None:
        """Keep, per reason, the SHEET_LIMIT rows the review sheet would show."""
        flagged = t.filter(t.column("needs_review"))
        for reason in pc.unique(flagged.column("review_reason")).drop_null().to_pylist():
            rows = flagged.filter(pc.equal(flagged.column("review_reason"), reason))
            both = pa.concat_tables([self.sheet[reason], rows]) if reason in self.sheet else rows
            self.sheet[reason] = sheet_order(both, reason, SHEET_LIMIT)

    def duplicates(self) -> int:
        return self.keys.count()

    def folder_table(self) -> list[dict]:
        return self.folders.rows()


class FolderSums:
    """Per input root and top folder: the counts, the confidence sum and how often each character was
    predicted. An archive has tens of thousands of folders, so a folder is an index into one array of
    sums (a row of floats, added a shard at a time as before) and its characters' counts are arrays of
    (folder, character) keys, merged with numpy once they outgrow the merged ones. `report` over
    100,000 rows in 10,000 folders peaked at 168 MB, against 184 MB with a dict of arrays and a Counter
    per folder (152 MB in 100 folders)."""

    def __init__(self):
        self.index: dict[tuple[str, str], int] = {}
        self.sums = np.zeros((0, len(FOLDER_SUMS)))
        self.char_index: dict[str, int] = {}
        # (folder << CHAR_BITS | character, count, first appearance): a character's first appearance in a
        # folder decides ties for the most common, as a Counter's insertion order did
        self.chars: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.seen = 0

    def add(self, t: pa.Table, predicted: pa.ChunkedArray) -> None:
        reason = t.column("review_reason")
        cols = {"root": t.column("input_root"), "folder": top_folders(t.column("rel_path")),
                "files": pa.repeat(1, t.num_rows), "errors": t.column("error_kind").is_valid().cast(pa.int64()),
                "needs_review": t.column("needs_review").cast(pa.int64()),
                **{f"review_{r}": pc.fill_null(pc.equal(reason, r), False).cast(pa.int64()) for r in REVIEW_REASONS},
                "confidence_sum": pc.fill_null(t.column("confidence"), 0.0), "predicted": predicted.cast(pa.int64()),
                "char": t.column("pred_char")}
        table = pa.table(cols)
        sums = table.group_by(["root", "folder"]).aggregate([(c, "sum") for c in FOLDER_SUMS])
        rows = self.folder_rows(sums)
        self.sums[rows] += np.column_stack([sums[f"{c}_sum"].to_numpy().astype(np.float64) for c in FOLDER_SUMS])
        chars = table.filter(predicted).group_by(["root", "folder", "char"], use_threads=False).aggregate([("files", "sum")])
        codes = np.array([self.char_index.setdefault(c, len(self.char_index)) for c in chars["char"].to_pylist()], np.int64)
        keys = self.folder_rows(chars) << CHAR_BITS | codes
        self.chars.append((keys, chars["files_sum"].to_numpy(), np.arange(self.seen, self.seen + len(keys))))
        self.seen += len(keys)
        if len(self.chars) > 1 and sum(len(k) for k, _, _ in self.chars[1:]) > max(len(self.chars[0][0]), 1024):
            self.chars = [self.merged_chars()]

    def folder_rows(self, table: pa.Table) -> np.ndarray:
        """Each row's folder index, new folders added (their sums start at 0)."""
        rows = np.array([self.index.setdefault(key, len(self.index)) for key in
                         zip(table["root"].to_pylist(), table["folder"].to_pylist())], np.int64)
        if len(self.index) > len(self.sums):
            grown = np.zeros((max(len(self.index), 2 * len(self.sums)), len(FOLDER_SUMS)))
            grown[: len(self.sums)] = self.sums
            self.sums = grown
        return rows

    def merged_chars(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One (key, count, first) per folder and character."""
        keys, counts, first = (np.concatenate(parts) for parts in zip(*self.chars))
        unique, inverse = np.unique(keys, return_inverse=True)
        merged_first = np.full(len(unique), np.iinfo(np.int64).max)
        np.minimum.at(merged_first, inverse, first)
        return unique, np.bincount(inverse, counts, len(unique)).astype(np.int64), merged_first

    def rows(self) -> list[dict]:
        """by_folder.csv's rows, sorted by root and folder: the counts, the mean confidence (None when
        nothing was predicted, or a confidence was NaN) and the most common character (ties: the one
        seen first)."""
        common: dict[int, str] = {}
        if self.chars:
            keys, counts, first = self.merged_chars()
            folder = keys >> CHAR_BITS
            order = np.lexsort((first, -counts, folder))  # per folder: most files, then seen first
            leaders = order[np.r_[True, folder[order][1:] != folder[order][:-1]]]
            chars = list(self.char_index)
            common = {int(folder[i]): chars[int(keys[i] & CHAR_MASK)] for i in leaders}
        out = []
        for (root, name), i in sorted(self.index.items()):
            s = dict(zip(FOLDER_SUMS, self.sums[i]))
            mean = float(s["confidence_sum"] / s["predicted"]) if s["predicted"] else math.nan
            out.append({"input_root": root, "top_folder": name, "files": int(s["files"]), "errors": int(s["errors"]),
                        "needs_review": int(s["needs_review"]), **{f"review_{r}": int(s[f"review_{r}"]) for r in REVIEW_REASONS},
                        "mean_confidence": None if math.isnan(mean) else mean, "most_common_char": common.get(i)})
        return out


def write_folder_csv(rows: list[dict], path: Path) -> None:
    """by_folder.csv: a header of the rows' keys (none when there are no rows), then the rows; text
    through csv_cell (folder names are data: no cell may run as a formula), floats as repr writes them,
    None as an empty cell."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(list(rows[0]) if rows else [])
        writer.writerows([csv_cell(v) for v in row.values()] for row in rows)


def upload(summary_dir: Path, target: Location) -> None:
    """An object-store report gets the summary files written locally, one PUT each."""
    for path in sorted(summary_dir.iterdir()):
        storage.write_bytes_atomic(target.join(SUMMARY_DIR, path.name), path.read_bytes())


def write_summary(out: Location, target: Location, opened: predictions.Opened, reviews: dict) -> dict:
    """`target`/summary/ (module doc) from OUT's rows; `opened`: OUT as open_predictions gave it (its runs and
    card); `reviews`: write_final's figures."""
    runs, card, latest = opened.runs, opened.card, opened.latest
    record = predictions.latest_run_record(out)
    run = read_run(out) or {}

    s = Summary()
    for table in predictions.iter_tables(out, COLUMNS):
        s.add(table)

    with tempfile.TemporaryDirectory() as tmp:
        summary_dir = Path(target.path, SUMMARY_DIR) if target.local else Path(tmp)
        summary_dir.mkdir(parents=True, exist_ok=True)
        chars = list(card.classes.chars) if card else sorted(s.chars)
        if len(chars) > 60:
            chars = [c for c, _ in s.chars.most_common(60)]
        charts.bar_chart(chars, np.array([s.chars.get(c, 0) for c in chars]), summary_dir / "class_distribution.png",
                         "Predicted characters", "crops")
        review_below = latest.get("review_below")
        charts.histogram(s.histogram, BINS, summary_dir / "confidence_histogram.png", "Calibrated confidence",
                         "confidence", review_below, f"review below {review_below:.3f}" if review_below is not None else "")
        write_review_sheet(s.sheet, dict(s.reasons), s.rows, summary_dir)
        write_folder_csv(s.folder_table(), summary_dir / "by_folder.csv")
        summary = {
            "files_seen": s.rows,
            "predicted": s.predicted,
            "errors": sum(s.errors_by_kind.values()),
            "errors_by_kind": dict(s.errors_by_kind.most_common()),
            # Every run walks the whole tree, so the latest run's skip counts are current.
            "skipped": record.get("discovery", {}).get("skipped", {}),
            "needs_review": sum(s.reasons.values()),
            "review_reasons": {r: s.reasons.get(r, 0) for r in REVIEW_REASONS},
            "review_below": latest.get("review_below"),
            "ood_threshold": latest.get("ood_threshold", card.calibration.ood_threshold if card else None),
            "inverted": s.inverted,
            "mean_confidence": s.confidence_sum / s.predicted if s.predicted else None,
            "runs": sorted(r["run_id"] for r in runs),
            "model_id": sorted(s.models),
            "crops_per_s": run.get("crops_per_s"),
            "elapsed_s": run.get("elapsed_s"),
            "duplicate_paths": s.duplicates(),
            "reviews": reviews,
        }
        (summary_dir / "summary.json").write_text(json_text(summary), encoding="utf-8")
        if not target.local:
            upload(summary_dir, target)
    return summary


def write_report_set(out: str | Path | Location, export: tuple[str, ...] | None = None) -> dict:
    """Every report output of OUT (final/, summary/, the page outputs) from one read of the review history,
    built in a new generation and published whole (reviews/report_set.py). `export`: the page exports
    (None: those the latest run asked for). Returns summary.json's content with `pages` added."""
    from reviews.pages_out import write_pages

    out = out if isinstance(out, Location) else storage.resolve(out)
    opened = predictions.open_predictions(out)
    if export is None:
        export = tuple(opened.latest.get("options", {}).get("export") or ())
    history = store.read_history(out, HISTORY_COLUMNS)  # the one read: final/ and pages agree
    decided = store.latest(history)
    gen = report_set.new_generation(out)
    # An object store's reads wait on the network, where Arrow's I/O threads do help.
    with arrow_on_one_thread() if out.local else contextlib.nullcontext():
        reviews = write_final(out, gen, history, decided, opened.card, opened.latest.get("precision"))
        summary = write_summary(out, gen, opened, reviews)
        summary["pages"] = write_pages(out, gen, export, decided)
    report_set.publish(out, gen, {"export": list(export), "decisions_read": history.num_rows,
                                  "runs": summary["runs"]})
    # Where a reader finds it: OUT itself on a file system (its links), the generation on an object store.
    return {**summary, "report_dir": out.uri if out.local else gen.uri}
