"""Build the out-of-set evaluation tree: crops that are none of the model's ten characters, as an
archive's crop tree delivers them (dark ink on paper, margins, any box size), one folder per kind.

    other_characters/  glyphs (held-out part of kmnist_core.negatives' glyph list, so never a training
                       negative) in fonts never used for training: Aoyagi Soseki (cursive brush) and
                       IPAex Mincho. The ten classes, their katakana look-alikes and source kanji are excluded.
    merged_pairs/      two kmnist-dev TEST characters of different classes in one box (stacked or side by side)
    fragments/         a third to a half of a kmnist-dev TEST character
    blanks/            paper texture, specks, a ruling line, a dark border strip, scanner noise

Nothing here is used for training or for fitting thresholds (those use the TRAIN and VAL splits, and
IPAexGothic / Aoyagi Kouzan glyphs). Deterministic for a seed.

    apt-get install -y fonts-aoyagi-soseki fonts-ipaexfont-mincho
    .venv/bin/python bench/ood_tree.py --out runs/ood-tree [--per-kind 400]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageFont

from kmnist_core.datasets import load_dataset
from kmnist_core.negatives import fragment, glyph_pool, has_glyph, ink_box, merged_pair, render_glyph

EVAL_FONTS = [Path("/usr/share/fonts/truetype/aoyagi-soseki/aoyagi-soseki.ttf"),
              Path("/usr/share/fonts/opentype/ipaexfont-mincho/ipaexm.ttf")]


def on_paper(ink: np.ndarray | None, rng: np.random.Generator) -> Image.Image:
    """A light-on-dark uint8 character (or None: empty paper) as dark ink on noisy paper, in a box a
    segmenter would cut around it: longer side 36-96 px, the ink at 75-95 % of the box on each axis
    (margins), placed off-centre."""
    longest = int(rng.integers(36, 97))
    if ink is None:
        h, w = longest, max(8, int(longest * rng.uniform(0.6, 1.0)))
        if rng.random() < 0.5:
            h, w = w, h
    else:
        t, b, l, r = ink_box(ink)
        ink = ink[t:b, l:r]
        scale = longest * float(rng.uniform(0.75, 0.95)) / max(ink.shape)
        nh, nw = max(1, round(ink.shape[0] * scale)), max(1, round(ink.shape[1] * scale))
        h, w = max(nh + 2, round(nh / rng.uniform(0.75, 0.95))), max(nw + 2, round(nw / rng.uniform(0.75, 0.95)))
    paper = float(rng.uniform(0.78, 0.96))
    canvas = np.full((h, w), paper, np.float32) + rng.normal(0, rng.uniform(0.005, 0.03), (h, w)).astype(np.float32)
    if ink is not None:
        small = np.asarray(Image.fromarray(ink).resize((nw, nh), Image.Resampling.BILINEAR), np.float32) / 255
        y, x = int(rng.integers(0, h - nh + 1)), int(rng.integers(0, w - nw + 1))
        dark = float(rng.uniform(0.05, 0.3))
        canvas[y : y + nh, x : x + nw] -= small * (paper - dark)
    return Image.fromarray((np.clip(canvas, 0, 1) * 255).round().astype(np.uint8), mode="L")


def blank(rng: np.random.Generator) -> Image.Image:
    """Paper with what a segmenter picks up when there is no character."""
    img = np.asarray(on_paper(None, rng), np.float32) / 255
    h, w = img.shape
    kind = int(rng.integers(5))
    if kind == 1:  # specks
        for _ in range(int(rng.integers(1, 6))):
            y, x, r = int(rng.integers(h)), int(rng.integers(w)), int(rng.integers(1, 3))
            img[max(0, y - r) : y + r, max(0, x - r) : x + r] *= 0.3
    elif kind == 2:  # a ruling line
        t = int(rng.integers(1, 3))
        if rng.random() < 0.5:
            y = int(rng.integers(h - t))
            img[y : y + t] *= 0.35
        else:
            x = int(rng.integers(w - t))
            img[:, x : x + t] *= 0.35
    elif kind == 3:  # a dark strip along one edge (the page's edge or gutter)
        t = max(2, int(min(h, w) * rng.uniform(0.05, 0.12)))
        side = int(rng.integers(4))
        sl = [(slice(0, t), slice(None)), (slice(h - t, h), slice(None)), (slice(None), slice(0, t)),
              (slice(None), slice(w - t, w))][side]
        img[sl] *= 0.25
    elif kind == 4:  # heavy scanner noise
        img += rng.normal(0, 0.08, img.shape).astype(np.float32)
    return Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8), mode="L")


def build(out: Path, per_kind: int, seed: int) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    test = load_dataset("kmnist-dev").test
    fonts = [f for f in EVAL_FONTS if f.exists()]
    if not fonts:
        raise SystemExit("no evaluation font: apt-get install -y fonts-aoyagi-soseki fonts-ipaexfont-mincho")
    glyphs = {f: [c for c in glyph_pool("held_out") if has_glyph(ImageFont.truetype(str(f), 48), c)] for f in fonts}
    others = {c: np.flatnonzero(test.labels != c) for c in np.unique(test.labels)}
    makers = {
        "other_characters": lambda: render_glyph(rng.choice(glyphs[f := fonts[int(rng.integers(len(fonts)))]]), f, rng),
        "merged_pairs": lambda: merged_pair(test.images[i := int(rng.integers(len(test)))],
                                            test.images[rng.choice(others[test.labels[i]])], rng),
        "fragments": lambda: fragment(test.images[int(rng.integers(len(test)))], rng),
    }
    counts = {}
    for kind, make in [*makers.items(), ("blanks", None)]:
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_kind):
            img = blank(rng) if make is None else on_paper(np.ascontiguousarray(make()), rng)
            img.save(folder / f"{kind}-{i:04d}.png")
        counts[kind] = per_kind
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-kind", type=int, default=400)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    print(build(args.out, args.per_kind, args.seed))


if __name__ == "__main__":
    main()
