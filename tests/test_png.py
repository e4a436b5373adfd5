"""kmnist_core/png.py against PIL: every row filter, many shapes, and every file it must leave to PIL.

The lean reader either gives PIL's pixels bit for bit or declines; decode_many must then give what the
full path gives for each file, error kinds included."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from kmnist_core import png
from kmnist_core.preprocess import decode_bytes_full, decode_many, lean_pngs
from tests.test_preprocess import encode, same


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def filtered(pixels: np.ndarray, kinds: np.ndarray) -> bytes:
    """PNG filtering of a greyscale image, row y with filter kinds[y] (the encoder's side of section 9)."""
    h, w = pixels.shape
    p = pixels.astype(np.int16)
    out = bytearray()
    for y in range(h):
        above = p[y - 1] if y else np.zeros(w, np.int16)
        left = np.concatenate([[0], p[y, :-1]])
        upper_left = np.concatenate([[0], above[:-1]])
        if kinds[y] == 0:
            pred = np.zeros(w, np.int16)
        elif kinds[y] == 1:
            pred = left
        elif kinds[y] == 2:
            pred = above
        elif kinds[y] == 3:
            pred = (left + above) >> 1
        else:
            est = left + above - upper_left
            pa, pb, pc = np.abs(est - left), np.abs(est - above), np.abs(est - upper_left)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, above, upper_left))
        out += bytes([kinds[y]]) + ((p[y] - pred) & 255).astype(np.uint8).tobytes()
    return bytes(out)


def grey_png(pixels: np.ndarray, kinds: np.ndarray, extra: bytes = b"", ihdr: tuple = (8, 0, 0, 0, 0),
             idat_splits: int = 1, stream: bytes | None = None) -> bytes:
    h, w = pixels.shape
    data = zlib.compress(filtered(pixels, kinds)) if stream is None else stream
    step = -(-len(data) // idat_splits)
    idats = b"".join(chunk(b"IDAT", data[i : i + step]) for i in range(0, len(data), step))
    return png.SIGNATURE + chunk(b"IHDR", struct.pack(">II", w, h) + bytes(ihdr)) + extra + idats + chunk(b"IEND", b"")


def full_path(data: bytes, max_pixels: int = 10**6):
    """decode_bytes_full's result, or the DecodeError it raises."""
    try:
        return decode_bytes_full(data, 28, max_pixels)
    except Exception as e:
        return e


def lean_read(data: bytes, max_pixels: int) -> tuple[int, int, bytes] | None:
    """What decode_many's lean reader takes of one file: (height, width, the inflated rows), or None."""
    shape = png.grey_shape(data, max_pixels)
    rows = None if shape is None else png.grey_rows(data, *shape)
    return None if rows is None else (*shape, rows)


def pil_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("shape", [(28, 28), (1, 1), (1, 40), (37, 1), (64, 23)])
def test_every_filter_mix_gives_pils_pixels(shape):
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    n = 300
    # random levels, flat patches and edges: Paeth's three-way ties come up on flat ones
    images = [np.where(rng.random(shape) < 0.5, rng.integers(0, 256, shape), rng.integers(0, 3, shape) * 127)
              .astype(np.uint8) for _ in range(n)]
    files = [grey_png(img, rng.integers(0, 5, shape[0]), idat_splits=1 + i % 3) for i, img in enumerate(images)]
    found = [lean_read(f, 10**6) for f in files]
    assert all(f is not None and f[:2] == shape for f in found)
    rows = np.frombuffer(b"".join(f[2] for f in found), np.uint8).reshape(n, shape[0], shape[1] + 1)
    decoded = png.unfilter(rows)
    for img, file, mine in zip(images, files, decoded):
        assert np.array_equal(mine, img) and np.array_equal(mine, pil_pixels(file))


def test_pils_own_adaptive_filters_over_kmnist(kmnist_dev):
    files = [encode(Image.fromarray(g)) for g in kmnist_dev.test.images[: png.MIN_GROUP + 50]]
    levels = lean_pngs(files, 10**6)
    assert sorted(levels) == list(range(len(files)))  # all taken: one shape, enough of them
    assert all(np.array_equal(levels[i], pil_pixels(f)) for i, f in enumerate(files))


def declined(glyph: np.ndarray) -> dict[str, bytes]:
    """Files the lean reader must leave to PIL, each a variation of a good greyscale PNG."""
    kinds = np.full(glyph.shape[0], 4)
    good = grey_png(glyph, kinds)
    body = zlib.compress(filtered(glyph, kinds))
    bad_crc = bytearray(good)
    bad_crc[-20] ^= 1  # inside the last IDAT's data
    return {
        "RGB": encode(Image.fromarray(np.stack([glyph] * 3, -1))),
        "16-bit": encode(Image.fromarray(glyph.astype(np.uint16) * 257)),
        "palette": encode(Image.fromarray(glyph).convert("P")),
        "grey and alpha": encode(Image.fromarray(glyph).convert("LA")),
        "interlaced": grey_png(glyph, kinds, ihdr=(8, 0, 0, 0, 1)),
        "transparency": grey_png(glyph, kinds, extra=chunk(b"tRNS", b"\x00\x00")),
        "text (may be XMP)": grey_png(glyph, kinds, extra=chunk(b"tEXt", b"Comment\x00hello")),
        "exif": encode(Image.fromarray(glyph), exif=Image.Exif().tobytes()),
        "bad CRC": bytes(bad_crc),
        "truncated": good[: len(good) - 30],
        "no IEND": good[:-12],
        "IEND with a bad CRC": good[:-1] + bytes([good[-1] ^ 1]),
        "short stream": grey_png(glyph, kinds, stream=zlib.compress(filtered(glyph, kinds)[:-5])),
        "long stream": grey_png(glyph, kinds, stream=zlib.compress(filtered(glyph, kinds) + b"\x00" * 29)),
        "stream without its checksum": grey_png(glyph, kinds, stream=body[:-4]),
        "data after the stream": grey_png(glyph, kinds, stream=body + b"\x00junk"),
        "a bomb (10 MB of rows)": grey_png(glyph, kinds, stream=zlib.compress(bytes(10_000_000))),
        "broken stream": grey_png(glyph, kinds, stream=body[:10] + b"\xff" * 8 + body[18:]),
        "too large": grey_png(np.zeros((30, 40), np.uint8), np.zeros(30, int)),
    }


def test_what_it_cannot_take_is_left_to_pil(kmnist_dev):
    glyph = kmnist_dev.test.images[1]
    cases = declined(glyph)
    assert lean_read(grey_png(glyph, np.full(28, 4)), 1000) is not None  # the variations' source is taken
    for name, data in cases.items():
        assert lean_read(data, 1000) is None, name
    # in a batch big enough for the lean reader, each gives exactly what the full path gives, errors included
    good = [grey_png(g, np.full(28, 4)) for g in kmnist_dev.test.images[: png.MIN_GROUP]]
    files = good + list(cases.values())
    many = decode_many(files, 28, max_pixels=1000)
    for name, data, result in zip(["good"] * len(good) + list(cases), files, many):
        full = full_path(data, 1000)
        if isinstance(full, Exception) or isinstance(result, Exception):
            assert (type(result), getattr(result, "kind", None)) == (type(full), getattr(full, "kind", None)), name
        else:
            assert same(result, full), name


def test_a_bad_filter_byte_leaves_its_group_to_pil(kmnist_dev):
    files = [grey_png(g, np.zeros(28, int)) for g in kmnist_dev.test.images[: png.MIN_GROUP]]
    rows = bytearray(filtered(kmnist_dev.test.images[0], np.zeros(28, int)))
    rows[29 * 5] = 7  # row 5's filter type
    files[0] = grey_png(kmnist_dev.test.images[0], np.zeros(28, int), stream=zlib.compress(bytes(rows)))
    assert lean_pngs(files, 10**6) == {}
    with pytest.raises(ValueError):
        png.unfilter(np.frombuffer(bytes(rows), np.uint8).reshape(1, 28, 29))
    out = decode_many(files, 28)
    assert isinstance(out[0], Exception) and out[0].kind == full_path(files[0]).kind
    assert all(same(a, full_path(f)) for a, f in zip(out[1:], files[1:]))


def test_small_groups_go_through_pil(kmnist_dev):
    files = [encode(Image.fromarray(g)) for g in kmnist_dev.test.images[: png.MIN_GROUP - 1]]
    assert lean_pngs(files, 10**6) == {}
