"""The Tune grid on the session's real local Ray, on real kmnist-dev images (small: 600 train, 1-2 epochs):
the grid's tables, plots and best model, divergence, errors, ASHA, resume after the driver is killed,
and following a grid (issue 16): its start and progress lines in a log file and `status` while it runs.

Trials run on the one Ray of the session: in this process where nothing is killed, and through the CLI
joining it (`--address`) where a test follows or kills the driver. With KMNIST_BATCH_TEST_HOLD=1 in the
driver's environment a trial waits before an epoch while a hold file says so (tune/grid.py): every
"while it runs" below is a state the test brought about and waited for, on any machine."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from ray import cloudpickle

from batch_infer.status import run_status
from kmnist_core import load_model
from kmnist_core.errors import KmnistError
from kmnist_core.progress import PROGRESS_FILE
from kmnist_core.run_record import GRID_FILE
from tests.crop_tree import HOLD_ENV, release
from tests.processes import CLI, wait_for
from tests.tune_helpers import hold, small_data_dir, trial_epochs  # noqa: F401 (small_data_dir: a fixture)
from tune.grid import TEST_HOLD_ENV, GridConfig, run_grid

pytestmark = [pytest.mark.ray, pytest.mark.training, pytest.mark.timeout(400)]
GRID_LINE = re.compile(r"^\d\d:\d\d:\d\d grid (\d+)/4 trials \((\d+) running, (\d+) pending, (\d+) errored")
BEST_LR = re.compile(r"best val 0\.\d{4} \(lr 0\.001 batch \d+\)")


def invoke(*args: object):
    """`kmnist-batch ARGS` in this process (tune runs no child process): it reuses the session's Ray."""
    from typer.testing import CliRunner

    from jobs.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def ray_address(ray_session) -> str:
    """The session's Ray, for CLI processes to join instead of starting their own."""
    return ray_session.get_runtime_context().gcs_address


@pytest.fixture
def best_not_written(monkeypatch):
    """The best trial is chosen and its checkpoint loaded, but best/ is not written: its calibration, int8
    twin and plots take seconds, and grid_run checks a written one. For tests where only the choice matters."""
    import tune.grid

    def card_only(out, model, cfg, *args, **kw) -> dict:
        return {"metrics": {"test": {"accuracy": 0.0}}, "model_id": "not-written"}

    monkeypatch.setattr(tune.grid, "write_model_dir", card_only)


@dataclass
class GridRun:
    out: Path
    lines: list[str]  # its stdout, sent to a file
    stderr: str
    returncode: int
    running: dict  # `status` of OUT while the grid ran


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory, small_data_dir, ray_address) -> GridRun:
    """The tiny grid (lr 0.1 and 0.001 x batch 32 and 64, 2 epochs), run once by the CLI with stdout sent to
    a file. Trial lr 0.001 batch 32 waits before its second epoch until the log holds two progress lines,
    one naming it best, and `status` has been read: both are seen while the grid runs, whatever the speed."""
    root = tmp_path_factory.mktemp("grid")
    out, log, errors = root / "out", root / "tune.log", root / "stderr.log"
    out.mkdir()
    held = hold(out, 0.001, 32, 2)
    with open(log, "w") as stdout, open(errors, "w") as stderr:
        proc = subprocess.Popen([CLI, "tune", "--out", str(out), "--lr", "0.1,0.001", "--batch-size", "32,64",
                                 "--epochs", "2", "--data-dir", str(small_data_dir), "--progress-every", "0.5",
                                 "--address", ray_address],
                                stdout=stdout, stderr=stderr, env={**os.environ, **HOLD_ENV})
    try:
        def mid_run() -> bool:  # the line is printed, then the record rewritten: wait for both
            grid = [line for line in log.read_text(encoding="utf-8").splitlines() if GRID_LINE.match(line)]
            try:
                record = json.loads((out / PROGRESS_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return False
            best_recorded = (record.get("best") or {}).get("lr") == 0.001
            return len(grid) >= 2 and any(BEST_LR.search(line) for line in grid) and best_recorded

        wait_for(mid_run)
        running = run_status(out)
    finally:
        release(held)
        try:
            proc.wait(timeout=300)
        finally:
            proc.kill()
    return GridRun(out, log.read_text(encoding="utf-8").splitlines(), errors.read_text(), proc.returncode, running)


def test_grid_logs_start_and_progress_lines_and_status_follows_it(grid_run):
    assert grid_run.returncode == 0, grid_run.stderr
    s = grid_run.running
    assert s["kind"] == "tune" and s["state"] == "running" and s["alive_judged_by"] == "lock", s
    assert s["progress"]["done"] < 4 and s["progress"]["running"] >= 1 and s["progress"]["best"]["lr"] == 0.001
    lines = grid_run.lines
    assert "start tune run" in lines[0] and "grid lr 0.1, 0.001 x batch 32, 64 = 4 trials x 2 epochs" in lines[0]
    grid = [m for m in map(GRID_LINE.match, lines) if m]
    assert len(grid) >= 2, lines
    assert all(sum(map(int, (m[1], m[2], m[3]))) == 4 for m in grid)  # done + running + pending = the grid
    assert any(m[1] != "4" for m in grid)  # lines came while trials were still to finish
    assert any(BEST_LR.search(line) for line in lines if GRID_LINE.match(line))
    assert sum(line.startswith("trial lr=") for line in lines) == 4  # the per-trial lines are still there
    assert any(re.match(r"^\d\d:\d\d:\d\d completed 4/4 trials", line) for line in lines), lines

    s = run_status(grid_run.out)
    assert s["state"] == "completed" and s["summary"]["trials"] == 4 and s["summary"]["best"]["lr"] == 0.001
    assert s["progress"]["best"]["val_acc"] == pytest.approx(s["summary"]["best"]["best_val_acc"])


def test_grid_writes_tables_history_plots_and_best(grid_run):
    out = grid_run.out
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 4 and set(trials.lr) == {0.1, 0.001} and set(trials.batch_size) == {32, 64}
    assert (pd.read_csv(out / "trials.csv").shape[0]) == 4
    history = pd.read_parquet(out / "history.parquet")
    assert {"trial", "lr", "batch_size", "epoch", "train_loss", "train_acc", "val_acc", "test_acc", "epoch_time_s"} <= set(history.columns)
    for name in ("lr_comparison.png", "batch_size_comparison.png", "lr_batch_heatmap.png"):
        assert (out / name).stat().st_size > 0
    ok = trials[trials.lr == 0.001]
    assert (ok.status == "completed").all() and (ok.epochs_run == 2).all()
    # best/ is chosen on val and is a model directory predict and evaluate accept.
    summary = json.loads((out / GRID_FILE).read_text(encoding="utf-8"))
    best = summary["best"]
    assert best["best_val_acc"] == pytest.approx(trials.best_val_acc[trials.status == "completed"].max())
    model = load_model(out / "best")
    card = json.loads((out / "best" / "model_card.json").read_text(encoding="utf-8"))
    assert card["training"]["config"]["lr"] == best["lr"] and model.model_id == best["model_id"]
    assert summary["trials"] == 4


def test_too_high_learning_rate_is_recorded_as_diverged_and_grid_goes_on(grid_run):
    trials = pd.read_parquet(grid_run.out / "trials.parquet")
    high = trials[trials.lr == 0.1]
    assert (high.status == "diverged").all(), high[["lr", "batch_size", "status", "final_val_acc"]]
    summary = json.loads((grid_run.out / GRID_FILE).read_text(encoding="utf-8"))
    assert summary["errors"] == [] and summary["best"]["lr"] == 0.001


def test_existing_grid_is_not_overwritten(grid_run, small_data_dir):
    with pytest.raises(KmnistError, match="--resume"):
        run_grid(GridConfig(lrs=[0.001], batch_sizes=[64], epochs=1, data_dir=str(small_data_dir)), grid_run.out)


def saved_trials(experiment: Path) -> dict[tuple[float, int], tuple[str, int]]:
    """What `--resume` reads: each trial's status and the epoch of its last registered checkpoint in Tune's
    newest saved experiment state, by (lr, batch size); {} while none is saved or one is being rewritten.
    The checkpoint, not the last result: Tune records a result first and registers its checkpoint a step
    later, and a state saved in between restarts that trial from scratch."""
    try:
        state = json.loads(sorted(experiment.glob("experiment_state-*.json"))[-1].read_text())
    except (IndexError, OSError, ValueError):
        return {}
    saved = {}
    for trial_json, meta_json in state["trial_data"]:
        trial, meta = json.loads(trial_json), json.loads(meta_json)
        train = trial["config"]["train"]
        saved[(train["lr"], train["batch_size"])] = (trial["status"], checkpointed_epoch(meta))
    return saved


def checkpointed_epoch(run_metadata: dict) -> int:
    """The epoch of the trial's latest registered checkpoint (Tune stores its checkpoint manager
    cloudpickled, as hex, in the saved run metadata); 0 without one."""
    manager = run_metadata.get("checkpoint_manager")
    if not manager:
        return 0
    latest = cloudpickle.loads(bytes.fromhex(manager["value"]))._latest_checkpoint_result
    return latest.metrics.get("epoch", 0) if latest is not None else 0


def checkpointed(experiment: Path) -> dict[tuple[str, int], float]:
    """(trial, epoch) -> epoch time, for every epoch in each trial's latest checkpoint on disk. A trial
    writes its checkpoint before it reports it, so this is complete once the saved state names the
    checkpoint (Tune's own result.json is buffered and may lag)."""
    import torch

    times = {}
    for trial_dir in experiment.glob("train_trial_*/"):
        saved = sorted(trial_dir.glob("checkpoint_*/train_state.pt"))
        if saved:
            for row in torch.load(saved[-1], map_location="cpu", weights_only=True)["history"]:
                times[(trial_dir.name, row["epoch"])] = row["epoch_time_s"]
    return times


def test_resume_after_driver_kill_skips_finished_trials(tmp_path, small_data_dir, ray_address):
    """Every trial waits before its second epoch; one is let through. The driver is killed once Tune has
    saved one trial finished, two half-way (epoch 1 checkpointed) and one not started (2 CPUs, so two
    trials at a time): --resume must train exactly the missing epochs."""
    out = tmp_path / "g"
    out.mkdir()
    holds = {(lr, b): hold(out, lr, b, 2) for lr in (0.003, 0.001) for b in (32, 64)}
    args = ["tune", "--out", str(out), "--lr", "0.003,0.001", "--batch-size", "32,64", "--epochs", "2",
            "--data-dir", str(small_data_dir)]
    # TUNE_GLOBAL_CHECKPOINT_S: Tune saves its state every 0.5 s instead of every 10 s; the waits end sooner.
    proc = subprocess.Popen([CLI, *args, "--address", ray_address], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **HOLD_ENV, "TUNE_GLOBAL_CHECKPOINT_S": "0.5"})
    experiment = out / "ray_results" / "grid"
    try:
        wait_for(lambda: sorted(saved_trials(experiment).values()) == [("PENDING", 0)] * 2 + [("RUNNING", 1)] * 2)
        first = next(key for key, (_, epoch) in saved_trials(experiment).items() if epoch == 1)
        release(holds[first])
        cut_off = [("PENDING", 0), ("RUNNING", 1), ("RUNNING", 1), ("TERMINATED", 2)]
        wait_for(lambda: sorted(saved_trials(experiment).values()) == cut_off)
    finally:
        proc.kill()  # kill -9 of the driver; the session's Ray ends its trials with it
        proc.wait()
    saved = saved_trials(experiment)
    assert saved[first] == ("TERMINATED", 2) and sorted(saved.values()) == cut_off  # the grid was cut off
    before = checkpointed(experiment)
    assert len(before) == 4  # the finished trial's two epochs and the half-way trials' first

    s = run_status(out)  # what a user finds: a killed grid, and the command that finishes it
    assert s["kind"] == "tune" and s["state"] == "interrupted" and "killed" in s["reason"], s
    assert s["resume_command"] == shlex.join(["kmnist-batch", "tune", "--out", str(out), "--resume", *args[3:],
                                              "--address", ray_address])

    for path in holds.values():
        release(path)
    r = invoke(*shlex.split(s["resume_command"])[1:])  # the session's Ray, as that address names
    assert r.exit_code == 0, r.output
    assert "(resumed: finished trials are not rerun)" in r.stdout
    assert sum(line.startswith("trial lr=") for line in r.stdout.splitlines()) == 3  # not the finished one
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 4 and (trials.status == "completed").all()
    history = pd.read_parquet(out / "history.parquet")
    # Interrupted trials continued from their checkpoint: each has epochs 1 and 2 exactly once.
    assert sorted(history.groupby("trial").epoch.apply(list).map(sorted).map(tuple)) == [(1, 2)] * 4
    # No epoch reported before the kill was trained again (its recorded time is unchanged).
    final = {(t, e): v for t, e, v in zip(history.trial, history.epoch, history.epoch_time_s)}
    assert all(final[key] == value for key, value in before.items())
    assert (out / "best" / "model.pt").exists()


def test_asha_stops_a_trailing_trial_early_and_a_failing_trial_fails_the_command(tmp_path, small_data_dir, ray_session,
                                                                                 monkeypatch, best_not_written):
    """One grid of three trials, through the CLI in this process.

    ASHA with at most 2 epochs has one rung, at epoch 1: a trial reaching it below the trials recorded
    there is stopped. The weak trial (lr 1e-5) waits before its first epoch until the strong one (lr 0.003)
    has been recorded at the rung, so it always arrives second and trailing; without ASHA it would run on.

    Trial lr 0.001 raises inside Ray (on purpose, the same on any machine): it is listed with its error and
    the command exits 1, while the other trials still finish and the strong one becomes best."""
    import tune.grid

    real = tune.grid.train_trial

    def failing_at_lr_0_001(config, **kw):  # a closure: sent to the trials by value
        if config["train"]["lr"] == 0.001:
            raise RuntimeError("trial broke on purpose")
        return real(config, **kw)

    monkeypatch.setattr(tune.grid, "train_trial", failing_at_lr_0_001)
    out = tmp_path / "g"
    out.mkdir()
    held = hold(out, 1e-05, 64, 1)
    monkeypatch.setenv(TEST_HOLD_ENV, "1")

    def release_once_the_strong_trial_is_recorded() -> None:
        try:
            wait_for(lambda: trial_epochs(out / "ray_results" / "grid").get(0.003, 0) >= 1)
        finally:
            release(held)

    watcher = threading.Thread(target=release_once_the_strong_trial_is_recorded, daemon=True)
    watcher.start()
    r = invoke("tune", "--out", out, "--lr", "0.003,0.001,1e-05", "--batch-size", "64", "--epochs", "2",
               "--scheduler", "asha", "--data-dir", small_data_dir)
    watcher.join()
    assert r.exit_code == 1, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: trial lr=0.001 batch=64 failed: ")
    assert "trial broke on purpose" in errors[0], r.stderr
    trials = pd.read_csv(out / "trials.csv").set_index("lr")
    assert trials.status.to_dict() == {0.003: "completed", 0.001: "error", 1e-05: "stopped_early"}
    assert "trial broke on purpose" in trials.error[0.001]
    history = pd.read_parquet(out / "history.parquet")
    strong_at_rung = history[(history.lr == 0.003) & (history.epoch == 1)].val_acc.iloc[0]
    assert trials.epochs_run[0.003] == 2 and trials.epochs_run[1e-05] == 1
    assert trials.final_val_acc[1e-05] < strong_at_rung  # why ASHA stopped it
    assert json.loads((out / GRID_FILE).read_text(encoding="utf-8"))["best"]["lr"] == 0.003
