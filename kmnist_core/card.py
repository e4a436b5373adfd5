"""The model card, read and validated in one place (as timm's PretrainedCfg is one typed structure).

`ModelCard.from_json` checks a card's JSON once and gives typed fields for everything the code reads: the
architecture, classes, input size, the calibration for each runtime, the int8 twin's section (`Int8Section`),
the fp32 twin's (`Fp32OnnxSection`) and the test-time views' (`ViewsSection`), each written only through
its `to_json`. `raw` keeps the JSON exactly as written: it is what travels into run
records and every shard's footer. Cards are written by `train` (kmnist_core/experiment.py) and
`kmnist-batch model int8`. No torch here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from kmnist_core.classmap import ClassMap
from kmnist_core.errors import KmnistError

CARD_FILE = "model_card.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Calibration:
    """What turns a runtime's logits into predict's decisions."""

    temperature: float = 1.0
    review_below: float = 0.0  # low_confidence below this calibrated confidence
    ood_score: str = "energy"  # kmnist_core.calibration.OOD_SCORES
    ood_threshold: float | None = None  # unknown_character above it; None: the card has none
    review_promise: dict | None = None  # what auto-accepted rows are promised at these thresholds (calibration.fit_review)

    @classmethod
    def from_json(cls, section: dict) -> "Calibration":
        threshold = section.get("ood_threshold")
        return cls(float(section.get("temperature", 1.0)), float(section.get("review_below", 0.0)),
                   section.get("ood_score", "energy"), None if threshold is None else float(threshold),
                   section.get("review_promise"))

    def review_params(self) -> dict:
        """What review_metrics (kmnist_core/evaluate.py) needs."""
        return {"ood_score": self.ood_score, "review_below": self.review_below,
                "ood_threshold": float("inf") if self.ood_threshold is None else self.ood_threshold}


def calibration_key(calib: dict) -> dict:
    """The fp32 calibration an int8 refit started from: if the card's changes later, the refit is stale."""
    return {k: calib.get(k) for k in ("temperature", "review_below", "ood_score", "ood_threshold")}


class Section:
    """A card section whose JSON keys are its fields, in their order: read by from_json, written by to_json."""

    @classmethod
    def from_json(cls, section: dict):
        return cls(**section)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Int8Probe:
    """The int8 twin's probe file: crops with the logits measured where the gate ran (kmnist_core/int8.py)."""

    file: str
    sha256: str
    images: int
    split: str
    tolerance: float  # max |int8 logit on this CPU - int8 logit at build|


@dataclass(frozen=True)
class Int8Section(Section):
    """A card's `int8` section: the int8 twin's file, how it was built and checked, its calibration and its
    verdict (kmnist_core/int8.py build_int8). JSON keys are the field names, in this order."""

    file: str
    sha256: str
    method: str
    runtime: str
    calibration_data: dict  # dataset, split, images, seed: what quantization calibrated on
    calibration: dict  # int8's temperature, ood_score, thresholds (refitted on its logits, or the card's own)
    fitted_against: dict  # calibration_key() of the fp32 calibration the refit started from
    gate: dict  # the check against fp32 on validation, and the CPU it ran on
    probe: Int8Probe
    enabled: bool  # passed the gate: precision auto may run it
    fallback: str | None  # why not, when not
    val: dict  # int8 against fp32 on validation and test (kmnist_core/int8.py compare)
    test: dict

    @classmethod
    def from_json(cls, section: dict) -> "Int8Section":
        return cls(**{**section, "probe": Int8Probe(**section["probe"])})


@dataclass(frozen=True)
class Fp32OnnxSection(Section):
    """A card's `fp32_onnx` section: the fp32 twin every CPU row runs on (kmnist_core/onnx_export.py
    build_fp32_twin), its sha256 and its check against the torch model. JSON keys are the field names."""

    file: str
    sha256: str
    runtime: str
    opset: int
    check: dict  # images, max_abs_logit_diff, max_allowed, decisions_differ: against torch where it was built
    enabled: bool  # passed the check: CPU fp32 runs it rather than torch
    fallback: str | None  # why not, when not


@dataclass(frozen=True)
class ViewsSection(Section):
    """A card's `views` section: test-time views of the crops the model is unsure of (kmnist_core/views.py).
    The card's temperature and thresholds were fitted on logits made this way, so a runtime that decides
    with this card views the same crops. JSON keys are the field names."""

    extra: list  # [[degrees, zoom], ...]: the views besides the crop as is
    gate: float  # a crop whose as-is confidence (softmax at gate_temperature) is under it is viewed
    gate_temperature: float
    fitted_on: str  # what chose the gate and fitted the calibration on its logits

    @classmethod
    def from_json(cls, section: dict) -> "ViewsSection":
        extra = [[float(d), float(z)] for d, z in section["extra"]]
        return cls(extra, float(section["gate"]), float(section["gate_temperature"]), str(section["fitted_on"]))


@dataclass(frozen=True)
class ModelCard:
    model_id: str
    architecture: str
    num_classes: int
    input_size: int
    classes: ClassMap
    calibration: Calibration  # the fp32 model's
    # int8's: its temperature and thresholds refitted on its own logits at the build, while the card's fp32
    # calibration is still the one that refit started from (a hand-tuned card is then honoured as is); else None
    int8_calibration: Calibration | None
    int8: Int8Section | None  # the int8 twin's section: files' sha256, gate, probe, figures (kmnist_core/int8.py)
    fp32_onnx: Fp32OnnxSection | None  # the fp32 twin's section (kmnist_core/onnx_export.py)
    views: ViewsSection | None  # test-time views of unsure crops; None: every crop is read once
    training_dataset: str | None
    training_data_dir: str | None
    raw: dict

    @classmethod
    def from_json(cls, raw: dict, source: str = "model card") -> "ModelCard":
        missing = [k for k in ("architecture", "classes", "input", "format_version") if k not in raw]
        if missing:
            raise KmnistError(f"{source} lacks {', '.join(missing)}: not a kmnist-batch model card")
        if raw["format_version"] > FORMAT_VERSION:
            raise KmnistError(f"{source} has format {raw['format_version']}; this kmnist-batch reads up to {FORMAT_VERSION}")
        try:
            training = raw.get("training") or {}
            calib = raw.get("calibration") or {}
            int8 = Int8Section.from_json(raw["int8"]) if raw.get("int8") is not None else None
            refit_current = int8 is not None and int8.fitted_against == calibration_key(calib)
            return cls(model_id=raw.get("model_id", "unknown"), architecture=raw["architecture"]["name"],
                       num_classes=int(raw["architecture"]["num_classes"]), input_size=int(raw["input"]["size"]),
                       classes=ClassMap.from_records(raw["classes"]),
                       calibration=Calibration.from_json(calib),
                       int8_calibration=Calibration.from_json({**calib, **int8.calibration}) if refit_current else None,
                       int8=int8,
                       fp32_onnx=Fp32OnnxSection.from_json(raw["fp32_onnx"]) if raw.get("fp32_onnx") is not None else None,
                       views=ViewsSection.from_json(raw["views"]) if raw.get("views") is not None else None,
                       training_dataset=training.get("dataset"),
                       training_data_dir=(training.get("config") or {}).get("data_dir"), raw=raw)
        except (KeyError, TypeError, ValueError) as e:
            raise KmnistError(f"{source} is not a valid kmnist-batch model card: {type(e).__name__}: {e}") from None

    def with_sections(self, **sections: "Int8Section | Fp32OnnxSection") -> "ModelCard":
        """The card with its `int8` and/or `fp32_onnx` section replaced."""
        return ModelCard.from_json({**self.raw, **{name: s.to_json() for name, s in sections.items()}})


def read_card(model_dir: Path) -> ModelCard:
    card_path = model_dir / CARD_FILE
    if not model_dir.is_dir():
        raise KmnistError(f"model directory {model_dir} does not exist")
    if not card_path.exists():
        raise KmnistError(f"{model_dir} is not a model directory: {CARD_FILE} is missing")
    try:
        raw = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KmnistError(f"{card_path} is not valid JSON: {e}") from None
    return ModelCard.from_json(raw, str(card_path))
