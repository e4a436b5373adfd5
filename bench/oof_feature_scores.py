"""Two out-of-set scores beyond the card's, added to a recipe's accept rule out of fold: would they refuse
the fragments and overlays it still accepts (issue 34: every kind of non-character <= 2 %)?

- `worst view`: the lowest calibrated probability any of the five views gives the averaged top class
  (a crop the views disagree on); rows not viewed keep their as-is confidence. Free where views ran.
- `mahalanobis`: the smallest Mahalanobis distance of the penultimate features (after global pooling) to
  a class mean, with one covariance, fitted on the fold's training images and scored with the fold's
  own model (kmnist_core/recipe_thresholds.py fold_model): the usual feature-distance score.

Each score's threshold is a quantile of the accepted in-set rows' scores (keeping 99.9 ... 98 % of them),
applied on top of the recipe's chosen fit (its review.json), over every fold's held-out rows and
negative sets. No threshold here is fitted on the `kinds` negatives it reports.

    .venv/bin/python bench/oof_feature_scores.py [--recipe hands-oe]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from kmnist_core import calibration  # noqa: E402
from kmnist_core import recipe_thresholds as rt  # noqa: E402
from kmnist_core.recipe import Recipe, fold_dataset, stratified_folds  # noqa: E402
from kmnist_core.views import as_is_confidence  # noqa: E402

SETS = ("logits", "fit_logits", "hands_logits", "kinds_logits")
KEEPS = (1.0, 0.999, 0.998, 0.995, 0.99, 0.98)


def penultimate(model, images: np.ndarray) -> np.ndarray:
    import torch

    from kmnist_core.transforms import to_model_tensor

    out = []
    with torch.no_grad():
        for start in range(0, len(images), 512):
            x = to_model_tensor(images[start : start + 512])
            out.append(model.head[:2](model.features(x)).numpy())  # global pooling, flattened
    return np.concatenate(out)


def mahalanobis_scores(recipe: Recipe, d: dict) -> dict[str, np.ndarray]:
    """Every set's Mahalanobis score, each row by its own fold's model and training features."""
    from kmnist_core.datasets import load_labelled_pool

    pool = load_labelled_pool()
    folds = stratified_folds(pool.labels, pool.source, recipe.folds)
    scores = {key: np.zeros(len(d[key])) for key in SETS}
    for k in range(recipe.folds):
        model = rt.fold_model(recipe, k, len(pool.classes))
        data = fold_dataset(pool, folds, k)
        train = penultimate(model, data.train.images)
        means = np.stack([train[data.train.labels == c].mean(0) for c in range(len(pool.classes))])
        precision = np.linalg.inv(np.cov((train - means[data.train.labels]).T) + 1e-6 * np.eye(train.shape[1]))
        negatives = rt.fold_negative_sets(recipe, k, pool)
        images = {"logits": data.test.images, **{f"{name}_logits": imgs for name, (imgs, _) in negatives.items()}}
        for key, imgs in images.items():
            diff = penultimate(model, imgs)[:, None, :] - means[None]
            rows = (d["fold"] if key == "logits" else d[key.replace("logits", "fold")]) == k
            scores[key][rows] = np.einsum("ncd,de,nce->nc", diff, precision, diff).min(1)
    return scores


def worst_view_scores(recipe: Recipe, as_is: dict, viewed: dict, temperature: float, views: dict) -> dict[str, np.ndarray]:
    """Minus the lowest probability of the chosen class among the crop as is and the card's `views`
    (review.json's; `viewed`: the logits predict decides on, rt.apply_card_views; higher: more out of set)."""
    stored = rt.stored_views(recipe.results, list(range(recipe.folds)), tuple(tuple(v) for v in views["extra"]))
    scores = {}
    for key in SETS:
        unsure = as_is_confidence(as_is[key], views["gate_temperature"]) < views["gate"]
        top = viewed[key].argmax(1)
        chosen = np.stack([calibration.softmax(v.astype(np.float64), temperature)
                           for v in (as_is[key], *stored[key])])[:, np.arange(len(top)), top]
        worst = np.where(unsure, chosen.min(0), calibration.softmax(as_is[key], temperature).max(1))
        scores[key] = -worst
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="hands-oe")
    args = parser.parse_args()
    results = REPO / "recipes" / args.recipe
    folds = int(json.loads((results / "recipe.json").read_text())["folds"])
    recipe = Recipe(args.recipe, folds, results, results / "checkpoints")
    review = json.loads((recipe.results / "review.json").read_text())
    fitted, views = review["scores"]["chosen"]["fitted"], review["views"]
    d = rt.load_oof(recipe.results)
    as_is = {key: d[key].copy() for key in SETS}
    rt.apply_card_views(d, recipe.results, views)
    accepted = {key: rt.accepted(fitted, d[key]) for key in SETS}
    right = d["logits"].argmax(1) == d["labels"]
    kinds = d["kinds_labels"]
    scores = {"worst view": worst_view_scores(recipe, as_is, d, fitted["temperature"], views),
              "mahalanobis": mahalanobis_scores(recipe, d)}
    print(f"{args.recipe}, out of fold: in-set accepted share and its errors; negatives accepted")
    for name, score in scores.items():
        for keep in KEEPS:
            threshold = np.quantile(score["logits"][accepted["logits"]], keep)
            taken = {key: accepted[key] & (score[key] <= threshold) for key in SETS}
            per_kind = " ".join(f"{k} {taken['kinds_logits'][kinds == k].mean():.2%}" for k in np.unique(kinds))
            print(f"{name:>12}, keeping {keep:.1%} of accepted: in-set {taken['logits'].mean():.2%} "
                  f"({int((taken['logits'] & ~right).sum())} wrong); other characters in held-out hands "
                  f"{taken['hands_logits'].mean():.2%}; {per_kind}", flush=True)


if __name__ == "__main__":
    main()
