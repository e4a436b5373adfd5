"""Scoring a model on a labelled split: accuracy, balanced accuracy, per-class accuracy, confusion
matrix, calibration, the study's plots, and `evaluate` itself (`run_evaluate`). No torch: a loaded
Predictor runs on ONNX Runtime on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kmnist_core import calibration
from kmnist_core.classmap import ClassMap
from kmnist_core.datasets import Dataset, Split
from kmnist_core.errors import KmnistError
from kmnist_core.files import write_json_atomic
from kmnist_core.policy import accepted, out_of_set
from kmnist_core.preprocess import DecodeError, PreparedImage, decode_bytes
from kmnist_core.review_reasons import REVIEW_REASONS, review_reasons

if TYPE_CHECKING:  # both import this module
    from kmnist_core.model_dir import Predictor
    from kmnist_core.labelled_crops import ReviewedCrops


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


def read_unknown_tree(root: Path, size: int) -> tuple[list[PreparedImage], list[str], int]:
    """Every image file under `root`, decoded exactly as `predict` decodes it, with its kind (the first
    sub-folder, or "." for files directly in `root`). Undecodable files are counted, not returned."""
    prepared, kinds, errors = [], [], 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts)):
        try:
            prepared.append(decode_bytes(path.read_bytes(), size))
        except DecodeError:
            errors += 1
            continue
        rel = path.relative_to(root).parts
        kinds.append(rel[0] if len(rel) > 1 else ".")
    return prepared, kinds, errors


def unknown_report(predictor: Predictor, root: Path) -> tuple[dict, np.ndarray]:
    """Share of a folder of out-of-set crops that `predict` would auto-accept, overall and per kind."""
    prepared, kinds, errors = read_unknown_tree(root, predictor.input_size)
    if not prepared:
        raise KmnistError(f"no decodable image under {root}")
    a = predictor.assess(np.stack([p.pixels for p in prepared]))
    blank = np.array([p.blank for p in prepared])
    reasons = review_reasons(np.zeros(len(prepared), bool), blank, a.unknown, a.probabilities.max(1),
                             predictor.review_below)
    accepted = np.array([r is None for r in reasons])
    kinds = np.array(kinds)
    per_kind = {}
    for kind in sorted(set(kinds)):
        mine = kinds == kind
        per_kind[kind] = {"n": int(mine.sum()), "auto_accepted_share": float(accepted[mine].mean()),
                          "reasons": {r or "accepted": int(((reasons == r) & mine).sum()) for r in (*REVIEW_REASONS[1:], None)}}
    report = {"dir": str(root), "n": len(prepared), "undecodable": errors,
              "auto_accepted_share": float(accepted.mean()), "by_kind": per_kind}
    return report, a.ood_score[~blank]


def run_evaluate(predictor: Predictor, data: Dataset, split: str, out: Path, unknown: Path | None = None,
                 reviewed: ReviewedCrops | None = None) -> dict:
    """Score a loaded model on one split of a dataset; writes metrics.json and the plots into `out`.

    Beside accuracy and calibration: the share `predict` auto-accepts and its precision, with `unknown`
    (a folder of crops that are none of the model's characters, sub-folders = kinds) the share of those it
    would auto-accept, and with `reviewed` (crops people labelled in predict runs, batch_infer/gathered_crops.py)
    the same figures on them, at the model's own precision and thresholds.
    """
    from kmnist_core import plots
    from kmnist_core.int8 import compare
    from kmnist_core.labelled_crops import review_figures

    part = getattr(data, split)
    if len(predictor.classes) != len(data.classes) or predictor.input_size != data.input_size:
        raise KmnistError(f"model has {len(predictor.classes)} classes at {predictor.input_size}px, "
                          f"dataset {data.name} has {len(data.classes)} at {data.input_size}px")
    policy = predictor.policy
    logits, fp32_rows = predictor.decided_logits(part.images, 1024)
    metrics = classification_metrics(part.labels, logits.argmax(1), data.classes)
    metrics["calibration"] = calibration_report(logits, part.labels, policy.temperature)
    metrics["review"] = {"review_below": policy.review_below, "ood_score": policy.ood_score,
                         "ood_threshold": policy.ood_threshold,
                         **review_metrics(logits, part.labels, policy.temperature, policy.calibration.review_params())}
    metrics.update({"dataset": data.name, "split": split, "split_note": data.split_note, "model_id": predictor.model_id,
                    "precision": policy.used, "precision_note": policy.precision.note, "int8_probe": predictor.probe})
    if predictor.int8 is not None:  # what int8 changes on this split, against the same model in fp32
        fp32, fp32_logits = predictor.card.calibration, predictor.fp32_logits(part.images)
        twin_alone = predictor.int8.logits(part.images)  # before fp32 recomputes the rows near a decision
        metrics["int8_vs_fp32"] = {
            **compare(fp32_logits, logits, part.labels, fp32.temperature,
                      predictor.temperature, fp32.review_params(), predictor.calibration.review_params()),
            "fp32_rows_share": float(fp32_rows.mean()) if len(fp32_rows) else 0.0,
            "twin_alone_agreement": float((twin_alone.argmax(1) == fp32_logits.argmax(1)).mean()) if len(logits) else 1.0,
            "card_check": {"gate": predictor.card.int8.gate, "enabled": predictor.card.int8.enabled,
                           "fallback": predictor.card.int8.fallback}}
    out.mkdir(parents=True, exist_ok=True)
    write_evaluation_plots(out, part, logits, predictor.temperature, data.classes, f"{data.name} {split}")
    if unknown is not None:
        metrics["unknown"], out_scores = unknown_report(predictor, unknown)
        in_scores = calibration.ood_score(logits, predictor.ood_method)
        if len(out_scores):  # blank crops have no score: they never reach the model's decision
            metrics["unknown"]["auroc"] = calibration.auroc(in_scores, out_scores)
            plots.ood_histogram(in_scores, out_scores, predictor.ood_threshold, predictor.ood_method,
                                out / "ood_scores.png")
        by_kind = metrics["unknown"]["by_kind"]
        plots.bar_chart(list(by_kind), np.array([k["auto_accepted_share"] for k in by_kind.values()]),
                        out / "unknown_accepted.png", "Out-of-set crops auto-accepted, per kind", "share auto-accepted")
    if reviewed is not None:
        metrics["reviews"] = {"sources": list(reviewed.sources), "precision": predictor.precision,
                              **review_figures(predictor.logits(reviewed.images), reviewed.labels,
                                               predictor.logits(reviewed.negatives), predictor.temperature,
                                               predictor.calibration.review_params())}
    write_json_atomic(out / "metrics.json", metrics)
    return metrics
