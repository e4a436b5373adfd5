"""Crops people labelled in predict runs' review decisions, as training and evaluation data.

`batch_infer/gathered_crops.py` reads them from an OUT (each key's latest decision joined to its prediction row,
the crop decoded exactly as predict decoded it); this module holds what comes out, splits off the seeded
held-out part `train --reviews` measures itself on, and computes the figures `train` writes into the card
and `evaluate --reviews` prints. No torch and no batch_infer here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kmnist_core.calibration import ood_score, softmax
from kmnist_core.errors import KmnistError
from kmnist_core.evaluate import review_metrics

# Fewer labelled crops than this measure nothing: a held-out part of a handful of crops says nothing
# about an archive, and fine-tuning on them only adds noise.
MIN_REVIEWED = 30


@dataclass(frozen=True)
class ReviewedCrops:
    """Reviewed crops in the model's input form (uint8, light ink on dark, size x size)."""

    images: np.ndarray  # (N, S, S): crops labelled with one of the model's characters
    labels: np.ndarray  # (N,) int64: the class index of that character
    negatives: np.ndarray  # (M, S, S): crops labelled not_a_character
    sources: tuple[dict, ...] = ()  # per OUT: uri, run ids, decisions per label kind, crops left out and why

    def __len__(self) -> int:
        return len(self.labels) + len(self.negatives)

    def take(self, characters: np.ndarray, negatives: np.ndarray) -> ReviewedCrops:
        return ReviewedCrops(self.images[characters], self.labels[characters], self.negatives[negatives], self.sources)


def combine(parts: list[ReviewedCrops], minimum: int = MIN_REVIEWED) -> ReviewedCrops:
    """The reviewed crops of several OUTs as one set; refused when fewer than `minimum` are labelled characters."""
    size = parts[0].images.shape[1:]
    crops = ReviewedCrops(np.concatenate([p.images for p in parts]).reshape(-1, *size),
                          np.concatenate([p.labels for p in parts]).astype(np.int64),
                          np.concatenate([p.negatives for p in parts]).reshape(-1, *size),
                          tuple(s for p in parts for s in p.sources))
    if len(crops.labels) < minimum:
        raise KmnistError(f"{', '.join(s['out'] for s in crops.sources)}: {len(crops.labels)} reviewed crops labelled "
                          f"with a character; at least {minimum} are needed ({describe(crops.sources)})")
    return crops


def describe(sources: tuple[dict, ...]) -> str:
    """One line on what the OUTs held: decisions per label kind, and crops left out with why."""
    total: dict[str, int] = {}
    for s in sources:
        for k, v in {**s["labels"], **{f"left out ({why})": n for why, n in s["left_out"].items()}}.items():
            total[k] = total.get(k, 0) + v
    return ", ".join(f"{k} {v}" for k, v in total.items() if v) or "no decisions"


def split_held_out(crops: ReviewedCrops, share: float, seed: int) -> tuple[ReviewedCrops, ReviewedCrops]:
    """(learn, held out): about `share` of each class's characters and of the negatives held out, seeded."""
    learn_c, held_c = stratified_holdout(crops.labels, share, seed)
    learn_n, held_n = stratified_holdout(np.zeros(len(crops.negatives), np.int64), share, seed)
    return crops.take(learn_c, learn_n), crops.take(held_c, held_n)


def stratified_holdout(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out): round(share * n) of each label's n held out, never all of them. Rounded rather than floored (datasets.stratified_split floors): reviews come a few per character,
    and flooring would hold out nothing of a class reviewed three times."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_held = min(int(round(len(idx) * share)), len(idx) - 1)  # one crop of a label is always learnt from
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    as_index = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)  # noqa: E731
    return as_index(kept), as_index(held)


def review_figures(logits: np.ndarray, labels: np.ndarray, negative_logits: np.ndarray, temperature: float,
                   review: dict) -> dict:
    """What predict would do with reviewed crops under one model's temperature and thresholds (`review`:
    Calibration.review_params()): accuracy on the labelled characters, the share it auto-accepts and its
    precision, and of the not_a_character crops the share caught as unknown_character and the share it
    would auto-accept as a character (the costly mistake)."""
    figures: dict = {"characters": int(len(labels)), "negatives": int(len(negative_logits))}
    if len(labels):
        figures.update(accuracy=float((logits.argmax(1) == labels).mean()),
                       **review_metrics(logits, labels, temperature, review))
    if len(negative_logits):
        unknown = ood_score(negative_logits, review["ood_score"]) > review["ood_threshold"]
        confidence = softmax(negative_logits, temperature).max(1).astype(np.float64)  # as predict compares
        accepted = ~unknown & (confidence >= review["review_below"])
        figures.update(negatives_caught_unknown_share=float(unknown.mean()),
                       negatives_auto_accepted_share=float(accepted.mean()))
    return figures
