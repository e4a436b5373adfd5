"""The console script as a user runs it: real processes, real files."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).parent / "kmnist-batch")


def run(*args, cwd=None):
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd)


def assert_one_line_error(result, needle):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr


def test_train_then_evaluate_writes_model_directory_and_plots(tmp_path):
    out = tmp_path / "model"
    r = run("train", "--dataset", "kmnist-dev", "--epochs", "1", "--threads", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout
    for name in ("model.pt", "model_card.json", "config.json", "history.csv", "training_curves.png",
                 "confusion_matrix.png", "sample_predictions.png", "reliability.png"):
        assert (out / name).stat().st_size > 0, name
    ev = tmp_path / "eval"
    r = run("evaluate", "--model", out, "--dataset", "kmnist-dev", "--split", "test", "--out", ev)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((ev / "metrics.json").read_text(encoding="utf-8"))
    card = json.loads((out / "model_card.json").read_text(encoding="utf-8"))
    # precision auto: int8 when the model passed its int8 check; the card holds the test accuracy of each.
    expected = card["int8"]["test"]["int8"]["accuracy"] if metrics["precision"] == "int8" else card["metrics"]["test"]["accuracy"]
    assert metrics["n"] == 1000 and metrics["accuracy"] == pytest.approx(expected)
    assert metrics["precision"] == ("int8" if card["int8"]["enabled"] else "fp32")
    assert len(metrics["confusion_matrix"]) == 10 and set(metrics["per_class_accuracy"]) >= {"お", "を"}


@pytest.mark.parametrize("args,needle", [
    (["train", "--dataset", "mnist", "--out", "x"], "unknown dataset 'mnist'"),
    (["train", "--model", "resnet", "--epochs", "1", "--out", "x"], "unknown model 'resnet'"),
    (["evaluate", "--model", "no/such/dir", "--out", "x"], "does not exist"),
    (["train", "--dataset", "k49", "--data-dir", "empty", "--out", "x"], "k49_classmap.csv"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    # Downloads must fail fast here (no network): point the mirror at a closed local port.
    r = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "KMNIST_BASE_URL": "http://127.0.0.1:9/"})
    assert_one_line_error(r, needle)


def test_corrupt_model_file_is_a_clear_error(tmp_path, trained_model_dir):
    broken = tmp_path / "m"
    broken.mkdir()
    card = json.loads((trained_model_dir / "model_card.json").read_text(encoding="utf-8"))
    (broken / "model.pt").write_bytes(b"\x00garbage")
    # A file other than the card names is refused before torch reads a byte of it ...
    (broken / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    assert_one_line_error(run("evaluate", "--model", broken, "--out", tmp_path / "e"), "not the ones its card names")
    # ... and one the card names but torch cannot read (a card rewritten to match) is a clear error too.
    from kmnist_core.model_dir import weights_id

    card["model_id"] = weights_id(b"\x00garbage")
    (broken / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    assert_one_line_error(run("evaluate", "--model", broken, "--out", tmp_path / "e"), "cannot load weights")


@pytest.mark.parametrize("module,needle", [("jobs.predict", "--resume"), ("jobs.tune_grid", "--storage")])
def test_job_entrypoints_have_help(module, needle):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and needle in r.stdout, r.stderr


def test_train_help_names_every_registry_model():
    from kmnist_core.models import MODELS

    r = subprocess.run([CLI, "train", "--help"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "400"})  # wide, so no name is wrapped
    assert r.returncode == 0, r.stderr
    listed = set(re.findall(r"[a-z][a-z-]*-cnn[a-z-]*", r.stdout))  # a whole name, not a prefix of another
    assert set(MODELS) <= listed, set(MODELS) - listed
