"""The console script's commands, called in this process through typer's test runner (the same `app`
the `kmnist-batch` script runs, without starting an interpreter and importing torch for each call);
`--help` of the module entry points in real processes."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from click.testing import Result
from tests.processes import CLI


def invoke(*args: object) -> Result:
    """`kmnist-batch ARGS` in this process. `predict` runs its work inline instead of in a forked child (a
    fork's output never reaches the runner; tests/test_faults.py and test_predict.py run the supervising
    parent in real processes), and this process keeps its own SIGTERM handler and logging settings."""
    import logging

    from typer.testing import CliRunner

    from jobs.cli import app

    handler, raise_exceptions = signal.getsignal(signal.SIGTERM), logging.raiseExceptions
    try:
        with mock.patch("batch_infer.supervise.run_supervised", lambda out, work: (work()[0], None)):
            return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, handler)
        logging.raiseExceptions = raise_exceptions


def assert_one_line_error(result: Result, needle: str) -> None:
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.exception  # not a crash
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr


@pytest.fixture
def small_kmnist_dev(monkeypatch, small_dev):
    """`--dataset kmnist-dev` loads the 600/200/200 cut: the commands' wiring is the point, not the data's size."""
    from kmnist_core import datasets, experiment

    real = datasets.load_dataset
    small = lambda name, *a, **k: small_dev if name == "kmnist-dev" else real(name, *a, **k)  # noqa: E731
    monkeypatch.setattr(datasets, "load_dataset", small)
    monkeypatch.setattr(experiment, "load_dataset", small)


@pytest.mark.training
def test_train_then_evaluate_writes_model_directory_and_plots(tmp_path, small_kmnist_dev):
    out = tmp_path / "model"
    r = invoke("train", "--dataset", "kmnist-dev", "--epochs", "1", "--threads", "2", "--out", out)
    assert r.exit_code == 0, r.output
    assert "test accuracy" in r.stdout
    for name in ("model.pt", "model_card.json", "config.json", "history.csv", "training_curves.png",
                 "confusion_matrix.png", "sample_predictions.png", "reliability.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["threads"] == 2  # the options reached the run
    ev = tmp_path / "eval"
    r = invoke("evaluate", "--model", out, "--dataset", "kmnist-dev", "--split", "test", "--out", ev)
    assert r.exit_code == 0, r.output
    metrics = json.loads((ev / "metrics.json").read_text(encoding="utf-8"))
    card = json.loads((out / "model_card.json").read_text(encoding="utf-8"))
    # precision auto: int8 when the model passed its int8 check; the card holds the test accuracy of each.
    expected = card["int8"]["test"]["int8"]["accuracy"] if metrics["precision"] == "int8" else card["metrics"]["test"]["accuracy"]
    assert metrics["n"] == 200 and metrics["accuracy"] == pytest.approx(expected)
    assert metrics["precision"] == ("int8" if card["int8"]["enabled"] else "fp32")
    assert len(metrics["confusion_matrix"]) == 10 and set(metrics["per_class_accuracy"]) >= {"お", "を"}


@pytest.mark.parametrize("args,needle", [
    (["train", "--dataset", "mnist", "--out", "x"], "unknown dataset 'mnist'"),
    (["train", "--model", "resnet", "--epochs", "1", "--out", "x"], "unknown model 'resnet'"),
    (["evaluate", "--model", "no/such/dir", "--out", "x"], "does not exist"),
    (["train", "--dataset", "k49", "--data-dir", "empty", "--out", "x"], "k49_classmap.csv"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, monkeypatch, closed_port, args, needle):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    # Downloads must fail fast here (no network): point the mirror at a port that refuses connections.
    monkeypatch.setenv("KMNIST_BASE_URL", f"http://127.0.0.1:{closed_port}/")
    assert_one_line_error(invoke(*args), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing written for a refused command


def test_corrupt_model_file_is_a_clear_error(tmp_path, trained_model_dir):
    broken = tmp_path / "m"
    broken.mkdir()
    card = json.loads((trained_model_dir / "model_card.json").read_text(encoding="utf-8"))
    (broken / "model.pt").write_bytes(b"\x00garbage")
    # A file other than the card names is refused before torch reads a byte of it ...
    (broken / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    assert_one_line_error(invoke("evaluate", "--model", broken, "--out", tmp_path / "e"), "not the ones its card names")
    # ... and one the card names but torch cannot read (a card rewritten to match) is a clear error too.
    from kmnist_core.model_dir import weights_id

    card["model_id"] = weights_id(b"\x00garbage")
    (broken / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    assert_one_line_error(invoke("evaluate", "--model", broken, "--out", tmp_path / "e"), "cannot load weights")


@pytest.mark.parametrize("module,needle", [("jobs.predict", "--resume"), ("jobs.tune_grid", "--storage")])
def test_job_entrypoints_have_help(module, needle):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and needle in r.stdout, r.stderr


def test_train_help_names_every_registry_model():
    from kmnist_core.models import MODELS

    r = subprocess.run([CLI, "train", "--help"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})  # wide, so no name is wrapped
    assert r.returncode == 0, r.stderr
    listed = set(re.findall(r"[a-z][a-z-]*-cnn[a-z-]*", r.stdout))  # a whole name, not a prefix of another
    assert set(MODELS) <= listed, set(MODELS) - listed


def test_train_options_are_train_configs_fields():
    """`train`'s flags, defaults and help come from TrainConfig (kmnist_core/train_options.py), and what is
    given becomes the TrainConfig: paths as text, lists as lists, what is not given at TrainConfig's default;
    --init lends its architecture and outlier exposure unless told otherwise."""
    import dataclasses

    import typer.main

    from jobs.cli import app, train_config
    from kmnist_core.train_options import TrainConfig

    command = typer.main.get_command(app).commands["train"]
    params = {p.name: p for p in command.params}
    flagged = [f for f in dataclasses.fields(TrainConfig) if "flag" in f.metadata]
    assert {f.name for f in flagged} == set(params) - {"out"}
    for f in flagged:
        p = params[f.name]
        assert p.opts == [f.metadata["flag"]] and p.help == f.metadata["help"]
        if f.name not in ("model", "negatives") and f.default is not dataclasses.MISSING:
            assert p.default == f.default, f.name  # model, negatives: None, so --init's can take their place
    context = command.make_context("train", ["--out", "m", "--epochs", "3", "--teacher", "t1", "--teacher", "t2",
                                             "--data-dir", "d"])
    given = {k: v for k, v in context.params.items() if k != "out"}
    assert train_config(dict(given)) == TrainConfig(epochs=3, teachers=["t1", "t2"], data_dir="d")
    tuned = train_config({**given, "init": "default", "teachers": None})
    assert (tuned.model, tuned.negatives) == ("compact-cnn-wide", "synth")  # the default model's
