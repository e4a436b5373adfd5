"""`kmnist-batch`: a thin typer layer over library functions. Errors a user can fix print one line."""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer

from batch_infer.options import PredictOptions
from kmnist_core.errors import Interrupted, KmnistError, require_torch
from kmnist_core.options import cli_option
from kmnist_core.safe_text import terminal
from kmnist_core.train_options import TrainConfig
from tune.options import STUDY_BATCH_SIZES, STUDY_LRS, GridConfig

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
            typer.echo(f"error: {terminal(str(e), newlines=True)}", err=True)  # messages name files from data
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


# An option NAME of a command as a typer Option, its default, flag and help from the command's options class:
train_flag = functools.partial(cli_option, TrainConfig)
flag = functools.partial(cli_option, PredictOptions)  # predict's
grid_flag = functools.partial(cli_option, GridConfig)  # tune's


def progress_every_option():
    return typer.Option(30.0, help="seconds between progress lines (when output is not a terminal) and rewrites "
                                   "of OUT/_progress.json")


def quiet_option():
    return typer.Option(False, help="print only errors and the final summary")


def check_progress_every(seconds: float) -> None:
    if seconds <= 0:
        raise KmnistError("--progress-every must be > 0 seconds")


@app.command()
@user_errors
def train(
    dataset: str = train_flag("dataset"),
    model: Optional[str] = train_flag("model", default=None),  # None: --init's architecture, else TrainConfig's
    epochs: int = train_flag("epochs"),
    lr: float = train_flag("lr"),
    batch_size: int = train_flag("batch_size"),
    seed: int = train_flag("seed"),
    device: str = train_flag("device"),
    optimizer: str = train_flag("optimizer"),
    weight_decay: float = train_flag("weight_decay"),
    schedule: str = train_flag("schedule"),
    augment: str = train_flag("augment"),
    threads: int = train_flag("threads"),
    mixup: float = train_flag("mixup"),
    teachers: Optional[List[Path]] = train_flag("teachers"),
    distill_temperature: float = train_flag("distill_temperature"),
    init: Optional[str] = train_flag("init"),
    negatives: Optional[str] = train_flag("negatives", default=None),  # None: --init's, else TrainConfig's
    outlier_weight: float = train_flag("outlier_weight"),
    negative_fonts: Optional[List[Path]] = train_flag("negative_fonts"),
    data_dir: Optional[Path] = train_flag("data_dir"),
    reviews: Optional[List[str]] = train_flag("reviews"),
    review_share: float = train_flag("review_share"),
    review_holdout: float = train_flag("review_holdout"),
    out: Path = typer.Option(..., help="model directory to write"),
):
    """Train a model; writes a model directory (weights, model card, history, plots)."""
    given = {name: value for name, value in locals().items() if name != "out"}  # TrainConfig's fields, as given
    require_torch("kmnist-batch train")
    from kmnist_core.experiment import run_train

    cfg = train_config(given)
    data, reviewed = training_reviews(cfg)
    card = run_train(cfg, out, on_epoch=epoch_printer(cfg.epochs), data=data, reviewed=reviewed)
    print_trained(card, cfg.dataset, out)


def train_config(given: dict):
    """The checked TrainConfig of train's options: an option not given takes TrainConfig's default, paths
    become text. A fine-tune keeps the --init model's architecture and outlier exposure unless told
    otherwise: without its negatives it forgets what is no character (docs/training.md, learning from reviews)."""
    from kmnist_core.card import read_card
    from kmnist_core.model_dir import resolve_model_path
    from kmnist_core.train_options import TrainConfig

    if given["init"]:
        init_card = read_card(resolve_model_path(given["init"]))
        given["model"] = given["model"] or init_card.architecture
        given["negatives"] = given["negatives"] or (init_card.raw.get("training") or {}).get("config", {}).get("negatives")
    text = lambda v: [str(x) for x in v] if isinstance(v, (list, tuple)) else str(v) if isinstance(v, Path) else v  # noqa: E731
    cfg = TrainConfig(**{name: text(value) for name, value in given.items() if value is not None})
    cfg.validate()
    return cfg


def training_reviews(cfg) -> tuple:
    """With --reviews: the dataset and the crops people labelled in those OUTs; else (None, None)."""
    if not cfg.reviews:
        return None, None
    from batch_infer.gathered_crops import gather_reviews
    from kmnist_core.datasets import load_dataset
    from kmnist_core.labelled_crops import describe

    data = load_dataset(cfg.dataset, cfg.data_dir)
    reviewed = gather_reviews(cfg.reviews, data.classes, data.input_size)
    typer.echo(f"reviews: {len(reviewed.labels)} labelled crops and {len(reviewed.negatives)} not_a_character "
               f"from {len(cfg.reviews)} OUT(s) ({describe(reviewed.sources)})")
    return data, reviewed


def print_trained(card: dict, dataset: str, out: Path) -> None:
    test = card["metrics"]["test"]
    typer.echo(f"{dataset} test accuracy {test['accuracy']:.4f} (balanced {test['balanced_accuracy']:.4f}) "
               f"on {test['n']} images; ECE {card['calibration']['ece_before']:.2%} -> "
               f"{card['calibration']['ece_after']:.2%} at T={card['calibration']['temperature']:.2f}")
    if "reviews" in card:
        held = card["reviews"]["held_out"]
        typer.echo(f"held-out reviewed crops ({held['after']['characters']} labelled, {held['after']['negatives']} "
                   f"not_a_character): " + review_line(held["after"], held["before"]))
    typer.echo(f"model directory and plots: {out}")


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def review_line(figures: dict, before: dict | None = None) -> str:
    """Accuracy and auto-accepted share (its precision, its errors) on reviewed crops, and the not_a_character
    crops caught as unknown; each as `before -> figures` when `before` is given."""
    def pair(key: str, show=percent) -> str:
        return f"{show(before.get(key))} -> {show(figures.get(key))}" if before else show(figures.get(key))

    line = (f"accuracy {pair('accuracy')}, auto-accepted {pair('auto_accepted_share')} at precision "
            f"{pair('auto_accepted_precision')} ({pair('auto_accepted_errors', str)} wrong)")
    if figures.get("negatives"):
        line += f"; not_a_character caught as unknown {pair('negatives_caught_unknown_share')}"
    return line


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
    reviews: Optional[List[str]] = typer.Option(None, "--reviews", help="a predict OUT with review decisions: also "
                                                                        "score the crops people labelled there; "
                                                                        "repeatable"),
):
    """Score a model on a labelled split: accuracy, calibration, auto-accepted share and precision, plots."""
    from kmnist_core.datasets import load_dataset
    from kmnist_core.evaluate_model import run_evaluate
    from kmnist_core.model_dir import load_model

    if split not in ("train", "val", "test"):
        raise KmnistError(f"unknown split {split!r}; choose train, val or test")
    if unknown is not None and not unknown.is_dir():
        raise KmnistError(f"--unknown {unknown} is not a folder")
    predictor = load_model(model, precision=precision)
    reviewed = None
    if reviews:
        from batch_infer.gathered_crops import gather_reviews

        reviewed = gather_reviews(reviews, predictor.classes, predictor.input_size)
    metrics = run_evaluate(predictor, load_dataset(dataset, data_dir), split, out, unknown, reviewed)
    review = metrics["review"]
    precision = review["auto_accepted_precision"]
    typer.echo(f"{dataset}/{split}: accuracy {metrics['accuracy']:.4f}, balanced {metrics['balanced_accuracy']:.4f} "
               f"on {metrics['n']} images; ECE {metrics['calibration']['ece_after']:.2%}")
    typer.echo(f"auto-accepted {review['auto_accepted_share']:.2%} at precision "
               + (f"{precision:.2%}" if precision is not None else "-")
               + f" ({review['auto_accepted_errors']} wrong, {review['unknown_share']:.2%} flagged unknown)")
    typer.echo(f"precision {predictor.precision}" + (f" ({predictor.precision_note})" if predictor.precision_note else ""))
    if "int8_vs_fp32" in metrics:
        c = metrics["int8_vs_fp32"]
        i8, f32 = c["int8"], c["fp32"]
        typer.echo(f"int8 vs fp32: top-1 agreement {c['agreement']:.2%}; accuracy {i8['accuracy']:.2%} vs {f32['accuracy']:.2%}; "
                   f"ECE {i8['ece_after']:.2%} vs {f32['ece_after']:.2%}; auto-accepted "
                   f"{i8['review']['auto_accepted_share']:.2%} vs {f32['review']['auto_accepted_share']:.2%} "
                   f"({i8['review']['auto_accepted_errors']} vs {f32['review']['auto_accepted_errors']} wrong); "
                   f"{c['fp32_rows_share']:.2%} of rows near a decision computed in fp32 (the twin alone agrees on "
                   f"{c['twin_alone_agreement']:.2%})")
    if unknown is not None:
        u = metrics["unknown"]
        typer.echo(f"out-of-set {unknown}: {u['auto_accepted_share']:.2%} of {u['n']} auto-accepted; "
                   + ", ".join(f"{k} {v['auto_accepted_share']:.2%}" for k, v in u["by_kind"].items()))
    if reviewed is not None:
        r = metrics["reviews"]
        typer.echo(f"reviewed crops of {', '.join(reviews)} ({r['characters']} labelled, {r['negatives']} "
                   f"not_a_character): {review_line(r)}")
    typer.echo(f"metrics and plots: {out}")


model_app = typer.Typer(help="Maintain a model directory.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("int8")
@user_errors
def model_int8(
    model: str = typer.Argument(..., help="model directory"),
    data_dir: Optional[str] = typer.Option(None, help="where the card's training dataset is (default: as trained)"),
):
    """Build the model's ONNX twins from its torch weights: fp32 (model.fp32.onnx, checked against torch) and
    int8 (model.int8.onnx and its probe, calibrated on the card's training data and checked against fp32
    on validation); write them and the card's sections into the directory."""
    require_torch("kmnist-batch model int8")
    from kmnist_core.experiment import build_twin

    card = build_twin(model, data_dir)
    gate = card.int8.gate
    check = card.fp32_onnx.check
    typer.echo(f"fp32 twin of {model}: logits within {check['max_abs_logit_diff']:.1g} of torch on {check['images']:,} "
               f"images, {check['decisions_differ']} decisions differ; "
               + ("enabled" if card.fp32_onnx.enabled else f"not enabled ({card.fp32_onnx.fallback})"))
    typer.echo(f"int8 twin of {model}: validation top-1 agreement {gate['agreement']:.2%}, accuracy "
               f"{gate['accuracy_int8']:.2%} vs {gate['accuracy_fp32']:.2%} fp32; "
               + ("enabled" if card.int8.enabled else f"not enabled ({card.int8.fallback})"))


def print_summary(summary: dict, out: str) -> None:
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()) or "none"
    errors = ", ".join(f"{k} {v}" for k, v in summary["errors_by_kind"].items()) or "none"
    speed = f"{summary['crops_per_s']:,.0f} crops/s" if summary.get("crops_per_s") else "-"
    reasons = ", ".join(f"{k} {v:,}" for k, v in summary["review_reasons"].items())
    report = summary.get("report_dir", out)  # an object store's report lives in its generation's folder
    typer.echo("\n".join([
        f"files        {summary['files_seen']:,} rows ({summary['predicted']:,} predicted, {summary['errors']:,} errors: {errors})",
        f"skipped      {skipped}",
        f"needs review {summary['needs_review']:,}: {reasons} (low confidence: below {summary['review_below']:.3f})",
        f"inverted     {summary['inverted']:,} crops were dark ink on light paper",
        f"throughput   {speed} end to end (checks, model load and Ray start-up included)",
        f"predictions  {out}/predictions",
        f"summary      {report}/summary (plots, by_folder.csv, summary.json)",
        f"review queue {report}/summary/review.html (and review_sheet-<reason>-<n>.png)",
        f"final        {report}/final (one row per prediction row, the review decisions folded in)",
    ]))
    reviews = summary.get("reviews") or {}
    if reviews.get("decisions"):
        from reviews.final import review_lines

        typer.echo("\n".join(f"{label:<12} {text}" for label, text in review_lines(reviews)))
    if summary.get("pages"):
        print_pages(summary["pages"], report)


def print_pages(pages: dict, out: str) -> None:
    """The page lines of a box-manifest run: where the text is, accuracy, the pages to review first."""
    accuracy = pages.get("accuracy")
    left = f", {pages['left']:,} left after {pages['reviewed']:,} reviewed" if pages.get("reviewed") else ""
    lines = [f"pages        {pages['pages']:,} pages, {pages['boxes']:,} boxes ({pages['review']:,} need review{left}): "
             f"{out}/pages.parquet (text in reading order), {out}/pages_kaggle.csv"
             + (f", {out}/alto/" if pages.get("alto") else ""),
             f"page views   {out}/summary/pages/ ({pages['overlays']} pages)"]
    if accuracy and accuracy["accuracy"] is not None:
        lines.append(f"accuracy     {accuracy['accuracy']:.2%} of {accuracy['boxes_with_truth']:,} boxes with a truth "
                     f"(per page: pages.parquet)")
    review = [p for p in pages["most_review"] if p["n_left"]][:5]
    if review:
        lines.append("review first " + ", ".join(
            f"{terminal(p['page_id'])} ({p['n_left']}/{p['n_boxes']})" for p in review))
    typer.echo("\n".join(lines))


def print_reviews_kept(reviews: dict, out: str) -> None:
    """The one line a run that predicted decided rows again owes the people who decided them."""
    if reviews.get("predicted_again"):
        typer.echo(f"reviews kept {reviews['predicted_again']:,} review decisions point at rows this run predicted "
                   f"again ({reviews['made_on_another_model']:,} made on another model's predictions); they stay in "
                   f"{out}/reviews/ and final/ applies them to the new rows")


@app.command()
@user_errors
def predict(
    # Plain strings, not Path: Path("s3://b/x") would become "s3:/b/x" and hide that it is a URL.
    inputs: Optional[List[str]] = typer.Argument(None, help="folders (searched recursively), image files, or "
                                                            "object-store prefixes such as s3://bucket/crops"),
    out: str = typer.Option(..., help="output folder or object-store prefix: predictions/ (Parquet), summary/, run.json"),
    model: str = flag("model"),
    address: Optional[str] = flag("address"),
    executor: str = flag("executor"),
    precision: str = flag("precision"),
    batch_size: int = flag("batch_size"),
    workers: int = flag("workers"),
    cpus_per_worker: float = flag("cpus_per_worker"),
    gpus_per_worker: float = flag("gpus_per_worker"),
    review_below: Optional[float] = flag("review_below"),
    ood_threshold: Optional[float] = flag("ood_threshold"),
    resume: bool = flag("resume"),
    retry_errors: bool = flag("retry_errors"),
    overwrite: bool = flag("overwrite"),
    rows_per_shard: int = flag("rows_per_shard"),
    read_retries: int = flag("read_retries"),
    retry_backoff: float = flag("retry_backoff_s"),
    progress_every: float = progress_every_option(),
    quiet: bool = quiet_option(),
    manifest: Optional[str] = flag("manifest"),
    pages: Optional[str] = flag("pages"),
    export: Optional[List[str]] = flag("export"),
):
    """Predict every crop under INPUTS (or every row of --manifest) into Parquet, then write the summary."""
    given = {name: value for name, value in locals().items() if name not in ("inputs", "out", "progress_every", "quiet")}
    check_progress_every(progress_every)
    from kmnist_core.out_lock import refuse_if_busy
    from kmnist_core.storage import is_uri, resolve

    if not is_uri(out):  # a busy local OUT is refused at once, before the fork; an object store's lock is
        refuse_if_busy(resolve(out))  # read by the child: no client exists before the fork
    from batch_infer.supervise import run_supervised

    work = functools.partial(predict_in_child, inputs or [], out, given, progress_every, quiet)
    code, error = run_supervised(out, work)
    if error:
        typer.echo(f"error: {error}", err=True)
    if code:
        raise typer.Exit(code)


def predict_options(given: dict) -> PredictOptions:
    """The PredictOptions of predict's flags, named as its fields (but --retry-backoff, retry_backoff_s)."""
    fields = {name: value for name, value in given.items() if name not in ("retry_backoff", "export")}
    return PredictOptions(**fields, retry_backoff_s=given["retry_backoff"], export=tuple(given["export"] or ()))


def predict_in_child(inputs: list[str], out: str, given: dict, progress_every: float, quiet: bool) -> tuple[int, str]:
    """The run, in the child process batch_infer/supervise.py forks (torch is imported only here): its exit
    code and how it ended. Ctrl-C and SIGTERM raise KeyboardInterrupt here (the handlers run_supervised sets)."""
    # A full disk also fails Ray's own log files; the one error line says what happened, without the
    # "--- Logging error ---" tracebacks Python prints by default for every failed log write.
    logging.raiseExceptions = False
    try:
        from kmnist_core.out_lock import refuse_if_busy
        from kmnist_core.storage import resolve

        refuse_if_busy(resolve(out))  # before the imports below, which load torch: a busy OUT is refused at once
        from batch_infer.job import run_predict
        from batch_infer.progress import RunProgress

        progress = RunProgress(out, every_s=progress_every, quiet=quiet)
        run = run_predict(inputs, out, predict_options(given), progress=progress)
        print_summary({**run["report"], "crops_per_s": run["crops_per_s"]}, run["out"])
        print_reviews_kept(run.get("reviews") or {}, run["out"])
        return 0, "completed"
    except KmnistError as e:
        typer.echo(f"error: {terminal(str(e), newlines=True)}", err=True)  # messages name files from data
        return e.exit_code, "user_error"
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        return Interrupted.exit_code, "interrupted"
    except BaseException:  # a bug, not a user error: show it (run.json records it too)
        traceback.print_exc()
        return 1, "bug"


@app.command()
@user_errors
def report(out: str = typer.Argument(..., help="a predict output folder or object-store prefix")):
    """Rebuild OUT/summary/ (plots, by_folder.csv, summary.json), OUT/final/ (the review decisions in
    OUT/reviews/ folded into the rows) and the page outputs (with the exports the run asked for) from the
    Parquet output, and publish them as one set: readers see the old report or the new one, never half."""
    from kmnist_core.arrow_memory import lean_arrow
    from reviews.report import write_report_set
    from kmnist_core.storage import resolve

    lean_arrow()
    location = resolve(out)
    print_summary(write_report_set(location), location.uri)


@app.command()
@user_errors
def review(
    out: str = typer.Argument(..., help="a predict output folder or object-store prefix"),
    port: int = typer.Option(8765, help="port to listen on; 0: any free port (the printed URL names it)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on; 0.0.0.0 serves every network interface "
                                               "(a warning says what that exposes: for remote review prefer an "
                                               "SSH tunnel, or TLS)"),
    ssl_certfile: Optional[Path] = typer.Option(None, "--ssl-certfile", help="serve HTTPS with this PEM certificate "
                                                                            "(with --ssl-keyfile)"),
    ssl_keyfile: Optional[Path] = typer.Option(None, "--ssl-keyfile", help="the PEM private key of --ssl-certfile"),
    reviewer: Optional[str] = typer.Option(None, help="name recorded with each decision (default: the login name)"),
    audit: int = typer.Option(0, help="also serve a seeded random sample of N auto-accepted rows, stratified by "
                                      "predicted class and confidence: their measured error rate"),
    seed: int = typer.Option(0, help="seed of the --audit sample (the same OUT and seed give the same sample)"),
    import_csv: Optional[Path] = typer.Option(None, "--import", help="record the decisions in a CSV (columns path "
                                                                    "or key, label, optional reviewer) and exit"),
    conflicts: bool = typer.Option(False, "--conflicts", help="list the keys reviewers gave different labels and exit"),
):
    """Review the rows predict flagged in a local web app: prints its URL (with its access token) and
    serves until Ctrl-C. Each decision is appended to OUT/reviews/ before the page shows it as saved."""
    from reviews.store import default_reviewer
    from kmnist_core.storage import resolve
    from reviews.queue import open_run

    if audit < 0:
        raise KmnistError("--audit takes a number of rows >= 0")
    if not host.strip():  # bind("") would listen on every interface without saying so
        raise KmnistError("--host takes an address to listen on, such as 127.0.0.1 (the default) or 0.0.0.0")
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise KmnistError("--ssl-certfile and --ssl-keyfile go together: give both for HTTPS, or neither")
    location = resolve(out)
    reviewer = reviewer or default_reviewer()
    if import_csv is not None or conflicts:
        open_run(location)  # anything but a predict output is one error line (serve checks it too)
    if import_csv is not None:
        from reviews.import_csv import import_decisions

        count = import_decisions(location, import_csv, reviewer)
        typer.echo(f"recorded {count:,} decisions from {import_csv} in {location.uri}/reviews")
        return
    if conflicts:
        from reviews.stats import conflicts as find_conflicts, conflicts_text
        from reviews.store import read_history

        typer.echo(conflicts_text(find_conflicts(read_history(location))))
        return
    from reviews.server import serve

    serve(out, host, port, reviewer, audit, seed, echo=typer.echo, certfile=ssl_certfile, keyfile=ssl_keyfile)


@app.command()
@user_errors
def status(
    out: str = typer.Argument(..., help="a predict or tune output folder (or object-store prefix)"),
    json_output: bool = typer.Option(False, "--json", help="print the status as JSON, for scripts"),
):
    """Where the run in OUT stands: running (progress, rate, ETA, holder), completed, failed or
    interrupted (reason, and the command that finishes it). Reads OUT only; no Ray."""
    from batch_infer.status import run_status, status_text
    from kmnist_core.files import json_text

    state = run_status(out)
    # Records name files, hosts and reasons from data; the escapes keep JSON valid JSON of the same values.
    typer.echo(terminal(json_text(state).rstrip() if json_output else status_text(state), newlines=True))


def parse_list(text: str, kind, option: str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise KmnistError(f"{option} takes a comma-separated list, got {text!r}") from None


@app.command()
@user_errors
def tune(
    out: Path = typer.Option(..., help="output directory: trials, history, plots, best/"),
    dataset: str = grid_flag("dataset"),
    model: str = grid_flag("model"),
    lr: str = grid_flag("lrs", default=",".join(map(str, STUDY_LRS))),
    batch_size: str = grid_flag("batch_sizes", default=",".join(map(str, STUDY_BATCH_SIZES))),
    epochs: int = grid_flag("epochs"),
    cpus_per_trial: float = grid_flag("cpus_per_trial"),
    gpus_per_trial: float = grid_flag("gpus_per_trial"),
    scheduler: str = grid_flag("scheduler"),
    augment: str = grid_flag("augment"),
    seed: int = grid_flag("seed"),
    device: str = grid_flag("device"),
    data_dir: Optional[Path] = grid_flag("data_dir"),
    address: Optional[str] = grid_flag("address"),
    storage: Optional[str] = grid_flag("storage"),
    resume: bool = grid_flag("resume"),
    progress_every: float = progress_every_option(),
    quiet: bool = quiet_option(),
):
    """Run the learning-rate x batch-size grid with Ray Tune; the best trial (on val) becomes OUT/best."""
    check_progress_every(progress_every)
    require_torch("kmnist-batch tune")
    from kmnist_core.ray_runtime import prepare_auth

    prepare_auth(address)  # before tune.grid imports Ray
    from tune.grid import run_grid
    from tune.options import GridConfig
    from tune.progress import GridProgress

    cfg = GridConfig(dataset=dataset, model=model, lrs=tuple(parse_list(lr, float, "--lr")),
                     batch_sizes=tuple(parse_list(batch_size, int, "--batch-size")), epochs=epochs,
                     cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, scheduler=scheduler,
                     augment=augment, seed=seed, device=device, data_dir=str(data_dir) if data_dir else None,
                     address=address, storage=storage, resume=resume)
    summary = run_grid(cfg, out, GridProgress(out, every_s=progress_every, quiet=quiet))
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
