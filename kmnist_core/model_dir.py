"""The model directory: the format every command reads and writes.

    model.pt         state_dict only, loaded with torch.load(weights_only=True): no code is unpickled
    model_card.json  architecture, classes, normalization, input, calibration, training data and
                     split, metrics, code version; `int8` and `fp32_onnx`: the twins' sha256 and checks
    model.fp32.onnx  the fp32 twin every CPU row runs on (kmnist_core/onnx_export.py), ONNX protobuf
    model.int8.onnx  the int8 CPU model (kmnist_core/int8.py), ONNX protobuf, and
    model.int8.probe.npz  its probe (plain arrays): all three written by `train` or `kmnist-batch model
                     int8`; loading reads them and never writes into the directory

`load_bundle` reads and checks a directory (a path, or "default" = the model embedded in the package) and
decides its precision once; `build_predictor` turns a bundle into a Predictor in whichever process runs
it; `load_model` does both. On CPU nothing here imports torch: both twins run on ONNX Runtime. torch (the
`[train]` extra) runs fp32 on a GPU, or on CPU for a directory without a usable fp32 twin.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from kmnist_core.errors import KmnistError, require_torch
from kmnist_core.files import json_text, temp_name
from kmnist_core.card import CARD_FILE, FORMAT_VERSION, ModelCard, read_card
from kmnist_core.int8 import INT8_FILE, PROBE_FILE, check_probe, check_twin, near_decision
from kmnist_core.onnx_export import FP32_FILE, sha256
from kmnist_core.ort_model import OrtModel
from kmnist_core.policy import DecisionPolicy, after_probe, decide_policy, follow, out_of_set
from kmnist_core.precision import Int8Twin, ModelBundle, Twins, resolve_precision
from kmnist_core.preprocess import PreparedImage, prepare_array, prepare_image

WEIGHTS_FILE = "model.pt"
MODEL_FILES = (WEIGHTS_FILE, FP32_FILE, INT8_FILE, PROBE_FILE, CARD_FILE)  # a directory's files, the card last
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


def save_model_dir(out: Path, model, card: dict, twins: Twins | None = None) -> dict:
    """Write a torch model's weights, its twins (when given; their sections are added to `card`) and the
    card; the card gains `model_id`, the weights' sha256 prefix."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    weights = buffer.getvalue()
    card = {**card, **(twins.card_sections() if twins else {}), "format_version": FORMAT_VERSION,
            "model_id": weights_id(weights)}
    # All files are complete on disk before any is replaced; a crash between the renames leaves a set
    # that loading refuses (a hash no longer matches), never a silently mislabelled model.
    write_files(out, [(WEIGHTS_FILE, weights), *twin_files(twins), (CARD_FILE, json_text(card).encode("utf-8"))])
    return card


def twin_files(twins: Twins | None) -> list[tuple[str, bytes]]:
    if twins is None:
        return []
    return [(FP32_FILE, twins.fp32_onnx), (INT8_FILE, twins.int8.onnx), (PROBE_FILE, twins.int8.probe)]


def write_files(out: Path, files: list[tuple[str, bytes]]) -> None:
    """All files complete on disk before any is replaced, the card last."""
    for name, data in files:
        temp_name(out / name).write_bytes(data)
    for name, _ in files:
        os.replace(temp_name(out / name), out / name)


def weights_id(weights: bytes) -> str:
    """A model's id: the sha256 prefix of its weights file."""
    return hashlib.sha256(weights).hexdigest()[:16]


def resolve_model_path(name_or_path: str | Path) -> Path:
    if str(name_or_path) == "default":
        return DEFAULT_MODEL_DIR
    return Path(name_or_path)


@dataclass(frozen=True)
class Prediction:
    """One crop's prediction. A blank crop holds no character: every field but review_reason ("blank") and
    precision is None, as in predict's rows."""

    index: int | None
    char: str | None
    codepoint: str | None
    confidence: float | None  # calibrated probability of `index`
    probabilities: np.ndarray | None  # (num_classes,), calibrated
    ood_score: float | None  # higher = less like any of the model's classes
    review_reason: str | None  # None = auto-accepted; see kmnist_core.review_reasons
    precision: str  # the runtime that computed it: int8, or fp32 (also for int8's rows near a decision)


@dataclass(frozen=True)
class Assessment:
    probabilities: np.ndarray  # (N, C) float32, calibrated
    ood_score: np.ndarray  # (N,) float32, higher = less like any of the model's classes
    unknown: np.ndarray  # (N,) bool, ood_score above the ood_threshold (all False without one)
    fp32_rows: np.ndarray  # (N,) bool, rows the fp32 model computed (all of them unless the Predictor runs int8)


class Predictor:
    """A loaded model plus everything needed to turn crops into calibrated class probabilities and decisions.

    Everything it decides comes from `policy` (kmnist_core/policy.py): the precision ("fp32" runs `fp32`;
    "int8" runs `int8`, an OrtModel, with `fp32` recomputing the rows near a decision), the temperature and
    both review thresholds. `fp32` computes fp32 logits: an OrtModel of the fp32 twin on CPU, or a
    TorchModel (kmnist_core/models.py) on a GPU or for a directory without a usable twin. `probe` is the
    int8 twin's probe result on this CPU (kmnist_core/int8.py check_probe). `temperature`, `review_below`,
    ... read the policy."""

    def __init__(self, fp32, card: ModelCard, policy: DecisionPolicy, int8: OrtModel | None = None,
                 probe: dict | None = None):
        if (policy.used == "int8") != (int8 is not None):
            raise ValueError("an int8 Predictor needs its OrtModel, and only it")
        self.fp32 = fp32
        self.card = card
        self.policy = policy
        self.probe = probe
        self.int8 = int8
        self.classes = card.classes
        self.input_size = card.input_size
        self.model_id = card.model_id

    precision = property(lambda self: self.policy.used)
    precision_note = property(lambda self: self.policy.precision.note)
    calibration = property(lambda self: self.policy.calibration)
    temperature = property(lambda self: self.policy.temperature)
    review_below = property(lambda self: self.policy.review_below)
    ood_method = property(lambda self: self.policy.ood_score)
    ood_threshold = property(lambda self: self.policy.ood_threshold)  # None: the card has no out-of-set threshold

    def with_thresholds(self, review_below: float | None = None, ood_threshold: float | None = None) -> "Predictor":
        """The same loaded model deciding with the user's thresholds (DecisionPolicy.with_thresholds)."""
        other = copy.copy(self)
        other.policy = self.policy.with_thresholds(review_below, ood_threshold)
        return other

    def logits(self, pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """uint8 (N, S, S) light-on-dark -> raw logits (N, C), near-decision rows from fp32 when int8 runs."""
        return self.decided_logits(pixels, batch_size)[0]

    def decided_logits(self, pixels: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Logits and the rows the fp32 model computed. At int8, the rows near one of the policy's thresholds
        (kmnist_core/int8.py near_decision) are recomputed in fp32, so int8 decides only clear rows."""
        if self.int8 is None:
            out = self.fp32_logits(pixels, batch_size)
            return out, np.ones(len(out), bool)
        out = self.int8.logits(pixels, batch_size)
        if not len(out):
            return np.zeros((0, len(self.classes)), np.float32), np.zeros(0, bool)
        p = self.policy
        near = near_decision(out, p.temperature, p.review_below, p.ood_score, p.ood_threshold)
        if near.any():
            out[near] = self.fp32_logits(pixels[near], batch_size)
        return out, near

    def fp32_logits(self, pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """The fp32 model's logits, whatever the precision (int8 is measured against these)."""
        out = self.fp32.logits(pixels, batch_size)
        return out if len(out) else np.zeros((0, len(self.classes)), np.float32)

    def probabilities(self, pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Calibrated probabilities (softmax of logits / temperature)."""
        from kmnist_core.calibration import softmax

        return softmax(self.logits(pixels, batch_size), self.temperature)

    def assess(self, pixels: np.ndarray, batch_size: int = 1024) -> Assessment:
        """Calibrated probabilities, an out-of-set score and the unknown flag for model inputs, under the
        policy (with_thresholds for other thresholds)."""
        from kmnist_core.calibration import ood_score, softmax

        logits, fp32_rows = self.decided_logits(pixels, batch_size)
        score = ood_score(logits, self.policy.ood_score).astype(np.float32)
        unknown = out_of_set(score, self.policy.ood_threshold)
        return Assessment(softmax(logits, self.temperature).astype(np.float32), score, unknown, fp32_rows)

    def prepare(self, image: Image.Image | np.ndarray) -> PreparedImage:
        if isinstance(image, Image.Image):
            return prepare_image(image, self.input_size)
        return prepare_array(np.asarray(image), self.input_size)

    def predict(self, images: Sequence[Image.Image | np.ndarray]) -> list[Prediction]:
        """Predict PIL images or uint8 arrays of any size and either polarity."""
        if not len(images):
            return []
        from kmnist_core.review_reasons import review_reasons

        prepared = [self.prepare(im) for im in images]
        pixels = np.stack([p.pixels for p in prepared])
        a = self.assess(pixels)
        blank = np.array([p.blank for p in prepared])
        conf = a.probabilities.max(axis=1)
        reasons = review_reasons(np.zeros(len(pixels), bool), blank, a.unknown, conf, self.review_below)
        precisions = np.where(a.fp32_rows, "fp32", self.precision)
        return [Prediction(None, None, None, None, None, None, r, str(run)) if is_blank else
                Prediction(int(p.argmax()), self.classes.chars[p.argmax()], self.classes.codepoints[p.argmax()],
                           float(p.max()), p, float(s), r, str(run))
                for p, s, r, is_blank, run in zip(a.probabilities, a.ood_score, reasons, blank, precisions)]


def pick_device(device: str) -> str:
    if device == "cpu":
        return device
    torch = require_torch(f"--device {device}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KmnistError("--device cuda was asked for but no CUDA GPU is visible")
    return device


def read_twin(model_dir: Path, card: ModelCard) -> Int8Twin | None:
    """The directory's int8 files when its card names them; refused when they are not the ones it names."""
    if card.int8 is None or not (model_dir / INT8_FILE).exists():
        return None
    probe = model_dir / PROBE_FILE
    twin = Int8Twin((model_dir / INT8_FILE).read_bytes(), probe.read_bytes() if probe.exists() else b"")
    check_twin(twin, card.int8, str(model_dir))
    return twin


def read_fp32_twin(model_dir: Path, card: ModelCard) -> bytes | None:
    """The directory's fp32 twin when its card names it; refused when it is not the one it names."""
    if card.fp32_onnx is None or not (model_dir / FP32_FILE).exists():
        return None
    data = (model_dir / FP32_FILE).read_bytes()
    if sha256(data) != card.fp32_onnx.sha256:
        raise KmnistError(f"fp32 ONNX model of {model_dir} is not the one its card names: {FP32_FILE} hashes to "
                          f"{sha256(data)[:16]}, the card says {card.fp32_onnx.sha256[:16]}")
    return data


def load_bundle(name_or_path: str | Path = "default", precision: str = "auto", device: str = "cpu") -> ModelBundle:
    """Read and check a model directory and decide its precision. Never writes into the directory."""
    model_dir = resolve_model_path(name_or_path)
    card, weights = read_model_files(model_dir)
    check_weights_id(card, weights, str(model_dir))
    device = pick_device(device) if device == "auto" else device  # an explicit device is the workers': not checked here
    twin, fp32_onnx = read_twin(model_dir, card), read_fp32_twin(model_dir, card)
    chosen = resolve_precision(precision, device, card, twin, str(model_dir), fp32_onnx is not None)
    return ModelBundle(card, weights, twin if chosen.used == "int8" else None, chosen, device, str(model_dir),
                       fp32_onnx if chosen.fp32_runtime == "onnxruntime" else None)


def build_predictor(bundle: ModelBundle, threads: int | None = None, device: str | None = None,
                    policy: DecisionPolicy | None = None, review_below: float | None = None,
                    ood_threshold: float | None = None) -> Predictor:
    """The bundle's Predictor, in the process that will run it. An int8 twin is first run on its probe on
    this process's CPU (kmnist_core/policy.py after_probe: where it fails, auto runs fp32, saying why).
    Its policy is decided here from the card, that precision and `review_below` / `ood_threshold` (None:
    the card's); or `policy` is the driver's, which a worker follows or refuses (PolicyDisagrees) when
    its own probe decides otherwise. `threads`: intra-op threads of ONNX Runtime and torch (default:
    kmnist_core/ort_model.py default_threads). `device` overrides the bundle's (a driver checks a GPU job's
    model on its own CPU)."""
    device = pick_device(device or bundle.device)
    if bundle.fp32_onnx is not None and device == "cpu":
        fp32 = OrtModel(bundle.fp32_onnx, threads)
    else:
        from kmnist_core.models import TorchModel

        fp32 = TorchModel(load_torch_model(bundle.card, bundle.weights, bundle.source), device, threads)
    runner = probe = None
    if bundle.twin is not None and (policy is None or policy.used == "int8"):
        runner = OrtModel(bundle.twin.onnx, threads)
        probe = check_probe(runner, bundle.twin.probe)
    own = after_probe(bundle.precision, probe)
    if policy is None:
        policy = decide_policy(bundle.card, own, review_below, ood_threshold)
    elif review_below is not None or ood_threshold is not None:
        raise ValueError("a Predictor follows the policy it is given: its thresholds are already in it")
    elif policy.used == "int8":
        follow(policy, own, f"this worker ({probe['cpu']['model']})" if probe else "this worker")
    return Predictor(fp32, bundle.card, policy, runner if policy.used == "int8" else None, probe)


def load_torch_model(card: ModelCard, weights: bytes, source: str):
    """The card's architecture with `weights` (torch, the `[train]` extra: a clear error without it)."""
    torch = require_torch(f"running {source}, which has no usable fp32 ONNX twin ({FP32_FILE}; "
                          f"`kmnist-batch model int8 {source}` builds one),")
    from kmnist_core.models import create_model

    model = create_model(card.architecture, card.num_classes, card.input_size)
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise KmnistError(f"cannot load weights of {source}: {str(e).splitlines()[0]}") from None
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise KmnistError(f"weights of {source} do not match architecture {card.architecture!r} "
                          f"({card.num_classes} classes) named in its card: {str(e).splitlines()[0]}") from None
    check_weights_id(card, weights, source)
    return model


def check_weights_id(card: ModelCard, weights: bytes, source: str) -> None:
    actual = weights_id(weights)
    if card.raw.get("model_id", actual) != actual:
        raise KmnistError(f"weights of {source} are not the ones its card names: {WEIGHTS_FILE} hashes to {actual}, "
                          f"{CARD_FILE} says model_id {card.model_id} (was {WEIGHTS_FILE} replaced?); "
                          f"keep each {WEIGHTS_FILE} with the card train wrote beside it")


def read_model_files(name_or_path: str | Path = "default") -> tuple[ModelCard, bytes]:
    """The validated card and the raw weights of a model directory."""
    model_dir = resolve_model_path(name_or_path)
    card = read_card(model_dir)
    weights = model_dir / WEIGHTS_FILE
    if not weights.exists():
        raise KmnistError(f"{model_dir} is not a complete model directory: {WEIGHTS_FILE} is missing")
    return card, weights.read_bytes()


def load_model(name_or_path: str | Path = "default", device: str = "cpu", precision: str = "auto",
               threads: int | None = None) -> Predictor:
    """Load a model directory (or "default") without unpickling code; checks it matches its card.

    precision auto: int8 (ONNX Runtime) on CPU when the model has a twin that passed its int8 check and
    passes its probe here, else fp32 (`Predictor.precision_note` says why)."""
    return build_predictor(load_bundle(name_or_path, precision, device), threads)
