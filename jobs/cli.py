"""`kmnist-batch`: a thin typer layer over library functions. Errors a user can fix print one line."""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer

from kmnist_core.errors import Interrupted, KmnistError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Recognize handwritten Kuzushiji character crops (KMNIST models, Ray Tune, Ray Data).")


def user_errors(fn):
    """Turn KmnistError into `error: ...` on stderr and its exit code (2; 130 when interrupted), and
    Ctrl-C into one line too: never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KmnistError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(Interrupted.exit_code) from None

    return wrapper


def epoch_printer(total: int):
    """A line per epoch; on a terminal, a progress bar over the epochs as well."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    progress = Progress(console=console, transient=True) if console.is_terminal else None
    task = progress.add_task("training", total=total) if progress else None
    if progress:
        progress.start()

    def show(m: dict, run=None) -> None:
        console.print(f"epoch {m['epoch']:>3}/{total}  loss {m['train_loss']:.4f}  train {m['train_acc']:.4f}  "
                      f"val {m['val_acc']:.4f}  test {m['test_acc']:.4f}  ({m['epoch_time_s']:.1f}s)"
                      + ("  diverged: stopping" if m["diverged"] else ""))
        if progress:
            progress.update(task, completed=m["epoch"])
            if m["epoch"] == total or m["diverged"]:
                progress.stop()

    return show


@app.command()
@user_errors
def train(
    dataset: str = typer.Option("kmnist-dev", help="kmnist-dev (bundled), kmnist, k49 or kkanji"),
    model: str = typer.Option("simple-cnn", help="simple-cnn (the study's), compact-cnn, compact-cnn-wide, vgg-cnn, vgg-cnn-half, vgg-cnn-slim"),
    epochs: int = typer.Option(10),
    lr: float = typer.Option(1e-3),
    batch_size: int = typer.Option(64),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto, cpu, cuda"),
    optimizer: str = typer.Option("adam", help="adam (the study's) or adamw"),
    weight_decay: float = typer.Option(0.0),
    schedule: str = typer.Option("constant", help="constant or onecycle"),
    augment: str = typer.Option("study", help="none, study (±10° rotation) or strong"),
    threads: int = typer.Option(0, help="torch CPU threads (0 = torch default)"),
    mixup: float = typer.Option(0.0, help="mixup Beta(a, a) parameter; 0 = off"),
    teacher: Optional[List[Path]] = typer.Option(None, help="model directory to distill from (its predictions on "
                                                            "each augmented batch become the targets); repeat "
                                                            "for an ensemble, whose mean probabilities are used"),
    distill_temperature: float = typer.Option(1.0, help="softmax temperature of the distillation loss"),
    init: Optional[str] = typer.Option(None, help="model directory (or 'default') whose weights start the run"),
    negatives: str = typer.Option("none", help="none, or synth: outlier exposure with synthetic non-characters"),
    outlier_weight: float = typer.Option(0.5, help="weight of the outlier-exposure loss"),
    negative_font: Optional[List[Path]] = typer.Option(None, help="extra font for rendered non-character glyphs "
                                                                  "(IPAexGothic is always used); repeatable"),
    data_dir: Optional[Path] = typer.Option(None, help="directory with (or receiving) the official files"),
    out: Path = typer.Option(..., help="model directory to write"),
):
    """Train a model; writes a model directory (weights, model card, history, plots)."""
    from kmnist_core.experiment import run_train
    from kmnist_core.train import TrainConfig

    cfg = TrainConfig(dataset=dataset, model=model, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                      device=device, optimizer=optimizer, weight_decay=weight_decay, schedule=schedule,
                      augment=augment, threads=threads, data_dir=str(data_dir) if data_dir else None,
                      mixup=mixup, teachers=[str(t) for t in teacher or []], distill_temperature=distill_temperature,
                      init=init, negatives=negatives, outlier_weight=outlier_weight,
                      negative_fonts=[str(f) for f in negative_font or []])
    card = run_train(cfg, out, on_epoch=epoch_printer(epochs))
    test = card["metrics"]["test"]
    typer.echo(f"{dataset} test accuracy {test['accuracy']:.4f} (balanced {test['balanced_accuracy']:.4f}) "
               f"on {test['n']} images; ECE {card['calibration']['ece_before']:.2%} -> "
               f"{card['calibration']['ece_after']:.2%} at T={card['calibration']['temperature']:.2f}")
    typer.echo(f"model directory and plots: {out}")


@app.command()
@user_errors
def evaluate(
    model: str = typer.Option("default", help="model directory, or 'default'"),
    dataset: str = typer.Option("kmnist-dev"),
    split: str = typer.Option("test", help="train, val or test"),
    data_dir: Optional[Path] = typer.Option(None),
    unknown: Optional[Path] = typer.Option(None, help="folder of crops that are none of the model's characters "
                                                      "(sub-folders = kinds): report the share auto-accepted"),
    out: Path = typer.Option(..., help="directory for metrics.json and plots"),
    precision: str = typer.Option("auto", help="auto (int8 on CPU when the model passed its int8 check), fp32 or "
                                               "int8; int8 also reports int8 against fp32"),
):
    """Score a model on a labelled split: accuracy, calibration, auto-accepted share and precision, plots."""
    from kmnist_core.datasets import load_dataset
    from kmnist_core.experiment import run_evaluate
    from kmnist_core.model_dir import load_model

    if split not in ("train", "val", "test"):
        raise KmnistError(f"unknown split {split!r}; choose train, val or test")
    if unknown is not None and not unknown.is_dir():
        raise KmnistError(f"--unknown {unknown} is not a folder")
    predictor = load_model(model, precision=precision)
    metrics = run_evaluate(predictor, load_dataset(dataset, data_dir), split, out, unknown)
    review = metrics["review"]
    precision = review["auto_accepted_precision"]
    typer.echo(f"{dataset}/{split}: accuracy {metrics['accuracy']:.4f}, balanced {metrics['balanced_accuracy']:.4f} "
               f"on {metrics['n']} images; ECE {metrics['calibration']['ece_after']:.2%}")
    typer.echo(f"auto-accepted {review['auto_accepted_share']:.2%} at precision "
               + (f"{precision:.2%}" if precision is not None else "-")
               + f" ({review['auto_accepted_errors']} wrong, {review['unknown_share']:.2%} flagged unknown)")
    fallback = predictor.card.get("int8", {}).get("fallback")
    typer.echo(f"precision {predictor.precision}" + (f" (int8 off: {fallback})" if fallback and predictor.precision == "fp32" else ""))
    if "int8_vs_fp32" in metrics:
        c = metrics["int8_vs_fp32"]
        i8, f32 = c["int8"], c["fp32"]
        typer.echo(f"int8 vs fp32: top-1 agreement {c['agreement']:.2%}; accuracy {i8['accuracy']:.2%} vs {f32['accuracy']:.2%}; "
                   f"ECE {i8['ece_after']:.2%} vs {f32['ece_after']:.2%}; auto-accepted "
                   f"{i8['review']['auto_accepted_share']:.2%} vs {f32['review']['auto_accepted_share']:.2%} "
                   f"({i8['review']['auto_accepted_errors']} vs {f32['review']['auto_accepted_errors']} wrong)")
    if unknown is not None:
        u = metrics["unknown"]
        typer.echo(f"out-of-set {unknown}: {u['auto_accepted_share']:.2%} of {u['n']} auto-accepted; "
                   + ", ".join(f"{k} {v['auto_accepted_share']:.2%}" for k, v in u["by_kind"].items()))
    typer.echo(f"metrics and plots: {out}")


def rows_progress():
    """A progress bar over crops on a terminal; nothing otherwise (logs stay quiet)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        return None, None
    progress = Progress(TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True)
    task = progress.add_task("predict", total=None)
    return progress, lambda done, total: progress.update(task, completed=done, total=total)


def print_summary(summary: dict, out: Path) -> None:
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()) or "none"
    errors = ", ".join(f"{k} {v}" for k, v in summary["errors_by_kind"].items()) or "none"
    speed = f"{summary['crops_per_s']:,.0f} crops/s" if summary.get("crops_per_s") else "-"
    reasons = ", ".join(f"{k} {v:,}" for k, v in summary["review_reasons"].items())
    typer.echo("\n".join([
        f"files        {summary['files_seen']:,} rows ({summary['predicted']:,} predicted, {summary['errors']:,} errors: {errors})",
        f"skipped      {skipped}",
        f"needs review {summary['needs_review']:,}: {reasons} (low confidence: below {summary['review_below']:.3f})",
        f"inverted     {summary['inverted']:,} crops were dark ink on light paper",
        f"throughput   {speed} this run",
        f"predictions  {out / 'predictions'}",
        f"summary      {out / 'summary'} (plots, by_folder.csv, summary.json)",
        f"review queue {out / 'summary' / 'review.html'} (and review_sheet-<reason>-<n>.png)",
    ]))


@app.command()
@user_errors
def predict(
    # Plain strings, not Path: Path("s3://b/x") would become "s3:/b/x" and hide that it is a URL.
    inputs: List[str] = typer.Argument(..., help="folders (searched recursively) or image files"),
    out: str = typer.Option(..., help="output directory: predictions/ (Parquet), summary/, run.json"),
    model: str = typer.Option("default", help="model directory, or 'default' (shipped in the package)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default RAY_ADDRESS or a local Ray"),
    batch_size: int = typer.Option(1024, help="crops per model call"),
    workers: int = typer.Option(1, help="model actors"),
    cpus_per_worker: float = typer.Option(1.0),
    gpus_per_worker: float = typer.Option(0.0, help="GPUs per model actor (fractions allowed)"),
    review_below: Optional[float] = typer.Option(None, help="low_confidence review below this confidence; default from the model card"),
    resume: bool = typer.Option(False, help="finish an interrupted run into the same OUT (also re-reads "
                                            "unreadable and truncated files)"),
    retry_errors: bool = typer.Option(False, help="with --resume: re-read every error row; each new row replaces the old"),
    overwrite: bool = typer.Option(False, help="replace earlier predictions in OUT (kept until this run commits its first shard)"),
    rows_per_shard: int = typer.Option(8192, help="rows per Parquet file; also what a killed run can lose"),
    read_retries: int = typer.Option(2, help="extra reads of an unreadable or truncated file within the run"),
    retry_backoff: float = typer.Option(0.5, help="seconds before the first extra read; doubles each time"),
):
    """Predict every crop under INPUTS into Parquet, one row per image file, then write the summary."""
    import signal

    from batch_infer.out_lock import refuse_if_busy
    from batch_infer.paths import refuse_url

    refuse_url(out, "--out")
    refuse_if_busy(Path(out))  # before the imports below, which load torch: a busy OUT is refused at once

    from batch_infer.supervise import run_supervised

    def work() -> int:  # runs in a child process (batch_infer/supervise.py); torch is imported only here
        # `ray job stop` and service managers send SIGTERM: end the same way as Ctrl-C ("interrupted").
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        # A full disk also fails Ray's own log files; the one error line says what happened, without the
        # "--- Logging error ---" tracebacks Python prints by default for every failed log write.
        logging.raiseExceptions = False
        progress, on_rows = rows_progress()
        try:
            from batch_infer.job import PredictOptions, run_predict
            from kmnist_core.ray_runtime import without_known_ray_noise

            opts = PredictOptions(model=model, address=address, batch_size=batch_size, workers=workers,
                                  cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                                  review_below=review_below, resume=resume, overwrite=overwrite,
                                  retry_errors=retry_errors, read_retries=read_retries,
                                  retry_backoff_s=retry_backoff, rows_per_shard=rows_per_shard)
            if progress:
                progress.start()
            try:
                with without_known_ray_noise():
                    run = run_predict(inputs, out, opts, on_rows)
            finally:
                if progress:
                    progress.stop()
            print_summary({**run["report"], "crops_per_s": run["crops_per_s"]}, Path(out))
            return 0
        except KmnistError as e:
            typer.echo(f"error: {e}", err=True)
            return e.exit_code
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            return Interrupted.exit_code
        except BaseException:  # a bug, not a user error: show it
            traceback.print_exc()
            return 1

    code, error = run_supervised(Path(out), work)
    if error:
        typer.echo(f"error: {error}", err=True)
    if code:
        raise typer.Exit(code)


@app.command()
@user_errors
def report(out: Path = typer.Argument(..., help="a predict output directory")):
    """Regenerate OUT/summary/ (plots, by_folder.csv, summary.json) from the Parquet output."""
    from batch_infer.report import write_report

    print_summary(write_report(out), out)


def parse_list(text: str, kind, option: str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise KmnistError(f"{option} takes a comma-separated list, got {text!r}") from None


@app.command()
@user_errors
def tune(
    out: Path = typer.Option(..., help="output directory: trials, history, plots, best/"),
    dataset: str = typer.Option("kmnist-dev"),
    model: str = typer.Option("simple-cnn"),
    lr: str = typer.Option("0.1,0.01,0.001,0.0001", help="learning rates (the study's by default)"),
    batch_size: str = typer.Option("8,16,32,64,128", help="batch sizes (the study's by default)"),
    epochs: int = typer.Option(5),
    cpus_per_trial: float = typer.Option(1.0),
    gpus_per_trial: float = typer.Option(0.0, help="fractions allowed, e.g. 0.25 = four trials per GPU"),
    scheduler: str = typer.Option("none", help="none, or asha to stop trailing trials early"),
    augment: str = typer.Option("study"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto: cuda when the trial has a GPU"),
    data_dir: Optional[Path] = typer.Option(None),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default RAY_ADDRESS or a local Ray"),
    storage: Optional[str] = typer.Option(None, help="Tune storage (default OUT/ray_results); shared storage on multi-node clusters"),
    resume: bool = typer.Option(False, help="continue an interrupted grid without rerunning finished trials"),
):
    """Run the learning-rate x batch-size grid with Ray Tune; the best trial (on val) becomes OUT/best."""
    from tune.grid import GridConfig, run_grid

    cfg = GridConfig(dataset=dataset, model=model, lrs=parse_list(lr, float, "--lr"),
                     batch_sizes=parse_list(batch_size, int, "--batch-size"), epochs=epochs,
                     cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, scheduler=scheduler,
                     augment=augment, seed=seed, device=device, data_dir=str(data_dir) if data_dir else None,
                     address=address, storage=storage, resume=resume)
    summary = run_grid(cfg, out)
    typer.echo(f"{summary['trials']} trials: " + ", ".join(f"{k} {v}" for k, v in summary["by_status"].items()))
    best = summary["best"]
    if best:
        typer.echo(f"best (on val): lr {best['lr']} batch {best['batch_size']}: val {best['best_val_acc']:.4f}, "
                   f"test {best['test_acc']:.4f} -> {out / 'best'}")
    typer.echo(f"trials.csv, history.parquet and plots in {out}")
    for err in summary["errors"]:
        typer.echo(f"error: trial lr={err['lr']} batch={err['batch_size']} failed: {err['error']}", err=True)
    if summary["errors"] or not best:
        raise typer.Exit(1)


if __name__ == "__main__":
    sys.exit(app())
