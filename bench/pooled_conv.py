"""The int8 twin's first conv per pixel against on 2x2 blocks (kmnist_core/pooled_conv.py): the same logits,
and what each costs a crop.

Both twins are quantized here from the default model as `kmnist-batch model int8` quantizes it (the same
calibration draw), one with `pooled=False`. On one intra-op thread, as a chunk worker runs them, over the
10,000 kmnist-dev validation and test crops, five times over, in predict's batches of 1,024: the twin alone
(`OrtModel.logits`) and the default model's `Predictor.assess` with each twin (int8, the views on unsure
crops, the fp32 recheck near a decision). The variants alternate, 5 rounds, best of each, so a drift of
the host's speed reaches both. Needs the `[train]` extra (torch, onnx) to quantize.

    .venv/bin/python bench/pooled_conv.py [--record]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import numpy as np  # noqa: E402

from bench.common import arguments, record_flag  # noqa: E402
from bench.record import append_row  # noqa: E402
from kmnist_core.datasets import load_dataset  # noqa: E402
from kmnist_core.int8 import calibration_sample, quantize  # noqa: E402
from kmnist_core.model_dir import build_predictor, load_bundle, read_model_files  # noqa: E402
from kmnist_core.models import load_torch_model, optimize_for_inference  # noqa: E402
from kmnist_core.onnx_export import fp32_twin_bytes  # noqa: E402
from kmnist_core.ort_model import OrtModel  # noqa: E402


def time_round(step, pixels: np.ndarray, rounds_done: list[float]) -> None:
    """Append to `rounds_done` the seconds `step` takes over `pixels`, in predict's batches of 1,024."""
    started = time.perf_counter()
    for s in range(0, len(pixels), 1024):
        step(pixels[s : s + 1024])
    rounds_done.append(time.perf_counter() - started)


def main() -> None:
    parser = arguments(__doc__)
    record_flag(parser)
    args = parser.parse_args()
    bundle = load_bundle("default")
    card, weights = read_model_files("default")
    fp32_onnx = fp32_twin_bytes(optimize_for_inference(load_torch_model(card, weights, "default")), 28)
    sample = calibration_sample(load_dataset(card.int8.calibration_data["dataset"]).train.images)
    twins = {"per pixel": quantize(fp32_onnx, sample, pooled=False), "2x2 blocks": quantize(fp32_onnx, sample)}
    d = load_dataset("kmnist-dev")
    pixels = np.concatenate([d.val.images, d.test.images] * 5)
    models, predictors = {}, {}
    for name, twin in twins.items():
        models[name] = OrtModel(twin, threads=1)
        predictors[name] = build_predictor(bundle, threads=1)
        predictors[name].int8 = OrtModel(twin, threads=1)  # the default model's predictor with this twin
    base = models["per pixel"].logits(pixels[:10000])
    same = all(np.array_equal(m.logits(pixels[:10000]), base) for m in models.values())
    print(f"logits of the two twins on 10,000 crops: {'identical' if same else 'DIFFERENT'}")
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(5):
        for name in twins:
            time_round(models[name].logits, pixels, times.setdefault(("twin", name), []))
            time_round(predictors[name].assess, pixels, times.setdefault(("assess", name), []))
    us = {key: min(t) / len(pixels) * 1e6 for key, t in times.items()}
    for what in ("twin", "assess"):
        ratio = us[(what, "per pixel")] / us[(what, "2x2 blocks")]
        cells = [what, f"{us[(what, 'per pixel')]:.1f} µs", f"{us[(what, '2x2 blocks')]:.1f} µs", f"{ratio:.2f}×",
                 "identical" if same else "DIFFERENT"]
        print(" | ".join(cells))
        if args.record:
            append_row("the first conv on 2x2 blocks", cells)


if __name__ == "__main__":
    main()
