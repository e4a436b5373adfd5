"""A bug is not a user's error: it shows its traceback, run.json records it, and neither the supervisor nor
`status` blames the cluster. The bug is put into a real CLI process by a sitecustomize module on its path."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.crop_tree import plain_tree
from tests.processes import CLI

REPO = Path(__file__).resolve().parents[1]


def with_bug(tmp_path: Path, target: str) -> dict:
    """The environment of a process in which `target` (module:function) raises ZeroDivisionError."""
    module, name = target.split(":")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import importlib, sys

        def broken(*args, **kwargs):
            return 1 / 0

        def patch(mod):
            setattr(mod, {name!r}, broken)

        class Finder:  # patch {module} as soon as it is imported
            def find_spec(self, fullname, path, target=None):
                if fullname != {module!r}:
                    return None
                sys.meta_path.remove(self)
                spec = importlib.util.find_spec(fullname)
                loader = spec.loader
                exec_module = loader.exec_module

                def run(mod):
                    exec_module(mod)
                    patch(mod)
                loader.exec_module = run
                return spec

        import importlib.util
        sys.meta_path.insert(0, Finder())
    """))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}


@pytest.mark.parametrize("target,recorded", [
    ("batch_infer.job:write_report_set", "failed"),  # inside the run, after every row was committed
    ("jobs.cli:print_summary", "completed"),  # after the run ended
])
def test_a_bug_after_a_completed_run_shows_its_traceback_and_is_not_called_a_lost_cluster(tmp_path, kmnist_dev,
                                                                                          target, recorded):
    plain_tree(tmp_path / "in", kmnist_dev.test.images, 20)
    out = tmp_path / "out"
    r = subprocess.run([CLI, "predict", str(tmp_path / "in"), "--out", str(out)], capture_output=True, text=True,
                       timeout=240, env=with_bug(tmp_path, target))
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "ZeroDivisionError" in r.stderr, r.stderr
    assert "lost the Ray cluster" not in r.stderr and "killed by signal" not in r.stderr
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["status"] == recorded and len(list((out / "predictions").glob("*.parquet"))) >= 1
    if recorded == "completed":
        assert run["rows_written"] == 20
    else:
        assert "every row was committed" in run["reason"] and "internal error" in run["reason"]
        assert "ZeroDivisionError" in run["detail"]
    s = subprocess.run([CLI, "status", str(out)], capture_output=True, text=True, timeout=60)
    assert s.returncode == 0 and "lost" not in s.stdout and "killed" not in s.stdout, s.stdout
    assert recorded.upper() in s.stdout
