"""Learning from review decisions (issue 23, item 5): `train --init default --reviews OUT` and
`evaluate --reviews OUT`, on a real predict run whose truth the test knows.

The archive: 400 kmnist-dev TEST characters (the default model never trained on them) as a scanner at half
the vertical resolution would give them (every character half as tall as wide, dark ink on paper, with
margins), plus crops that are no character, a blank one and two broken files. The default model gets
about half of those characters wrong and flags nearly all of them; a reviewer settles every flagged row
with its true label. Fine-tuning on the reviewed crops must then raise accuracy on the held-out part,
and the same fine-tuning without them must not.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from batch_infer.gathered_crops import gather_reviews
from kmnist_core import storage
from kmnist_core.labelled_crops import MIN_REVIEWED, review_figures, split_held_out
from kmnist_core.model_dir import load_model
from kmnist_core.predictions import read_predictions
from kmnist_core.review_reasons import review_reasons
from reviews import store
from tests.test_cli import assert_one_line_error, invoke

ARCHIVE_CHARACTERS = 400
EPOCHS = "3"


def as_archive_scan(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A kmnist crop (light ink on dark) as this archive's scanner gives it: half the vertical resolution,
    dark ink on light paper, a random margin."""
    flat = np.asarray(Image.fromarray(image).resize((28, 14), Image.BILINEAR))
    top, left = rng.integers(2, 8, 2)
    paper = np.full((14 + 2 * top, 28 + 2 * left), 255, np.uint8)
    paper[top : top + 14, left : left + 28] = 255 - flat
    return Image.fromarray(paper)


@pytest.fixture(scope="module")
def archive(tmp_path_factory, kmnist_dev):
    """A predict run (default model, in this process) with every flagged row reviewed; returns what the
    test knows: OUT, the truth per key, and the decisions' expected counts."""
    from kmnist_core.negatives import IPAEX_GOTHIC, glyph_pool, make_negatives

    tmp = tmp_path_factory.mktemp("archive")
    crops = tmp / "crops"
    rng = np.random.default_rng(0)
    truth = {}  # file -> true character, or not_a_character
    d = kmnist_dev
    for i in range(ARCHIVE_CHARACTERS):
        path = crops / f"book{i % 4}" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        as_archive_scan(d.test.images[i], rng).save(path)
        truth[path] = d.classes.chars[d.test.labels[i]]
    negatives, _ = make_negatives(d.val.images, d.val.labels, 40, 7, glyph_pool("held_out"), [IPAEX_GOTHIC])
    for i, image in enumerate(negatives):  # the segmenter's mistakes: fragments, merged pairs, strokes, kanji
        path = crops / "noise" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - image).resize((40, 40)).save(path)
        truth[path] = store.NOT_A_CHARACTER
    Image.new("L", (30, 30), 250).save(crops / "noise" / "blank.png")
    truth[crops / "noise" / "blank.png"] = store.NOT_A_CHARACTER
    for name in ("torn-1.png", "torn-2.png"):
        (crops / "noise" / name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
        truth[crops / "noise" / name] = store.UNREADABLE

    out = tmp / "out"
    r = invoke("predict", crops, "--out", out, "--executor", "local")
    assert r.exit_code == 0, r.output
    rows = read_predictions(out).to_pylist()
    flagged = [row for row in rows if row["needs_review"]]
    assert len(flagged) > 0.9 * len(rows), "the scenario needs an archive the default model mostly flags"

    # Every flagged row gets its true label, with what the reviewer saw; a few auto-accepted rows are audited.
    settle = [{"key": row["path_bytes"], "path": row["path"], "label": truth[Path(row["path"])], "reviewer": "ana",
               **{k: row[k] for k in ("model_id", "run_id", "pred_char", "confidence", "review_reason")}}
              for row in flagged]
    settle += [{"key": row["path_bytes"], "path": row["path"], "label": truth[Path(row["path"])], "reviewer": "ben",
                "kind": "audit"} for row in rows if not row["needs_review"]][:5]
    location = storage.resolve(out)
    chars = d.classes.chars
    first = settle[0]
    wrong = next(c for c in chars if c != first["label"]) if first["label"] in chars else chars[0]
    # An earlier, corrected decision (the latest wins), and a decision on a key predict never listed.
    store.append(location, store.decision_table([{**first, "label": wrong, "reviewer": "cho"}], chars))
    store.append(location, store.decision_table(
        settle + [{"key": b"/gone/crop.png", "path": "/gone/crop.png", "label": chars[0], "reviewer": "ana"}], chars))
    # A file replaced after predict read it: its reviewer saw other bytes, so its decision is not used.
    changed = [Path(row["path"]) for row in flagged if truth[Path(row["path"])] in chars][-1]
    as_archive_scan(d.test.images[999], rng).save(changed)

    labels = [s["label"] for s in settle]
    # Blank: the blank file, and any drawn negative predict too found blank (decided, yet no crop to learn from).
    blanks = sum(s.get("review_reason") == "blank" for s in settle)
    assert blanks >= 1  # blank.png
    expected = {
        "labels": {"character": sum(l in chars for l in labels) + 1,
                   store.NOT_A_CHARACTER: labels.count(store.NOT_A_CHARACTER),
                   store.UNREADABLE: labels.count(store.UNREADABLE)},
        "left_out": {store.UNREADABLE: 2, "no_prediction_row": 1, "changed_since_predict": 1, "undecodable": 0,
                     "blank": blanks},
        "used": {"characters": sum(l in chars for l in labels) - 1,
                 "negatives": labels.count(store.NOT_A_CHARACTER) - blanks},
        "run_ids": sorted({row["run_id"] for row in rows}),
    }
    return {"out": out, "truth": truth, "expected": expected, "changed": changed, "tmp": tmp}


@pytest.fixture(scope="module")
def small_data_dir(archive, kmnist_dev) -> Path:
    """kmnist-dev cut to 1,200 of its TRAIN images (900 train / 150 val / 150 test once split) for
    `--data-dir`: the replayed dataset of a fine-tune kept small enough for a test."""
    from kmnist_core.datasets import BUNDLED_DIR

    folder = archive["tmp"] / "small-kmnist-dev"
    folder.mkdir()
    np.savez(folder / "kmnist-dev-imgs.npz", kmnist_dev.train.images[:1200])
    np.savez(folder / "kmnist-dev-labels.npz", kmnist_dev.train.labels[:1200])
    (folder / "kmnist_classmap.csv").write_bytes((BUNDLED_DIR / "kmnist_classmap.csv").read_bytes())
    return folder


def train_args(data_dir: Path, out: Path, *extra: object) -> list[object]:
    return ["train", "--init", "default", "--data-dir", data_dir, "--epochs", EPOCHS, "--threads", "1",
            "--out", out, *extra]


@pytest.fixture(scope="module")
def fine_tuned(archive, small_data_dir):
    """`train --init default --reviews OUT`, with a spy on what each epoch trains on."""
    from kmnist_core import train

    seen = []
    real = train.train_one_epoch

    def spy(*args, **kwargs):
        if not seen:
            bound = inspect.signature(real).bind(*args, **kwargs).arguments
            seen.append((bound["split"], bound.get("negatives")))
        return real(*args, **kwargs)

    model_dir = archive["tmp"] / "fine-tuned"
    with mock.patch.object(train, "train_one_epoch", spy):
        r = invoke(*train_args(small_data_dir, model_dir, "--reviews", archive["out"]))
    assert r.exit_code == 0, r.output
    card = json.loads((model_dir / "model_card.json").read_text(encoding="utf-8"))
    return {"dir": model_dir, "card": card, "stdout": r.stdout, "first_epoch": seen[0]}


def held_out_part(archive, classes, seed: int = 0, share: float = 0.3):
    """The held-out reviewed crops, computed here as run_train splits them."""
    reviewed = gather_reviews([str(archive["out"])], classes, 28)
    return reviewed, *split_held_out(reviewed, share, seed)


def test_gathered_crops_follow_the_latest_decisions_and_count_what_is_left_out(archive, kmnist_dev):
    reviewed = gather_reviews([str(archive["out"])], kmnist_dev.classes, 28)
    source = reviewed.sources[0]
    expected = archive["expected"]
    assert source["out"] == str(archive["out"]) and source["run_ids"] == expected["run_ids"]
    assert source["labels"] == expected["labels"]
    assert source["left_out"] == expected["left_out"]
    assert source["used"] == expected["used"]
    assert source["by_decision_kind"] == {"audit": 5, "review": source["decisions"] - 5}
    assert len(reviewed.labels) == expected["used"]["characters"] and len(reviewed.negatives) == expected["used"]["negatives"]

    # Each crop is the model input predict made of that file, labelled with its true class.
    from kmnist_core.preprocess import decode_bytes

    truth = {p: c for p, c in archive["truth"].items() if c in kmnist_dev.classes.chars and p != archive["changed"]}
    by_pixels = {decode_bytes(p.read_bytes(), 28).pixels.tobytes(): kmnist_dev.classes.chars.index(c)
                 for p, c in truth.items()}
    for image, label in zip(reviewed.images, reviewed.labels):  # also: the corrected decision's label is the later one
        assert by_pixels[image.tobytes()] == label


@pytest.mark.training
def test_fine_tuning_on_reviews_raises_held_out_accuracy_and_the_card_says_so(fine_tuned, archive, kmnist_dev):
    section = fine_tuned["card"]["reviews"]
    source = section["sources"][0]
    assert source["out"] == str(archive["out"]) and source["labels"] == archive["expected"]["labels"]
    assert source["left_out"] == archive["expected"]["left_out"]
    assert fine_tuned["card"]["training"]["config"]["reviews"] == [str(archive["out"])]
    tests = section["dataset_test_accuracy"]
    assert tests["after"] == fine_tuned["card"]["metrics"]["test"]["accuracy"] and tests["before"] > 0.9

    reviewed, learn, held = held_out_part(archive, kmnist_dev.classes)
    before, after = section["held_out"]["before"], section["held_out"]["after"]
    assert after["characters"] == before["characters"] == len(held.labels) > 80
    assert after["negatives"] == len(held.negatives) > 5
    assert section["learnt_from"]["characters"] == len(learn.labels)
    # "before" is the default model, fp32 with its card's views, at its own card's thresholds: the same
    # figures computed here.
    default = load_model("default", precision="fp32")
    direct = review_figures(default.logits(held.images), held.labels, default.logits(held.negatives),
                            default.temperature, default.calibration.review_params())
    assert before["accuracy"] == pytest.approx(direct["accuracy"])
    assert before["auto_accepted_share"] == pytest.approx(direct["auto_accepted_share"])

    print(f"held-out {len(held.labels)}: accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
          f"auto-accepted {before['auto_accepted_share']:.3f} -> {after['auto_accepted_share']:.3f}")
    assert after["accuracy"] >= before["accuracy"] + 0.2, (before, after)
    assert "held-out reviewed crops" in fine_tuned["stdout"] and "accuracy" in fine_tuned["stdout"]
    # The thresholds were refitted on val for the new model (a different temperature and review line).
    assert fine_tuned["card"]["calibration"]["temperature"] != pytest.approx(default.temperature)


@pytest.mark.training
def test_the_same_fine_tuning_without_reviews_does_not_gain(fine_tuned, archive, small_data_dir, kmnist_dev):
    control_dir = archive["tmp"] / "control"
    r = invoke(*train_args(small_data_dir, control_dir))
    assert r.exit_code == 0, r.output
    assert "reviews" not in json.loads((control_dir / "model_card.json").read_text(encoding="utf-8"))
    _, _, held = held_out_part(archive, kmnist_dev.classes)
    control = load_model(control_dir, precision="fp32")
    control_accuracy = float((control.fp32_logits(held.images).argmax(1) == held.labels).mean())
    after = fine_tuned["card"]["reviews"]["held_out"]["after"]["accuracy"]
    print(f"held-out accuracy: control {control_accuracy:.3f}, with reviews {after:.3f}")
    assert after >= control_accuracy + 0.2


@pytest.mark.training
def test_reviewed_crops_reach_training_and_outlier_exposure_but_held_out_ones_do_not(fine_tuned, archive, kmnist_dev):
    split, negatives = fine_tuned["first_epoch"]
    _, learn, held = held_out_part(archive, kmnist_dev.classes)
    trained = {im.tobytes() for im in split.images}
    pool = {im.tobytes() for im in negatives}
    assert all(im.tobytes() in trained for im in learn.images)
    assert all(im.tobytes() in pool for im in learn.negatives)  # not_a_character -> outlier exposure
    assert not any(im.tobytes() in trained for im in held.images)
    assert not any(im.tobytes() in pool for im in held.negatives)
    # Mixed fine-tuning: the reviewed crops are about half of each epoch (--review-share 0.5).
    reviewed_share = sum(im.tobytes() in {x.tobytes() for x in learn.images} for im in split.images) / len(split)
    assert 0.4 < reviewed_share < 0.6


def evaluate_matches_a_direct_computation(model_dir: str | Path, archive, classes, out: Path) -> dict:
    """`evaluate --model M --reviews OUT`'s figures against what predict would decide for each reviewed crop."""
    r = invoke("evaluate", "--model", model_dir, "--reviews", archive["out"], "--out", out)
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["reviews"]
    reviewed = gather_reviews([str(archive["out"])], classes, 28)
    model = load_model(model_dir)  # the precision evaluate runs by default
    assert metrics["precision"] == model.precision
    # What predict would decide for each crop (kmnist_core/review_reasons.py), from the model's own outputs.
    assessed = model.assess(reviewed.images)
    none = np.zeros(len(reviewed.labels), bool)
    reasons = review_reasons(none, none, assessed.unknown, assessed.probabilities.max(1), model.review_below)
    accepted = reasons == None  # noqa: E711 (elementwise)
    correct = assessed.probabilities.argmax(1) == reviewed.labels
    assert metrics["characters"] == len(reviewed.labels) and metrics["negatives"] == len(reviewed.negatives)
    assert metrics["accuracy"] == pytest.approx(correct.mean())
    assert metrics["auto_accepted_share"] == pytest.approx(accepted.mean())
    assert metrics["auto_accepted_errors"] == int((accepted & ~correct).sum())
    assert metrics["auto_accepted_precision"] == (pytest.approx(correct[accepted].mean()) if accepted.any() else None)
    assert metrics["unknown_share"] == pytest.approx((reasons == "unknown_character").mean())
    assert metrics["negatives_caught_unknown_share"] == pytest.approx(model.assess(reviewed.negatives).unknown.mean())
    assert metrics["sources"][0]["labels"] == archive["expected"]["labels"]
    assert f"accuracy {correct.mean():.2%}" in r.stdout and "not_a_character caught as unknown" in r.stdout
    return metrics


def test_evaluate_on_reviews_matches_a_direct_computation(archive, kmnist_dev, tmp_path):
    metrics = evaluate_matches_a_direct_computation("default", archive, kmnist_dev.classes, tmp_path / "eval")
    assert metrics["auto_accepted"] >= 5  # the audited rows were auto-accepted by this model


@pytest.mark.training
def test_evaluate_on_reviews_of_the_fine_tuned_model(fine_tuned, archive, kmnist_dev, tmp_path):
    metrics = evaluate_matches_a_direct_computation(fine_tuned["dir"], archive, kmnist_dev.classes, tmp_path / "eval")
    assert metrics["accuracy"] > 0.85  # it learnt from 70 % of these crops


def test_a_model_with_no_safe_line_auto_accepts_nothing_even_at_confidence_one():
    """A model whose calibration found no threshold keeping the promise gets review_below just above 1.0;
    predict compares confidences in float64, so a float32 confidence of exactly 1.0 is flagged, and the
    figures must say the same."""
    logits = np.array([[200.0, 0.0], [0.0, 200.0]], np.float32)
    review = {"ood_score": "max-softmax", "ood_threshold": np.inf, "review_below": float(np.nextafter(1.0, 2.0))}
    figures = review_figures(logits, np.array([0, 1]), logits, 1.0, review)
    assert figures["accuracy"] == 1.0
    assert figures["auto_accepted_share"] == 0.0 and figures["negatives_auto_accepted_share"] == 0.0


def copy_of_run(archive, tmp_path: Path) -> Path:
    """The archive's predictions without its reviews."""
    import shutil

    out = tmp_path / "no-reviews"
    shutil.copytree(archive["out"] / "predictions", out / "predictions")
    return out


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_an_out_without_reviews_is_refused(archive, small_data_dir, tmp_path, command):
    out = copy_of_run(archive, tmp_path)
    args = (train_args(small_data_dir, tmp_path / "m", "--reviews", out) if command == "train"
            else ["evaluate", "--reviews", out, "--out", tmp_path / "e"])
    r = invoke(*args)
    assert r.exit_code == 2
    assert_one_line_error(r, "has no review decisions")
    assert not (tmp_path / "m").exists()


def test_too_few_reviewed_crops_are_refused(archive, small_data_dir, tmp_path, kmnist_dev):
    out = copy_of_run(archive, tmp_path)
    rows = read_predictions(out).to_pandas()
    chars = kmnist_dev.classes.chars
    few = [{"key": k, "path": p, "label": archive["truth"][Path(p)], "reviewer": "ana"}
           for k, p in zip(rows.path_bytes, rows.path) if archive["truth"][Path(p)] in chars][: MIN_REVIEWED - 1]
    store.append(storage.resolve(out), store.decision_table(few, chars))
    r = invoke(*train_args(small_data_dir, tmp_path / "m", "--reviews", out))
    assert r.exit_code == 2
    assert_one_line_error(r, f"{MIN_REVIEWED - 1} reviewed crops labelled with a character; at least {MIN_REVIEWED}")


def test_a_second_out_that_is_not_a_predict_run_is_refused(archive, small_data_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    r = invoke(*train_args(small_data_dir, tmp_path / "m", "--reviews", archive["out"], "--reviews", tmp_path / "empty"))
    assert r.exit_code == 2
    assert_one_line_error(r, "is not a predict run")


def test_a_label_outside_the_models_characters_is_refused(archive, small_data_dir, tmp_path):
    out = copy_of_run(archive, tmp_path)
    key = read_predictions(out).to_pandas().path_bytes.iloc[0]
    other_model = ("亜", "唖")  # decisions written against another model's card
    store.append(storage.resolve(out), store.decision_table(
        [{"key": key, "path": "x", "label": "亜", "reviewer": "ana"}], other_model))
    r = invoke(*train_args(small_data_dir, tmp_path / "m", "--reviews", out))
    assert r.exit_code == 2
    assert_one_line_error(r, "'亜' is not one of the model's characters")


def test_page_boxes_are_cut_from_their_page_as_predict_cuts_them(tmp_path, kmnist_dev):
    """A box manifest's reviewed rows: each crop is the box cut from its page image and fitted exactly as
    predict's box stage does, labelled with the truth the manifest carries."""
    from kmnist_core.pages import decode_page, prepare_box

    examples = Path(__file__).resolve().parents[1] / "examples" / "pages"
    out = tmp_path / "pages-out"
    r = invoke("predict", "--manifest", examples / "boxes.csv", "--out", out, "--executor", "local")
    assert r.exit_code == 0, r.output
    rows = read_predictions(out).to_pylist()
    chars = kmnist_dev.classes.chars
    store.append(storage.resolve(out), store.decision_table(
        [{"key": row["path_bytes"], "path": row["path"], "label": row["truth"], "reviewer": "ana"} for row in rows],
        chars))
    reviewed = gather_reviews([str(out)], kmnist_dev.classes, 28)
    assert len(reviewed.labels) == len(rows) and reviewed.sources[0]["used"]["characters"] == len(rows)
    pages = {}
    expected = {}
    for row in rows:
        page = pages.setdefault(row["page"], decode_page((examples / Path(row["page"]).name).read_bytes()))
        pixels = prepare_box(page, row["box_x"], row["box_y"], row["box_w"], row["box_h"], 28).pixels
        expected[pixels.tobytes()] = chars.index(row["truth"])
    assert {im.tobytes(): int(label) for im, label in zip(reviewed.images, reviewed.labels)} == expected
