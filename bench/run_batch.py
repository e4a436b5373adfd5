"""Crops per ONNX Runtime call (kmnist_core/ort_model.py RUN_BATCH): what a chunk worker's model step
costs a crop, and its process's peak memory, at each size.

Each size runs in a fresh process on one intra-op thread, as a Ray chunk worker does: the default
model's `Predictor.assess` (int8, the views on unsure crops, the fp32 recheck near a decision) over the
2,000 kmnist-dev validation and test images, five times over, in predict's batches of 1,024; best of 3
passes. The sizes alternate, twice each, so a drift of the host's speed shows as disagreement between
the two runs of one size rather than as a difference between sizes.

    .venv/bin/python bench/run_batch.py [--sizes 32,64,256] [--record]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import arguments, record_flag  # noqa: E402
from bench.record import append_row  # noqa: E402

ONE_SIZE = """
import json, os, resource, sys, time
os.environ["OMP_NUM_THREADS"] = "1"
import numpy as np
from kmnist_core import ort_model
from kmnist_core.datasets import load_dataset
from kmnist_core.model_dir import build_predictor, load_bundle
ort_model.RUN_BATCH = int(sys.argv[1])
d = load_dataset("kmnist-dev")
pixels = np.concatenate([d.val.images, d.test.images] * 5)
predictor = build_predictor(load_bundle("default"), threads=1)
times = []
for _ in range(3):
    started = time.perf_counter()
    for s in range(0, len(pixels), 1024):
        predictor.assess(pixels[s : s + 1024])
    times.append(time.perf_counter() - started)
print(json.dumps({"us_per_crop": min(times) / len(pixels) * 1e6,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def one_size(size: int) -> dict:
    out = subprocess.run([sys.executable, "-c", ONE_SIZE, str(size)], cwd=REPO, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--sizes", default="32,64,256")
    record_flag(parser)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    runs: dict[int, list[dict]] = {size: [] for size in sizes}
    for _ in range(2):
        for size in sizes:
            runs[size].append(one_size(size))
            print(f"RUN_BATCH {size}: {runs[size][-1]['us_per_crop']:.1f} µs a crop, peak {runs[size][-1]['peak_mb']:.0f} MB",
                  flush=True)
    for size in sizes:
        us = [r["us_per_crop"] for r in runs[size]]
        cells = [str(size), " / ".join(f"{u:.1f}" for u in us) + " µs", f"{max(r['peak_mb'] for r in runs[size]):.0f} MB"]
        print(" | ".join(cells))
        if args.record:
            append_row("crops per ONNX Runtime call", cells)


if __name__ == "__main__":
    main()
