"""`predict`'s options, defined once (kmnist_core/options.py): defaults, CLI flags and help. Imports no
torch, so the CLI builds its flags from them before anything heavy loads."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kmnist_core.errors import KmnistError
from kmnist_core.options import option
from kmnist_core.precision import PRECISIONS, ModelRequest

EXECUTORS = ("auto", "local", "ray")
EXPORTS = ("alto",)


@dataclass(frozen=True)
class PredictOptions:
    model: str = option("default", "--model", "model directory, or 'default' (shipped in the package)")
    address: str | None = option(None, "--address", "Ray cluster address; default RAY_ADDRESS or a local Ray")
    executor: str = option("auto", "--executor", "auto: small jobs with no cluster given run in this process, the "
                                                 "rest on Ray; local; ray")
    precision: str = option("auto", "--precision", "auto: int8 (ONNX Runtime) on CPU where the model has an int8 twin "
                                                   "that passed its checks, fp32 on GPU; fp32; int8")
    batch_size: int = option(1024, "--batch-size", "crops per model call")
    workers: int = option(0, "--workers", "Ray workers (each reads, decodes, predicts and writes); 0 = as many as "
                                          "the cluster has room for")
    cpus_per_worker: float = option(1.0, "--cpus-per-worker")
    gpus_per_worker: float = option(0.0, "--gpus-per-worker", "GPUs per model actor (fractions allowed)")
    review_below: float | None = option(None, "--review-below", "low_confidence review below this confidence; "
                                                                "default from the model card")
    ood_threshold: float | None = option(None, "--ood-threshold", "unknown_character above this out-of-set score "
                                                                  "(the card's ood_score: for max-softmax, minus the "
                                                                  "top probability); default from the model card")
    resume: bool = option(False, "--resume", "finish an interrupted run into the same OUT (also re-reads "
                                             "unreadable and truncated files)", repeat=False)
    overwrite: bool = option(False, "--overwrite", "replace earlier predictions in OUT (kept until this run commits "
                                                   "its first shard)", repeat=False)
    retry_errors: bool = option(False, "--retry-errors", "with --resume: re-read every error row; each new row "
                                                         "replaces the old", repeat=False)
    read_retries: int = option(2, "--read-retries", "extra reads of an unreadable or truncated file within the run")
    retry_backoff_s: float = option(0.5, "--retry-backoff", "seconds before the first extra read; doubles each time")
    rows_per_shard: int = option(4096, "--rows-per-shard", "files per listing chunk, one Parquet file each (on "
                                                           "average); also what a killed run can lose")
    manifest: str | None = option(None, "--manifest", "CSV or Parquet listing crops (path) or boxes on pages (path, "
                                                      "x, y, width, height), or Kaggle image_id,labels; instead of "
                                                      "INPUTS")
    pages: str | None = option(None, "--pages", "with a Kaggle-format --manifest: folder of the page images "
                                                "(default: beside the manifest)")
    export: tuple[str, ...] = option((), "--export", "page export beyond pages.parquet: alto (one ALTO 4 XML per "
                                                     "page)", repeated_flag=True)

    def validate(self) -> None:
        if self.resume and self.overwrite:
            raise KmnistError("--resume and --overwrite contradict each other; pick one")
        if self.retry_errors and not self.resume:
            raise KmnistError("--retry-errors re-reads the error rows of an earlier run; use it with --resume")
        if self.batch_size < 1 or self.workers < 0 or self.rows_per_shard < 1:
            raise KmnistError("--batch-size and --rows-per-shard must be >= 1, --workers >= 0")
        if self.review_below is not None and not 0 <= self.review_below <= 1:
            raise KmnistError("--review-below must be a probability between 0 and 1")
        if self.ood_threshold is not None and not math.isfinite(self.ood_threshold):
            raise KmnistError("--ood-threshold must be a finite number")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise KmnistError("--cpus-per-worker must be > 0 and --gpus-per-worker >= 0")
        if self.read_retries < 0 or self.retry_backoff_s < 0:
            raise KmnistError("--read-retries and --retry-backoff must be >= 0")
        if self.precision not in PRECISIONS:
            raise KmnistError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.executor not in EXECUTORS:
            raise KmnistError(f"--executor must be one of {', '.join(EXECUTORS)}")
        if set(self.export) - set(EXPORTS):
            raise KmnistError(f"--export takes {', '.join(EXPORTS)}, got {', '.join(sorted(set(self.export) - set(EXPORTS)))}")
        if self.export and not self.manifest:
            raise KmnistError("--export writes page files: it needs a --manifest of boxes on pages")
        if self.pages and not self.manifest:
            raise KmnistError("--pages names where a Kaggle-format --manifest's page images are")

    def model_request(self) -> ModelRequest:
        """What these options ask of the model: the workers' device follows --gpus-per-worker."""
        return ModelRequest(self.model, self.precision, "cuda" if self.gpus_per_worker > 0 else "cpu",
                            self.review_below, self.ood_threshold)
