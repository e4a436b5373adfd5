"""The review sheet: the crops that need a human look, grouped by reason, each with its top-3 and path.

PNG pages (`summary/review_sheet-<reason>-<n>.png`) and one HTML page (`summary/review.html`, the same
crops inline, grouped by reason and folder) so a reviewer can scroll a folder's queue in a browser.
Each crop is shown as the file holds it, with the ink box the model read drawn in red. The sheet is a
sample of the queue, not the queue: at most SHEET_LIMIT crops per reason (the most doubtful first); the
full queue is `needs_review` in the Parquet. Only the crops shown are read from disk.
"""

from __future__ import annotations

import base64
import functools
import html
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont, ImageOps

from kmnist_core import storage
from kmnist_core.charts import KANA_FONT
from kmnist_core.review_reasons import REVIEW_REASONS
from kmnist_core.schema import parse_box_key

FONT = KANA_FONT  # IPAexGothic: has the kana
SHEET_LIMIT = 120  # crops per reason on the sheet
PAGE = 30  # crops per PNG page (5 rows of 6)
THUMB = 96  # px, longer side of a crop as shown
REASON_TEXT = {
    "error": "the file could not be read",
    "blank": "no character in the crop",
    "unknown_character": "not one of the model's characters",
    "low_confidence": "the model is unsure",
}


def sheet_order(rows: pa.Table, reason: str, limit: int | None = None) -> pa.Table:
    """Rows of one reason, the most doubtful first (the order the sheet shows them in), the first `limit`
    of them (None: all). A stable sort, ties in the order given; a missing score (null or NaN) last
    either way."""
    key, order = {"unknown_character": ("ood_score", "descending"), "low_confidence": ("confidence", "ascending")}.get(
        reason, ("rel_path", "ascending"))
    score = rows.column(key)
    if pa.types.is_floating(score.type):  # Arrow puts NaN before null: make it one, so ties go by rel_path
        score = pc.if_else(pc.is_nan(score), pa.scalar(None, score.type), score)
    keys = pa.table({"score": score, "rel_path": rows.column("rel_path")})
    order_of = pc.sort_indices(keys, sort_keys=[("score", order), ("rel_path", "ascending")])  # nulls last
    return rows.take(order_of[:limit])


def open_as_shown(key: bytes) -> Image.Image | None:
    """The image file (a local name or an object-store URI) as RGB, EXIF orientation applied; None when
    it cannot be read."""
    try:
        source = io.BytesIO(storage.read_bytes(storage.resolve(key.decode()))) if storage.is_uri(key) else key
        with Image.open(source) as img:
            return ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def thumbnail(row: dict, size: int = THUMB) -> Image.Image:
    """The crop as the file shows it (EXIF applied), at most `size` px, with the ink box in red; a grey
    square for an error row (the file is broken, or gone since the run). Also the review app's tiles."""
    placeholder = Image.new("RGB", (size // 2, size // 2), (235, 235, 235))
    if row["review_reason"] == "error":
        return placeholder
    box = parse_box_key(row["path_bytes"])  # a box on a page (batch_infer/manifest.py): the page, cut to the box
    img = open_as_shown(box[0] if box else row["path_bytes"])
    if img is None:
        return placeholder
    left = top = 0
    if box:
        left, top, w, h = box[1]
        img = img.crop((left, top, left + w, top + h))
    scale = size / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)
    else:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.NEAREST)
    if row.get("ink_x") is not None:
        x, y = (float(row["ink_x"]) - left) * scale, (float(row["ink_y"]) - top) * scale  # a box's ink is in page pixels
        w, h = (float(row[k]) * scale for k in ("ink_w", "ink_h"))
        ImageDraw.Draw(img).rectangle([x, y, x + w - 1, y + h - 1], outline=(220, 30, 30))
    return img


def label(row: dict) -> str:
    """Top-3 with confidences, or what went wrong."""
    if row["review_reason"] == "error":
        return f"error: {row['error_kind']}"
    if row["review_reason"] == "blank":
        return "blank"
    return " ".join(f"{c}{p:.2f}" for c, p in zip(row["topk_chars"], row["topk_confidences"]))


def top_folder(rel_path: str) -> str:
    parts = rel_path.replace("\\", "/").split("/")
    return parts[0] if len(parts) > 1 else "."


def write_review_sheet(sheet: dict[str, pa.Table], totals: dict[str, int], total_rows: int,
                       summary_dir: Path) -> list[Path]:
    """Write the PNG pages and review.html from `sheet` (per reason, the rows to show, most doubtful
    first) and `totals` (rows per reason); returns the files written."""
    for old in summary_dir.glob("review_sheet-*.png"):  # a rerun must not leave pages of an earlier queue
        old.unlink()
    written = []
    sections = []
    for reason in REVIEW_REASONS:
        if reason not in sheet:
            continue
        rows, total = sheet[reason].to_pylist(), totals.get(reason, 0)
        thumbs = [thumbnail(row) for row in rows]
        labels = [label(row) for row in rows]
        paths = [row["rel_path"] for row in rows]
        for page, start in enumerate(range(0, len(rows), PAGE), 1):
            title = (f"Needs review: {reason} ({REASON_TEXT[reason]}) - page {page}, "
                     f"{len(rows)} shown of {total}")
            path = summary_dir / f"review_sheet-{reason}-{page}.png"
            sheet_page(title, thumbs[start : start + PAGE], labels[start : start + PAGE], paths[start : start + PAGE]).save(path)
            written.append(path)
        sections.append(html_section(reason, rows, thumbs, labels, total))
    page = HTML.format(count=sum(totals.values()), total=total_rows, limit=SHEET_LIMIT,
                       body="\n".join(sections) or "<p>Nothing needs review.</p>")
    (summary_dir / "review.html").write_text(page, encoding="utf-8")
    return [*written, summary_dir / "review.html"]


def sheet_page(title: str, thumbs: list[Image.Image], labels: list[str], paths: list[str]) -> Image.Image:
    """One PNG page drawn with PIL (a matplotlib figure per page cost ~2 s), kana in IPAexGothic."""
    cell_w, cell_h, columns = 170, THUMB + 56, 6
    rows = max(1, -(-len(thumbs) // columns))
    page = Image.new("RGB", (cell_w * columns, 40 + cell_h * rows), "white")
    draw = ImageDraw.Draw(page)
    draw.text((10, 10), title, fill="black", font=font(16))
    for i, (thumb, text, path) in enumerate(zip(thumbs, labels, paths)):
        x, y = (i % columns) * cell_w, 40 + (i // columns) * cell_h
        draw.text((x + cell_w // 2, y + 10), text, fill="black", font=font(14), anchor="mm")
        page.paste(thumb, (x + (cell_w - thumb.width) // 2, y + 22 + (THUMB - thumb.height) // 2))
        short = path if len(path) <= 30 else "…" + path[-29:]
        draw.text((x + cell_w // 2, y + 30 + THUMB), short, fill=(60, 60, 60), font=font(10), anchor="mm")
    return page


@functools.cache
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT), size)


def html_section(reason: str, rows: list[dict], thumbs: list[Image.Image], labels: list[str], total: int) -> str:
    folders = {}
    for row, thumb, text in zip(rows, thumbs, labels):
        buf = io.BytesIO()
        thumb.save(buf, "PNG")
        src = base64.b64encode(buf.getvalue()).decode("ascii")
        folders.setdefault((row["input_root"], top_folder(row["rel_path"])), []).append(
            f'<figure><img src="data:image/png;base64,{src}" alt="">'
            f"<figcaption><b>{html.escape(text)}</b><br>{html.escape(row['rel_path'])}</figcaption></figure>")
    parts = [f'<h2 id="{reason}">{reason} — {html.escape(REASON_TEXT[reason])} '
             f"({len(rows)} shown of {total})</h2>"]
    for (root, folder), figures in sorted(folders.items()):
        parts.append(f"<h3>{html.escape(root)} / {html.escape(folder)} ({len(figures)})</h3>")
        parts.append('<div class="crops">' + "".join(figures) + "</div>")
    return "\n".join(parts)


HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kmnist-batch review queue</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.crops {{ display: flex; flex-wrap: wrap; gap: 10px; }}
figure {{ margin: 0; width: 130px; text-align: center; font-size: 11px; overflow-wrap: anywhere; }}
figure img {{ max-width: 96px; max-height: 96px; image-rendering: pixelated; border: 1px solid #ccc; }}
figcaption b {{ font-size: 14px; }}
</style></head><body>
<h1>Review queue</h1>
<p>{count} of {total} crops need review. Shown: at most {limit} per reason, the most doubtful first;
the full queue is the rows with <code>needs_review</code> in the Parquet. Red: the ink box the model read.</p>
{body}
</body></html>
"""
