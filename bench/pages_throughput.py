"""Boxes/s cut from page scans against crops/s read from crop files: the same characters, the same run.

The same N kmnist-dev characters (cycled when N > 8,000) are written twice: as 28x28-ish crop files (each
box's pixels saved as its own PNG, as a segmenter exporting crops would) and as composed pages with a
box manifest (bench/compose_pages.py). Both go through `predict` in this process (executor `local`, so
Ray's start-up does not blur the comparison), alternating, best of `--repeats`. A page is decoded once
for all its boxes, so per character the page path must not be slower.

    flock /tmp/kmnist-bench.lock .venv/bin/python bench/pages_throughput.py --chars 20000 --record
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batch_infer.box_stage import decode_box_batch  # noqa: E402
from batch_infer.chunks import chunked  # noqa: E402
from batch_infer.discover import iter_files  # noqa: E402
from batch_infer.job import PredictOptions, run_predict  # noqa: E402
from batch_infer.manifest import read_manifest  # noqa: E402
from batch_infer.stages import decode_batch  # noqa: E402
from bench.compose_pages import compose_page  # noqa: E402
from bench.record import append_row  # noqa: E402
from kmnist_core.datasets import load_dataset  # noqa: E402

COLUMNS, PER_COLUMN = 10, 10  # 100 boxes per page


def build(root: Path, chars: int) -> tuple[Path, Path]:
    data = load_dataset("kmnist-dev")
    images = np.concatenate([data.test.images, data.val.images, data.train.images])
    images = images[np.arange(chars) % len(images)]
    rng = np.random.default_rng(0)
    (root / "pages").mkdir()
    (root / "crops").mkdir()
    rows = []
    per_page = COLUMNS * PER_COLUMN
    for p in range(0, chars, per_page):
        page, boxes = compose_page(images, rng, COLUMNS, min(PER_COLUMN, (chars - p) // COLUMNS or 1),
                                   uneven=0.5, jitter=0.1, margin=3, start=p)
        name = f"p{p // per_page:05d}.png"
        Image.fromarray(page).save(root / "pages" / name)
        for b in boxes:
            crop = page[b.y : b.y + b.height, b.x : b.x + b.width]
            Image.fromarray(crop).save(root / "crops" / f"{p // per_page:05d}-{b.position:03d}.png")
            rows.append({"path": f"pages/{name}", "x": b.x, "y": b.y, "width": b.width, "height": b.height})
    with open(root / "boxes.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "crops", root / "boxes.csv"


def decode_rates(crops: Path, manifest: Path, repeats: int) -> tuple[float, float]:
    """The read + decode stage alone (no model), crops/s and boxes/s, best of `repeats`, alternating."""
    files = next(chunked(iter_files([str(crops)], Counter()), 10**9)).table()
    rows = read_manifest(str(manifest)).rows
    best_crops = best_boxes = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        decode_batch(files, 28)
        best_crops = min(best_crops, time.perf_counter() - started)
        started = time.perf_counter()
        decode_box_batch(rows, 28)
        best_boxes = min(best_boxes, time.perf_counter() - started)
    return files.num_rows / best_crops, rows.num_rows / best_boxes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="append the result to docs/benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        crops, manifest = build(root, args.chars)
        best = {"crops": float("inf"), "pages": float("inf")}
        for r in range(args.repeats):
            opts = dict(executor="local", overwrite=True)
            s = run_predict([crops], root / "out-crops", PredictOptions(**opts))
            best["crops"] = min(best["crops"], s["phases_s"]["chunks"])
            s = run_predict([], root / "out-pages", PredictOptions(manifest=str(manifest), **opts))
            best["pages"] = min(best["pages"], s["phases_s"]["chunks"])
            rows = s["rows_written"]
        crops_s, boxes_s = args.chars / best["crops"], rows / best["pages"]
        decode_crops, decode_boxes = decode_rates(crops, manifest, args.repeats)
        print(f"{args.chars} characters: crop files {crops_s:,.0f} crops/s, pages {boxes_s:,.0f} boxes/s "
              f"({boxes_s / crops_s:.2f}x); predict loop only (read, decode, predict, commit), best of {args.repeats}")
        print(f"decode stage alone: crop files {decode_crops:,.0f} crops/s, pages {decode_boxes:,.0f} boxes/s "
              f"({decode_boxes / decode_crops:.2f}x)")
        if args.record:
            append_row("boxes on pages", [f"{args.chars:,}", f"{crops_s:,.0f}", f"{boxes_s:,.0f}",
                                          f"{boxes_s / crops_s:.2f}x", f"{decode_crops:,.0f}", f"{decode_boxes:,.0f}",
                                          f"{decode_boxes / decode_crops:.2f}x"])


if __name__ == "__main__":
    main()
