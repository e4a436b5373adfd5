"""Test-time views (kmnist_core/views.py): the numpy views are torch's augmentation resampling, and a model
whose card has a `views` section decides exactly on the logits the recipe fits its thresholds on (the
unsure crops viewed, the others as they are), at fp32 and at int8 with its fp32 recheck (near a decision
or near the views gate)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from kmnist_core import calibration
from kmnist_core.model_dir import CARD_FILE, DEFAULT_MODEL_DIR, load_model
from kmnist_core.transforms import affine, to_model_tensor
from kmnist_core.int8 import near_decision, near_gate
from kmnist_core.predictor import readings_agree
from kmnist_core.views import CANDIDATE_VIEWS, EXTRA_VIEWS, as_is_confidence, averaged, view_pixels


@pytest.mark.parametrize("degrees, zoom", [*CANDIDATE_VIEWS, (12.0, 1.0), (-3.0, 0.93)])
def test_a_view_is_the_augmentations_resampling(kmnist_dev, degrees, zoom):
    pixels = kmnist_dev.test.images[:64]
    n = len(pixels)
    theirs = affine(to_model_tensor(pixels), torch.full((n,), math.radians(degrees)), torch.full((n,), zoom),
                    torch.zeros(n, 2), -1.0)
    ours = to_model_tensor(view_pixels(pixels, degrees, zoom))  # normalized after the view: the same, linearly
    assert float((ours - theirs).abs().max()) < 1e-5
    assert not np.allclose(view_pixels(pixels, degrees, zoom), pixels)  # a view moves ink


def model_copy(out, views: dict | None):
    """The default model's directory with `views` as its card's views section (None: none)."""
    shutil.copytree(DEFAULT_MODEL_DIR, out)
    card = json.loads((out / CARD_FILE).read_text(encoding="utf-8"))
    card["views"] = views
    (out / CARD_FILE).write_text(json.dumps(card), encoding="utf-8")
    return out


@pytest.fixture
def viewed_model(tmp_path):
    """The default model with views at gate 0.99 at its own temperature (the shipped card's gate, a test's own
    temperature), and the same model without views."""
    card = json.loads((DEFAULT_MODEL_DIR / CARD_FILE).read_text(encoding="utf-8"))
    views = {"extra": [list(v) for v in EXTRA_VIEWS], "gate": 0.99, "gate_temperature": card["calibration"]["temperature"],
             "fitted_on": "this test"}
    return model_copy(tmp_path / "viewed", views), model_copy(tmp_path / "plain", None)


def by_hand(runtime, pixels: np.ndarray, temperature: float, gate: float) -> tuple[np.ndarray, np.ndarray]:
    """What the views should give: the unsure rows' mean log-probability over the crop and its views."""
    out = runtime(pixels)
    unsure = calibration.softmax(out, temperature).max(1) < gate
    views = [runtime(view_pixels(pixels, d, z)) for d, z in EXTRA_VIEWS]
    expected = out.copy()
    expected[unsure] = averaged([out, *views])[unsure]
    return expected, unsure


def test_averaged_views_keep_the_softmax_of_the_mean_log_probability_and_a_reject_models_energy():
    """Plain logits: the softmax of the averaged views is that of their mean log-probability. A reject-class
    model's outputs are log-probabilities short of 1 by p(none): the average keeps that shortfall (its
    energy), where averaging renormalized log-probabilities would report p(none) = 0."""
    rng = np.random.default_rng(0)
    views = [rng.normal(0, 3, (50, 10)).astype(np.float32) for _ in range(5)]
    mean_log_prob = np.mean([v - np.logaddexp.reduce(v, axis=1, keepdims=True) for v in views], axis=0)
    np.testing.assert_allclose(calibration.softmax(averaged(views), 0.7), calibration.softmax(mean_log_prob, 0.7),
                               rtol=1e-5, atol=1e-6)
    # five views that agree on a character and each give "none of these" 30 %
    characters = rng.normal(0, 1, (50, 10)) + 5 * np.eye(10)[rng.integers(0, 10, 50)]
    outputs = []
    for _ in range(5):
        log_p = characters + rng.normal(0, 0.1, characters.shape)
        outputs.append((log_p - np.logaddexp.reduce(log_p, axis=1, keepdims=True) + np.log(0.7)).astype(np.float32))
    energy = calibration.ood_score(averaged(outputs), "energy")
    np.testing.assert_allclose(energy, -np.logaddexp.reduce(np.mean(outputs, axis=0), axis=1), rtol=1e-5)
    renormalized = np.mean([o - np.logaddexp.reduce(o, axis=1, keepdims=True) for o in outputs], axis=0)
    assert (energy > -np.log(0.7) - 0.01).all() and (calibration.ood_score(renormalized, "energy") < 0.01).all()


def test_a_card_with_views_views_only_the_unsure_crops(viewed_model, kmnist_dev):
    pixels = kmnist_dev.test.images[:600]
    viewed, plain = (load_model(d, precision="fp32") for d in viewed_model)
    assert plain.policy.views is None and viewed.policy.views.gate == 0.99
    assert viewed.policy.record()["views"] == {"extra": [list(v) for v in EXTRA_VIEWS], "gate": 0.99}
    expected, unsure = by_hand(plain.fp32_logits, pixels, viewed.policy.views.gate_temperature, 0.99)
    assert 0 < unsure.sum() < len(pixels) // 2
    assert load_model(DEFAULT_MODEL_DIR, precision="fp32").policy.views.gate == 0.99  # the shipped card views too
    got = viewed.logits(pixels)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.array_equal(got[~unsure], plain.logits(pixels)[~unsure])  # sure crops: one pass, as before


def test_int8_views_the_unsure_crops_and_rechecks_near_decisions_with_views(viewed_model, kmnist_dev):
    pixels = kmnist_dev.test.images[:600]
    viewed = load_model(viewed_model[0], precision="int8")
    assert viewed.precision == "int8"
    gate_t = viewed.policy.views.gate_temperature
    expected, _ = by_hand(viewed.int8.logits, pixels, gate_t, 0.99)
    fp32_expected, _ = by_hand(viewed.fp32_logits, pixels, gate_t, 0.99)
    got, fp32_rows = viewed.decided_logits(pixels)
    np.testing.assert_allclose(got[~fp32_rows], expected[~fp32_rows], atol=1e-5)
    np.testing.assert_allclose(got[fp32_rows], fp32_expected[fp32_rows], atol=1e-5)
    # Near the gate, int8 reads a crop with and without views, and keeps it only where both readings are
    # clear of every threshold and decide the same; every other crop there goes to fp32.
    as_is = viewed.int8.logits(pixels)
    near = near_gate(as_is_confidence(as_is, gate_t), 0.99)
    every_viewed, _ = by_hand(viewed.int8.logits, pixels, gate_t, 2.0)
    p = viewed.policy
    clear = ~(near_decision(as_is, p.temperature, p.review_below, p.ood_score, p.ood_threshold)
              | near_decision(every_viewed, p.temperature, p.review_below, p.ood_score, p.ood_threshold))
    decidable = near & clear & readings_agree(as_is, every_viewed, p)
    assert decidable.any() and (near & ~decidable).any()  # both cases are met here
    assert np.array_equal(fp32_rows[near], ~decidable[near])
