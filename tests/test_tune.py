"""The Tune grid against a real local Ray, on real kmnist-dev images (small: 600 train, 1-2 epochs)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from kmnist_core import load_model
from kmnist_core.errors import KmnistError
from tune.grid import GridConfig, run_grid

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
CLI = str(Path(sys.executable).parent / "kmnist-batch")


@pytest.fixture(scope="module")
def small_data_dir(tmp_path_factory, small_dev):
    """A kmnist-dev-format directory holding only the small split, so trials stay seconds long."""
    import shutil

    import numpy as np

    from kmnist_core.datasets import BUNDLED_DIR

    d = tmp_path_factory.mktemp("small-dev")
    images = np.concatenate([small_dev.train.images, small_dev.val.images, small_dev.test.images])
    labels = np.concatenate([small_dev.train.labels, small_dev.val.labels, small_dev.test.labels]).astype(np.uint8)
    np.savez_compressed(d / "kmnist-dev-imgs.npz", arr_0=images)
    np.savez_compressed(d / "kmnist-dev-labels.npz", arr_0=labels)
    shutil.copy(BUNDLED_DIR / "kmnist_classmap.csv", d)
    return d


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory, small_data_dir, ray_session):
    out = tmp_path_factory.mktemp("grid")
    cfg = GridConfig(lrs=[0.1, 0.001], batch_sizes=[32, 64], epochs=2, data_dir=str(small_data_dir))
    return out, run_grid(cfg, out)


def test_grid_writes_tables_history_plots_and_best(tiny_grid):
    out, summary = tiny_grid
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
    best = summary["best"]
    assert best["best_val_acc"] == pytest.approx(trials.best_val_acc[trials.status == "completed"].max())
    model = load_model(out / "best")
    card = json.loads((out / "best" / "model_card.json").read_text(encoding="utf-8"))
    assert card["training"]["config"]["lr"] == best["lr"] and model.model_id == best["model_id"]
    assert json.loads((out / "grid.json").read_text(encoding="utf-8"))["trials"] == 4


def test_too_high_learning_rate_is_recorded_as_diverged_and_grid_goes_on(tiny_grid):
    out, summary = tiny_grid
    trials = pd.read_parquet(out / "trials.parquet")
    high = trials[trials.lr == 0.1]
    assert (high.status == "diverged").all(), high[["lr", "batch_size", "status", "final_val_acc"]]
    assert summary["errors"] == [] and summary["best"]["lr"] == 0.001


def test_existing_grid_is_not_overwritten(tiny_grid, small_data_dir):
    out, _ = tiny_grid
    with pytest.raises(KmnistError, match="--resume"):
        run_grid(GridConfig(lrs=[0.001], batch_sizes=[64], epochs=1, data_dir=str(small_data_dir)), out)


def test_failing_trial_is_reported_and_the_command_fails(tmp_path, small_data_dir):
    # Asking trials for CUDA on a machine without a GPU makes them raise inside Ray.
    r = subprocess.run([CLI, "tune", "--out", str(tmp_path / "g"), "--lr", "0.001", "--batch-size", "64",
                        "--epochs", "1", "--device", "cuda", "--data-dir", str(small_data_dir)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "error: trial lr=0.001 batch=64 failed" in r.stderr and "CUDA" in r.stderr
    trials = pd.read_csv(tmp_path / "g" / "trials.csv")
    assert trials.status.tolist() == ["error"]


def test_resume_after_driver_kill_skips_finished_trials(tmp_path, small_data_dir):
    out = tmp_path / "g"
    args = [CLI, "tune", "--out", str(out), "--lr", "0.003,0.001,0.0003", "--batch-size", "32,64",
            "--epochs", "2", "--data-dir", str(small_data_dir)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    finished = 0
    deadline = time.time() + 240
    while time.time() < deadline and finished < 3:
        finished += proc.stdout.readline().startswith("trial ")
    time.sleep(2.0)  # let Tune persist its experiment state
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    assert 3 <= finished < 6, "the grid was not interrupted mid-way"

    reported = {}  # (trial, epoch) -> epoch time, for every epoch reported before the kill
    for result_file in (out / "ray_results" / "grid").glob("*/result.json"):
        for line in result_file.read_text().splitlines():
            row = json.loads(line)
            reported[(result_file.parent.name, row["epoch"])] = row["epoch_time_s"]
    assert reported, "no epoch was reported before the kill"

    r = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 6 and (trials.status == "completed").all()
    history = pd.read_parquet(out / "history.parquet")
    # Interrupted trials continued from their checkpoint: each has epochs 1 and 2 exactly once.
    assert sorted(history.groupby("trial").epoch.apply(list).map(sorted).map(tuple)) == [(1, 2)] * 6
    # No epoch reported before the kill was trained again (its recorded time is unchanged).
    final = {(t, e): v for t, e, v in zip(history.trial, history.epoch, history.epoch_time_s)}
    assert all(final[key] == value for key, value in reported.items())
    assert (out / "best" / "model.pt").exists()


def test_asha_scheduler_runs_the_grid(tmp_path, small_data_dir, ray_session):
    out = tmp_path / "asha"
    summary = run_grid(GridConfig(lrs=[0.003, 0.001, 0.0003, 0.0001], batch_sizes=[64], epochs=3, scheduler="asha",
                                  data_dir=str(small_data_dir)), out)
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 4 and set(trials.status) <= {"completed", "stopped_early", "diverged"}
    assert summary["errors"] == [] and summary["best"] is not None
