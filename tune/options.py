"""`tune`'s options, defined once (kmnist_core/options.py): defaults, CLI flags and help. Imports no
torch or Ray, so the CLI builds its flags from them before anything heavy loads."""

from __future__ import annotations

from dataclasses import dataclass

from kmnist_core.errors import KmnistError
from kmnist_core.options import option

STUDY_LRS = (0.1, 0.01, 0.001, 0.0001)
STUDY_BATCH_SIZES = (8, 16, 32, 64, 128)


@dataclass(frozen=True)
class GridConfig:
    dataset: str = option("kmnist-dev", "--dataset")
    model: str = option("simple-cnn", "--model")
    lrs: tuple[float, ...] = option(STUDY_LRS, "--lr", "learning rates, comma-separated (the study's by default)")
    batch_sizes: tuple[int, ...] = option(STUDY_BATCH_SIZES, "--batch-size", "batch sizes, comma-separated (the "
                                                                            "study's by default)")
    epochs: int = option(5, "--epochs")
    cpus_per_trial: float = option(1.0, "--cpus-per-trial")
    gpus_per_trial: float = option(0.0, "--gpus-per-trial", "fractions allowed, e.g. 0.25 = four trials per GPU")
    scheduler: str = option("none", "--scheduler", "none, or asha to stop trailing trials early")
    seed: int = option(0, "--seed")
    augment: str = option("study", "--augment")
    device: str = option("auto", "--device", "auto: cuda when the trial has a GPU")
    data_dir: str | None = option(None, "--data-dir")
    address: str | None = option(None, "--address", "Ray cluster address; default RAY_ADDRESS or a local Ray")
    storage: str | None = option(None, "--storage", "Tune storage (default OUT/ray_results); shared storage on "
                                                    "multi-node clusters")
    resume: bool = option(False, "--resume", "continue an interrupted grid without rerunning finished trials",
                          repeat=False)

    def validate(self) -> None:
        if self.scheduler not in ("none", "asha"):
            raise KmnistError(f"unknown scheduler {self.scheduler!r}; choose none or asha")
        if not self.lrs or not self.batch_sizes or any(lr <= 0 for lr in self.lrs) or any(b < 1 for b in self.batch_sizes):
            raise KmnistError("--lr and --batch-size need positive values")
        if self.epochs < 1 or self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise KmnistError("--epochs and --cpus-per-trial must be positive, --gpus-per-trial >= 0")


