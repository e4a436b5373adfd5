"""int8 against fp32 on crops the model never saw: each fold model of a k-fold recipe quantized exactly as
`train` quantizes (kmnist_core/int8.py: its fp32 twin, calibrated on its own training images), both run on
its held-out fold. The shipped default is trained on every image, so this is where its quantization can
be judged on unseen crops; it prints the CPU it ran on, since int8 kernels are chosen by CPU features.

Recipes: the default model's (kmnist_core/recipe.py, e.g. hands-oe: 14,000 images, recipes/RECIPE/) and
the older bench/oof_folds.py ones (plain-oe, ...: 8,000 kmnist-dev images, bench/results/oof/RECIPE/).
Both sides run as a Predictor runs them (kmnist_core/predictor.py `decided_logits`), built per fold with
the recipe's out-of-fold decisions: for a kmnist_core recipe, review.json's chosen thresholds and its
test-time views (the card's `views`: the gate and gate temperature; every crop under the gate is re-read
under the views, in both the int8 pass and the fp32 recheck); for an older one, thresholds.json and no
views. fp32 is the fp32 ONNX twin on ONNX Runtime (what a CPU Predictor runs; before 2026-12-07 this
script compared with the torch model, which agrees with the twin to ~1e-5).

Two int8 figures: the twin alone (with views), and int8 as a Predictor runs it, with the rows near a
decision (kmnist_core/int8.py near_decision, at those thresholds) recomputed in fp32. Decisions
compared: top-1, needs review (confidence under review_below or out of set) and out of set. Each row
whose decision still differs from fp32's is listed, with the side of the views gate each runtime put it
on (near_decision looks at the thresholds, not at the gate). Figures: docs/benchmarks.md ("out of fold").

    nice -n 10 .venv/bin/python bench/oof_int8.py --recipe hands-oe
    nice -n 10 .venv/bin/python bench/oof_int8.py --recipe plain-oe
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kmnist_core.calibration import softmax  # noqa: E402
from kmnist_core.card import Calibration, ModelCard, ViewsSection  # noqa: E402
from kmnist_core.evaluate import review_decisions  # noqa: E402
from kmnist_core.int8 import calibration_sample, cpu_features, quantize, weight_range  # noqa: E402
from kmnist_core.onnx_export import fp32_twin_bytes  # noqa: E402
from kmnist_core.ort_model import OrtModel  # noqa: E402
from kmnist_core.policy import DecisionPolicy  # noqa: E402
from kmnist_core.precision import Precision  # noqa: E402
from kmnist_core.predictor import Predictor  # noqa: E402
from kmnist_core.views import as_is_confidence  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def recipe_names() -> list[str]:
    from bench.oof_folds import RECIPES as OLD
    from kmnist_core.recipe import RECIPES as NEW

    return sorted({*OLD, *NEW})


@dataclass
class OofFold:
    """One fold's held-out crops and the two Predictors of its model (fp32, and int8 as predict runs it)."""

    k: int
    rows: np.ndarray  # indices of the held-out images into the recipe's images
    fp32: Predictor
    int8: Predictor
    twin: bytes  # the int8 twin's ONNX bytes
    stored_logits: np.ndarray  # fold-K.npz's logits of these rows (the torch model, as is)


@dataclass
class OofRecipe:
    name: str
    images: np.ndarray  # every image of the recipe, uint8 (N, 28, 28)
    labels: np.ndarray
    calibration: Calibration  # the out-of-fold thresholds predict would decide with
    views: ViewsSection | None
    source: str  # where the images come from
    folds: Iterator[OofFold]  # built one at a time (quantizing a fold takes a few seconds)


def predictors(name: str, k: int, torch_model, train_images: np.ndarray, calib: Calibration,
               views: ViewsSection | None, classes, threads: int | None) -> tuple[Predictor, Predictor, bytes]:
    """A fold model's fp32 and int8 Predictors, made as `train` makes the twins (kmnist_core/experiment.py
    build_twins: batch norm folded, fp32 twin, quantized on a seeded draw of the training images)."""
    from kmnist_core.models import optimize_for_inference

    fp32_onnx = fp32_twin_bytes(optimize_for_inference(torch_model), 28)
    twin = quantize(fp32_onnx, calibration_sample(train_images))
    # Read from JSON as a model directory's card is (Predictor reads its classes, size and id only); the
    # decisions come from the policy below.
    card = ModelCard.from_json({"format_version": 1, "model_id": f"{name} fold {k}", "input": {"size": 28},
                                "architecture": {"name": name, "num_classes": len(classes)},
                                "classes": classes.to_records(), "calibration": {},
                                "views": None if views is None else views.to_json()})
    fp32 = OrtModel(fp32_onnx, threads)
    policy = {p: DecisionPolicy(Precision(p, p), calib, views=views) for p in ("fp32", "int8")}
    return (Predictor(fp32, card, policy["fp32"]), Predictor(fp32, card, policy["int8"], OrtModel(twin, threads)),
            twin)


def load_recipe(name: str, threads: int | None = None) -> OofRecipe:
    """A recipe's images, out-of-fold decisions and fold Predictors (module doc)."""
    from kmnist_core import recipe as new

    if name in new.RECIPES:
        from kmnist_core.datasets import load_labelled_pool
        from kmnist_core.recipe_thresholds import fold_model

        results = ROOT / "recipes" / name
        review_file = results / "review.json"
        if not review_file.is_file():
            raise SystemExit(f"{review_file} is missing: run `python -m jobs.recipe review --recipe {name}` first")
        review = json.loads(review_file.read_text(encoding="utf-8"))
        calib = Calibration.from_json(review["scores"]["chosen"]["fitted"])
        v = review.get("views")
        views = None if v is None else ViewsSection.from_json(
            {**v, "fitted_on": f"{name} out-of-fold rows (recipes/{name}/review.json)"})
        record = json.loads((results / "recipe.json").read_text(encoding="utf-8"))
        r = new.Recipe(name, int(record["folds"]), results, results / "checkpoints")
        pool = load_labelled_pool()
        fold = new.stratified_folds(pool.labels, pool.source, r.folds)

        def folds() -> Iterator[OofFold]:
            for k in range(r.folds):
                stored = np.load(results / f"fold-{k}.npz")
                rows = np.flatnonzero(fold == k)
                if not np.array_equal(rows, stored["index"]):
                    raise SystemExit(f"fold {k}: the folds drawn here are not the ones recipes/{name} trained on")
                train = new.fold_dataset(pool, fold, k).train.images
                fp32, int8, twin = predictors(name, k, fold_model(r, k, len(pool.classes)), train, calib, views,
                                              pool.classes, threads)
                yield OofFold(k, rows, fp32, int8, twin, stored["logits"])

        return OofRecipe(name, pool.images, pool.labels, calib, views, " + ".join(np.unique(pool.source)), folds())

    from bench.oof_folds import RESULTS, all_images, stratified_folds, trained_model

    thresholds = json.loads((RESULTS / name / "thresholds.json").read_text(encoding="utf-8"))["fitted"]
    calib = Calibration.from_json(thresholds)
    full, base = all_images()
    fold = stratified_folds(full.labels, 5)

    def old_folds() -> Iterator[OofFold]:
        for k in range(5):
            stored = np.load(RESULTS / name / f"fold-{k}.npz")
            rows = np.flatnonzero(fold == k)
            fp32, int8, twin = predictors(name, k, trained_model(name, RESULTS / name / f"fold-{k}.pt", base),
                                          full.images[fold != k], calib, None, base.classes, threads)
            yield OofFold(k, rows, fp32, int8, twin, stored["logits"])

    return OofRecipe(name, full.images, full.labels, calib, None, "kmnist-dev", old_folds())


def decisions(logits: np.ndarray, calib: Calibration) -> dict[str, np.ndarray]:
    """What predict decides per row from its logits, under the calibration (evaluate.review_decisions)."""
    _, unknown, accepted = review_decisions(logits, calib.temperature, calib.review_params())
    return {"top-1": logits.argmax(1), "needs review": ~accepted, "out of set": unknown}


def report(name: str, fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray, calib: Calibration) -> str:
    f, i = decisions(fp32, calib), decisions(int8, calib)
    agree = ", ".join(f"{k} {np.mean(f[k] == i[k]):.4%} ({int(np.sum(f[k] != i[k]))} differ)" for k in f)
    return (f"{name}: agreement with fp32: {agree}; accuracy fp32 {np.mean(f['top-1'] == labels):.4%} "
            f"int8 {np.mean(i['top-1'] == labels):.4%}; needs review fp32 {f['needs review'].mean():.2%} "
            f"int8 {i['needs review'].mean():.2%}; out of set fp32 {f['out of set'].mean():.2%} "
            f"int8 {i['out of set'].mean():.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="hands-oe", choices=recipe_names())
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its default)")
    args = parser.parse_args()
    r = load_recipe(args.recipe, args.threads)
    c = r.calibration
    print(f"CPU: {cpu_features()}")
    print(f"recipe {r.name}: {len(r.labels):,} images ({r.source}); temperature {c.temperature:.4f}, {c.ood_score} > "
          f"{c.ood_threshold} out of set, review below {c.review_below:.4f}; views: "
          + (f"gate {r.views.gate} at T {r.views.gate_temperature:.4f}, extra {r.views.extra}" if r.views else "none"))
    def viewed_rows(as_is: np.ndarray) -> np.ndarray:
        """The rows the card's views re-read, from one runtime's as-is logits (views.with_views)."""
        return as_is_confidence(as_is, r.views.gate_temperature) < r.views.gate if r.views else np.zeros(len(as_is), bool)

    keys = ("fp32", "twin", "decided", "near", "labels", "viewed", "viewed_int8", "rows")
    stores: dict[str, list] = {key: [] for key in keys}
    for f in r.folds:
        held, labels = r.images[f.rows], r.labels[f.rows]
        as_is = f.fp32.fp32_logits(held)
        fp32 = f.fp32.decided_logits(held)[0]  # the fp32 Predictor: views on its unsure crops
        twin = f.int8.viewed(f.int8.int8.logits, held)  # the twin alone, with views
        decided, near = f.int8.decided_logits(held)  # int8 as predict runs it: near-decision rows in fp32
        viewed, viewed_int8 = viewed_rows(as_is), viewed_rows(f.int8.int8.logits(held))
        for key, value in zip(keys, (fp32, twin, decided, near, labels, viewed, viewed_int8, f.rows)):
            stores[key].append(value)
        print(f"fold {f.k} ({len(held):,} crops): " + report("twin alone", fp32, twin, labels, c)
              + f"; weights {weight_range(f.twin)}; fp32 twin vs the stored torch logits (as is): max |diff| "
              f"{np.abs(as_is - f.stored_logits).max():.2e}; {viewed.mean():.2%} of rows viewed in fp32", flush=True)
    fp32, twin, decided, near, y, viewed, viewed_int8, rows = (np.concatenate(stores[key]) for key in keys)
    print(f"all {len(y):,} out-of-fold crops ({viewed.mean():.2%} viewed in fp32; {int((viewed != viewed_int8).sum())} "
          f"rows on the other side of the views gate in int8):")
    print("  " + report("twin alone", fp32, twin, y, c))
    print("  " + report("int8 as predict runs it", fp32, decided, y, c)
          + f"; {near.mean():.2%} of rows near a decision, computed in fp32")
    moved = decisions(fp32, c)["top-1"] != decisions(twin, c)["top-1"]
    if moved.any():
        p = np.sort(softmax(twin[moved], c.temperature), 1)
        print(f"  twin alone, rows whose top-1 moved: calibrated top-1 - top-2 gap at most "
              f"{(p[:, -1] - p[:, -2]).max():.3f}")
    f, d = decisions(fp32, c), decisions(decided, c)
    for key in f:
        for i in np.flatnonzero(f[key] != d[key]):
            conf = [float(softmax(x[i : i + 1], c.temperature).max()) for x in (fp32, decided)]
            print(f"  int8 as predict runs it, {key} differs on image {rows[i]}: confidence fp32 {conf[0]:.4f} "
                  f"int8 {conf[1]:.4f} (review below {c.review_below:.4f}); viewed: fp32 {bool(viewed[i])}, "
                  f"int8 {bool(viewed_int8[i])}; "
                  f"near a decision {bool(near[i])}; top-1 {'right' if d['top-1'][i] == y[i] else 'wrong'}")


if __name__ == "__main__":
    main()
