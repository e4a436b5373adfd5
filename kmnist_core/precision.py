"""What a model runs at, decided in one place: the precision choice and the bundle that carries it.

Plain data and one pure function, no torch: the CLI, the options and every worker share these. The int8
twin's files are built by kmnist_core/int8.py and read by kmnist_core/model_dir.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from kmnist_core.card import Fp32OnnxSection, Int8Section, ModelCard
from kmnist_core.errors import KmnistError

PRECISIONS = ("auto", "fp32", "int8")


@dataclass(frozen=True)
class Int8Twin:
    """The bytes of a model's int8 files: the ONNX model and its probe."""

    onnx: bytes
    probe: bytes


@dataclass(frozen=True)
class Twins:
    """A torch model's two ONNX twins and their card sections, as built by `train`, `kmnist-batch model
    int8` and the recipe (kmnist_core/experiment.py build_twins)."""

    fp32_onnx: bytes
    fp32_section: Fp32OnnxSection
    int8: Int8Twin
    int8_section: Int8Section

    def card_sections(self) -> dict:
        """The card's `fp32_onnx` and `int8` sections as JSON."""
        return {"fp32_onnx": self.fp32_section.to_json(), "int8": self.int8_section.to_json()}


@dataclass(frozen=True)
class Precision:
    """What a model runs at: decided once per load (resolve_precision), carried by its bundle."""

    requested: str  # auto, fp32 or int8
    used: str  # fp32 or int8
    note: str | None = None  # why the model runs fp32 although int8 was possible in principle
    fp32_runtime: str = "onnxruntime"  # what computes fp32 rows (all at fp32, those near a decision at int8):
    # onnxruntime (the fp32 twin, on CPU) or torch (a GPU, or a model directory without a usable fp32 twin)


@dataclass(frozen=True)
class ModelBundle:
    """A checked model ready for any process: the card, the weights, the int8 twin when it is to run, the
    precision decided for it and the device. Sent by value to workers (plain bytes and dicts)."""

    card: ModelCard
    weights: bytes
    twin: Int8Twin | None  # set exactly when precision.used is "int8"
    precision: Precision
    device: str
    source: str  # where it came from, for messages
    fp32_onnx: bytes | None = None  # the fp32 twin, set exactly when precision.fp32_runtime is "onnxruntime"


@dataclass(frozen=True)
class ModelRequest:
    """What a run asks of its model: which one, at what precision, on which device its workers run it, and
    the user's thresholds (None: the card's). kmnist_core/model_dir.py load_for_run takes it."""

    model: str = "default"  # a model directory, or "default"
    precision: str = "auto"  # PRECISIONS
    device: str = "cpu"  # the workers' device: cpu or cuda
    review_below: float | None = None
    ood_threshold: float | None = None


def twin_command(source: str) -> str:
    return f"kmnist-batch model int8 {source}"


def resolve_precision(requested: str, device: str, card: ModelCard, twin: Int8Twin | None, source: str,
                      fp32_twin: bool = False) -> Precision:
    """auto: int8 (ONNX Runtime) on CPU when the directory has the twin its card names and the twin passed
    its gate where it was built, else fp32 with a note saying why; int8: the twin, or an error. fp32 rows
    run on the fp32 twin (`fp32_twin`: the directory has the one its card names) on CPU when it passed its
    check, else on torch."""
    used, note = choose(requested, device, card, twin, source)
    on_ort = device == "cpu" and fp32_twin and card.fp32_onnx is not None and card.fp32_onnx.enabled
    return Precision(requested, used, note, "onnxruntime" if on_ort else "torch")


def choose(requested: str, device: str, card: ModelCard, twin: Int8Twin | None, source: str) -> tuple[str, str | None]:
    """The precision that runs, and why it is fp32 where int8 was possible in principle."""
    if requested not in PRECISIONS:
        raise KmnistError(f"unknown precision {requested!r}; choose from: {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return "fp32", None
    if requested == "int8":
        if device != "cpu":
            raise KmnistError(f"--precision int8 runs on CPU only (device {device})")
        if twin is None:
            raise KmnistError(f"{source} has no int8 twin (model.int8.onnx); build it with `{twin_command(source)}`")
        return "int8", None
    if device != "cpu":
        return "fp32", f"int8 is a CPU path; device {device} runs fp32"
    if twin is None or card.int8 is None:
        return "fp32", f"no int8 twin in {source}; `{twin_command(source)}` builds one"
    if not card.int8.enabled:
        return "fp32", card.int8.fallback or "the int8 twin failed its gate"
    return "int8", None
