"""The model directory: the format every command reads and writes.

    model.pt         state_dict only, loaded with torch.load(weights_only=True): no code is unpickled
    model_card.json  architecture, classes, normalization, input, calibration, training data and
                     split, metrics, code version; `int8` and `fp32_onnx`: the twins' sha256 and checks
    model.fp32.onnx  the fp32 twin every CPU row runs on (kmnist_core/onnx_export.py), ONNX protobuf
    model.int8.onnx  the int8 CPU model (kmnist_core/int8.py), ONNX protobuf, and
    model.int8.probe.npz  its probe (plain arrays): all three written by `train` or `kmnist-batch model
                     int8`; loading reads them and never writes into the directory

`load_bundle` reads a directory (a path, or "default" = the model embedded in the package), refuses any
file that is not the one its card names, and decides its precision once; `build_predictor` turns a bundle
into a Predictor (kmnist_core/predictor.py) in whichever process runs it; `load_model` does both, and
`load_for_run` does both for a run's driver from its `ModelRequest`. On CPU nothing here imports torch:
both twins run on ONNX Runtime. torch (the `[train]` extra) runs fp32 on a GPU, or on CPU for a directory
without a usable fp32 twin (kmnist_core/models.py load_torch_model).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from kmnist_core.errors import KmnistError, require_torch
from kmnist_core.files import json_text, temp_name
from kmnist_core.card import CARD_FILE, FORMAT_VERSION, ModelCard, read_card
from kmnist_core.int8 import INT8_FILE, PROBE_FILE, check_probe
from kmnist_core.onnx_export import FP32_FILE, sha256
from kmnist_core.ort_model import OrtModel
from kmnist_core.policy import DecisionPolicy, after_probe, decide_policy, follow
from kmnist_core.precision import Int8Twin, ModelBundle, ModelRequest, Twins, resolve_precision
from kmnist_core.predictor import Predictor

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


def pick_device(device: str) -> str:
    if device == "cpu":
        return device
    torch = require_torch(f"--device {device}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KmnistError("--device cuda was asked for but no CUDA GPU is visible")
    return device


def read_model_files(name_or_path: str | Path = "default") -> tuple[ModelCard, bytes]:
    """The validated card and the weights it names (refused when they are not the ones it names)."""
    model_dir = resolve_model_path(name_or_path)
    card = read_card(model_dir)
    weights = model_dir / WEIGHTS_FILE
    if not weights.exists():
        raise KmnistError(f"{model_dir} is not a complete model directory: {WEIGHTS_FILE} is missing")
    data = weights.read_bytes()
    actual = weights_id(data)
    if card.raw.get("model_id", actual) != actual:
        raise KmnistError(f"weights of {model_dir} are not the ones its card names: {WEIGHTS_FILE} hashes to {actual}, "
                          f"{CARD_FILE} says model_id {card.model_id} (was {WEIGHTS_FILE} replaced?); "
                          f"keep each {WEIGHTS_FILE} with the card train wrote beside it")
    return card, data


def read_model_dir(model_dir: Path) -> tuple[ModelCard, bytes, bytes | None, Int8Twin | None]:
    """The card and every file it names: the weights, the fp32 twin and the int8 twin (each twin None where
    the card names none or its file is absent), each refused when it is not the one the card names."""
    card, weights = read_model_files(model_dir)
    fp32_file, int8_file, probe_file = (model_dir / name for name in (FP32_FILE, INT8_FILE, PROBE_FILE))
    twin = fp32_onnx = None
    named = []  # (what, file, its bytes, the sha256 the card gives)
    if card.int8 is not None and int8_file.exists():
        twin = Int8Twin(int8_file.read_bytes(), probe_file.read_bytes() if probe_file.exists() else b"")
        named += [("int8 model", INT8_FILE, twin.onnx, card.int8.sha256),
                  ("int8 model", PROBE_FILE, twin.probe, card.int8.probe.sha256)]
    if card.fp32_onnx is not None and fp32_file.exists():
        fp32_onnx = fp32_file.read_bytes()
        named.append(("fp32 ONNX model", FP32_FILE, fp32_onnx, card.fp32_onnx.sha256))
    for what, name, data, expected in named:
        actual = sha256(data)
        if actual != expected:
            raise KmnistError(f"{what} of {model_dir} is not the one its card names: {name} hashes to "
                              f"{actual[:16]}, the card says {str(expected)[:16]}")
    return card, weights, fp32_onnx, twin


def load_bundle(name_or_path: str | Path = "default", precision: str = "auto", device: str = "cpu") -> ModelBundle:
    """Read and check a model directory and decide its precision. Never writes into the directory."""
    model_dir = resolve_model_path(name_or_path)
    device = pick_device(device) if device == "auto" else device  # an explicit device is the workers': not checked here
    card, weights, fp32_onnx, twin = read_model_dir(model_dir)
    chosen = resolve_precision(precision, device, card, twin, str(model_dir), fp32_onnx is not None)
    return ModelBundle(card, weights, twin if chosen.used == "int8" else None, chosen, device, str(model_dir),
                       fp32_onnx if chosen.fp32_runtime == "onnxruntime" else None)


def build_predictor(bundle: ModelBundle, threads: int | None = None, device: str | None = None,
                    policy: DecisionPolicy | None = None, review_below: float | None = None,
                    ood_threshold: float | None = None) -> Predictor:
    """The bundle's Predictor, in the process that will run it: its runtimes, the int8 twin's probe on this
    process's CPU (kmnist_core/policy.py after_probe: where it fails, auto runs fp32, saying why) and its
    policy. `policy` is the driver's, which a worker follows or refuses (PolicyDisagrees) when its own
    probe decides otherwise; without one, the policy is decided here from the card, that precision and
    `review_below` / `ood_threshold` (None: the card's). `threads`: intra-op threads of ONNX Runtime and
    torch (default: kmnist_core/ort_model.py default_threads). `device` overrides the bundle's (a driver
    checks a GPU job's model on its own CPU)."""
    device = pick_device(device or bundle.device)
    runs_int8 = bundle.twin is not None and (policy is None or policy.used == "int8")
    runner = OrtModel(bundle.twin.onnx, threads) if runs_int8 else None
    if bundle.fp32_onnx is not None and device == "cpu":
        fp32 = OrtModel(bundle.fp32_onnx, threads)
    else:
        require_torch(f"running {bundle.source}, which has no usable fp32 ONNX twin ({FP32_FILE}; "
                      f"`kmnist-batch model int8 {bundle.source}` builds one),")
        from kmnist_core.models import TorchModel, load_torch_model

        fp32 = TorchModel(load_torch_model(bundle.card, bundle.weights, bundle.source), device, threads)
    probe = check_probe(runner, bundle.twin.probe) if runner is not None else None
    own = after_probe(bundle.precision, probe)
    if policy is not None:  # the driver's: followed, or refused
        if review_below is not None or ood_threshold is not None:
            raise ValueError("a Predictor follows the policy it is given: its thresholds are already in it")
        if policy.used == "int8":
            follow(policy, own, f"this worker ({probe['cpu']['model']})" if probe else "this worker")
    else:
        policy = decide_policy(bundle.card, own, review_below, ood_threshold)
    return Predictor(fp32, bundle.card, policy, runner if policy.used == "int8" else None, probe)


def load_for_run(request: ModelRequest, threads: int | None = None) -> tuple[ModelBundle, Predictor]:
    """A run's model, loaded once on its driver: the bundle its workers load (read, checked, its precision
    decided for their device) and a predictor on this CPU, whose int8 probe decides the run's policy
    (`.policy`), which every worker then follows. A bad model fails here, before any output or Ray."""
    bundle = load_bundle(request.model, request.precision, request.device)
    predictor = build_predictor(bundle, threads, device="cpu", review_below=request.review_below,
                                ood_threshold=request.ood_threshold)
    return bundle, predictor


def load_model(name_or_path: str | Path = "default", device: str = "cpu", precision: str = "auto",
               threads: int | None = None) -> Predictor:
    """Load a model directory (or "default") without unpickling code; checks it matches its card.

    precision auto: int8 (ONNX Runtime) on CPU when the model has a twin that passed its int8 check and
    passes its probe here, else fp32 (`Predictor.precision_note` says why)."""
    return build_predictor(load_bundle(name_or_path, precision, device), threads)
