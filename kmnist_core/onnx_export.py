"""A torch model as ONNX: the export, the first-conv unfold, and the fp32 twin every CPU row runs on.

Why an fp32 twin: on CPU, predict, report, review and evaluate run ONNX Runtime only (kmnist_core/
ort_model.py), so an install without torch (`pip install kmnist-batch`, no `[train]`) predicts the same rows.
The twin is the exported fp32 model (batch norm folded, first conv unfolded, see below), built where the
torch model is (`train`, `kmnist-batch model int8`, the recipe) and checked there against torch on
images the card names: its logits within MAX_LOGIT_DIFF of torch's and the same decisions (top-1,
review flag, out-of-set flag) on every one, or it stays off and CPU fp32 runs torch (`[train]`).
The card's `fp32_onnx` section holds its sha256 and that check.

Why the first conv is unfolded: a conv over the one-channel image (K = 9 products per output) took a quarter
of the int8 twin's time in ORT's QLinearConv for 1 % of its multiply-adds. `unfold_first_conv` turns it into
a 1x1 conv over the 3x3 neighbourhoods (9 channels, gathered by OrtModel from the normalized image, zero
padded as the conv pads): the same weights, so the same sums, and the int8 twin runs ~7 % faster. The
model's metadata names the unfold (UNFOLD_KEY); a model without it takes the image as it is.
"""

from __future__ import annotations

import copy
import hashlib
import io
import warnings
from typing import Callable

import numpy as np

from kmnist_core import calibration
from kmnist_core.card import Calibration, Fp32OnnxSection
from kmnist_core.ort_model import UNFOLD_KEY, OrtModel
from kmnist_core.policy import accepted, out_of_set

FP32_FILE = "model.fp32.onnx"
OPSET = 17
MAX_LOGIT_DIFF = 1e-3  # |ORT - torch| per logit; float rounding differs by ~1e-5, a wrong graph by far more
CHECK_IMAGES = 4096


def export_onnx(model, input_size: int) -> bytes:
    """fp32 ONNX of an inference-ready torch model (batch norm folded), batch dimension dynamic."""
    import torch

    # A copy: .to() changes a module in place. The exporter traces either memory layout the same.
    model = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()
    buffer = io.BytesIO()
    # The TorchScript exporter: deterministic bytes for the same weights, and no onnxscript needed; it
    # warns that it is deprecated on every call.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, 1, input_size, input_size),), buffer, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
                          opset_version=OPSET, dynamo=False)
    return buffer.getvalue()


def unfold_first_conv(fp32_onnx: bytes) -> bytes:
    """The model with its first conv, when it reads the one-channel input with a k x k kernel, stride 1 and
    "same" zero padding, rewritten as a 1x1 conv over k*k input channels (the image's k x k neighbourhoods,
    kmnist_core/ort_model.py `unfold`); any other model is returned as it is."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(fp32_onnx)
    graph = model.graph
    conv = next((n for n in graph.node if graph.input[0].name in n.input), None)
    if conv is None or conv.op_type != "Conv":
        return fp32_onnx
    attrs = {a.name: list(a.ints) if a.ints else a.i for a in conv.attribute}
    weights = next(t for t in graph.initializer if t.name == conv.input[1])
    w = numpy_helper.to_array(weights)
    k = w.shape[-1]
    if (w.shape[1] != 1 or w.shape[2] != k or k % 2 == 0 or attrs.get("group", 1) != 1
            or set(attrs.get("strides", [1])) != {1} or set(attrs.get("dilations", [1])) != {1}
            or set(attrs.get("pads", [0])) != {k // 2}):
        return fp32_onnx
    weights.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.reshape(w.shape[0], k * k, 1, 1)), weights.name))
    for a in conv.attribute:
        if a.name == "kernel_shape":
            a.ints[:] = [1, 1]
        elif a.name == "pads":
            a.ints[:] = [0, 0, 0, 0]
    graph.input[0].type.tensor_type.shape.dim[1].dim_value = k * k
    onnx.helper.set_model_props(model, {UNFOLD_KEY: str(k)})
    return model.SerializeToString()


def input_unfold(onnx_bytes: bytes) -> int:
    """The k of a model's unfolded first conv (1: it takes the image as it is)."""
    import onnx

    props = {p.key: p.value for p in onnx.load_from_string(onnx_bytes).metadata_props}
    return int(props.get(UNFOLD_KEY, 1))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fp32_twin_bytes(fp32_model, input_size: int) -> bytes:
    """The fp32 twin of an inference-ready torch model: exported, its first conv unfolded. The int8 twin is
    this, quantized."""
    return unfold_first_conv(export_onnx(fp32_model, input_size))


def decisions(logits: np.ndarray, calib: Calibration) -> np.ndarray:
    """(N, 3): top-1, out of set, auto-accepted: what a row's logits decide under a calibration."""
    probs = calibration.softmax(logits, calib.temperature)
    unknown = out_of_set(calibration.ood_score(logits, calib.ood_score).astype(np.float32), calib.ood_threshold)
    return np.stack([logits.argmax(1), unknown, accepted(unknown, probs.max(1).astype(np.float32), calib.review_below)], 1)


def build_fp32_twin(fp32_model, card: dict, images: np.ndarray,
                    torch_logits: Callable[[np.ndarray], np.ndarray]) -> tuple[bytes, Fp32OnnxSection]:
    """The fp32 twin and its card section, checked against the torch model on `images` (CHECK_IMAGES of
    them at most, a seeded draw)."""
    import onnxruntime

    twin = fp32_twin_bytes(fp32_model, int(card["input"]["size"]))
    if len(images) > CHECK_IMAGES:
        images = images[np.sort(np.random.default_rng(0).permutation(len(images))[:CHECK_IMAGES])]
    ours, theirs = OrtModel(twin).logits(images), torch_logits(images)
    calib = Calibration.from_json(card.get("calibration") or {})
    diff = float(np.abs(ours - theirs).max()) if len(images) else 0.0
    differ = int((decisions(ours, calib) != decisions(theirs, calib)).any(1).sum()) if len(images) else 0
    reasons = ([f"logits differ from torch's by up to {diff:.2g} (> {MAX_LOGIT_DIFF})"] if diff > MAX_LOGIT_DIFF else []) + \
              ([f"{differ} of {len(images)} rows decided otherwise than by torch"] if differ else [])
    section = Fp32OnnxSection(
        file=FP32_FILE, sha256=sha256(twin), runtime=f"onnxruntime {onnxruntime.__version__}", opset=OPSET,
        check={"images": int(len(images)), "max_abs_logit_diff": diff, "max_allowed": MAX_LOGIT_DIFF,
               "decisions_differ": differ},
        enabled=not reasons, fallback="; ".join(reasons) + ": CPU fp32 runs torch" if reasons else None)
    return twin, section
