"""Turn a real crop (any file format, mode, size, polarity) into the model's input.

KMNIST images are light ink on a dark background, the character fitted into a square. Scans arrive the
other way round (dark ink on light paper), in any PIL mode and size, sometimes with EXIF rotation or
with the ink only in an alpha channel. `prepare_image` normalizes all of that and says whether it
inverted the polarity, so the decision is recorded per row.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000  # a character crop is never this large; larger files are refused unread


class DecodeError(Exception):
    """A file that cannot become a model input. `kind` is a stable label for error counts."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@dataclass(frozen=True)
class PreparedImage:
    pixels: np.ndarray  # uint8 (size, size), light ink on dark
    width: int  # of the original file, after EXIF orientation
    height: int
    inverted: bool  # True if the original was dark ink on light


def to_grayscale(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> float32 (H, W) in [0, 1]. Transparent areas become paper (white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return np.clip(arr / hi, 0, 1)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        alpha, color = rgba[..., 3], rgba[..., :3].mean(axis=2)
        opaque = alpha > 0
        if not opaque.any() or np.ptp(color[opaque]) < 0.02:
            # The colour is flat: the character lives only in the alpha channel (ink = opaque).
            return 1.0 - alpha
        return color * alpha + (1.0 - alpha)  # composite on white paper
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def normalize_polarity(gray: np.ndarray) -> tuple[np.ndarray, bool]:
    """Make ink light and background dark, judging the background by the image border."""
    h, w = gray.shape
    ring = max(1, min(h, w) // 10)
    border = np.concatenate([gray[:ring].ravel(), gray[-ring:].ravel(), gray[:, :ring].ravel(), gray[:, -ring:].ravel()])
    background = float(np.median(border))
    inverted = background > 0.5
    if inverted:
        gray, background = 1.0 - gray, 1.0 - background
    # Stretch so the background sits at 0 and the strongest ink at 1, as in KMNIST.
    peak = float(gray.max())
    if peak - background > 1e-3:
        gray = np.clip((gray - background) / (peak - background), 0, 1)
    return gray, inverted


def fit_square(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize keeping the aspect ratio so the longer side is `size`, centred on a black square."""
    h, w = gray.shape
    if h == w == size:  # already a model input (a KMNIST-sized crop): no resampling round trip
        return (gray * 255).round().astype(np.uint8)
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = Image.fromarray((gray * 255).round().astype(np.uint8), mode="L")
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BILINEAR)
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = np.asarray(img)
    return out


EXIF_FORMATS = {"JPEG", "MPO", "TIFF", "WEBP"}


def prepare_image(img: Image.Image, size: int) -> PreparedImage:
    if img.format in EXIF_FORMATS or "exif" in img.info:  # reading EXIF costs as much as decoding a small PNG
        img = ImageOps.exif_transpose(img)
    gray, inverted = normalize_polarity(to_grayscale(img))
    return PreparedImage(fit_square(gray, size), img.width, img.height, inverted)


def prepare_array(arr: np.ndarray, size: int) -> PreparedImage:
    """A uint8 (H, W) array, either polarity (a KMNIST array passes through unchanged)."""
    if arr.ndim != 2:
        raise DecodeError("bad_array", f"expected a 2-D grayscale array, got shape {arr.shape}")
    gray, inverted = normalize_polarity(arr.astype(np.float32) / 255.0)
    return PreparedImage(fit_square(gray, size), arr.shape[1], arr.shape[0], inverted)


def decode_bytes(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Decode one file's bytes. Raises DecodeError with a kind: empty, not_image, too_large, truncated, corrupt."""
    if not data:
        raise DecodeError("empty", "file is empty")
    try:
        img = Image.open(io.BytesIO(data))
        # Image.open reads only the header: refuse huge images before any pixel is allocated. The
        # limit is below PIL's own decompression-bomb threshold, so PIL's check never fires first.
        if img.width * img.height > max_pixels:
            raise DecodeError("too_large", f"{img.width}x{img.height} pixels exceeds the limit of {max_pixels}")
        img.load()
        return prepare_image(img, size)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not_image", "not a recognised image format") from None
    except Image.DecompressionBombError as e:  # e.g. an animated image whose frames add up
        raise DecodeError("too_large", str(e)) from None
    except OSError as e:
        kind = "truncated" if "truncated" in str(e).lower() or "end of file" in str(e).lower() else "corrupt"
        raise DecodeError(kind, str(e)) from None
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError, ZeroDivisionError) as e:
        raise DecodeError("corrupt", f"{type(e).__name__}: {e}") from None
