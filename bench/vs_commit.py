"""Steady-state `predict` crops/s of this checkout against an earlier commit, same files, same run.

The earlier commit is checked out in a temporary git worktree and run with the same venv (its code
first on PYTHONPATH), each with its own defaults (model, pipeline, precision; both on Ray), through the
library call both share, `batch_infer.job.run_predict`. Steady state = (N2 - N1) / (t2 - t1), so start-up
cancels out; the two checkouts alternate at each size so drifting load hits both alike, and each time is
the median of `--repeats` runs (a difference of two ~±1 s timings is noisy at these sizes).

    .venv/bin/python bench/vs_commit.py [--baseline af6991a] [--sizes 5000,50000] [--repeats 3] [--review-below X] [--record]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.predict_throughput import make_tree  # noqa: E402
from bench.record import append_row  # noqa: E402

# Both on Ray: a steady state between a run in-process (the small job) and one on Ray would mix two paths.
# An optional third argument is --review-below, for both checkouts.
RUN = ("import sys; from batch_infer.job import PredictOptions, run_predict; "
       "opts = {'executor': 'ray'} if 'executor' in PredictOptions.__dataclass_fields__ else {}; "
       "opts.update({'review_below': float(sys.argv[3])} if len(sys.argv) > 3 else {}); "
       "from pathlib import Path; run_predict([Path(sys.argv[1])], Path(sys.argv[2]), PredictOptions(**opts))")


def timed_run(code: Path, tree: Path, out: Path, review_below: float | None) -> float:
    env = {**os.environ, "PYTHONPATH": str(code)}
    extra = [] if review_below is None else [str(review_below)]
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", RUN, str(tree), str(out), *extra], cwd=code, env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{code}: {r.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="af6991a")
    parser.add_argument("--sizes", default="5000,50000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--review-below", type=float, default=None,
                        help="predict's --review-below for both: a higher one sends more rows near a decision, which "
                             "an int8 run computes in fp32 (the tree's crops were trained on, so they are clearer than "
                             "unseen ones)")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    n1, n2 = (int(s) for s in args.sizes.split(","))
    work = Path(tempfile.mkdtemp(prefix="kmnist-vs-"))
    old = work / "baseline"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.baseline], check=True,
                   capture_output=True)
    try:
        times = {}
        for n in (n1, n2):
            make_tree(work / f"in-{n}", n)
            runs: dict[str, list[float]] = {"baseline": [], "now": []}
            for _ in range(args.repeats):
                for name, code in (("baseline", old), ("now", REPO)):
                    runs[name].append(timed_run(code, work / f"in-{n}", work / f"out-{name}-{n}", args.review_below))
                    shutil.rmtree(work / f"out-{name}-{n}")
            for name, walls in runs.items():
                times[name, n] = statistics.median(walls)
                print(f"{name:>8} {n:>7,} files: median {times[name, n]:6.1f} s of {', '.join(f'{w:.1f}' for w in walls)}",
                      flush=True)
        rate = {name: (n2 - n1) / (times[name, n2] - times[name, n1]) for name in ("baseline", "now")}
        ratio = rate["now"] / rate["baseline"]
        print(f"steady state {n1:,}->{n2:,}: {args.baseline} {rate['baseline']:,.0f} crops/s, now {rate['now']:,.0f} "
              f"crops/s: {ratio:.2f}x")
        if args.record:
            append_row("predict against an earlier commit", [  # medians of --repeats runs
                args.baseline + ("" if args.review_below is None else f" (--review-below {args.review_below})"),
                f"{n1:,}→{n2:,}", f"{rate['baseline']:,.0f}", f"{rate['now']:,.0f}", f"**{ratio:.2f}×**",
                " / ".join(f"{name} {n:,}: {times[name, n]:.1f} s" for (name, n) in times)])
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
