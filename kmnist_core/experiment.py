"""The train and evaluate commands end to end: data -> model -> calibration -> model directory + plots.

The resolved config is saved beside the outputs (config.json), as timm does, so a run can be repeated.
"""

from __future__ import annotations

import csv
import platform
import subprocess
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch

from kmnist_core import calibration, plots
from kmnist_core.datasets import Dataset, load_dataset
from kmnist_core.errors import KmnistError
from kmnist_core.evaluate import calibration_report, classification_metrics, write_evaluation_plots
from kmnist_core.model_dir import (Predictor, pick_device, read_card, resolve_model_path, save_model_dir,
                                   write_json_atomic)
from kmnist_core.train import TrainConfig, TrainRun, predict_logits, train_model
from kmnist_core.transforms import AUGMENTATIONS, MEAN, STD

REVIEW_PRECISION = 0.995  # the default review threshold keeps this precision on validation


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
               calib: dict, review_threshold: float) -> dict:
    return {
        "architecture": {"name": cfg.model, "num_classes": len(data.classes),
                         "parameters": None},  # filled by caller, which has the model
        "classes": data.classes.to_records(),
        "input": {"size": data.input_size, "channels": 1, "polarity": "light ink on dark background",
                  "normalization": {"mean": MEAN, "std": STD, "range": [-1.0, 1.0]}},
        "calibration": {**calib, "method": "temperature scaling fitted on val",
                        "review_below": review_threshold, "review_precision_target": REVIEW_PRECISION},
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
    return {"path": str(teacher), "model_id": card.get("model_id"), "architecture": card["architecture"]["name"],
            "test_accuracy": card.get("metrics", {}).get("test", {}).get("accuracy")}


def write_history(path: Path, history: list[dict]) -> None:
    if not history:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def run_train(cfg: TrainConfig, out: Path, on_epoch: Callable[[dict, TrainRun], None] | None = None,
              data: Dataset | None = None, make_plots: bool = True) -> dict:
    """Train, calibrate on val, score on test, write the model directory. Returns the model card."""
    cfg.validate()
    data = data or load_dataset(cfg.dataset, cfg.data_dir)
    device = pick_device(cfg.device)
    run = train_model(cfg, data, device, on_epoch)
    return write_model_dir(out, run.model, cfg, data, run.history, run.status, device, make_plots)


def write_model_dir(out: Path, model: torch.nn.Module, cfg: TrainConfig, data: Dataset, history: list[dict],
                    status: str, device: str = "cpu", make_plots: bool = True) -> dict:
    """Calibrate a trained model on val, score it on test, and write its model directory and plots."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", cfg.to_dict())
    val_logits = predict_logits(model, data.val.images, device, cfg.eval_batch_size)
    test_logits = predict_logits(model, data.test.images, device, cfg.eval_batch_size)
    temperature = calibration.fit_temperature(val_logits, data.val.labels)
    review_threshold, _ = calibration.threshold_for_precision(
        calibration.softmax(val_logits, temperature), data.val.labels, REVIEW_PRECISION)
    test_metrics = classification_metrics(data.test.labels, test_logits.argmax(1), data.classes)
    calib = calibration_report(test_logits, data.test.labels, temperature)

    card = build_card(cfg, data, history, status, test_metrics, calib, review_threshold)
    card["architecture"]["parameters"] = sum(p.numel() for p in model.parameters())
    card = save_model_dir(out, model, card)
    write_history(out / "history.csv", history)
    write_json_atomic(out / "test_metrics.json", {**test_metrics, "calibration": calib, "split_note": data.split_note})
    if make_plots:
        plots.training_curves(history, out / "training_curves.png",
                              f"{cfg.model} on {data.name} (lr {cfg.lr}, batch {cfg.batch_size})")
        write_evaluation_plots(out, data.test, test_logits, temperature, data.classes, f"{cfg.model} on {data.name} test")
    return card


def run_evaluate(predictor: Predictor, data: Dataset, split: str, out: Path) -> dict:
    """Score a loaded model on one split of a dataset; writes metrics.json and the plots into `out`."""
    part = getattr(data, split)
    if len(predictor.classes) != len(data.classes) or predictor.input_size != data.input_size:
        raise KmnistError(f"model has {len(predictor.classes)} classes at {predictor.input_size}px, "
                          f"dataset {data.name} has {len(data.classes)} at {data.input_size}px")
    logits = predictor.logits(part.images)
    metrics = classification_metrics(part.labels, logits.argmax(1), data.classes)
    metrics["calibration"] = calibration_report(logits, part.labels, predictor.temperature)
    metrics.update({"dataset": data.name, "split": split, "split_note": data.split_note, "model_id": predictor.model_id})
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", metrics)
    write_evaluation_plots(out, part, logits, predictor.temperature, data.classes, f"{data.name} {split}")
    return metrics
