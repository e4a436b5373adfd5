"""The summary's two charts (predicted characters, calibrated confidence), drawn with PIL.

Why not matplotlib (kmnist_core/plots.py draws training and evaluation figures): importing it and drawing
these two figures took about 1 s of a 300-crop predict's 2.5 s (bench/scale.py, docs/benchmarks.md);
with PIL they take milliseconds, as the review sheets do (reviews/sheet.py). Kana are drawn in
IPAexGothic, which the matplotlib-fontja package ships; its path is found without importing it.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

KANA_FONT = Path(importlib.util.find_spec("matplotlib_fontja").submodule_search_locations[0]) / "fonts" / "ipaexg.ttf"
BAR, AXIS, GRID, LINE = "#4c72b0", "#333333", "#dddddd", "#d62728"
LEFT, RIGHT, TOP, BOTTOM = 80, 20, 40, 60  # plot margins, pixels
HEIGHT = 440


@functools.lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont:  # read once per size, not per label
    return ImageFont.truetype(str(KANA_FONT), size)


def nice_step(span: float, ticks: int = 5) -> float:
    """A 1, 2 or 5 times a power of ten step giving about `ticks` ticks over `span`."""
    raw = span / ticks if span > 0 else 1.0
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def tick_text(value: float) -> str:
    return f"{value:,.0f}" if value >= 1 or value == 0 else f"{value:g}"


class Frame:
    """A chart's canvas and its plot area; maps data to pixels (y linear or log10)."""

    def __init__(self, width: int, title: str, xlabel: str, ylabel: str, y_max: float, log: bool):
        self.image = Image.new("RGB", (width, HEIGHT), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.x0, self.x1, self.y0, self.y1 = LEFT, width - RIGHT, HEIGHT - BOTTOM, TOP
        self.log = log
        if log:
            self.y_top = max(10.0, 10.0 ** math.ceil(math.log10(max(y_max, 1.0))))
        else:
            self.y_top = nice_step(y_max) * math.ceil(y_max / nice_step(y_max)) if y_max > 0 else 1.0
        self.text((width / 2, 8), title, 16, "ma")
        self.text(((self.x0 + self.x1) / 2, HEIGHT - 8), xlabel, 13, "md")
        label = Image.new("RGBA", (HEIGHT, 24), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((HEIGHT / 2, 12), ylabel, fill=AXIS, font=font(13), anchor="mm")
        rotated = label.rotate(90, expand=True)
        self.image.paste(rotated, (4, 0), rotated)

    def text(self, xy: tuple[float, float], text: str, size: int, anchor: str, fill: str = AXIS) -> None:
        self.draw.text(xy, text, fill=fill, font=font(size), anchor=anchor)

    def y(self, value: float) -> float:
        if self.log:
            share = math.log10(max(value, 1.0)) / math.log10(self.y_top)
        else:
            share = value / self.y_top
        return self.y0 - share * (self.y0 - self.y1)

    def y_axis(self) -> None:
        ticks = ([10 ** k for k in range(int(math.log10(self.y_top)) + 1)] if self.log
                 else list(np.arange(0, self.y_top * 1.0001, nice_step(self.y_top))))
        for value in ticks:
            y = self.y(value)
            self.draw.line([(self.x0, y), (self.x1, y)], fill=GRID)
            self.text((self.x0 - 6, y), tick_text(value), 12, "rm")
        self.draw.line([(self.x0, self.y0), (self.x1, self.y0)], fill=AXIS)
        self.draw.line([(self.x0, self.y0), (self.x0, self.y1)], fill=AXIS)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.image.save(path, optimize=False)
        return path


def bar_chart(labels: Sequence[str], values: np.ndarray, path: Path, title: str, ylabel: str) -> Path:
    """One bar per label (kana welcome), linear y from 0."""
    frame = Frame(max(600, LEFT + RIGHT + 34 * len(labels)), title, "", ylabel, float(np.max(values, initial=0)), False)
    frame.y_axis()
    slot = (frame.x1 - frame.x0) / max(1, len(labels))
    for i, (label, value) in enumerate(zip(labels, values)):
        left = frame.x0 + i * slot
        if value > 0:
            frame.draw.rectangle([left + slot * 0.15, frame.y(float(value)), left + slot * 0.85, frame.y0], fill=BAR)
        frame.text((left + slot / 2, frame.y0 + 6), str(label), 16, "ma")
    return frame.save(path)


def histogram(counts: np.ndarray, edges: np.ndarray, path: Path, title: str, xlabel: str,
              threshold: float | None = None, threshold_label: str = "") -> Path:
    """Counts already binned over `edges`, log y (a bin of 1 still shows), a dashed line at `threshold`."""
    frame = Frame(640, title, xlabel, "crops (log scale)", float(np.max(counts, initial=0)), True)
    frame.y_axis()
    lo, hi = float(edges[0]), float(edges[-1])
    x = lambda v: frame.x0 + (v - lo) / (hi - lo) * (frame.x1 - frame.x0)  # noqa: E731
    for count, a, b in zip(counts, edges[:-1], edges[1:]):
        if count > 0:
            frame.draw.rectangle([x(a) + 1, frame.y(float(count)) if count > 1 else frame.y0 - 2, x(b) - 1, frame.y0], fill=BAR)
    for value in np.arange(lo, hi + 1e-9, nice_step(hi - lo)):
        frame.text((x(value), frame.y0 + 6), f"{value:g}", 12, "ma")
    if threshold is not None:
        tx = x(threshold)
        for y in range(int(frame.y1), int(frame.y0), 10):
            frame.draw.line([(tx, y), (tx, min(y + 5, frame.y0))], fill=LINE, width=2)
        frame.text((tx - 6, frame.y1 + 4), threshold_label, 12, "ra", LINE)
    return frame.save(path)
