"""The review promise, measured: for each model, on the kmnist-dev test split and on the out-of-set
evaluation tree (bench/ood_tree.py), what `predict` would auto-accept.

Per model: test accuracy, ECE after temperature, the share of test crops auto-accepted under the card's
thresholds (`review_below`, `ood_threshold`) and its precision, the share of the tree auto-accepted
overall and per kind, and the out-of-set AUROC. Also, on VALIDATION only (what the score was chosen
on), the AUROC of each out-of-set score against the validation negatives.

    .venv/bin/python bench/ood_tree.py --out runs/ood-tree
    .venv/bin/python bench/ood_figures.py --tree runs/ood-tree runs/default-oe/base default [--record]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.record import append_row  # noqa: E402
from kmnist_core import calibration  # noqa: E402
from kmnist_core.datasets import load_dataset  # noqa: E402
from kmnist_core.evaluate_model import run_evaluate  # noqa: E402
from kmnist_core.model_dir import load_model  # noqa: E402
from kmnist_core.train import TrainConfig, validation_negatives  # noqa: E402

KINDS = ("other_characters", "merged_pairs", "fragments", "blanks")


def val_aurocs(model, data, fonts: list[str]) -> dict[str, float]:
    neg, _ = validation_negatives(TrainConfig(negative_fonts=fonts), data)
    val_logits, neg_logits = model.logits(data.val.images), model.logits(neg)
    return {m: calibration.auroc(calibration.ood_score(val_logits, m), calibration.ood_score(neg_logits, m))
            for m in ("energy", "max-logit", "max-softmax")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--tree", type=Path, required=True, help="the out-of-set tree from bench/ood_tree.py")
    parser.add_argument("--record", action="store_true", help="append rows to docs/benchmarks.md")
    args = parser.parse_args()
    data = load_dataset("kmnist-dev")
    for name in args.models:
        model = load_model(name)
        fonts = model.card.raw["training"]["config"].get("negative_fonts", [])
        with tempfile.TemporaryDirectory() as tmp:
            m = run_evaluate(model, data, "test", Path(tmp), args.tree)
        r, u = m["review"], m["unknown"]
        kinds = " / ".join(f"{k} {u['by_kind'][k]['auto_accepted_share']:.1%}" for k in KINDS if k in u["by_kind"])
        aurocs = val_aurocs(model, data, [f for f in fonts if Path(f).exists()])
        precision = f"{r['auto_accepted_precision']:.2%}" if r["auto_accepted_precision"] is not None else "-"
        cells = [f"`{name}` `{model.model_id}`", f"{m['accuracy']:.1%}", f"{m['calibration']['ece_after']:.2%}",
                 f"{r['auto_accepted_share']:.1%} at {precision} ({r['auto_accepted_errors']} wrong)",
                 f"**{u['auto_accepted_share']:.1%}** of {u['n']}", kinds, f"{u.get('auroc', float('nan')):.3f}",
                 ", ".join(f"{k} {v:.3f}" for k, v in aurocs.items())]
        print(" | ".join(cells), flush=True)
        if args.record:
            append_row("out-of-set crops and the review promise", cells)


if __name__ == "__main__":
    main()
