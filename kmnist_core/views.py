"""Test-time views: fixed rotations and zooms of a model's input, whose log-probabilities are averaged.

Views cost model passes, so predict spends them only on the crops the model is unsure of (`with_views`:
as-is confidence under the card's gate); the card's temperature and thresholds are fitted on logits made
the same way (kmnist_core/recipe_thresholds.py).

Each view is a fixed bilinear resampling of the S x S crop (four weighted source pixels per pixel), so
the same numbers come out in the recipe, in predict's ONNX Runtime path and beside torch: no torch or
scipy.
It reproduces `transforms.affine` (torch's affine_grid + grid_sample, align_corners False, background
brought in from outside) to float rounding; tests/test_views.py checks that.
The views stay inside the strong augmentation's range (+-12 degrees, +-10 % zoom), so every view is a
crop the model was trained to read.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np

from kmnist_core.calibration import softmax

# The views a recipe's folds score, for its review to choose from: (rotation in degrees, zoom).
CANDIDATE_VIEWS: tuple[tuple[float, float], ...] = ((7.0, 1.0), (-7.0, 1.0), (0.0, 0.9), (0.0, 1.1))
# The views a recipe's card takes besides the crop as is: rotated +-7 degrees. Out of fold on hands-oe
# the two zooms added 0.13 points of accepted crops on the pooled folds' check (4 fewer accepted errors
# in 14,000) for a sixth of the model passes on in-set crops and two fifths on crops that are no
# character (bench/recipe_views.py, docs/model.md "The default model").
EXTRA_VIEWS: tuple[tuple[float, float], ...] = CANDIDATE_VIEWS[:2]


@lru_cache(maxsize=16)
def view_taps(degrees: float, zoom: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each output pixel's four bilinear source pixels and weights, (4, size*size) each: a source outside
    the image has weight 0 (background)."""
    cos, sin = math.cos(math.radians(degrees)) / zoom, math.sin(math.radians(degrees)) / zoom
    centres = (2 * np.arange(size) + 1) / size - 1  # normalized pixel centres (align_corners=False)
    gy, gx = np.meshgrid(centres, centres, indexing="ij")
    # source pixel coordinates of every output pixel
    sx = ((cos * gx - sin * gy + 1) * size - 1) / 2
    sy = ((sin * gx + cos * gy + 1) * size - 1) / 2
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    index, weight = [], []
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
            index.append(np.where(inside, yi * size + xi, 0).ravel())
            weight.append(np.where(inside, (1 - abs(sx - xi)) * (1 - abs(sy - yi)), 0.0).ravel())
    return np.stack(index), np.stack(weight).astype(np.float32)


def view_pixels(pixels: np.ndarray, degrees: float, zoom: float) -> np.ndarray:
    """One view of light-on-dark pixels (N, S, S), as float32 in the same 0-255 scale (the runtimes
    normalize them like uint8). Ink brought in from outside is background (0). Resampling before the
    normalization to [-1, 1] is the same as after it with background -1: both are linear. Elementwise
    in a fixed order, so a crop's view does not depend on the batch it is in (a BLAS matrix product's
    rounding can)."""
    n, size, _ = pixels.shape
    flat = pixels.reshape(n, size * size).astype(np.float32)
    index, weight = view_taps(degrees, zoom, size)
    out = flat[:, index[0]] * weight[0]
    for k in range(1, 4):
        out += flat[:, index[k]] * weight[k]
    return out.reshape(n, size, size)


def averaged(view_logits: list[np.ndarray]) -> np.ndarray:
    """The views' mean logits. Logits are log-probabilities up to a per-row shift, so a softmax of the
    mean (the calibrated confidence) is that of the mean log-probability, a geometric mean. The shift is
    kept, not normalized away: a reject-class model's outputs (models.RejectCNN) are log-probabilities
    whose total is 1 - p(none), and their energy, the out-of-set score, must survive the views."""
    return np.mean(view_logits, axis=0, dtype=np.float32)


def as_is_confidence(logits: np.ndarray, temperature: float) -> np.ndarray:
    """The confidence the views gate is compared with: softmax of the as-is logits / temperature, top class."""
    return softmax(logits, temperature).max(1) if len(logits) else np.zeros(0, np.float32)


def with_views(logits_of, pixels: np.ndarray, temperature: float, gate: float,
               extra: Sequence[Sequence[float]] = EXTRA_VIEWS) -> tuple[np.ndarray, np.ndarray]:
    """`logits_of(pixels)` on every crop, then on the `extra` views (degrees, zoom) of the unsure ones (as-is
    confidence at `temperature` under `gate`), whose logits become the views' averaged log-probabilities.
    Returns the logits and each crop's as-is confidence (the rows viewed are those under `gate`)."""
    out = logits_of(pixels)
    confidence = as_is_confidence(out, temperature)
    return view_rows(logits_of, pixels, out, confidence < gate, extra), confidence


def view_rows(logits_of, pixels: np.ndarray, as_is: np.ndarray, rows: np.ndarray,
              extra: Sequence[Sequence[float]] = EXTRA_VIEWS) -> np.ndarray:
    """`as_is` (the logits of `pixels`, changed in place) with the chosen `rows` replaced by their views'
    averaged log-probabilities."""
    if rows.any():
        chosen = pixels[rows]
        as_is[rows] = averaged([as_is[rows], *(logits_of(view_pixels(chosen, d, z)) for d, z in extra)])
    return as_is
