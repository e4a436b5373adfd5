"""`--audit N`: a seeded random sample of N auto-accepted rows, stratified by predicted class and confidence.

Strata are (predicted class, confidence tercile among the auto-accepted rows). Each stratum gets its
share of N by proportional allocation (largest remainder), so the sample mirrors the accepted rows and
its plain error rate estimates theirs without weights, which is what the Clopper-Pearson interval of
reviews.stats.audit_summary assumes. Rows are drawn without replacement by a numpy Generator
seeded with --seed, stratum by stratum in a fixed order: the same OUT and seed give the same sample on
every server and after every restart, so an audit can be continued.
"""

from __future__ import annotations

import numpy as np

CONFIDENCE_BINS = 3


def strata(pred_index: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """Each row's stratum: predicted class x confidence tercile (terciles of these rows' confidences)."""
    edges = np.quantile(confidence, np.arange(1, CONFIDENCE_BINS) / CONFIDENCE_BINS) if len(confidence) else []
    bins = np.searchsorted(edges, confidence, side="right")
    return pred_index.astype(np.int64) * CONFIDENCE_BINS + bins


def allocate(sizes: np.ndarray, n: int) -> np.ndarray:
    """Split n over strata of `sizes` in proportion (largest remainder; ties to the lower stratum)."""
    total = int(sizes.sum())
    if n >= total:
        return sizes.copy()
    quota = sizes * n / total
    counts = np.floor(quota).astype(np.int64)
    left = n - int(counts.sum())
    by_remainder = np.lexsort((np.arange(len(sizes)), -(quota - counts)))
    counts[by_remainder[:left]] += 1
    return counts


def draw(pred_index: np.ndarray, confidence: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Positions (ascending) of the sampled rows among the auto-accepted rows given."""
    if n <= 0 or len(pred_index) == 0:
        return np.zeros(0, np.int64)
    stratum = strata(pred_index, confidence)
    ids, inverse, sizes = np.unique(stratum, return_inverse=True, return_counts=True)
    counts = allocate(sizes, n)
    rng = np.random.default_rng(seed)
    members = np.argsort(inverse, kind="stable")  # row positions grouped by stratum, in row order
    starts = np.concatenate([[0], np.cumsum(sizes)])
    chosen = [rng.choice(members[starts[i]:starts[i + 1]], counts[i], replace=False)
              for i in range(len(ids)) if counts[i]]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
