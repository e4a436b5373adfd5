"""`predict` end to end: stream the listing in chunks, skip what a previous run committed, let workers
predict and commit each chunk's shard, then write run.json and the summary.

The driver never holds the listing or a row: it holds the chunks queued for workers (a few per
worker), one record per committed chunk (resume) and running counts. Workers read, decode, predict
and write (batch_infer/worker.py); small local jobs run the same worker in this process instead of
starting Ray (batch_infer/dispatch.py), so their output is the same.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

from batch_infer import out_lock, output
from batch_infer.chunks import chunked
from batch_infer.discover import check_inputs, count_ahead, iter_files
from batch_infer.dispatch import pool_size, run_in_process, run_on_ray
from batch_infer.manifest import Manifest, manifest_chunks, read_manifest
from batch_infer.pages_out import write_pages
from batch_infer.plan import Plan
from batch_infer.progress import RunProgress
from batch_infer.report import SUMMARY_DIR, write_report
from batch_infer.schema import SCHEMA_VERSION
from batch_infer.worker import ChunkTask, ChunkWorker, JobSpec
from kmnist_core import storage
from kmnist_core.errors import Interrupted, KmnistError
from kmnist_core.files import json_text
from kmnist_core.model_dir import build_predictor, read_int8_files, read_model_files
from kmnist_core.ray_runtime import endpoints
from kmnist_core.storage import Location

RUN_FILE = "run.json"
# Up to this many files, a job with no Ray cluster to join runs in this process: starting Ray and its
# workers costs seconds, which a small job never wins back (docs/benchmarks.md, "small jobs").
LOCAL_MAX_FILES = 20_000
EXECUTORS = ("auto", "local", "ray")
PRECISIONS = ("auto", "fp32", "int8")
EXPORTS = ("alto",)


@dataclass
class PredictOptions:
    model: str = "default"
    address: str | None = None  # None: RAY_ADDRESS if set, else a local Ray started for the job
    executor: str = "auto"  # auto: in this process when small and no cluster is given, else Ray
    precision: str = "auto"  # auto: int8 (ONNX Runtime) on CPU where the model passed its int8 check, else fp32
    batch_size: int = 1024
    workers: int = 0  # Ray workers; 0 = as many as the cluster has room for
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    review_below: float | None = None  # None: the model card's threshold
    resume: bool = False
    overwrite: bool = False
    retry_errors: bool = False  # with --resume: re-read every error row, not only the transient kinds
    read_retries: int = 2  # extra reads of a file failing with a transient kind, inside the run
    retry_backoff_s: float = 0.5  # wait before the first extra read; doubles each time
    rows_per_shard: int = 4096  # files per listing chunk (one shard each), on average
    manifest: str | None = None  # a CSV/Parquet manifest instead of input folders (batch_infer/manifest.py)
    pages: str | None = None  # with a Kaggle-format manifest: the folder holding the page images
    export: tuple[str, ...] = ()  # page exports beyond pages.parquet: "alto"

    def validate(self) -> None:
        if self.resume and self.overwrite:
            raise KmnistError("--resume and --overwrite contradict each other; pick one")
        if self.retry_errors and not self.resume:
            raise KmnistError("--retry-errors re-reads the error rows of an earlier run; use it with --resume")
        if self.batch_size < 1 or self.workers < 0 or self.rows_per_shard < 1:
            raise KmnistError("--batch-size and --rows-per-shard must be >= 1, --workers >= 0")
        if self.review_below is not None and not 0 <= self.review_below <= 1:
            raise KmnistError("--review-below must be a probability between 0 and 1")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise KmnistError("--cpus-per-worker must be > 0 and --gpus-per-worker >= 0")
        if self.read_retries < 0 or self.retry_backoff_s < 0:
            raise KmnistError("--read-retries and --retry-backoff must be >= 0")
        if self.precision not in PRECISIONS:
            raise KmnistError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.executor not in EXECUTORS:
            raise KmnistError(f"--executor must be one of {', '.join(EXECUTORS)}")
        if set(self.export) - set(EXPORTS):
            raise KmnistError(f"--export takes {', '.join(EXPORTS)}, got {', '.join(sorted(set(self.export) - set(EXPORTS)))}")
        if self.export and not self.manifest:
            raise KmnistError("--export writes page files: it needs a --manifest of boxes on pages")
        if self.pages and not self.manifest:
            raise KmnistError("--pages names where a Kaggle-format --manifest's page images are")


def check_out(out: Location) -> None:
    """OUT can be a folder: checked before anything is created or touched."""
    if out.local and os.path.exists(out.path) and not os.path.isdir(out.path):
        raise KmnistError(f"--out {out.uri} is a file, not a folder")
    out_lock.refuse_if_busy(out)


def make_out(out: Location) -> None:
    try:
        storage.make_dirs(out)
    except OSError as e:
        raise KmnistError(f"cannot create --out {out.uri}: {e.strerror or e}") from None


def previous_chunks(out: Location, metas: dict, opts: PredictOptions, model_id: str,
                    precision: str) -> dict[str, output.ChunkRecord]:
    """Check OUT's committed shards against --resume / --overwrite and the model; returns the chunks they
    hold, for resume to skip. Deletes nothing: --overwrite replaces the old shards at the first commit."""
    if not metas or opts.overwrite:
        return {}
    if not opts.resume:
        raise KmnistError(f"{out.uri} already holds predictions ({len(metas)} shards); "
                          f"pass --resume to finish that run or --overwrite to start again")
    output.refuse_other_schema(out, metas, "writes")
    runs = output.run_metadata(metas)[0]
    previous = {run.get("model_id") for run in runs}
    if previous - {model_id}:
        raise KmnistError(f"{out.uri} was written by model {', '.join(sorted(previous))}, not {model_id}; "
                          f"resume with the same model or use --overwrite")
    # int8 and fp32 share a model_id but not every row's figures: one OUT, one precision.
    precisions = {run.get("precision", "fp32") for run in runs}
    if precisions - {precision}:
        raise KmnistError(f"{out.uri} was predicted at precision {', '.join(sorted(precisions))}, this run would use "
                          f"{precision}; resume with --precision {sorted(precisions)[0]} or use --overwrite")
    return output.chunk_records(metas)


def ray_requested(opts: PredictOptions) -> bool:
    """A cluster was named, or this process already runs Ray (a notebook, a test, `ray job submit`)."""
    ray = sys.modules.get("ray")
    return bool(opts.address or os.environ.get("RAY_ADDRESS") or (ray and ray.is_initialized()))


def choose_executor(opts: PredictOptions, tasks: Iterator[ChunkTask]) -> tuple[str, Iterator[ChunkTask]]:
    """`auto`: read ahead up to LOCAL_MAX_FILES files of work; if the listing ends first, run here."""
    if opts.executor == "ray" or (opts.executor == "auto" and ray_requested(opts)):
        return "ray", tasks
    if opts.executor == "local":
        return "local", tasks
    ahead, files = [], 0
    for task in tasks:
        ahead.append(task)
        files += task.listing.num_rows
        if files > LOCAL_MAX_FILES:
            return "ray", itertools.chain(ahead, tasks)
    return "local", iter(ahead)


def failure_reason(error: BaseException, out: Location) -> str:
    """One line saying what went wrong, in the user's terms."""
    cause = getattr(error, "cause", None)  # a worker's exception, as Ray hands it back
    if isinstance(cause, BaseException):
        error = cause
    if isinstance(error, KmnistError):
        return str(error)
    if isinstance(error, OSError):  # OUT is full, read-only, gone
        where = f" {error.filename if isinstance(error.filename, str) else os.fsdecode(error.filename)}" if error.filename else f" to {out.uri}"
        return f"cannot write{where}: {error.strerror or error}"
    first = (str(error).strip().splitlines() or [""])[0]
    return f"the prediction workers failed: {type(error).__name__}: {first}"


def write_run_file(out: Location, record: dict) -> None:
    storage.write_bytes_atomic(out.join(RUN_FILE), json_text(record).encode("utf-8"))


def end_run(out: Location, record: dict) -> None:
    """Best effort: on a full disk even run.json may not be writable, and the error line still tells."""
    try:
        write_run_file(out, record)
    except OSError:
        pass


class Tally:
    """Running counts of committed chunks: what the driver keeps instead of rows."""

    def __init__(self, *on_chunk: Callable[[dict], None] | None):
        self.rows_written = self.rows_replaced = self.chunks = 0
        self.errors_by_kind: Counter = Counter()
        self.review_by_reason: Counter = Counter()
        self.nodes: Counter = Counter()
        self.on_chunk = [hook for hook in on_chunk if hook]

    def add(self, stats: dict) -> None:
        self.chunks += 1
        self.rows_written += stats["rows"]
        self.rows_replaced += stats["replaced"]
        self.errors_by_kind.update(stats["errors_by_kind"])
        self.review_by_reason.update(stats["review_by_reason"])
        for hook in self.on_chunk:
            hook(stats)


def staged(task: ChunkTask, folder: Location) -> ChunkTask:
    os.makedirs(folder.path, exist_ok=True)
    return ChunkTask(task.chunk_id, task.first, task.last, task.listing, folder=folder.path)


def run_tasks(executor: str, tasks: Iterable[ChunkTask], card: dict, weights: bytes, job: JobSpec,
              opts: PredictOptions, after_first: Callable[[], None] | None, precision: str,
              int8: bytes | None) -> Iterator[dict]:
    if executor == "local":
        make = lambda: ChunkWorker(card, weights, job, threads=os.cpu_count() or 1, precision=precision, int8=int8)  # noqa: E731
        return run_in_process(make, tasks, after_first)
    from kmnist_core.ray_runtime import init_ray

    ray = init_ray(opts.address)
    workers = opts.workers or pool_size(ray, opts.cpus_per_worker, opts.gpus_per_worker)
    return run_on_ray(ray, card, weights, job, tasks, workers, opts.cpus_per_worker, opts.gpus_per_worker,
                      precision, int8, after_first=after_first)


def start_info(run_meta: dict, card: dict, opts: PredictOptions, executor: str, plan: Plan, skipped: Counter) -> dict:
    """What the start line names. A local run has its whole listing in hand (choose_executor read it
    ahead); on Ray the listing is still streaming, so the file count comes later (RunProgress.listed)."""
    listed = executor == "local"
    info = {"run_id": run_meta["run_id"], "inputs": run_meta["inputs"], "files": plan.files_listed if listed else None,
            "skipped": {k: v for k, v in skipped.items() if v}, "already_done": plan.already_done if listed else None,
            "model_id": card["model_id"], "precision": run_meta["precision"], "review_below": run_meta["review_below"],
            "ood_threshold": run_meta["ood_threshold"], "out": run_meta["out"],
            "options": run_meta["options"]}
    if executor == "ray":
        from kmnist_core.ray_runtime import init_ray

        ray = init_ray(opts.address)  # run_tasks reuses this Ray
        info.update(endpoints(), workers=opts.workers or pool_size(ray, opts.cpus_per_worker, opts.gpus_per_worker))
    else:
        info.update(ray_address="not used (a small job: runs in this process)", workers=1)
    return info


def reporting_listing(tasks: Iterator[ChunkTask], plan: Plan, skipped: Counter, progress: RunProgress) -> Iterator[ChunkTask]:
    """The tasks, passed on as the workers take them, telling `progress` how much of the listing is in
    so far and, once it ends, the run's total."""
    for task in tasks:
        progress.listing(plan.files_to_predict + plan.rows_to_reread)
        yield task
    progress.listed(plan.files_to_predict + plan.rows_to_reread, skipped, plan.already_done)


def run_predict(inputs: list[str | Path], out: str | Path, opts: PredictOptions,
                on_chunk: Callable[[dict], None] | None = None, progress: RunProgress | None = None) -> dict:
    """Predict every image under `inputs` (folders, files or object-store prefixes), or every row of
    `opts.manifest`, into `out`, then write OUT/summary/ (and, for boxes on pages, the page outputs:
    batch_infer/pages_out.py).

    Everything is checked (options, inputs, the model, OUT and its lock, earlier output) before anything
    is written; on failure or Ctrl-C, run.json says why and every committed shard stays. `progress`
    prints the start line and the periodic lines and keeps OUT/_progress.json (batch_infer/progress.py).
    Returns the run summary (also in OUT/run.json), with the report's figures under "report".
    """
    opts.validate()
    started = time.perf_counter()
    inputs = [os.fspath(i) for i in inputs]
    out_loc = storage.resolve(out)
    manifest: Manifest | None = None
    if opts.manifest:
        if inputs:
            raise KmnistError("give either input folders or --manifest, not both")
        manifest = read_manifest(opts.manifest, opts.pages)  # read and checked before OUT is touched
        if opts.export and not manifest.boxes:
            raise KmnistError("--export writes page files: the manifest lists crop files, not boxes on pages "
                              "(x, y, width, height)")
        inputs = [manifest.source]
    elif not inputs:
        raise KmnistError("nothing to predict: give input folders or --manifest FILE")
    else:
        check_inputs(inputs)
    check_out(out_loc)
    card, weights = read_model_files(opts.model)
    device = "cuda" if opts.gpus_per_worker > 0 else "cpu"
    precision, card, int8 = read_int8_files(opts.model, card, weights, opts.precision, device)
    # Fail here, before OUT or Ray, on a bad model; int8 brings its own calibration (refitted on its logits).
    check = build_predictor(card, weights, source=opts.model, precision=precision, int8=int8)
    make_out(out_loc)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    with out_lock.hold(out_loc, run_id) as killed_holder:
        review_below = opts.review_below if opts.review_below is not None else check.review_below
        output.recover(out_loc)
        metas = output.footers(out_loc)
        replacing = opts.overwrite and bool(metas or storage.exists(output.predictions_dir(out_loc)))
        previous = previous_chunks(out_loc, metas, opts, card["model_id"], precision)
        if previous:
            # Chunk boundaries depend on the chunk size: resume cuts the listing as the first run did,
            # so its committed chunks are recognized by id (and their error rows can be re-read).
            earlier_options = output.run_metadata(metas)[0][-1]["options"]
            opts.rows_per_shard = earlier_options["rows_per_shard"]
            # ... and writes the page exports the first run asked for (they are rebuilt from all rows).
            opts.export = opts.export or tuple(earlier_options.get("export") or ())
        if not replacing:
            storage.make_dirs(output.predictions_dir(out_loc))
        run_meta = {"run_id": run_id, "schema_version": SCHEMA_VERSION, "model_id": card["model_id"], "precision": precision,
                    "inputs": [storage.resolve(i).uri if storage.is_uri(i) else os.fsdecode(os.path.abspath(i)) for i in inputs],
                    "out": out_loc.uri, "options": asdict(opts), "review_below": review_below,
                    "ood_threshold": check.ood_threshold,
                    "took_over_lock_from": killed_holder,
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        job = JobSpec(out=out_loc.uri, run_id=run_id, review_below=review_below, read_retries=opts.read_retries,
                      retry_backoff_s=opts.retry_backoff_s, batch_size=opts.batch_size, metadata={
                          "kmnist_batch.schema_version": SCHEMA_VERSION,
                          "kmnist_batch.run": json.dumps(run_meta, ensure_ascii=False),
                          "kmnist_batch.model_card": json.dumps(card, ensure_ascii=False)})
        skipped: Counter = Counter()
        plan = Plan(out_loc, previous, opts.retry_errors)
        tally = Tally(on_chunk, progress.chunk_done if progress else None)
        after_first = None
        stop_counting = threading.Event()
        try:  # from here on, any end is recorded in run.json
            write_run_file(out_loc, {**run_meta, "status": "running", "model_card": card})
            chunks = (manifest_chunks(manifest, opts.rows_per_shard) if manifest
                      else chunked(iter_files(inputs, skipped), opts.rows_per_shard))
            tasks = plan.tasks(chunks)
            executor, tasks = choose_executor(opts, tasks)
            if progress:
                progress.start(start_info(run_meta, card, opts, executor, plan, skipped))
                tasks = reporting_listing(tasks, plan, skipped, progress)
                if executor == "ray":  # the listing streams: estimate the total from a count run ahead
                    done_before = sum(r.rows - plan.rereads(r) for r in previous.values())
                    if manifest:
                        progress.counted(manifest.rows.num_rows, done_before)
                    else:
                        count_ahead(inputs, lambda n: progress.counted(n, done_before), stop_counting)
            if replacing:
                # --overwrite: the first chunk is committed aside (locally), and only then replaces the old
                # output; a run that fails before its first commit leaves the earlier predictions as they were.
                first = next(tasks, None)
                if first is not None:
                    if out_loc.local:
                        first = staged(first, output.staging_dir(out_loc, run_id))
                    tasks = itertools.chain([first], tasks)
                    old = [n for n in metas if n != output.shard_name(first.chunk_id)]
                    after_first = lambda: output.swap_in(out_loc, run_id, old, stale=(out_loc.join(SUMMARY_DIR),))  # noqa: E731
                else:  # nothing to predict: the old output still goes
                    output.swap_in(out_loc, run_id, list(metas), stale=(out_loc.join(SUMMARY_DIR),))
            phases = {"prepare": time.perf_counter() - started}  # checks, model, lock, earlier output
            loop_started = time.perf_counter()
            for stats in run_tasks(executor, tasks, card, weights, job, opts, after_first, precision, int8):
                if not tally.chunks:  # Ray start-up and the first chunk (the listing streams meanwhile)
                    phases["first_chunk"] = time.perf_counter() - loop_started
                tally.add(stats)
            phases["chunks"] = time.perf_counter() - loop_started
            if (tally.rows_written, tally.rows_replaced) != (plan.files_to_predict, plan.rows_to_reread):
                raise KmnistError(f"workers committed {tally.rows_written} new and {tally.rows_replaced} re-read rows, "
                                  f"expected {plan.files_to_predict} and {plan.rows_to_reread}")
            elapsed = time.perf_counter() - started
            rows = tally.rows_written + tally.rows_replaced
            discovery = {"files": plan.files_listed, "skipped": {k: v for k, v in sorted(skipped.items()) if v}}
            summary = {**run_meta, "status": "completed", "executor": executor, "discovery": discovery,
                       "already_done": plan.already_done, "error_rows_reread": plan.rows_to_reread,
                       "rows_written": tally.rows_written, "rows_replaced": tally.rows_replaced,
                       "chunks_committed": tally.chunks, "elapsed_s": round(elapsed, 3),
                       "crops_per_s": round(rows / elapsed, 1) if elapsed and rows else None,
                       "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            output.write_run_record(out_loc, {k: summary[k] for k in ("run_id", "model_id", "inputs", "discovery", "finished")})
            write_run_file(out_loc, {**summary, "model_card": card})
            if progress:
                progress.finish("completed")
            report_started = time.perf_counter()
            summary["report"] = write_report(out_loc)
            summary["report"]["pages"] = write_pages(out_loc, opts.export)  # None (and old page files gone) without boxes
            phases["report"] = time.perf_counter() - report_started
            summary["phases_s"] = {k: round(v, 3) for k, v in phases.items()}
            write_run_file(out_loc, {k: v for k, v in summary.items() if k != "report"} | {"model_card": card})
            return summary
        except BaseException as e:
            interrupted = isinstance(e, KeyboardInterrupt)
            reason = "interrupted (Ctrl-C or SIGTERM)" if interrupted else failure_reason(e, out_loc)
            committed = tally.rows_written + tally.rows_replaced
            if progress:
                progress.finish("interrupted" if interrupted else "failed", reason)
            end_run(out_loc, {**run_meta, "status": "interrupted" if interrupted else "failed", "reason": reason,
                              "rows_committed": committed, "detail": traceback.format_exc(),
                              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model_card": card})
            if replacing and after_first is not None and not tally.chunks:
                kept = "the earlier predictions in OUT are untouched; run again with --overwrite"
            else:
                kept = f"{committed:,} rows committed by this run are kept; run again with --resume to finish"
            error = Interrupted if interrupted else KmnistError
            raise error(f"{reason}; {kept}") from None
        finally:
            stop_counting.set()
