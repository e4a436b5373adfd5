"""A loaded model deciding crops: the `Predictor`, and what it returns for one crop (`Prediction`) or for a
batch of model inputs (`Assessment`).

A Predictor holds its runtimes (the fp32 model, and the int8 twin when int8 runs) and the `DecisionPolicy`
(kmnist_core/policy.py) that everything it decides comes from. kmnist_core/model_dir.py `build_predictor`
makes one from a checked model directory; this module reads no files. No torch here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from kmnist_core.calibration import ood_score, softmax
from kmnist_core.card import ModelCard
from kmnist_core.int8 import near_decision, near_gate
from kmnist_core.ort_model import OrtModel
from kmnist_core.policy import DecisionPolicy, accepted, out_of_set
from kmnist_core.preprocess import PreparedImage, prepare_array, prepare_image
from kmnist_core.views import as_is_confidence, view_rows, with_views


@dataclass(frozen=True)
class Prediction:
    """One crop's prediction. A blank crop holds no character: every field but review_reason ("blank") and
    precision is None, as in predict's rows."""

    index: int | None
    char: str | None
    codepoint: str | None
    confidence: float | None  # calibrated probability of `index`
    probabilities: np.ndarray | None  # (num_classes,), calibrated
    ood_score: float | None  # higher = less like any of the model's classes
    review_reason: str | None  # None = auto-accepted; see kmnist_core.review_reasons
    precision: str  # the runtime that computed it: int8, or fp32 (also for int8's rows near a decision)


@dataclass(frozen=True)
class Assessment:
    probabilities: np.ndarray  # (N, C) float32, calibrated
    ood_score: np.ndarray  # (N,) float32, higher = less like any of the model's classes
    unknown: np.ndarray  # (N,) bool, ood_score above the ood_threshold (all False without one)
    fp32_rows: np.ndarray  # (N,) bool, rows the fp32 model computed (all of them unless the Predictor runs int8)


def decided(logits: np.ndarray, policy: DecisionPolicy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw logits' calibrated probabilities, out-of-set score and unknown flag under `policy`."""
    score = ood_score(logits, policy.ood_score).astype(np.float32)
    return softmax(logits, policy.temperature).astype(np.float32), score, out_of_set(score, policy.ood_threshold)


def readings_agree(a: np.ndarray, b: np.ndarray, policy: DecisionPolicy) -> np.ndarray:
    """Per row, whether two readings' logits get the same decisions: top-1, out of set and auto-accepted."""
    (probs_a, _, unknown_a), (probs_b, _, unknown_b) = decided(a, policy), decided(b, policy)
    accepted_a = accepted(unknown_a, probs_a.max(1), policy.review_below)
    accepted_b = accepted(unknown_b, probs_b.max(1), policy.review_below)
    return (probs_a.argmax(1) == probs_b.argmax(1)) & (unknown_a == unknown_b) & (accepted_a == accepted_b)


class Predictor:
    """A loaded model plus everything needed to turn crops into calibrated class probabilities and decisions.

    Everything it decides comes from `policy` (kmnist_core/policy.py): the precision ("fp32" runs `fp32`;
    "int8" runs `int8`, an OrtModel, with `fp32` recomputing the rows near a decision), the temperature and
    both review thresholds. `fp32` computes fp32 logits: an OrtModel of the fp32 twin on CPU, or a
    TorchModel (kmnist_core/models.py) on a GPU or for a directory without a usable twin. `probe` is the
    int8 twin's probe result on this CPU (kmnist_core/int8.py check_probe). `temperature`, `review_below`,
    ... read the policy."""

    def __init__(self, fp32, card: ModelCard, policy: DecisionPolicy, int8: OrtModel | None = None,
                 probe: dict | None = None):
        if (policy.used == "int8") != (int8 is not None):
            raise ValueError("an int8 Predictor needs its OrtModel, and only it")
        self.fp32 = fp32
        self.card = card
        self.policy = policy
        self.probe = probe
        self.int8 = int8
        self.classes = card.classes
        self.input_size = card.input_size
        self.model_id = card.model_id

    precision = property(lambda self: self.policy.used)
    precision_note = property(lambda self: self.policy.precision.note)
    calibration = property(lambda self: self.policy.calibration)
    temperature = property(lambda self: self.policy.temperature)
    review_below = property(lambda self: self.policy.review_below)
    ood_method = property(lambda self: self.policy.ood_score)
    ood_threshold = property(lambda self: self.policy.ood_threshold)  # None: the card has no out-of-set threshold

    def with_thresholds(self, review_below: float | None = None, ood_threshold: float | None = None) -> "Predictor":
        """The same loaded model deciding with the user's thresholds (DecisionPolicy.with_thresholds)."""
        other = copy.copy(self)
        other.policy = self.policy.with_thresholds(review_below, ood_threshold)
        return other

    def logits(self, pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """uint8 (N, S, S) light-on-dark -> raw logits (N, C), near-decision rows from fp32 when int8 runs."""
        return self.decided_logits(pixels, batch_size)[0]

    def decided_logits(self, pixels: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Logits and the rows the fp32 model computed. At int8, the rows near one of the policy's thresholds
        (kmnist_core/int8.py near_decision) are recomputed in fp32, so int8 decides only clear rows; with
        the card's test-time views, both passes view the unsure crops (`viewed`), and a crop whose as-is
        confidence is near the views gate (int8.near_gate) is read by int8 both with and without views,
        and recomputed in fp32 unless both readings are clear of the thresholds and decide the same."""
        if self.int8 is None:
            out = self.viewed(lambda x: self.fp32_logits(x, batch_size), pixels)
            return out, np.ones(len(out), bool)
        p = self.policy
        int8 = lambda x: self.int8.logits(x, batch_size)  # noqa: E731
        out = int8(pixels)
        if not len(out):
            return np.zeros((0, len(self.classes)), np.float32), np.zeros(0, bool)
        near_of = lambda logits: near_decision(logits, p.temperature, p.review_below, p.ood_score, p.ood_threshold)  # noqa: E731
        if p.views is None:
            near = near_of(out)
        else:
            # A crop near the gate may be viewed in fp32 and not in int8, or the reverse: int8 reads it both
            # ways, and decides it only when both readings are clear of every threshold and agree, so that
            # fp32's reading, either one, decides the same (int8.near_gate); else fp32 recomputes it.
            confidence = as_is_confidence(out, p.views.gate_temperature)
            unsure, near_views_gate = confidence < p.views.gate, near_gate(confidence, p.views.gate)
            both = view_rows(int8, pixels, out.copy(), unsure | near_views_gate, p.views.extra)
            out, other = np.where(unsure[:, None], both, out), np.where(unsure[:, None], out, both)
            near = near_of(out)
            undecided = near_views_gate & ~near
            if undecided.any():
                near[undecided] = near_of(other[undecided]) | ~readings_agree(out[undecided], other[undecided], p)
        if near.any():
            out[near] = self.viewed(lambda x: self.fp32_logits(x, batch_size), pixels[near])
        return out, near

    def viewed(self, logits_of, pixels: np.ndarray) -> np.ndarray:
        """`logits_of(pixels)`, with the card's test-time views averaged in on the unsure crops (the
        logits the card's calibration was fitted on; kmnist_core/views.py). Without views: as is."""
        views = self.policy.views
        if views is None:
            return logits_of(pixels)
        return with_views(logits_of, pixels, views.gate_temperature, views.gate, views.extra)[0]

    def fp32_logits(self, pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """The fp32 model's logits, whatever the precision (int8 is measured against these)."""
        out = self.fp32.logits(pixels, batch_size)
        return out if len(out) else np.zeros((0, len(self.classes)), np.float32)

    def probabilities(self, pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Calibrated probabilities (softmax of logits / temperature)."""
        return softmax(self.logits(pixels, batch_size), self.temperature)

    def assess(self, pixels: np.ndarray, batch_size: int = 1024) -> Assessment:
        """Calibrated probabilities, an out-of-set score and the unknown flag for model inputs, under the
        policy (with_thresholds for other thresholds)."""
        logits, fp32_rows = self.decided_logits(pixels, batch_size)
        return Assessment(*decided(logits, self.policy), fp32_rows)

    def prepare(self, image: Image.Image | np.ndarray) -> PreparedImage:
        if isinstance(image, Image.Image):
            return prepare_image(image, self.input_size)
        return prepare_array(np.asarray(image), self.input_size)

    def predict(self, images: Sequence[Image.Image | np.ndarray]) -> list[Prediction]:
        """Predict PIL images or uint8 arrays of any size and either polarity."""
        if not len(images):
            return []
        from kmnist_core.review_reasons import review_reasons

        prepared = [self.prepare(im) for im in images]
        pixels = np.stack([p.pixels for p in prepared])
        a = self.assess(pixels)
        blank = np.array([p.blank for p in prepared])
        conf = a.probabilities.max(axis=1)
        reasons = review_reasons(np.zeros(len(pixels), bool), blank, a.unknown, conf, self.review_below)
        precisions = np.where(a.fp32_rows, "fp32", self.precision)
        return [Prediction(None, None, None, None, None, None, r, str(run)) if is_blank else
                Prediction(int(p.argmax()), self.classes.chars[p.argmax()], self.classes.codepoints[p.argmax()],
                           float(p.max()), p, float(s), r, str(run))
                for p, s, r, is_blank, run in zip(a.probabilities, a.ood_score, reasons, blank, precisions)]
