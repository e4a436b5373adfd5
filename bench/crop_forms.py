"""Crops as a segmenter cuts them: accuracy of each cut-out form against the same images as tight crops.

Real kmnist-dev images (the held-out test split by default; choose preprocessing settings with
`--split val`) are cut out the way archive crop trees deliver them: the character at 75-95 % of the
shorter side of a 36-96 px box, square or not, centred or not, dark ink on paper, and with what a box
catches besides the character (scanner noise and JPEG, specks, a ruling line, a dark strip along an
edge). Each form is encoded to file bytes and decoded by `decode_bytes`, the code `predict` runs, then
scored with the model. "whole box" is the same crops fitted without finding the ink first (the
preprocessing before issue 11), for comparison, accuracy and decode time. `--tree DIR` also writes every crop as a file
(DIR/<form>/<char>/<i>.png|jpg) for `kmnist-batch predict`.

    .venv/bin/python bench/crop_forms.py [--model default] [--split test|val] [--record] [--tree DIR]
    nice -n 10 .venv/bin/python bench/crop_forms.py --out-of-fold hands-oe [--precision int8|fp32] [--record]

`--out-of-fold RECIPE`: every image of a k-fold recipe, each scored by the fold model that never saw it,
instead of one model on one split: the honest figure for a model trained on all of them (the shipped
default), whose own test split is training data. A kmnist_core/recipe.py recipe (hands-oe: all 14,000
kmnist-dev + kmnist-train6k images) is scored with its review.json test-time views; an older
bench/oof_folds.py one (plain-oe, distill-oe: 8,000 kmnist-dev images) without views. Each fold model runs
as a Predictor runs it (bench/oof_int8.py `load_recipe`: `--precision int8`, the default, is its int8 twin
with the rows near a decision recomputed in fp32, views in both passes; `fp32` its fp32 ONNX twin; rows of
2026-12-05 and before were the fp32 torch model). Out of fold, decode is not timed. `--scan-forms` adds
tests/test_robustness.py's scan forms (16-bit TIFF, ink only in alpha, a noisy RGB JPEG at 56 px, a crop cut
to the ink's box) after these.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.record import append_row  # noqa: E402
from kmnist_core.datasets import Split, load_dataset  # noqa: E402
from kmnist_core.model_dir import load_model  # noqa: E402
from kmnist_core.preprocess import decode_bytes, fit_square, normalize_polarity, to_grayscale  # noqa: E402
from reviews import images  # noqa: E402

PAPER, INK = 225, 30
JPEG_MAGIC = b"\xff\xd8"


def on_paper(light: np.ndarray) -> np.ndarray:
    """Light-on-dark float [0, 1] -> dark ink on paper, uint8."""
    return (PAPER - light * (PAPER - INK)).round().astype(np.uint8)


def cut(glyph: np.ndarray, rng: np.random.Generator, square: bool, centred: bool) -> tuple[np.ndarray, tuple]:
    """Place the character in a 36-96 px box at 75-95 % of its shorter side, as a segmenter's box.

    Returns the light-on-dark float box and the character's (top, left, size) in it."""
    h, w = (int(rng.integers(36, 97)),) * 2 if square else sorted(rng.integers(36, 97, 2), reverse=bool(rng.integers(2)))
    if not square and abs(h - w) < 12:  # make it visibly not square
        h = min(96, w + 24) if h >= w else max(36, w - 24)
    side = max(8, round(rng.uniform(0.75, 0.95) * min(h, w)))  # KMNIST's character spans its 28 px
    big = np.asarray(Image.fromarray(glyph).resize((side, side), Image.Resampling.BICUBIC), np.float32) / 255
    top, left = ((h - side) // 2, (w - side) // 2) if centred else (int(rng.integers(0, h - side + 1)),
                                                                    int(rng.integers(0, w - side + 1)))
    box = np.zeros((h, w), np.float32)
    box[top : top + side, left : left + side] = np.clip(big, 0, 1)
    return box, (top, left, side)


def add_specks(box: np.ndarray, where: tuple, rng: np.random.Generator) -> np.ndarray:
    """3-8 dust specks (radius up to 2 % of the box) outside the character's square."""
    h, w = box.shape
    top, left, side = where
    yy, xx = np.mgrid[:h, :w]
    for _ in range(int(rng.integers(3, 9))):
        for _try in range(20):
            y, x = rng.integers(0, h), rng.integers(0, w)
            if not (top - 2 <= y < top + side + 2 and left - 2 <= x < left + side + 2):
                break
        r = rng.uniform(0.6, max(1.0, 0.02 * min(h, w)))
        box = np.maximum(box, ((yy - y) ** 2 + (xx - x) ** 2 <= r * r) * rng.uniform(0.5, 1.0))
    return box


def add_line(box: np.ndarray, where: tuple, rng: np.random.Generator) -> np.ndarray:
    """A 1-2 px ruling line across the whole box, in its widest margin (column rules between lines)."""
    h, w = box.shape
    top, left, side = where
    gaps = {"top": top, "bottom": h - top - side, "left": left, "right": w - left - side}
    edge = max(gaps, key=gaps.get)
    thick = int(rng.integers(1, 3))
    at = {"top": 0, "left": 0, "bottom": top + side, "right": left + side}[edge]
    pos = at + int(rng.integers(0, max(1, gaps[edge] - thick + 1)))
    box = box.copy()
    if edge in ("top", "bottom"):
        box[pos : pos + thick] = np.maximum(box[pos : pos + thick], 0.8)
    else:
        box[:, pos : pos + thick] = np.maximum(box[:, pos : pos + thick], 0.8)
    return box


def add_strip(box: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A dark strip (page edge, gutter shadow) 4-10 % thick along one edge."""
    h, w = box.shape
    box = box.copy()
    edge = int(rng.integers(4))
    t = max(2, round(rng.uniform(0.04, 0.10) * (h if edge < 2 else w)))
    level = rng.uniform(0.6, 0.9)
    region = [box[:t], box[-t:], box[:, :t], box[:, -t:]][edge]
    region[...] = np.maximum(region, level)
    return box


def png(arr: np.ndarray) -> bytes:
    return images.png(Image.fromarray(arr))


def noisy_jpeg(light: np.ndarray, rng: np.random.Generator) -> bytes:
    """Yellowed paper, scanner noise (sigma 8 grey levels), JPEG quality 85."""
    rgb = on_paper(light).astype(np.float32)[..., None] * np.array([1.0, 0.97, 0.9], np.float32)
    rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def margined(g, rng, square=True, centred=True):
    return png(on_paper(cut(g, rng, square, centred)[0]))


def with_extra(add: Callable) -> Callable:
    def make(g, rng):
        box, where = cut(g, rng, square=bool(rng.integers(2)), centred=False)
        return png(on_paper(add(box, where, rng)))
    return make


FORMS: dict[str, Callable[[np.ndarray, np.random.Generator], bytes]] = {
    "tight 28x28 (KMNIST as is)": lambda g, rng: png(g),
    "tight 28x28, dark ink on paper": lambda g, rng: png(on_paper(g.astype(np.float32) / 255)),
    "margins, square box": lambda g, rng: margined(g, rng),
    "margins, non-square box": lambda g, rng: margined(g, rng, square=False),
    "margins, off-centre": lambda g, rng: margined(g, rng, square=bool(rng.integers(2)), centred=False),
    "off-centre, noisy RGB JPEG": lambda g, rng: noisy_jpeg(cut(g, rng, bool(rng.integers(2)), False)[0], rng),
    "off-centre + specks": with_extra(add_specks),
    "off-centre + ruling line": with_extra(add_line),
    "off-centre + dark border strip": with_extra(lambda box, where, rng: add_strip(box, rng)),
}


def whole_box(data: bytes, size: int) -> np.ndarray:
    """The preprocessing before issue 11: fit the whole box, margins and all."""
    return fit_square(normalize_polarity(to_grayscale(Image.open(io.BytesIO(data))))[0], size)


def decode_us(decode: Callable[[bytes], object], files: list[bytes], rounds: int = 5) -> float:
    """Best of `rounds` passes, µs per file: the machine is shared, the minimum is the least disturbed."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for f in files:
            decode(f)
        best = min(best, (time.perf_counter() - started) / len(files) * 1e6)
    return best


def out_of_fold(recipe: str, precision: str) -> tuple[Split, Callable[[np.ndarray], np.ndarray], str, str]:
    """Every image of the recipe, and a predict function giving each image (row i of `pixels` is a form of
    image i) the class its fold's Predictor decides (module doc)."""
    from bench.oof_int8 import load_recipe

    r = load_recipe(recipe)
    folds = [(f.rows, f.int8 if precision == "int8" else f.fp32) for f in r.folds]

    def predict(pixels: np.ndarray) -> np.ndarray:
        pred = np.empty(len(pixels), np.int64)
        for rows, predictor in folds:
            pred[rows] = predictor.decided_logits(pixels[rows])[0].argmax(1)
        return pred

    views = (f"views gate {r.views.gate}, " + ", ".join(f"{d:+g}°" + (f" x{z:g}" if z != 1 else "") for d, z in r.views.extra)
             if r.views else "no views")
    return (Split(r.images, r.labels), predict, f"{recipe} fold models, {precision} as predict runs it, {views}",
            f"{r.source} out-of-fold ({len(r.labels)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tree", type=Path, help="also write the crops as files under this folder")
    parser.add_argument("--record", action="store_true", help="append the rows to docs/benchmarks.md")
    parser.add_argument("--out-of-fold", metavar="RECIPE", help="each image of a k-fold recipe scored by its fold's model")
    parser.add_argument("--precision", default="int8", choices=["int8", "fp32"],
                        help="--out-of-fold: what the fold Predictors run (int8: with the fp32 recheck)")
    parser.add_argument("--scan-forms", action="store_true", help="also tests/test_robustness.py's scan forms")
    args = parser.parse_args()
    forms = dict(FORMS)
    if args.scan_forms:
        from tests.test_robustness import FORMS as SCAN_FORMS  # imported here: it imports this module

        forms.update({f"scan: {name}": make for name, make in SCAN_FORMS.items()})

    data = load_dataset("kmnist-dev")
    timed = not args.out_of_fold  # 14,000 images x 9 forms: decode is timed on one split
    if args.out_of_fold:
        split, predict, model_name, split_name = out_of_fold(args.out_of_fold, args.precision)
    else:
        model = load_model(args.model)
        split, predict = getattr(data, args.split), lambda pixels: model.probabilities(pixels).argmax(1)
        model_name, split_name = model.model_id, f"{args.split} ({len(split.labels)})"
    size = data.input_size
    score = lambda pixels: float((predict(np.stack(pixels)) == split.labels).mean())  # noqa: E731
    tight = None
    print(f"model {model_name}, {'' if args.out_of_fold else 'kmnist-dev '}{split_name} images")
    print(f"{'form':34} {'accuracy':>9} {'vs tight':>9} {'whole box':>10} {'blank':>6} {'decode µs (whole box)':>22}")
    for name, make in forms.items():
        rng = np.random.default_rng(args.seed)
        files = [make(g, rng) for g in split.images]
        prepared = [decode_bytes(f, size) for f in files]
        old = [whole_box(f, size) for f in files]
        decode = (f"{decode_us(lambda f: decode_bytes(f, size), files):.0f} "
                  f"({decode_us(lambda f: whole_box(f, size), files):.0f})" if timed else "-")
        acc, before = score([p.pixels for p in prepared]), score(old)
        blank = sum(p.blank for p in prepared)
        tight = acc if tight is None else tight
        print(f"{name:34} {acc:9.2%} {acc - tight:+9.2%} {before:10.2%} {blank:6d} {decode:>22}", flush=True)
        if name.startswith("tight 28x28 (KMNIST"):
            same = sum(np.array_equal(p.pixels, g) for p, g in zip(prepared, split.images))
            print(f"{'':34} {same}/{len(files)} tight crops come through bit-identical")
        if args.tree:
            folder = args.tree / name.split(" (")[0].replace(",", "").replace(":", "").replace(" ", "-").replace("+", "with")
            for i, (f, label) in enumerate(zip(files, split.labels)):
                ext = "jpg" if f.startswith(JPEG_MAGIC) else "png"
                path = folder / data.classes.chars[label] / f"{i:04d}.{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(f)
        if args.record:
            append_row("crop forms", [f"`{model_name}`", split_name, name, f"{tight:.2%}",
                                      f"**{acc:.2%}** ({acc - tight:+.2%})", f"{before:.2%}", str(blank), decode])


if __name__ == "__main__":
    main()
