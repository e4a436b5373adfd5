"""`kmnist-batch status OUT`: where a predict or tune run stands, from OUT alone (no Ray).

Three records are read: OUT/.lock (batch_infer/out_lock.py), OUT/run.json (predict's own record of
its status and reason) and OUT/_progress.json (kmnist_core/progress.py; predict and tune).

Alive or not:
- local OUT: the lock decides. A live run holds the flock on OUT/.lock; the kernel drops it when the
  process dies, however it dies, while the holder's name stays in the file. So a record that says
  "running" with no lock held is a run that was killed (kill -9, out of memory, a lost machine). The
  probe takes a shared lock for an instant, as `predict` itself does before it starts.
- object-store OUT (s3://...): there is no lock to probe; a run is taken as alive while its
  _progress.json keeps being rewritten: updated within STALE_INTERVALS intervals (and at least
  STALE_MIN_S seconds more than one interval). A run whose record is older is reported interrupted,
  "no progress update for ...": a judgement from the record's age, not proof of death.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import time
from pathlib import Path

from batch_infer.out_lock import LOCK_FILE, read_holder
from kmnist_core.errors import KmnistError
from kmnist_core.locations import is_uri, list_names_at, read_json_at
from kmnist_core.progress import PROGRESS_FILE, counts_text, duration

RUN_FILE = "run.json"
GRID_FILE = "grid.json"
STALE_INTERVALS = 3
STALE_MIN_S = 30.0
# CLI flag and default of each option worth repeating in a resume command (tests check the defaults
# against PredictOptions and GridConfig, which cost a torch import to load here).
PREDICT_FLAGS = {"model": ("--model", "default"), "address": ("--address", None),
                 "batch_size": ("--batch-size", 1024), "workers": ("--workers", 1),
                 "cpus_per_worker": ("--cpus-per-worker", 1.0), "gpus_per_worker": ("--gpus-per-worker", 0.0),
                 "review_below": ("--review-below", None), "rows_per_shard": ("--rows-per-shard", 8192),
                 "read_retries": ("--read-retries", 2), "retry_backoff_s": ("--retry-backoff", 0.5)}
TUNE_FLAGS = {"dataset": ("--dataset", "kmnist-dev"), "model": ("--model", "simple-cnn"),
              "lrs": ("--lr", None), "batch_sizes": ("--batch-size", None), "epochs": ("--epochs", 5),
              "cpus_per_trial": ("--cpus-per-trial", 1.0), "gpus_per_trial": ("--gpus-per-trial", 0.0),
              "scheduler": ("--scheduler", "none"), "augment": ("--augment", "study"), "seed": ("--seed", 0),
              "device": ("--device", "auto"), "data_dir": ("--data-dir", None), "address": ("--address", None),
              "storage": ("--storage", None)}


def probe_lock(out: Path) -> tuple[bool, dict | None]:
    """(is the lock held by a live process, the holder named in the file)."""
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False, None
    try:
        holder = read_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, holder
        return False, holder
    finally:
        os.close(fd)  # releases the probe's shared lock


def stale_after(every_s: float) -> float:
    return max(STALE_INTERVALS * every_s, every_s + STALE_MIN_S)


def option_args(options: dict, flags: dict) -> list[str]:
    args = []
    for name, (flag, default) in flags.items():
        value = options.get(name)
        if value is None or value == default:
            continue
        args += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return args


def predict_resume_command(out: str, record: dict) -> str | None:
    """The command that finishes the run, rebuilt from its record's inputs and options. An --overwrite
    run that never committed a shard left the earlier predictions in place: it is run again as such."""
    inputs, options = record.get("inputs"), record.get("options") or {}
    if not inputs:
        return None
    mode = "--resume"
    if options.get("overwrite"):
        run_id = record.get("run_id") or ""
        if not any(n.startswith(f"part-{run_id}-") for n in list_names_at(out, "predictions", ".parquet")):
            mode = "--overwrite"
    return shlex.join(["kmnist-batch", "predict", *inputs, "--out", out, mode, *option_args(options, PREDICT_FLAGS)])


def tune_resume_command(out: str, record: dict) -> str | None:
    config = (record.get("start") or {}).get("config")
    if not config:
        return None
    return shlex.join(["kmnist-batch", "tune", "--out", out, "--resume", *option_args(config, TUNE_FLAGS)])


def newest(*records: dict | None) -> dict | None:
    """The record of the latest run (run ids start with their UTC start time, so they sort)."""
    present = [r for r in records if r]
    return max(present, key=lambda r: r.get("run_id") or "") if present else None


def run_status(out: str | Path, now: float | None = None) -> dict:
    """The state of the run in `out`: running, completed, failed or interrupted, with its figures."""
    out = str(out)
    now = time.time() if now is None else now
    run = read_json_at(out, RUN_FILE)
    progress = read_json_at(out, PROGRESS_FILE)
    if run is None and progress is None:
        raise KmnistError(f"{out} holds no kmnist-batch run (no {RUN_FILE} or {PROGRESS_FILE})")
    kind = (progress or {}).get("kind") or "predict"
    record = newest(run, progress) if kind == "predict" else progress
    if progress and record is not progress and progress.get("run_id") != record.get("run_id"):
        progress = None  # an earlier run's progress

    age = now - progress["updated_unix"] if progress and progress.get("updated_unix") else None
    if is_uri(out):
        alive = bool(progress) and progress.get("status") == "running" and age is not None \
            and age <= stale_after(float(progress.get("every_s") or 30))
        holder, judged_by = (progress or {}).get("holder"), "record_age"
    else:
        alive, holder = probe_lock(Path(out))
        judged_by = "lock"
        if alive and holder and holder.get("run_id") and holder["run_id"] != record.get("run_id"):
            record, progress = {"run_id": holder["run_id"]}, None  # a new run that has not written its records yet
        holder = holder or (progress or {}).get("holder")

    recorded = record.get("status")
    status = {"out": out, "kind": kind, "run_id": record.get("run_id"), "holder": holder, "alive_judged_by": judged_by,
              "progress": progress, "progress_age_s": round(age, 1) if age is not None else None}
    if alive:
        status["state"] = "running"
    elif recorded in ("completed", "failed", "interrupted"):
        status["state"] = recorded
        status["reason"] = record.get("reason")
    else:  # recorded as running, but nobody holds OUT
        status["state"] = "interrupted"
        who = f" (host {holder.get('host')}, pid {holder.get('pid')})" if holder else ""
        if judged_by == "lock":
            status["reason"] = (f"the run's process{who} ended without recording an end: killed (kill -9, out of "
                                f"memory) or its machine was lost")
        else:
            status["reason"] = (f"no progress update for {duration(age)} (expected every "
                                f"{duration(float(progress.get('every_s') or 30)) if progress else '-'}): the run's "
                                f"process{who} is presumably gone")
    if kind == "predict" and run and run.get("run_id") == status["run_id"]:
        status["summary"] = {k: run.get(k) for k in ("rows_written", "rows_replaced", "rows_committed", "elapsed_s",
                                                     "crops_per_s", "started", "finished") if run.get(k) is not None}
    if kind == "tune" and status["state"] == "completed":
        grid = read_json_at(out, GRID_FILE) or {}
        status["summary"] = {"trials": grid.get("trials"), "by_status": grid.get("by_status"), "best": grid.get("best")}
    if status["state"] in ("failed", "interrupted"):
        if kind == "predict":
            source = run if run and run.get("run_id") == status["run_id"] else (progress or {}).get("start") or {}
            status["resume_command"] = predict_resume_command(out, source)
        else:
            status["resume_command"] = tune_resume_command(out, record)
    return status


def progress_text(p: dict, kind: str) -> list[str]:
    if kind == "tune":
        best = p.get("best") or {}
        best_text = (f"best val {best['val_acc']:.4f} (lr {best['lr']} batch {best['batch_size']})"
                     if best.get("val_acc") is not None else "best val -")
        return [f"trials    {p.get('done', 0)}/{p.get('trials_total', '?')} done, {p.get('running', 0)} running, "
                f"{p.get('pending', 0)} pending, {p.get('errored', 0)} errored; {best_text}; "
                f"ETA {duration(p.get('eta_s'))}"]
    total = p.get("total")
    head = f"{p.get('done', 0):,}/{total:,} ({p.get('percent') or 0:.1f}%)" if total is not None else \
        f"{p.get('done', 0):,}/? (still listing)"
    rate = p.get("rate_interval")
    rates = (f"{rate:,.0f} crops/s last interval, " if rate is not None else "") + \
        (f"{p['rate_overall']:,.0f} overall" if p.get("rate_overall") is not None else "- overall")
    return [f"progress  {head}; {rates}; ETA {duration(p.get('eta_s'))}",
            f"errors    {p.get('errors', 0):,}" + (f" ({counts_text(p['errors_by_kind'])})" if p.get("errors") else ""),
            f"review    {p.get('needs_review', 0):,}" + (f" ({counts_text(p['review_by_reason'])})" if p.get("needs_review") else "")]


def status_text(s: dict) -> str:
    holder = s.get("holder") or {}
    who = f"host {holder.get('host')}, pid {holder.get('pid')}" if holder else "holder unknown"
    lines = [f"{s['out']}: {s['kind']} run {s.get('run_id') or '?'} {s['state'].upper()}"]
    if s["state"] == "running":
        heard = f", updated {duration(s['progress_age_s'])} ago" if s.get("progress_age_s") is not None else ""
        lines[0] += f" ({who}{heard})"
    if s.get("reason"):
        lines.append(f"reason    {s['reason']}")
    summary = s.get("summary") or {}
    if s["state"] == "completed" and s["kind"] == "predict":
        speed = f", {summary['crops_per_s']:,.0f} crops/s" if summary.get("crops_per_s") else ""
        lines.append(f"finished  {summary.get('finished', '-')}: {summary.get('rows_written', 0):,} rows written, "
                     f"{summary.get('rows_replaced', 0):,} replaced, in {duration(summary.get('elapsed_s'))}{speed}")
    if s["state"] == "completed" and s["kind"] == "tune" and summary.get("trials") is not None:
        best = summary.get("best") or {}
        lines.append(f"trials    {summary['trials']}: " + counts_text(summary.get("by_status") or {})
                     + (f"; best (on val) lr {best['lr']} batch {best['batch_size']}: val {best['best_val_acc']:.4f}"
                        if best else ""))
    if s.get("progress"):
        prefix = {"running": "", "completed": "final figures:"}.get(s["state"], f"last record ({s['progress'].get('updated')}):")
        if prefix:
            lines.append(prefix)
        lines += progress_text(s["progress"], s["kind"])
    if summary.get("rows_committed") is not None:
        lines.append(f"committed {summary['rows_committed']:,} rows by this run")
    if s.get("resume_command"):
        lines.append(f"to finish {s['resume_command']}")
    return "\n".join(lines)
