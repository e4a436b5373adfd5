"""Every review reason through `kmnist-batch predict` (in this process; a job this small runs without Ray):
the row's reason and precedence, needs_review, the counts in summary.json / by_folder.csv / the printed
summary, the review sheet that names the files (in the order pandas sorted it in, and built without
pandas), and `--review-below`.

The model is the shipped default with its thresholds pinned in a copy of its card (the weights are
the same), so the test checks the pipeline's wiring, not where a particular model's thresholds fall.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib_fontja
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw, ImageFont

from kmnist_core import load_model
from kmnist_core.model_dir import CARD_FILE, DEFAULT_MODEL_DIR
from kmnist_core.predictions import read_predictions
from reviews.sheet import sheet_order
from tests.test_cli import invoke

FONT = Path(matplotlib_fontja.__file__).parent / "fonts" / "ipaexg.ttf"


def rendered(char: str, side: int = 64) -> np.ndarray:
    """A font glyph, dark on white paper: a character that is not one of the model's ten."""
    img = Image.new("L", (side, side), 235)
    ImageDraw.Draw(img).text((side // 2, side // 2), char, fill=20, anchor="mm", font=ImageFont.truetype(str(FONT), 52))
    return np.asarray(img)


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory, kmnist_dev):
    """A tree with one crop per reason plus an accepted one, predicted through the CLI."""
    tmp = tmp_path_factory.mktemp("review")
    model = load_model("default")
    test = kmnist_dev.test
    prepared = lambda arrays: np.stack([model.prepare(a).pixels for a in arrays])  # noqa: E731

    real = model.assess(test.images[:200])
    conf = real.probabilities.max(1)
    sure = int(np.argmax(conf - real.ood_score))  # confident and in-set: auto-accepted
    unsure = int(np.argmin(np.where(real.ood_score < np.median(real.ood_score), conf, 2)))  # in-set, least sure
    others = [rendered(c) for c in "漢鬱議曜"]
    other = others[int(np.argmax(model.assess(prepared(others)).ood_score))]
    u = model.assess(prepared([other]))
    ood_threshold = float((u.ood_score[0] + max(real.ood_score[sure], real.ood_score[unsure])) / 2)
    assert u.ood_score[0] > max(real.ood_score[sure], real.ood_score[unsure]), "no kanji scores above the glyphs"
    review_below = float((conf[sure] + max(conf[unsure], u.probabilities.max())) / 2)
    assert conf[sure] > review_below > conf[unsure], (conf[sure], conf[unsure])

    model_dir = tmp / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model_dir)
    card = json.loads((model_dir / CARD_FILE).read_text(encoding="utf-8"))
    card["calibration"].update(ood_threshold=ood_threshold, review_below=review_below)
    (model_dir / CARD_FILE).write_text(json.dumps(card, ensure_ascii=False), encoding="utf-8")

    tree = tmp / "scans"
    (tree / "book" / "page 1").mkdir(parents=True)
    Image.fromarray(255 - test.images[sure]).save(tree / "book" / "page 1" / "accepted.png")
    Image.fromarray(255 - test.images[unsure]).save(tree / "book" / "page 1" / "unsure.png")
    Image.fromarray(other).save(tree / "book" / "page 1" / "kanji.png")
    blank = np.clip(np.random.default_rng(0).normal(225, 5, (50, 40)), 0, 255).astype(np.uint8)
    blank[10:12, 30:32] = 40  # paper with a speck: no character
    Image.fromarray(blank).save(tree / "book" / "page 1" / "blank.png")
    (tree / "book" / "page 1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)

    out = tmp / "out"
    r = invoke("predict", tree, "--out", out, "--model", model_dir, "--executor", "local")
    assert r.exit_code == 0, r.output
    df = read_predictions(out).to_pandas()
    df["name"] = df.rel_path.str.rsplit("/", n=1).str[-1]
    return out, df.set_index("name"), r.stdout, review_below


def test_each_reason_in_precedence(reviewed):
    _, df, _, review_below = reviewed
    assert df.review_reason.fillna("accepted").to_dict() == {
        "accepted.png": "accepted", "unsure.png": "low_confidence", "kanji.png": "unknown_character",
        "blank.png": "blank", "broken.png": "error"}
    assert (df.needs_review == df.review_reason.notna()).all()
    # the kanji is below review_below too: unknown_character wins over low_confidence
    assert df.loc["kanji.png", "confidence"] < review_below
    assert df.loc["kanji.png", "ood_score"] > df.loc["accepted.png", "ood_score"]
    # blank and error rows carry no prediction at all
    for name in ("blank.png", "broken.png"):
        row = df.loc[name]
        assert pd.isna(row.pred_char) and pd.isna(row.confidence) and pd.isna(row.ood_score) and pd.isna(row.ink_x)
    assert pd.isna(df.loc["blank.png", "error"]) and df.loc["broken.png", "error_kind"] == "not_image"
    assert df.loc["unsure.png", "confidence"] < review_below <= df.loc["accepted.png", "confidence"]
    assert df.loc[["accepted.png", "unsure.png", "kanji.png"], "ink_w"].notna().all()


def test_summary_counts_every_reason(reviewed):
    out, _, stdout, _ = reviewed
    s = json.loads((out / "summary" / "summary.json").read_text(encoding="utf-8"))
    expected = {"error": 1, "blank": 1, "unknown_character": 1, "low_confidence": 1}
    assert s["review_reasons"] == expected and s["needs_review"] == 4 and s["predicted"] == 3
    folders = pd.read_csv(out / "summary" / "by_folder.csv")
    assert folders[[f"review_{r}" for r in expected]].iloc[0].to_dict() == {f"review_{r}": 1 for r in expected}
    assert "needs review 4: error 1, blank 1, unknown_character 1, low_confidence 1" in stdout


def test_review_sheet_names_the_files(reviewed):
    out, _, _, _ = reviewed
    summary = out / "summary"
    for reason in ("error", "blank", "unknown_character", "low_confidence"):
        assert (summary / f"review_sheet-{reason}-1.png").stat().st_size > 0
    page = (summary / "review.html").read_text(encoding="utf-8")
    for name in ("unsure.png", "kanji.png", "blank.png", "broken.png"):
        assert f"book/page 1/{name}" in page
    assert "accepted.png" not in page
    assert page.count("<img src=\"data:image/png;base64,") == 4


@pytest.mark.parametrize("reason", ["unknown_character", "low_confidence", "error"])
def test_the_sheet_order_is_the_one_pandas_sort_values_gave(reason):
    """sheet_order sorts with pyarrow in the order the sheet had when pandas sorted it: the most doubtful
    first, a missing score (null or NaN) last whichever the direction, ties by rel_path, then as given."""
    rng = np.random.default_rng(0)
    n = 300
    score = rng.choice([0.2, 0.5, 0.7, np.nan], n)  # few values: many ties
    rows = pa.table({"rel_path": [f"page/{i}.png" for i in rng.integers(0, 30, n)],  # a rel_path in several roots
                     "input_root": [f"/in/{i}" for i in range(n)],  # tells the tied rows apart
                     "confidence": pa.array(score, pa.float32(), mask=rng.random(n) < 0.1),
                     "ood_score": pa.array(-score, pa.float32(), mask=rng.random(n) < 0.1)})
    key, ascending = {"unknown_character": ("ood_score", False), "low_confidence": ("confidence", True),
                      "error": ("rel_path", True)}[reason]
    by_pandas = rows.to_pandas().sort_values([key, "rel_path"], ascending=[ascending, True])["input_root"].tolist()
    assert sheet_order(rows, reason).column("input_root").to_pylist() == by_pandas
    assert sheet_order(rows, reason, 10).column("input_root").to_pylist() == by_pandas[:10]


# `python -c` with pandas made unimportable, then the CLI; predict's forked child keeps the finder.
WITHOUT_PANDAS = """
import sys

class NoPandas:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "pandas":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)

sys.meta_path.insert(0, NoPandas())
from jobs.cli import app

app(sys.argv[1:])
"""


@pytest.mark.timeout(120)
def test_a_crop_run_and_its_report_never_import_pandas(reviewed, tmp_path):
    """Issue 37: pandas costs predict's driver ~37 MB resident, and a crop run's report needs none of it.
    The reviewed tree predicted with pandas unimportable gives the same review sheet and by_folder.csv."""
    out = reviewed[0]
    tree, model_dir = out.parent / "scans", out.parent / "model"  # the fixture's input and model
    bare = tmp_path / "out"
    for args in (("predict", tree, "--out", bare, "--model", model_dir, "--executor", "local"), ("report", bare)):
        r = subprocess.run([sys.executable, "-c", WITHOUT_PANDAS, *map(str, args)], capture_output=True, text=True,
                           timeout=100)
        assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in (out / "summary").glob("review*")) + ["by_folder.csv"]
    assert len(names) == 6  # review.html, a PNG page per reason
    for name in names:
        assert (bare / "summary" / name).read_bytes() == (out / "summary" / name).read_bytes(), name


def test_review_below_sets_the_low_confidence_line(tmp_path, kmnist_dev):
    """`--review-below P`: the crops under P (and only those) are low_confidence; the run records P."""
    model = load_model("default")
    images = kmnist_dev.test.images[:40]
    p = float(np.median(model.assess(images).probabilities.max(1)))
    # What predict computes under P (at int8, the rows near P are fp32's).
    a = model.with_thresholds(review_below=p).assess(images)
    conf = a.probabilities.max(1)
    known = ~a.unknown
    assert (known & (conf >= model.review_below) & (conf < p)).any()  # crops the card's own threshold accepts
    (tmp_path / "crops").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / "crops" / f"{i:02d}.png")
    out = tmp_path / "out"
    r = invoke("predict", tmp_path / "crops", "--out", out, "--review-below", p, "--executor", "local")
    assert r.exit_code == 0, r.output
    df = read_predictions(out).to_pandas().sort_values("rel_path")
    assert df.confidence.to_numpy() == pytest.approx(conf, abs=1e-6)
    expected = np.where(~known, "unknown_character", np.where(conf < p, "low_confidence", "accepted"))
    assert df.review_reason.fillna("accepted").tolist() == expected.tolist()
    assert 5 < (expected == "low_confidence").sum() and 5 < (expected == "accepted").sum()
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    summary = json.loads((out / "summary" / "summary.json").read_text(encoding="utf-8"))
    assert run["review_below"] == summary["review_below"] == p
