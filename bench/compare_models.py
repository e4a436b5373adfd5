"""Compare trained model directories on kmnist-dev's validation and test splits, as a markdown table.

For choosing between candidates: pick on the validation columns, then read the test columns once. Each
split has 1,000 images, so one image is 0.1 point and a standard error on ~99 % accuracy is ~0.3 point.

    .venv/bin/python bench/compare_models.py runs/teacher runs/student-a runs/student-b
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kmnist_core import calibration  # noqa: E402
from kmnist_core.datasets import load_dataset  # noqa: E402
from kmnist_core.experiment import REVIEW_PRECISION  # noqa: E402
from kmnist_core.model_dir import load_model  # noqa: E402


def split_figures(probs: np.ndarray, labels: np.ndarray) -> list[str]:
    """Accuracy, negative log-likelihood, ECE and the share auto-accepted at 99.5 % precision."""
    nll = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())
    _, coverage = calibration.threshold_for_precision(probs, labels, REVIEW_PRECISION)
    acc = float((probs.argmax(1) == labels).mean())
    return [f"{acc:.1%}", f"{nll:.4f}", f"{calibration.expected_calibration_error(probs, labels):.2%}", f"{coverage:.1%}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model directories (or 'default')")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_dataset("kmnist-dev")
    metrics = ["accuracy", "NLL", "ECE", "auto-accepted at 99.5 %"]
    print("| model | " + " | ".join(f"val {m}" for m in metrics) + " | " + " | ".join(f"test {m}" for m in metrics) + " |")
    print("|---" * (1 + 2 * len(metrics)) + "|")
    for name in args.models:
        predictor = load_model(name)
        cells = []
        for split in (data.val, data.test):
            cells += split_figures(calibration.softmax(predictor.logits(split.images), predictor.temperature), split.labels)
        print(f"| {Path(name).name} ({predictor.card['architecture']['name']}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
