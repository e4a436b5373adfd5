"""Training: pure functions for one epoch and for scoring, and `train_model` that runs a whole config.

`train_model` calls `on_epoch(metrics, model)` after every epoch: the CLI draws progress with it and the Tune
stage reports to Ray with it, so both run exactly this loop.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from kmnist_core import transforms
from kmnist_core.datasets import Dataset, Split
from kmnist_core.errors import KmnistError
from kmnist_core.labelled_crops import ReviewedCrops
from kmnist_core.model_dir import read_model_files
from kmnist_core.models import create_model, load_torch_model, optimize_for_inference, predict_logits
from kmnist_core.train_options import TrainConfig


@dataclass
class TrainRun:
    """Everything a training run carries between epochs; `state_dict` is what a checkpoint stores."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    generator: torch.Generator  # shuffling and augmentation draws
    history: list[dict] = field(default_factory=list)
    status: str = "completed"  # or "diverged" (training stopped early)

    def state_dict(self) -> dict:
        """Tensors and plain values only, so it loads with torch.load(weights_only=True)."""
        return {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "generator": self.generator.get_state(), "history": self.history,
                "torch_rng": torch.get_rng_state()}  # dropout draws from the global generator

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.history = list(state["history"])


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, steps_per_epoch: int):
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    opt = cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = None
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    return opt, sched


def mix_batch(x: torch.Tensor, alpha: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup: blend each image with a random partner. Returns (mixed, partner index, weight of x)."""
    # torch's Beta cannot take a generator; a numpy draw seeded from `gen` keeps runs reproducible.
    lam = float(np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen))).beta(alpha, alpha))
    partner = torch.randperm(len(x), generator=gen).to(x.device)
    return lam * x + (1 - lam) * x[partner], partner, lam


def batch_loss(logits: torch.Tensor, y: torch.Tensor, partner: torch.Tensor | None, lam: float,
               teacher_logits: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Cross-entropy on the labels (mixed when mixup is on), or KL to the teacher when distilling."""
    if teacher_logits is not None:
        t = temperature
        return F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1),
                        reduction="batchmean", log_target=True) * t * t
    loss = F.cross_entropy(logits, y)
    if partner is not None:
        loss = lam * loss + (1 - lam) * F.cross_entropy(logits, y[partner])
    return loss


def reject_loss(full_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the last output, "none of these" (a reject-class model's negatives)."""
    return F.cross_entropy(full_logits, torch.full((len(full_logits),), full_logits.shape[1] - 1,
                                                   device=full_logits.device))


def outlier_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the uniform distribution over the classes (outlier exposure)."""
    return -F.log_softmax(logits, 1).mean(1).mean()


def train_one_epoch(model, split: Split, opt, sched, cfg: TrainConfig, gen: torch.Generator, device: str,
                    teacher: TeacherEnsemble | None = None, negatives: np.ndarray | None = None) -> tuple[float, float]:
    """One pass over `split` in a seeded random order. Returns (mean loss, accuracy on the labels).

    With `negatives`, each batch also carries as many random negatives, augmented the same way.
    """
    model.train()
    aug = transforms.AUGMENTATIONS[cfg.augment]
    images = torch.from_numpy(split.images)
    labels = torch.from_numpy(split.labels)
    order = torch.randperm(len(split), generator=gen)
    # A model with a reject class (models.RejectCNN) is trained on all its outputs, the negatives labelled
    # "none of these" (its last output); the accuracy counts the characters' outputs only.
    reject = getattr(model, "reject_class", False)
    forward = model.full_logits if reject else model
    loss_sum, correct = 0.0, 0
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        x = transforms.to_model_tensor(images[idx]).to(device)
        y = labels[idx].to(device)
        if aug is not None:
            x = transforms.augment_batch(x, aug, gen)
        partner, lam = None, 1.0
        if cfg.mixup > 0:
            x, partner, lam = mix_batch(x, cfg.mixup, gen)
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():  # not inference_mode: its tensors cannot be saved for the student's backward
                teacher_logits = teacher(x.contiguous(memory_format=torch.channels_last))
        if negatives is not None:
            pick = torch.randint(len(negatives), (len(idx),), generator=gen)
            xn = transforms.to_model_tensor(torch.from_numpy(negatives)[pick]).to(device)
            if aug is not None:
                xn = transforms.augment_batch(xn, aug, gen)
            # One forward for both, so batch norm sees the mix it will see in an archive.
            logits, neg_logits = forward(torch.cat([x, xn])).split([len(x), len(xn)])
        else:
            logits = forward(x)
        loss = batch_loss(logits, y, partner, lam, teacher_logits, cfg.distill_temperature)
        if negatives is not None:
            loss = loss + cfg.outlier_weight * (reject_loss(neg_logits) if reject else outlier_loss(neg_logits))
        if reject:
            logits = logits[:, :-1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        loss_sum += loss.item() * len(idx)
        correct += (logits.argmax(1) == y).sum().item()
        if not math.isfinite(loss_sum):
            break
    return loss_sum / len(split), correct / len(split)


def split_scores(model: torch.nn.Module, split: Split, device: str, batch_size: int = 1024) -> tuple[float, float]:
    """(loss, accuracy) of `model` on `split`."""
    logits = predict_logits(model, split.images, device, batch_size)
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(split.labels)).item()
    return loss, float((logits.argmax(1) == split.labels).mean())


def diverged(metrics: dict, num_classes: int) -> bool:
    """Non-finite loss, or (from epoch 2) a model collapsed to constant predictions.

    Too-high learning rates (0.1 with Adam here) rarely give NaN: the loss sits at ln(C) and accuracy
    at chance, so a NaN check alone misses them.
    """
    if not (math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])):
        return True
    return (metrics["epoch"] >= 2 and metrics["train_loss"] >= 0.95 * math.log(num_classes)
            and metrics["val_acc"] <= 1.5 / num_classes)


class TeacherEnsemble(torch.nn.Module):
    """Frozen teachers; forward gives the log of their mean probabilities (one teacher: its log-softmax).

    Log-probabilities are logits up to a constant, so `batch_loss` softens them with its temperature as it
    would a single teacher's logits.
    """

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([F.log_softmax(m(x).float(), 1) for m in self.members])
        return torch.logsumexp(log_probs, 0) - math.log(len(self.members))


def load_teachers(paths: list[str], data: Dataset, device: str,
                  models: tuple[torch.nn.Module, ...] | list[torch.nn.Module] = ()) -> TeacherEnsemble | None:
    """Trained model directories (and trained `models`) as a frozen, inference-optimized teacher ensemble."""
    members = [optimize_for_inference(m).to(device) for m in models]
    for path in paths:  # a teacher's targets are its torch model's fp32 logits, on the training device
        card, weights = read_model_files(path)
        if card.num_classes != len(data.classes) or card.input_size != data.input_size:
            raise KmnistError(f"teacher {path} has {card.num_classes} classes at {card.input_size}px; "
                              f"{data.name} has {len(data.classes)} at {data.input_size}px")
        members.append(optimize_for_inference(load_torch_model(card, weights, str(path)).to(device)))
    return TeacherEnsemble(members).eval() if members else None


def negative_fonts(cfg: TrainConfig) -> list[Path]:
    from kmnist_core.negatives import IPAEX_GOTHIC

    return [IPAEX_GOTHIC, *map(Path, cfg.negative_fonts)]


def training_negatives(cfg: TrainConfig, data: Dataset) -> np.ndarray | None:
    """Negatives cut from the TRAIN split and the training glyphs: twice the train size, seeded."""
    if cfg.negatives == "none":
        return None
    from kmnist_core.negatives import glyph_pool, make_negatives

    images, _ = make_negatives(data.train.images, data.train.labels, 2 * len(data.train), cfg.seed,
                               glyph_pool("train"), negative_fonts(cfg), data.input_size, cfg.negative_mix or None)
    return images


def validation_negatives(cfg: TrainConfig, data: Dataset, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Negatives cut from the VAL split and held-out glyphs: for fitting the out-of-set threshold."""
    from kmnist_core.negatives import glyph_pool, make_negatives

    return make_negatives(data.val.images, data.val.labels, n, 10_000 + cfg.seed, glyph_pool("held_out"),
                          negative_fonts(cfg), data.input_size, cfg.negative_mix or None)


def repeats(n_base: int, n_extra: int, share: float) -> tuple[int, int]:
    """(times base, times extra) so that extra is about `share` of the mix: the smaller side is repeated,
    nothing is cut."""
    ratio = share * n_base / ((1 - share) * n_extra)  # extra's repeats with base taken once
    return (1, max(1, round(ratio))) if ratio >= 1 else (max(1, round(1 / ratio)), 1)


def mix_reviewed(split: Split, reviewed: ReviewedCrops | None, share: float) -> Split:
    """An epoch's images: the dataset's training split with the reviewed crops, these `share` of the mix.

    Mixed fine-tuning (Chu et al. 2017): the new data is oversampled to a fixed share and the old data
    replayed beside it, so the model learns the archive's crops without forgetting the dataset. A few
    hundred reviewed crops against thousands of training images would otherwise be a few percent of each
    epoch and barely move the model (docs/training.md has the measured trade-off).
    """
    if reviewed is None or not len(reviewed.labels):
        return split
    times_base, times_extra = repeats(len(split), len(reviewed.labels), share)
    return Split(np.concatenate([split.images] * times_base + [reviewed.images] * times_extra),
                 np.concatenate([split.labels] * times_base + [reviewed.labels] * times_extra))


def mix_reviewed_negatives(negatives: np.ndarray | None, reviewed: ReviewedCrops | None,
                           share: float) -> np.ndarray | None:
    """The outlier-exposure pool: crops reviewers called not_a_character, `share` of it beside synthetic
    negatives, or alone when the run makes none (they are real mistakes of the model: always learnt from)."""
    if reviewed is None or not len(reviewed.negatives):
        return negatives
    if negatives is None:
        return reviewed.negatives
    times_base, times_extra = repeats(len(negatives), len(reviewed.negatives), share)
    return np.concatenate([negatives] * times_base + [reviewed.negatives] * times_extra)


def load_init_weights(model: torch.nn.Module, architecture: str, init: str) -> None:
    """Start from a model directory's weights (same architecture and classes)."""
    card, weights = read_model_files(init)
    if card.architecture != architecture:
        raise KmnistError(f"--init {init} is a {card.architecture}, not a {architecture}")
    state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise KmnistError(f"--init {init} ({card.architecture}) does not fit this model: "
                          f"{str(e).splitlines()[0]}") from None


def train_model(
    cfg: TrainConfig,
    data: Dataset,
    device: str,
    on_epoch: Callable[[dict, TrainRun], None] | None = None,
    resume_state: dict | None = None,
    reviewed: ReviewedCrops | None = None,
    teacher_models: tuple[torch.nn.Module, ...] | list[torch.nn.Module] = (),
) -> TrainRun:
    """Train `cfg.model` on `data.train` (with `reviewed` crops mixed in), scoring val and test after every epoch.

    `teacher_models`: trained models to distill from besides `cfg.teachers` (directories), for callers
    whose teachers are not model directories (the k-fold recipe's per-fold teachers).

    `resume_state` (a `TrainRun.state_dict()`) continues a run from its last finished epoch. Stops
    early with status "diverged" when the loss becomes NaN/inf or the model collapses to chance.
    """
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, len(data.classes), data.input_size)
    if cfg.init:
        load_init_weights(model, cfg.model, cfg.init)
    model = model.to(device)
    train = mix_reviewed(data.train, reviewed, cfg.review_share)
    negatives = mix_reviewed_negatives(training_negatives(cfg, data), reviewed, cfg.review_share)
    opt, sched = make_optimizer(model, cfg, math.ceil(len(train) / cfg.batch_size))
    run = TrainRun(model, opt, sched, torch.Generator().manual_seed(cfg.seed))
    teacher = load_teachers(cfg.teachers, data, device, teacher_models)
    if teacher is not None and getattr(model, "reject_class", False):
        raise KmnistError(f"{cfg.model} has a reject class, which a teacher's targets do not: train it on labels")
    if resume_state is not None:
        run.load_state_dict(resume_state)
    for epoch in range(len(run.history) + 1, cfg.epochs + 1):
        started = time.perf_counter()
        train_loss, train_acc = train_one_epoch(model, train, opt, sched, cfg, run.generator, device, teacher,
                                                negatives)
        val_loss, val_acc = split_scores(model, data.val, device, cfg.eval_batch_size)
        _, test_acc = split_scores(model, data.test, device, cfg.eval_batch_size)
        metrics = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                   "val_acc": val_acc, "test_acc": test_acc, "lr": opt.param_groups[0]["lr"],
                   "epoch_time_s": time.perf_counter() - started}
        metrics["diverged"] = diverged(metrics, len(data.classes))
        run.history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics, run)
        if metrics["diverged"]:
            run.status = "diverged"
            break
    return run
