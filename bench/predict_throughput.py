"""Steady-state crops/s of `predict` (chunk workers on Ray) against a plain single-process loop, same model,
same files.

Steady state = (N_large - N_small) / (t_large - t_small) over the two largest sizes: fixed costs (Ray
start, actor start, torch import) cancel out. (A small first size makes this noisy: a second's jitter in
start-up moves a 2k-file run's time by half.) Both are measured in this run, on this machine, and printed as a ratio; the
figures are appended to docs/benchmarks.md with --record.

    .venv/bin/python bench/predict_throughput.py [--sizes 5000,50000] [--executor ray] [--record]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.record import append_row  # noqa: E402
from collections import Counter  # noqa: E402

from batch_infer.discover import iter_files  # noqa: E402
from batch_infer.job import PredictOptions, run_predict  # noqa: E402
from kmnist_core.datasets import load_dataset  # noqa: E402
from kmnist_core.model_dir import load_model  # noqa: E402
from kmnist_core.preprocess import decode_bytes  # noqa: E402


def make_tree(root: Path, n: int) -> None:
    images = load_dataset("kmnist-dev").test.images
    for i in range(n):
        p = root / f"{i // 1000:04d}" / f"{i:07d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i % len(images)]).save(p)


def plain_loop(root: Path, model: str, batch_size: int = 1024) -> int:
    """The baseline: list files, read + decode with PIL, batched torch forward, in one process."""
    predictor = load_model(model)
    files = [f.path_bytes for f in iter_files([str(root)], Counter())]
    predicted = 0
    for start in range(0, len(files), batch_size):
        pixels = []
        for path in files[start : start + batch_size]:
            with open(path, "rb") as f:
                pixels.append(decode_bytes(f.read(), predictor.input_size).pixels)
        predicted += len(predictor.probabilities(np.stack(pixels)))
    return predicted


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5000,50000", help="file counts; the two largest give the steady state")
    parser.add_argument("--model", default="default")
    parser.add_argument("--workers", type=int, default=0, help="0: as many as the cores allow")
    parser.add_argument("--executor", default="ray", help="ray (the pipeline measured), local or auto")
    parser.add_argument("--record", action="store_true", help="append the result to docs/benchmarks.md")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(2)

    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="kmnist-bench-"))
    rows = []
    try:
        for n in sizes:
            make_tree(work / f"in-{n}", n)
            plain = timed(lambda: plain_loop(work / f"in-{n}", args.model))
            out = work / f"out-{n}"
            opts = PredictOptions(model=args.model, workers=args.workers, executor=args.executor)
            ray_t = timed(lambda: run_predict([work / f"in-{n}"], out, opts))
            rows.append((n, plain, ray_t))
            print(f"{n:>7} files: plain loop {plain:6.2f} s ({n / plain:7.0f}/s end to end), "
                  f"predict {ray_t:6.2f} s ({n / ray_t:7.0f}/s end to end)", flush=True)
            shutil.rmtree(work / f"in-{n}")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    for (na, pa_, ra), (nb, pb, rb) in zip(rows, rows[1:]):
        print(f"steady state {na}->{nb}: plain loop {(nb - na) / (pb - pa_):,.0f} crops/s, "
              f"predict {(nb - na) / (rb - ra):,.0f} crops/s")
    (n1, p1, r1), (n2, p2, r2) = rows[-2], rows[-1]
    plain_rate, ray_rate = (n2 - n1) / (p2 - p1), (n2 - n1) / (r2 - r1)
    ratio = ray_rate / plain_rate
    print(f"steady state {n1}->{n2}: ratio predict / plain loop {ratio:.2f}x")
    if args.record:
        append_row("predict throughput", [
            f"{args.model}, {args.executor}, {args.workers or 'auto'} worker(s)", f"{n1:,}→{n2:,}", f"{plain_rate:,.0f}", f"{ray_rate:,.0f}",
            f"**{ratio:.2f}×**", " / ".join(f"{n:,}: {n / r:,.0f}" for n, _, r in rows)])


if __name__ == "__main__":
    main()
