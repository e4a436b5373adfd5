"""A lean PNG reader for the common crop: 8-bit greyscale, not interlaced, with nothing but pixels and
layout metadata. PIL spends ~40 µs of Python per small file on objects a crop does not need; this
reads the chunks with struct, inflates with zlib and undoes the row filters as array arithmetic over
every crop of one shape at once. A file it does not take (another kind of PNG, a CRC or zlib error,
extra chunks PIL would read into `info`) is left to PIL, which decodes it or names its error; so what
comes out is PIL's pixels, bit for bit (tests/test_png.py checks it), or nothing.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks that change neither the pixels nor anything the lean path reads from PIL's `info`: text chunks
# may carry XMP (an orientation), tRNS a transparency, eXIf a rotation; those files go to PIL.
LAYOUT_CHUNKS = frozenset({b"IDAT", b"IEND", b"pHYs", b"tIME"})
# Below this many crops of one shape, undoing Average and Paeth filters column by column costs more
# than PIL does per file (28 x 28 crops, decode_many against PIL: 0.95x in batches of 256, 1.17x of 384,
# 1.47x of 1,024; bench/decode_png.py).
MIN_GROUP = 320


def grey_shape(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(height, width) of an 8-bit greyscale, non-interlaced PNG within max_pixels, from its signature and
    a checked IHDR alone (a file's shape decides whether its group is worth inflating); None otherwise."""
    if not data.startswith(SIGNATURE) or len(data) < 33:
        return None
    length, kind, width, height, depth, colour, method, filtering, interlace = struct.unpack_from(">I4sIIBBBBB", data, 8)
    if (kind != b"IHDR" or length != 13 or (depth, colour, method, filtering, interlace) != (8, 0, 0, 0, 0)
            or not 0 < width * height <= max_pixels or zlib.crc32(memoryview(data)[12:29]) != int.from_bytes(data[29:33], "big")):
        return None
    return height, width


def grey_rows(data: bytes, height: int, width: int) -> bytes | None:
    """The inflated filtered rows of a PNG whose IHDR grey_shape read as (height, width), when every
    chunk after it checks out and the stream holds exactly the image; None otherwise."""
    view = memoryview(data)
    pos, idat = 33, []
    while True:
        if pos + 12 > len(data):
            return None  # no IEND
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if kind not in LAYOUT_CHUNKS or end + 4 > len(data) or \
                zlib.crc32(view[pos + 4 : end]) != int.from_bytes(data[end : end + 4], "big"):
            return None
        if kind == b"IEND":
            break
        if kind == b"IDAT":
            idat.append(view[pos + 8 : end])
        pos = end + 4
    size = height * (width + 1)
    try:
        inflater = zlib.decompressobj()
        rows = inflater.decompress(b"".join(idat), size + 1)  # a stream that inflates past the image stops here
    except zlib.error:
        return None
    if len(rows) != size or not inflater.eof or inflater.unused_data:
        return None
    return rows


def unfilter(rows: np.ndarray) -> np.ndarray:
    """uint8 (N, H, 1 + W) filtered rows of N same-shape greyscale crops -> their uint8 (N, H, W) pixels,
    (PNG specification, section 9: one byte a pixel, so "left" is the previous byte). Raises ValueError
    on an unknown filter type.

    None and Sub rows stand alone; Up, Average and Paeth rows read the row above, so they are undone in
    rounds: round d takes every row that ends a run of d such rows, over all crops at once, its row above
    being final by then. Average and Paeth go column by column (each byte needs the one left of it), once
    a round rather than once a row: on kmnist-dev's PNGs, 13-16 rounds hold them against 27 of 28 rows."""
    n, h, w = rows.shape[0], rows.shape[1], rows.shape[2] - 1
    kinds, raw = rows[:, :, 0], rows[:, :, 1:]
    if kinds.max(initial=0) > 4:
        raise ValueError("unknown PNG filter type")
    out = raw.copy()
    sub = kinds == 1
    if sub.any():
        out[sub] = np.cumsum(raw[sub], axis=1, dtype=np.uint8)  # wraps modulo 256, as the filter does
    reads_above = kinds >= 2
    depth = np.zeros((n, h), np.int32)  # how many rows reading the one above end at this one
    for y in range(h):
        depth[:, y] = np.where(reads_above[:, y], depth[:, y - 1] + 1 if y else 1, 0)
    for d in range(1, int(depth.max(initial=0)) + 1):
        crop, y = np.nonzero(depth == d)
        line, kind = raw[crop, y], kinds[crop, y]
        above = out[crop, y - 1]
        above[y == 0] = 0  # the row before the first is zeros
        row = line + above  # Up
        for chain, step in ((kind == 3, average_step), (kind == 4, paeth_step)):
            if chain.any():
                row[chain] = unchain(line[chain], above[chain], step)
        out[crop, y] = row
    return out


def average_step(left: np.ndarray, up: np.ndarray, upper_left: np.ndarray, up_minus_upper_left: np.ndarray) -> np.ndarray:
    return (left + up) >> 1


def paeth_step(left: np.ndarray, up: np.ndarray, upper_left: np.ndarray, up_minus_upper_left: np.ndarray) -> np.ndarray:
    """The Paeth predictor: whichever of left, up, upper left is nearest to left + up - upper left (ties
    in that order). Its distance to left, |up - upper left|, is `up_minus_upper_left` in absolute value."""
    to_left = np.abs(up_minus_upper_left)
    left_minus_upper_left = left - upper_left
    to_up, to_upper_left = np.abs(left_minus_upper_left), np.abs(left_minus_upper_left + up_minus_upper_left)
    return np.where((to_left <= to_up) & (to_left <= to_upper_left), left,
                    np.where(to_up <= to_upper_left, up, upper_left))


def unchain(line: np.ndarray, above: np.ndarray, step) -> np.ndarray:
    """Rows (M, W) filtered with Average or Paeth (`step`: the predictor of each byte from its left, up
    and upper-left neighbours) -> their bytes."""
    x = line.T.astype(np.int16)  # (W, M): one contiguous column a step
    up = above.T.astype(np.int16)
    upper_left = np.zeros_like(up)
    upper_left[1:] = up[:-1]
    rise = up - upper_left
    left = np.zeros(line.shape[0], np.int16)
    out = np.empty_like(x)
    for col in range(len(x)):
        left = (x[col] + step(left, up[col], upper_left[col], rise[col])) & 255
        out[col] = left
    return out.T.astype(np.uint8)
