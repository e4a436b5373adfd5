"""Page scans: decode a page once, cut each box of a segmenter's manifest from it as a model input, and
put a page's boxes in reading order.

A box is cut from the decoded page and then goes through exactly the normalization a crop file of the
same pixels would (`preprocess.prepare_array`: polarity from the box's border, ink finding, fitting), so a
box and the same crop saved as a file give the same model input, bit for bit.

Polarity is decided per page and checked per box: a page is mostly paper, so its median grey tells
paper from ink reliably, while a box drawn tight round a heavy character can have more ink than paper on
its border. When the box's own border disagrees with the page, the box is padded with the page's paper
grey before it is normalized, so its border is paper again (the padding never counts as ink).

Reading order (`reading_order`), for vertical Japanese text: columns right to left, top to bottom inside a
column. Columns are found from the boxes alone:
1. Slant: each box is linked to the nearest box below it whose centre is within half the wider box's width
   horizontally and whose vertical gap is under 1.5 median box heights; the page's slant is the median
   dx/dy of those links (0 with fewer than 3 links).
2. Each box's centre x is de-slanted (x - slant * y), so a leaning column becomes upright.
3. The de-slanted centres, sorted, are split into columns wherever two neighbours are more than half the
   median box width apart (a column's jitter is far smaller; two columns' centres are about a column
   width apart, whatever the widths of single characters).
4. Columns are numbered right to left (by mean de-slanted centre), boxes inside a column top to bottom by
   centre y.
Not handled: pages with several registers (an upper and a lower block of columns), horizontal text and
interlinear glosses (ruby), which this rule reads as columns of their own.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kmnist_core.preprocess import DEFAULT_MAX_PIXELS, DecodeError, PreparedImage, prepare_array, to_grayscale

PAGE_MAX_PIXELS = 4 * DEFAULT_MAX_PIXELS  # a page scan is larger than any crop; still refused from its header
PLAIN_MODES = frozenset({"1", "L", "RGB", "CMYK", "YCbCr", "LAB", "HSV"})
SLANT_LINK_HEIGHTS = 1.5
COLUMN_GAP_WIDTHS = 0.5


@dataclass(frozen=True)
class Page:
    gray: np.ndarray  # uint8 (H, W), as the file shows it after EXIF orientation
    dark_ink: bool  # dark ink on light paper (the page's median grey is light)
    paper: int  # the page's median grey: the paper

    @property
    def width(self) -> int:
        return int(self.gray.shape[1])

    @property
    def height(self) -> int:
        return int(self.gray.shape[0])


def page_from_gray(gray: np.ndarray) -> Page:
    """A uint8 grey page; polarity from its median (a page is mostly paper)."""
    paper = int(np.median(gray[:: max(1, gray.shape[0] // 256), :: max(1, gray.shape[1] // 256)]))
    return Page(gray, paper > 127, paper)


def decode_page(data: bytes, max_pixels: int = PAGE_MAX_PIXELS) -> Page:
    """Decode one page file's bytes once. Raises DecodeError (empty, not_image, too_large, truncated, corrupt)."""
    if not data:
        raise DecodeError("empty", "file is empty")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise DecodeError("too_large", f"{img.width}x{img.height} pixels exceeds the limit of {max_pixels}")
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in PLAIN_MODES:  # the same grey as to_grayscale gives, without a float copy of the page
            gray = np.asarray(img.convert("L"))
        else:  # 16-bit, palette, alpha: to_grayscale's rules (transparent = paper, ink only in alpha)
            gray = (to_grayscale(img) * 255).round().astype(np.uint8)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not_image", "not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise DecodeError("too_large", str(e)) from None
    except OSError as e:
        kind = "truncated" if "truncated" in str(e).lower() or "end of file" in str(e).lower() else "corrupt"
        raise DecodeError(kind, str(e)) from None
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError, ZeroDivisionError) as e:
        raise DecodeError("corrupt", f"{type(e).__name__}: {e}") from None
    return page_from_gray(gray)


def check_box(page: Page, x: int, y: int, w: int, h: int) -> None:
    """A box must have a size and lie on the page (a segmenter's off-by-one at the edge included: no)."""
    if w is None or h is None or x is None or y is None:
        raise DecodeError("bad_box", "box has a missing coordinate")
    if w < 1 or h < 1:
        raise DecodeError("bad_box", f"box {x},{y} {w}x{h} has no area")
    if x < 0 or y < 0 or x + w > page.width or y + h > page.height:
        raise DecodeError("bad_box", f"box {x},{y} {w}x{h} is not inside the {page.width}x{page.height} page")


def prepare_box(page: Page, x: int, y: int, w: int, h: int, size: int) -> PreparedImage:
    """The model input of one box: the crop-file path on the cut pixels. `width`/`height` are the box's,
    `ink_box` is in page pixels. Raises DecodeError("bad_box") for a box not on the page."""
    x, y, w, h = (int(v) if v is not None else None for v in (x, y, w, h))
    check_box(page, x, y, w, h)
    cut = page.gray[y : y + h, x : x + w]
    img = prepare_array(cut, size)
    pad = 0
    if img.inverted != page.dark_ink:
        # The box's border is more ink than paper: give it a border of the page's paper (see module doc).
        pad = max(2, max(w, h) // 8)
        img = prepare_array(np.pad(cut, pad, constant_values=page.paper), size)
    ink = img.ink_box
    if ink is not None:
        ix, iy, iw, ih = ink  # in the padded cut: back to page pixels, inside the box
        x0, y0 = max(0, ix - pad), max(0, iy - pad)
        x1, y1 = min(w, ix + iw - pad), min(h, iy + ih - pad)
        ink = (x + x0, y + y0, max(1, x1 - x0), max(1, y1 - y0))
    return PreparedImage(img.pixels, w, h, page.dark_ink, ink, img.blank)


def reading_order(x: np.ndarray, y: np.ndarray, w: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(reading_index, column_index) for each box of one page (both from 0), by the rule in the module doc."""
    x, y, w, h = (np.asarray(v, np.float64) for v in (x, y, w, h))
    n = len(x)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cx, cy = x + w / 2, y + h / 2
    med_w, med_h = float(np.median(w)), float(np.median(h))
    slant = page_slant(cx, cy, y, w, h, med_h)
    upright = cx - slant * cy
    order = np.argsort(-upright, kind="stable")  # right to left
    starts = np.flatnonzero(np.diff(-upright[order]) > COLUMN_GAP_WIDTHS * med_w) + 1
    column = np.empty(n, np.int64)
    for i, members in enumerate(np.split(order, starts)):
        column[members] = i
    # Columns right to left by their mean centre (the split above already is, this makes ties explicit).
    means = np.array([upright[column == c].mean() for c in range(column.max() + 1)])
    rank = np.empty_like(column)
    rank[np.argsort(-means, kind="stable")] = np.arange(len(means))
    column = rank[column]
    reading = np.lexsort((x, cy, column))  # column, then top to bottom (x breaks exact ties)
    index = np.empty(n, np.int64)
    index[reading] = np.arange(n)
    return index, column


def page_slant(cx: np.ndarray, cy: np.ndarray, y: np.ndarray, w: np.ndarray, h: np.ndarray, med_h: float) -> float:
    """The page's columns' lean (dx per dy), from each box's nearest neighbour below in its column."""
    slopes = []
    bottom = y + h
    for i in range(len(cx)):
        gap = y - bottom[i]
        near = (np.abs(cx - cx[i]) <= np.maximum(w, w[i]) / 2) & (cy > cy[i]) & (gap < SLANT_LINK_HEIGHTS * med_h)
        if near.any():
            j = np.flatnonzero(near)[np.argmin(cy[near])]
            slopes.append((cx[j] - cx[i]) / (cy[j] - cy[i]))
    return float(np.median(slopes)) if len(slopes) >= 3 else 0.0
