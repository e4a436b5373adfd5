"""Where a chunk worker's time goes in a large `predict` on Ray: py-spy samples every Ray chunk worker for
the whole run, and each sample is put in the first stage its stack reaches (reading, decoding,
predicting, writing the shard, building rows; the deepest such frame wins, so predicting inside the row
builder counts as predicting), else Ray's own work (waiting for and handing over tasks), else other.
Predicting is split three ways: the int8 pass as is ("predict"), the int8 passes over the unsure crops'
test-time views ("views") and the fp32 recheck near a decision ("fp32", its views included).

    .venv/bin/python bench/profile_split.py --py-spy /path/to/py-spy [--files 1000000] [--record]

py-spy is not a project dependency: `pip install --target /tmp/pyspy py-spy` gives /tmp/pyspy/bin/py-spy.
The tree is N hard links to 2,000 real kmnist-dev PNGs (bench/scale.py), deleted afterwards.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.record import append_row  # noqa: E402
from bench.scale import chunk_worker_pids, link_tree, run_driver, sources  # noqa: E402

# (stage, function, file): a sample belongs to the deepest of these frames in its stack (a stage's own
# helpers, numpy, PIL, ONNX Runtime or Arrow below it count as that stage).
# Within predicting: "views" is the int8 passes over the unsure crops' views, "fp32" the recheck near a
# decision (its own views included), "predict" the rest (the int8 pass as is and the decisions).
STAGES = (("read", "read_files", "stages.py"), ("decode", "decode_files", "stages.py"),
          ("decode", "decode_box_batch", "box_stage.py"), ("predict", "decided_logits", "predictor.py"),
          ("views", "view_rows", "views.py"), ("fp32", "fp32_logits", "predictor.py"),
          ("rows", "__call__", "stages.py"), ("write", "encode_shard", "predictions.py"),
          ("write", "publish", "predictions.py"))
FRAME = re.compile(r"(?P<function>.*) \((?P<file>[^()]*?):\d+\)$")


def stage_of(stack: str) -> str:
    frames = stack.split(";")  # root first
    for frame in reversed(frames):
        m = FRAME.match(frame.strip())
        if m:
            for stage, function, file in STAGES:
                if m["function"].rpartition(".")[2] == function and m["file"].endswith(file):
                    return stage
    return "ray" if any("/ray/" in f for f in frames) else "other"


def split(raw_files: list[Path]) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for raw in raw_files:
        for line in raw.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if stack:
                counts[stage_of(stack)] += int(n)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--py-spy", required=True, help="the py-spy executable")
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--record", action="store_true", help="append the split to docs/benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kmnist-profile-") as tmp:
        tree = Path(tmp, "in")
        link_tree(tree, args.files, sources(Path(tmp, "src")))
        spies: dict[int, tuple[Path, subprocess.Popen]] = {}

        def attach() -> None:  # py-spy on each chunk worker as it starts
            for pid in set(chunk_worker_pids()) - set(spies):
                raw = Path(tmp, f"worker-{pid}.txt")
                spies[pid] = raw, subprocess.Popen([args.py_spy, "record", "--pid", str(pid), "--rate", "50", "--format",
                                                    "raw", "--output", str(raw), "--nonblocking"],
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        run = run_driver(tree, Path(tmp, "out"), "ray", attach)
        for _, spy in spies.values():
            spy.wait(timeout=60)
        counts = split([raw for raw, _ in spies.values() if raw.exists()])
    total = sum(counts.values()) or 1
    stages = dict.fromkeys([stage for stage, _, _ in STAGES] + ["ray", "other"])
    shares = {stage: counts.get(stage, 0) / total for stage in stages}
    text = ", ".join(f"{stage} {share:.0%}" for stage, share in shares.items())
    print(f"{args.files:,} crops on {len(spies)} chunk workers, {total:,} samples at 50 Hz: {text}")
    print(f"the run: {run['rows']:,} rows, {run['rows'] / run['elapsed_s']:,.0f} crops/s end to end under the profiler")
    if args.record:
        append_row("where a chunk worker's time goes", [f"{args.files:,}", str(len(spies)), f"{total:,}", text])


if __name__ == "__main__":
    main()
