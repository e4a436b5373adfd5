"""The study's grid through Ray Tune against the same trials run one after another in one process.

Same data, same trials, same epochs, this machine, one run: prints both wall times and the ratio
(Tune / sequential; below 1.0 means Tune is faster), and with --record appends to docs/benchmarks.md.
The Tune run's outputs (trials.csv, plots, best/) are kept in --out for the README.

    .venv/bin/python bench/tune_vs_sequential.py [--epochs 2] [--out runs/study-grid] [--record]
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import arguments, record_flag  # noqa: E402
from bench.record import append_row  # noqa: E402
from kmnist_core.datasets import load_dataset  # noqa: E402
from kmnist_core.train import TrainConfig, train_model  # noqa: E402
from tune.grid import run_grid  # noqa: E402
from tune.options import STUDY_BATCH_SIZES, STUDY_LRS, GridConfig  # noqa: E402


def sequential(lrs, batch_sizes, epochs: int) -> float:
    """Every trial in turn in this process, with all cores' threads (the fair single-process baseline)."""
    data = load_dataset("kmnist-dev")
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    for lr in lrs:
        for batch_size in batch_sizes:
            train_model(TrainConfig(lr=lr, batch_size=batch_size, epochs=epochs), data, "cpu")
    return time.perf_counter() - started


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/study-grid"))
    record_flag(parser, "the result")
    args = parser.parse_args()

    seq = sequential(STUDY_LRS, STUDY_BATCH_SIZES, args.epochs)
    print(f"sequential: {seq:.1f} s for {len(STUDY_LRS) * len(STUDY_BATCH_SIZES)} trials", flush=True)
    shutil.rmtree(args.out, ignore_errors=True)
    started = time.perf_counter()
    summary = run_grid(GridConfig(epochs=args.epochs), args.out)  # includes Ray start-up and best/ export
    tuned = time.perf_counter() - started
    print(f"tune: {tuned:.1f} s; ratio tune/sequential {tuned / seq:.2f}x; statuses {summary['by_status']}")
    if args.record:
        trials = f"{len(STUDY_LRS) * len(STUDY_BATCH_SIZES)} trials × {args.epochs} epochs, kmnist-dev 6k/1k/1k"
        append_row("tune grid", [trials, f"{seq:.1f} s", f"{tuned:.1f} s", f"**{tuned / seq:.2f}×**"])


if __name__ == "__main__":
    main()
