"""`train`'s options, defined once (kmnist_core/options.py): the TrainConfig every training run takes (the CLI,
Tune's trials, the k-fold recipe), its defaults, and the CLI flag and help of each field a user sets. Imports
no torch, so the CLI builds its flags from them before anything heavy loads; kmnist_core/train.py runs it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from kmnist_core.errors import KmnistError
from kmnist_core.options import option


@dataclass
class TrainConfig:
    dataset: str = option("kmnist-dev", "--dataset", "kmnist-dev (bundled), kmnist, k49 or kkanji")
    model: str = option("simple-cnn", "--model", "simple-cnn (the study's), compact-cnn, compact-cnn-wide, "
                                                 "compact-cnn-wide-reject (negatives as a class: with --negatives "
                                                 "synth), vgg-cnn, vgg-cnn-half, vgg-cnn-slim; default: --init's "
                                                 "architecture, else simple-cnn")
    epochs: int = option(10, "--epochs")
    lr: float = option(1e-3, "--lr")
    batch_size: int = option(64, "--batch-size")
    seed: int = option(0, "--seed")
    device: str = option("auto", "--device", "auto, cpu, cuda")
    optimizer: str = option("adam", "--optimizer", "adam (the study's) or adamw")
    weight_decay: float = option(0.0, "--weight-decay")
    schedule: str = option("constant", "--schedule", "constant or onecycle")
    augment: str = option("study", "--augment", "none, study (±10° rotation) or strong")  # transforms.AUGMENTATIONS
    threads: int = option(0, "--threads", "torch CPU threads (0 = torch default)")
    data_dir: str | None = option(None, "--data-dir", "directory with (or receiving) the official files")
    eval_batch_size: int = 1024
    # Knowledge distillation: trained model directories whose averaged predictions on the *same*
    # augmented batch are the student's targets ("consistent" distillation, Beyer et al. 2022).
    teachers: list[str] = option(None, "--teacher", "model directory to distill from (its predictions on each "
                                                    "augmented batch become the targets); repeat for an ensemble, "
                                                    "whose mean probabilities are used", factory=list)
    distill_temperature: float = option(1.0, "--distill-temperature", "softmax temperature of the distillation loss")
    mixup: float = option(0.0, "--mixup", "mixup Beta(a, a) parameter; 0 = off")
    init: str | None = option(None, "--init", "model directory (or 'default') whose weights start the run")
    # Outlier exposure (Hendrycks et al. 2019): synthetic non-characters (kmnist_core.negatives) are
    # pushed towards the uniform distribution, so "none of these" gets a low score.
    negatives: str = option("none", "--negatives", "none, or synth: outlier exposure with synthetic non-characters; "
                                                   "default: --init's, else none")
    outlier_weight: float = option(0.5, "--outlier-weight", "weight of the outlier-exposure loss")
    negative_fonts: list[str] = option(None, "--negative-font", "extra font for rendered non-character glyphs "
                                                                "(IPAexGothic is always used); repeatable",
                                       factory=list)  # fonts beside IPAexGothic for rendered glyphs
    negative_mix: dict[str, float] = field(default_factory=dict)  # kind -> share (negatives.KINDS); {} = DEFAULT_MIX
    # Learning from review decisions (docs/training.md): crops people labelled in predict runs, read from
    # these OUTs by the CLI (batch_infer/gathered_crops.py) and handed to run_train as a ReviewedCrops.
    reviews: list[str] = option(None, "--reviews", "a predict OUT whose review decisions to learn from (labelled "
                                                   "crops; not_a_character as outlier exposure); repeatable",
                                factory=list)
    review_share: float = option(0.5, "--review-share", "with --reviews: share of each epoch's images that are "
                                                        "reviewed crops (the rest: the dataset's training split)")
    review_holdout: float = option(0.3, "--review-holdout", "with --reviews: share of the reviewed crops held out "
                                                            "(per label, seeded by --seed) to measure before/after")

    def validate(self) -> None:
        from kmnist_core import transforms  # torch: only once a run is about to start

        if self.augment not in transforms.AUGMENTATIONS:
            raise KmnistError(f"unknown augmentation {self.augment!r}; choose from: {', '.join(transforms.AUGMENTATIONS)}")
        if self.optimizer not in ("adam", "adamw"):
            raise KmnistError(f"unknown optimizer {self.optimizer!r}; choose adam or adamw")
        if self.schedule not in ("constant", "onecycle"):
            raise KmnistError(f"unknown schedule {self.schedule!r}; choose constant or onecycle")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise KmnistError("epochs and batch size must be >= 1 and lr > 0")
        if not self.distill_temperature > 0 or self.mixup < 0:
            raise KmnistError("distill temperature must be > 0 and mixup >= 0")
        if self.negatives not in ("none", "synth") or self.outlier_weight < 0:
            raise KmnistError(f"unknown negatives {self.negatives!r} (choose none or synth), or outlier weight < 0")
        if not (0 < self.review_share < 1 and 0 < self.review_holdout < 1):
            raise KmnistError("review share and review holdout must be between 0 and 1 (exclusive)")
        from kmnist_core.negatives import KINDS

        unknown = sorted(set(self.negative_mix) - set(KINDS))
        if unknown or any(v < 0 for v in self.negative_mix.values()):
            raise KmnistError(f"negative mix: unknown kinds {unknown} or a negative share; kinds: {', '.join(KINDS)}")
        missing = [f for f in self.negative_fonts if not Path(f).is_file()]
        if missing:
            raise KmnistError(f"font file not found: {', '.join(missing)}")

    def to_dict(self) -> dict:
        return asdict(self)
