"""The shipped default from a k-fold recipe: the recipe of bench/oof_folds.py trained on all 8,000
kmnist-dev images, with the temperature and thresholds fitted on the 8,000 out-of-fold predictions
(bench/oof_thresholds.py), and a card that carries the out-of-fold figures.

A distilled recipe's teacher is the teacher recipe trained on all 8,000 the same way (trained first, once).
Resumable: a checkpoint every 5 epochs under runs/oof/RECIPE/all.ckpt.pt; the trained weights land in
bench/results/oof/RECIPE/all.pt (committed, a few hundred KB), so the next session need not retrain.

    nice -n 19 .venv/bin/python bench/oof_final.py --recipe plain-oe --out runs/oof-default [--install]

The model directory's int8 twin is calibrated on the kmnist-dev train split and checked against fp32 on
val (kmnist_core/int8.py), both inside the training data here: the check is about quantization (top-1
agreement), and the twin runs on the card's out-of-fold thresholds (`int8_refit: false`), not a refit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.oof_folds import RECIPES, RESULTS, ROOT, TEACHER_RECIPE, all_images, recipe_config, trained_model  # noqa: E402,E501
from kmnist_core.recipe import train_resumable  # noqa: E402
from bench.oof_thresholds import load_folds  # noqa: E402
from kmnist_core.datasets import Dataset  # noqa: E402
from kmnist_core.evaluate import calibration_report, classification_metrics  # noqa: E402
from kmnist_core.experiment import build_twins  # noqa: E402
from kmnist_core.model_dir import DEFAULT_MODEL_DIR, MODEL_FILES, save_model_dir  # noqa: E402
from kmnist_core import recipe_model  # noqa: E402
from kmnist_core.train import TrainConfig  # noqa: E402

WORK = ROOT / "runs" / "oof"


def all_data() -> tuple[Dataset, Dataset]:
    """All 8,000 as the training split (val and test are the dataset's own, only logged: trained on)."""
    full, base = all_images()
    note = "kmnist-dev: all 8,000 images (train + val + test), no split held out; figures are out-of-fold"
    return Dataset(base.name, base.classes, base.input_size, full, base.val, base.test, note,
                   base.primary_metric), base


def train_all(recipe: str, threads: int) -> torch.nn.Module:
    """The recipe trained on all 8,000 (its teacher recipe first, if any); cached in RESULTS/RECIPE/all.pt."""
    cfg = recipe_config(recipe, threads)
    data, _ = all_data()
    weights = RESULTS / recipe / "all.pt"
    if not weights.is_file():
        teachers = [train_all(TEACHER_RECIPE[recipe], threads)] if recipe in TEACHER_RECIPE else []
        run, wall = train_resumable(f"{recipe} all", cfg, data, WORK / recipe / "all.ckpt.pt", teachers)
        tmp = weights.with_suffix(".tmp")
        torch.save({n: t.detach().cpu() for n, t in run.model.state_dict().items()}, tmp)
        tmp.replace(weights)
        print(f"{recipe} on all 8,000: {wall / 60:.1f} min", flush=True)
    return trained_model(recipe, weights, data)


def out_of_fold_card(recipe: str, model: torch.nn.Module, cfg: TrainConfig, data: Dataset) -> dict:
    """The card: calibration and figures from the folds' out-of-fold predictions, not from val."""
    report = json.loads((RESULTS / recipe / "thresholds.json").read_text(encoding="utf-8"))
    folds = load_folds(RESULTS / recipe)
    fitted = report["fitted"]
    temperature = fitted["temperature"]
    oof_metrics = classification_metrics(folds["labels"], folds["logits"].argmax(1), data.classes)
    oof_metrics.pop("confusion_matrix")
    review = {k: fitted[k] for k in ("ood_score", "ood_threshold", "review_below", "review_promise")}
    teacher = TEACHER_RECIPE.get(recipe) and \
        f"{TEACHER_RECIPE[recipe]} trained on all 8,000 (bench/results/oof/{TEACHER_RECIPE[recipe]}/all.pt)"
    card = recipe_model.out_of_fold_card(
        cfg, data, model, oof_metrics, calibration_report(folds["logits"], folds["labels"], temperature), review,
        fitted_by=f"{report['images']:,} out-of-fold predictions ({report['folds']} stratified folds, "
                  f"bench/oof_folds.py --recipe {recipe})",
        fitted_on=f"out-of-fold logits of all {report['images']:,} kmnist-dev images (each from a fold model that "
                  f"never saw it) and {fitted['review_promise']['negatives_n']:,} synthetic negatives cut from the "
                  "folds' held-out images with held-out glyphs",
        training={"recipe": recipe, "teacher": teacher})
    card["metrics"] = {"out_of_fold": {**oof_metrics, **report["out_of_fold"],
                                       "held_out_checks": report["held_out_checks"],
                                       "note": "predicted by the fold models (same recipe, trained on the other "
                                               "folds); this model itself was trained on all 8,000"}}
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="plain-oe", choices=sorted(RECIPES))
    parser.add_argument("--out", type=Path, required=True, help="the model directory to write")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--install", action="store_true", help="copy the result into kmnist_core/default_model/")
    args = parser.parse_args()
    if not (RESULTS / args.recipe / "thresholds.json").is_file():
        raise SystemExit(f"error: run bench/oof_folds.py and bench/oof_thresholds.py --recipe {args.recipe} first")
    model = train_all(args.recipe, args.threads)
    data, dev = all_data()
    cfg = recipe_config(args.recipe, args.threads)
    card = out_of_fold_card(args.recipe, model, cfg, data)
    # int8 calibrated on dev train, checked on dev val: as `kmnist-batch model int8` rebuilds it.
    card = save_model_dir(args.out, model, card, build_twins(model, card, dev, "cpu", cfg.eval_batch_size))
    gate = card["int8"]["gate"]
    print(f"{args.out}: model_id {card['model_id']}; int8 {'enabled' if card['int8']['enabled'] else 'off'} "
          f"(agreement {gate['agreement']:.4f}, weights {gate['weight_range']})")
    if args.install:
        for name in MODEL_FILES:
            if (args.out / name).exists():
                shutil.copy(args.out / name, DEFAULT_MODEL_DIR / name)


if __name__ == "__main__":
    main()
