"""`kmnist-batch evaluate`: a loaded model scored on one split of a dataset (`run_evaluate`), with the
figures of kmnist_core/evaluate.py, the share of out-of-set crops it would auto-accept and, with crops
people labelled, the same figures on them; metrics.json and the plots. No torch: a loaded Predictor runs
on ONNX Runtime on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kmnist_core import calibration
from kmnist_core.datasets import Dataset
from kmnist_core.errors import KmnistError
from kmnist_core.evaluate import calibration_report, classification_metrics, review_metrics, write_evaluation_plots
from kmnist_core.files import write_json_atomic
from kmnist_core.preprocess import DecodeError, PreparedImage, decode_bytes
from kmnist_core.review_reasons import REVIEW_REASONS, review_reasons

if TYPE_CHECKING:
    from kmnist_core.labelled_crops import ReviewedCrops
    from kmnist_core.predictor import Predictor


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
        # both as decided (the card's views included), the twin's before fp32 recomputes the rows near a decision
        fp32, fp32_logits = predictor.card.calibration, predictor.viewed(predictor.fp32_logits, part.images)
        twin_alone = predictor.viewed(predictor.int8.logits, part.images)
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
