"""A model's figures on a labelled split: accuracy, balanced accuracy, per-class accuracy, confusion matrix,
calibration, what predict would auto-accept (review_decisions, review_metrics) and the study's plots.
`kmnist-batch evaluate` itself, which loads a model and writes these figures, is kmnist_core/evaluate_model.py.
No torch here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kmnist_core import calibration
from kmnist_core.classmap import ClassMap
from kmnist_core.datasets import Split
from kmnist_core.policy import accepted, out_of_set


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(true * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def classification_metrics(true: np.ndarray, pred: np.ndarray, classes: ClassMap) -> dict:
    cm = confusion_matrix(true, pred, len(classes))
    support = cm.sum(axis=1)
    per_class = np.divide(np.diag(cm), support, out=np.full(len(classes), np.nan), where=support > 0)
    return {
        "n": int(len(true)),
        "accuracy": float((true == pred).mean()),
        "balanced_accuracy": float(np.nanmean(per_class)),
        "per_class_accuracy": {classes.chars[i]: float(a) for i, a in enumerate(per_class) if support[i] > 0},
        "confusion_matrix": cm.tolist(),
    }


def calibration_report(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    raw = calibration.softmax(logits)
    cal = calibration.softmax(logits, temperature)
    return {
        "temperature": temperature,
        "ece_before": calibration.expected_calibration_error(raw, labels),
        "ece_after": calibration.expected_calibration_error(cal, labels),
        "risk_coverage": calibration.risk_coverage_table(cal, labels),
    }


def review_decisions(logits: np.ndarray, temperature: float, review: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, as predict decides under a card's two thresholds (the accept rule of kmnist_core/policy.py):
    calibrated probabilities, the out-of-set flag and auto-accepted."""
    probs = calibration.softmax(logits, temperature)
    unknown = out_of_set(calibration.ood_score(logits, review["ood_score"]), review["ood_threshold"])
    return probs, unknown, accepted(unknown, probs.max(1), review["review_below"])


def review_metrics(logits: np.ndarray, labels: np.ndarray, temperature: float, review: dict) -> dict:
    """Auto-accepted share of a labelled split and its precision under a card's two thresholds."""
    probs, unknown, accepted = review_decisions(logits, temperature, review)
    correct = probs.argmax(1) == labels
    n_acc = int(accepted.sum())
    return {"auto_accepted_share": float(accepted.mean()), "auto_accepted": n_acc,
            "auto_accepted_errors": int((accepted & ~correct).sum()),
            "auto_accepted_precision": float(correct[accepted].mean()) if n_acc else None,
            "unknown_share": float(unknown.mean())}


def write_evaluation_plots(out: Path, split: Split, logits: np.ndarray, temperature: float, classes: ClassMap, title: str) -> list[Path]:
    """Confusion matrix, 100 sample predictions, reliability diagram and risk-coverage curve."""
    from kmnist_core import plots  # matplotlib costs seconds to import; scoring alone (int8's check) needs none

    pred = logits.argmax(1)
    probs = calibration.softmax(logits, temperature)
    rc = calibration.risk_coverage(probs, split.labels)
    report = calibration_report(logits, split.labels, temperature)
    return [
        plots.confusion_matrix_plot(confusion_matrix(split.labels, pred, len(classes)), classes.chars,
                                    out / "confusion_matrix.png", title),
        plots.sample_predictions(split.images, split.labels, pred, classes.chars, out / "sample_predictions.png"),
        plots.reliability_diagram(calibration.reliability_bins(probs, split.labels), report["ece_before"],
                                  report["ece_after"], out / "reliability.png"),
        plots.risk_coverage_plot(rc["coverage"], rc["precision"], out / "risk_coverage.png"),
    ]
