"""Two kmnist_core recipes' out-of-fold figures at one auto-accepted share: each recipe's review.json fit
(temperature, out-of-set score and threshold) with review_below moved until that share of its in-set rows
is accepted, with the card's views applied (kmnist_core/recipe_thresholds.py). Recipes fitted to the same
precision can land at different shares; this compares what they let through at the same one. Out of fold
over the 14,000 pooled images, not the official KMNIST protocol.

    .venv/bin/python bench/recipes_at_share.py [--recipes hands-oe,hands-oe-overlays] [--share 0.9639]

`--share` takes several shares (0.96,0.94,0.92): how much of the in-set acceptance it costs to get every
kind under a bound.

`--folds 0,1` compares recipes whose folds are not all trained yet, on those folds' rows only: each recipe
fitted on them as its review would fit all of them (rt.fit, the out-of-set score that best separates its
`fit` negatives, margin 0.002), as its own fit and at the share. `--average` (with `--folds`) also
scores the recipes as one model: their logits, each with its views, averaged, and fitted the same way
(with max-softmax when their `fit` negatives differ, being drawn with different mixes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402

from bench.common import arguments  # noqa: E402
from kmnist_core import recipe_thresholds as rt  # noqa: E402
from kmnist_core.recipe import RECIPES  # noqa: E402


def at_share(d: dict, fitted: dict, share: float) -> dict:
    """`fitted` with the review_below at which `share` of the in-set rows is accepted (bisection)."""
    low, high = 0.0, 1.0
    moved = dict(fitted)
    for _ in range(50):
        moved["review_below"] = (low + high) / 2
        if rt.accepted(moved, d["logits"]).mean() > share:
            low = moved["review_below"]
        else:
            high = moved["review_below"]
    return moved


def figures(d: dict, fitted: dict) -> str:
    taken = rt.apply(fitted, d["logits"], d["labels"])
    kinds = rt.negative_figures(d, fitted, "kinds")
    hands = rt.pooled_by(rt.negative_figures(d, fitted, "hands"), lambda label: label.split("/")[1])
    return (f"review_below {fitted['review_below']:.3f}: accepted {taken['auto_accepted_share']:.2%} "
            f"({taken['auto_accepted_errors']} wrong); other kinds "
            + ", ".join(f"{k} {v['share']:.2%}" for k, v in kinds.items())
            + "; held-out hands " + ", ".join(f"{k} {v['share']:.2%}" for k, v in hands.items()))


def only_folds(d: dict, folds: set[int]) -> dict:
    """`d` (rt.load_oof) cut to the rows and negatives the given folds scored, in the same order."""
    out = dict(d)
    rows = np.isin(d["fold"], sorted(folds))
    for key in ("index", "labels", "source", "logits", "fold"):
        out[key] = d[key][rows]
    for name in ("fit", "hands", "kinds"):
        rows = np.isin(d[f"{name}_fold"], sorted(folds))
        for what in ("logits", "labels", "fold"):
            out[f"{name}_{what}"] = d[f"{name}_{what}"][rows]
    return out


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--recipes", default="hands-oe,hands-oe-overlays")
    parser.add_argument("--share", default="0.9639", help="auto-accepted share(s) of the in-set rows, comma-separated")
    parser.add_argument("--folds", help="only these folds (comma-separated), each recipe fitted on them")
    parser.add_argument("--average", action="store_true", help="with --folds: the recipes averaged as one model too")
    args = parser.parse_args()
    scored = []
    for name in args.recipes.split(","):
        results = ROOT / "recipes" / name
        d = rt.load_oof(results)
        if args.folds:  # no review yet: the views a review would choose
            d = only_folds(d, {int(k) for k in args.folds.split(",")})
            rt.apply_views(d, results, rt.VIEW_GATE)
            fitted = rt.fit(d["logits"], d["labels"], d["fit_logits"], 0.002)
            print(f"{name}, folds {args.folds}: top-1 {rt.top1(d)}, out-of-set score {fitted['ood_score']}")
        else:
            review = json.loads((results / "review.json").read_text())
            rt.apply_card_views(d, results, review["views"])
            fitted = review["scores"]["chosen"]["fitted"]
        print(f"{name} at its fit: {figures(d, fitted)}")
        for share in map(float, args.share.split(",")):
            print(f"{name} at {share:.2%}: {figures(d, at_share(d, fitted, share))}", flush=True)
        scored.append(d)
    if args.average and args.folds:
        d = dict(scored[0])
        for key in ("logits", "fit_logits", "hands_logits", "kinds_logits"):
            d[key] = np.mean([s[key] for s in scored], axis=0)
        # Each recipe's `fit` negatives are drawn with its own negative mix: the same images only when the
        # mixes agree. Otherwise the score is max-softmax, which is fitted without them.
        names = args.recipes.split(",")
        same_fit = all(RECIPES[n]["negative_mix"] == RECIPES[names[0]]["negative_mix"] for n in names)
        fitted = rt.fit(d["logits"], d["labels"], d["fit_logits"], 0.002, None if same_fit else "max-softmax")
        print(f"{args.recipes} averaged, folds {args.folds}: top-1 {rt.top1(d)}, out-of-set score {fitted['ood_score']}")
        for share in map(float, args.share.split(",")):
            print(f"averaged at {share:.2%}: {figures(d, at_share(d, fitted, share))}", flush=True)


if __name__ == "__main__":
    main()
