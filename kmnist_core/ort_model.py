"""ONNX models on ONNX Runtime's CPU provider: what every CPU row runs through, with no torch.

A model directory carries two ONNX twins of its torch weights (kmnist_core/onnx_export.py builds the fp32
one, kmnist_core/int8.py the int8 one). Both read uint8 light-on-dark pixels normalized to [-1, 1]; when
the twin's first conv was unfolded (its metadata says UNFOLD_KEY = k), the k x k neighbourhood of every
pixel as k*k channels, and when it also runs on 2x2 blocks (BLOCKS_KEY = 2, kmnist_core/pooled_conv.py),
the (k+1) x (k+1) neighbourhood of every block.
"""

from __future__ import annotations

import os

import numpy as np

from kmnist_core.preprocess import MEAN, STD

UNFOLD_KEY = "kmnist.input_unfold"  # ONNX metadata: the k of a k x k first conv unfolded into k*k input channels
BLOCKS_KEY = "kmnist.input_blocks"  # ONNX metadata: 2 when that conv reads the neighbourhoods of 2x2 blocks
# Crops per ONNX Runtime call, whatever the caller's batch: ORT's memory arena keeps the largest call's
# activations for the session's life (a 1,024-crop call of the default model: ~150 MB more resident per
# worker than 256, at the same speed; bench/scale.py), and a small call's activations stay in cache (64
# against 256: ~5 % less time a crop and 23 MB less resident; bench/run_batch.py, docs/benchmarks.md).
RUN_BATCH = 64


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S) light-on-dark -> float32 (N, 1, S, S) in [-1, 1], as transforms.to_model_tensor."""
    return ((pixels.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]


def unfold(x: np.ndarray, k: int, out: np.ndarray | None = None) -> np.ndarray:
    """(N, 1, S, S) -> (N, k*k, S, S): channel dy*k+dx holds each pixel's neighbour at (dy - k//2, dx - k//2),
    0 beyond the edge (the conv's zero padding). `out`: a zeroed buffer to fill (its edges stay 0)."""
    n, _, h, w = x.shape
    r = k // 2
    out = np.zeros((n, k * k, h, w), np.float32) if out is None else out[:n]
    for dy in range(k):
        for dx in range(k):
            y0, y1, x0, x1 = max(0, r - dy), h - max(0, dy - r), max(0, r - dx), w - max(0, dx - r)
            out[:, dy * k + dx, y0:y1, x0:x1] = x[:, 0, y0 + dy - r : y1 + dy - r, x0 + dx - r : x1 + dx - r]
    return out


def block_unfold(x: np.ndarray, k: int, b: int, out: np.ndarray | None = None) -> np.ndarray:
    """(N, 1, S, S), S a multiple of b -> (N, (k+b-1)**2, S/b, S/b): channel ry*(k+b-1)+rx holds, for each
    b x b block, the pixel (ry - k//2, rx - k//2) away from its top-left one, 0 beyond the edge (the conv's
    zero padding). `out`: a buffer to fill."""
    n, _, h, w = x.shape
    r, side = k // 2, k + b - 1
    padded = np.zeros((n, h + 2 * r, w + 2 * r), np.float32)
    padded[:, r : r + h, r : r + w] = x[:, 0]
    out = np.empty((n, side * side, h // b, w // b), np.float32) if out is None else out[:n]
    for ry in range(side):
        for rx in range(side):
            out[:, ry * side + rx] = padded[:, ry : ry + h - b + 1 : b, rx : rx + w - b + 1 : b]
    return out


def model_input(pixels: np.ndarray, k: int, out: np.ndarray | None = None, blocks: int = 1) -> np.ndarray:
    """What an ONNX model whose first conv is unfolded by k (1: not), on blocks of `blocks` pixels a side
    (1: each pixel), reads for uint8 pixels."""
    x = normalize(pixels)
    if k == 1:
        return x
    return unfold(x, k, out) if blocks == 1 else block_unfold(x, k, blocks, out)


def default_threads() -> int:
    """Intra-op threads when none are given: OMP_NUM_THREADS (Ray sets it to an actor's CPUs), else the
    CPUs this process may run on."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class OrtModel:
    """An ONNX model on ONNX Runtime's CPU provider; uint8 pixels in, logits out. `threads`: intra-op
    threads (None: default_threads() at construction)."""

    def __init__(self, onnx_bytes: bytes, threads: int | None = None):
        self.onnx_bytes = onnx_bytes
        self.threads = threads or default_threads()
        self.session = None
        # read from the model's metadata with the session (ORT parses it anyway; onnx is slow to import)
        self.unfold = self.blocks = 1
        self.buffer: np.ndarray | None = None  # reused unfold input: a fresh 28 MB array per batch page-faults

    def _input(self, pixels: np.ndarray) -> np.ndarray:
        """One batch's model input; an unfolded twin's is written into the reused buffer."""
        if self.unfold > 1:
            b = self.blocks
            shape = (self.unfold ** 2, *pixels.shape[1:]) if b == 1 else \
                ((self.unfold + b - 1) ** 2, pixels.shape[1] // b, pixels.shape[2] // b)
            if self.buffer is None or len(self.buffer) < len(pixels) or self.buffer.shape[1:] != shape:
                self.buffer = np.zeros((len(pixels), *shape), np.float32)
        return model_input(pixels, self.unfold, self.buffer, self.blocks)

    def _session(self):
        if self.session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            # Idle threads sleep instead of spinning: a model actor shares its cores with decode tasks.
            # (2 idle threads: spinning gave ~17 % more images/s for ~25 % more CPU time, the same per core.)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.log_severity_level = 3
            self.session = ort.InferenceSession(self.onnx_bytes, opts, providers=["CPUExecutionProvider"])
            meta = self.session.get_modelmeta().custom_metadata_map
            self.unfold, self.blocks = int(meta.get(UNFOLD_KEY, 1)), int(meta.get(BLOCKS_KEY, 1))
        return self.session

    def logits(self, pixels: np.ndarray, batch_size: int = RUN_BATCH) -> np.ndarray:
        session = self._session()
        batch_size = min(batch_size, RUN_BATCH)
        out = [session.run(None, {"x": self._input(pixels[s : s + batch_size])})[0]
               for s in range(0, len(pixels), batch_size)]
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros((0, 0), np.float32)
