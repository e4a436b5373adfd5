"""Out of fold: do test-time views and a second fold model buy the accuracy issue 24 asks for, and at what cost?

For each fold k of bench/oof_folds.py, the fold models of the recipes given (`plain-oe`, and `vgg-half-oe`
when its five folds exist) predict fold k's held-out images and its 2,000 synthetic negatives under a
few fixed views: the image as is, rotated by +-7 degrees and zoomed by 0.9 and 1.1 (inside the training
augmentation's +-12 degrees and +-10 % zoom). Every model saw only the other folds, so every figure is
out of fold.

A combination averages the log-probabilities of its models and views. It is applied either to every row
or only to the rows the first model alone is unsure of (calibrated confidence under a gate); the others
keep the first model's logits, as predict would compute them. For each, the card's thresholds are fitted
on the 8,000 combined out-of-fold rows exactly as bench/oof_thresholds.py fits them, and checked the same
way (per fold and on the kmnist-dev test split, each fitted without its rows).

The cost is model passes per in-set crop, in passes of the first model: 1 + (gated share) x (the extra
passes, a second-model pass counted as `--second-cost` first-model passes); the share of the synthetic
negatives under the gate is printed beside it (a crop that is no character is usually unsure). `--speed` measures that ratio on
this machine (int8 twins, one thread, interleaved rounds); run it only on an idle machine.

    .venv/bin/python bench/oof_views.py [--recipes plain-oe,vgg-half-oe] [--speed]

View logits are cached in runs/oof-views/ (regenerated from the committed fold weights in about a minute
a fold).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.oof_folds import (RESULTS, all_images, fold_dataset, recipe_config, stratified_folds,  # noqa: E402
                             trained_model)
from bench.int8_figures import rate  # noqa: E402
from bench.oof_thresholds import apply, fit  # noqa: E402
from kmnist_core import calibration  # noqa: E402
from kmnist_core.models import optimize_for_inference  # noqa: E402
from kmnist_core.train import validation_negatives  # noqa: E402
from kmnist_core.transforms import affine, to_model_tensor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs" / "oof-views"
# (rotation in degrees, zoom): fixed, inside the strong augmentation's range (kmnist_core/transforms.py).
VIEWS = {"as is": (0.0, 1.0), "rotated +7": (7.0, 1.0), "rotated -7": (-7.0, 1.0), "zoom 0.9": (0.0, 0.9),
         "zoom 1.1": (0.0, 1.1)}
GATES = (0.5, 0.7, 0.9, 0.99)


def view(x: torch.Tensor, degrees: float, zoom: float) -> torch.Tensor:
    """One fixed affine view of model tensors in [-1, 1]; pixels brought in from outside are background."""
    if degrees == 0.0 and zoom == 1.0:
        return x
    n = len(x)
    return affine(x, torch.full((n,), math.radians(degrees)), torch.full((n,), zoom), torch.zeros(n, 2), -1.0)


@torch.inference_mode()
def view_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """(views, N, classes) logits of `images` under VIEWS."""
    x = to_model_tensor(images)
    return np.stack([torch.cat([model(view(b, *v)) for b in x.split(1024)]).numpy() for v in VIEWS.values()])


def fold_views(recipe: str, k: int, full, base, fold: np.ndarray) -> dict[str, np.ndarray]:
    """The fold model's view logits on its held-out images and negatives, cached."""
    path = CACHE / recipe / f"fold-{k}.npz"
    if path.exists():
        return dict(np.load(path))
    data = fold_dataset(full, base, fold, k)
    model = optimize_for_inference(trained_model(recipe, RESULTS / recipe / f"fold-{k}.pt", data))
    negatives, _ = validation_negatives(recipe_config(recipe), data)
    out = {"index": np.flatnonzero(fold == k), "labels": data.test.labels, "logits": view_logits(model, data.test.images),
           "neg_logits": view_logits(model, negatives)}
    stored = np.load(RESULTS / recipe / f"fold-{k}.npz")  # the fold's own run: the same model, the same crops
    for key in ("logits", "neg_logits"):
        if not np.allclose(out[key][0], stored[key], atol=1e-3):
            raise SystemExit(f"error: {recipe} fold {k}: {key} differ from the fold's stored ones")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **out)
    return out


def joined(per_fold: list[list[dict]], model: int, key: str) -> np.ndarray:
    """One model's `key` over the folds, rows in fold order (logits are (views, rows, classes))."""
    return np.concatenate([p[model][key] for p in per_fold], axis=1 if key.endswith("logits") else 0)


def log_probs(logits: np.ndarray) -> np.ndarray:
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def combine(parts: list[np.ndarray], views: list[int]) -> np.ndarray:
    """Mean log-probability over the models' chosen views: a geometric-mean ensemble, used as logits."""
    return np.mean([log_probs(p[v]) for p in parts for v in views], axis=0)


def gated(first: np.ndarray, combined: np.ndarray, temperature: float, gate: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The combined logits on rows whose first-model calibrated confidence is under `gate` (all rows if None)."""
    if gate is None:
        return combined, np.ones(len(first), bool)
    unsure = calibration.softmax(first, temperature).max(1) < gate
    return np.where(unsure[:, None], combined, first), unsure


def report(name: str, logits: np.ndarray, neg: np.ndarray, labels: np.ndarray, fold: np.ndarray, neg_fold: np.ndarray,
           index: np.ndarray, cost: float) -> None:
    fitted = fit(logits, labels, neg)
    pooled = apply(fitted, logits, labels, neg)
    checks = [apply(fit(logits[fold != k], labels[fold != k], neg[neg_fold != k]), logits[fold == k], labels[fold == k],
                    neg[neg_fold == k]) for k in np.unique(fold)]
    test = index >= 7000  # the kmnist-dev test split (bench/oof_folds.py all_images puts it last)
    on_test = apply(fit(logits[~test], labels[~test], neg), logits[test], labels[test], neg[:0])
    print(f"{name:58s} {cost:5.2f}  {pooled['accuracy']:.4f}  {pooled['auto_accepted_share']:.4f} "
          f"{pooled['auto_accepted_errors']:3d} {pooled['precision_lower_bound']:.4f}  "
          f"{min(c['precision'] for c in checks):.4f}  {on_test['auto_accepted_errors']}/{on_test['auto_accepted']} "
          f"{on_test['precision']:.4f}  {pooled['negatives_accepted_share']:.4f}", flush=True)


def speed_ratio(recipes: list[str], full, base, fold: np.ndarray) -> float:
    """Images/s of the first recipe's int8 twin over the second's, one thread, interleaved rounds."""
    from kmnist_core.int8 import calibration_sample, quantize_model
    from kmnist_core.ort_model import OrtModel

    torch.set_num_threads(1)
    x = full.images[:1024]
    twins = [OrtModel(quantize_model(optimize_for_inference(trained_model(r, RESULTS / r / "fold-0.pt", base)),
                                     base.input_size, calibration_sample(full.images[fold != 0]))) for r in recipes]
    rates: list[list[float]] = [[] for _ in twins]
    for _ in range(7):  # interleaved, so drifting load hits both alike
        for twin, r in zip(twins, rates):
            r.append(rate(lambda t=twin: t.logits(x), len(x), 1.0))
    medians = [statistics.median(r) for r in rates]
    print("int8 twin, one thread: " + ", ".join(f"{r} {m:,.0f} images/s" for r, m in zip(recipes, medians)))
    return medians[0] / medians[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="plain-oe,vgg-half-oe", help="first one is the model predict runs")
    parser.add_argument("--second-cost", type=float, default=2.02,
                        help="a second-model pass in first-model passes (vgg-half's int8 twin: 2.02, measured by --speed)")
    parser.add_argument("--speed", action="store_true", help="measure --second-cost here first (idle machine only)")
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    full, base = all_images()
    fold = stratified_folds(full.labels, 5)
    if args.speed and len(recipes) > 1:
        args.second_cost = speed_ratio(recipes, full, base, fold)
        print(f"a {recipes[1]} pass costs {args.second_cost:.2f} {recipes[0]} passes")
    per_fold = [[fold_views(r, k, full, base, fold) for r in recipes] for k in range(5)]
    labels, index = joined(per_fold, 0, "labels"), joined(per_fold, 0, "index")
    row_fold = np.concatenate([np.full(len(p[0]["labels"]), k) for k, p in enumerate(per_fold)])
    neg_fold = np.concatenate([np.full(p[0]["neg_logits"].shape[1], k) for k, p in enumerate(per_fold)])
    models = [joined(per_fold, i, "logits") for i in range(len(recipes))]
    negs = [joined(per_fold, i, "neg_logits") for i in range(len(recipes))]
    first, first_neg = models[0][0], negs[0][0]
    temperature = calibration.fit_temperature(first, labels)
    all_views, one = list(range(len(VIEWS))), [0]
    combos = {f"{recipes[0]}, {len(VIEWS)} views": (1, all_views, len(VIEWS) - 1)}
    if len(recipes) > 1:
        combos[f"+ {recipes[1]}, as is"] = (2, one, args.second_cost)
        combos[f"+ {recipes[1]}, {len(VIEWS)} views each"] = (2, all_views, len(VIEWS) - 1 + len(VIEWS) * args.second_cost)
    print(f"{len(labels)} out-of-fold crops, {len(VIEWS)} views {list(VIEWS)}; gate = first model's calibrated "
          f"confidence (T {temperature:.3f})")
    print(f"{'':58s} {'cost':>5s}  {'top-1':6s}  {'acc.':6s} {'err':>3s} {'bound':6s}  {'worst':6s}  "
          f"{'test split':13s} {'neg.'}")
    report(f"{recipes[0]} alone", first, first_neg, labels, row_fold, neg_fold, index, 1.0)
    for name, (n_models, views, extra) in combos.items():
        rows, neg_rows = combine(models[:n_models], views), combine(negs[:n_models], views)
        for gate in (None, *GATES):
            logits, unsure = gated(first, rows, temperature, gate)
            neg, neg_unsure = gated(first_neg, neg_rows, temperature, gate)
            label = f"{name}, {'every row' if gate is None else f'under {gate} ({unsure.mean():.1%}; neg. {neg_unsure.mean():.0%})'}"
            report(label, logits, neg, labels, row_fold, neg_fold, index, 1 + unsure.mean() * extra)
    print("cost: model passes per in-set crop in first-model passes; acc.: auto-accepted share (fitted on all "
          "8,000), err: its errors, bound: 95 % lower bound of its precision; worst: lowest per-fold precision "
          "(thresholds fitted on the other folds); test split: errors/accepted and precision with thresholds "
          "fitted on the other 7,000; neg.: synthetic negatives auto-accepted")


if __name__ == "__main__":
    main()
