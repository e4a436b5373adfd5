import io

import numpy as np
import pytest
from PIL import Image

from kmnist_core.preprocess import DecodeError, decode_bytes, prepare_image


def encode(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def glyph(kmnist_dev) -> np.ndarray:
    return kmnist_dev.test.images[0]


def test_kmnist_image_passes_through_unchanged(glyph):
    out = decode_bytes(encode(Image.fromarray(glyph)), 28)
    assert not out.inverted
    assert np.abs(out.pixels.astype(int) - glyph.astype(int)).max() <= 3


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
    img[:, :5] = 255  # light stripe on the left edge
    pil = Image.fromarray(img)
    exif = pil.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    out = decode_bytes(encode(pil, "JPEG", exif=exif.tobytes()), 28)
    assert (out.width, out.height) == (20, 40)
    assert out.pixels[:8].mean() > out.pixels[-8:].mean()  # stripe now on top


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
