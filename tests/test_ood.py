"""Review reasons, exact binomial bounds, synthetic negatives, outlier exposure and `evaluate --unknown`."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from kmnist_core import calibration
from kmnist_core.negatives import IPAEX_GOTHIC, LOOKALIKES, candidate_glyphs, glyph_pool, make_negatives
from kmnist_core.review_reasons import REVIEW_REASONS, review_reasons


def test_review_reasons_follow_the_precedence():
    error = np.array([1, 1, 0, 0, 0, 0, 0], bool)
    blank = np.array([1, 0, 1, 0, 0, 0, 0], bool)
    unknown = np.array([1, 0, 1, 1, 1, 0, 0], bool)
    conf = np.array([np.nan, np.nan, np.nan, 0.2, 0.99, 0.5, 0.95])
    got = review_reasons(error, blank, unknown, conf, review_below=0.9)
    assert list(got) == ["error", "error", "blank", "unknown_character", "unknown_character", "low_confidence", None]
    assert REVIEW_REASONS == ("error", "blank", "unknown_character", "low_confidence")
    # A missing confidence is never auto-accepted, and the threshold itself is accepted.
    assert list(review_reasons(np.zeros(2, bool), np.zeros(2, bool), np.zeros(2, bool),
                               np.array([np.nan, 0.9]), 0.9)) == ["low_confidence", None]


@pytest.mark.parametrize("errors, n, bound", [
    (0, 1000, 0.05 ** (1 / 1000)),          # closed form when nothing is wrong
    (1, 1000, 1 - 0.004734993575499777),    # 1 - scipy.stats.beta.ppf(0.95, 2, 999)
    (10, 100, 1 - 0.16371762327581477),     # 1 - beta.ppf(0.95, 11, 90)
    (5, 20, 1 - 0.4555824040017489),        # 1 - beta.ppf(0.95, 6, 15)
])
def test_clopper_pearson_lower_bound_matches_known_values(errors, n, bound):
    assert calibration.precision_lower_bound(errors, n) == pytest.approx(bound, abs=1e-9)


def test_binomial_cdf_is_exact():
    assert calibration.binomial_cdf(2, 5, 0.3) == pytest.approx(sum(math.comb(5, i) * 0.3**i * 0.7 ** (5 - i) for i in range(3)))


def test_threshold_with_bound_takes_the_largest_set_whose_bound_holds():
    conf = np.linspace(1, 0.001, 1000)
    correct = np.ones(1000, bool)
    correct[[500, 990]] = False
    got = calibration.threshold_with_bound(conf, correct, 0.995)
    # All 1000 (2 errors) bound to 0.9937 < 0.995; up to just before the second error, 990 with 1 error,
    # to 0.99522.
    assert got["accepted"] == 990 and got["errors"] == 1 and got["threshold"] == pytest.approx(conf[989])
    assert got["precision_lower_bound"] >= 0.995
    # Ties are never split: a threshold accepts all crops of a confidence or none.
    tied = calibration.threshold_with_bound(np.array([0.9, 0.8, 0.8, 0.8]), np.array([1, 1, 0, 1], bool), 0.1)
    assert tied["accepted"] in (1, 4)
    nothing = calibration.threshold_with_bound(np.array([0.9, 0.8]), np.array([0, 0], bool), 0.995)
    assert nothing["accepted"] == 0 and nothing["threshold"] > 1.0


def test_auroc():
    assert calibration.auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert calibration.auroc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5


def test_glyph_lists_leave_out_the_ten_classes_and_their_look_alikes():
    glyphs = candidate_glyphs()
    assert len(glyphs) > 3000 and not set(glyphs) & LOOKALIKES
    assert set("おきすつなはまやれを") <= LOOKALIKES and "キ" in LOOKALIKES and "波" in LOOKALIKES
    train, held = set(glyph_pool("train")), set(glyph_pool("held_out"))
    assert not train & held and train | held == set(glyphs) and 0.1 < len(held) / len(glyphs) < 0.3


def test_negatives_are_deterministic_model_inputs(small_dev):
    args = (small_dev.train.images, small_dev.train.labels, 60, 5, glyph_pool("train")[:50], [IPAEX_GOTHIC])
    a, kinds = make_negatives(*args)
    b, _ = make_negatives(*args)
    assert a.shape == (60, 28, 28) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert {"glyph", "merged", "fragment"} <= set(kinds)
    assert (a.reshape(60, -1).max(1) > 100).all()  # every negative has ink


@pytest.fixture(scope="module")
def oe_model_dir(tmp_path_factory, small_dev, trained_model_dir):
    """One epoch of outlier exposure, fine-tuning the session's trained model."""
    from kmnist_core.experiment import run_train
    from kmnist_core.train import TrainConfig

    out = tmp_path_factory.mktemp("oe")
    cfg = TrainConfig(epochs=1, batch_size=64, threads=2, negatives="synth", outlier_weight=0.5,
                      init=str(trained_model_dir))
    run_train(cfg, out, data=small_dev, make_plots=False)
    return out


def test_outlier_exposure_run_writes_thresholds_and_the_promise(oe_model_dir, small_dev):
    from kmnist_core.experiment import IN_SET_KEEP
    from kmnist_core.model_dir import load_model

    card = json.loads((oe_model_dir / "model_card.json").read_text())
    cal = card["calibration"]
    assert cal["ood_score"] in calibration.OOD_SCORES and math.isfinite(cal["ood_threshold"])
    assert cal["ood_score_val_auroc"][cal["ood_score"]] == max(cal["ood_score_val_auroc"].values())
    assert card["training"]["config"]["negatives"] == "synth"
    # The thresholds and the promise are the ones the validation characters give (fitted again here from
    # the saved weights' logits), and the promise keeps its word on them.
    fp32 = load_model(oe_model_dir, precision="fp32")
    val = small_dev.val
    logits = fp32.logits(val.images)
    refit = calibration.fit_thresholds(logits, val.labels, cal["temperature"], cal["ood_score"], 0.995, IN_SET_KEEP)
    assert cal["ood_threshold"] == pytest.approx(refit["ood_threshold"], rel=1e-4)
    assert cal["review_below"] == pytest.approx(refit["review_below"], rel=1e-4)
    promise = cal["review_promise"]
    assert promise["target_precision"] == 0.995 and promise["confidence_level"] == 0.95 and promise["n"] == len(val)
    for key in ("accepted", "errors"):
        assert promise[key] == refit["review_promise"][key], key
    a = fp32.assess(val.images)
    accepted = ~a.unknown & (a.probabilities.max(1) >= fp32.review_below)
    assert int(accepted.sum()) == promise["accepted"]
    assert int((accepted & (a.probabilities.argmax(1) != val.labels)).sum()) == promise["errors"]
    bound = calibration.precision_lower_bound(promise["errors"], promise["accepted"])
    assert promise["precision_lower_bound"] == pytest.approx(bound)
    # 200 validation images cannot bound a precision at 99.5 % (0 errors in 200 bound it to 98.5 %):
    # nothing is accepted, and the threshold sits above every confidence.
    assert promise["accepted"] == 0 and cal["review_below"] > 1.0
    assert 0.97 <= 1 - a.unknown.mean() <= 1.0  # the out-of-set threshold keeps ~99 % of its validation characters

    model = load_model(oe_model_dir)
    b = model.assess(val.images)
    assert b.probabilities.shape == (200, 10) and b.ood_score.dtype == np.float32
    preds = model.predict(list(val.images[:20]))
    conf = b.probabilities[:20].max(1)
    expected = ["unknown_character" if u else "low_confidence" if c < model.review_below else None
                for u, c in zip(b.unknown[:20], conf)]
    assert [p.review_reason for p in preds] == expected
    assert [p.ood_score for p in preds] == pytest.approx(b.ood_score[:20].tolist(), abs=1e-4)


def test_init_refuses_another_architecture(trained_model_dir, small_dev):
    from kmnist_core.errors import KmnistError
    from kmnist_core.train import TrainConfig, train_model

    with pytest.raises(KmnistError, match="not a compact-cnn"):
        train_model(TrainConfig(model="compact-cnn", epochs=1, init=str(trained_model_dir)), small_dev, "cpu")


def test_evaluate_reports_auto_accepted_share_and_out_of_set_kinds(oe_model_dir, small_dev, kmnist_dev, tmp_path):
    """Thresholds pinned in a copy of the card (review below the median confidence), so the share
    evaluate reports is neither all nor nothing and must be the one the model's thresholds give."""
    from kmnist_core.model_dir import CARD_FILE, load_model
    from tests.test_cli import invoke

    model_dir = tmp_path / "model"
    shutil.copytree(oe_model_dir, model_dir)
    card = json.loads((model_dir / CARD_FILE).read_text(encoding="utf-8"))
    conf = load_model(oe_model_dir).probabilities(small_dev.val.images).max(1)
    card["calibration"]["review_below"] = float(np.median(conf))  # an edited card: its own thresholds hold
    (model_dir / CARD_FILE).write_text(json.dumps(card, ensure_ascii=False), encoding="utf-8")
    model = load_model(model_dir)
    val = kmnist_dev.val  # what `evaluate --split val` scores
    a = model.assess(val.images)
    accepted = ~a.unknown & (a.probabilities.max(1) >= model.review_below)
    assert 0.2 < accepted.mean() < 0.8

    unknown = tmp_path / "unknown"
    glyphs, _ = make_negatives(small_dev.test.images, small_dev.test.labels, 12, 1, glyph_pool("held_out")[:30],
                               [IPAEX_GOTHIC], mix={"glyph": 1.0})
    for kind, images in (("other_characters", glyphs), ("blanks", np.full((5, 40, 30), 230, np.uint8))):
        (unknown / kind).mkdir(parents=True)
        for i, img in enumerate(images):
            Image.fromarray(img if kind == "blanks" else 255 - img).save(unknown / kind / f"{i}.png")
    (unknown / "blanks" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "eval"
    r = invoke("evaluate", "--model", model_dir, "--split", "val", "--unknown", unknown, "--out", out)
    assert r.exit_code == 0, r.output
    assert "auto-accepted" in r.stdout and "other_characters" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    review = metrics["review"]
    assert review["review_below"] == pytest.approx(model.review_below)
    assert review["auto_accepted_share"] == pytest.approx(accepted.mean())
    assert review["auto_accepted"] == accepted.sum()
    assert review["auto_accepted_errors"] == (accepted & (a.probabilities.argmax(1) != val.labels)).sum()
    u = metrics["unknown"]
    assert u["n"] == 17 and u["undecodable"] == 1
    assert u["by_kind"]["other_characters"]["n"] == 12 and u["by_kind"]["blanks"]["n"] == 5
    assert u["by_kind"]["blanks"]["reasons"] == {"blank": 5, "unknown_character": 0, "low_confidence": 0, "accepted": 0}
    assert (out / "ood_scores.png").stat().st_size > 0 and (out / "unknown_accepted.png").stat().st_size > 0


def test_a_reject_class_model_learns_none_of_these_and_keeps_ten_outputs():
    """compact-cnn-wide-reject: ten outputs, the characters' log-probabilities beside "none of these";
    trained on negatives as that class, their energy (-log(1 - p(none))) rises above the characters'."""
    import torch

    from kmnist_core.calibration import ood_score
    from kmnist_core.datasets import Split
    from kmnist_core.models import create_model
    from kmnist_core.train import make_optimizer, train_one_epoch
    from kmnist_core.train_options import TrainConfig
    from kmnist_core.transforms import to_model_tensor

    torch.manual_seed(0)
    model = create_model("compact-cnn-wide-reject", 10, 28)
    rng = np.random.default_rng(0)
    characters = np.zeros((256, 28, 28), np.uint8)
    labels = rng.integers(0, 10, 256)
    for i, c in enumerate(labels):  # a bar at a class's own height: learnable in a few steps
        characters[i, 2 + 2 * c : 5 + 2 * c, 4:24] = 255
    noise = rng.integers(0, 255, (256, 28, 28), dtype=np.uint8)
    cfg = TrainConfig(model="compact-cnn-wide-reject", epochs=8, batch_size=64, lr=3e-3, negatives="synth")
    opt, sched = make_optimizer(model, cfg, 4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(cfg.epochs):
        train_one_epoch(model, Split(characters, labels), opt, sched, cfg, gen, "cpu", None, noise)
    model.eval()
    with torch.no_grad():
        x = to_model_tensor(np.concatenate([characters[:64], noise[:64]]))
        out = model(x).numpy()
        none = torch.softmax(model.full_logits(x), 1)[:, -1].numpy()
    assert out.shape == (128, 10)
    energy = ood_score(out, "energy")
    np.testing.assert_allclose(energy, -np.log1p(-none), rtol=1e-4, atol=1e-5)
    assert energy[64:].min() > energy[:64].max()  # every negative more out of set than every character
    assert (out[:64].argmax(1) == labels[:64]).mean() > 0.9
