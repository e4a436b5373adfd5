"""The model directory: the format every command reads and writes.

    model.pt         state_dict only, loaded with torch.load(weights_only=True): no code is unpickled
    model_card.json  architecture, classes, normalization, input, calibration, training data and
                     split, metrics, code version

`load_model` accepts a directory path or a name ("default" = the model embedded in the package).
"""

from __future__ import annotations

import hashlib
import io
import json
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
from kmnist_core.models import create_model, optimize_for_inference
from kmnist_core.preprocess import PreparedImage, prepare_array, prepare_image

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.pt"
CARD_FILE = "model_card.json"
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


def save_model_dir(out: Path, model: torch.nn.Module, card: dict) -> dict:
    """Write weights and card; the card gains `model_id`, the weights' sha256 prefix."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    weights = buffer.getvalue()
    card = {**card, "format_version": FORMAT_VERSION, "model_id": weights_id(weights)}
    # Both files are complete on disk before either is replaced; a crash between the two renames leaves
    # a pair that loading refuses (the hash no longer matches), never a silently mislabelled model.
    tmp, card_tmp = temp_name(out / WEIGHTS_FILE), temp_name(out / CARD_FILE)
    tmp.write_bytes(weights)
    card_tmp.write_text(json_text(card), encoding="utf-8")
    os.replace(tmp, out / WEIGHTS_FILE)
    os.replace(card_tmp, out / CARD_FILE)
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
    """A loaded model plus everything needed to turn crops into calibrated class probabilities."""

    def __init__(self, model: torch.nn.Module, card: dict, device: str = "cpu"):
        self.model = optimize_for_inference(model.to(device))
        self.card = card
        self.device = device
        self.classes = ClassMap.from_records(card["classes"])
        self.input_size = int(card["input"]["size"])
        calibration = card.get("calibration", {})
        self.temperature = float(calibration.get("temperature", 1.0))
        self.review_below = float(calibration.get("review_below", 0.0))
        self.ood_method = calibration.get("ood_score", "energy")
        self.ood_threshold = calibration.get("ood_threshold")  # None: the card has no out-of-set threshold
        self.model_id = card.get("model_id", "unknown")

    @torch.inference_mode()
    def logits(self, pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """uint8 (N, S, S) light-on-dark -> raw logits (N, C)."""
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


def build_predictor(card: dict, weights: bytes, device: str = "cpu", source: str = "model") -> Predictor:
    """Model from a card and its state dict's bytes; refuses weights that are not the ones the card
    names (its `model_id`), so every row and resume check that quotes the id is true."""
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
    return Predictor(model, card, pick_device(device))


def read_model_files(name_or_path: str | Path = "default") -> tuple[dict, bytes]:
    """The validated card and the raw weights of a model directory."""
    model_dir = resolve_model_path(name_or_path)
    card = read_card(model_dir)
    weights = model_dir / WEIGHTS_FILE
    if not weights.exists():
        raise KmnistError(f"{model_dir} is not a complete model directory: {WEIGHTS_FILE} is missing")
    return card, weights.read_bytes()


def load_model(name_or_path: str | Path = "default", device: str = "cpu") -> Predictor:
    """Load a model directory (or "default") without unpickling code; checks it matches its card."""
    card, weights = read_model_files(name_or_path)
    return build_predictor(card, weights, device, source=str(resolve_model_path(name_or_path)))
