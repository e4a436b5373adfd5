"""decode_many on greyscale PNG crops with kmnist_core/png.py's lean reader against PIL's decoder, in the
same run: µs a crop for decode batches of several sizes (a chunk worker decodes --batch-size files at a
time, 1,024 by default). The crops are 2,000 kmnist-dev images saved by PIL (its adaptive filters, Paeth
on ~8 % of rows), repeated to 20,000; best of 3 passes.

    .venv/bin/python bench/decode_png.py [--batches 64,256,1024] [--record]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.record import append_row  # noqa: E402
from kmnist_core import png  # noqa: E402
from kmnist_core.datasets import load_dataset  # noqa: E402
from kmnist_core.preprocess import decode_many  # noqa: E402


def per_crop_us(files: list[bytes], batch: int) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for start in range(0, len(files), batch):
            decode_many(files[start : start + batch], 28)
        best = min(best, time.perf_counter() - started)
    return best / len(files) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="64,256,1024")
    parser.add_argument("--record", action="store_true", help="append the results to docs/benchmarks.md")
    args = parser.parse_args()
    d = load_dataset("kmnist-dev")
    files = []
    for img in np.concatenate([d.val.images, d.test.images]):
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    files *= 10
    lean_min = png.MIN_GROUP
    for batch in (int(b) for b in args.batches.split(",")):
        png.MIN_GROUP = 1  # the lean reader on every batch, whatever its size
        lean = per_crop_us(files, batch)
        png.MIN_GROUP = 10**9  # no group is big enough: PIL decodes every file
        pil = per_crop_us(files, batch)
        png.MIN_GROUP = lean_min
        shipped = per_crop_us(files, batch)
        print(f"batch {batch:>5}: lean reader {lean:5.1f} µs/crop, PIL {pil:5.1f} µs/crop ({pil / lean:.2f}x); "
              f"as shipped (MIN_GROUP {lean_min}) {shipped:5.1f} µs/crop", flush=True)
        if args.record:
            append_row("decode png", [f"{batch:,}", f"{lean:.1f} µs", f"{pil:.1f} µs", f"{pil / lean:.2f}x",
                                      f"{shipped:.1f} µs (MIN_GROUP {lean_min})"])


if __name__ == "__main__":
    main()
