"""Figures (PNG, non-interactive backend). IPAexGothic from matplotlib-fontja draws the kana."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib_fontja  # noqa: E402,F401  (registers and selects IPAexGothic)
import numpy as np  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def training_curves(history: Sequence[dict], path: Path, title: str = "") -> Path:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    for key, label in (("train_acc", "train"), ("val_acc", "val"), ("test_acc", "test")):
        ax_acc.plot(epochs, [h[key] for h in history], "o-", label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def confusion_matrix_plot(cm: np.ndarray, chars: Sequence[str], path: Path, title: str = "Confusion matrix") -> Path:
    n = len(chars)
    big = n > 60  # thousands of kanji: a heatmap without labels is all that can be read
    fig, ax = plt.subplots(figsize=(8, 7) if n <= 12 else (14, 12))
    import seaborn as sns  # its import pulls in scipy.stats (~0.8 s): only for this plot

    sns.heatmap(cm, ax=ax, cmap="Blues", annot=n <= 12, fmt="d", square=True, cbar=True,
                xticklabels=False if big else list(chars), yticklabels=False if big else list(chars))
    ax.set(xlabel="predicted", ylabel="true", title=title)
    ax.tick_params(axis="y", labelrotation=0)
    return save_figure(fig, path)


def sample_predictions(images: np.ndarray, true: np.ndarray, pred: np.ndarray, chars: Sequence[str], path: Path) -> Path:
    """10x10 grid of the first 100 images labelled true/pred, green when right, red when wrong.
    One mosaic image on one axes: a hundred subplots take seconds to draw, this a fraction of one."""
    n = min(100, len(images))
    side = images.shape[1]
    cell = side + side // 2  # room above each image for its label
    mosaic = np.full((10 * cell, 10 * side + 9 * (side // 4)), 255, dtype=np.float32)  # labels on white
    fig, ax = plt.subplots(figsize=(10, 10 * mosaic.shape[0] / mosaic.shape[1]))
    for i in range(n):
        row, col = divmod(i, 10)
        y, x = row * cell + side // 2, col * (side + side // 4)
        mosaic[y:y + side, x:x + side] = images[i]
        ok = true[i] == pred[i]
        ax.text(x + side / 2, y - 1, f"{chars[true[i]]}/{chars[pred[i]]}", color="green" if ok else "red",
                fontsize=11, ha="center", va="bottom")
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    ax.set_title("First 100 test images: true/predicted")
    return save_figure(fig, path)


def reliability_diagram(bins: Sequence[dict], ece_before: float, ece_after: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", label="calibrated model")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability (ECE {ece_before:.2%} -> {ece_after:.2%})")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def risk_coverage_plot(coverage: np.ndarray, precision: np.ndarray, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(coverage, precision)
    ax.set(xlabel="share auto-accepted (coverage)", ylabel="precision of accepted",
           ylim=(max(0.0, float(precision.min()) - 0.01), 1.001), title="Risk-coverage")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def bar_chart(labels: Sequence[str], values: np.ndarray, path: Path, title: str, ylabel: str) -> Path:
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(labels)), 4))
    ax.bar(range(len(labels)), values, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, fontsize=12)
    ax.set(title=title, ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def ood_histogram(in_scores: np.ndarray, out_scores: np.ndarray, threshold: float | None, method: str,
                  path: Path) -> Path:
    """Out-of-set scores of real characters vs out-of-set crops, with the review threshold."""
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(min(in_scores.min(), out_scores.min()), max(in_scores.max(), out_scores.max()), 60)
    ax.hist(in_scores, bins=bins, alpha=0.6, density=True, label=f"the model's characters ({len(in_scores)})")
    ax.hist(out_scores, bins=bins, alpha=0.6, density=True, label=f"out-of-set crops ({len(out_scores)})")
    if threshold is not None:
        ax.axvline(threshold, color="red", ls="--", label=f"unknown above {threshold:.2f}")
    ax.set(xlabel=f"out-of-set score ({method}; higher = less like any class)", ylabel="density",
           title="Out-of-set scores")
    ax.legend()
    return save_figure(fig, path)
