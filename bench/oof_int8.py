"""int8 against fp32 on crops the model never saw: each fold model of bench/oof_folds.py quantized exactly as
`train` quantizes (kmnist_core/int8.py: calibrated on its own training images), both run on its held-out
fold. The shipped default was trained on all 8,000 images, so this is where its quantization can be
judged on unseen crops; it prints the CPU it ran on, since int8 kernels are chosen by CPU features.

    .venv/bin/python bench/oof_int8.py [--recipe plain-oe]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.oof_folds import RECIPES, RESULTS, all_images, stratified_folds, trained_model  # noqa: E402
from kmnist_core.int8 import OrtModel, calibration_sample, cpu_features, export_onnx, quantize, weight_range  # noqa: E402
from kmnist_core.models import optimize_for_inference, predict_logits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="plain-oe", choices=sorted(RECIPES))
    args = parser.parse_args()
    full, base = all_images()
    fold = stratified_folds(full.labels, 5)
    fp32_all, int8_all, labels_all = [], [], []
    print(f"CPU: {cpu_features()}")
    for k in range(5):
        fp32 = optimize_for_inference(trained_model(args.recipe, RESULTS / args.recipe / f"fold-{k}.pt", base))
        twin = quantize(export_onnx(fp32, base.input_size), calibration_sample(full.images[fold != k]))
        held, labels = full.images[fold == k], full.labels[fold == k]
        f, i = predict_logits(fp32, held, "cpu"), OrtModel(twin).logits(held)
        fp32_all.append(f), int8_all.append(i), labels_all.append(labels)
        print(f"fold {k}: agreement {np.mean(f.argmax(1) == i.argmax(1)):.4%}, accuracy fp32 "
              f"{np.mean(f.argmax(1) == labels):.4%} int8 {np.mean(i.argmax(1) == labels):.4%}, weights {weight_range(twin)}")
    f, i, y = np.concatenate(fp32_all), np.concatenate(int8_all), np.concatenate(labels_all)
    print(f"all {len(y):,} out-of-fold crops: top-1 agreement {np.mean(f.argmax(1) == i.argmax(1)):.4%} "
          f"({int(np.sum(f.argmax(1) != i.argmax(1)))} differ); accuracy fp32 {np.mean(f.argmax(1) == y):.4%}, "
          f"int8 {np.mean(i.argmax(1) == y):.4%}")


if __name__ == "__main__":
    main()
