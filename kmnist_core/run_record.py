"""A run's identity and its records: the one place that says what a run records and reads it back.

Predict feeds it one `RunRecord`, made as the run takes OUT, from which every record of the run is written:
OUT/run.json at the start and at the end (status, reason, figures), every shard's footer, the start of
OUT/_progress.json (the start line's figures) and predictions/_run-<id>.json. The Ray Data stage's footer
starts with the same head (`decided_by`). Tune feeds it its end record, OUT/grid.json (GRID_FILE), and its
progress record (kmnist_core/progress.py).

`status` reads predict and tune runs through `read_state`: which kind of run OUT holds, which run is the
latest, what it recorded (status, reason, figures) and what its resume command is made from.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from kmnist_core import storage
from kmnist_core.errors import KmnistError
from kmnist_core.files import json_text
from kmnist_core.options import option_args
from kmnist_core.progress import PROGRESS_FILE
from kmnist_core.schema import SCHEMA_VERSION, footer
from kmnist_core.storage import Location

if TYPE_CHECKING:
    from kmnist_core.card import ModelCard
    from kmnist_core.policy import DecisionPolicy

RUN_FILE = "run.json"
GRID_FILE = "grid.json"  # a tune run's summary at its end: trials, by status, best
ENDS = ("completed", "failed", "interrupted")  # how a run can end, as its records say
SUMMARY_KEYS = ("rows_written", "rows_replaced", "rows_committed", "elapsed_s", "crops_per_s", "started", "finished")


def new_run_id() -> str:
    """The UTC start time, then a random suffix: run ids sort in the order runs started."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def decided_by(run_id: str, model_id: str, policy: DecisionPolicy) -> dict:
    """The head of every run's record (run.json, the footers): which run, schema and model, and the decision
    policy its rows were decided by (DecisionPolicy.record)."""
    return {"run_id": run_id, "schema_version": SCHEMA_VERSION, "model_id": model_id, **policy.record()}


@dataclass(frozen=True)
class RunRecord:
    """A predict run as it began: what run.json, every shard's footer, the progress record's start and the
    end state are written from, so none of them is rebuilt from another."""

    head: dict  # decided_by: run id, schema version, model id, the decision policy
    inputs: list[str]  # absolute paths or URIs; a manifest run's: where its paths are relative to
    out: str  # OUT's URI
    options: dict  # asdict(PredictOptions), with what --resume took from the run it finishes
    resume_args: list[str]  # the arguments that repeat the options (option_args)
    took_over_lock_from: dict | None  # the holder of a killed run whose lock this run took
    started: str
    model_card: dict  # the card's JSON, as run.json and every footer carry it

    @classmethod
    def begin(cls, run_id: str, card: ModelCard, policy: DecisionPolicy, inputs: list[str], out: str, options: Any,
              took_over_lock_from: dict | None) -> RunRecord:
        """The record of a run starting now; `options` a PredictOptions."""
        return cls(decided_by(run_id, card.model_id, policy), inputs, out, asdict(options), option_args(options),
                   took_over_lock_from, now_iso(), card.raw)

    @property
    def run_id(self) -> str:
        return self.head["run_id"]

    def fields(self) -> dict:
        """run.json's fields as the run began; every shard's footer "run"."""
        return {**self.head, "inputs": self.inputs, "out": self.out, "options": self.options,
                "resume_args": self.resume_args, "took_over_lock_from": self.took_over_lock_from,
                "started": self.started}

    def footer(self) -> dict[bytes, bytes]:
        """Every shard's footer but its chunk (kmnist_core/schema.py footer)."""
        return footer(self.fields(), self.model_card)

    def progress_start(self, files: int | None, skipped: dict, already_done: int | None) -> dict:
        """What the start line names and OUT/_progress.json keeps under "start" (the caller adds where the
        run runs: Ray's address, the workers); `files` and `already_done` None while the listing streams."""
        head = self.head
        return {"run_id": self.run_id, "inputs": self.inputs, "files": files, "skipped": skipped,
                "already_done": already_done, "model_id": head["model_id"], "precision": head["precision"],
                "precision_note": head["precision_note"], "review_below": head["review_below"],
                "ood_threshold": head["ood_threshold"], "out": self.out, "options": self.options,
                "resume_args": self.resume_args}

    def listing_record(self, discovery: dict, finished: str) -> dict:
        """predictions/_run-<id>.json: what discovery found and skipped (kmnist_core/predictions.py)."""
        return {"run_id": self.run_id, "model_id": self.head["model_id"], "inputs": self.inputs,
                "discovery": discovery, "finished": finished}

    def completed(self, figures: dict) -> dict:
        """The run's summary: its fields, then the end figures (executor, counts, times)."""
        return {**self.fields(), "status": "completed", **figures}

    def write_running(self, out: Location) -> None:
        write_run(out, {**self.fields(), "status": "running", "model_card": self.model_card})

    def write_completed(self, out: Location, figures: dict) -> None:
        write_run(out, {**self.completed(figures), "model_card": self.model_card})

    def write_end(self, out: Location, status: str, reason: str, rows_committed: int, detail: str) -> None:
        """A run that failed or was interrupted (best effort: on a full disk even run.json may not be
        writable, and the error line still tells)."""
        record = {**self.fields(), "status": status, "reason": reason, "rows_committed": rows_committed,
                  "detail": detail, "finished": now_iso(), "model_card": self.model_card}
        try:
            write_run(out, record)
        except OSError:
            pass


def write_run(out: Location, record: dict) -> None:
    """Replace OUT/run.json in one step (a rename, or one PUT on an object store)."""
    storage.write_bytes_atomic(out.join(RUN_FILE), json_text(record).encode("utf-8"))


def read_json(out: Location, name: str) -> dict | None:
    """OUT/name as JSON; None when it is absent or not (yet) whole JSON. Other read errors are raised."""
    try:
        return json.loads(storage.read_bytes(out.join(name)))
    except (FileNotFoundError, ValueError):
        return None


def read_run(out: Location) -> dict | None:
    """OUT/run.json, or None when there is none (or it is not JSON: a run that never wrote one whole)."""
    return read_json(out, RUN_FILE)


def read_shown(out: Location, name: str) -> dict | None:
    """read_json, with an OUT that cannot be read as one error line: what `status` shows."""
    try:
        return read_json(out, name)
    except OSError as e:
        raise KmnistError(f"cannot read {out.join(name).uri}: {e.strerror or e}") from None


@dataclass(frozen=True)
class RunState:
    """What OUT's records say of its latest run, predict's or tune's (read_state). Whether its process is
    alive is not here: the lock says that (kmnist_core/out_lock.py)."""

    found: bool  # OUT holds a record of a run (run.json or _progress.json)
    kind: str  # "predict" or "tune"
    run_id: str | None
    recorded: str | None  # the status its records give: running, completed, failed, interrupted
    reason: str | None
    run: dict | None  # OUT/run.json, when it is this run's (predict)
    progress: dict | None  # OUT/_progress.json, when it is this run's
    summary: dict | None  # predict: run.json's figures; tune, once completed: grid.json's
    resume_from: dict  # what the resume command repeats: run.json, else the progress record's start

    @property
    def holder(self) -> dict | None:
        """The process the progress record names."""
        return (self.progress or {}).get("holder")


def latest(*records: dict | None) -> dict | None:
    """The record of the latest run (run ids start with their UTC start time, so they sort)."""
    present = [r for r in records if r]
    return max(present, key=lambda r: r.get("run_id") or "") if present else None


def grid_summary(out: Location) -> dict:
    grid = read_shown(out, GRID_FILE) or {}
    return {"trials": grid.get("trials"), "by_status": grid.get("by_status"), "best": grid.get("best")}


def read_state(out: Location, live_run_id: str | None = None) -> RunState:
    """What the records in OUT say of its latest run. `live_run_id`: the run that holds OUT's lock now,
    which may not have written a record yet."""
    run, progress = read_shown(out, RUN_FILE), read_shown(out, PROGRESS_FILE)
    found = run is not None or progress is not None
    kind = (progress or {}).get("kind") or "predict"
    record = (latest(run, progress) if kind == "predict" else progress) or {}
    if progress and record is not progress and progress.get("run_id") != record.get("run_id"):
        progress = None  # an earlier run's progress
    if live_run_id and live_run_id != record.get("run_id"):
        record, progress = {"run_id": live_run_id}, None  # a new run that has not written its records yet
    run = run if run and run.get("run_id") == record.get("run_id") else None
    if kind == "predict":
        summary = {k: run[k] for k in SUMMARY_KEYS if run.get(k) is not None} if run else None
        resume_from = run or (progress or {}).get("start") or {}  # a run killed before run.json: its start
    else:
        summary = grid_summary(out) if record.get("status") == "completed" else None
        resume_from = record.get("start") or {}
    return RunState(found, kind, record.get("run_id"), record.get("status"), record.get("reason"), run, progress,
                    summary, resume_from)
