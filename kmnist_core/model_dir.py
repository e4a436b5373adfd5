"""The model directory: the format every command reads and writes.

    model.pt         state_dict only, loaded with torch.load(weights_only=True): no code is unpickled
    model_card.json  architecture, classes, normalization, input, calibration, training data and
                     split, metrics, code version; `int8`: the int8 twin's sha256, calibration, figures
    model.int8.onnx  the int8 CPU model (kmnist_core/int8.py), ONNX protobuf: written with the
                     directory, or built on first load and cached here when the directory is writable

`load_model` accepts a directory path or a name ("default" = the model embedded in the package).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from kmnist_core import transforms
from kmnist_core.classmap import ClassMap
from kmnist_core.errors import KmnistError
from kmnist_core.files import json_text, temp_name
from kmnist_core.int8 import INT8_FILE, OrtModel, calibration_key, check_int8_bytes, sha256
from kmnist_core.models import create_model, optimize_for_inference
from kmnist_core.preprocess import PreparedImage, prepare_array, prepare_image

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.pt"
CARD_FILE = "model_card.json"
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
PRECISIONS = ("auto", "fp32", "int8")
log = logging.getLogger(__name__)


def save_model_dir(out: Path, model: torch.nn.Module, card: dict, int8: bytes | None = None) -> dict:
    """Write weights, the int8 model (when given; its section is already in `card`) and the card; the
    card gains `model_id`, the weights' sha256 prefix."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    weights = buffer.getvalue()
    card = {**card, "format_version": FORMAT_VERSION, "model_id": weights_id(weights)}
    # All files are complete on disk before any is replaced; a crash between the renames leaves a set
    # that loading refuses (a hash no longer matches), never a silently mislabelled model.
    files = [(WEIGHTS_FILE, weights)] + ([(INT8_FILE, int8)] if int8 is not None else []) + \
        [(CARD_FILE, json_text(card).encode("utf-8"))]
    for name, data in files:
        temp_name(out / name).write_bytes(data)
    for name, _ in files:
        os.replace(temp_name(out / name), out / name)
    return card


def weights_id(weights: bytes) -> str:
    """A model's id: the sha256 prefix of its weights file."""
    return hashlib.sha256(weights).hexdigest()[:16]


def resolve_model_path(name_or_path: str | Path) -> Path:
    if str(name_or_path) == "default":
        return DEFAULT_MODEL_DIR
    return Path(name_or_path)


def read_card(model_dir: Path) -> dict:
    card_path = model_dir / CARD_FILE
    if not model_dir.is_dir():
        raise KmnistError(f"model directory {model_dir} does not exist")
    if not card_path.exists():
        raise KmnistError(f"{model_dir} is not a model directory: {CARD_FILE} is missing")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KmnistError(f"{card_path} is not valid JSON: {e}") from None
    missing = [k for k in ("architecture", "classes", "input", "format_version") if k not in card]
    if missing:
        raise KmnistError(f"{card_path} lacks {', '.join(missing)}: not a kmnist-batch model card")
    if card["format_version"] > FORMAT_VERSION:
        raise KmnistError(f"{card_path} has format {card['format_version']}; this kmnist-batch reads up to {FORMAT_VERSION}")
    return card


@dataclass(frozen=True)
class Prediction:
    index: int
    char: str
    codepoint: str
    confidence: float  # calibrated probability of `index`
    probabilities: np.ndarray  # (num_classes,), calibrated
    ood_score: float  # higher = less like any of the model's classes
    review_reason: str | None  # None = auto-accepted; see kmnist_core.review


@dataclass(frozen=True)
class Assessment:
    probabilities: np.ndarray  # (N, C) float32, calibrated
    ood_score: np.ndarray  # (N,) float32, higher = less like any of the model's classes
    unknown: np.ndarray  # (N,) bool, ood_score above the card's ood_threshold (all False without one)


class Predictor:
    """A loaded model plus everything needed to turn crops into calibrated class probabilities.

    `precision` "fp32" runs the torch model; "int8" runs `int8` (an OrtModel) and takes the temperature
    and review thresholds refitted on int8 logits (see int8_calibration)."""

    def __init__(self, model: torch.nn.Module, card: dict, device: str = "cpu", precision: str = "fp32",
                 int8: OrtModel | None = None):
        if (precision == "int8") != (int8 is not None):
            raise ValueError("an int8 Predictor needs its OrtModel, and only it")
        self.model = optimize_for_inference(model.to(device))
        self.card = card
        self.device = device
        self.precision = precision
        self.int8 = int8
        self.classes = ClassMap.from_records(card["classes"])
        self.input_size = int(card["input"]["size"])
        calibration = int8_calibration(card) if int8 is not None else card.get("calibration", {})
        self.temperature = float(calibration.get("temperature", 1.0))
        self.review_below = float(calibration.get("review_below", 0.0))
        self.ood_method = calibration.get("ood_score", "energy")
        self.ood_threshold = calibration.get("ood_threshold")  # None: the card has no out-of-set threshold
        self.model_id = card.get("model_id", "unknown")

    def logits(self, pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """uint8 (N, S, S) light-on-dark -> raw logits (N, C)."""
        if self.int8 is not None:
            out = self.int8.logits(pixels, batch_size)
            return out if len(out) else np.zeros((0, len(self.classes)), np.float32)
        return self.torch_logits(pixels, batch_size)

    @torch.inference_mode()
    def torch_logits(self, pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """The fp32 torch model's logits, whatever the precision (int8 is measured against these)."""
        out = []
        for start in range(0, len(pixels), batch_size):
            x = transforms.to_model_tensor(pixels[start : start + batch_size]).to(self.device)
            out.append(self.model(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def probabilities(self, pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Calibrated probabilities (softmax of logits / temperature)."""
        from kmnist_core.calibration import softmax

        return softmax(self.logits(pixels, batch_size), self.temperature)

    def assess(self, pixels: np.ndarray, batch_size: int = 1024) -> Assessment:
        """Calibrated probabilities, an out-of-set score and the unknown flag for model inputs."""
        from kmnist_core.calibration import ood_score, softmax

        logits = self.logits(pixels, batch_size)
        score = ood_score(logits, self.ood_method).astype(np.float32)
        unknown = score > self.ood_threshold if self.ood_threshold is not None else np.zeros(len(score), bool)
        return Assessment(softmax(logits, self.temperature).astype(np.float32), score, unknown)

    def prepare(self, image: Image.Image | np.ndarray) -> PreparedImage:
        if isinstance(image, Image.Image):
            return prepare_image(image, self.input_size)
        return prepare_array(np.asarray(image), self.input_size)

    def predict(self, images: Sequence[Image.Image | np.ndarray]) -> list[Prediction]:
        """Predict PIL images or uint8 arrays of any size and either polarity."""
        if not len(images):
            return []
        from kmnist_core.review import review_reasons

        prepared = [self.prepare(im) for im in images]
        pixels = np.stack([p.pixels for p in prepared])
        a = self.assess(pixels)
        blank = np.array([p.blank for p in prepared])
        conf = a.probabilities.max(axis=1)
        reasons = review_reasons(np.zeros(len(pixels), bool), blank, a.unknown, conf, self.review_below)
        return [Prediction(int(p.argmax()), self.classes.chars[p.argmax()], self.classes.codepoints[p.argmax()],
                           float(p.max()), p, float(s), r) for p, s, r in zip(a.probabilities, a.ood_score, reasons)]


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KmnistError("--device cuda was asked for but no CUDA GPU is visible")
    return device


def int8_calibration(card: dict) -> dict:
    """Temperature and review thresholds for int8 logits: those refitted on them at quantization time,
    unless the card's own calibration was changed since (a hand-tuned card is then honoured as is)."""
    calibration = card.get("calibration", {})
    section = card.get("int8", {})
    if section.get("fitted_against") == calibration_key(calibration):
        return {**calibration, **section["calibration"]}
    return calibration


def resolve_precision(precision: str, device: str, card: dict) -> str:
    """auto: int8 on CPU when the card's int8 check passed (or no check exists yet: it is made on first
    load), else fp32; fp32 on CUDA (ONNX Runtime int8 is a CPU path)."""
    if precision not in PRECISIONS:
        raise KmnistError(f"unknown precision {precision!r}; choose from: {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "int8" and device != "cpu":
            raise KmnistError(f"--precision int8 runs on CPU only (device {device})")
        return precision
    return "int8" if device == "cpu" and card.get("int8", {}).get("enabled", True) else "fp32"


def build_predictor(card: dict, weights: bytes, device: str = "cpu", source: str = "model", precision: str = "fp32",
                    int8: bytes | None = None, threads: int | None = None) -> Predictor:
    """Model from a card and its state dict's bytes; refuses weights that are not the ones the card
    names (its `model_id`), so every row and resume check that quotes the id is true.

    precision "int8" (or "auto" resolving to it) runs ONNX Runtime on `int8`, the bytes of the card's
    model.int8.onnx (checked against its sha256); without them it is rebuilt here from the weights
    (deterministic; needs the card's training dataset on disk). `threads`: ONNX Runtime intra-op
    threads (default: torch.get_num_threads() at each call)."""
    model = load_torch_model(card, weights, source)
    device = pick_device(device)
    if resolve_precision(precision, device, card) == "int8":
        if int8 is None:
            card, int8 = rebuild_int8(model, card, source, strict=precision == "int8")
        if int8 is not None:
            check_int8_bytes(int8, card.get("int8", {}), source)
            if precision == "int8" or card["int8"]["enabled"]:
                return Predictor(model, card, device, "int8", OrtModel(int8, threads))
    return Predictor(model, card, device)


def load_torch_model(card: dict, weights: bytes, source: str) -> torch.nn.Module:
    arch = card["architecture"]
    model = create_model(arch["name"], int(arch["num_classes"]), int(card["input"]["size"]))
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise KmnistError(f"cannot load weights of {source}: {str(e).splitlines()[0]}") from None
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise KmnistError(f"weights of {source} do not match architecture {arch['name']!r} "
                          f"({arch['num_classes']} classes) named in its card: {str(e).splitlines()[0]}") from None
    actual = weights_id(weights)
    if card.get("model_id", actual) != actual:
        raise KmnistError(f"weights of {source} are not the ones its card names: {WEIGHTS_FILE} hashes to {actual}, "
                          f"{CARD_FILE} says model_id {card['model_id']} (was {WEIGHTS_FILE} replaced?); "
                          f"keep each {WEIGHTS_FILE} with the card train wrote beside it")
    return model


def rebuild_int8(model: torch.nn.Module, card: dict, source: str, strict: bool) -> tuple[dict, bytes | None]:
    """Quantize `model` from its card's training data. Returns the card (with a fresh int8 section when
    the rebuilt bytes are not the ones it names) and the bytes, whatever the check said; (card, None)
    when the data is not on disk and `strict` is off (precision auto then runs fp32)."""
    from kmnist_core.datasets import load_dataset
    from kmnist_core.int8 import build_int8

    training = card.get("training", {})
    name = training.get("dataset")
    try:
        if not name:
            raise KmnistError("its card names no training dataset")
        data = load_dataset(name, training.get("config", {}).get("data_dir"), allow_download=False)
    except KmnistError as e:
        if strict:
            raise KmnistError(f"cannot build the int8 model of {source}: {e}") from None
        log.warning("no int8 model for %s (%s): running fp32", source, e)
        return card, None
    fp32 = optimize_for_inference(model)

    @torch.inference_mode()
    def fp32_logits(pixels: np.ndarray) -> np.ndarray:
        return fp32(transforms.to_model_tensor(pixels).contiguous(memory_format=torch.channels_last)).numpy()

    onnx_bytes, section = build_int8(fp32, card, data.train.images, (data.val.images, data.val.labels),
                                     (data.test.images, data.test.labels), fp32_logits, data.name)
    if card.get("int8", {}).get("sha256") != section["sha256"]:
        card = {**card, "int8": section}
    return card, onnx_bytes


def read_model_files(name_or_path: str | Path = "default") -> tuple[dict, bytes]:
    """The validated card and the raw weights of a model directory."""
    model_dir = resolve_model_path(name_or_path)
    card = read_card(model_dir)
    weights = model_dir / WEIGHTS_FILE
    if not weights.exists():
        raise KmnistError(f"{model_dir} is not a complete model directory: {WEIGHTS_FILE} is missing")
    return card, weights.read_bytes()


def read_int8_files(name_or_path: str | Path, card: dict, weights: bytes, precision: str = "auto",
                    device: str = "cpu") -> tuple[str, dict, bytes | None]:
    """For a job's driver: the precision its workers run, the card they get and the int8 model's bytes
    (None for fp32). Builds the int8 model when the directory has none that matches its card, and caches
    it there (model.int8.onnx and the card's int8 section, with the check's verdict) when the directory
    is writable."""
    model_dir = resolve_model_path(name_or_path)
    if resolve_precision(precision, pick_device(device), card) == "fp32":
        return "fp32", card, None
    path = model_dir / INT8_FILE
    data = path.read_bytes() if "int8" in card and path.exists() else None
    if data is None or sha256(data) != card["int8"]["sha256"]:
        model = load_torch_model(card, weights, str(model_dir))
        new_card, data = rebuild_int8(model, card, str(model_dir), strict=precision == "int8")
        if data is None:
            return "fp32", card, None
        cache_int8(model_dir, card, new_card, data)
        card = new_card
    if precision == "int8" or card["int8"]["enabled"]:
        return "int8", card, data
    return "fp32", card, None


def cache_int8(model_dir: Path, old_card: dict, card: dict, onnx_bytes: bytes) -> None:
    """Write a lazily built int8 model and its card section beside the weights, file before card, each
    by rename from a temp name private to this process (two processes building at once both succeed);
    a read-only directory (an installed package) keeps it in memory only."""
    writes = [(INT8_FILE, onnx_bytes)] + ([] if card is old_card else [(CARD_FILE, json_text(card).encode("utf-8"))])
    for name, data in writes:
        tmp = model_dir / f".{name}.{os.getpid()}.tmp"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, model_dir / name)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            log.info("int8 model of %s not cached (%s): built in memory", model_dir, e)
            return


def load_model(name_or_path: str | Path = "default", device: str = "cpu", precision: str = "auto",
               threads: int | None = None) -> Predictor:
    """Load a model directory (or "default") without unpickling code; checks it matches its card.

    precision auto: int8 (ONNX Runtime) on CPU when the model passed its int8 check, else fp32."""
    card, weights = read_model_files(name_or_path)
    resolved, card, int8 = read_int8_files(name_or_path, card, weights, precision, device)
    return build_predictor(card, weights, device, source=str(resolve_model_path(name_or_path)),
                           precision=precision if resolved == "int8" else "fp32", int8=int8, threads=threads)
