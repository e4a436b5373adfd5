"""Following a tune grid (issue 16): its start line and progress lines in a log file, and `kmnist-batch
status` on its OUT while it runs and once it is done. Real local Ray, real kmnist-dev images."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_faults import wait_for
from tests.test_follow_run import status
from tests.test_tune import small_data_dir  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]
CLI = str(Path(sys.executable).parent / "kmnist-batch")
GRID_LINE = re.compile(r"^\d\d:\d\d:\d\d grid (\d+)/4 trials \((\d+) running, (\d+) pending, (\d+) errored")



def test_grid_logs_start_and_progress_lines_and_status_follows_it(tmp_path, small_data_dir):  # noqa: F811
    out, log = tmp_path / "g", tmp_path / "tune.log"
    with open(log, "w") as stdout:
        proc = subprocess.Popen([CLI, "tune", "--out", str(out), "--lr", "0.003,0.001", "--batch-size", "32,64",
                                 "--epochs", "2", "--data-dir", str(small_data_dir), "--progress-every", "1"],
                                stdout=stdout, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "_progress.json").exists(), timeout=120)
        s = status(out)
        assert s["kind"] == "tune" and s["state"] == "running" and s["alive_judged_by"] == "lock", s
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    lines = log.read_text(encoding="utf-8").splitlines()
    assert "start tune run" in lines[0] and "grid lr 0.003, 0.001 x batch 32, 64 = 4 trials x 2 epochs" in lines[0]
    grid = [m for m in map(GRID_LINE.match, lines) if m]
    assert len(grid) >= 2, lines
    assert all(sum(map(int, (m[1], m[2], m[3]))) == 4 for m in grid)  # done + running + pending = the grid
    assert any(re.search(r"best val 0\.\d{4} \(lr 0\.00\d+ batch \d+\)", line) for line in lines if GRID_LINE.match(line))
    assert sum(line.startswith("trial lr=") for line in lines) == 4  # the per-trial lines are still there
    assert any(re.match(r"^\d\d:\d\d:\d\d completed 4/4 trials", line) for line in lines), lines

    s = status(out)
    assert s["state"] == "completed" and s["summary"]["trials"] == 4 and s["summary"]["best"]["lr"] in (0.003, 0.001)
    assert s["progress"]["best"]["val_acc"] == pytest.approx(s["summary"]["best"]["best_val_acc"])
