"""A CropPredictor that kills its own actor process once, mid-dataset (tests/test_ray_data.py).

In its own module, imported as `tests.actor_faults`, so Ray's workers can import the class by name
(the test module itself is imported by pytest under another name)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from batch_infer.ray_data import CropPredictor


class KillOnce(CropPredictor):
    """Dies (SIGKILL, no clean-up) on its second batch if `marker` does not exist yet, creating it first:
    one kill per test, whatever the machine's speed, and only of this pipeline's actor."""

    def __init__(self, marker: str, **kwargs):
        super().__init__(**kwargs)
        self.marker = Path(marker)
        self.batches = 0

    def __call__(self, batch):
        self.batches += 1
        if self.batches == 2 and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)
