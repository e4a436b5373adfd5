"""`predict` end to end: discover files, skip what a previous run finished, run the Ray Data pipeline,
commit Parquet shards, write run.json and the summary.

Pipeline (measured on 2 cores, shared/STACK.md): the driver lists the files itself; `from_items` blocks
feed a decode stage of lightweight tasks (`num_cpus` < 1 so it never starves) and an actor pool of
predictors. Decode and predict must reserve different CPU amounts or Ray fuses them into one stage.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pyarrow as pa

from batch_infer import output
from batch_infer.discover import discover
from batch_infer.report import write_report
from batch_infer.schema import SCHEMA_VERSION
from kmnist_core.errors import KmnistError
from kmnist_core.model_dir import build_predictor, read_model_files, write_json_atomic
from kmnist_core.ray_runtime import init_ray

if TYPE_CHECKING:
    import ray.data

RUN_FILE = "run.json"


@dataclass
class PredictOptions:
    model: str = "default"
    address: str | None = None  # None: RAY_ADDRESS if set, else a local Ray started for the job
    batch_size: int = 1024
    workers: int = 1  # predictor actors
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    decode_cpus: float = 0.5  # per decode task; halved if equal to cpus_per_worker (see module doc)
    review_below: float | None = None  # None: the model card's threshold
    resume: bool = False
    overwrite: bool = False
    rows_per_shard: int = 8192

    def validate(self) -> None:
        if self.resume and self.overwrite:
            raise KmnistError("--resume and --overwrite contradict each other; pick one")
        if self.batch_size < 1 or self.workers < 1:
            raise KmnistError("--batch-size and --workers must be >= 1")
        if self.review_below is not None and not 0 <= self.review_below <= 1:
            raise KmnistError("--review-below must be a probability between 0 and 1")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise KmnistError("--cpus-per-worker must be > 0 and --gpus-per-worker >= 0")


def prepare_out(out: Path, opts: PredictOptions, model_id: str) -> set[str]:
    """Check OUT against --resume / --overwrite; returns the paths already predicted."""
    existing = output.shard_paths(out)
    if opts.overwrite:
        for sub in (output.PREDICTIONS_DIR, "summary"):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / RUN_FILE).unlink(missing_ok=True)
        return set()
    if existing and not opts.resume:
        raise KmnistError(f"{out} already holds predictions ({len(existing)} shards); "
                          f"pass --resume to finish that run or --overwrite to start again")
    if not existing:
        return set()
    output.remove_partial_shards(out)
    previous = {run.get("model_id") for run in output.shard_metadata(out)[0]}
    if previous - {model_id}:
        raise KmnistError(f"{out} was written by model {', '.join(sorted(previous))}, not {model_id}; "
                          f"resume with the same model or use --overwrite")
    return output.completed_paths(out)


def quiet_ray_data_console() -> None:
    """Ray Data logs each execution to the console at INFO; keep the console to errors (the full log
    stays in the session's ray-data.log) and let the driver draw the only progress bar."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)


def build_dataset(files: list[dict], card: dict, weights: bytes, run_id: str, review_below: float,
                  opts: PredictOptions) -> ray.data.Dataset:
    import ray
    import ray.data

    from batch_infer.stages import PredictorActor, decode_batch

    quiet_ray_data_console()
    blocks = max(8, min(1000, math.ceil(len(files) / 1000)))  # ~1k files per block: small retry unit
    device = "cuda" if opts.gpus_per_worker > 0 else "cpu"
    threads = max(2, int(opts.cpus_per_worker)) if device == "cpu" else 1
    ds = ray.data.from_items(files, override_num_blocks=min(blocks, len(files)))
    decode_cpus = opts.decode_cpus if opts.decode_cpus != opts.cpus_per_worker else opts.decode_cpus / 2
    ds = ds.map_batches(decode_batch, batch_size=256, batch_format="pyarrow", num_cpus=decode_cpus,
                        fn_kwargs={"input_size": int(card["input"]["size"])})
    return ds.map_batches(
        PredictorActor,
        batch_size=opts.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=opts.workers),
        num_cpus=opts.cpus_per_worker,
        num_gpus=opts.gpus_per_worker or None,
        fn_constructor_kwargs={"card": card, "weights_ref": [ray.put(weights)], "run_id": run_id,
                               "review_below": review_below, "device": device, "threads": threads},
    )


def run_predict(inputs: list[str | Path], out: Path, opts: PredictOptions,
                on_rows: Callable[[int, int], None] | None = None) -> dict:
    """Predict every image under `inputs` into `out`, then write OUT/summary/.

    Returns the run summary (also in OUT/run.json), with the report's figures under "report".
    """
    opts.validate()
    started = time.perf_counter()
    card, weights = read_model_files(opts.model)
    build_predictor(card, weights, source=opts.model)  # fail here, before Ray starts, on a bad model
    review_below = opts.review_below if opts.review_below is not None else float(card.get("calibration", {}).get("review_below", 0.5))
    out.mkdir(parents=True, exist_ok=True)
    done = prepare_out(out, opts, card["model_id"])
    found = discover(inputs)
    todo = [f for f in found.files if f["path"] not in done]
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    run_meta = {"run_id": run_id, "schema_version": SCHEMA_VERSION, "model_id": card["model_id"],
                "inputs": [os.path.abspath(i) for i in inputs], "options": asdict(opts),
                "review_below": review_below, "discovery": found.to_dict(),
                "already_done": len(found.files) - len(todo),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(out / RUN_FILE, {**run_meta, "status": "running", "model_card": card})

    writer = output.ShardWriter(out, run_id, run_meta, card, opts.rows_per_shard)
    seen: set[str] = set()
    duplicates = 0
    if todo:
        init_ray(opts.address)
        ds = build_dataset(todo, card, weights, run_id, review_below, opts)
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            paths = table.column("path").to_pylist()
            fresh = [p not in seen for p in paths]
            if not all(fresh):  # a retried block delivered twice: keep the first copy only
                duplicates += fresh.count(False)
                table = table.filter(pa.array(fresh))
            seen.update(paths)
            writer.add(table)
            if on_rows:
                on_rows(len(seen), len(todo))
    writer.flush()
    elapsed = time.perf_counter() - started
    summary = {**run_meta, "status": "completed", "rows_written": writer.rows_written,
               "duplicates_dropped": duplicates, "elapsed_s": round(elapsed, 3),
               "crops_per_s": round(writer.rows_written / elapsed, 1) if elapsed and writer.rows_written else None,
               "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if writer.rows_written != len(todo):
        raise KmnistError(f"pipeline returned {writer.rows_written} rows for {len(todo)} files; "
                          f"run again with --resume to finish")
    write_json_atomic(out / RUN_FILE, {**summary, "model_card": card})
    summary["report"] = write_report(out)
    return summary
