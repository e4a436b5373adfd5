import io

import numpy as np
import pytest
from PIL import Image

from kmnist_core.preprocess import (DecodeError, decode_bytes, decode_bytes_full, decode_many, fit_square, lean_levels,
                                   normalize_polarity, open_image, prepare_array, prepare_image)


def encode(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def glyph(kmnist_dev) -> np.ndarray:
    return kmnist_dev.test.images[0]


def test_kmnist_image_passes_through_unchanged(glyph):
    out = decode_bytes(encode(Image.fromarray(glyph)), 28)
    assert not out.inverted and not out.blank
    assert np.abs(out.pixels.astype(int) - glyph.astype(int)).max() <= 3


def test_tight_crops_pass_through_bit_identical(kmnist_dev):
    """KMNIST's characters touch their box: finding the ink must leave such crops alone."""
    images = kmnist_dev.test.images[:300]
    whole = [fit_square(normalize_polarity(g / 255.0)[0], 28) for g in images]  # the fit before issue 11
    assert all(np.array_equal(prepare_array(g, 28).pixels, w) for g, w in zip(images, whole))
    assert np.mean([np.array_equal(prepare_array(g, 28).pixels, g) for g in images]) >= 0.98  # only stretched


def on_paper_box(glyph: np.ndarray, h: int, w: int, top: int, left: int, side: int) -> np.ndarray:
    """The glyph scaled to `side` px, dark ink on paper, at (top, left) in an h x w box."""
    big = np.asarray(Image.fromarray(glyph).resize((side, side), Image.Resampling.BICUBIC), np.float32)
    box = np.zeros((h, w), np.float32)
    box[top : top + side, left : left + side] = big
    return (225 - box / 255 * 195).astype(np.uint8)


def test_margins_are_cut_to_the_ink_and_the_box_is_in_original_pixels(glyph):
    box = on_paper_box(glyph, 60, 90, 5, 40, 50)
    out = prepare_image(Image.fromarray(box), 28)
    x, y, w, h = out.ink_box
    assert 38 <= x <= 44 and 3 <= y <= 9 and x + w <= 92 and y + h <= 57
    assert max(w, h) >= 45  # the character, not the box
    # Fills the square: on its long side the character's ink runs from the first to the last pixel.
    ink = out.pixels > 30
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    long_side = rows if h >= w else cols
    assert (long_side[0], long_side[-1]) == (0, 27)
    tight = prepare_array(glyph, 28).pixels
    assert np.corrcoef(out.pixels.ravel().astype(float), tight.ravel().astype(float))[0, 1] > 0.9


def test_specks_ruling_line_and_border_strip_are_left_out(glyph):
    box = on_paper_box(glyph, 76, 110, 12, 30, 56)  # not square: rows and columns differ in length
    clean = prepare_array(box, 28).ink_box
    dirty = box.copy()
    dirty[3:5, 3:5] = 20  # a speck in the corner
    dirty[70:72, 95:97] = 20
    dirty[6, :] = 40  # a ruling line across the top margin
    dirty[:, 14:16] = 50  # and one down the left margin
    dirty[:, -4:] = 60  # a dark strip along the right edge
    assert prepare_array(dirty, 28).ink_box == clean


@pytest.mark.parametrize("kind", ["flat", "noise", "specks", "line"])
def test_blank_crops_are_blank_with_background_pixels(kind):
    rng = np.random.default_rng(0)
    paper = np.full((48, 64), 220, np.uint8)
    if kind == "noise":
        paper = np.clip(paper + rng.normal(0, 6, paper.shape), 0, 255).astype(np.uint8)
    if kind == "specks":
        for y, x in rng.integers(2, 46, (5, 2)):
            paper[y : y + 2, x : x + 2] = 30
    if kind == "line":
        paper[20:22, :] = 40
    out = decode_bytes(encode(Image.fromarray(paper)), 28)
    assert out.blank and out.ink_box is None
    assert out.pixels.shape == (28, 28) and out.pixels.dtype == np.uint8 and out.pixels.max() == 0


def test_scan_polarity_is_detected_and_inverted(glyph):
    paper = (200 - glyph.astype(np.float32) * 160 / 255).astype(np.uint8)  # grey paper, dark ink
    out = decode_bytes(encode(Image.fromarray(paper)), 28)
    assert out.inverted
    assert np.corrcoef(out.pixels.ravel(), glyph.ravel())[0, 1] > 0.98


@pytest.mark.parametrize("mode", ["1", "L", "I;16", "RGB", "RGBA", "LA", "P"])
def test_any_pil_mode_decodes(glyph, mode):
    img = Image.fromarray(255 - glyph)
    if mode == "I;16":
        img = Image.fromarray((255 - glyph).astype(np.uint16) * 257)
        fmt = "TIFF"
    else:
        img, fmt = img.convert(mode), "PNG"
    out = decode_bytes(encode(img, fmt), 28)
    assert out.inverted and out.pixels.shape == (28, 28)
    if mode != "1":
        assert np.corrcoef(out.pixels.ravel(), glyph.ravel())[0, 1] > 0.95


def test_ink_only_in_alpha_channel(glyph):
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = glyph  # black colour everywhere, the character in alpha
    out = decode_bytes(encode(Image.fromarray(rgba, "RGBA")), 28)
    assert np.corrcoef(out.pixels.ravel(), glyph.ravel())[0, 1] > 0.98


def test_non_square_crop_is_fitted_keeping_aspect_and_centred():
    tall = np.full((90, 30), 255, np.uint8)
    tall[10:80, 12:18] = 0  # a dark vertical stroke on paper
    out = prepare_image(Image.fromarray(tall), 28)
    assert out.inverted and (out.width, out.height) == (30, 90)
    cols = np.flatnonzero(out.pixels.max(axis=0) > 128)
    assert 11 <= cols.mean() <= 16  # centred horizontally
    assert out.pixels[:, :8].max() == 0  # padding is background


def test_exif_orientation_is_applied():
    img = np.zeros((20, 40), np.uint8)
    img[2:18, 2:10] = 255  # a light blob near the left edge
    pil = Image.fromarray(img)
    exif = pil.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    out = decode_bytes(encode(pil, "JPEG", exif=exif.tobytes()), 28)
    assert (out.width, out.height) == (20, 40)
    x, y, w, h = out.ink_box  # in the displayed (rotated) image: the blob is now near the top
    assert y <= 3 and h <= 10 and x <= 3 and w >= 14


@pytest.mark.parametrize("data,kind", [(b"", "empty"), (b"not an image at all", "not_image")])
def test_bad_bytes_raise_decode_error_with_kind(data, kind):
    with pytest.raises(DecodeError) as e:
        decode_bytes(data, 28)
    assert e.value.kind == kind


def test_truncated_file(glyph):
    data = encode(Image.fromarray(glyph).resize((200, 200)))
    with pytest.raises(DecodeError) as e:
        decode_bytes(data[: len(data) // 2], 28)
    assert e.value.kind in ("truncated", "corrupt")


def test_decompression_bomb_is_refused_before_allocation():
    bomb = encode(Image.new("1", (20000, 20000)))  # 400 Mpx that compresses to a few KB
    assert len(bomb) < 200_000
    with pytest.raises(DecodeError) as e:
        decode_bytes(bomb, 28)
    assert e.value.kind == "too_large"


def same(a, b) -> bool:
    return (np.array_equal(a.pixels, b.pixels) and a.pixels.dtype == b.pixels.dtype and a.ink_box == b.ink_box
            and (a.inverted, a.blank, a.width, a.height) == (b.inverted, b.blank, b.width, b.height))


def test_lean_decode_is_bit_identical_to_the_full_path_over_kmnist_dev(kmnist_dev):
    """Every kmnist-dev image (train, val and test) as a PNG: decode_many and decode_bytes take the lean
    path and give exactly what the full path gives."""
    images = np.concatenate([kmnist_dev.train.images, kmnist_dev.val.images, kmnist_dev.test.images])
    files = [encode(Image.fromarray(g)) for g in images]
    assert all(lean_levels(open_image(f, 10**6)) is not None for f in files[:50])  # the lean path is the one tested
    full = [decode_bytes_full(f, 28) for f in files]
    many = decode_many(files, 28)
    assert len(many) == len(files) and all(same(a, b) for a, b in zip(many, full))
    assert all(same(decode_bytes(f, 28), b) for f, b in zip(files[::10], full[::10]))


def scan_forms():
    from bench.crop_forms import FORMS as CUT_FORMS
    from tests.test_robustness import FORMS as SCAN_FORMS

    return {**CUT_FORMS, **SCAN_FORMS}


@pytest.mark.parametrize("form", list(scan_forms()))
def test_lean_decode_is_bit_identical_on_the_scan_forms(kmnist_dev, form):
    """bench/crop_forms.py's segmenter cuts (margins, off-centre, specks, lines, strips, noisy RGB JPEG) and
    test_robustness's scan forms (16-bit TIFF and alpha take the full path inside decode_many)."""
    rng = np.random.default_rng(7)
    files = [scan_forms()[form](g, rng) for g in kmnist_dev.test.images[:200]]
    full = [decode_bytes_full(f, 28) for f in files]
    assert all(same(a, b) for a, b in zip(decode_many(files, 28), full))
    assert all(same(decode_bytes(f, 28), b) for f, b in zip(files[:40], full[:40]))


def test_lean_path_skips_what_it_cannot_take(glyph):
    """EXIF, 16-bit, palettes, alpha: the full path (lean_levels says no)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(Image.fromarray(glyph), "JPEG", exif=exif.tobytes())
    for data in (rotated, encode(Image.fromarray(glyph.astype(np.uint16) * 257), "TIFF"),
                 encode(Image.fromarray(glyph).convert("P")), encode(Image.fromarray(glyph).convert("RGBA"))):
        assert lean_levels(open_image(data, 10**6)) is None
        assert same(decode_many([data], 28)[0], decode_bytes_full(data, 28))


def test_decode_many_keeps_order_and_errors_in_place(kmnist_dev):
    good = [encode(Image.fromarray(g)) for g in kmnist_dev.test.images[:6]]
    files = good[:3] + [b"", b"not an image at all"] + good[3:] + [good[0][: len(good[0]) // 2]]
    out = decode_many(files, 28)
    assert [type(r).__name__ for r in out] == ["PreparedImage"] * 3 + ["DecodeError"] * 2 + ["PreparedImage"] * 3 + ["DecodeError"]
    assert [out[3].kind, out[4].kind] == ["empty", "not_image"] and out[8].kind in ("truncated", "corrupt")
    assert all(same(a, decode_bytes_full(f, 28)) for a, f in zip(out[5:8], good[3:]))
