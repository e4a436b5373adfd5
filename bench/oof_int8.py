"""int8 against fp32 on crops the model never saw: each fold model of bench/oof_folds.py quantized exactly as
`train` quantizes (kmnist_core/int8.py: calibrated on its own training images), both run on its held-out
fold. The shipped default was trained on all 8,000 images, so this is where its quantization can be
judged on unseen crops; it prints the CPU it ran on, since int8 kernels are chosen by CPU features.

Two int8 figures: the twin alone, and int8 as a Predictor runs it, with the rows near a decision
(kmnist_core/int8.py near_decision, at the recipe's out-of-fold thresholds) recomputed in fp32. Decisions
compared: top-1, needs review (confidence under review_below or out of set) and out of set.

    .venv/bin/python bench/oof_int8.py [--recipe plain-oe]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.oof_folds import RECIPES, RESULTS, all_images, stratified_folds, trained_model  # noqa: E402
from kmnist_core.int8 import calibration_sample, cpu_features, near_decision, quantize_model, weight_range  # noqa: E402
from kmnist_core.ort_model import OrtModel  # noqa: E402
from kmnist_core.evaluate import review_decisions  # noqa: E402
from kmnist_core.models import optimize_for_inference, predict_logits  # noqa: E402


def decisions(logits: np.ndarray, thresholds: dict) -> dict[str, np.ndarray]:
    """What predict decides per row from its logits, at the card's thresholds."""
    _, unknown, accepted = review_decisions(logits, thresholds["temperature"], thresholds)
    return {"top-1": logits.argmax(1), "needs review": ~accepted, "out of set": unknown}


def report(name: str, fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray, thresholds: dict) -> str:
    f, i = decisions(fp32, thresholds), decisions(int8, thresholds)
    differ = ", ".join(f"{k} {int(np.sum(f[k] != i[k]))}" for k in f)
    return (f"{name}: top-1 agreement {np.mean(f['top-1'] == i['top-1']):.4%}, accuracy fp32 "
            f"{np.mean(f['top-1'] == labels):.4%} int8 {np.mean(i['top-1'] == labels):.4%}; rows whose decision differs: {differ}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="plain-oe", choices=sorted(RECIPES))
    args = parser.parse_args()
    thresholds = json.loads((RESULTS / args.recipe / "thresholds.json").read_text(encoding="utf-8"))["fitted"]
    full, base = all_images()
    fold = stratified_folds(full.labels, 5)
    fp32_all, twin_all, decided_all, near_all, labels_all = [], [], [], [], []
    print(f"CPU: {cpu_features()}")
    for k in range(5):
        fp32 = optimize_for_inference(trained_model(args.recipe, RESULTS / args.recipe / f"fold-{k}.pt", base))
        twin = quantize_model(fp32, base.input_size, calibration_sample(full.images[fold != k]))
        held, labels = full.images[fold == k], full.labels[fold == k]
        f, i = predict_logits(fp32, held, "cpu"), OrtModel(twin).logits(held)
        near = near_decision(i, thresholds["temperature"], thresholds["review_below"], thresholds["ood_score"],
                             thresholds["ood_threshold"])
        decided = np.where(near[:, None], f, i)  # the recomputed rows' fp32 logits are exactly these
        for store, value in zip((fp32_all, twin_all, decided_all, near_all, labels_all), (f, i, decided, near, labels)):
            store.append(value)
        print(f"fold {k}: " + report("twin alone", f, i, labels, thresholds) + f"; weights {weight_range(twin)}")
    f, i, d, near, y = (np.concatenate(x) for x in (fp32_all, twin_all, decided_all, near_all, labels_all))
    print(f"all {len(y):,} out-of-fold crops:")
    print("  " + report("twin alone", f, i, y, thresholds))
    print("  " + report("int8 as predict runs it", f, d, y, thresholds)
          + f"; {near.mean():.2%} of rows near a decision, computed in fp32")


if __name__ == "__main__":
    main()
