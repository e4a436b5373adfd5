"""Tile images for the review app: a row's crop as its file holds it with the ink box the model read
(the review sheet's drawing, larger), and for a box on a page the page with that box marked."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from kmnist_core.schema import BOX_KEY
from reviews.sheet import open_as_shown, thumbnail

CROP_PX = 160  # longer side of a tile's crop
PAGE_PX = 1400  # longer side of a page as shown


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def crop_png(row: dict) -> bytes:
    """The tile image of a row as the queue reads it (a grey square when the file cannot be read)."""
    return png(thumbnail(row, CROP_PX))


def page_png(row: dict) -> bytes | None:
    """The page of a box row, at most PAGE_PX, with the box in blue and the ink the model read in red;
    None for a row that is not a box on a page, or whose page cannot be read."""
    box = BOX_KEY.match(row["path_bytes"])
    if not box:
        return None
    img = open_as_shown(box[1])
    if img is None:
        return None
    scale = min(1.0, PAGE_PX / max(img.size))
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(img)
    x, y, w, h = (int(v) * scale for v in box.groups()[1:])
    width = max(2, round(3 * img.width / 1000))
    draw.rectangle([x - width, y - width, x + w + width, y + h + width], outline=(30, 90, 220), width=width)
    if row.get("ink_x") is not None:
        ix, iy, iw, ih = (float(row[k]) * scale for k in ("ink_x", "ink_y", "ink_w", "ink_h"))
        draw.rectangle([ix, iy, ix + iw - 1, iy + ih - 1], outline=(220, 30, 30))
    return png(img)
