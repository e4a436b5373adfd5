"""The study's comparison figures for a grid: learning rates, batch sizes, and a heatmap."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.ticker import MaxNLocator

import seaborn as sns

from kmnist_core.plots import plt, save_figure


def comparison(history: pd.DataFrame, panel_key: str, line_key: str, path: Path, title: str) -> Path:
    """Rows: train loss and test accuracy per epoch; one column per `panel_key`, one line per `line_key`."""
    panels = sorted(history[panel_key].unique())
    fig, axes = plt.subplots(2, len(panels), figsize=(3.6 * len(panels), 6.5), squeeze=False, sharey="row")
    for col, panel in enumerate(panels):
        part = history[history[panel_key] == panel]
        for value, curve in sorted(part.groupby(line_key), key=lambda kv: kv[0]):
            curve = curve.sort_values("epoch")
            axes[0, col].plot(curve.epoch, curve.train_loss, "o-", ms=3, label=f"{line_key} {value:g}")
            axes[1, col].plot(curve.epoch, curve.test_acc, "o-", ms=3, label=f"{line_key} {value:g}")
        axes[0, col].set_title(f"{panel_key} {panel:g}")
        axes[0, col].set_yscale("log")  # a diverging lr's loss would flatten every other curve
        axes[1, col].set_xlabel("epoch")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_ylabel("train loss")
    axes[1, 0].set_ylabel("test accuracy")
    axes[0, -1].legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def heatmap(trials: pd.DataFrame, path: Path) -> Path:
    grid = trials.pivot_table(index="lr", columns="batch_size", values="best_val_acc").sort_index(ascending=False)
    fig, ax = plt.subplots(figsize=(1.3 * len(grid.columns) + 2, 0.9 * len(grid.index) + 1.5))
    sns.heatmap(grid, annot=True, fmt=".3f", cmap="viridis", ax=ax, cbar_kws={"label": "best val accuracy"})
    ax.set(xlabel="batch size", ylabel="learning rate", title="Best validation accuracy")
    return save_figure(fig, path)


def write_grid_plots(trials: pd.DataFrame, history: pd.DataFrame, out: Path) -> list[Path]:
    if history.empty or "train_loss" not in history or trials.best_val_acc.isna().all():
        return []
    return [
        comparison(history, "batch_size", "lr", out / "lr_comparison.png", "Learning rates compared at each batch size"),
        comparison(history, "lr", "batch_size", out / "batch_size_comparison.png", "Batch sizes compared at each learning rate"),
        heatmap(trials, out / "lr_batch_heatmap.png"),
    ]
