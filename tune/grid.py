"""The study's learning-rate x batch-size grid as a Ray Tune experiment.

Each trial runs kmnist_core's `train_model` and reports every epoch with `ray.tune.report`; the best
trial (on val accuracy, never test) becomes a model directory in OUT/best. Ray 2.60 APIs only:
`tune.report`, `tune.Checkpoint`, `tune.RunConfig`, `tune.CheckpointConfig`, `Tuner.restore`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import pandas as pd
import ray
import torch
from ray import tune

from kmnist_core import out_lock
from kmnist_core.datasets import Dataset, load_dataset
from kmnist_core.errors import KmnistError
from kmnist_core.experiment import write_model_dir
from kmnist_core.files import write_json_atomic
from kmnist_core.model_dir import pick_device
from kmnist_core.options import option_args
from kmnist_core.models import create_model
from kmnist_core.ray_runtime import init_ray
from kmnist_core.run_record import GRID_FILE, new_run_id
from kmnist_core.safe_text import csv_frame
from kmnist_core.train import TrainConfig, TrainRun, train_model
from tune.plots import write_grid_plots
from tune.options import GridConfig
from tune.progress import GridCallback, GridProgress, active
from tune.progress import quiet as progress_quiet

EXPERIMENT = "grid"
STATE_FILE = "train_state.pt"  # TrainRun.state_dict(): model, optimizer, scheduler, RNG, history

# Tests hold a trial busy for exactly as long as they need (tests/test_tune.py): with
# KMNIST_BATCH_TEST_HOLD=1 in the driver's environment, a trial waits before training epoch E while
# OUT/lr{lr}-batch{batch_size}-epoch{E}.hold exists and that name plus ".release" does not. The driver
# puts OUT in the trials' config, so trials follow it on any worker of any Ray. Unset in real runs.
TEST_HOLD_ENV = "KMNIST_BATCH_TEST_HOLD"


def hold_name(lr: float, batch_size: int, epoch: int) -> str:
    return f"lr{lr}-batch{batch_size}-epoch{epoch}.hold"


def wait_while_held(hold_dir: str | None, train: dict, epoch: int) -> None:
    if not hold_dir:
        return
    hold = Path(hold_dir) / hold_name(train["lr"], train["batch_size"], epoch)
    while hold.exists() and not Path(str(hold) + ".release").exists():
        time.sleep(0.02)


def train_trial(config: dict, data: Dataset | None = None) -> None:
    """One Tune trial: the library's training loop, checkpointed and reported after every epoch.

    A trial restored after a crash continues from its last checkpoint. A diverging trial (NaN loss,
    or collapsed to chance) reports `diverged=True` and stops; the grid goes on.
    """
    cfg = TrainConfig(**config["train"])
    resume_state = None
    if (checkpoint := tune.get_checkpoint()) is not None:
        with checkpoint.as_directory() as ckpt:
            resume_state = torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=True)

    node_id = ray.get_runtime_context().get_node_id()
    hold_dir = config.get("test_hold")

    def report(metrics: dict, run: TrainRun) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(run.state_dict(), Path(tmp) / STATE_FILE)
            tune.report({**metrics, "node_id": node_id}, checkpoint=tune.Checkpoint.from_directory(tmp))
        if metrics["epoch"] < cfg.epochs and not metrics["diverged"]:
            wait_while_held(hold_dir, config["train"], metrics["epoch"] + 1)

    wait_while_held(hold_dir, config["train"], len(resume_state["history"]) + 1 if resume_state else 1)
    train_model(cfg, data, pick_device(cfg.device), on_epoch=report, resume_state=resume_state)


def trial_status(result, epochs: int, history: pd.DataFrame) -> str:
    if result.error is not None:
        return "error"
    if len(history) and history["diverged"].fillna(False).astype(bool).any():
        return "diverged"
    if len(history) < epochs:
        return "stopped_early"  # by the ASHA scheduler
    return "completed"


def collect(results, cfg: GridConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per trial, and one row per trial per epoch."""
    trials, histories = [], []
    for result in results:
        train_cfg = result.config["train"]
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        keep = [c for c in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_acc",
                            "epoch_time_s", "diverged") if c in history]
        history = history[keep].copy() if keep else pd.DataFrame(columns=["epoch"])
        trial_id = Path(result.path).name if result.path else "unknown"
        status = trial_status(result, cfg.epochs, history)
        row = {"trial": trial_id, "lr": train_cfg["lr"], "batch_size": train_cfg["batch_size"], "status": status,
               "epochs_run": len(history), "cpus": cfg.cpus_per_trial, "gpus": cfg.gpus_per_trial,
               "node_id": (result.metrics or {}).get("node_id"),
               "error": None if result.error is None else str(result.error).strip().splitlines()[-1][:500]}
        if len(history):
            best = history.loc[history["val_acc"].idxmax()] if history["val_acc"].notna().any() else history.iloc[-1]
            row.update({"best_val_acc": best["val_acc"], "best_epoch": int(best["epoch"]),
                        "test_acc_at_best_val": best["test_acc"], "final_val_acc": history["val_acc"].iloc[-1],
                        "final_test_acc": history["test_acc"].iloc[-1], "final_train_loss": history["train_loss"].iloc[-1],
                        "time_s": float(history["epoch_time_s"].sum())})
        trials.append(row)
        histories.append(history.assign(trial=trial_id, lr=train_cfg["lr"], batch_size=train_cfg["batch_size"]))
    columns = ["trial", "lr", "batch_size", "status", "epochs_run", "best_val_acc", "best_epoch", "test_acc_at_best_val",
               "final_val_acc", "final_test_acc", "final_train_loss", "time_s", "cpus", "gpus", "node_id", "error"]
    table = pd.DataFrame(trials, columns=columns).sort_values(["lr", "batch_size"], ascending=[False, True]).reset_index(drop=True)
    return table, pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()


def write_best(results, trials: pd.DataFrame, history: pd.DataFrame, data: Dataset, out: Path) -> dict | None:
    """The best usable trial (highest val accuracy, never chosen on test) as a model directory."""
    usable = trials[trials.status.isin(["completed", "stopped_early"]) & trials.best_val_acc.notna()]
    if usable.empty:
        return None
    best_trial = usable.loc[usable.best_val_acc.idxmax()]
    result = next(r for r in results if r.path and Path(r.path).name == best_trial.trial)
    checkpoint = result.get_best_checkpoint("val_acc", "max")
    train_cfg = TrainConfig(**result.config["train"])
    model = create_model(train_cfg.model, len(data.classes), data.input_size)
    with checkpoint.as_directory() as ckpt:
        model.load_state_dict(torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=True)["model"])
    trial_history = history[history.trial == best_trial.trial].drop(columns=["trial", "lr", "batch_size"])
    card = write_model_dir(out / "best", model, train_cfg, data, trial_history.to_dict("records"), "completed")
    return {"trial": best_trial.trial, "lr": float(best_trial.lr), "batch_size": int(best_trial.batch_size),
            "best_val_acc": float(best_trial.best_val_acc), "test_acc": card["metrics"]["test"]["accuracy"],
            "model_id": card["model_id"]}


@contextlib.contextmanager
def working_in(path: Path) -> Iterator[None]:
    """Run the fit from OUT, which nothing replaces (every path Tune gets is absolute). Under `ray job
    submit`, Ray may delete the job's working_dir copy (a job after another with the same package),
    leaving this process in a deleted folder: Tune would fail in os.getcwd(), and so would
    contextlib.chdir, which asks for the folder to return to. There is then nothing to return to."""
    try:
        previous = os.getcwd()
    except FileNotFoundError:
        previous = None
    os.chdir(path)
    try:
        yield
    finally:
        if previous is not None:
            with contextlib.suppress(OSError):
                os.chdir(previous)


class TrialLines(tune.Callback):
    """One line per finished trial (Tune's own progress tables are switched off); none under --quiet."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        if progress_quiet():
            return
        r, train = trial.last_result or {}, trial.config.get("train", {})
        state = "diverged" if r.get("diverged") else "done"
        print(f"trial lr={train.get('lr')} batch={train.get('batch_size')}: {state} after epoch "
              f"{r.get('epoch', '?')}, val {r.get('val_acc', float('nan')):.4f}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        if progress_quiet():
            return
        train = trial.config.get("train", {})
        print(f"trial lr={train.get('lr')} batch={train.get('batch_size')}: ERROR", flush=True)


def run_grid(cfg: GridConfig, out: Path, progress: GridProgress | None = None) -> dict:
    """Run (or resume) the grid; write trials, history, plots and best/ into `out`.

    OUT is locked for the whole run (kmnist_core/out_lock.py: one grid per OUT, and `status` tells a
    live grid from a killed one); `progress` prints the start and progress lines and keeps
    OUT/_progress.json."""
    cfg.validate()
    data = load_dataset(cfg.dataset, cfg.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_id = new_run_id()
    with out_lock.hold(out, run_id):
        try:
            summary = fit_grid(cfg, out, data, run_id, progress)
        except BaseException as e:
            if progress:
                interrupted = isinstance(e, KeyboardInterrupt)
                first = (str(e).strip().splitlines() or [""])[0]
                progress.finish("interrupted" if interrupted else "failed",
                                "interrupted (Ctrl-C or SIGTERM)" if interrupted else (first or type(e).__name__))
            raise
        if progress:
            progress.finish("completed")
        return summary


def fit_grid(cfg: GridConfig, out: Path, data: Dataset, run_id: str, progress: GridProgress | None) -> dict:
    storage = cfg.storage or str((out / "ray_results").resolve())
    experiment_path = storage.rstrip("/") + "/" + EXPERIMENT
    # Every epoch checkpoints, so Tune snapshots its state often (that is what makes --resume exact);
    # its warning about frequent snapshots would fire on every trial.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    _, where = init_ray(cfg.address)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    if progress:
        progress.start({"run_id": run_id, "config": asdict(cfg), "out": str(out), "storage": storage, **asdict(where),
                        "resume_args": option_args(cfg)})

    trainable = tune.with_resources(tune.with_parameters(train_trial, data=data),
                                    {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    if cfg.resume:
        if not tune.Tuner.can_restore(experiment_path):
            raise KmnistError(f"nothing to resume at {experiment_path}; run without --resume first")
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    else:
        if tune.Tuner.can_restore(experiment_path):
            raise KmnistError(f"{experiment_path} already holds a grid; pass --resume to continue it or use another --out")
        threads = max(1, int(cfg.cpus_per_trial))
        train_space = {"dataset": cfg.dataset, "model": cfg.model, "epochs": cfg.epochs, "seed": cfg.seed,
                       "augment": cfg.augment, "device": cfg.device, "threads": threads, "data_dir": cfg.data_dir,
                       "lr": tune.grid_search(list(cfg.lrs)), "batch_size": tune.grid_search(list(cfg.batch_sizes))}
        scheduler = None
        if cfg.scheduler == "asha":
            scheduler = tune.schedulers.ASHAScheduler(time_attr="training_iteration", max_t=cfg.epochs, grace_period=1)
        test_hold = {"test_hold": str(out.resolve())} if os.environ.get(TEST_HOLD_ENV) == "1" else {}
        tuner = tune.Tuner(
            trainable,
            param_space={"train": train_space, **test_hold},
            tune_config=tune.TuneConfig(metric="val_acc", mode="max", scheduler=scheduler,
                                        reuse_actors=True),  # ~0.5 s per trial instead of ~4 s (STACK.md)
            run_config=tune.RunConfig(
                name=EXPERIMENT, storage_path=storage, verbose=0, callbacks=[TrialLines(), GridCallback()],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_acc",
                                                        checkpoint_score_order="max"),
                failure_config=tune.FailureConfig(max_failures=0)),
        )
    with active(progress), working_in(out.resolve()):
        results = tuner.fit()
    trials, history = collect(results, cfg)
    csv_frame(trials).to_csv(out / "trials.csv", index=False)
    trials.to_parquet(out / "trials.parquet", index=False)
    history.to_parquet(out / "history.parquet", index=False)
    write_grid_plots(trials, history, out)
    best = write_best(results, trials, history, data, out)
    summary = {"config": asdict(cfg), "experiment_path": experiment_path, "trials": len(trials),
               "by_status": trials.status.value_counts().to_dict(), "best": best,
               "errors": trials[trials.status == "error"][["trial", "lr", "batch_size", "error"]].to_dict("records"),
               "split_note": data.split_note}
    write_json_atomic(out / GRID_FILE, summary)
    return summary
