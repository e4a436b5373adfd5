"""What decides a row, decided once per process: the `DecisionPolicy`, and the one accept rule.

A policy is built (`decide_policy`) from three things and nothing else: the model card, the precision that
runs (the card's choice, kmnist_core/precision.py `resolve_precision`, then the int8 twin's probe on this
CPU, `after_probe`) and the user's overrides (--review-below, --ood-threshold). It holds the precision and
why, the calibration for that precision (the int8 twin's refit when current, `calibration_for`)
with the user's thresholds in place of the card's, the card's review promise and its test-time views.

Everything that decides or records a decision reads a policy: `Predictor.assess` and `predict`
(kmnist_core/model_dir.py), predict's `RowBuilder` and workers (batch_infer/stages.py, worker.py), the
Ray Data stage and its footer (batch_infer/ray_data.py), run.json and every shard's footer
(batch_infer/job.py, `record`). A worker is handed its driver's policy and follows it, or refuses
(`PolicyDisagrees`): a CPU whose int8 probe fails where the driver's passed does not switch to fp32 on
its own, since its rows would then be decided under other thresholds than the run records.

The accept rule (`out_of_set`, `confident`, `accepted`) is written here once: predict's review reasons
(kmnist_core/review_reasons.py), evaluate's and the k-fold fitting's figures (kmnist_core/evaluate.py
`review_decisions`, kmnist_core/recipe_thresholds.py, kmnist_core/calibration.py `fit_review`) all use it.
No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from operator import attrgetter

import numpy as np

from kmnist_core.card import Calibration, ModelCard, ViewsSection
from kmnist_core.errors import KmnistError
from kmnist_core.precision import Precision


def out_of_set(score: np.ndarray, ood_threshold: float | None) -> np.ndarray:
    """unknown_character: an out-of-set score above the threshold; no row without one. The threshold is
    compared as given (a Python float against a float32 score compares in float32, as predict always has)."""
    return score > ood_threshold if ood_threshold is not None else np.zeros(len(score), bool)


def confident(confidence: np.ndarray, review_below: float) -> np.ndarray:
    """Confidence at or above review_below, compared in float64: a float32 confidence of 1.0 would
    otherwise pass the accept-nothing threshold just above 1.0 that a model with no safe line gets. A
    missing confidence (NaN: error and blank rows) is never confident."""
    return np.asarray(confidence, dtype=np.float64) >= review_below


def accepted(unknown: np.ndarray, confidence: np.ndarray, review_below: float) -> np.ndarray:
    """The accept rule: a row is auto-accepted when it is not out of set and is confident."""
    return ~np.asarray(unknown, dtype=bool) & confident(confidence, review_below)


class PolicyDisagrees(KmnistError):
    """A worker cannot follow the policy its driver decided (its CPU fails the int8 probe)."""


@dataclass(frozen=True)
class DecisionPolicy:
    precision: Precision  # what runs, what was asked for, and why it differs
    calibration: Calibration  # the card's for that precision, the user's thresholds in place of its own
    overridden: tuple[str, ...] = ()  # the thresholds the user set: review_below, ood_threshold
    views: ViewsSection | None = None  # the card's test-time views of unsure crops (kmnist_core/views.py)

    # What rows are decided with, read from the precision that runs and its calibration:
    used = property(attrgetter("precision.used"))  # int8 or fp32
    temperature = property(attrgetter("calibration.temperature"))
    review_below = property(attrgetter("calibration.review_below"))
    ood_score = property(attrgetter("calibration.ood_score"))
    ood_threshold = property(attrgetter("calibration.ood_threshold"))  # None: no out-of-set check
    # What the card promises of the rows it auto-accepts (at its own thresholds):
    review_promise = property(attrgetter("calibration.review_promise"))

    def with_thresholds(self, review_below: float | None = None, ood_threshold: float | None = None) -> "DecisionPolicy":
        """This policy with the user's thresholds (None: keep the one in place)."""
        given = {"review_below": review_below, "ood_threshold": ood_threshold}
        given = {k: v for k, v in given.items() if v is not None}
        if not given:
            return self
        return replace(self, calibration=replace(self.calibration, **given),
                       overridden=tuple(k for k in ("review_below", "ood_threshold") if k in given or k in self.overridden))

    def record(self) -> dict:
        """What run.json, every shard's footer and the Ray Data stage's footer say was decided."""
        return {"precision": self.precision.used, "precision_note": self.precision.note,
                "fp32_runtime": self.precision.fp32_runtime,
                "review_below": self.review_below, "ood_threshold": self.ood_threshold,
                "temperature": self.temperature, "ood_score": self.ood_score,
                "thresholds_set_by_user": list(self.overridden),
                "views": None if self.views is None else {"extra": self.views.extra, "gate": self.views.gate}}


def probe_note(probe: dict) -> str:
    return (f"the int8 twin fails its probe on this CPU ({probe['new_disagreements_with_fp32']} new top-1 "
            f"disagreements with fp32, logits off by up to {probe['max_abs_logit_deviation']:.3f} "
            f"> {probe['tolerance']})")


def after_probe(chosen: Precision, probe: dict | None) -> Precision:
    """The card's choice, given the int8 twin's probe on this CPU (kmnist_core/int8.py check_probe): where
    the twin does not compute what it computed at build time, auto runs fp32 (saying why); an explicit
    int8 runs anyway, with the same note."""
    if chosen.used != "int8" or probe is None or probe["passed"]:
        return chosen
    if chosen.requested == "int8":
        return replace(chosen, note=probe_note(probe))
    return replace(chosen, used="fp32", note=probe_note(probe) + ": running fp32")


def calibration_for(card: ModelCard, precision: str) -> Calibration:
    """What a precision decides with: int8 its own refit while that is current (ModelCard.int8_calibration),
    else the card's. Read by `decide_policy` and the audit's promise (reviews/stats.py)."""
    return card.int8_calibration if precision == "int8" and card.int8_calibration is not None else card.calibration


def decide_policy(card: ModelCard, precision: Precision, review_below: float | None = None,
                  ood_threshold: float | None = None) -> DecisionPolicy:
    """The policy of a process running `card` at `precision` (after the probe), with the user's thresholds."""
    return DecisionPolicy(precision, calibration_for(card, precision.used),
                          views=card.views).with_thresholds(review_below, ood_threshold)


def follow(policy: DecisionPolicy, own: Precision, where: str) -> None:
    """Refuse (PolicyDisagrees) where this process's own precision after its probe is not the policy's."""
    if own.used != policy.used:
        raise PolicyDisagrees(
            f"{where} would run {own.used} ({own.note}), but the run decided {policy.used} on the driver's CPU; "
            f"every worker of a run decides alike: run on CPUs of one kind, or pass --precision fp32 "
            f"(or --precision int8 to run the twin everywhere)")
