"""The default model's k-fold recipe (kmnist_core/recipe.py) and its review thresholds
(kmnist_core/recipe_thresholds.py), run for real on a small pool: folds stratified by source and class, hands held
out per fold, a killed fold resuming from its checkpoint, and the held-out checks and hand figures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kmnist_core import recipe, recipe_thresholds
from kmnist_core.datasets import LabelledPool, load_labelled_pool
from kmnist_core.models import predict_logits
from kmnist_core.negatives import IPAEX_GOTHIC, is_kana
from kmnist_core.views import with_views

pytestmark = pytest.mark.training


def test_the_pool_is_both_bundled_splits_and_the_folds_spread_each_source_and_class():
    pool = load_labelled_pool()
    assert len(pool) == 14_000 and {s: int((pool.source == s).sum()) for s in np.unique(pool.source)} == {
        "kmnist-dev": 8000, "kmnist-train6k": 6000}
    fold = recipe.stratified_folds(pool.labels, pool.source, 5)
    assert np.array_equal(fold, recipe.stratified_folds(pool.labels, pool.source, 5))  # seeded
    for s in np.unique(pool.source):
        for c in range(10):
            counts = np.bincount(fold[(pool.source == s) & (pool.labels == c)], minlength=5)
            assert counts.max() - counts.min() <= 1


def test_every_hand_is_held_out_by_exactly_one_fold():
    held = [h for k in range(5) for h in recipe.held_hands(k)]
    assert sorted(held) == sorted(recipe.HANDS) and recipe.held_hands(None) == ()


def test_small_kana_are_never_negatives():
    from kmnist_core.negatives import candidate_glyphs

    glyphs = set(candidate_glyphs())
    assert not glyphs & set("ぉっゃォッャおつや") and "ぬ" in glyphs and is_kana("ぬ") and not is_kana("山")


class Killed(Exception):
    pass


@pytest.fixture
def tiny(tmp_path, monkeypatch, kmnist_dev):
    """A two-fold recipe of one epoch on 200 images, every hand the pip-shipped IPAex Gothic."""
    monkeypatch.setitem(recipe.RECIPES, "tiny", dict(model="simple-cnn", epochs=2, lr=1e-3, batch_size=32,
                                                      negatives="synth", negative_mix={"kana": 0.5, "merged": 0.5}))
    monkeypatch.setattr(recipe, "HANDS", {"a": (str(IPAEX_GOTHIC),), "b": (str(IPAEX_GOTHIC),)})
    monkeypatch.setattr(recipe, "HAND_GROUPS", (("a",), ("b",)))
    for name, n in (("FIT_NEGATIVES", 60), ("HAND_NEGATIVES", 20), ("KIND_NEGATIVES", 10)):
        monkeypatch.setattr(recipe_thresholds, name, n)
    d = kmnist_dev.test
    pool = LabelledPool(d.images[:200], d.labels[:200], np.array(["one", "two"] * 100), kmnist_dev.classes)
    return recipe.Recipe("tiny", 2, tmp_path / "results", tmp_path / "work", threads=2), pool


@pytest.mark.timeout(300)
def test_a_killed_fold_resumes_and_the_review_and_the_final_model_come_from_the_folds(tiny, monkeypatch, kmnist_dev):
    r, pool = tiny
    real = recipe.train_model

    def killed_after_first_epoch(cfg, data, device, on_epoch, resume_state=None, teacher_models=()):
        def stop(metrics, run):
            on_epoch(metrics, run)
            if resume_state is None:
                raise Killed  # after epoch 1's checkpoint
        return real(cfg, data, device, stop, resume_state=resume_state, teacher_models=teacher_models)

    monkeypatch.setattr(recipe, "train_model", killed_after_first_epoch)
    monkeypatch.setattr(recipe, "CHECKPOINT_EVERY", 1)
    with pytest.raises(Killed):
        recipe.run_fold(r, 0, pool)
    assert (r.work / "fold-0.ckpt.pt").exists() and not (r.results / "fold-0.npz").exists()
    recipe.run_fold(r, 0, pool)  # resumes at epoch 2
    assert not (r.work / "fold-0.ckpt.pt").exists()  # the fold's results replace its checkpoint
    monkeypatch.setattr(recipe, "train_model", real)
    recipe.run_fold(r, 1, pool)
    fold0 = np.load(r.results / "fold-0.npz")
    assert int(fold0["epochs"]) == 2 and len(fold0["labels"]) == 100 and set(fold0["source"]) == {"one", "two"}
    record = json.loads((r.results / "recipe.json").read_text(encoding="utf-8"))
    assert record["held_out_hands"] == {"0": ["a"], "1": ["b"]} and record["images"] == 200

    for k in (0, 1):
        recipe_thresholds.score_fold_negatives(r, k, pool)
        recipe_thresholds.score_fold_views(r, k, pool)
    report = recipe_thresholds.review_report(r)
    chosen = report["scores"]["chosen"]
    # The figures are on the logits predict computes with the card's views: with_views and the fold's model.
    views = report["views"]
    assert views["gate"] == recipe_thresholds.VIEW_GATE and set(views["viewed_share"]) == {"rows", "fit", "hands", "kinds"}
    d = recipe_thresholds.load_oof(r.results)
    assert recipe_thresholds.apply_views(d, r.results, views["gate"]) == views
    model, held = recipe_thresholds.fold_model(r, 0, 10), d["fold"] == 0
    ours, confidence = with_views(lambda x: predict_logits(model, x, "cpu"), pool.images[d["index"][held]],
                                  views["gate_temperature"], views["gate"])
    assert (confidence < views["gate"]).any()
    np.testing.assert_allclose(ours, d["logits"][held], atol=1e-4)
    assert report["top1"] != report["top1_as_is"]  # the views changed some rows
    assert set(chosen["held_out_checks"]) == {"fold 0", "fold 1", "pooled folds", "one (fitted on the other split)",
                                              "two (fitted on the other split)"}
    assert chosen["held_out_checks"]["pooled folds"]["n"] == 200
    assert set(chosen["held_out_hands"]["by_script"]) == {"kana", "kanji"}
    assert set(chosen["held_out_hands"]["by_hand"]) == {"a", "b"}
    assert set(chosen["other_kinds"]) == set(recipe_thresholds.NON_GLYPH)
    assert set(report["scores"]) == {"chosen", "energy", "max-softmax", "max-logit"}

    # The final model: every image, thresholds from the folds, not from a val split.
    from kmnist_core.datasets import Dataset, Split
    from kmnist_core.files import write_json_atomic
    from kmnist_core.model_dir import load_model
    from kmnist_core.recipe_model import build_default

    write_json_atomic(r.results / "review.json", report)
    small = Dataset("kmnist-pooled", pool.classes, 28, Split(pool.images, pool.labels), kmnist_dev.val, kmnist_dev.test,
                    "all 200", "accuracy")
    card = build_default(r, r.work / "model", images=(small, kmnist_dev))
    fitted = chosen["fitted"]
    assert card["calibration"]["temperature"] == pytest.approx(fitted["temperature"])
    assert card["calibration"]["review_below"] == fitted["review_below"] and card["calibration"]["int8_refit"] is False
    assert card["training"]["sizes"]["train"] == 200 and (r.results / "all.pt").exists()
    loaded = load_model(str(r.work / "model"), precision="fp32")
    assert loaded.card.model_id == card["model_id"] and loaded.policy.views.gate == views["gate"]
    assert loaded.policy.views.gate_temperature == pytest.approx(views["gate_temperature"])
