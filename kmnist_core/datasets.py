"""Dataset registry: official KMNIST / Kuzushiji-49 / Kuzushiji-Kanji files and the bundled kmnist-dev subset.

Every dataset comes back as uint8 images, light ink on a dark background (the KMNIST convention), with
deterministic train / val / test splits and a note saying how they were made, which travels into the
model card of anything trained on them.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from kmnist_core.classmap import ClassMap, read_classmap_csv
from kmnist_core.download import download, verify_md5
from kmnist_core.errors import KmnistError

OFFICIAL_BASE_URL = "http://codh.rois.ac.jp/kmnist/dataset/"
BUNDLED_DIR = Path(__file__).parent / "data" / "kmnist-dev"
SPLIT_SEED = 20181203  # fixed forever: changing it changes every reported kmnist-dev figure

# Official md5 sums (from the dataset's published checksums).
OFFICIAL_MD5 = {
    "kmnist/train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
    "kmnist/train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
    "kmnist/t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
    "kmnist/t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
    "kmnist/kmnist-train-imgs.npz": "a183fbc01ed9a345513b145673d3d0bb",
    "kmnist/kmnist-train-labels.npz": "b0e1d240e8afec72b50437fc3bc5908a",
    "kmnist/kmnist-test-imgs.npz": "dace6de62ca8b90843cc45366337d02e",
    "kmnist/kmnist-test-labels.npz": "3ae489a79983d0fe386152684e3b5412",
    "kmnist/kmnist_classmap.csv": "899202f6e8dc29a321ac210a03d0f2f1",
    "k49/k49-train-imgs.npz": "7ac088b20481cf51dcd01ceaab89d821",
    "k49/k49-train-labels.npz": "44a8e1b893f81e63ff38d73cad420f7a",
    "k49/k49-test-imgs.npz": "d352e201d846ce6b94f42c990966f374",
    "k49/k49-test-labels.npz": "4da6f7a62e67a832d5eb1bd85c5ee448",
    "k49/k49_classmap.csv": "f7d0d0391f68bdf0fe4cf160ceb85753",
    # CODH publishes no checksum for the Kuzushiji-Kanji tar; its sha256 is not verified.
    "kkanji/kkanji.tar": None,
}

KMNIST_NPZ = ("kmnist-train-imgs.npz", "kmnist-train-labels.npz", "kmnist-test-imgs.npz", "kmnist-test-labels.npz")
KMNIST_IDX = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
K49_NPZ = ("k49-train-imgs.npz", "k49-train-labels.npz", "k49-test-imgs.npz", "k49-test-labels.npz")


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, H, W), light ink on dark
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    name: str
    classes: ClassMap
    input_size: int
    train: Split
    val: Split
    test: Split
    split_note: str  # how the splits were made; goes into model cards and reports
    primary_metric: str  # "accuracy", or "balanced_accuracy" for the long-tailed sets


@dataclass(frozen=True)
class Source:
    """Where a dataset's files come from: a directory, an optional mirror URL, whether to download."""

    data_dir: Path
    base_url: str
    allow_download: bool
    checksums: dict[str, str | None]

    def fetch(self, key: str) -> Path:
        """Return the verified local file for `key` ('kmnist/xyz.npz'), downloading it when allowed."""
        path = self.data_dir / Path(key).name
        md5 = self.checksums[key]
        if path.exists():
            verify_md5(path, md5)
            return path
        if not self.allow_download:
            raise KmnistError(f"missing data file {path} (downloads are off; pass --download or copy the official files there)")
        return download(self.base_url.rstrip("/") + "/" + key, path, md5)

    def has(self, key: str) -> bool:
        return (self.data_dir / Path(key).name).exists()


def default_data_dir(name: str) -> Path:
    root = os.environ.get("KMNIST_DATA_DIR") or Path.home() / ".cache" / "kmnist-batch"
    return Path(root) / name


def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int = SPLIT_SEED) -> list[np.ndarray]:
    """Split indices per class by `fractions` (the first part takes the remainder), deterministically.

    A class too small for a share keeps its images in the first part, so rare classes are never lost
    from training.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        counts = [int(len(idx) * f) for f in fractions[1:]]
        bounds = np.cumsum([len(idx) - sum(counts)] + counts)
        for part, chunk in zip(parts, np.split(idx, bounds[:-1])):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def _load_npz_array(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as f:
            return f["arr_0"]
    except (OSError, ValueError, KeyError) as e:
        raise KmnistError(f"cannot read {path}: {e}") from None


def read_idx_gz(path: Path) -> np.ndarray:
    """Parse an IDX file (gzip), the format of the original MNIST distribution."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise KmnistError(f"cannot read IDX file {path}: {e}") from None


def _check_pair(images: np.ndarray, labels: np.ndarray, what: str, num_classes: int) -> Split:
    if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
        raise KmnistError(f"{what}: expected uint8 images (N, H, W) matching N labels, got {images.shape} {images.dtype} and {labels.shape}")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise KmnistError(f"{what}: labels outside 0..{num_classes - 1}")
    return Split(images, labels)


def _official_train_val_test(name: str, classes: ClassMap, arrays: list[np.ndarray], metric: str) -> Dataset:
    """An official train/test release (`arrays`: train images, train labels, test images, test labels) with
    val split off its train split."""
    what = name.upper()
    train = _check_pair(arrays[0], arrays[1], f"{what} train", len(classes))
    test = _check_pair(arrays[2], arrays[3], f"{what} test", len(classes))
    train_idx, val_idx = stratified_split(train.labels, (0.9, 0.1))
    note = (f"official {name} train split, stratified 90/10 into train/val (seed {SPLIT_SEED}); "
            f"official test split as test")
    sub = lambda s, i: Split(s.images[i], s.labels[i])  # noqa: E731
    return Dataset(name, classes, train.images.shape[1], sub(train, train_idx), sub(train, val_idx), test, note, metric)


def load_kmnist(src: Source) -> Dataset:
    """Official KMNIST 60k/10k, from npz files or the IDX .gz files (whichever the directory has)."""
    classes = read_classmap_csv(src.fetch("kmnist/kmnist_classmap.csv"))
    if all(src.has(f"kmnist/{f}") for f in KMNIST_IDX) and not all(src.has(f"kmnist/{f}") for f in KMNIST_NPZ):
        arrays = [read_idx_gz(src.fetch(f"kmnist/{f}")) for f in KMNIST_IDX]
    else:
        arrays = [_load_npz_array(src.fetch(f"kmnist/{f}")) for f in KMNIST_NPZ]
    return _official_train_val_test("kmnist", classes, arrays, "accuracy")


def load_k49(src: Source) -> Dataset:
    classes = read_classmap_csv(src.fetch("k49/k49_classmap.csv"))
    arrays = [_load_npz_array(src.fetch(f"k49/{f}")) for f in K49_NPZ]
    return _official_train_val_test("k49", classes, arrays, "balanced_accuracy")


def read_kkanji_tar(path: Path) -> tuple[np.ndarray, np.ndarray, ClassMap]:
    """Read the official tar: one folder per codepoint ('kkanji2/U+4E00/*.png'), 64x64 grayscale PNGs."""
    images, codepoints = [], []
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not (member.isfile() and member.name.lower().endswith(".png")):
                    continue
                folder = Path(member.name).parent.name
                if not folder.upper().startswith("U+"):
                    continue
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                    images.append(np.asarray(im.convert("L").resize((64, 64)), dtype=np.uint8))
                codepoints.append(folder.upper())
    except (OSError, tarfile.TarError) as e:
        raise KmnistError(f"cannot read Kuzushiji-Kanji tar {path}: {e}") from None
    if not images:
        raise KmnistError(f"{path} holds no 'U+XXXX/*.png' images")
    classes = sorted(set(codepoints))
    index = {cp: i for i, cp in enumerate(classes)}
    return np.stack(images), np.array([index[cp] for cp in codepoints], dtype=np.int64), ClassMap.from_codepoints(classes)


def load_kkanji(src: Source) -> Dataset:
    """Kuzushiji-Kanji: no official split exists, so a stratified 80/10/10 one is made (cached as npz)."""
    tar_path = src.fetch("kkanji/kkanji.tar")
    cache = src.data_dir / "kkanji-64.npz"
    if cache.exists() and cache.stat().st_mtime >= tar_path.stat().st_mtime:
        with np.load(cache, allow_pickle=False) as f:
            images, labels, codepoints = f["images"], f["labels"], [str(c) for c in f["codepoints"]]
        classes = ClassMap.from_codepoints(codepoints)
    else:
        images, labels, classes = read_kkanji_tar(tar_path)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, images=images, labels=labels, codepoints=np.array(classes.codepoints))
        os.replace(tmp, cache)
    parts = stratified_split(labels, (0.8, 0.1, 0.1))
    train, val, test = (Split(images[i], labels[i]) for i in parts)
    note = (f"Kuzushiji-Kanji has no official split: stratified 80/10/10 per class (seed {SPLIT_SEED}); "
            f"classes with fewer than 10 images are kept whole in train")
    return Dataset("kkanji", classes, 64, train, val, test, note, "balanced_accuracy")


def load_kmnist_dev(src: Source) -> Dataset:
    """The 8,000 real KMNIST images bundled with the package (a stratified subset of the official TEST split)."""
    images = _load_npz_array(src.data_dir / "kmnist-dev-imgs.npz")
    labels = _load_npz_array(src.data_dir / "kmnist-dev-labels.npz")
    classes = read_classmap_csv(src.data_dir / "kmnist_classmap.csv")
    full = _check_pair(images, labels, "kmnist-dev", len(classes))
    parts = stratified_split(full.labels, (0.75, 0.125, 0.125))
    train, val, test = (Split(full.images[i], full.labels[i]) for i in parts)
    note = (f"kmnist-dev: 8,000 images drawn from the official KMNIST TEST split, stratified 6000/1000/1000 "
            f"into train/val/test (seed {SPLIT_SEED}); not comparable with results on the official 60k/10k protocol")
    return Dataset("kmnist-dev", classes, 28, train, val, test, note, "accuracy")


@dataclass(frozen=True)
class LabelledPool:
    """Every real labelled image bundled with the package, each with the official split it came from."""

    images: np.ndarray  # uint8 (N, 28, 28)
    labels: np.ndarray  # int64 (N,)
    source: np.ndarray  # str (N,): "kmnist-dev" (official test split) or "kmnist-train6k" (official train split)
    classes: ClassMap

    def __len__(self) -> int:
        return len(self.labels)


BUNDLED_SOURCES = ("kmnist-dev", "kmnist-train6k")
BUNDLED = ("kmnist-dev", "kmnist-pooled")  # datasets read from the package's own files


def load_labelled_pool(data_dir: Path | None = None) -> LabelledPool:
    """kmnist-dev (8,000 of the official test split) and kmnist-train6k (6,000 of the official training
    split) as one pool of 14,000 for k-fold recipes; `source` keeps figures reportable per split."""
    directory = data_dir or BUNDLED_DIR
    classes = read_classmap_csv(directory / "kmnist_classmap.csv")
    parts = [_check_pair(_load_npz_array(directory / f"{name}-imgs.npz"),
                         _load_npz_array(directory / f"{name}-labels.npz"), name, len(classes))
             for name in BUNDLED_SOURCES]
    source = np.concatenate([np.full(len(p), name) for p, name in zip(parts, BUNDLED_SOURCES)])
    return LabelledPool(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                        source, classes)


def load_kmnist_pooled(src: Source) -> Dataset:
    """All 14,000 bundled real images (load_labelled_pool), stratified about 12,000/1,000/1,000. The default
    model's recipe trains k folds over the whole pool (kmnist_core/recipe.py); this split serves `train`
    and the int8 twin's calibration."""
    pool = load_labelled_pool(src.data_dir)
    parts = stratified_split(pool.labels, (12 / 14, 1 / 14, 1 / 14))
    train, val, test = (Split(pool.images[i], pool.labels[i]) for i in parts)
    note = (f"kmnist-pooled: kmnist-dev (8,000 of the official TEST split) and kmnist-train6k (6,000 of the official "
            f"TRAIN split), stratified about 12000/1000/1000 (seed {SPLIT_SEED}); not the official 60k/10k protocol")
    return Dataset("kmnist-pooled", pool.classes, 28, train, val, test, note, "accuracy")


LOADERS: dict[str, Callable[[Source], Dataset]] = {
    "kmnist-dev": load_kmnist_dev,
    "kmnist-pooled": load_kmnist_pooled,
    "kmnist": load_kmnist,
    "k49": load_k49,
    "kkanji": load_kkanji,
}


def load_dataset(
    name: str,
    data_dir: Path | str | None = None,
    allow_download: bool = True,
    base_url: str | None = None,
    checksums: dict[str, str | None] | None = None,
) -> Dataset:
    """Load a registered dataset by name.

    `data_dir`: a directory holding (or receiving) the official files; default `$KMNIST_DATA_DIR/<name>`
    or `~/.cache/kmnist-batch/<name>`. `base_url`: a mirror of the official layout (default CODH, or
    `$KMNIST_BASE_URL`). `checksums` replaces the official md5 table (mirrors of re-packed files, tests).
    """
    if name not in LOADERS:
        raise KmnistError(f"unknown dataset {name!r}; choose from: {', '.join(LOADERS)}")
    if name in BUNDLED:
        directory = Path(data_dir) if data_dir else BUNDLED_DIR
    else:
        directory = Path(data_dir) if data_dir else default_data_dir(name)
    src = Source(directory, base_url or os.environ.get("KMNIST_BASE_URL", OFFICIAL_BASE_URL),
                 allow_download, OFFICIAL_MD5 if checksums is None else checksums)
    return LOADERS[name](src)
