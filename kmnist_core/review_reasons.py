"""Why a row needs a human look: one reason per row, in a fixed precedence.

A pipeline trusts rows whose reason is None (`needs_review = false`). The precedence puts what is
certain first: a file that could not be read, then a crop with no ink, then a crop that is not one of
the model's characters, and only then a character the model is unsure about.
"""

from __future__ import annotations

import numpy as np

from kmnist_core.policy import confident

REVIEW_REASONS = ("error", "blank", "unknown_character", "low_confidence")


def review_reasons(error: np.ndarray, blank: np.ndarray, unknown: np.ndarray, confidence: np.ndarray,
                   review_below: float) -> np.ndarray:
    """Reason string or None per row (object array); `needs_review = reason is not None`.

    `confidence` may hold NaN where there is no prediction (error and blank rows); those rows are
    already decided by an earlier reason.
    """
    error, blank, unknown = (np.asarray(a, dtype=bool) for a in (error, blank, unknown))
    low = ~confident(confidence, review_below)  # NaN counts as low: never auto-accept a missing confidence
    reasons = np.full(len(error), None, dtype=object)
    # Assign from the lowest precedence up so a higher reason overwrites a lower one.
    for name, mask in zip(REVIEW_REASONS[::-1], (low, unknown, blank, error)):
        reasons[mask] = name
    return reasons
