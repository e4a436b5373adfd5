"""Inference without torch (issue 37): an install without the [train] extra predicts, reports, evaluates and
reviews, in the CLI process and in Ray's workers, and gives the rows the full install gives.

torch is made unimportable with tests/no_torch/sitecustomize.py on PYTHONPATH, which every process the
CLI starts inherits (Ray's raylet and workers too); each process that loads it writes its pid to a log,
so the test sees that Ray's workers ran under it. The base requirements are checked in pyproject.toml."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.processes import CLI

ROOT = Path(__file__).resolve().parent.parent
BLOCKER = ROOT / "tests" / "no_torch"
TRAIN_ONLY = {"torch", "torchvision", "onnx", "triton"}  # and every nvidia-* CUDA library

pytestmark = [pytest.mark.timeout(300), pytest.mark.own_ray]  # its Ray is the CLI's own local one


def requirement_name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()


def test_the_base_requirements_name_no_torch_and_the_train_extra_adds_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    base = {requirement_name(r) for r in project["dependencies"]}
    assert not [n for n in base if n in TRAIN_ONLY or n.startswith("nvidia")], base
    assert {"onnxruntime", "ray"} <= base
    train = {requirement_name(r) for r in project["optional-dependencies"]["train"]}
    assert {"torch", "torchvision", "onnx"} <= train


def no_torch_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "KMNIST_NO_TORCH_PIDS": str(tmp_path / "pids"),
            "PYTHONPATH": os.pathsep.join(p for p in (str(BLOCKER), os.environ.get("PYTHONPATH", "")) if p)}


def cli(env: dict[str, str], *args) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *map(str, args)], env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)


def rows(out: Path, *drop: str):
    """Prediction rows read back without Ray, in path order, without the columns that name the run."""
    table = pq.ParquetDataset(out / "predictions").read()
    table = table.drop_columns([c for c in ("run_id", "node_id", *drop) if c in table.column_names])
    return table.sort_by("path")


def test_blocked_torch_is_blocked(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import torch"], env=no_torch_env(tmp_path), capture_output=True, text=True)
    assert r.returncode == 1 and "tests/no_torch blocks it" in r.stderr


def test_predict_report_status_and_evaluate_run_without_torch_and_give_the_full_installs_rows(tmp_path):
    full, bare = dict(os.environ), no_torch_env(tmp_path)
    crops = ROOT / "examples" / "crops"
    assert cli(full, "predict", crops, "--executor", "local", "--out", tmp_path / "full").returncode == 0
    local = cli(bare, "predict", crops, "--executor", "local", "--out", tmp_path / "local")
    assert local.returncode == 0, local.stderr
    on_ray = cli(bare, "predict", crops, "--executor", "ray", "--workers", "2", "--out", tmp_path / "ray")
    assert on_ray.returncode == 0, on_ray.stderr
    expected = rows(tmp_path / "full")
    assert len(expected) == 300 and set(expected.column("precision").to_pylist()) == {"int8", "fp32"}
    assert rows(tmp_path / "local").equals(expected) and rows(tmp_path / "ray").equals(expected)
    loaded_by = (tmp_path / "pids").read_text(encoding="utf-8")
    assert loaded_by.count("default_worker.py") >= 2  # Ray's workers ran with torch blocked

    for command in (("report", tmp_path / "ray"), ("status", tmp_path / "ray"),
                    ("evaluate", "--model", "default", "--split", "test", "--precision", "int8", "--out", tmp_path / "e8"),
                    ("evaluate", "--model", "default", "--split", "test", "--precision", "fp32", "--out", tmp_path / "e32")):
        r = cli(bare, *command)
        assert r.returncode == 0, (command, r.stderr)


def test_the_page_demo_runs_without_torch_and_writes_the_full_installs_pages(tmp_path):
    manifest = ROOT / "examples" / "pages" / "kaggle.csv"
    for name, env in (("full", dict(os.environ)), ("bare", no_torch_env(tmp_path))):
        r = cli(env, "predict", "--manifest", manifest, "--export", "alto", "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
    assert rows(tmp_path / "bare").equals(rows(tmp_path / "full"))
    pages = [pq.read_table(tmp_path / name / "pages.parquet") for name in ("full", "bare")]
    assert len(pages[0]) == 2 and pages[0].equals(pages[1])
    alto = sorted(p.relative_to(tmp_path / "full" / "alto") for p in (tmp_path / "full" / "alto").rglob("*.xml"))
    assert len(alto) == 2
    for rel in alto:
        assert (tmp_path / "bare" / "alto" / rel).read_bytes() == (tmp_path / "full" / "alto" / rel).read_bytes()


def test_commands_that_need_torch_say_so_in_one_line(tmp_path):
    bare = no_torch_env(tmp_path)
    for command in (("train", "--dataset", "kmnist-dev", "--epochs", "1", "--out", tmp_path / "m"),
                    ("model", "int8", ROOT / "kmnist_core" / "default_model"),
                    ("tune", "--out", tmp_path / "grid")):
        r = cli(bare, *command)
        assert r.returncode == 2, (command, r.stderr)
        errors = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("error: ") and "kmnist-batch[train]" in errors[0], r.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "grid").exists()
    r = subprocess.run([sys.executable, "-m", "jobs.recipe", "review"], env=bare, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: ") and "kmnist-batch[train]" in r.stderr


def test_the_review_app_and_the_ray_data_stage_import_without_torch(tmp_path):
    code = "import batch_infer.ray_data, reviews.server, reviews.queue, reviews.report, batch_infer.status"
    r = subprocess.run([sys.executable, "-c", code], env=no_torch_env(tmp_path), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
