"""How out-of-fold top-1 grows with the number of training images: is 99.0 % within reach of 6,400?

For fold K of bench/oof_folds.py, the recipe is trained (same epochs, same everything) on a stratified,
seeded FRACTION of the fold's 6,400 training images and scored on the fold's 1,600 held-out images;
fraction 1.0 is the fold's own result (fold-K.npz). Resumable like the folds: a checkpoint every 5 epochs
in runs/oof/RECIPE/curve/, the result (`curve-fold-K-F.npz`: labels, logits, wall time) in the recipe's
results folder, committed.

    nice -n 19 .venv/bin/python bench/oof_learning_curve.py --fold 0 --fraction 0.5
    .venv/bin/python bench/oof_learning_curve.py --report          # the table of what is done
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.oof_folds import RECIPES, RESULTS, ROOT, all_images, fold_dataset, recipe_config, stratified_folds  # noqa: E402,E501
from kmnist_core.recipe import train_resumable  # noqa: E402
from kmnist_core.datasets import Dataset, Split  # noqa: E402
from kmnist_core.models import predict_logits  # noqa: E402

SUBSET_SEED = 7


def subset(data: Dataset, fraction: float) -> Dataset:
    """The fold's dataset with a stratified, seeded `fraction` of its training images."""
    train = data.train
    keep = np.sort(np.concatenate([
        np.random.default_rng(SUBSET_SEED).permutation(np.flatnonzero(train.labels == c))[: round(fraction * np.sum(train.labels == c))]
        for c in np.unique(train.labels)]))
    return Dataset(data.name, data.classes, data.input_size, Split(train.images[keep], train.labels[keep]),
                   data.val, data.test, f"{data.split_note}; {fraction:g} of its training images", data.primary_metric)


def report(recipe: str) -> None:
    results = RESULTS / recipe
    rows: dict[float, list[tuple[int, float]]] = {}
    done = [p for p in sorted(results.glob("curve-fold-*.npz")) if ".tmp" not in p.name]
    for path in done + sorted(results.glob("fold-[0-9].npz")):
        with np.load(path) as f:
            k = int(path.stem.split("-")[2] if path.stem.startswith("curve") else path.stem.split("-")[1])
            fraction = float(path.stem.split("-")[3]) if path.stem.startswith("curve") else 1.0
            rows.setdefault(fraction, []).append((k, float((f["logits"].argmax(1) == f["labels"]).mean())))
    for fraction in sorted(rows):
        print(f"{fraction:5.2f} of 6,400 ({round(fraction * 6400):,} images): "
              + ", ".join(f"fold {k} {acc:.2%}" for k, acc in sorted(rows[fraction])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="plain-oe", choices=sorted(RECIPES))
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if args.report:
        report(args.recipe)
        return
    if not 0 < args.fraction < 1:
        raise SystemExit("error: --fraction must lie between 0 and 1 (1 is the fold itself)")
    out = RESULTS / args.recipe / f"curve-fold-{args.fold}-{args.fraction:g}.npz"
    if out.exists():
        print(f"{out.name}: done")
        return
    full, base = all_images()
    fold = stratified_folds(full.labels, 5)
    data = subset(fold_dataset(full, base, fold, args.fold), args.fraction)
    ckpt = ROOT / "runs" / "oof" / args.recipe / "curve" / f"fold-{args.fold}-{args.fraction:g}.ckpt.pt"
    run, wall = train_resumable(f"fold {args.fold} at {args.fraction:g}", recipe_config(args.recipe), data, ckpt)
    logits = predict_logits(run.model, data.test.images, "cpu")
    tmp = out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, labels=data.test.labels, logits=logits, train_images=np.int64(len(data.train.labels)),
                        wall_s=np.float64(wall))
    os.replace(tmp, out)
    print(f"fold {args.fold} on {len(data.train.labels):,} training images: held-out top-1 "
          f"{float((logits.argmax(1) == data.test.labels).mean()):.4f}, {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
