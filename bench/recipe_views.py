"""What each test-time view buys a k-fold recipe, out of fold (issue 34: "say what each pass buys").

The recipe's folds stored every candidate view (kmnist_core/views.py CANDIDATE_VIEWS: rotated +-7 degrees,
zoomed 0.9 and 1.1) of their held-out rows and negatives (fold-K-views.npz). For each set of views below,
the crops under the gate are decided on the mean of themselves and those views, as predict would; the
card's temperature and thresholds are fitted on those logits as the recipe's review fits them (its chosen
out-of-set score and margin, recipe_thresholds.fit), and the promise is checked on the pooled folds, each
fold scored by thresholds fitted without it. Model passes: 1 + views x the share under the gate, for the
in-set crops and for the negatives (most of which are under the gate). Out of fold over the 14,000 pooled
images, not the official KMNIST protocol.

    .venv/bin/python bench/recipe_views.py [--recipe hands-oe] [--gate 0.99]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import arguments  # noqa: E402
from kmnist_core import recipe_thresholds as rt  # noqa: E402
from kmnist_core.views import CANDIDATE_VIEWS  # noqa: E402

ROTATIONS, ZOOMS = CANDIDATE_VIEWS[:2], CANDIDATE_VIEWS[2:]
CHOICES = {"none": (), "+7": CANDIDATE_VIEWS[:1], "+-7": ROTATIONS, "zoom 0.9, 1.1": ZOOMS,
           "+7, zoom 0.9": (CANDIDATE_VIEWS[0], CANDIDATE_VIEWS[2]), "all four": CANDIDATE_VIEWS}


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--recipe", default="hands-oe")
    parser.add_argument("--gate", type=float, default=rt.VIEW_GATE)
    args = parser.parse_args()
    results = ROOT / "recipes" / args.recipe
    chosen = json.loads((results / "review.json").read_text())["scores"]["chosen"]["fitted"]
    stored = rt.load_oof(results)
    print(f"{args.recipe}, out of fold, gate {args.gate}, {chosen['ood_score']}, margin {chosen['margin']}")
    for name, views in CHOICES.items():
        d = {k: v.copy() for k, v in stored.items()}
        shares = rt.apply_views(d, results, args.gate, views)["viewed_share"]
        fitted = rt.fit(d["logits"], d["labels"], d["fit_logits"], chosen["margin"], chosen["ood_score"])
        taken = rt.apply(fitted, d["logits"], d["labels"])
        pooled = rt.held_out_checks(d, chosen["margin"], chosen["ood_score"])["pooled folds"]
        kinds = rt.negative_figures(d, fitted, "kinds")
        hands = rt.pooled_by(rt.negative_figures(d, fitted, "hands"), lambda label: label.split("/")[1])
        sets = ("fit", "hands", "kinds")  # the share under the gate of all the negatives together
        negatives = np.average([shares[n] for n in sets], weights=[len(d[f"{n}_labels"]) for n in sets])
        print(f"{name:>14}: passes {1 + len(views) * shares['rows']:.3f} a crop, {1 + len(views) * negatives:.2f} a "
              f"negative; top-1 {np.mean(d['logits'].argmax(1) == d['labels']):.2%}; accepted "
              f"{taken['auto_accepted_share']:.2%} ({taken['auto_accepted_errors']} wrong), pooled folds' bound "
              f"{pooled['precision_lower_bound']:.2%}; held-out hands "
              + ", ".join(f"{k} {v['share']:.2%}" for k, v in hands.items()) + "; "
              + ", ".join(f"{k} {v['share']:.2%}" for k, v in kinds.items()), flush=True)


if __name__ == "__main__":
    main()
