"""Fabricate crop trees from real kmnist-dev images, in every file form an archive sends."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def mixed_tree(root: Path, images: np.ndarray, labels: np.ndarray, chars) -> dict:
    """Every kind of file the predict command must handle. Returns what a correct run must report."""
    rng = np.random.default_rng(0)
    good = {}  # rel_path -> true char, for files that must decode
    g = lambda i: images[i]  # noqa: E731
    paper = lambda i: 255 - images[i]  # noqa: E731

    def add(rel, i, img, fmt=None, **kw):
        save(img, root / rel, fmt, **kw)
        good[rel] = chars[labels[i]]

    add("book1/page1/light.png", 0, Image.fromarray(g(0)))
    add("book1/page1/scan.PNG", 1, Image.fromarray(paper(1)))
    noisy = np.clip(paper(2).astype(int)[..., None].repeat(3, 2) + rng.normal(0, 12, (28, 28, 3)), 0, 255).astype(np.uint8)
    add("book1/page1/noisy rgb.JpG", 2, Image.fromarray(noisy).resize((84, 84)), "JPEG", quality=90)
    add("book1/page2/16bit.tif", 3, Image.fromarray(paper(3).astype(np.uint16) * 257))
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = g(4)
    add("book1/page2/alpha-ink.png", 4, Image.fromarray(rgba, "RGBA"))
    add("book1/page2/palette.gif", 5, Image.fromarray(paper(5)).convert("P"))
    add("book1/page2/bitmap.bmp", 6, Image.fromarray(paper(6)))
    add("book1/page2/lossless.webp", 7, Image.fromarray(paper(7)), "WEBP", lossless=True)
    add("book1/page2/gray.pgm", 8, Image.fromarray(paper(8)))
    add("book2/日本 語/tall crop.png", 9, Image.fromarray(paper(9)).resize((48, 96)))
    rot = Image.fromarray(paper(10)).rotate(90, expand=True)  # stored sideways, EXIF says rotate back
    exif = rot.getexif()
    exif[0x0112] = 6
    add("book2/exif.jpg", 10, rot, "JPEG", quality=95, exif=exif.tobytes())
    add("single-level.png", 11, Image.fromarray(g(11)))

    errors = {}
    (root / "book3").mkdir()
    (root / "book3/empty.png").write_bytes(b"")
    errors["book3/empty.png"] = "empty"
    (root / "book3/fake.jpg").write_bytes(b"this is a text file with a jpg name")
    errors["book3/fake.jpg"] = "not_image"
    buf = io.BytesIO()
    Image.fromarray(np.tile(paper(0), (8, 8))).save(buf, "PNG")
    (root / "book3/truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    errors["book3/truncated.png"] = ("truncated", "corrupt")
    save(Image.new("1", (20000, 20000)), root / "book3/bomb.png")
    errors["book3/bomb.png"] = "too_large"

    (root / ".hidden.png").write_bytes((root / "single-level.png").read_bytes())
    save(Image.fromarray(g(0)), root / ".thumbnails/x.png")
    (root / "book1/notes.txt").write_text("not an image")
    (root / "book1/page1/Thumbs.db").write_bytes(b"\0" * 10)
    os.symlink("..", root / "book2/loop")  # a symlink loop back up the tree
    return {"good": good, "errors": errors, "hidden": 2, "non_image": 2}


def plain_tree(root: Path, images: np.ndarray, n: int, per_folder: int = 500) -> list[Path]:
    """`n` 28x28 PNG crops in folders of `per_folder`."""
    paths = []
    for i in range(n):
        p = root / f"f{i // per_folder:03d}" / f"{i:06d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i % len(images)]).save(p)
        paths.append(p)
    return paths


def hold_file(folder: Path, image: np.ndarray, name: str = "busy.hold.png") -> Path:
    """A crop that a run started with `HOLD_ENV` does not read until `release(path)`: the run stays busy,
    whatever the machine's speed, until the test says so (batch_infer/stages.py, TEST_HOLD)."""
    return save(Image.fromarray(image), folder / name)


def release(path: Path | str) -> None:
    Path(str(path) + ".release").write_bytes(b"")


HOLD_ENV = {"KMNIST_BATCH_TEST_HOLD": "1"}
