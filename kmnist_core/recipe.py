"""The recipe that makes the shipped default model, as k-fold training over every bundled real image.

All 14,000 real KMNIST images (kmnist-dev and kmnist-train6k, `datasets.load_labelled_pool`) are cut into K
folds, stratified by source split and class (seeded). For fold k a model is trained on the other K-1 folds
and predicts fold k, so every image's out-of-fold logits come from a model that never saw it.

Hands are held out the same way. The training negatives' rendered glyphs come from Japanese fonts grouped
by hand (`HANDS`); fold k never sees the hands of group k (`HAND_GROUPS`), so each hand's other characters
are judged by a model that was never shown that hand ("leave-one-hand-out", in rotation over the folds).
The final model is trained on all images and all hands.

What a fold leaves in its results folder (committed, a few hundred KB a fold, so the next session on a new
machine carries on):
    recipe.json     the recipe, fold count, seeds, the hands each fold held out, the machine
    fold-K.npz      index (into the pool), labels, source, logits, the wall time and epochs of the fold
    fold-K.pt       the fold model's weights (a plain state dict)
and in the work folder (by default recipes/RECIPE/checkpoints/, committed while a fold is unfinished: 2 MB)
a checkpoint every few epochs, so a killed fold resumes there, on this machine or another; a finished
fold's checkpoint is deleted.
Entry point: `python -m jobs.recipe folds` (`make default-model`).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kmnist_core.datasets import Dataset, LabelledPool, Split, load_labelled_pool
from kmnist_core.errors import KmnistError
from kmnist_core.files import write_json_atomic
from kmnist_core.models import predict_logits
from kmnist_core.train import TrainConfig, TrainRun, train_model

FOLD_SEED = 20261207
CHECKPOINT_EVERY = 5  # epochs
FONTS = Path("/usr/share/fonts")
# Japanese hands Debian packages (apt-get install ...; `HAND_PACKAGES`), one entry per hand: files of one
# designer's family are one hand, so holding a hand out holds out all its weights and styles.
HANDS: dict[str, tuple[str, ...]] = {
    # brush
    "kouzan": ("truetype/aoyagi-kouzan-t/AoyagiKouzanT.ttf", "truetype/kouzan-mouhitsu/kouzan-mouhitsu.ttf",
               "truetype/kouzan-mouhitsu/kouzan-mouhitsu-gyosho.ttf",
               "truetype/kouzan-mouhitsu/KouzanBrushFontSousyo.ttf"),
    "soseki": ("truetype/aoyagi-soseki/aoyagi-soseki.ttf",),
    # pen and pencil
    "seto": ("truetype/seto/setofont.ttf",),
    "kiloji": ("truetype/kiloji/kiloji.ttf",),
    "klee": ("truetype/klee/KleeOne-Regular.ttf",),
    # mincho
    "ipa-mincho": ("opentype/ipafont-mincho/ipam.ttf",),
    "hanazono": ("truetype/hanazono/HanaMinA.ttf",),
    "oradano": ("truetype/oradano-mincho/OradanoGSRR.ttf",),
    "dejima": ("truetype/dejima-mincho/dejima-mincho-r227.ttf",),
    "noto-serif": ("opentype/noto/NotoSerifCJK-Regular.ttc",),
    "sawarabi-mincho": ("truetype/sawarabi-mincho/sawarabi-mincho-medium.ttf",),
    "motoya-cedar": ("truetype/motoya-l-cedar/MTLc3m.ttf",),
    # gothic and rounded
    "noto-sans": ("opentype/noto/NotoSansCJK-Regular.ttc",),
    "sawarabi-gothic": ("truetype/sawarabi-gothic/sawarabi-gothic-medium.ttf",),
    "takao": ("truetype/takao-gothic/TakaoGothic.ttf",),
    "motoya-maru": ("truetype/motoya-l-maruberi/MTLmr3m.ttf",),
    "konatu": ("truetype/konatu/Konatu.ttf",),
    "monapo": ("truetype/monapo/monapo.ttf",),
    "ume": ("truetype/horai-umefont/ume-tgo4.ttf", "truetype/horai-umefont/ume-tmo3.ttf"),
}
HAND_PACKAGES = ("fonts-aoyagi-kouzan-t fonts-kouzan-mouhitsu fonts-aoyagi-soseki fonts-seto fonts-kiloji fonts-klee "
                 "fonts-ipafont-mincho fonts-hanazono fonts-oradano-mincho-gsrr fonts-dejima-mincho fonts-noto-cjk "
                 "fonts-sawarabi-mincho fonts-motoya-l-cedar fonts-sawarabi-gothic fonts-takao-gothic "
                 "fonts-motoya-l-maruberi fonts-konatu fonts-monapo fonts-horai-umefont")
# Fold k holds out group k: each group has a hand of each style where there are enough of them.
HAND_GROUPS = (
    ("kouzan", "seto", "ipa-mincho", "noto-sans"),
    ("soseki", "kiloji", "hanazono", "sawarabi-gothic"),
    ("klee", "oradano", "takao", "ume"),
    ("dejima", "noto-serif", "motoya-maru"),
    ("sawarabi-mincho", "motoya-cedar", "konatu", "monapo"),
)
# compact-cnn-wide with the plain recipe of docs/model.md and outlier exposure, its negatives rendered in
# every training hand with a fifth of them other kana.
HANDS_OE = dict(model="compact-cnn-wide", epochs=60, lr=3e-3, batch_size=128, optimizer="adamw",
                weight_decay=5e-4, schedule="onecycle", augment="strong", negatives="synth", outlier_weight=0.5,
                negative_mix={"glyph": 0.25, "kana": 0.2, "merged": 0.18, "fragment": 0.13, "overlay": 0.09,
                              "turned": 0.07, "strokes": 0.08})
# hands-oe with twice the overlaid and more of the broken characters (the kinds hands-oe accepted most out
# of fold: overlays 3-7 %, fragments 2-4 %) and another seed, so it can also stand beside hands-oe as a
# second model.
HANDS_OE_OVERLAYS = dict(HANDS_OE, seed=1, negative_mix={"glyph": 0.2, "kana": 0.2, "merged": 0.14, "fragment": 0.16,
                                                         "overlay": 0.18, "turned": 0.07, "strokes": 0.05})
# hands-oe with its negatives as an eleventh class, "none of these" (models.RejectCNN), rather than pushed to
# the uniform distribution: the kinds hands-oe accepts most out of fold (overlays, fragments) hold a
# character's evidence, which the uniform target must flatten and a class of their own need not. Folds 0-1
# only: at hands-oe's accepted share it let more of every unseen kind through (docs/model.md).
HANDS_REJECT = dict(HANDS_OE, model="compact-cnn-wide-reject")
# hands-oe-overlays with twice the outlier-exposure weight: at hands-oe's accepted share, more overlays in
# training took overlays from 5.03 to 3.59 % but let more strokes and merged pairs through; a heavier
# uniform target on every negative is the other half of that trade. Folds 0-1 only: fewer overlays, merged and
# turned accepted, more other kana and fragments, lower top-1 (docs/model.md).
HANDS_OE_OVERLAYS_W1 = dict(HANDS_OE_OVERLAYS, outlier_weight=1.0)
RECIPES: dict[str, dict] = {"hands-oe": HANDS_OE, "hands-oe-overlays": HANDS_OE_OVERLAYS,
                            "hands-oe-overlays-w1": HANDS_OE_OVERLAYS_W1, "hands-reject": HANDS_REJECT}


def hand_fonts(hands: list[str] | tuple[str, ...]) -> list[str]:
    """The font files of `hands`; a missing one is an error naming the packages to install."""
    paths = [str(FONTS / f) for hand in hands for f in HANDS[hand]]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise KmnistError(f"font {missing[0]} is missing ({len(missing)} in all): apt-get install -y {HAND_PACKAGES}")
    return paths


def held_hands(fold: int | None) -> tuple[str, ...]:
    """The hands fold `fold` never trains on (none for the final model, `fold` None)."""
    return () if fold is None else HAND_GROUPS[fold % len(HAND_GROUPS)]


def stratified_folds(labels: np.ndarray, source: np.ndarray, k: int, seed: int = FOLD_SEED) -> np.ndarray:
    """Fold number (0..k-1) of each image: every (source, class) spread evenly over the folds, seeded."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), np.int64)
    offset = 0  # carried across strata so small strata do not all start at fold 0
    for s in np.unique(source):
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero((source == s) & (labels == c)))
            fold[members] = (np.arange(len(members)) + offset) % k
            offset += len(members)
    return fold


@dataclass(frozen=True)
class Recipe:
    """One recipe run: what is trained, on which folds, and where its record lives."""

    name: str
    folds: int
    results: Path  # committed record: recipe.json, fold-K.npz, fold-K.pt
    work: Path  # checkpoints of unfinished folds
    seed: int = 0
    threads: int = 1

    def config(self, fold: int | None) -> TrainConfig:
        hands = [h for h in HANDS if h not in held_hands(fold)]
        settings = {"seed": self.seed, **RECIPES[self.name]}  # a recipe may fix its own seed
        return TrainConfig(dataset="kmnist-pooled", threads=self.threads, device="cpu",
                           negative_fonts=hand_fonts(hands), **settings)

    def record(self, pool: LabelledPool) -> dict:
        return {"recipe": self.name, "config": self.config(None).to_dict(), "folds": self.folds,
                "fold_seed": FOLD_SEED, "images": len(pool),
                "sources": {s: int((pool.source == s).sum()) for s in np.unique(pool.source)},
                "held_out_hands": {k: list(held_hands(k)) for k in range(self.folds)},
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "threads": self.threads}


def fold_dataset(pool: LabelledPool, fold: np.ndarray, k: int) -> Dataset:
    held, train = np.flatnonzero(fold == k), np.flatnonzero(fold != k)
    held_split = Split(pool.images[held], pool.labels[held])
    # val and test are both the held-out fold: the loop only logs them (fixed epochs, no selection).
    return Dataset("kmnist-pooled", pool.classes, 28, Split(pool.images[train], pool.labels[train]), held_split,
                   held_split, f"pooled fold {k}: trained on the other folds", "accuracy")


def train_resumable(name: str, cfg: TrainConfig, data: Dataset, ckpt: Path,
                    teachers: Sequence[torch.nn.Module] = ()) -> tuple[TrainRun, float]:
    """Train (distilling from `teachers`, if any), saving a checkpoint every CHECKPOINT_EVERY epochs and
    resuming from `ckpt` if it exists. Returns the run and its wall time in seconds, summed over resumptions."""
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    state = torch.load(ckpt, map_location="cpu", weights_only=True) if ckpt.exists() else None
    spent = float(state.pop("wall_s")) if state else 0.0
    started = time.perf_counter()
    if state:
        print(f"{name}: resuming after epoch {len(state['history'])}", flush=True)

    def on_epoch(metrics: dict, run: TrainRun) -> None:
        print(f"{name} epoch {metrics['epoch']}/{cfg.epochs}: loss {metrics['train_loss']:.4f} "
              f"held-out {metrics['test_acc']:.4f} {metrics['epoch_time_s']:.1f}s", flush=True)
        if metrics["epoch"] % CHECKPOINT_EVERY == 0 or metrics["epoch"] == cfg.epochs:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({**run.state_dict(), "wall_s": spent + time.perf_counter() - started}, tmp)
            os.replace(tmp, ckpt)

    run = train_model(cfg, data, "cpu", on_epoch, resume_state=state, teacher_models=teachers)
    return run, spent + time.perf_counter() - started


def save_fold_rows(path: Path, held: np.ndarray, pool: LabelledPool, logits: np.ndarray, wall_s: float,
                   epochs: int) -> None:
    """fold-K.npz: the held-out rows' index into the pool, labels, source split and logits, with the fold's
    wall time and epochs (written whole or not at all)."""
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, index=held, labels=pool.labels[held], source=pool.source[held], logits=logits,
                        wall_s=np.float64(wall_s), epochs=np.int64(epochs))
    os.replace(tmp, path)


def run_fold(recipe: Recipe, k: int, pool: LabelledPool | None = None) -> Path:
    """Train fold k (resuming its checkpoint) and write fold-K.npz / fold-K.pt; a finished fold is kept."""
    if (done := recipe.results / f"fold-{k}.npz").exists():
        return done
    pool = pool or load_labelled_pool()
    fold = stratified_folds(pool.labels, pool.source, recipe.folds)
    data = fold_dataset(pool, fold, k)
    recipe.results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(recipe.results / "recipe.json", recipe.record(pool))
    run, trained_s = train_resumable(f"fold {k}", recipe.config(k), data, recipe.work / f"fold-{k}.ckpt.pt")
    started = time.perf_counter()
    logits = predict_logits(run.model, data.test.images, "cpu")
    wall = trained_s + time.perf_counter() - started
    torch.save({n: t.detach().cpu() for n, t in run.model.state_dict().items()}, recipe.results / f"fold-{k}.pt")
    held = np.flatnonzero(fold == k)
    save_fold_rows(done, held, pool, logits, wall, len(run.history))
    (recipe.work / f"fold-{k}.ckpt.pt").unlink(missing_ok=True)  # the fold's results replace its checkpoint
    acc = float((logits.argmax(1) == data.test.labels).mean())
    print(f"fold {k}: held-out accuracy {acc:.4f} on {len(held)} images, {wall / 60:.1f} min", flush=True)
    return done
