"""Turn a real crop (any file format, mode, size, polarity) into the model's input.

KMNIST images are light ink on a dark background, the character's bounding box fitted into a 28x28
square (aspect kept, centred: the longer side touches the edges in 98 % of kmnist-dev). Scans arrive the
other way round (dark ink on light paper), in any PIL mode and size, sometimes with EXIF rotation or
with the ink only in an alpha channel, and a segmenter's box leaves margins, specks, ruling lines and
border strips around the character. `prepare_image` normalizes all of that: it decides polarity, finds
the character's ink (`find_ink`), fits that box the way KMNIST was made, and records the polarity
decision and the ink box per row. A crop with no substantial ink is `blank`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kmnist_core import png

MEAN, STD = 0.5, 0.5  # the model reads [0, 1] mapped to [-1, 1], as in the study (transforms, ONNX inputs)

DEFAULT_MAX_PIXELS = 40_000_000  # a character crop is never this large; larger files are refused unread


class DecodeError(Exception):
    """A file that cannot become a model input. `kind` is a stable label for error counts."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@dataclass(frozen=True)
class PreparedImage:
    pixels: np.ndarray  # uint8 (size, size), light ink on dark; all background when blank
    width: int  # of the original file, after EXIF orientation
    height: int
    inverted: bool  # True if the original was dark ink on light
    ink_box: tuple[int, int, int, int] | None = None  # x, y, w, h of the character in the original; None if blank
    blank: bool = False  # no substantial ink: not a character


def to_grayscale(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> float32 (H, W) in [0, 1]. Transparent areas become paper (white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return np.clip(arr / hi, 0, 1)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        alpha, color = rgba[..., 3], rgba[..., :3].mean(axis=2)
        opaque = alpha > 0
        if not opaque.any() or np.ptp(color[opaque]) < 0.02:
            # The colour is flat: the character lives only in the alpha channel (ink = opaque).
            return 1.0 - alpha
        return color * alpha + (1.0 - alpha)  # composite on white paper
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def border_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Background level and noise (robust sigma) of the border of each of a stack of images, where a crop
    is paper: (N, H, W) grey floats in [0, 1], or uint8 levels (their quartiles are read in LEVELS, which
    is increasing, so they are the quartiles of the levels' float values)."""
    n, h, w = images.shape
    ring = max(1, min(h, w) // 10)
    border = np.concatenate([images[:, :ring].reshape(n, -1), images[:, -ring:].reshape(n, -1),
                             images[:, :, :ring].reshape(n, -1), images[:, :, -ring:].reshape(n, -1)], axis=1)
    k = border.shape[1] - 1
    q = np.partition(border, (k // 4, k // 2, 3 * k // 4), axis=1)
    q1, background, q3 = q[:, k // 4], q[:, k // 2], q[:, 3 * k // 4]
    if images.dtype == np.uint8:
        q1, background, q3 = LEVELS[q1], LEVELS[background], LEVELS[q3]
    # Noise from the quartile on the side away from the ink (ink touching the border of a tight crop
    # lies on one side only); 0.674 sigma is a normal distribution's quartile distance.
    return background, np.minimum(background - q1, q3 - background).astype(np.float64) / 0.674


def normalize_polarity(gray: np.ndarray) -> tuple[np.ndarray, bool, float, float]:
    """Make ink light and background dark, judging the background by the image border.

    Returns the stretched image (background 0, strongest ink 1, as in KMNIST), whether it was inverted,
    the ink's contrast over the background before stretching and the border's noise in stretched units.
    """
    stats = border_stats(gray[None])
    background, noise = float(stats[0][0]), float(stats[1][0])
    inverted = background > 0.5
    if inverted:
        gray, background = 1.0 - gray, 1.0 - background
    contrast = float(gray.max()) - background
    if contrast > 1e-3:
        gray = np.clip((gray - background) / contrast, 0, 1)
    return gray, inverted, contrast, noise / max(contrast, 1e-3)


# Ink finding (measured on kmnist-dev and on bench/crop_forms.py's cut-out variants).
INK_LEVEL = 0.25  # of the stretched range: above the anti-aliased fringe, below every stroke's core
NOISE_SIGMAS = 5.0  # and above the border's noise, so scanner grain never counts as ink
MIN_CONTRAST = 0.08  # ~20 grey levels: flatter images are blank paper
MIN_INK_AREA = 0.01  # of the image: the largest ink component of a character is far bigger than this
CORE_FRACTION = 0.05  # components this size of the largest one are part of the character wherever they are
NEAR = 0.04  # smaller ones count only this close (share of its size): 88 % of kmnist-dev fragments outside the core box are within it
FRINGE = 0.05  # the box takes in the anti-aliased edge next to it, as KMNIST's boxes do
LINE_COVERAGE = 0.97  # a row or column this full of ink is a ruling line or a border strip ...
LINE_THICKNESS = 0.15  # ... when the run of such rows is at most this share of the image
EIGHT_CONNECTED = np.ones((3, 3), bool)


def erase_lines(mask: np.ndarray) -> np.ndarray:
    """Clear runs of (nearly) full rows and columns no thicker than LINE_THICKNESS: ruling lines, a dark
    strip along an edge. A character's stroke never spans a margined crop from edge to edge."""
    for axis in (1, 0):  # rows, then columns
        full = np.count_nonzero(mask, axis=axis) >= LINE_COVERAGE * mask.shape[axis]
        if not full.any():
            continue
        length = len(full)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], full.astype(np.int8), [0]])))
        for start, stop in zip(edges[::2], edges[1::2]):
            if stop - start <= max(2, LINE_THICKNESS * length):
                mask = mask.copy()
                if axis == 1:
                    mask[start:stop] = False
                else:
                    mask[:, start:stop] = False
    return mask


def find_ink(gray: np.ndarray, noise: float = 0.0, square: bool = False) -> tuple[int, int, int, int] | None:
    """The character's bounding box (x, y, w, h) in a stretched light-on-dark image, or None if blank.

    `square`: the image is already the model's size, so ink spanning it edge to edge is taken as a
    fitted character (KMNIST's touch their box), whatever else it holds."""
    return ink_boxes(gray[None], np.array([noise]), square)[0]


def labelled_ink_box(gray: np.ndarray, noise: float) -> tuple[int, int, int, int] | None:
    """Connected components of the ink above a noise floor: the large ones are the character (Kuzushiji
    characters are often several components); small ones count only near them, so specks in the margin
    are left out. scipy's labelling is C; a hand-written one in numpy costs ~10x more per crop. Imported
    here: scipy adds ~20 MB to every process that imports this module, and clean crops never need it."""
    from scipy import ndimage

    h, w = gray.shape
    faint = erase_lines(gray > max(FRINGE, NOISE_SIGMAS * noise))
    labels, n = ndimage.label(faint & (gray > max(INK_LEVEL, NOISE_SIGMAS * noise)), structure=EIGHT_CONNECTED)
    if not n:
        return None
    areas = np.bincount(labels.ravel())[1:].tolist()
    largest = max(areas)
    if largest < MIN_INK_AREA * h * w:
        return None
    boxes = [(ys.start, ys.stop, xs.start, xs.stop) for ys, xs in ndimage.find_objects(labels)]
    core = [b for b, area in zip(boxes, areas) if area >= CORE_FRACTION * largest]
    y0, y1 = min(b[0] for b in core), max(b[1] for b in core)
    x0, x1 = min(b[2] for b in core), max(b[3] for b in core)
    near = NEAR * max(y1 - y0, x1 - x0)
    for (a0, a1, b0, b1), area in zip(boxes, areas):
        if area < CORE_FRACTION * largest and a1 > y0 - near and a0 < y1 + near and b1 > x0 - near and b0 < x1 + near:
            y0, y1, x0, x1 = min(y0, a0), max(y1, a1), min(x0, b0), max(x1, b1)
    # Take in the faint edge one pixel round the box (a thresholded box cuts it off).
    y0, x0, y1, x1 = max(0, y0 - 1), max(0, x0 - 1), min(h, y1 + 1), min(w, x1 + 1)
    fringe = faint[y0:y1, x0:x1]
    rows, cols = np.flatnonzero(fringe.any(axis=1)), np.flatnonzero(fringe.any(axis=0))
    return x0 + int(cols[0]), y0 + int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def fit_square(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize keeping the aspect ratio so the longer side is `size`, centred on a black square."""
    h, w = gray.shape
    if h == w == size:  # already a model input (a KMNIST-sized crop): no resampling round trip
        return (gray * 255).round().astype(np.uint8)
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = Image.fromarray((gray * 255).round().astype(np.uint8), mode="L")
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BILINEAR)
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = np.asarray(img)
    return out


def prepare_gray(gray: np.ndarray, size: int) -> tuple[np.ndarray, bool, tuple[int, int, int, int] | None]:
    """Grey [0, 1] image of either polarity -> (model pixels, inverted, ink box or None when blank)."""
    gray, inverted, contrast, noise = normalize_polarity(gray)
    box = find_ink(gray, noise, square=gray.shape == (size, size)) if contrast >= MIN_CONTRAST else None
    if box is None:
        return np.zeros((size, size), np.uint8), inverted, None
    if gray.shape == (size, size):
        # Already a model input, as KMNIST's crops are: kept bit for bit, so tight crops lose nothing.
        return fit_square(gray, size), inverted, box
    x, y, w, h = box
    return fit_square(gray[y : y + h, x : x + w], size), inverted, box


EXIF_FORMATS = {"JPEG", "MPO", "TIFF", "WEBP"}


def prepare_image(img: Image.Image, size: int) -> PreparedImage:
    if img.format in EXIF_FORMATS or "exif" in img.info:  # reading EXIF costs as much as decoding a small PNG
        img = ImageOps.exif_transpose(img)
    pixels, inverted, box = prepare_gray(to_grayscale(img), size)
    return PreparedImage(pixels, img.width, img.height, inverted, box, box is None)


def prepare_array(arr: np.ndarray, size: int) -> PreparedImage:
    """A uint8 (H, W) array, either polarity (a KMNIST array passes through unchanged)."""
    if arr.ndim != 2:
        raise DecodeError("bad_array", f"expected a 2-D grayscale array, got shape {arr.shape}")
    pixels, inverted, box = prepare_gray(arr.astype(np.float32) / 255.0, size)
    return PreparedImage(pixels, arr.shape[1], arr.shape[0], inverted, box, box is None)


# The lean path (decode_many, decode_bytes): 8-bit grey or RGB PNG/JPEG/TIFF without orientation or
# XMP metadata, the common case. Such a file's grey levels are uint8, so every float step of the full
# path (to_grayscale, normalize_polarity, fit_square's rounding) depends on a pixel's level alone:
# it is computed once per level as a 256-entry table, with the same float32 operations in the same
# order, and looked up, so the model input is bit for bit the full path's (tests/test_preprocess.py
# checks it over kmnist-dev and the scan forms). Crops of one shape are processed as one array.
LEAN_FORMATS = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}  # by magic bytes
LEAN_FORMAT_NAMES = ("PNG", "JPEG", "TIFF")
LEAN_MODES = ("L", "RGB")
ORIENTATION_KEYS = ("exif", "xmp", "XML:com.adobe.xmp")  # where PIL's exif_transpose finds a rotation
LEVELS = np.arange(256, dtype=np.float32) / 255.0  # grey level -> to_grayscale's float32 value


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Header check, then decode. Raises DecodeError with a kind: empty, not_image, too_large, truncated, corrupt."""
    if not data:
        raise DecodeError("empty", "file is empty")
    try:
        # Naming the format from the magic bytes spares PIL probing every plugin.
        fmt = LEAN_FORMATS.get(data[:4]) or LEAN_FORMATS.get(data[:3])
        img = Image.open(io.BytesIO(data), formats=[fmt] if fmt else None)
        # Image.open reads only the header: refuse huge images before any pixel is allocated. The
        # limit is below PIL's own decompression-bomb threshold, so PIL's check never fires first.
        if img.width * img.height > max_pixels:
            raise DecodeError("too_large", f"{img.width}x{img.height} pixels exceeds the limit of {max_pixels}")
        img.load()
        return img
    except Exception as e:
        raise decode_error(e) from None


def decode_error(e: Exception) -> Exception:
    """What PIL raises on a bad file, as a DecodeError with its kind (anything else is a bug: kept)."""
    if isinstance(e, DecodeError):
        return e
    if isinstance(e, UnidentifiedImageError):
        return DecodeError("not_image", "not a recognised image format")
    if isinstance(e, Image.DecompressionBombError):  # e.g. an animated image whose frames add up
        return DecodeError("too_large", str(e))
    if isinstance(e, OSError):
        text = str(e).lower()
        return DecodeError("truncated" if "truncated" in text or "end of file" in text else "corrupt", str(e))
    if isinstance(e, (ValueError, SyntaxError, EOFError, IndexError, TypeError, ZeroDivisionError)):
        return DecodeError("corrupt", f"{type(e).__name__}: {e}")
    return e


def lean_levels(img: Image.Image) -> np.ndarray | None:
    """The uint8 grey levels of an image the lean path can take, else None (the full path's cases)."""
    if img.mode not in LEAN_MODES or img.format not in LEAN_FORMAT_NAMES or not img.info.keys().isdisjoint(ORIENTATION_KEYS):
        return None
    if img.format == "TIFF" and img.tag_v2.get(274, 1) != 1:  # TIFF keeps its orientation in its own tags
        return None
    grey = img if img.mode == "L" else img.convert("L")  # the full path's conversion, so the same levels
    return np.frombuffer(grey.tobytes(), np.uint8).reshape(grey.height, grey.width)


def prepare_levels(levels: np.ndarray, size: int) -> list[PreparedImage]:
    """uint8 (N, H, W) grey crops of either polarity -> what prepare_gray gives for each, bit for bit."""
    n, h, w = levels.shape
    flat = levels.reshape(n, -1)
    background, noise = border_stats(levels)
    inverted = background > 0.5
    # normalize_polarity, on the 256 levels instead of the pixels (float32 arithmetic, as there).
    table = np.where(inverted[:, None], (1.0 - LEVELS)[None, :], LEVELS[None, :])
    bg = np.where(inverted, 1.0 - background.astype(np.float64), background.astype(np.float64))
    top = np.where(inverted, (1.0 - LEVELS)[flat.min(axis=1)], LEVELS[flat.max(axis=1)]).astype(np.float64)
    contrast = top - bg
    stretch = contrast > 1e-3
    # A flat crop (no contrast) keeps its table; dividing by 1 there only keeps numpy from warning of 0/0.
    divisor = np.where(stretch, contrast, 1.0).astype(np.float32)[:, None]
    stretched = np.clip((table - bg.astype(np.float32)[:, None]) / divisor, 0, 1)
    table = np.where(stretch[:, None], stretched, table)
    noise = noise / np.maximum(contrast, 1e-3)
    # Each pixel's entry in its own image's table (np.take on flat indices is ~5x take_along_axis here).
    index = flat + np.arange(0, n * 256, 256, dtype=np.intp)[:, None]
    grey = table.ravel().take(index).reshape(n, h, w)  # the stretched image, as normalize_polarity's
    square = (h, w) == (size, size)
    boxes = ink_boxes(grey, noise, square)
    boxes = [box if ok else None for box, ok in zip(boxes, contrast >= MIN_CONTRAST)]
    if square:  # already model inputs: fit_square's rounding, looked up
        fitted = (table * 255).round().astype(np.uint8).ravel().take(index).reshape(n, h, w)
        fitted[[box is None for box in boxes]] = 0
    else:
        fitted = [np.zeros((size, size), np.uint8) if box is None
                  else fit_square(grey[i, box[1] : box[1] + box[3], box[0] : box[0] + box[2]], size)
                  for i, box in enumerate(boxes)]
    return [PreparedImage(fitted[i], w, h, bool(inverted[i]), box, box is None) for i, box in enumerate(boxes)]


def ink_boxes(grey: np.ndarray, noise: np.ndarray, square: bool) -> list[tuple[int, int, int, int] | None]:
    """find_ink for a stack of same-shape images. A projection test as array arithmetic over the whole
    stack: one block of ink with no gap in either projection and no full row or column has nothing beside
    the character to leave out (most clean crops), so its box is the ink's; connected components
    (labelled_ink_box) only for the images that fail it."""
    n, h, w = grey.shape
    ink = grey > np.maximum(FRINGE, NOISE_SIGMAS * noise).astype(np.float32)[:, None, None]
    rows, cols = np.count_nonzero(ink, axis=2), np.count_nonzero(ink, axis=1)
    any_row, any_col = rows > 0, cols > 0
    y0, x0 = any_row.argmax(1), any_col.argmax(1)
    bh, bw = h - any_row[:, ::-1].argmax(1) - y0, w - any_col[:, ::-1].argmax(1) - x0
    one_block = ((bh == any_row.sum(1)) & (bw == any_col.sum(1)) & (rows.max(1) < LINE_COVERAGE * w)
                 & (cols.max(1) < LINE_COVERAGE * h))
    simple = one_block | (square & (np.maximum(bw, bh) >= h - 1))
    enough, has_ink = rows.sum(1) >= MIN_INK_AREA * h * w, any_row.any(1)
    boxes: list[tuple[int, int, int, int] | None] = []
    for i in range(n):
        if not has_ink[i]:
            boxes.append(None)
        elif simple[i]:
            boxes.append((int(x0[i]), int(y0[i]), int(bw[i]), int(bh[i])) if enough[i] else None)
        else:
            boxes.append(labelled_ink_box(grey[i], float(noise[i])))
    return boxes


MIN_STACK = 4  # below this many crops of one shape, prepare_levels' array set-up costs more than it saves


def prepare_one(levels: np.ndarray, size: int) -> PreparedImage:
    """One lean crop: prepare_gray on its levels' float values (to_grayscale's, without PIL's convert)."""
    pixels, inverted, box = prepare_gray(LEVELS[levels], size)
    return PreparedImage(pixels, levels.shape[1], levels.shape[0], inverted, box, box is None)


def decode_many(files: Sequence[bytes], size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[PreparedImage | DecodeError]:
    """decode_bytes for many files at once, each result (or its DecodeError) in input order; crops of
    the same shape on the lean path share one pass of array arithmetic."""
    results: list[PreparedImage | DecodeError | None] = [None] * len(files)
    lean: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    by_png = lean_pngs(files, max_pixels)
    for i, data in enumerate(files):
        if i in by_png:
            lean.setdefault(by_png[i].shape, []).append((i, by_png[i]))
            continue
        try:
            img = open_image(data, max_pixels)
            levels = lean_levels(img)
            if levels is None:
                results[i] = prepare_image(img, size)
            else:
                lean.setdefault(levels.shape, []).append((i, levels))
        except Exception as e:
            error = decode_error(e)
            if not isinstance(error, DecodeError):
                raise
            results[i] = error
    for group in lean.values():
        if len(group) < MIN_STACK:
            for i, levels in group:
                results[i] = prepare_one(levels, size)
            continue
        for (i, _), prepared in zip(group, prepare_levels(np.stack([levels for _, levels in group]), size)):
            results[i] = prepared
    return results  # type: ignore[return-value]


def lean_pngs(files: Sequence[bytes], max_pixels: int) -> dict[int, np.ndarray]:
    """The grey levels of the files kmnist_core/png.py reads, by index: greyscale PNGs, in shapes shared
    by at least png.MIN_GROUP of them (the rest go through PIL, read only as far as their header)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, data in enumerate(files):
        shape = png.grey_shape(data, max_pixels)
        if shape is not None:
            groups.setdefault(shape, []).append(i)
    levels = {}
    for (h, w), members in groups.items():
        if len(members) < png.MIN_GROUP:
            continue
        found = [(i, rows) for i in members if (rows := png.grey_rows(files[i], h, w)) is not None]
        if not found:
            continue
        rows = np.frombuffer(b"".join(rows for _, rows in found), np.uint8).reshape(len(found), h, w + 1)
        try:
            levels.update(zip((i for i, _ in found), png.unfilter(rows)))
        except ValueError:  # a bad filter byte somewhere: PIL names each file's error
            pass
    return levels


def decode_bytes(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Decode one file's bytes. Raises DecodeError with a kind: empty, not_image, too_large, truncated, corrupt."""
    img = open_image(data, max_pixels)
    try:
        levels = lean_levels(img)
        if levels is None:
            return prepare_image(img, size)
        return prepare_one(levels, size)
    except Exception as e:
        raise decode_error(e) from None


def decode_bytes_full(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """decode_bytes without the lean path: any file through to_grayscale and prepare_gray (the reference
    the lean path is checked against)."""
    img = open_image(data, max_pixels)
    try:
        return prepare_image(img, size)
    except Exception as e:
        raise decode_error(e) from None
