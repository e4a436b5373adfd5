"""The review thresholds of a k-fold recipe (kmnist_core/recipe.py), fitted on its out-of-fold predictions
and checked on rows that took no part in fitting them, with the leave-one-hand-out figures of other
characters.

For each fold the fold model scores, besides its held-out images (fold-K.npz), three sets of negatives
it never trained on (`fold-K-negatives.npz`, written by `score_fold_negatives`), and all of them again
under the test-time views (`fold-K-views.npz`, `score_fold_views`; `apply_views` makes the logits predict
computes with the card's views, and every figure below is on those):
- `fit`: held-out glyphs rendered in the fold's training hands, and merged, broken, overlaid, turned
  KMNIST characters and strokes cut from its held-out images: what the out-of-set score is chosen on;
- `hands`: other kana and kanji in the hands the fold never saw (recipe.HAND_GROUPS): the figure the card,
  README and bench report for characters the model was never shown;
- `kinds`: each non-glyph kind again from the held-out images with another seed, for "every other kind".

`fit` fits what a card carries (temperature, out-of-set score and threshold, review_below) on every
out-of-fold row. `held_out_checks` refits the same way without a part of the rows (each fold, each source
split) and applies the result to that part: the promise (auto-accepted precision >= 99.5 % as a 95 %
Clopper-Pearson lower bound) must hold there. When it does not, the target is raised by a margin, the
smallest of MARGINS for which the pooled held-out rows keep the promise (`choose_margin`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kmnist_core import calibration
from kmnist_core.datasets import LabelledPool, load_labelled_pool
from kmnist_core.evaluate import review_decisions
from kmnist_core.experiment import IN_SET_KEEP, REVIEW_LEVEL, REVIEW_PRECISION
from kmnist_core.negatives import candidate_glyphs, glyph_pool, is_kana, make_negatives
from kmnist_core.recipe import Recipe, fold_dataset, hand_fonts, held_hands, stratified_folds
from kmnist_core.views import CANDIDATE_VIEWS, EXTRA_VIEWS, as_is_confidence, averaged, view_pixels

MARGINS = (0.0, 0.0005, 0.001, 0.0015, 0.002, 0.003)  # added to REVIEW_PRECISION when fitting
NON_GLYPH = ("merged", "fragment", "overlay", "turned", "strokes")
FIT_NEGATIVES = 3000
HAND_NEGATIVES = 400  # per hand and script (kana, kanji)
KIND_NEGATIVES = 300  # per non-glyph kind
# The card's test-time views go to crops whose as-is confidence is under this. Chosen out of fold on
# hands-oe among every row, 0.99 and 0.9: 0.99 views 8 % of the rows for the same top-1 as every row
# (99.12 %) and auto-accepts 96.4 % (0.9: 4 % of rows, 99.09 %, 96.0 %), with the four candidate views.
VIEW_GATE = 0.99


def fold_negative_sets(recipe: Recipe, k: int, pool: LabelledPool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The fold's three negative sets (module doc): name -> (images, label of each: kind or hand/script)."""
    fold = stratified_folds(pool.labels, pool.source, recipe.folds)
    held = fold_dataset(pool, fold, k).test
    cfg = recipe.config(k)
    mix = cfg.negative_mix
    fit_images, fit_kinds = make_negatives(held.images, held.labels, FIT_NEGATIVES, 10_000 + k, glyph_pool("held_out"),
                                           [Path(f) for f in cfg.negative_fonts], 28, mix)
    hand_images, hand_labels = [], []
    glyphs = candidate_glyphs()
    for i, hand in enumerate(held_hands(k)):
        fonts = [Path(f) for f in hand_fonts([hand])]
        for j, script in enumerate(("kana", "glyph")):
            chosen = [c for c in glyphs if is_kana(c)] if script == "kana" else [c for c in glyphs if not is_kana(c)]
            images, _ = make_negatives(held.images, held.labels, HAND_NEGATIVES, 20_000 + 100 * k + 10 * i + j, chosen,
                                       fonts, 28, {script: 1.0})
            hand_images.append(images)
            hand_labels += [f"{hand}/{'kana' if script == 'kana' else 'kanji'}"] * len(images)
    kind_images, kind_labels = make_negatives(held.images, held.labels, KIND_NEGATIVES * len(NON_GLYPH), 30_000 + k, [],
                                              [], 28, {kind: 1.0 for kind in NON_GLYPH})
    return {"fit": (fit_images, fit_kinds), "hands": (np.concatenate(hand_images), np.array(hand_labels)),
            "kinds": (kind_images, kind_labels)}


def fold_model(recipe: Recipe, k: int, classes: int):
    """Fold k's trained torch model (fold-K.pt), in eval mode."""
    import torch

    from kmnist_core.models import create_model
    from kmnist_core.recipe import RECIPES

    model = create_model(RECIPES[recipe.name]["model"], classes, 28)
    model.load_state_dict(torch.load(recipe.results / f"fold-{k}.pt", map_location="cpu", weights_only=True))
    return model.eval()


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def fold_scoring(recipe: Recipe, k: int, pool: LabelledPool | None) -> tuple[LabelledPool, object, dict]:
    """The pool, fold k's model and its negative sets (fold_negative_sets): what its scoring reads."""
    pool = pool or load_labelled_pool()
    return pool, fold_model(recipe, k, len(pool.classes)), fold_negative_sets(recipe, k, pool)


def score_fold_negatives(recipe: Recipe, k: int, pool: LabelledPool | None = None) -> Path:
    """Score the fold's negative sets with its model into fold-K-negatives.npz (kept once written)."""
    from kmnist_core.models import predict_logits

    done = recipe.results / f"fold-{k}-negatives.npz"
    if done.exists():
        return done
    pool, model, negatives = fold_scoring(recipe, k, pool)
    arrays = {}
    for name, (images, labels) in negatives.items():
        arrays[f"{name}_logits"] = predict_logits(model, images, "cpu")
        arrays[f"{name}_labels"] = labels.astype(str)
    return save_npz(done, arrays)


def score_fold_views(recipe: Recipe, k: int, pool: LabelledPool | None = None) -> Path:
    """The fold model's logits of every CANDIDATE_VIEWS view of its held-out images and negative sets,
    (views, rows, classes) each, into fold-K-views.npz (kept once written; a minute or two a fold)."""
    from kmnist_core.models import predict_logits

    done = recipe.results / f"fold-{k}-views.npz"
    if done.exists():
        return done
    pool, model, negatives = fold_scoring(recipe, k, pool)
    held = fold_dataset(pool, stratified_folds(pool.labels, pool.source, recipe.folds), k).test
    sets = {"logits": held.images, **{f"{name}_logits": images for name, (images, _) in negatives.items()}}
    return save_npz(done, {key: np.stack([predict_logits(model, view_pixels(images, d, z), "cpu")
                                          for d, z in CANDIDATE_VIEWS]) for key, images in sets.items()})


def load_oof(results: Path) -> dict[str, np.ndarray]:
    """Every fold's rows and negatives stacked; `fold` / `*_fold` say which fold scored each."""
    files = sorted(results.glob("fold-[0-9]*.npz"), key=lambda p: int(p.stem.split("-")[1]))
    files = [f for f in files if f.stem.count("-") == 1]  # not fold-K-negatives / fold-K-views
    parts = [(int(f.stem.split("-")[1]), dict(np.load(f)), dict(np.load(results / f"{f.stem}-negatives.npz")))
             for f in files]
    joined = {key: np.concatenate([p[key] for _, p, _ in parts]) for key in ("index", "labels", "source", "logits")}
    joined["fold"] = np.concatenate([np.full(len(p["labels"]), k) for k, p, _ in parts])
    joined["wall_s"] = np.array([float(p["wall_s"]) for _, p, _ in parts])
    for name in ("fit", "hands", "kinds"):
        for what in ("logits", "labels"):
            joined[f"{name}_{what}"] = np.concatenate([n[f"{name}_{what}"] for _, _, n in parts])
        joined[f"{name}_fold"] = np.concatenate([np.full(len(n[f"{name}_labels"]), k) for k, _, n in parts])
    return joined


def stored_views(results: Path, folds: list[int], extra_views: tuple[tuple[float, float], ...]) -> dict[str, np.ndarray]:
    """The logits of `extra_views` (of the CANDIDATE_VIEWS score_fold_views stored) for every row and
    negative set of `folds`, in load_oof's order: key -> (views, rows, classes)."""
    stored = [dict(np.load(results / f"fold-{k}-views.npz")) for k in folds]
    chosen = [CANDIDATE_VIEWS.index(tuple(v)) for v in extra_views]
    return {key: np.concatenate([v[key] for v in stored], axis=1)[chosen]
            for key in ("logits", "fit_logits", "hands_logits", "kinds_logits")}


def apply_views(d: dict[str, np.ndarray], results: Path, gate: float,
                extra_views: tuple[tuple[float, float], ...] = EXTRA_VIEWS) -> dict:
    """`d` (load_oof) with the logits predict computes under the card's views: every row and negative whose
    as-is confidence, at the temperature fitted on the as-is out-of-fold rows, is under `gate` gets the
    mean log-probability of itself and its `extra_views` (of the CANDIDATE_VIEWS score_fold_views stored;
    kmnist_core/views.py `with_views`). Returns what the card's views section and the report say of it."""
    temperature = calibration.fit_temperature(d["logits"], d["labels"])
    views = stored_views(results, [int(k) for k in np.unique(d["fold"])], extra_views)
    viewed = {}
    for key, extra in views.items():
        unsure = as_is_confidence(d[key], temperature) < gate
        d[key] = d[key].copy()
        d[key][unsure] = averaged([d[key][unsure], *extra[:, unsure]])
        viewed[key.removesuffix("logits").rstrip("_") or "rows"] = float(unsure.mean())
    return {"extra": [list(v) for v in extra_views], "gate": gate, "gate_temperature": temperature,
            "viewed_share": viewed}


def apply_card_views(d: dict[str, np.ndarray], results: Path, views: dict) -> dict:
    """apply_views with the views a review chose (review.json's `views`: its gate and extra views), so
    what is computed from the folds matches the card built from that review."""
    return apply_views(d, results, views["gate"], tuple(tuple(v) for v in views["extra"]))


def fit(logits: np.ndarray, labels: np.ndarray, neg_logits: np.ndarray, margin: float = 0.0,
        score: str | None = None) -> dict:
    """Temperature, out-of-set score and threshold, review_below, fitted at REVIEW_PRECISION + margin.
    `score`: an out-of-set score to use rather than the one that best separates `neg_logits`."""
    temperature = calibration.fit_temperature(logits, labels)
    target = REVIEW_PRECISION + margin
    if score is None:
        review = calibration.fit_review(logits, labels, neg_logits, temperature, target, IN_SET_KEEP, REVIEW_LEVEL)
    else:
        review = {"ood_score": score, **calibration.fit_thresholds(logits, labels, temperature, score, target,
                                                                   IN_SET_KEEP, REVIEW_LEVEL)}
    return {"temperature": temperature, "margin": margin, **review}


def accepted(fitted: dict, logits: np.ndarray) -> np.ndarray:
    """Rows predict would auto-accept under `fitted` (the one accept rule: evaluate.review_decisions)."""
    return review_decisions(logits, fitted["temperature"], fitted)[2]


def apply(fitted: dict, logits: np.ndarray, labels: np.ndarray) -> dict:
    """What predict would do with these in-set rows under `fitted`: accepted share, precision, its bound."""
    taken = accepted(fitted, logits)
    n_acc, errors = int(taken.sum()), int((taken & (logits.argmax(1) != labels)).sum())
    return {"n": int(len(labels)), "accuracy": float((logits.argmax(1) == labels).mean()),
            "auto_accepted": n_acc, "auto_accepted_share": n_acc / len(labels) if len(labels) else None,
            "auto_accepted_errors": errors, "precision": 1 - errors / n_acc if n_acc else None,
            "precision_lower_bound": calibration.precision_lower_bound(errors, n_acc, REVIEW_LEVEL)}


def held_out_checks(d: dict, margin: float, score: str | None = None) -> dict:
    """Each fold and each source split scored with thresholds fitted on the other rows (and the other folds'
    `fit` negatives); `pooled folds`: the five fold checks' rows together (every row scored once, by
    thresholds that never saw it)."""
    checks, taken, wrong = {}, np.zeros(len(d["labels"]), bool), np.zeros(len(d["labels"]), bool)
    for k in np.unique(d["fold"]):
        rows, negs = d["fold"] == k, d["fit_fold"] == k
        other = fit(d["logits"][~rows], d["labels"][~rows], d["fit_logits"][~negs], margin, score)
        checks[f"fold {k}"] = apply(other, d["logits"][rows], d["labels"][rows])
        taken[rows] = accepted(other, d["logits"][rows])
    wrong = taken & (d["logits"].argmax(1) != d["labels"])
    n_acc, errors = int(taken.sum()), int(wrong.sum())
    checks["pooled folds"] = {"n": int(len(taken)), "auto_accepted": n_acc, "auto_accepted_share": n_acc / len(taken),
                              "auto_accepted_errors": errors, "precision": 1 - errors / n_acc if n_acc else None,
                              "precision_lower_bound": calibration.precision_lower_bound(errors, n_acc, REVIEW_LEVEL)}
    for source in np.unique(d["source"]):
        rows = d["source"] == source
        other = fit(d["logits"][~rows], d["labels"][~rows], d["fit_logits"], margin, score)
        checks[f"{source} (fitted on the other split)"] = apply(other, d["logits"][rows], d["labels"][rows])
    return checks


def choose_margin(d: dict, score: str | None = None) -> tuple[float, dict]:
    """The smallest margin whose pooled fold checks and both source checks keep the promise (the largest
    tried when none does), and those checks."""
    for margin in MARGINS:
        checks = held_out_checks(d, margin, score)
        kept = [c for name, c in checks.items() if not name.startswith("fold ")]
        if all(c["precision_lower_bound"] >= REVIEW_PRECISION for c in kept):
            return margin, checks
    return margin, checks


def negative_figures(d: dict, fitted: dict, name: str) -> dict[str, dict]:
    """Auto-accepted share of negative set `name` per label (hand/script or kind), each label's rows scored
    by their own fold's model under `fitted` (fitted on out-of-fold rows: `hands` were never seen)."""
    logits, labels = d[f"{name}_logits"], d[f"{name}_labels"]
    taken = accepted(fitted, logits)
    out = {}
    for label in sorted(np.unique(labels)):
        rows = labels == label
        hits = int(taken[rows].sum())
        out[str(label)] = {"n": int(rows.sum()), "auto_accepted": hits, "share": hits / int(rows.sum()),
                           "upper_bound": calibration.rate_upper_bound(hits, int(rows.sum()), REVIEW_LEVEL)}
    return out


def pooled_by(figures: dict[str, dict], key) -> dict[str, dict]:
    """`figures` summed over labels that `key(label)` maps to one group."""
    groups: dict[str, list[int]] = {}
    for label, f in figures.items():
        g = groups.setdefault(key(label), [0, 0])
        g[0] += f["auto_accepted"]
        g[1] += f["n"]
    return {g: {"n": n, "auto_accepted": hits, "share": hits / n,
                "upper_bound": calibration.rate_upper_bound(hits, n, REVIEW_LEVEL)} for g, (hits, n) in sorted(groups.items())}


def top1(d: dict[str, np.ndarray]) -> dict[str, float]:
    """Top-1 of the out-of-fold rows, pooled and per source split."""
    right = d["logits"].argmax(1) == d["labels"]
    return {"pooled": float(right.mean()), **{str(s): float(right[d["source"] == s].mean()) for s in np.unique(d["source"])}}


def review_report(recipe: Recipe) -> dict:
    """Every figure the card and docs take from the folds (module doc)."""
    d = load_oof(recipe.results)
    as_is = top1(d)
    views = apply_views(d, recipe.results, VIEW_GATE)
    report = {"recipe": recipe.name, "folds": int(len(d["wall_s"])), "images": int(len(d["labels"])),
              "fold_wall_min": [round(float(s) / 60, 1) for s in d["wall_s"]],
              "top1": top1(d), "top1_as_is": as_is, "views": views, "scores": {}}
    for score in (None, *calibration.OOD_SCORES):
        margin, checks = choose_margin(d, score)
        fitted = fit(d["logits"], d["labels"], d["fit_logits"], margin, score)
        hands = negative_figures(d, fitted, "hands")
        report["scores"][score or "chosen"] = {
            "fitted": {k: fitted[k] for k in ("temperature", "margin", "ood_score", "ood_threshold", "review_below")},
            "out_of_fold": apply(fitted, d["logits"], d["labels"]), "held_out_checks": checks,
            "held_out_hands": {"by_script": pooled_by(hands, lambda label: label.split("/")[1]),
                               "by_hand": pooled_by(hands, lambda label: label.split("/")[0]), "each": hands},
            "other_kinds": negative_figures(d, fitted, "kinds"),
            "fit_negatives": negative_figures(d, fitted, "fit")}
    return report

