"""The default model on crops as they arrive from scanning: real kmnist-dev test images converted to
each form, decoded by predict's normalization. Accuracy must stay within 1 point of the clean images,
and within 0.5 point for crops cut out as a segmenter cuts them (bench/crop_forms.py's forms: margins,
non-square and off-centre boxes, specks, ruling lines, border strips); no real character is blank."""

import io

import numpy as np
import pytest
from PIL import Image

from bench.crop_forms import FORMS as CUT_FORMS
from kmnist_core import load_model
from kmnist_core.preprocess import decode_bytes


def png(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def on_paper(glyph: np.ndarray, paper=225, ink=30) -> np.ndarray:
    return (paper - glyph.astype(np.float32) / 255 * (paper - ink)).astype(np.uint8)


def noisy_rgb_jpeg(glyph, rng: np.random.Generator):
    rgb = on_paper(glyph).astype(np.float32)[..., None] * np.array([1.0, 0.97, 0.9])  # yellowed paper
    rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
    return png(Image.fromarray(rgb).resize((56, 56), Image.Resampling.BICUBIC), "JPEG", quality=85)


def tiff16(glyph, rng: np.random.Generator):
    return png(Image.fromarray(on_paper(glyph).astype(np.uint16) * 257), "TIFF")


def odd_size_crop(glyph, rng: np.random.Generator):
    """Upscaled to 36-96 px, then cut to the ink's bounding box plus a small margin, as a segmenter
    would: the crop is not square and the character fills it."""
    side = int(rng.integers(36, 97))
    scan = np.asarray(Image.fromarray(on_paper(glyph)).resize((side, side), Image.Resampling.BICUBIC))
    rows, cols = np.flatnonzero((scan < 150).any(1)), np.flatnonzero((scan < 150).any(0))
    m = max(1, side // 20)
    box = scan[max(0, rows[0] - m) : rows[-1] + m + 1, max(0, cols[0] - m) : cols[-1] + m + 1]
    return png(Image.fromarray(box))


def alpha_only(glyph, rng: np.random.Generator):
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = glyph
    return png(Image.fromarray(rgba, "RGBA"))


# Each form takes the glyph and the test's own generator (seeded per test: no image depends on test order).
FORMS = {
    "dark ink on light paper": lambda g, rng: png(Image.fromarray(on_paper(g))),
    "RGB JPEG with noise": noisy_rgb_jpeg,
    "16-bit TIFF": tiff16,
    "36-96 px, not square": odd_size_crop,
    "ink only in alpha": alpha_only,
}


@pytest.fixture(scope="module")
def scorer(kmnist_dev):
    model = load_model("default")
    test = kmnist_dev.test

    def accuracy(encode) -> tuple[float, int]:
        prepared = [decode_bytes(encode(g), model.input_size) for g in test.images]
        pixels = np.stack([p.pixels for p in prepared])
        return float((model.probabilities(pixels).argmax(1) == test.labels).mean()), sum(p.blank for p in prepared)

    return accuracy


@pytest.fixture(scope="module")
def clean(scorer) -> float:
    accuracy, blank = scorer(lambda g: png(Image.fromarray(g)))
    assert accuracy > 0.95 and blank == 0
    return accuracy


@pytest.mark.parametrize("form", FORMS)
def test_accuracy_holds_within_one_point(scorer, clean, form):
    rng = np.random.default_rng(0)
    converted, blank = scorer(lambda g: FORMS[form](g, rng))
    assert converted >= clean - 0.01, f"{form}: {converted:.3f} vs clean {clean:.3f}"
    assert blank == 0


@pytest.mark.parametrize("form", [f for f in CUT_FORMS if not f.startswith("tight")])
def test_cut_out_crops_within_half_a_point_of_tight(scorer, clean, form):
    rng = np.random.default_rng(0)
    converted, blank = scorer(lambda g: CUT_FORMS[form](g, rng))
    assert converted >= clean - 0.005, f"{form}: {converted:.3f} vs tight {clean:.3f}"
    assert blank == 0
