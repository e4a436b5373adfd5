"""Review thresholds from out-of-fold predictions (bench/oof_folds.py), and how well they hold.

Pools the K folds' out-of-fold logits (8,000 images, each predicted by a model that never saw it) and fits
on them what a model card carries: the temperature, the out-of-set score and threshold (on the folds'
held-out synthetic negatives) and `review_below`, with the review promise (auto-accepted rows >= 99.5 %
correct at a 95 % one-sided Clopper-Pearson bound). Then checks the procedure on crops it did not fit on:
- per fold: thresholds fitted on the other folds' out-of-fold rows, applied to this fold's rows;
- the kmnist-dev test split (1,000 images): thresholds fitted on the other 7,000 out-of-fold rows.

    .venv/bin/python bench/oof_thresholds.py [--recipe plain-oe]

Prints the figures and writes them to bench/results/oof/RECIPE/thresholds.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from kmnist_core import calibration
from kmnist_core.evaluate import review_decisions
from kmnist_core.experiment import IN_SET_KEEP, REVIEW_LEVEL, REVIEW_PRECISION

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "oof"  # as bench/oof_folds.py writes it


def load_folds(results: Path) -> dict[str, np.ndarray]:
    """The folds' files stacked, rows in fold order; `fold` says which fold predicted each row."""
    files = sorted(results.glob("fold-*.npz"), key=lambda p: int(p.stem.split("-")[1]))
    if not files:
        raise SystemExit(f"error: no fold results in {results}; run bench/oof_folds.py first")
    parts = [dict(np.load(f)) for f in files]
    joined = {key: np.concatenate([p[key] for p in parts]) for key in ("index", "labels", "logits")}
    joined["fold"] = np.concatenate([np.full(len(p["labels"]), int(f.stem.split("-")[1])) for f, p in zip(files, parts)])
    joined["neg_logits"] = np.concatenate([p["neg_logits"] for p in parts])
    joined["neg_fold"] = np.concatenate([np.full(len(p["neg_logits"]), int(f.stem.split("-")[1])) for f, p in zip(files, parts)])
    joined["wall_s"] = np.array([float(p["wall_s"]) for p in parts])
    return joined


def fit(logits: np.ndarray, labels: np.ndarray, neg_logits: np.ndarray) -> dict:
    temperature = calibration.fit_temperature(logits, labels)
    review = calibration.fit_review(logits, labels, neg_logits, temperature, REVIEW_PRECISION, IN_SET_KEEP, REVIEW_LEVEL)
    return {"temperature": temperature, **review}


def apply(fitted: dict, logits: np.ndarray, labels: np.ndarray, neg_logits: np.ndarray) -> dict:
    """What predict would do with these rows under `fitted`: accepted share, its precision and bound."""
    probs, _, accepted = review_decisions(logits, fitted["temperature"], fitted)  # predict's accept rule
    errors = int((accepted & (probs.argmax(1) != labels)).sum())
    neg_accepted = review_decisions(neg_logits, fitted["temperature"], fitted)[2]
    n_acc = int(accepted.sum())
    return {"n": int(len(labels)), "accuracy": float((logits.argmax(1) == labels).mean()),
            "auto_accepted_share": n_acc / len(labels), "auto_accepted": n_acc, "auto_accepted_errors": errors,
            "precision": 1 - errors / n_acc if n_acc else None,
            "precision_lower_bound": calibration.precision_lower_bound(errors, n_acc, REVIEW_LEVEL),
            "negatives_accepted_share": float(neg_accepted.mean()) if len(neg_logits) else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="plain-oe")
    args = parser.parse_args()
    results = RESULTS / args.recipe
    d = load_folds(results)
    n = len(d["labels"])
    full = fit(d["logits"], d["labels"], d["neg_logits"])
    pooled = apply(full, d["logits"], d["labels"], d["neg_logits"])
    report = {"recipe": args.recipe, "folds": int(len(d["wall_s"])), "images": n,
              "fold_wall_min": [round(float(s) / 60, 1) for s in d["wall_s"]],
              "fitted": {k: full[k] for k in ("temperature", "ood_score", "ood_threshold", "review_below", "review_promise")},
              "out_of_fold": pooled, "held_out_checks": {}}
    for k in np.unique(d["fold"]):
        rows, neg = d["fold"] == k, d["neg_fold"] == k
        other = fit(d["logits"][~rows], d["labels"][~rows], d["neg_logits"][~neg])
        report["held_out_checks"][f"fold {k}"] = apply(other, d["logits"][rows], d["labels"][rows], d["neg_logits"][neg])
    if n == 8000:  # the kmnist-dev test split: all_images() (bench/oof_folds.py) puts it last, at 7,000-7,999
        is_test = d["index"] >= 7000
        other = fit(d["logits"][~is_test], d["labels"][~is_test], d["neg_logits"])
        report["held_out_checks"]["kmnist-dev test split"] = apply(other, d["logits"][is_test], d["labels"][is_test],
                                                                   d["neg_logits"][:0])
    (results / "thresholds.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{args.recipe}: {report['folds']} folds, {n} images, fold wall time {report['fold_wall_min']} min")
    print(f"out-of-fold top-1 {pooled['accuracy']:.4f}; fitted T {full['temperature']:.3f}, {full['ood_score']} "
          f"<= {full['ood_threshold']:.4f}, review_below {full['review_below']:.4f}")
    print(f"auto-accepted {pooled['auto_accepted_share']:.4f} at precision {pooled['precision']:.4f} "
          f"(95 % bound {pooled['precision_lower_bound']:.4f}); negatives accepted {pooled['negatives_accepted_share']:.4f}")
    for name, check in report["held_out_checks"].items():
        print(f"  {name}: accepted {check['auto_accepted_share']:.4f}, errors {check['auto_accepted_errors']} of "
              f"{check['auto_accepted']}, precision {check['precision']:.4f}")


if __name__ == "__main__":
    main()
