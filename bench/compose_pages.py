"""Synthetic page scans composed from real KMNIST characters, with their box manifest: the example pages
in examples/pages/, the reading-order tests and bench/pages_throughput.py.

A page is dark ink on light paper in vertical columns, laid out right to left, top to bottom, with
optional jitter (each character moved by up to a fraction of its size), slant (columns lean by dx/dy)
and uneven columns (each column its own character size). Each character is pasted at a scale and its box
is the pasted square, plus an optional margin, as a segmenter would draw it. Boxes never overlap.

    .venv/bin/python bench/compose_pages.py   # rewrites examples/pages/ (2 pages, manifests)
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PAPER = 236  # grey of the paper
INK = 30  # grey of full-strength ink


@dataclass
class Box:
    x: int
    y: int
    width: int
    height: int
    image: int  # index of the character's image in the images given
    column: int  # true column, 0 = rightmost
    position: int  # true reading position on its page


def compose_page(images: np.ndarray, rng: np.random.Generator, columns: int, per_column: int, size: int = 28,
                 uneven: float = 0.0, jitter: float = 0.0, slant: float = 0.0, margin: int = 0,
                 start: int = 0) -> tuple[np.ndarray, list[Box]]:
    """Paste images[start : start + columns * per_column] (light ink on dark, KMNIST's) onto a page.

    `uneven`: each column's character size is drawn from size * [1, 1 + uneven]; `jitter`: up to this
    share of a character's size at random in x and y; `slant`: dx per dy of every column."""
    sizes = [int(round(size * rng.uniform(1, 1 + uneven))) for _ in range(columns)]
    gap = size // 2
    col_widths = [s + 2 * margin for s in sizes]
    height = int(gap * 2 + per_column * (max(sizes) * (1 + jitter) + 2 * margin + gap))
    width = int(gap * 2 + sum(col_widths) + gap * (columns - 1) + abs(slant) * height + 2 * jitter * max(sizes) * 2)
    page = np.full((height, width), PAPER, np.float32)
    boxes: list[Box] = []
    right = width - gap - (abs(slant) * height if slant > 0 else 0) - jitter * max(sizes) * 2
    for c in range(columns):
        s, cw = sizes[c], col_widths[c]
        left = right - cw
        top = gap
        for k in range(per_column):
            i = start + c * per_column + k
            dx = int(round(rng.uniform(-jitter, jitter) * s + slant * top))
            dy = int(round(rng.uniform(0, jitter) * s))
            bx, by = int(left) + dx, top + dy
            glyph = np.asarray(Image.fromarray(images[i]).resize((s, s), Image.Resampling.BILINEAR), np.float32) / 255
            region = page[by + margin : by + margin + s, bx + margin : bx + margin + s]
            region[:] = PAPER - (PAPER - INK) * glyph
            boxes.append(Box(bx, by, cw, s + 2 * margin, i, c, len(boxes)))
            top = by + s + 2 * margin + gap // 2 + int(rng.integers(0, gap // 2 + 1))
        right = left - gap
    assert all(b.x >= 0 and b.x + b.width <= width and b.y + b.height <= height for b in boxes), "layout overflow"
    return page.round().astype(np.uint8), boxes


def write_examples(out: Path) -> None:
    """Two pages of kmnist-dev *test* characters (never trained on by the default model), a shuffled
    box manifest with id columns, and the same boxes in the Kaggle Kuzushiji `image_id,labels` format."""
    from kmnist_core.datasets import load_dataset

    data = load_dataset("kmnist-dev")
    rng = np.random.default_rng(14)
    out.mkdir(parents=True, exist_ok=True)
    rows, kaggle = [], []
    start = 0
    for p, (columns, per_column) in enumerate([(6, 8), (5, 9)]):
        page, boxes = compose_page(data.test.images, rng, columns, per_column, uneven=0.5, jitter=0.08,
                                   slant=0.03, margin=3, start=start)
        start += columns * per_column
        name = f"page-{p + 1}"
        Image.fromarray(page).save(out / f"{name}.png", optimize=True)
        labels = []
        for b in boxes:
            label = int(data.test.labels[b.image])
            code = data.classes.codepoints[label]
            rows.append({"path": f"{name}.png", "x": b.x, "y": b.y, "width": b.width, "height": b.height,
                         "box_id": f"{name}-{b.position:03d}", "book": "kmnist-dev-demo",
                         "truth": data.classes.chars[label]})
            labels += [code, str(b.x), str(b.y), str(b.width), str(b.height)]
        kaggle.append({"image_id": name, "labels": " ".join(labels)})
    order = rng.permutation(len(rows))  # a manifest in no particular order
    with open(out / "boxes.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[i] for i in order)
    with open(out / "kaggle.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image_id", "labels"])
        writer.writeheader()
        writer.writerows(kaggle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "examples" / "pages")
    write_examples(parser.parse_args().out)


if __name__ == "__main__":
    main()
