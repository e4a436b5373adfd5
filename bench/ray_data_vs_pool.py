"""The Ray Data stage (batch_infer/ray_data.py) against the CLI's own actor pool, on the same N crop files in
one run on the same machine: end-to-end crops/s, the driver's peak memory, and whether both give the same rows.

- pool: `run_predict` with executor ray (what `kmnist-batch predict` runs on Ray: chunk workers that read,
  decode, predict and commit their own shards; the summary report included, its phase listed);
- ray-data: `ray.data.read_binary_files(DIR, include_paths=True)` -> `predict_dataset` -> `write_predictions`
  (the driver lists every path, actors decode and predict, write tasks commit the shards).

Each runs in its own process with its own local Ray, started inside the timed span (Python's start and the
torch import are outside it for both), so its VmHWM is that driver's peak. The files are hard links to 2,000 real kmnist-dev PNGs (bench/scale.py). Same rows: the
same keys, characters and review reasons, and the largest confidence difference.

    .venv/bin/python bench/ray_data_vs_pool.py [--crops 50000] [--record]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import arguments, record_flag  # noqa: E402
from bench.record import append_row  # noqa: E402
from bench.scale import link_tree, run_driver, sources  # noqa: E402

SECTION = "Ray Data stage against the CLI's pool"
RAY_DATA_DRIVER = """
import json, sys, time
import kmnist_core.model_dir  # torch: the pool's driver has it imported before its clock starts, too
from kmnist_core.ray_runtime import init_ray
started = time.perf_counter()
ray, _ = init_ray()
import ray.data
from batch_infer.ray_data import predict_dataset, write_predictions
ray.data.DataContext.get_current().enable_progress_bars = False
written = write_predictions(predict_dataset(ray.data.read_binary_files(sys.argv[1], include_paths=True)), sys.argv[2])
elapsed = time.perf_counter() - started
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"rows": written["rows"], "elapsed_s": elapsed, "vmhwm_mb": int(status["VmHWM"].split()[0]) / 1024}))
"""
COMPARED = ["path_bytes", "pred_char", "review_reason", "confidence"]


def run_ray_data(tree: Path, out: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", RAY_DATA_DRIVER, str(tree), str(out)], cwd=REPO, capture_output=True,
                       text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def same_rows(a: Path, b: Path) -> str:
    """Both outputs' rows matched by key: differences in characters and review reasons, largest confidence gap."""
    ta, tb = (pq.read_table(p / "predictions", columns=COMPARED).sort_by("path_bytes") for p in (a, b))
    if not ta.column("path_bytes").equals(tb.column("path_bytes")):
        return f"no: {ta.num_rows:,} and {tb.num_rows:,} rows, keys differ"
    differ = lambda name: sum(x != y for x, y in zip(ta.column(name).to_pylist(), tb.column(name).to_pylist()))  # noqa: E731
    chars, reasons = differ("pred_char"), differ("review_reason")
    confidence = lambda t: t.column("confidence").to_numpy(zero_copy_only=False).astype(float)  # noqa: E731
    gap = np.nanmax(np.abs(confidence(ta) - confidence(tb)), initial=0.0)  # NaN: rows without a prediction
    verdict = "yes" if chars == reasons == 0 and gap <= 1e-6 else "no"
    return f"{verdict} ({chars} characters, {reasons} review reasons differ; confidence within {gap:.1e})"


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--crops", type=int, default=50_000)
    record_flag(parser, f"the results ({SECTION})")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kmnist-raydata-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        tree = work / "in"
        link_tree(tree, args.crops, sources(work / "src"))
        pool = run_driver(tree, work / "pool", "ray")
        data = run_ray_data(tree, work / "ray-data")
        same = same_rows(work / "pool", work / "ray-data")
        results = [("pool (predict --executor ray)", pool,
                    "phases " + ", ".join(f"{k} {v:.1f} s" for k, v in pool["phases_s"].items())),
                   ("Ray Data stage (read_binary_files, predict_dataset, write_predictions)", data, "")]
        print(f"{args.crops:,} crops; same rows: {same}")
        print("| path | rows | wall s | crops/s end to end | driver peak RSS | |\n|---|---|---|---|---|---|")
        for name, r, note in results:
            print(f"| {name} | {r['rows']:,} | {r['elapsed_s']:.1f} | {r['rows'] / r['elapsed_s']:,.0f} | "
                  f"{r['vmhwm_mb']:,.0f} MB | {note} |")
            if args.record:
                append_row(SECTION, [f"{args.crops:,}", name, f"{r['elapsed_s']:.1f} s",
                                     f"{r['rows'] / r['elapsed_s']:,.0f}", f"{r['vmhwm_mb']:,.0f} MB", same, note])


if __name__ == "__main__":
    main()
