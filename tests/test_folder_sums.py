"""reviews/report.py FolderSums (by_folder.csv's rows) against the plain Python it replaced: running
float sums and a Counter per folder, over shards that make it compact its parts many times."""

import math
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa

from kmnist_core.review_reasons import REVIEW_REASONS
from reviews.report import FOLDER_SUMS, FolderSums, top_folders


def shard(rng: np.random.Generator, n: int) -> pa.Table:
    """Rows as the report reads them: two roots, a few hundred folders, ties between characters, errors
    (no character), NaN confidences."""
    roots = rng.choice(["/in/a", "/in/b"], n)
    rel = [f"f{rng.integers(300)}/{i}.png" if rng.random() < 0.95 else f"top-{i}.png" for i in range(n)]
    error = rng.random(n) < 0.05
    chars = rng.choice(list("おきすつなはまやれを"), n)
    confidence = rng.random(n)
    confidence[rng.random(n) < 0.01] = np.nan
    reason = rng.choice([None, *REVIEW_REASONS], n, p=[0.6] + [0.4 / len(REVIEW_REASONS)] * len(REVIEW_REASONS))
    return pa.table({"input_root": roots, "rel_path": rel,
                     "error_kind": pa.array(np.where(error, "corrupt", None).tolist(), pa.string()),
                     "needs_review": pa.array([r is not None for r in reason]),
                     "review_reason": pa.array(reason.tolist(), pa.string()),
                     "confidence": pa.array(np.where(error, np.nan, confidence), mask=error),
                     "pred_char": pa.array(chars.tolist(), mask=error)})


def reference(shards: list[pa.Table]) -> list[dict]:
    """What the report computed before: a numpy row of float sums and a Counter per folder."""
    sums: dict[tuple, np.ndarray] = defaultdict(lambda: np.zeros(len(FOLDER_SUMS)))
    chars: dict[tuple, Counter] = defaultdict(Counter)
    for t in shards:
        per_shard: dict[tuple, np.ndarray] = defaultdict(lambda: np.zeros(len(FOLDER_SUMS)))
        folders = top_folders(t["rel_path"]).to_pylist()
        for row, folder in zip(t.to_pylist(), folders):
            key = (row["input_root"], folder)
            ok = row["pred_char"] is not None
            values = {"files": 1, "errors": row["error_kind"] is not None, "needs_review": row["needs_review"],
                      **{f"review_{r}": row["review_reason"] == r for r in REVIEW_REASONS},
                      "confidence_sum": row["confidence"] if ok else 0.0, "predicted": ok}
            per_shard[key] += [values[c] for c in FOLDER_SUMS]
            if ok:
                chars[key][row["pred_char"]] += 0  # first appearance, in row order as the group-by's
        for key, values in per_shard.items():
            sums[key] += values
        for row, folder in zip(t.to_pylist(), folders):
            if row["pred_char"] is not None:
                chars[(row["input_root"], folder)][row["pred_char"]] += 1
    rows = []
    for (root, folder), values in sorted(sums.items()):
        s = dict(zip(FOLDER_SUMS, values))
        mean = s["confidence_sum"] / s["predicted"] if s["predicted"] else math.nan
        common = [c for c, n in chars[(root, folder)].most_common(1) if n]
        rows.append({"input_root": root, "top_folder": folder, "files": int(s["files"]), "errors": int(s["errors"]),
                     "needs_review": int(s["needs_review"]), **{f"review_{r}": int(s[f"review_{r}"]) for r in REVIEW_REASONS},
                     "mean_confidence": None if math.isnan(mean) else mean,
                     "most_common_char": common[0] if common else None})
    return rows


def test_folder_rows_match_running_sums_and_counters():
    rng = np.random.default_rng(0)
    shards = [shard(rng, int(rng.integers(1, 400))) for _ in range(60)]
    sums = FolderSums()
    for t in shards:
        sums.add(t, t["pred_char"].is_valid())
    mine, theirs = sums.rows(), reference(shards)
    assert len(mine) == len(theirs) > 500
    for a, b in zip(mine, theirs):
        assert a.keys() == b.keys()
        for key in a:
            if key == "mean_confidence" and a[key] is not None and b[key] is not None:
                assert math.isclose(a[key], b[key], rel_tol=1e-12), (a, b)
            else:
                assert a[key] == b[key], (key, a, b)
    assert any(r["mean_confidence"] is None for r in mine)  # a NaN confidence, or nothing predicted
    assert len(sums.chars) < len(shards) / 3  # the parts were merged along the way


def test_no_rows_no_folders():
    assert FolderSums().rows() == []
