"""Compare trained model directories on a dataset's validation and test splits, as a markdown table.

For choosing between candidates: pick on the validation columns, then read the test columns once. Each
split has 1,000 images, so one image is 0.1 point and a standard error on ~99 % accuracy is ~0.3 point.

    .venv/bin/python bench/compare_models.py runs/teacher runs/student-a runs/student-b
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import arguments  # noqa: E402
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
    parser = arguments(__doc__)
    parser.add_argument("models", nargs="+", help="model directories (or 'default')")
    parser.add_argument("--dataset", default="kmnist-dev")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ensemble", action="store_true",
                        help="add a row for the mean (calibrated) probabilities of all the models given")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_dataset(args.dataset, args.data_dir)
    metrics = ["accuracy", "NLL", "ECE", "auto-accepted at 99.5 %"]
    print("| model | " + " | ".join(f"val {m}" for m in metrics) + " | " + " | ".join(f"test {m}" for m in metrics) + " |")
    print("|---" * (1 + 2 * len(metrics)) + "|")
    probs = {"val": [], "test": []}
    for name in args.models:
        predictor = load_model(name)
        cells = []
        for key, split in (("val", data.val), ("test", data.test)):
            probs[key].append(calibration.softmax(predictor.logits(split.images), predictor.temperature))
            cells += split_figures(probs[key][-1], split.labels)
        print(f"| {Path(name).name} ({predictor.card.architecture}) | " + " | ".join(cells) + " |")
    if args.ensemble:
        cells = (split_figures(np.mean(probs["val"], 0), data.val.labels)
                 + split_figures(np.mean(probs["test"], 0), data.test.labels))
        print(f"| ensemble of the {len(args.models)} above (mean probabilities) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
