"""The shipped default model from a k-fold recipe: the recipe (kmnist_core/recipe.py) trained on all 14,000
bundled images and every hand, with the temperature and thresholds fitted on the folds' out-of-fold
predictions (kmnist_core/recipe_thresholds.py, recipes/RECIPE/review.json), and a card that carries those figures.

Resumable like a fold (a checkpoint every few epochs under the work folder); the weights land in
recipes/RECIPE/all.pt (committed, a few hundred KB) so a later session need not retrain. The int8 twin is
calibrated on the kmnist-pooled train split and checked against fp32 on its val split, both inside the
training data: that check is about quantization (top-1 agreement); the twin runs on the card's
out-of-fold thresholds (`int8_refit: false`).
Entry point: `python -m jobs.recipe final [--install]` (`make default-model`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from kmnist_core.card import ViewsSection
from kmnist_core.datasets import Dataset, Split, load_dataset, load_labelled_pool
from kmnist_core.errors import KmnistError
from kmnist_core.evaluate import calibration_report, classification_metrics
from kmnist_core.experiment import build_card, build_twins
from kmnist_core.model_dir import DEFAULT_MODEL_DIR, MODEL_FILES, save_model_dir, write_files
from kmnist_core.models import create_model
from kmnist_core.recipe import RECIPES, Recipe, train_resumable
from kmnist_core.recipe_thresholds import REVIEW_PRECISION, apply_card_views, load_oof
from kmnist_core.train_options import TrainConfig


def all_images() -> tuple[Dataset, Dataset]:
    """(every bundled image as the training split, kmnist-pooled): val and test are only logged, trained on."""
    pool = load_labelled_pool()
    pooled = load_dataset("kmnist-pooled")
    note = "kmnist-pooled: all 14,000 images, none held out; the card's figures are out-of-fold"
    return Dataset("kmnist-pooled", pool.classes, 28, Split(pool.images, pool.labels), pooled.val, pooled.test, note,
                   "accuracy"), pooled


def train_final(recipe: Recipe, data: Dataset) -> torch.nn.Module:
    """The recipe on `data`'s training split (all_images) and all hands; cached in recipes/RECIPE/all.pt."""
    weights = recipe.results / "all.pt"
    if not weights.is_file():
        run, wall = train_resumable(f"{recipe.name} all", recipe.config(None), data, recipe.work / "all.ckpt.pt")
        tmp = weights.with_suffix(".tmp")
        torch.save({n: t.detach().cpu() for n, t in run.model.state_dict().items()}, tmp)
        os.replace(tmp, weights)
        (recipe.work / "all.ckpt.pt").unlink(missing_ok=True)
        print(f"{recipe.name} on all {len(data.train):,}: {wall / 60:.1f} min", flush=True)
    model = create_model(RECIPES[recipe.name]["model"], len(data.classes), data.input_size)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def out_of_fold_card(cfg: TrainConfig, data: Dataset, model: torch.nn.Module, oof_metrics: dict, calibration: dict,
                     review: dict, fitted_by: str, fitted_on: str, training: dict) -> dict:
    """A card whose temperature and thresholds were fitted on out-of-fold predictions (`fitted_by`: how
    many, from which folds; `fitted_on`: what they are), for a model trained on all of `data`'s images:
    no val or test split of its own. `training`: what the card's training section adds (the recipe)."""
    card = build_card(cfg, data, [], "completed", oof_metrics, calibration, review)
    card["architecture"]["parameters"] = sum(p.numel() for p in model.parameters())
    card["calibration"].update({"method": f"temperature scaling and thresholds fitted on {fitted_by}",
                                "fitted_on": fitted_on, "review_precision_target": REVIEW_PRECISION,
                                "int8_refit": False})
    card["training"].update({"epochs_run": cfg.epochs, "sizes": {"train": len(data.train), "val": 0, "test": 0},
                             **training})
    return card


def final_card(recipe: Recipe, model: torch.nn.Module, data: Dataset) -> dict:
    """The card: calibration, thresholds and figures from the folds (review.json), not from a val split."""
    path = recipe.results / "review.json"
    if not path.is_file():
        raise KmnistError(f"{path} is missing: run `python -m jobs.recipe review` first")
    report = json.loads(path.read_text(encoding="utf-8"))
    chosen = report["scores"]["chosen"]
    fitted = chosen["fitted"]
    folds = load_oof(recipe.results)
    apply_card_views(folds, recipe.results, report["views"])
    oof_metrics = classification_metrics(folds["labels"], folds["logits"].argmax(1), data.classes)
    oof_metrics.pop("confusion_matrix")
    promise = {**chosen["held_out_checks"]["pooled folds"], "target_precision": REVIEW_PRECISION,
               "negatives_n": sum(f["n"] for f in chosen["fit_negatives"].values()),
               "margin": fitted["margin"], "measured_on": "every out-of-fold row, scored by thresholds fitted "
                                                          "without its fold (kmnist_core/recipe_thresholds.py)"}
    review = {k: fitted[k] for k in ("ood_score", "ood_threshold", "review_below")} | {"review_promise": promise}
    card = out_of_fold_card(
        recipe.config(None), data, model, oof_metrics, calibration_report(folds["logits"], folds["labels"],
                                                                           fitted["temperature"]), review,
        fitted_by=f"{report['images']:,} out-of-fold predictions ({report['folds']} folds, python -m jobs.recipe "
                  f"--recipe {recipe.name})",
        fitted_on=f"out-of-fold logits of all {report['images']:,} bundled images, each from a fold model that never "
                  "saw it, and negatives cut from the folds' held-out images with held-out glyphs",
        training={"recipe": recipe.name})
    views = report["views"]
    card["views"] = ViewsSection(views["extra"], views["gate"], views["gate_temperature"],
                                 f"out of fold ({recipe.name}): the gate's temperature on the as-is logits; the "
                                 f"card's calibration on the logits with views, as predict computes them "
                                 f"(viewed: {views['viewed_share']})").to_json()
    card["metrics"] = {"out_of_fold": {**oof_metrics, "top1": report["top1"], "top1_as_is": report["top1_as_is"],
                                       "held_out_checks": chosen["held_out_checks"],
                                       "held_out_hands": {k: chosen["held_out_hands"][k] for k in ("by_script", "by_hand")},
                                       "other_kinds": chosen["other_kinds"],
                                       "note": "predicted by the fold models (same recipe, trained on the other folds, "
                                               "each never shown one group of hands); this model itself was trained "
                                               "on all images and hands"}}
    return card


def build_default(recipe: Recipe, out: Path, install: bool = False,
                  images: tuple[Dataset, Dataset] | None = None) -> dict:
    """Train (or reuse) the final model, write its model directory to `out`, and with `install` copy it
    into the package's default model. `images`: all_images() (a test passes a small pair)."""
    data, pooled = images or all_images()
    model = train_final(recipe, data)
    card = final_card(recipe, model, data)
    card = save_model_dir(out, model, card, build_twins(model, card, pooled, "cpu", recipe.config(None).eval_batch_size))
    if install:  # the card last, as save_model_dir writes
        names = [n for n in MODEL_FILES if (out / n).exists()]
        write_files(DEFAULT_MODEL_DIR, [(n, (out / n).read_bytes()) for n in names])
    return card
