"""Progress of a `tune` grid: the start line, a line every `every_s` seconds (trials done / running /
pending / errored, epochs, best val so far, ETA), and OUT/_progress.json for `kmnist-batch status`.

Tune calls `GridCallback` from its controller loop in the driver. Tune pickles its callbacks into the
experiment state (that is how `Tuner.restore` gets them back), so the callback holds no reference to
the reporter, which owns a thread and a lock: it reaches the reporter registered with `active()`.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from ray import tune

from kmnist_core.progress import Reporter, duration

_active: GridProgress | None = None
_active_lock = threading.Lock()


def start_text(info: dict) -> str:
    cfg = info["config"]
    lrs, batches = cfg["lrs"], cfg["batch_sizes"]
    grid = (f"grid lr {', '.join(map(str, lrs))} x batch {', '.join(map(str, batches))} = "
            f"{len(lrs) * len(batches)} trials x {cfg['epochs']} epochs")
    return "; ".join([
        f"start tune run {info.get('run_id')}: {grid}" + (" (resumed: finished trials are not rerun)" if cfg.get("resume") else ""),
        f"dataset {cfg['dataset']}, model {cfg['model']}, scheduler {cfg['scheduler']}",
        f"{cfg['cpus_per_trial']:g} CPU, {cfg['gpus_per_trial']:g} GPU per trial",
        f"out {info.get('out')} (Tune storage {info.get('storage')})",
        f"Ray {info.get('ray_address') or '-'} (dashboard {info.get('dashboard_url') or '-'})",
    ])


class GridProgress(Reporter):
    kind = "tune"

    def clear(self) -> None:
        self.total = 0
        self.epochs = 1
        self.counts = {"done": 0, "running": 0, "pending": 0, "errored": 0}  # done: finished, errored included
        self.epochs_done: dict[str, int] = {}  # trial id -> last epoch reported
        self.finished: set[str] = set()  # trials that will report no more epochs
        self.diverged: set[str] = set()
        self.best: dict | None = None
        self._epochs_at_start: int | None = None  # a resumed grid's epochs, not done by this process

    def start(self, info: dict) -> None:
        """info: run_id, config (asdict(GridConfig)), out, storage, ray_address, dashboard_url."""
        self.info = dict(info)
        self.epochs = int(info["config"]["epochs"])
        self.total = len(info["config"]["lrs"]) * len(info["config"]["batch_sizes"])
        self.counts["pending"] = self.total
        self._open(start_text(self.info))

    def trials_changed(self, trials: list) -> None:
        """Counts by state from Tune's trial list (after every controller step)."""
        with self._lock:
            self.total = max(self.total, len(trials))
            states = [t.status for t in trials]
            errored = states.count("ERROR")
            self.counts = {"done": states.count("TERMINATED") + errored, "running": states.count("RUNNING"),
                           "errored": errored}
            self.counts["pending"] = self.total - self.counts["done"] - self.counts["running"]
            for t in trials:
                if t.status in ("TERMINATED", "ERROR"):
                    self.finished.add(t.trial_id)
                # A restored trial reports nothing until it runs again: start from its last result.
                if t.trial_id not in self.epochs_done and t.last_result and "epoch" in t.last_result:
                    self.epochs_done[t.trial_id] = int(t.last_result["epoch"])
            if self._epochs_at_start is None:
                self._epochs_at_start = sum(self.epochs_done.values())
        self.tick()

    def trial_result(self, trial_id: str, train_config: dict, result: dict) -> None:
        with self._lock:
            self.epochs_done[trial_id] = int(result.get("epoch", 0))
            if result.get("diverged"):
                self.diverged.add(trial_id)
                return
            val = result.get("val_acc")
            if val is not None and (self.best is None or val > self.best["val_acc"]):
                self.best = {"val_acc": float(val), "lr": train_config.get("lr"),
                             "batch_size": train_config.get("batch_size"), "trial": trial_id}

    def finish(self, status: str, reason: str | None = None) -> None:
        with self._lock:
            final = None
            if self.started_at is not None:
                f = self.figures(self.clock())
                final = f"{status} {self._head(f)} in {duration(f['elapsed_s'])}; {self._best_text(f)}"
        self._close(status, final, reason)

    def identity(self) -> dict:
        return {"run_id": self.info.get("run_id"), "start": self.info}

    def figures(self, now: float) -> dict:
        elapsed = max(now - self.started_at, 0.0)
        epochs_done = sum(self.epochs_done.values())
        remaining = sum(self.epochs - self.epochs_done.get(t, 0) for t in self.epochs_done if t not in self.finished)
        remaining += max(self.total - len(self.epochs_done), 0) * self.epochs  # trials that have not reported yet
        this_run = epochs_done - (self._epochs_at_start or 0)
        eta = remaining * elapsed / this_run if this_run > 0 else None
        return {"trials_total": self.total, **self.counts, "diverged": len(self.diverged),
                "epochs_done": epochs_done, "epochs_total": self.total * self.epochs,
                "best": self.best, "elapsed_s": round(elapsed, 1), "eta_s": round(eta, 1) if eta is not None else None}

    def bar_state(self, figures: dict) -> tuple[int, int | None]:
        return figures["done"], figures["trials_total"]

    def _head(self, f: dict) -> str:
        return (f"{f['done']}/{f['trials_total']} trials ({f['running']} running, {f['pending']} pending, "
                f"{f['errored']} errored, {f['diverged']} diverged); epochs {f['epochs_done']}/{f['epochs_total']}")

    @staticmethod
    def _best_text(f: dict) -> str:
        b = f["best"]
        return f"best val {b['val_acc']:.4f} (lr {b['lr']} batch {b['batch_size']})" if b else "best val -"

    def line(self, f: dict) -> str:
        return f"grid {self._head(f)}; {self._best_text(f)}; ETA {duration(f['eta_s'])}"


@contextmanager
def active(progress: GridProgress | None) -> Iterator[None]:
    """Register `progress` (None: no reporting) as the reporter GridCallback feeds, for one fit()."""
    global _active
    with _active_lock:
        _active = progress
    try:
        yield
    finally:
        with _active_lock:
            _active = None


def quiet() -> bool:
    """Whether the active reporter was asked for quiet (the per-trial lines follow it too)."""
    return _active is not None and _active.quiet


class GridCallback(tune.Callback):
    """Feeds the active GridProgress (see the module doc for why it holds no reference)."""

    def on_step_end(self, iteration, trials, **info):
        if _active is not None:
            _active.trials_changed(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if _active is not None:
            _active.trial_result(trial.trial_id, trial.config.get("train", {}), result)
