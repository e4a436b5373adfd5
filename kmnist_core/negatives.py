"""Synthetic out-of-set crops ("negatives") for outlier exposure and for fitting the out-of-set threshold.

A segmenter hands the model many crops that are not one of its ten characters: other kana and kanji,
two neighbours merged into one box, a fragment of a character, two characters overlapping, strokes and
smudges. `make_negatives` builds such crops from a split of KMNIST images and from glyphs rendered with
fonts, then fits each one with the same `prepare_array` that real crops go through, so the model sees
negatives exactly as it will see real ones. Everything is drawn from one seed.

Glyphs that *are* one of the ten classes are never negatives: the hiragana themselves, their katakana
look-alikes and the kanji they derive from (`LOOKALIKES`). The remaining glyphs are split by codepoint
into a training part and a held-out part (`glyph_pool`), so validation negatives and the evaluation
tree can use glyphs the model never saw as negatives.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import matplotlib_fontja
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from kmnist_core.preprocess import prepare_array

IPAEX_GOTHIC = Path(matplotlib_fontja.__file__).parent / "fonts" / "ipaexg.ttf"  # a pip dependency: always there

# The ten classes, katakana that look like them, and the kanji KMNIST's hentaigana come from.
LOOKALIKES = set(
    "おきすつなはまやれを"
    "オキスツナハマヤレヲ"
    "於幾起支喜季寸春須数寿川州津徒都奈那名難菜波者八半盤葉破末万満麻真馬也屋耶夜礼連麗禮遠乎越尾"
    "ぉっゃォッャ"  # small forms: fitted to the crop's box they are the ten themselves
)
KINDS = ("glyph", "kana", "merged", "fragment", "overlay", "turned", "strokes")
DEFAULT_MIX = {"glyph": 0.4, "merged": 0.2, "fragment": 0.15, "overlay": 0.1, "turned": 0.07, "strokes": 0.08}
# "kana" draws only other hiragana and katakana: in a book most characters that are not one of the ten are
# other kana, and the few dozen of them are lost among ~3,000 kanji when glyphs are drawn uniformly.
RENDERED = ("glyph", "kana")


def is_kana(char: str) -> bool:
    return 0x3041 <= ord(char) <= 0x30FA


def candidate_glyphs() -> list[str]:
    """Hiragana, katakana and the 2,965 level-1 kanji of JIS X 0208, minus the look-alikes."""
    chars = [chr(c) for c in range(0x3041, 0x3097)] + [chr(c) for c in range(0x30A1, 0x30FB)]
    for row in range(16, 48):  # JIS X 0208 rows 16-47: level-1 kanji, the commonly used ones
        for cell in range(1, 95):
            try:
                chars.append(bytes([row + 0xA0, cell + 0xA0]).decode("euc_jp"))
            except UnicodeDecodeError:
                pass  # row 47 ends early
    return [c for c in chars if c not in LOOKALIKES and c != "ー"]


def held_out(char: str) -> bool:
    """A fixed 20 % of glyphs, by codepoint hash: never training negatives."""
    return hashlib.sha256(char.encode()).digest()[0] < 52


def glyph_pool(part: str) -> list[str]:
    """'train' or 'held_out' glyphs."""
    return [c for c in candidate_glyphs() if held_out(c) == (part == "held_out")]


def has_glyph(font: ImageFont.FreeTypeFont, char: str) -> bool:
    """Fonts draw a missing glyph as an empty or a .notdef box; compare with a surely missing one."""
    mask = font.getmask(char)
    return mask.getbbox() is not None and bytes(mask) != bytes(font.getmask("\U0010fffd"))


def render_glyph(char: str, font_path: Path, rng: np.random.Generator) -> np.ndarray:
    """One glyph, light on dark, with random size, stroke weight, slant and blur (a brush-like crop)."""
    size = int(rng.integers(40, 72))
    font = ImageFont.truetype(str(font_path), size)
    canvas = Image.new("L", (size * 2, size * 2), 0)
    draw = ImageDraw.Draw(canvas)
    stroke = int(rng.integers(0, 4))
    draw.text((size, size), char, fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255)
    canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR)
    if rng.random() < 0.7:
        canvas = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    return np.asarray(canvas)


def ink_box(img: np.ndarray, level: int = 40) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of pixels above `level`; the whole image when there are none."""
    ys, xs = np.nonzero(img > level)
    if not len(ys):
        return 0, img.shape[0], 0, img.shape[1]
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def merged_pair(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two characters in one box, stacked (vertical writing) or side by side, gap or slight overlap."""
    ta, ba, la, ra = ink_box(a)
    tb, bb, lb, rb = ink_box(b)
    a, b = a[ta:ba, la:ra], b[tb:bb, lb:rb]
    gap = int(rng.integers(-4, 5))
    vertical = rng.random() < 0.6
    if vertical:
        h, w = a.shape[0] + b.shape[0] + gap, max(a.shape[1], b.shape[1])
    else:
        h, w = max(a.shape[0], b.shape[0]), a.shape[1] + b.shape[1] + gap
    out = np.zeros((max(h, 1) + 4, max(w, 1) + 4), np.uint8)
    out[2 : 2 + a.shape[0], 2 : 2 + a.shape[1]] = a
    y, x = (2 + a.shape[0] + gap, 2) if vertical else (2, 2 + a.shape[1] + gap)
    y, x = max(y, 0), max(x, 0)
    region = out[y : y + b.shape[0], x : x + b.shape[1]]
    np.maximum(region, b[: region.shape[0], : region.shape[1]], out=region)
    return out


def fragment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A third to a half of a character's ink box, cut from one side."""
    t, b, l, r = ink_box(img)
    img = img[t:b, l:r]
    keep = float(rng.uniform(0.3, 0.55))
    side = int(rng.integers(4))
    h, w = img.shape
    if side == 0:
        return img[: max(2, round(h * keep))]
    if side == 1:
        return img[h - max(2, round(h * keep)) :]
    if side == 2:
        return img[:, : max(2, round(w * keep))]
    return img[:, w - max(2, round(w * keep)) :]


def overlay(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two different characters written over each other, slightly shifted."""
    shift = rng.integers(-4, 5, size=2)
    return np.maximum(a, np.roll(b, tuple(shift), axis=(0, 1)))


def turned(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A character mirrored or turned by 90/180/270 degrees: ink like ours, shape not."""
    op = int(rng.integers(4))
    return np.fliplr(img) if op == 0 else np.rot90(img, op)


def strokes(rng: np.random.Generator) -> np.ndarray:
    """Two to four random brush strokes (quadratic curves) and dots: ink, but no character. (One curve
    alone is too close to つ or a real stroke to ask the model to call it "none of these".)"""
    canvas = Image.new("L", (64, 64), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 5))):
        p0, p1, p2 = rng.uniform(4, 60, size=(3, 2))
        t = np.linspace(0, 1, 24)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        draw.line([tuple(p) for p in pts], fill=255, width=int(rng.integers(2, 7)), joint="curve")
    for _ in range(int(rng.integers(0, 3))):
        x, y, r = *rng.uniform(8, 56, size=2), float(rng.uniform(2, 5))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    return np.asarray(canvas.filter(ImageFilter.GaussianBlur(0.8)))


def make_negatives(images: np.ndarray, labels: np.ndarray, n: int, seed: int, glyphs: list[str],
                   fonts: list[Path], size: int = 28, mix: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`n` negatives in the model's input form: uint8 (n, size, size) light-on-dark, and each one's kind.

    `images`/`labels`: KMNIST crops the merged pairs, fragments, overlays and turned characters are cut
    from (use the training split for training negatives, never the test split). `glyphs` are rendered
    with `fonts` (only glyphs a font really has).
    """
    rng = np.random.default_rng(seed)
    mix = mix or DEFAULT_MIX
    kinds = rng.choice(list(mix), size=n, p=np.array(list(mix.values())) / sum(mix.values()))
    loaded = [(path, ImageFont.truetype(str(path), 48)) for path in fonts]
    per_font = {path: [c for c in glyphs if has_glyph(font, c)] for path, font in loaded}
    pools = {"glyph": per_font, "kana": {path: [c for c in chars if is_kana(c)] for path, chars in per_font.items()}}
    pools = {kind: {path: chars for path, chars in pool.items() if chars} for kind, pool in pools.items()}
    others = {c: np.flatnonzero(labels != c) for c in np.unique(labels)}
    out = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        for tries in range(100):
            # A crop preprocessing calls blank never reaches the model: draw another. Source images
            # without ink (fabricated test data) fall back to strokes, which always have ink.
            if tries == 10:
                kinds[i] = "strokes"
            prepared = prepare_array(one_negative(kinds[i], images, labels, others, pools, rng), size)
            if not prepared.blank:
                break
        out[i] = prepared.pixels
    return out, kinds


# Kinds cut from the model's own characters: of two images of different classes, or of one.
FROM_PAIR = {"merged": merged_pair, "overlay": overlay}
FROM_ONE = {"fragment": fragment, "turned": turned}


def one_negative(kind: str, images: np.ndarray, labels: np.ndarray, others: dict,
                 pools: dict[str, dict[Path, list[str]]], rng: np.random.Generator) -> np.ndarray:
    """One crop of `kind`, cut to its ink box as a segmenter would. `pools[kind][font]`: the glyphs of a
    rendered kind that the font has."""
    ia = int(rng.integers(len(images)))
    a = images[ia]
    if kind in FROM_PAIR:  # a different class, so the pair is not "one of ours" twice
        b = images[rng.choice(others[labels[ia]])]
    if kind in RENDERED:
        fonts = list(pools[kind])
        path = fonts[int(rng.integers(len(fonts)))]
        crop = render_glyph(pools[kind][path][int(rng.integers(len(pools[kind][path])))], path, rng)
    elif kind in FROM_PAIR:
        crop = FROM_PAIR[kind](a, b, rng)
    elif kind in FROM_ONE:
        crop = FROM_ONE[kind](a, rng)
    else:
        crop = strokes(rng)
    t, b_, l, r = ink_box(crop)
    return np.ascontiguousarray(crop[t:b_, l:r])
