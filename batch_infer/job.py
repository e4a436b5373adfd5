"""`predict` end to end: stream the listing in chunks, skip what a previous run committed, let workers
predict and commit each chunk's shard, then write run.json and the summary.

The driver never holds the listing or a row: it holds the chunks queued for workers (a few per
worker), one record per committed chunk (resume) and running counts. Workers read, decode, predict
and write (batch_infer/worker.py); small local jobs run the same worker in this process instead of
starting Ray (batch_infer/dispatch.py), so their output is the same.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

from batch_infer.chunks import chunked
from batch_infer.discover import check_inputs, count_ahead, iter_files
from batch_infer.dispatch import pool_size, run_in_process, run_on_ray
from batch_infer.manifest import Manifest, manifest_chunks, read_manifest
from batch_infer.options import PredictOptions
from batch_infer.plan import Plan
from batch_infer.progress import RunProgress
from batch_infer.worker import ChunkTask, ChunkWorker, JobSpec
from kmnist_core import out_lock, predictions, storage
from kmnist_core.arrow_memory import lean_arrow
from kmnist_core.errors import Interrupted, KmnistError
from kmnist_core.model_dir import load_for_run
from kmnist_core.policy import DecisionPolicy
from kmnist_core.precision import ModelBundle
from kmnist_core.predictor import Predictor
from kmnist_core.run_record import RunRecord, new_run_id, now_iso
from kmnist_core.storage import Location
from reviews import report_set
from reviews.report import write_report_set

# Up to this many files, a job with no Ray cluster to join runs in this process: starting Ray and its
# workers costs seconds, which a small job never wins back (docs/benchmarks.md, "small jobs").
LOCAL_MAX_FILES = 20_000
LOCAL_THREADS = os.cpu_count() or 1  # an in-process run's model threads: the whole machine


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
                    precision: str) -> dict[str, predictions.ChunkRecord]:
    """Check OUT's committed shards against --resume / --overwrite and the model; returns the chunks they
    hold, for resume to skip. Deletes nothing: --overwrite replaces the old shards at the first commit."""
    if not metas or opts.overwrite:
        return {}
    if not opts.resume:
        raise KmnistError(f"{out.uri} already holds predictions ({len(metas)} shards); "
                          f"pass --resume to finish that run or --overwrite to start again")
    predictions.refuse_other_schema(out, metas, "writes")
    runs = predictions.run_metadata(metas)[0]
    previous = {run.get("model_id") for run in runs}
    if previous - {model_id}:
        raise KmnistError(f"{out.uri} was written by model {', '.join(sorted(previous))}, not {model_id}; "
                          f"resume with the same model or use --overwrite")
    # int8 and fp32 share a model_id but not every row's figures: one OUT, one precision.
    precisions = {run.get("precision", "fp32") for run in runs}
    if precisions - {precision}:
        raise KmnistError(f"{out.uri} was predicted at precision {', '.join(sorted(precisions))}, this run would use "
                          f"{precision}; resume with --precision {sorted(precisions)[0]} or use --overwrite")
    return predictions.chunk_records(metas)


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
    """One line saying what went wrong, in the user's terms (for errors `user_facing` accepts)."""
    cause = getattr(error, "cause", None)  # a worker's exception, as Ray hands it back
    if isinstance(cause, BaseException):
        error = cause
    if isinstance(error, OSError):  # OUT is full, read-only, gone
        where = f" {error.filename if isinstance(error.filename, str) else os.fsdecode(error.filename)}" if error.filename else f" to {out.uri}"
        return f"cannot write{where}: {error.strerror or error}"
    return str(error)


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


def run_tasks(executor: str, tasks: Iterable[ChunkTask], checked: Checked, job: JobSpec,
              opts: PredictOptions, after_first: Callable[[], None] | None) -> Iterator[dict]:
    bundle, warm = checked.bundle, checked.take_predictor()
    if executor == "local":
        make = lambda: ChunkWorker(bundle, job, threads=LOCAL_THREADS, predictor=warm)  # noqa: E731
        return run_in_process(make, tasks, after_first)
    del warm  # a Ray run's driver predicts nothing: its ONNX Runtime sessions (~50 MB) go
    from kmnist_core.ray_runtime import init_ray

    ray, _ = init_ray(opts.address)
    workers = opts.workers or pool_size(ray, opts.cpus_per_worker, opts.gpus_per_worker)
    return run_on_ray(ray, bundle, job, tasks, workers, opts.cpus_per_worker, opts.gpus_per_worker,
                      after_first=after_first)


def start_info(record: RunRecord, opts: PredictOptions, executor: str, plan: Plan, skipped: Counter) -> dict:
    """What the start line names. A local run has its whole listing in hand (choose_executor read it
    ahead); on Ray the listing is still streaming, so the file count comes later (RunProgress.listed)."""
    listed = executor == "local"
    info = record.progress_start(plan.files_listed if listed else None, {k: v for k, v in skipped.items() if v},
                                 plan.already_done if listed else None)
    if executor == "ray":
        from kmnist_core.ray_runtime import init_ray

        ray, where = init_ray(opts.address)  # run_tasks reuses this Ray
        info.update(asdict(where), workers=opts.workers or pool_size(ray, opts.cpus_per_worker, opts.gpus_per_worker))
    else:
        info.update(workers=1)  # no Ray address: the start line says the run is in this process
    return info


def reporting_listing(tasks: Iterator[ChunkTask], plan: Plan, skipped: Counter, progress: RunProgress) -> Iterator[ChunkTask]:
    """The tasks, passed on as the workers take them, telling `progress` how much of the listing is in
    so far and, once it ends, the run's total."""
    for task in tasks:
        progress.listing(plan.files_to_predict + plan.rows_to_reread)
        yield task
    progress.listed(plan.files_to_predict + plan.rows_to_reread, skipped, plan.already_done)


@dataclass(frozen=True)
class Checked:
    """A run as `prepare` checked it, before OUT is touched."""

    inputs: list[str]  # folders, files or URIs; a manifest run's: where its paths are relative to
    out: Location
    opts: PredictOptions
    manifest: Manifest | None
    bundle: ModelBundle  # the model every worker loads
    policy: DecisionPolicy  # what every row is decided with: decided here (the int8 probe ran on this CPU)
    started: float  # perf_counter() when the run began
    warm: list[Predictor] = field(default_factory=list)  # the predictor that decided `policy`: take_predictor

    def take_predictor(self) -> Predictor | None:
        """The CPU predictor `prepare` built (sessions warm, probe run): an in-process run predicts with it
        rather than building and probing another; taken once, so a Ray run's driver can let it go."""
        return self.warm.pop() if self.warm else None


@dataclass
class Run:
    """A run holding OUT: what it started from and what it has done so far."""

    checked: Checked
    opts: PredictOptions  # the checked options, with what --resume takes from the run it finishes
    record: RunRecord  # what run.json, every shard's footer and the progress record's start say
    job: JobSpec
    plan: Plan
    previous: dict[str, predictions.ChunkRecord]  # chunks committed before this run
    metas: dict  # OUT's shard footers when the run began
    replacing: bool  # --overwrite with earlier output present
    tally: Tally
    skipped: Counter
    after_first: Callable[[], None] | None = None  # --overwrite: swaps the new output in after the first commit
    old_output_kept: bool = False  # --overwrite before its swap: what a failure's message may promise


def prepare(inputs: list[str | Path], out: str | Path, opts: PredictOptions) -> Checked:
    """Check options, inputs (or the manifest), OUT and the model; touches nothing."""
    opts.validate()
    model_request = opts.model_request()  # which model, precision, device and thresholds
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
    # Fail here, before OUT or Ray, on a bad model; and decide the run's policy once, on this CPU.
    bundle, predictor = load_for_run(model_request, threads=LOCAL_THREADS)
    warm = [predictor] if bundle.device == "cpu" else []
    return Checked(inputs, out_loc, opts, manifest, bundle, predictor.policy, started, warm)


def resumed_options(opts: PredictOptions, metas: dict) -> PredictOptions:
    """--resume cuts the listing as the first run did, so its committed chunks are recognized by id (and
    their error rows can be re-read), and writes the page exports it asked for (rebuilt from all rows)."""
    earlier = predictions.run_metadata(metas)[0][-1]["options"]
    return replace(opts, rows_per_shard=earlier["rows_per_shard"],
                   export=opts.export or tuple(earlier.get("export") or ()))


def open_run(checked: Checked, run_id: str, killed_holder: dict | None, on_chunk: Callable[[dict], None] | None,
             progress: RunProgress | None) -> Run:
    """With OUT locked: recover from a killed run, check OUT's earlier output against this run, and
    record what this run starts from."""
    out, card, opts = checked.out, checked.bundle.card, checked.opts
    predictions.recover(out)
    metas = predictions.footers(out)
    replacing = opts.overwrite and bool(metas or storage.exists(predictions.predictions_dir(out)))
    previous = previous_chunks(out, metas, opts, card.model_id, checked.policy.used)
    if previous:
        opts = resumed_options(opts, metas)
    if not replacing:
        storage.make_dirs(predictions.predictions_dir(out))
    inputs = [storage.resolve(i).uri if storage.is_uri(i) else os.fsdecode(os.path.abspath(i)) for i in checked.inputs]
    record = RunRecord.begin(run_id, card, checked.policy, inputs, out.uri, opts, killed_holder)
    job = JobSpec(out=out.uri, run_id=run_id, policy=checked.policy, read_retries=opts.read_retries,
                  retry_backoff_s=opts.retry_backoff_s, batch_size=opts.batch_size, metadata=record.footer())
    return Run(checked, opts, record, job, Plan(out, previous, opts.retry_errors), previous, metas, replacing,
               Tally(on_chunk, progress.chunk_done if progress else None), Counter(), old_output_kept=replacing)


def listing_tasks(run: Run, progress: RunProgress | None, stop_counting: threading.Event) -> tuple[str, Iterator[ChunkTask]]:
    """The chunk tasks still to do, and where they run; starts the progress lines."""
    checked, opts, plan = run.checked, run.opts, run.plan
    chunks = (manifest_chunks(checked.manifest, opts.rows_per_shard) if checked.manifest
              else chunked(iter_files(checked.inputs, run.skipped), opts.rows_per_shard))
    executor, tasks = choose_executor(opts, plan.tasks(chunks))
    if progress:
        progress.start(start_info(run.record, opts, executor, plan, run.skipped))
        tasks = reporting_listing(tasks, plan, run.skipped, progress)
        if executor == "ray":  # the listing streams: estimate the total from a count run ahead
            done_before = sum(r.rows - plan.rereads(r) for r in run.previous.values())
            if checked.manifest:
                progress.counted(checked.manifest.rows.num_rows, done_before)
            else:
                count_ahead(checked.inputs, lambda n: progress.counted(n, done_before), stop_counting)
    return executor, tasks


def stage_overwrite(run: Run, tasks: Iterator[ChunkTask]) -> Iterator[ChunkTask]:
    """--overwrite: the first chunk is committed aside (locally), and only then replaces the old output; a
    run that fails before its first commit leaves the earlier predictions as they were."""
    # The report describes the old rows: it is withdrawn with them. reviews/ is people's work and never
    # goes (final.py folds it over the new rows).
    out = run.checked.out

    def swap(old: list[str]) -> None:
        predictions.swap_in(out, run.record.run_id, old)
        report_set.withdraw(out)

    first = next(tasks, None)
    if first is None:  # nothing to predict: the old output still goes
        swap(list(run.metas))
        run.old_output_kept = False
        return iter(())
    if out.local:
        first = staged(first, predictions.staging_dir(out, run.record.run_id))
    old = [n for n in run.metas if n != predictions.shard_name(first.chunk_id)]
    run.after_first = lambda: swap(old)
    return itertools.chain([first], tasks)


def execute(run: Run, progress: RunProgress | None, stop_counting: threading.Event) -> dict:
    """Predict and commit every chunk still to do; returns the run's end figures."""
    checked, plan, tally = run.checked, run.plan, run.tally
    run.record.write_running(checked.out)
    executor, tasks = listing_tasks(run, progress, stop_counting)
    if run.replacing:
        tasks = stage_overwrite(run, tasks)
    phases = {"prepare": time.perf_counter() - checked.started}  # checks, model, lock, earlier output
    loop_started = time.perf_counter()
    for stats in run_tasks(executor, tasks, checked, run.job, run.opts, run.after_first):
        if not tally.chunks:  # Ray start-up and the first chunk (the listing streams meanwhile)
            phases["first_chunk"] = time.perf_counter() - loop_started
        tally.add(stats)
    phases["chunks"] = time.perf_counter() - loop_started
    if (tally.rows_written, tally.rows_replaced) != (plan.files_to_predict, plan.rows_to_reread):
        raise KmnistError(f"workers committed {tally.rows_written} new and {tally.rows_replaced} re-read rows, "
                          f"expected {plan.files_to_predict} and {plan.rows_to_reread}")
    elapsed = time.perf_counter() - checked.started
    rows = tally.rows_written + tally.rows_replaced
    return {"executor": executor,
            "discovery": {"files": plan.files_listed, "skipped": {k: v for k, v in sorted(run.skipped.items()) if v}},
            "already_done": plan.already_done, "error_rows_reread": plan.rows_to_reread,
            "rows_written": tally.rows_written, "rows_replaced": tally.rows_replaced,
            "chunks_committed": tally.chunks, "elapsed_s": round(elapsed, 3),
            "crops_per_s": round(rows / elapsed, 1) if elapsed and rows else None,
            "finished": now_iso(), "phases_s": phases}


def reviews_kept(report: dict, run_id: str) -> dict | None:
    """What this run did to rows people had decided (their decisions are kept); None when nobody decided any."""
    reviews = report["reviews"]
    if not reviews["decisions"]:
        return None
    return {"decisions": reviews["decisions"], "decided_rows": reviews["decided_rows"],
            "predicted_again": reviews["predicted_again_by_run"].get(run_id, 0),
            "made_on_another_model": reviews["made_on_another_model"]}


def finalize(run: Run, figures: dict, progress: RunProgress | None) -> dict:
    """Record the completed run, then write its summary and page outputs from every row in OUT."""
    out, record = run.checked.out, run.record
    phases = figures.pop("phases_s")
    predictions.write_run_record(out, record.listing_record(figures["discovery"], figures["finished"]))
    record.write_completed(out, figures)
    if progress:
        progress.finish("completed")
    report_started = time.perf_counter()
    report = write_report_set(out, run.opts.export)
    phases["report"] = time.perf_counter() - report_started
    reviews = reviews_kept(report, record.run_id)
    if reviews:
        figures["reviews"] = reviews
    figures["phases_s"] = {k: round(v, 3) for k, v in phases.items()}
    record.write_completed(out, figures)
    return {**record.completed(figures), "report": report}


def user_facing(error: BaseException) -> bool:
    """An end the user can act on (bad input, a full or read-only OUT, a lost cluster), as opposed to a bug."""
    cause = getattr(error, "cause", None)  # a worker's exception, as Ray hands it back
    error = cause if isinstance(cause, BaseException) else error
    return isinstance(error, (KmnistError, OSError, KeyboardInterrupt))


def record_failure(run: Run, error: BaseException, progress: RunProgress | None, completed: bool) -> None:
    """Record how the run ended in run.json, then raise: a user's error as one line (KmnistError or
    Interrupted), a bug as itself, with its traceback. `completed`: every row was committed, and what
    failed is the summary written after them."""
    interrupted = isinstance(error, KeyboardInterrupt)
    bug = not user_facing(error)
    if interrupted:
        reason = "interrupted (Ctrl-C or SIGTERM)"
    elif bug:
        first = (str(error).strip().splitlines() or [""])[0]
        reason = f"internal error (a bug in kmnist-batch): {type(error).__name__}: {first}"
    else:
        reason = failure_reason(error, run.checked.out)
    committed = run.tally.rows_written + run.tally.rows_replaced
    if completed:
        reason = f"every row was committed, then writing the summary failed: {reason}"
    if progress:
        progress.finish("interrupted" if interrupted else "failed", reason)
    run.record.write_end(run.checked.out, "interrupted" if interrupted else "failed", reason, committed,
                         traceback.format_exc())
    if bug:
        raise error
    if completed:
        kept = "every row is in OUT; `kmnist-batch report OUT` writes the summary again"
    elif run.old_output_kept and not run.tally.chunks:  # stopped before the swap, even before the first listing
        kept = "the earlier predictions in OUT are untouched; run again with --overwrite"
    else:
        kept = f"{committed:,} rows committed by this run are kept; run again with --resume to finish"
    raise (Interrupted if interrupted else KmnistError)(f"{reason}; {kept}") from None


def run_predict(inputs: list[str | Path], out: str | Path, opts: PredictOptions,
                on_chunk: Callable[[dict], None] | None = None, progress: RunProgress | None = None) -> dict:
    """Predict every image under `inputs` (folders, files or object-store prefixes), or every row of
    `opts.manifest`, into `out`, then write OUT/summary/ (and, for boxes on pages, the page outputs:
    reviews/pages_out.py).

    Everything is checked (options, inputs, the model, OUT and its lock, earlier output) before anything
    is written; on failure or Ctrl-C, run.json says why and every committed shard stays: a user's error
    is raised as one line (KmnistError), a bug as itself. `progress` prints the start line and the
    periodic lines and keeps OUT/_progress.json (batch_infer/progress.py). Returns the run summary (also
    in OUT/run.json), with the report's figures under "report".
    """
    checked = prepare(inputs, out, opts)
    lean_arrow()
    make_out(checked.out)
    run_id = new_run_id()
    with out_lock.hold(checked.out, run_id) as killed_holder:
        run = open_run(checked, run_id, killed_holder, on_chunk, progress)
        stop_counting = threading.Event()
        try:  # from here on, any end is recorded in run.json
            figures = execute(run, progress, stop_counting)
        except BaseException as e:
            record_failure(run, e, progress, completed=False)
        finally:
            stop_counting.set()
        try:
            return finalize(run, figures, progress)
        except BaseException as e:
            record_failure(run, e, progress, completed=True)
