"""What the Tune tests and the two-node Tune test share: a small data directory, holds that keep a trial
waiting (tune/grid.py), and the epochs the driver has recorded. Imports no Ray at module level, so
modules that import these collect quickly where Ray tests are deselected (`make test-fast`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def hold(out: Path, lr: float, batch_size: int, epoch: int) -> Path:
    """Make the trial (lr, batch_size) of a grid into `out` wait before `epoch` until `release(path)`."""
    from tune.grid import hold_name  # imports Ray: only where a grid runs

    path = out / hold_name(lr, batch_size, epoch)
    path.write_bytes(b"")
    return path


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


def trial_epochs(experiment: Path) -> dict[float, int]:
    """lr -> the last epoch the driver has recorded for that trial (after the scheduler saw it)."""
    epochs = {}
    for trial_dir in experiment.glob("*/"):
        try:
            lr = json.loads((trial_dir / "params.json").read_text())["train"]["lr"]
            epochs[lr] = max(json.loads(line)["epoch"] for line in (trial_dir / "result.json").read_text().splitlines())
        except (OSError, ValueError, KeyError):
            continue
    return epochs
