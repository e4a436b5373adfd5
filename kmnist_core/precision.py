"""What a model runs at, decided in one place: the precision choice and the bundle that carries it.

Plain data and one pure function, no torch: the CLI, the options and every worker share these. The int8
twin's files are built by kmnist_core/int8.py and read by kmnist_core/model_dir.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from kmnist_core.card import ModelCard
from kmnist_core.errors import KmnistError

PRECISIONS = ("auto", "fp32", "int8")


@dataclass(frozen=True)
class Int8Twin:
    """The bytes of a model's int8 files: the ONNX model and its probe."""

    onnx: bytes
    probe: bytes


@dataclass(frozen=True)
class Precision:
    """What a model runs at: decided once per load (resolve_precision), carried by its bundle."""

    requested: str  # auto, fp32 or int8
    used: str  # fp32 or int8
    note: str | None = None  # why the model runs fp32 although int8 was possible in principle


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


def twin_command(source: str) -> str:
    return f"kmnist-batch model int8 {source}"


def resolve_precision(requested: str, device: str, card: ModelCard, twin: Int8Twin | None, source: str) -> Precision:
    """auto: int8 (ONNX Runtime) on CPU when the directory has the twin its card names and the twin passed
    its gate where it was built, else fp32 with a note saying why; int8: the twin, or an error."""
    if requested not in PRECISIONS:
        raise KmnistError(f"unknown precision {requested!r}; choose from: {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return Precision("fp32", "fp32")
    if requested == "int8":
        if device != "cpu":
            raise KmnistError(f"--precision int8 runs on CPU only (device {device})")
        if twin is None:
            raise KmnistError(f"{source} has no int8 twin (model.int8.onnx); build it with `{twin_command(source)}`")
        return Precision("int8", "int8")
    if device != "cpu":
        return Precision("auto", "fp32", f"int8 is a CPU path; device {device} runs fp32")
    if twin is None or card.int8 is None:
        return Precision("auto", "fp32", f"no int8 twin in {source}; `{twin_command(source)}` builds one")
    if not card.int8.enabled:
        return Precision("auto", "fp32", card.int8.fallback or "the int8 twin failed its gate")
    return Precision("auto", "int8")


