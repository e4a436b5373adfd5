"""The train and evaluate commands end to end: data -> model -> calibration -> model directory + plots.

The resolved config is saved beside the outputs (config.json), as timm does, so a run can be repeated.
"""

from __future__ import annotations

import csv
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kmnist_core import calibration, plots
from kmnist_core.card import CARD_FILE, ModelCard, read_card
from kmnist_core.datasets import Dataset, load_dataset
from kmnist_core.errors import KmnistError
from kmnist_core.evaluate import calibration_report, classification_metrics, review_metrics, write_evaluation_plots
from kmnist_core.files import json_text, write_json_atomic
from kmnist_core.int8 import build_int8
from kmnist_core.onnx_export import build_fp32_twin
from kmnist_core.precision import Twins
from kmnist_core.model_dir import (load_model, pick_device, read_model_files, resolve_model_path, save_model_dir,
                                   twin_files, write_files)
from kmnist_core.labelled_crops import ReviewedCrops, review_figures, split_held_out
from kmnist_core.models import load_torch_model, optimize_for_inference, predict_logits
from kmnist_core.safe_text import csv_cell
from kmnist_core.train import TrainConfig, TrainRun, train_model, validation_negatives
from kmnist_core.transforms import AUGMENTATIONS, MEAN, STD

REVIEW_PRECISION = 0.995  # auto-accepted crops keep this precision (95 % lower bound on validation)
REVIEW_LEVEL = 0.95  # one-sided confidence of that bound
IN_SET_KEEP = 0.99  # the out-of-set threshold sends ~1 % of real validation characters to review


def code_version() -> str:
    """Package version, plus the git commit when running from a checkout."""
    v = version("kmnist-batch")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return f"{v}+{commit}" if commit else v


def build_card(cfg: TrainConfig, data: Dataset, history: list[dict], status: str, test_metrics: dict,
               calib: dict, review: dict) -> dict:
    return {
        "architecture": {"name": cfg.model, "num_classes": len(data.classes),
                         "parameters": None},  # filled by caller, which has the model
        "classes": data.classes.to_records(),
        "input": {"size": data.input_size, "channels": 1, "polarity": "light ink on dark background",
                  "normalization": {"mean": MEAN, "std": STD, "range": [-1.0, 1.0]}},
        "calibration": {**calib, "method": "temperature scaling fitted on val", **review,
                        "review_precision_target": REVIEW_PRECISION,
                        "fitted_on": f"{data.name} val ({len(data.val)} images) and {review['review_promise']['negatives_n']} "
                                     "validation negatives (kmnist_core.negatives: cut from val, held-out glyphs)"},
        "training": {"dataset": data.name, "split": data.split_note,
                     "sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
                     "config": cfg.to_dict(), "augmentation": AUGMENTATIONS[cfg.augment] and AUGMENTATIONS[cfg.augment].to_dict(),
                     "status": status, "epochs_run": len(history), "teachers": [teacher_summary(t) for t in cfg.teachers]},
        "metrics": {"test": {k: v for k, v in test_metrics.items() if k != "confusion_matrix"},
                    "final_epoch": history[-1] if history else {}},
        "code_version": code_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()},
    }


def teacher_summary(teacher: str) -> dict:
    """Which model a distilled student learnt from, so its card stays traceable."""
    card = read_card(resolve_model_path(teacher))
    return {"path": str(teacher), "model_id": card.raw.get("model_id"), "architecture": card.architecture,
            "test_accuracy": card.raw.get("metrics", {}).get("test", {}).get("accuracy")}


def write_history(path: Path, history: list[dict]) -> None:
    if not history:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in history)


def run_train(cfg: TrainConfig, out: Path, on_epoch: Callable[[dict, TrainRun], None] | None = None,
              data: Dataset | None = None, make_plots: bool = True, reviewed: ReviewedCrops | None = None) -> dict:
    """Train, calibrate on val, score on test, write the model directory. Returns the model card.

    `reviewed`: the crops of `cfg.reviews` (batch_infer/gathered_crops.py). A seeded part is held out; the rest
    is mixed into training; the card's `reviews` section records where they came from and the held-out
    part's figures before (the --init model) and after.
    """
    cfg.validate()
    if bool(cfg.reviews) != (reviewed is not None):
        raise KmnistError("a run with reviews needs their crops (kmnist-batch train --reviews OUT reads them)")
    data = data or load_dataset(cfg.dataset, cfg.data_dir)
    device = pick_device(cfg.device)
    learn = record = None
    if reviewed is not None:
        if reviewed.images.shape[1:] != (data.input_size, data.input_size):
            raise KmnistError(f"the reviewed crops are {reviewed.images.shape[1]}px; {data.name} is {data.input_size}px")
        learn, held_out = split_held_out(reviewed, cfg.review_holdout, cfg.seed)
        before, init_test = init_figures(cfg.init, held_out, data) if cfg.init else (None, None)
        record = ReviewsRecord(reviewed.sources, learn, held_out, before, init_test, cfg)
    run = train_model(cfg, data, device, on_epoch, reviewed=learn)
    return write_model_dir(out, run.model, cfg, data, run.history, run.status, device, make_plots, record)


@dataclass(frozen=True)
class ReviewsRecord:
    """What a run with reviews learnt from and held out, for the card's `reviews` section."""

    sources: tuple[dict, ...]
    learn: ReviewedCrops
    held_out: ReviewedCrops
    before: dict | None  # the --init model's figures on the held-out part
    init_test_accuracy: float | None  # the --init model's accuracy on the dataset's test split
    cfg: TrainConfig

    def section(self, after: dict, test_accuracy: float) -> dict:
        return {
            "sources": list(self.sources),
            "characters": int(len(self.learn.labels) + len(self.held_out.labels)),
            "negatives": int(len(self.learn.negatives) + len(self.held_out.negatives)),
            "learnt_from": {"characters": int(len(self.learn.labels)), "negatives": int(len(self.learn.negatives)),
                            "share_of_each_epoch": self.cfg.review_share},
            "held_out": {"share": self.cfg.review_holdout, "seed": self.cfg.seed, "precision": "fp32",
                         "thresholds": "each model's own card: before the --init model's, after the ones refitted "
                                       "on val by this run",
                         "before": self.before, "after": after},
            # Forgetting check: the dataset's test split, before (the --init model) and after.
            "dataset_test_accuracy": {"before": self.init_test_accuracy, "after": test_accuracy},
        }


def init_figures(init: str, held_out: ReviewedCrops, data: Dataset) -> tuple[dict, float]:
    """The --init model's figures on the held-out reviewed crops, in fp32 at its card's thresholds, and its
    accuracy on the dataset's test split."""
    model = load_model(init, precision="fp32")
    figures = review_figures(model.viewed(model.fp32_logits, held_out.images), held_out.labels,
                             model.viewed(model.fp32_logits, held_out.negatives), model.temperature,
                             model.calibration.review_params())
    test_accuracy = float((model.fp32_logits(data.test.images).argmax(1) == data.test.labels).mean())
    return {"model_id": model.model_id, **figures}, test_accuracy


def write_model_dir(out: Path, model: torch.nn.Module, cfg: TrainConfig, data: Dataset, history: list[dict],
                    status: str, device: str = "cpu", make_plots: bool = True,
                    reviews: ReviewsRecord | None = None) -> dict:
    """Calibrate a trained model on val, score it on test, and write its model directory and plots; with
    `reviews`, score it on the held-out reviewed crops too (the card's `reviews` section)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", cfg.to_dict())
    val_logits = predict_logits(model, data.val.images, device, cfg.eval_batch_size)
    test_logits = predict_logits(model, data.test.images, device, cfg.eval_batch_size)
    temperature = calibration.fit_temperature(val_logits, data.val.labels)
    val_neg, _ = validation_negatives(cfg, data)
    neg_logits = predict_logits(model, val_neg, device, cfg.eval_batch_size)
    review = calibration.fit_review(val_logits, data.val.labels, neg_logits, temperature, REVIEW_PRECISION,
                                    IN_SET_KEEP, REVIEW_LEVEL)
    test_metrics = classification_metrics(data.test.labels, test_logits.argmax(1), data.classes)
    test_metrics.update(review_metrics(test_logits, data.test.labels, temperature, review))
    calib = calibration_report(test_logits, data.test.labels, temperature)

    card = build_card(cfg, data, history, status, test_metrics, calib, review)
    card["architecture"]["parameters"] = sum(p.numel() for p in model.parameters())
    if reviews is not None:
        held = reviews.held_out
        after = review_figures(predict_logits(model, held.images, device, cfg.eval_batch_size), held.labels,
                               predict_logits(model, held.negatives, device, cfg.eval_batch_size), temperature, review)
        card["reviews"] = reviews.section(after, test_metrics["accuracy"])
    card = save_model_dir(out, model, card, build_twins(model, card, data, device, cfg.eval_batch_size))
    write_history(out / "history.csv", history)
    write_json_atomic(out / "test_metrics.json", {**test_metrics, "calibration": calib, "split_note": data.split_note})
    if make_plots:
        plots.training_curves(history, out / "training_curves.png",
                              f"{cfg.model} on {data.name} (lr {cfg.lr}, batch {cfg.batch_size})")
        write_evaluation_plots(out, data.test, test_logits, temperature, data.classes, f"{cfg.model} on {data.name} test")
    return card


def build_twins(model: torch.nn.Module, card: dict, data: Dataset, device: str, batch_size: int) -> Twins:
    """The model's fp32 twin, checked against torch on val and test, and its int8 twin, calibrated on its
    training images and checked on val (kmnist_core/onnx_export.py, kmnist_core/int8.py)."""
    fp32 = optimize_for_inference(model.cpu())
    logits = lambda images: predict_logits(fp32, images, "cpu", batch_size)  # noqa: E731
    checked = np.concatenate([data.val.images, data.test.images])
    fp32_onnx, fp32_section = build_fp32_twin(fp32, card, checked if len(checked) else data.train.images, logits)
    int8, int8_section = build_int8(fp32_onnx, card, data.train.images, (data.val.images, data.val.labels),
                                    (data.test.images, data.test.labels), logits, data.name)
    model.to(device)
    return Twins(fp32_onnx, fp32_section, int8, int8_section)


def build_twin(name_or_path: str, data_dir: str | None = None) -> ModelCard:
    """`kmnist-batch model int8 DIR`: (re)build a model directory's twins (fp32 and int8 ONNX) from its card's
    training data and write them with the card's new sections. The one place, besides `train` and the
    recipe, that writes twin files."""
    model_dir = resolve_model_path(name_or_path)
    card, weights = read_model_files(model_dir)
    model = load_torch_model(card, weights, str(model_dir))
    if not card.training_dataset:
        raise KmnistError(f"{model_dir}'s card names no training dataset: its int8 twin cannot be calibrated")
    data = load_dataset(card.training_dataset, data_dir or card.training_data_dir, allow_download=False)
    twins = build_twins(model, card.raw, data, "cpu", 1024)
    card = card.with_sections(int8=twins.int8_section, fp32_onnx=twins.fp32_section)
    try:
        write_files(model_dir, [*twin_files(twins), (CARD_FILE, json_text(card.raw).encode("utf-8"))])
    except OSError as e:
        raise KmnistError(f"cannot write the int8 twin into {model_dir}: {e.strerror or e}") from None
    return card
