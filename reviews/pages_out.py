"""Page outputs of a box-manifest run, from the finished OUT/predictions/ and the review decisions in
OUT/reviews/ alone, written into a report generation (reviews/report_set.py; `kmnist-batch report`
reruns it). Each page is named by its page id (kmnist_core/page_ids.py): its path relative to the
manifest's folder without the extension (`vol1/0001`), or the manifest's `image_id`.

A box's reading: the reviewer's label where the box was decided (the latest decision, as in OUT/final/,
reviews/final.py), else the model's top-1; 〓 for a box with no prediction (an error or a blank)
or one a reviewer found `unreadable`. A box a reviewer found `not_a_character` is left out of the text,
the Kaggle CSV and ALTO.

- `OUT/pages.parquet`: one row per page: `page`, `page_id`, the page-level pass-through columns (those constant
  within every page), `n_boxes`, `n_auto_accepted`, `n_review` (flagged by the model), `n_reviewed`
  (decided by a reviewer), `n_corrected` (decided with another label than the model's), `n_left`
  (flagged and not decided), `n_columns`, `text` (the boxes' readings in reading order,
  kmnist_core/pages.py; boxes with no place in the order, reading_index -1, are left out),
  `text_reviewed` (only what is settled: 〓 wherever a box is flagged and not decided), and with a
  `truth` column `n_truth`, `n_correct`, `accuracy` (the model's top-1 against the truth);
- `OUT/pages_kaggle.csv`: the Kaggle Kuzushiji submission layout, `image_id,labels` with `Unicode X Y` of
  each read box's centre (image_id: the page id), written by the csv module;
- `OUT/alto/<page id>.xml` with `export=("alto",)`: ALTO 4, one `TextBlock` per page, one `TextLine`
  per column (right to left), one `String` per box (`CONTENT`, `HPOS`, `VPOS`, `WIDTH`, `HEIGHT`,
  `WC` = calibrated confidence); a box a reviewer decided carries `CS="true"` (ALTO's correction
  status: checked by a person) and `WC="1.0000"`;
- `OUT/summary/pages/<page id>.png`: for up to OVERLAY_PAGES pages (those with the most boxes left to
  review first), the page with each box coloured by review reason (or as reviewed), its reading beside
  it, and the reading order as a faint line; `OUT/summary/pages.json`: counts, accuracy overall and
  the pages with the most boxes left to review.
Memory: the box rows' few columns for the whole run (tens of bytes per box), the latest decision per
key, one page image at a time.
"""

from __future__ import annotations

import csv
import io
import math
import os
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, ImageOps

from kmnist_core import predictions, storage
from kmnist_core.files import json_text
from kmnist_core.page_ids import page_ids
from kmnist_core.safe_text import csv_cell
from kmnist_core.schema import PAGE_COLUMNS, SCHEMA
from kmnist_core.storage import Location
from reviews import final
from reviews.store import NOT_A_CHARACTER, UNREADABLE

# pandas (~37 MB resident) loads only once there are box rows (box_rows' to_pandas, the functions that
# import it): a crop run's report never imports it.
if TYPE_CHECKING:
    import pandas as pd

PAGES_FILE = "pages.parquet"
KAGGLE_FILE = "pages_kaggle.csv"
ALTO_DIR = "alto"
SUMMARY_DIR = "summary"
OVERLAY_DIR = "pages"  # under summary/
OVERLAY_PAGES = 20
OVERLAY_MAX_SIDE = 2000  # px: larger pages are drawn scaled down ...
OVERLAY_MIN_SIDE = 1000  # ... and smaller ones scaled up, so the characters beside the boxes are legible
GETA = "〓"  # the geta mark: a character that could not (or should not yet) be read
ALTO_NS = "http://www.loc.gov/standards/alto/ns-v4#"
ALTO_SCHEMA = "http://www.loc.gov/standards/alto/v4/alto-4-4.xsd"
NOT_A_CHARACTER_MARK = "×"  # beside a box on the overlay: a reviewer found it is no character
COLOURS = {None: (40, 160, 60), "low_confidence": (240, 150, 0), "unknown_character": (150, 60, 200),
           "blank": (130, 130, 130), "error": (220, 30, 30), "reviewed": (0, 110, 230)}
READ = ["page", "input_root", "box_x", "box_y", "box_w", "box_h", "reading_index", "column_index", "pred_char", "pred_codepoint",
        "confidence", "needs_review", "review_reason"]
OWN = READ + final.FOLDED.names  # the columns the page outputs compute with; the rest are passed through


def box_rows(out: Location, decided: pa.Table) -> pd.DataFrame | None:
    """The box rows' columns the page outputs need, plus the pass-through columns, with `decided` (the
    latest decision per key) folded in; None for a run without boxes."""
    names = predictions.shard_names(out)
    if not names:
        return None
    first = predictions_schema(out, names[0])
    if "page" not in first.names:
        return None
    extra = [n for n in first.names if n not in SCHEMA.names and n not in PAGE_COLUMNS.names]
    tables = [final.fold(t, decided).drop_columns(["path_bytes"])
              for t in predictions.iter_tables(out, ["path_bytes", *READ, *extra])]
    return pa.concat_tables(tables).to_pandas()


def readings(rows: pd.DataFrame) -> pd.Series:
    """Each box's reading (module doc); a not_a_character box's is meaningless: callers leave it out."""
    label = rows["review_label"]
    char = rows["pred_char"].where(rows["pred_char"].notna(), GETA).where(label.isna(), label)
    return char.where(label != UNREADABLE, GETA)


def in_text(rows: pd.DataFrame) -> pd.Series:
    """Boxes the text holds: all but those a reviewer found no character."""
    return rows["review_label"] != NOT_A_CHARACTER


def codepoint(char: str) -> str:
    return f"U+{ord(char):04X}"


def predictions_schema(out: Location, name: str) -> pa.Schema:
    loc = predictions.predictions_dir(out).join(name)
    return pq.read_schema(loc.path, filesystem=loc.fs)


def truth_char(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value) == "":
        return None
    value = str(value)
    return chr(int(value[2:], 16)) if value.upper().startswith("U+") and len(value) > 2 else value


def ids_of(rows: pd.DataFrame) -> dict[str, str]:
    """page -> its id (kmnist_core/page_ids.py), the name of its ALTO file, overlay and Kaggle row."""
    image_ids = rows["image_id"] if "image_id" in rows.columns else None
    return page_ids(rows["page"], rows["input_root"], image_ids)


def page_table(rows: pd.DataFrame, ids: dict[str, str]) -> pd.DataFrame:
    """One row per page (see the module doc)."""
    import pandas as pd

    extra = [c for c in rows.columns if c not in OWN]
    constant = [c for c in extra if rows.groupby("page", sort=False)[c].nunique(dropna=False).max() <= 1]
    records = []
    for page, g in rows.groupby("page", sort=True):
        placed = g[g["reading_index"] >= 0].sort_values("reading_index", kind="stable")
        shown = placed[in_text(placed)]
        decided = g["review_label"].notna()
        rec = {"page": page, "page_id": ids[page], **{c: g[c].iloc[0] for c in constant if c != "page"},
               "n_boxes": len(g), "n_auto_accepted": int((~g["needs_review"]).sum()),
               "n_review": int(g["needs_review"].sum()), "n_reviewed": int(decided.sum()),
               "n_corrected": int((decided & (g["review_label"] != g["pred_char"])).sum()),
               "n_left": int((g["needs_review"] & ~decided).sum()),
               "n_columns": int(placed["column_index"].max() + 1) if len(placed) else 0,
               "text": "".join(readings(shown)),
               "text_reviewed": "".join(shown["final_char"].where(shown["final_char"].notna(), GETA))}
        if "truth" in g.columns:
            truth = g["truth"].map(truth_char)
            known = truth.notna()
            rec["n_truth"] = int(known.sum())
            rec["n_correct"] = int((truth[known] == g["pred_char"][known]).sum())
            rec["accuracy"] = rec["n_correct"] / rec["n_truth"] if rec["n_truth"] else None
        records.append(rec)
    return pd.DataFrame(records)


def kaggle_csv(rows: pd.DataFrame, ids: dict[str, str]) -> str:
    """The Kaggle layout, one row per page, written by the csv module (quoting what needs it)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image_id", "labels"])
    for page, g in rows.groupby("page", sort=True):
        g = g[in_text(g)].sort_values("reading_index", kind="stable")
        chars = readings(g)
        g, chars = g[chars != GETA], chars[chars != GETA]
        codepoints = g["pred_codepoint"].where(g["review_label"].isna(), chars.map(codepoint))
        labels = " ".join(f"{c} {x + w // 2} {y + h // 2}" for c, x, y, w, h in
                          zip(codepoints, g["box_x"], g["box_y"], g["box_w"], g["box_h"]))
        writer.writerow([csv_cell(ids[page]), labels])  # an id is text from the archive: no formula
    return buf.getvalue()


def read_page_image(page: str) -> Image.Image:
    key = page.encode() if storage.is_uri(page) else os.fsencode(page)
    source = io.BytesIO(storage.read_bytes(storage.resolve(page))) if storage.is_uri(key) else key
    img = Image.open(source)
    return ImageOps.exif_transpose(img)


def alto_xml(page: str, g: pd.DataFrame, size: tuple[int, int] | None) -> bytes:
    """One page as ALTO 4 (module doc). `size`: the page's (width, height), None when unreadable."""
    import pandas as pd

    ET.register_namespace("", ALTO_NS)
    ET.register_namespace("xsi", "http://www.w3.org/2001/XMLSchema-instance")
    q = lambda tag: f"{{{ALTO_NS}}}{tag}"  # noqa: E731
    root = ET.Element(q("alto"), {"{http://www.w3.org/2001/XMLSchema-instance}schemaLocation": f"{ALTO_NS} {ALTO_SCHEMA}"})
    desc = ET.SubElement(root, q("Description"))
    ET.SubElement(desc, q("MeasurementUnit")).text = "pixel"
    ET.SubElement(ET.SubElement(desc, q("sourceImageInformation")), q("fileName")).text = page
    processing = ET.SubElement(desc, q("Processing"), {"ID": "kmnist-batch"})
    ET.SubElement(ET.SubElement(processing, q("processingSoftware")), q("softwareName")).text = "kmnist-batch"
    layout = ET.SubElement(root, q("Layout"))
    g = g[g["box_x"].notna() & (g["reading_index"] >= 0) & in_text(g)].sort_values("reading_index", kind="stable")
    g = g.assign(reading=readings(g))
    page_attrs = {"ID": "page_1", "PHYSICAL_IMG_NR": "1"}
    if size:
        page_attrs.update(WIDTH=str(size[0]), HEIGHT=str(size[1]))
    page_el = ET.SubElement(layout, q("Page"), page_attrs)
    if g.empty:  # no box with a place on the page: an empty page
        return ET.tostring(root, encoding="utf-8", xml_declaration=True)
    x0, y0 = int(g["box_x"].min()), int(g["box_y"].min())
    x1, y1 = int((g["box_x"] + g["box_w"]).max()), int((g["box_y"] + g["box_h"]).max())
    box = lambda a, b, c, d: {"HPOS": str(a), "VPOS": str(b), "WIDTH": str(c - a), "HEIGHT": str(d - b)}  # noqa: E731
    space = ET.SubElement(page_el, q("PrintSpace"), box(x0, y0, x1, y1))
    block = ET.SubElement(space, q("TextBlock"), {"ID": "block_1", **box(x0, y0, x1, y1)})
    for col, c in g.groupby("column_index", sort=True):
        cx0, cy0 = int(c["box_x"].min()), int(c["box_y"].min())
        cx1, cy1 = int((c["box_x"] + c["box_w"]).max()), int((c["box_y"] + c["box_h"]).max())
        line = ET.SubElement(block, q("TextLine"), {"ID": f"line_{col + 1}", **box(cx0, cy0, cx1, cy1)})
        for r in c.itertuples():
            reviewed = isinstance(r.review_label, str)
            attrs = {"ID": f"string_{int(r.reading_index) + 1}", "CONTENT": r.reading,
                     "HPOS": str(int(r.box_x)), "VPOS": str(int(r.box_y)), "WIDTH": str(int(r.box_w)),
                     "HEIGHT": str(int(r.box_h)),
                     "WC": "1.0000" if reviewed else f"{float(r.confidence):.4f}" if pd.notna(r.confidence) else "0"}
            if reviewed:
                attrs["CS"] = "true"
            ET.SubElement(line, q("String"), attrs)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def overlay(img: Image.Image, g: pd.DataFrame) -> Image.Image:
    """The page with its boxes coloured by review reason, each box's character to its left, and the
    reading order as a faint line through the box centres."""
    from reviews.sheet import FONT

    scale = min(OVERLAY_MAX_SIDE, max(OVERLAY_MIN_SIDE, max(img.size))) / max(img.size)
    page = img.convert("RGB")
    if scale != 1:
        page = page.resize((round(page.width * scale), round(page.height * scale)), Image.Resampling.LANCZOS)
    g = g[g["box_x"].notna()].sort_values("reading_index", kind="stable")
    chars = readings(g).where(in_text(g), NOT_A_CHARACTER_MARK)
    size = max(10, int(g["box_h"].median() * scale * 0.45)) if len(g) else 10
    font = ImageFont.truetype(str(FONT), size)
    layer = Image.new("RGBA", page.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    centres = [((x + w / 2) * scale, (y + h / 2) * scale) for x, y, w, h in zip(g["box_x"], g["box_y"], g["box_w"], g["box_h"])]
    if len(centres) > 1:
        draw.line(centres, fill=(0, 90, 255, 70), width=max(1, size // 6))
    for r, char in zip(g.itertuples(), chars):
        reason = "reviewed" if isinstance(r.review_label, str) else r.review_reason if isinstance(r.review_reason, str) else None
        colour = COLOURS.get(reason, COLOURS["error"])
        x, y, w, h = (float(v) * scale for v in (r.box_x, r.box_y, r.box_w, r.box_h))
        draw.rectangle([x, y, x + w, y + h], outline=(*colour, 255), width=2)
        draw.text((x - size - 1, y), char, font=font, fill=(*colour, 255))
    return Image.alpha_composite(page.convert("RGBA"), layer).convert("RGB")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def write_pages(out: Location, target: Location, export: tuple[str, ...], decided: pa.Table) -> dict | None:
    """Write the page outputs (module doc) of a box-manifest run into the report folder `target`; None when
    OUT holds no box rows. `decided`: the latest decision per key (store.latest)."""
    rows = box_rows(out, decided)
    if rows is None:
        return None
    ids = ids_of(rows)
    pages = page_table(rows, ids)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(pages, preserve_index=False), buf, compression="zstd")
    storage.write_bytes_atomic(target.join(PAGES_FILE), buf.getvalue())
    storage.write_bytes_atomic(target.join(KAGGLE_FILE), kaggle_csv(rows, ids).encode("utf-8"))
    by_page = dict(tuple(rows.groupby("page", sort=True)))
    drawn = set(pages.sort_values(["n_left", "page"], ascending=[False, True])["page"].head(OVERLAY_PAGES))
    unreadable = 0
    for page, g in by_page.items():
        if page not in drawn and "alto" not in export:
            continue
        try:
            img = read_page_image(page)
        except (OSError, ValueError, Image.DecompressionBombError):
            img = None
            unreadable += 1
        if "alto" in export:
            write_file(target.join(ALTO_DIR), f"{ids[page]}.xml", alto_xml(page, g, img.size if img else None))
        if page in drawn and img is not None:
            write_file(target.join(SUMMARY_DIR, OVERLAY_DIR), f"{ids[page]}.png", png_bytes(overlay(img, g)))
    most = pages.sort_values(["n_left", "page"], ascending=[False, True]).head(10)
    summary = {"pages": len(pages), "boxes": int(pages["n_boxes"].sum()),
               "auto_accepted": int(pages["n_auto_accepted"].sum()), "review": int(pages["n_review"].sum()),
               "reviewed": int(pages["n_reviewed"].sum()), "corrected": int(pages["n_corrected"].sum()),
               "left": int(pages["n_left"].sum()),
               "most_review": [{"page": p, "page_id": ids[p], "n_review": int(n), "n_left": int(left), "n_boxes": int(b)}
                               for p, n, left, b in zip(most["page"], most["n_review"], most["n_left"], most["n_boxes"])],
               "overlays": len(drawn) - unreadable if drawn else 0, "unreadable_pages": unreadable,
               "alto": "alto" in export}
    if "n_truth" in pages.columns:
        n, correct = int(pages["n_truth"].sum()), int(pages["n_correct"].sum())
        summary["accuracy"] = {"boxes_with_truth": n, "correct": correct, "accuracy": correct / n if n else None}
    storage.write_bytes_atomic(target.join(SUMMARY_DIR, "pages.json"), json_text(summary).encode("utf-8"))
    return summary


def write_file(folder: Location, relative: str, data: bytes) -> None:
    """`data` at `folder`/`relative`, a page id's file name (its folders made on a file system)."""
    loc = folder.join(*relative.split("/"))
    if loc.local:
        os.makedirs(os.path.dirname(loc.path), exist_ok=True)
    storage.write_bytes_atomic(loc, data)
