"""How `predict` scales: N crop files (hard links to 2,000 real kmnist-dev PNGs: cheap on inodes and disk),
end-to-end crops/s, the driver's peak memory (VmHWM, summary included), each Ray chunk worker's peak
memory and each phase's time; and the wall time of a small job (the 300 example crops through the CLI,
median of 3).

The driver runs in its own process, so its VmHWM is the peak of the process that lists, dispatches and
writes the summary. The chunk workers' peaks are read from /proc (VmHWM of every `ray::RayChunkWorker`
process, polled while the run lasts; the last reading before a worker ends is its peak). Each size's tree
is deleted after its run.

    .venv/bin/python bench/scale.py [--sizes 100000,1000000] [--small-runs 3] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.record import append_row  # noqa: E402

DRIVER = """
import json, sys
from batch_infer.job import PredictOptions, run_predict
summary = run_predict([sys.argv[1]], sys.argv[2], PredictOptions(executor=sys.argv[3]))
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"rows": summary["report"]["files_seen"], "duplicates": summary["report"]["duplicate_paths"],
                  "elapsed_s": summary["elapsed_s"], "phases_s": summary["phases_s"], "executor": summary["executor"],
                  "vmhwm_mb": int(status["VmHWM"].split()[0]) / 1024}))
"""


def sources(folder: Path) -> list[Path]:
    from kmnist_core.datasets import load_dataset

    d = load_dataset("kmnist-dev")
    images = np.concatenate([d.val.images, d.test.images])
    folder.mkdir(parents=True)
    paths = []
    for i, img in enumerate(images):
        paths.append(folder / f"{i:04d}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


def link_tree(root: Path, n: int, srcs: list[Path], per_folder: int = 1000) -> float:
    started = time.perf_counter()
    for i in range(n):
        if i % per_folder == 0:
            (root / f"{i // per_folder:07d}").mkdir(parents=True)
        os.link(srcs[i % len(srcs)], root / f"{i // per_folder:07d}" / f"{i:08d}.png")
    return time.perf_counter() - started


def chunk_worker_pids() -> list[int]:
    """Every live Ray chunk worker process on this machine."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"RayChunkWorker" in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue  # ended meanwhile
    return pids


def worker_peaks_mb(peaks: dict[int, float], pids: list[int]) -> None:
    """Update `peaks` (pid -> MB) with the VmHWM of each of these Ray chunk workers still alive."""
    for pid in pids:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
            peaks[pid] = int(fields["VmHWM"].split()[0]) / 1024
        except (OSError, KeyError, ValueError):
            continue


def run_driver(tree: Path, out: Path, executor: str, watch: Callable[[], None] | None = None) -> dict:
    """The driver in its own process; its figures, with each chunk worker's peak RSS. `watch` is also called
    every 0.2 s while it runs (bench/profile_split.py attaches py-spy to new workers)."""
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tree), str(out), executor], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, float] = {}
    pids: list[int] = []
    polls = 0
    while proc.poll() is None:
        if polls % 10 == 0:  # looking for workers reads every process's cmdline: every 2 s, not to compete with the run
            pids = chunk_worker_pids()
        worker_peaks_mb(peaks, pids)
        if watch is not None:
            watch()
        time.sleep(0.2)
        polls += 1
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise SystemExit(stderr[-3000:])
    return {**json.loads(stdout.strip().splitlines()[-1]), "worker_peaks_mb": sorted(peaks.values())}


def small_job(runs: int, work: Path) -> tuple[float, list[float], dict]:
    cli = Path(sys.executable).parent / "kmnist-batch"
    walls = []
    for i in range(runs):
        started = time.perf_counter()
        subprocess.run([str(cli), "predict", str(REPO / "examples" / "crops"), "--out", str(work / "small"),
                        "--overwrite"], check=True, capture_output=True)
        walls.append(time.perf_counter() - started)
    run = json.loads((work / "small" / "run.json").read_text())
    return statistics.median(walls), walls, run["phases_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--executor", default="auto", help="auto, local or ray (PredictOptions.executor)")
    parser.add_argument("--small-runs", type=int, default=3, help="0: no small job")
    parser.add_argument("--files-per-folder", type=int, default=1000,
                        help="crops per top folder (the summary keeps a row per top folder)")
    parser.add_argument("--record", action="store_true", help="append the results to docs/benchmarks.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kmnist-scale-"))
    try:
        if args.small_runs:
            median, walls, phases = small_job(args.small_runs, work)
            print(f"small job (300 crops, CLI): median {median:.2f} s of {', '.join(f'{w:.2f}' for w in walls)}; "
                  f"phases of the last: {phases}", flush=True)
            if args.record:
                append_row("small job", [f"{median:.2f} s", ", ".join(f"{w:.2f}" for w in walls),
                                         ", ".join(f"{k} {v:.2f} s" for k, v in phases.items())])
        srcs = sources(work / "src")
        results = []
        for n in (int(s) for s in args.sizes.split(",") if s):
            tree = work / f"in-{n}"
            link_s = link_tree(tree, n, srcs, args.files_per_folder)
            r = run_driver(tree, work / f"out-{n}", args.executor)
            results.append((n, r))
            rate = r["rows"] / r["elapsed_s"]
            workers = ", ".join(f"{w:,.0f}" for w in r["worker_peaks_mb"]) or "none (in process)"
            print(f"{n:>9,} files in {-(-n // args.files_per_folder):,} folders (linked in {link_s:.0f} s): {r['rows']:,} rows, {r['duplicates']} duplicates, "
                  f"{rate:,.0f} crops/s end to end ({r['executor']}), driver peak RSS {r['vmhwm_mb']:,.0f} MB, "
                  f"chunk workers' peak RSS {workers} MB, phases {r['phases_s']}", flush=True)
            if args.record:
                folders = "" if args.files_per_folder == 1000 else f" in {-(-n // args.files_per_folder):,} folders"
                append_row("scale", [f"{n:,}{folders}", f"{r['rows']:,}", r["executor"], f"{rate:,.0f}", f"{r['vmhwm_mb']:,.0f} MB",
                                     f"{workers} MB", ", ".join(f"{k} {v:.1f} s" for k, v in r["phases_s"].items())])
            shutil.rmtree(tree)
            shutil.rmtree(work / f"out-{n}")
        if len(results) > 1:
            (n1, a), (n2, b) = results[0], results[-1]
            print(f"{n1:,} -> {n2:,}: driver memory growth {b['vmhwm_mb'] / a['vmhwm_mb'] - 1:+.1%}, "
                  f"crops/s {b['rows'] / b['elapsed_s'] / (a['rows'] / a['elapsed_s']):.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
