"""`predict` end to end: discover files, skip what a previous run finished, run the Ray Data pipeline,
commit Parquet shards, write run.json and the summary.

Pipeline (measured on 2 cores, shared/STACK.md): the driver lists the files itself; `from_items` blocks
feed a decode stage of lightweight tasks (`num_cpus` < 1 so it never starves) and an actor pool of
predictors. Decode and predict must reserve different CPU amounts or Ray fuses them into one stage.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
import traceback
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from batch_infer import out_lock, output
from batch_infer.discover import discover
from batch_infer.paths import name_text, refuse_url
from batch_infer.progress import RunProgress, chunk_stats
from batch_infer.report import SUMMARY_DIR, write_report
from batch_infer.schema import SCHEMA_VERSION
from batch_infer.stages import TRANSIENT_KINDS
from kmnist_core.errors import Interrupted, KmnistError
from kmnist_core.files import write_json_atomic
from kmnist_core.model_dir import build_predictor, read_model_files
from kmnist_core.ray_runtime import endpoints, init_ray

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
    retry_errors: bool = False  # with --resume: re-read every error row, not only the transient kinds
    read_retries: int = 2  # extra reads of a file failing with a transient kind, inside the run
    retry_backoff_s: float = 0.5  # wait before the first extra read; doubles each time
    rows_per_shard: int = 8192

    def validate(self) -> None:
        if self.resume and self.overwrite:
            raise KmnistError("--resume and --overwrite contradict each other; pick one")
        if self.retry_errors and not self.resume:
            raise KmnistError("--retry-errors re-reads the error rows of an earlier run; use it with --resume")
        if self.batch_size < 1 or self.workers < 1 or self.rows_per_shard < 1:
            raise KmnistError("--batch-size, --workers and --rows-per-shard must be >= 1")
        if self.review_below is not None and not 0 <= self.review_below <= 1:
            raise KmnistError("--review-below must be a probability between 0 and 1")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise KmnistError("--cpus-per-worker must be > 0 and --gpus-per-worker >= 0")
        if self.read_retries < 0 or self.retry_backoff_s < 0:
            raise KmnistError("--read-retries and --retry-backoff must be >= 0")


def check_paths(inputs: list[str | Path], out: Path) -> None:
    """Inputs exist and OUT can be a folder: checked before anything is created or touched."""
    for item in inputs:
        refuse_url(str(item), "input")
        if not os.path.exists(item):
            raise KmnistError(f"input {name_text(os.fsencode(item))} does not exist")
    refuse_url(str(out), "--out")
    if out.exists() and not out.is_dir():
        raise KmnistError(f"--out {out} is a file, not a folder")
    out_lock.refuse_if_busy(out)


def make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KmnistError(f"cannot create --out {out}: {e.strerror}") from None


def previous_output(out: Path, opts: PredictOptions, model_id: str) -> output.Committed:
    """Check OUT's committed shards against --resume / --overwrite and the model; returns what they hold
    that resume may skip. Deletes nothing: --overwrite replaces the old shards at the first commit."""
    shards = output.shard_paths(out)
    if not shards or opts.overwrite:
        return output.Committed()
    if not opts.resume:
        raise KmnistError(f"{out} already holds predictions ({len(shards)} shards); "
                          f"pass --resume to finish that run or --overwrite to start again")
    versions = output.schema_versions(out) - {SCHEMA_VERSION}
    if versions:
        raise KmnistError(f"{out} holds output schema {', '.join(sorted(versions))}; this kmnist-batch writes schema "
                          f"{SCHEMA_VERSION} and cannot add to it: use --overwrite or another --out")
    previous = {run.get("model_id") for run in output.shard_metadata(out)[0]}
    if previous - {model_id}:
        raise KmnistError(f"{out} was written by model {', '.join(sorted(previous))}, not {model_id}; "
                          f"resume with the same model or use --overwrite")
    return output.committed(out)


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
                        fn_kwargs={"input_size": int(card["input"]["size"]), "retries": opts.read_retries,
                                   "backoff_s": opts.retry_backoff_s})
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


def stream_rows(todo: list[dict], card: dict, weights: bytes, run_id: str, review_below: float,
                opts: PredictOptions, writer: output.ShardWriter, rewriter: output.ShardRewriter,
                progress: RunProgress | None) -> int:
    """Run the pipeline and commit its rows; returns how many duplicate rows were dropped."""
    ds = build_dataset(todo, card, weights, run_id, review_below, opts)
    seen: set[bytes] = set()
    duplicates = 0
    batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    try:
        for table in batches:
            keys = table.column("path_bytes").to_pylist()
            fresh = [k not in seen for k in keys]
            if not all(fresh):  # a retried block delivered twice: keep the first copy only
                duplicates += fresh.count(False)
                table = table.filter(pa.array(fresh))
            seen.update(keys)
            writer.add(rewriter.take(table))
            if progress:
                progress.chunk_done(chunk_stats(table))
    finally:
        # Shut Ray Data's executor down here rather than at garbage collection, where a failure of its
        # own (its log file on the same full disk) would print a traceback after the error line.
        with contextlib.suppress(Exception):
            batches.close()
    rewriter.flush()
    writer.close()
    return duplicates


def failure_reason(error: BaseException, out: Path) -> str:
    """One line saying what went wrong, in the user's terms."""
    if isinstance(error, KmnistError):
        return str(error)
    if isinstance(error, OSError):  # the driver only writes during the run: OUT is full, read-only, gone
        where = f" {name_text(os.fsencode(error.filename))}" if error.filename else f" to {out}"
        return f"cannot write{where}: {error.strerror or error}"
    first = (str(error).strip().splitlines() or [""])[0]
    return f"the Ray pipeline failed: {type(error).__name__}: {first}"


def end_run(out: Path, record: dict) -> None:
    """Best effort: on a full disk even run.json may not be writable, and the error line still tells."""
    try:
        write_json_atomic(out / RUN_FILE, record)
    except OSError:
        pass


def run_predict(inputs: list[str | Path], out: str | Path, opts: PredictOptions,
                progress: RunProgress | None = None) -> dict:
    """Predict every image under `inputs` into `out`, then write OUT/summary/.

    Everything is checked (options, inputs, the model, OUT and its lock, earlier output) before anything
    is written; on failure or Ctrl-C, run.json says why and every committed shard stays. `progress`
    prints the start line and the periodic lines and keeps OUT/_progress.json (batch_infer/progress.py).
    Returns the run summary (also in OUT/run.json), with the report's figures under "report".
    """
    opts.validate()
    started = time.perf_counter()
    out = Path(out)
    check_paths(inputs, out)
    card, weights = read_model_files(opts.model)
    build_predictor(card, weights, source=opts.model)  # fail here, before OUT or Ray, on a bad model
    make_out(out)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    with out_lock.hold(out, run_id) as killed_holder:
        review_below = opts.review_below if opts.review_below is not None else float(card.get("calibration", {}).get("review_below", 0.5))
        output.recover(out)
        replacing = opts.overwrite and bool(output.shard_paths(out))
        previous = previous_output(out, opts, card["model_id"])
        found = discover(inputs)
        present = {f["path_bytes"] for f in found.files}
        redo = {key: shard for key, (shard, kind) in previous.errors.items()
                if key in present and (opts.retry_errors or kind in TRANSIENT_KINDS)}
        todo = [f for f in found.files if f["path_bytes"] not in previous.keys or f["path_bytes"] in redo]
        run_meta = {"run_id": run_id, "schema_version": SCHEMA_VERSION, "model_id": card["model_id"],
                    "inputs": [name_text(os.fsencode(os.path.abspath(i))) for i in inputs], "options": asdict(opts),
                    "review_below": review_below, "discovery": found.to_dict(),
                    "already_done": len(found.files) - len(todo), "error_rows_reread": len(redo),
                    "took_over_lock_from": killed_holder,
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        writer = output.ShardWriter(out, run_id, run_meta, card, opts.rows_per_shard, replace_existing=replacing,
                                    stale=(out / SUMMARY_DIR,))
        rewriter = output.ShardRewriter(out, redo)
        try:  # from here on, any end is recorded in run.json
            write_json_atomic(out / RUN_FILE, {**run_meta, "status": "running", "model_card": card})
            if todo:
                init_ray(opts.address)  # before the start line, which names the Ray it runs on
            if progress:
                progress.start({"run_id": run_id, "inputs": run_meta["inputs"], "files": len(found.files),
                                "skipped": dict(found.skipped), "already_done": run_meta["already_done"],
                                "model_id": card["model_id"], "review_below": review_below,
                                "ood_threshold": card.get("calibration", {}).get("ood_threshold"), "out": os.path.abspath(out),
                                **(endpoints() if todo else {"ray_address": "not needed: nothing to do"}),
                                "workers": opts.workers, "options": asdict(opts)})
            duplicates = stream_rows(todo, card, weights, run_id, review_below, opts, writer, rewriter, progress) if todo else 0
            if not todo:
                writer.close()
            rows = writer.rows_written + rewriter.rows_replaced
            if rows != len(todo):
                raise KmnistError(f"pipeline returned {rows} rows for {len(todo)} files")
            elapsed = time.perf_counter() - started
            summary = {**run_meta, "status": "completed", "rows_written": writer.rows_written,
                       "rows_replaced": rewriter.rows_replaced, "duplicates_dropped": duplicates,
                       "elapsed_s": round(elapsed, 3),
                       "crops_per_s": round(rows / elapsed, 1) if elapsed and rows else None,
                       "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            write_json_atomic(out / RUN_FILE, {**summary, "model_card": card})
            if progress:
                progress.finish("completed")
            shutil.rmtree(out / output.STAGING_DIR, ignore_errors=True)
            summary["report"] = write_report(out)
            return summary
        except BaseException as e:
            interrupted = isinstance(e, KeyboardInterrupt)
            reason = "interrupted (Ctrl-C or SIGTERM)" if interrupted else failure_reason(e, out)
            committed = writer.rows_written + rewriter.rows_replaced
            if progress:
                progress.finish("interrupted" if interrupted else "failed", reason)
            end_run(out, {**run_meta, "status": "interrupted" if interrupted else "failed", "reason": reason,
                          "rows_committed": committed, "detail": traceback.format_exc(),
                          "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model_card": card})
            if writer.replace_existing:
                kept = "the earlier predictions in OUT are untouched; run again with --overwrite"
            else:
                kept = f"{committed:,} rows committed by this run are kept; run again with --resume to finish"
            error = Interrupted if interrupted else KmnistError
            raise error(f"{reason}; {kept}") from None
