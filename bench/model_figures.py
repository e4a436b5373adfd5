"""A model's figures for its card and the README, measured in one run on this machine:
accuracy and calibration on the held-out kmnist-dev test split, the risk-coverage table, and CPU
inference speed (batch 1024) against the study's SimpleCNN, interleaved so all see the same load.

Speed is measured on the path `predict` runs (batch norm folded, channels-last memory) and compared with
SimpleCNN twice: as the study ran it (plain PyTorch), and given the same folding and channels-last
treatment, so the ratio is not flattered by an optimization the baseline could have had too.

    .venv/bin/python bench/model_figures.py [--model default] [--threads 2] [--record]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import arguments, model_flags, record_flag  # noqa: E402
from bench.record import append_row  # noqa: E402
from kmnist_core import calibration  # noqa: E402
from kmnist_core.datasets import load_dataset  # noqa: E402
from kmnist_core.model_dir import load_model, read_model_files  # noqa: E402
from kmnist_core.models import TorchModel, create_model, load_torch_model, optimize_for_inference  # noqa: E402
from kmnist_core.transforms import to_model_tensor  # noqa: E402


@torch.inference_mode()
def images_per_s(model: torch.nn.Module, batch: torch.Tensor, seconds: float = 1.0) -> float:
    model.eval()
    if next(model.parameters()).is_contiguous(memory_format=torch.channels_last):
        batch = batch.contiguous(memory_format=torch.channels_last)
    model(batch)  # warm-up
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        model(batch)
        n += len(batch)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = arguments(__doc__)
    model_flags(parser)
    parser.add_argument("--rounds", type=int, default=5)
    record_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    predictor = load_model(args.model, precision="fp32")  # its calibration; its speed on torch, as the study's
    card, weights = read_model_files(args.model)
    ours_torch = TorchModel(load_torch_model(card, weights, args.model), "cpu").module
    data = load_dataset("kmnist-dev")
    logits = predictor.logits(data.test.images)
    probs = calibration.softmax(logits, predictor.temperature)
    acc = float((probs.argmax(1) == data.test.labels).mean())
    ece_raw = calibration.expected_calibration_error(calibration.softmax(logits), data.test.labels)
    ece = calibration.expected_calibration_error(probs, data.test.labels)
    table = calibration.risk_coverage_table(probs, data.test.labels)
    threshold = predictor.card.calibration.review_below
    accepted = probs.max(1) >= threshold
    precision = float((probs.argmax(1) == data.test.labels)[accepted].mean()) if accepted.any() else float("nan")

    batch = to_model_tensor(data.test.images[np.arange(1024) % len(data.test)])
    study = create_model("simple-cnn", len(predictor.classes), predictor.input_size).eval()
    study_fast = optimize_for_inference(study)
    ours, theirs, theirs_fast = [], [], []
    for _ in range(args.rounds):  # interleaved: a noisy neighbour slows all alike
        ours.append(images_per_s(ours_torch, batch))
        theirs.append(images_per_s(study, batch))
        theirs_fast.append(images_per_s(study_fast, batch))
    speed, base, base_fast = (float(np.median(v)) for v in (ours, theirs, theirs_fast))

    arch = predictor.card.raw["architecture"]
    print(f"model {arch['name']} ({arch['parameters']:,} parameters), id {predictor.model_id}")
    print(f"kmnist-dev test (1,000 held-out images): accuracy {acc:.2%}; ECE {ece_raw:.2%} raw, {ece:.2%} at T={predictor.temperature:.2f}")
    for row in table:
        print(f"  precision >= {row['precision_target']:.1%}: threshold {row['threshold']:.3f}, auto-accepted {row['coverage']:.1%}")
    print(f"  card's review_below {threshold:.3f}: {accepted.mean():.1%} auto-accepted at {precision:.2%} precision")
    print(f"CPU ({args.threads} threads, batch 1024): {speed:,.0f} images/s; SimpleCNN as the study ran it "
          f"{base:,.0f} -> {speed / base:.2f}x; SimpleCNN folded + channels-last {base_fast:,.0f} -> {speed / base_fast:.2f}x")
    if args.record:
        cov995 = next(r["coverage"] for r in table if r["precision_target"] == 0.995)
        append_row("model figures", [
            f"{arch['name']} `{predictor.model_id}`", f"{acc:.1%}", f"{ece:.2%}", f"{cov995:.1%}",
            f"{speed:,.0f} / {base:,.0f} = **{speed / base:.2f}×**",
            f"{speed:,.0f} / {base_fast:,.0f} = **{speed / base_fast:.2f}×**"])


if __name__ == "__main__":
    main()
