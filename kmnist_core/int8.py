"""The int8 CPU path: a model exported to ONNX and statically quantized, run by ONNX Runtime.

Why ONNX Runtime: on these 2 cores its int8 kernels (QDQ, per-channel int8 weights, uint8 activations)
run the default model several times faster than the project's torch path (bench/int8_figures.py,
docs/benchmarks.md), while PyTorch's own int8 path (torch.ao eager/FX quantization) is deprecated in
favour of torch.export-based flows whose x86 CPU kernels come from a separate project. An ONNX file is a
protobuf: loading it runs no pickled code.

Why 7-bit int8 weights (U8S8 with reduce_range): on x86-64 CPUs without AVX-512 VNNI / AVX-VNNI, ORT's
U8S8 kernels multiply with VPMADDUBSW, whose int16 sums of two uint8 x int8 products saturate at full
range (255 * 127 * 2 > 32,767), so the same model gave other outputs there (an AVX2-only AMD EPYC: 99.65 %
top-1 agreement with fp32 against 99.90 % on a VNNI CPU). With weights in [-64, 64] no pair can saturate
(255 * 64 * 2 = 32,640), so AVX2, AVX-512 and VNNI kernels all compute the exact int32 sums. ORT's
quantization guide names reduce_range and U8U8 as the remedies; U8U8 also saturates nowhere but ran the
default model at half the speed on a VNNI CPU (5.1k against 10.9k images/s on one thread), which VNNI
does not accelerate. `weight_range` reads the bound back from a twin; tests hold every shipped twin to it.

The twin is the fp32 twin (kmnist_core/onnx_export.py: batch norm folded, first conv unfolded) quantized,
its first conv and max pool then computed on 2x2 blocks of pixels (kmnist_core/pooled_conv.py: the same
logits, faster); kmnist_core/ort_model.py runs both twins.

How a model gets its int8 twin (`build_int8`, run by `train` and by `kmnist-batch model int8`; loading a
model never builds one): the fp32 twin is
calibrated on CALIBRATION_IMAGES images of its TRAINING split (a seeded draw), quantized, and then
measured against fp32 on validation: temperature and both review thresholds are refitted on the int8
validation logits, and the int8 path is enabled only if its top-1 agreement with fp32 on validation is
at least MIN_AGREEMENT and its validation accuracy at most MAX_ACCURACY_DROP below fp32's. The test split
is scored for the card and `evaluate` (agreement, accuracy, ECE, review figures) but decides nothing.
Every step is deterministic, so the same weights and data give the same bytes (the card holds their
sha256).

Rows near a decision are decided by fp32 (`near_decision`): a Predictor running int8 recomputes with the
fp32 model every row whose int8 top-1 and top-2 probabilities are within RECHECK_TOP2_MARGIN of each other
(the top-1 could move), whose calibrated confidence lies within RECHECK_BELOW under or RECHECK_ABOVE over
review_below (the review flag could move), or whose out-of-set score lies within RECHECK_OOD of
ood_threshold; the row then says `precision` fp32. The margins come from bench/oof_int8.py (five fold
models, 8,000 crops none of them saw) and are about 1.2-2x what the twin alone needed there: its moved
top-1 decisions had a top-2 gap of at most 0.28, its moved review decisions a confidence 0.115 under to
0.03 over review_below, its moved out-of-set decisions a max-softmax within 0.125 of the threshold. With
these margins 7 % of those rows went to fp32 and no decision differed from fp32's; the clear rows stay
fast.

The probe: PROBE_IMAGES validation crops with the fp32 and int8 logits measured where the gate ran, shipped
beside the twin (PROBE_FILE, plain arrays). Before a process runs int8 it runs the twin on the probe on its
own CPU (`check_probe`, milliseconds): the same top-1 as the fp32 logits on every crop where they agreed at
build time, and int8 logits within PROBE_TOLERANCE of the build machine's. A CPU whose kernels compute
something else fails it, and precision auto runs fp32 there, saying so.
"""

from __future__ import annotations

import io
import math
import os
import logging
import platform
import tempfile
from typing import Callable

import numpy as np

from kmnist_core import calibration
from kmnist_core.card import Calibration, Int8Probe, Int8Section, calibration_key
from kmnist_core.onnx_export import fp32_twin_bytes, input_unfold, sha256
from kmnist_core.ort_model import OrtModel, model_input
from kmnist_core.pooled_conv import pool_first_conv
from kmnist_core.precision import Int8Twin

INT8_FILE = "model.int8.onnx"
PROBE_FILE = "model.int8.probe.npz"
PROBE_IMAGES = 256
PROBE_TOLERANCE = 0.02  # max |int8 logit here - int8 logit at build|; saturation moves logits by far more
CALIBRATION_IMAGES = 2048
CALIBRATION_SEED = 0
MIN_AGREEMENT = 0.999  # top-1 agreement with fp32 on validation, or the model stays on fp32
MAX_ACCURACY_DROP = 0.001  # 0.1 point
METHOD = ("ONNX Runtime static quantization: QDQ, per-channel int8 weights in 7 bits (reduce_range) and uint8 "
          "activations (U8S8), MinMax calibration")
MAX_WEIGHT = 64  # |int8 weight| <= 64: 255 * 64 * 2 fits VPMADDUBSW's int16 sums, so no CPU saturates
# The bands near a decision that fp32 decides (see the module docstring), in calibrated probabilities.
RECHECK_TOP2_MARGIN = 0.4
RECHECK_BELOW, RECHECK_ABOVE = 0.15, 0.06  # around review_below
RECHECK_OOD = {"max-softmax": 0.15, "energy": 2.5, "max-logit": 2.5}  # around ood_threshold, on its scale
# Around a card's test-time views gate (kmnist_core/views.py), in log-odds of the as-is confidence: a crop
# int8 puts on the other side of the gate than fp32 is read with or without views, which can move its
# review flag. Out of fold on hands-oe (bench/oof_int8.py): 144 of 14,000 crops crossed and 4 flags moved,
# the farthest 0.69 from the gate; this band holds 3.4 % of the rows, 92 % of the crossings and all 4.
# (Measured with the four views; with the card's +-7 degrees 144 cross again and, with this band, no
# decision differs from fp32's: bench/oof_int8.py.)
RECHECK_GATE_LOG_ODDS = 0.75
# (logit-scale scores move at most as much as a logit; the largest |int8 - fp32 logit| out of fold was 2.38)
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8")


def calibration_sample(train_images: np.ndarray, n: int = CALIBRATION_IMAGES) -> np.ndarray:
    """A seeded draw of training images: what quantization calibrates on (never val or test)."""
    order = np.random.default_rng(CALIBRATION_SEED).permutation(len(train_images))[:n]
    return train_images[np.sort(order)]


def quantize(fp32_onnx: bytes, calibration_images: np.ndarray, batch_size: int = 256, pooled: bool = True) -> bytes:
    """Static int8 quantization of an fp32 ONNX model, calibrated on uint8 model inputs; an unfolded first
    conv and its max pool then run on 2x2 blocks (kmnist_core/pooled_conv.py), unless `pooled` is False."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    k = input_unfold(fp32_onnx)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(model_input(calibration_images[s : s + batch_size], k)
                                for s in range(0, len(calibration_images), batch_size))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"x": batch}

    # quantize_static reads and writes paths; a private temp dir, never the model directory.
    root = logging.getLogger()
    root.addFilter(no_preprocessing_tip)
    try:
        with tempfile.TemporaryDirectory(prefix="kmnist-int8-") as tmp:
            src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
            with open(src, "wb") as f:
                f.write(fp32_onnx)
            quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True,
                            calibrate_method=CalibrationMethod.MinMax)
            with open(dst, "rb") as f:
                twin = f.read()
            return pool_first_conv(twin) if pooled else twin
    finally:
        root.removeFilter(no_preprocessing_tip)


def quantize_model(fp32_model, input_size: int, calibration_images: np.ndarray) -> bytes:
    """A torch model's int8 twin: its fp32 twin, quantized (build_int8's recipe)."""
    return quantize(fp32_twin_bytes(fp32_model, input_size), calibration_images)


def weight_range(onnx_int8: bytes) -> tuple[int, int]:
    """The smallest and largest quantized conv/linear weight in a twin (its int8 initializers)."""
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in onnx.load_from_string(onnx_int8).graph.initializer
               if t.name.endswith("weight_quantized")]
    return min(int(w.min()) for w in weights), max(int(w.max()) for w in weights)


def no_preprocessing_tip(record: logging.LogRecord) -> bool:
    """The quantizer logs a tip (shape pre-processing, which a plain conv net does not need) on the root
    logger at every call; drop just that."""
    return "pre-processing" not in record.getMessage()


def cpu_features() -> dict:
    """The CPU the int8 kernels ran on: ORT picks them by these flags."""
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags" and not flags:
                    flags = set(value.split())
                elif key.strip() == "model name":
                    model = value.strip()
    except OSError:
        pass
    return {"machine": platform.machine(), "model": model, "flags": [f for f in CPU_FLAGS if f in flags]}


def near_decision(logits: np.ndarray, temperature: float, review_below: float, ood_method: str,
                  ood_threshold: float | None) -> np.ndarray:
    """Rows whose int8 logits lie too near a decision for int8 to make it: the top-1 (a small top-2 gap),
    the review flag (confidence near review_below) or the out-of-set flag (score near ood_threshold)."""
    probs = np.sort(calibration.softmax(logits, temperature), axis=1)
    confidence = probs[:, -1]
    near = (confidence - probs[:, -2] < RECHECK_TOP2_MARGIN) | (
        (confidence > review_below - RECHECK_BELOW) & (confidence < review_below + RECHECK_ABOVE))
    if ood_threshold is not None:
        near |= np.abs(calibration.ood_score(logits, ood_method) - ood_threshold) < RECHECK_OOD[ood_method]
    return near


def near_gate(confidence: np.ndarray, gate: float) -> np.ndarray:
    """Crops whose int8 as-is confidence lies too near the views gate for int8 to decide whether they
    are viewed (RECHECK_GATE_LOG_ODDS): a Predictor reads them both ways (predictor.py decided_logits)."""
    with np.errstate(divide="ignore"):  # a confidence of exactly 1.0 is infinitely far
        log_odds = np.log(confidence.astype(np.float64)) - np.log1p(-confidence.astype(np.float64))
    return np.abs(log_odds - math.log(gate / (1 - gate))) < RECHECK_GATE_LOG_ODDS


def make_probe(pixels: np.ndarray, fp32_logits: np.ndarray, int8_logits: np.ndarray) -> bytes:
    """The probe file: crops and both logits as plain arrays (np.load with allow_pickle=False reads it)."""
    buffer = io.BytesIO()
    np.savez(buffer, pixels=pixels, fp32_logits=fp32_logits.astype(np.float32), int8_logits=int8_logits.astype(np.float32))
    return buffer.getvalue()


def probe_sample(val_images: np.ndarray, n: int = PROBE_IMAGES) -> np.ndarray:
    order = np.random.default_rng(CALIBRATION_SEED).permutation(len(val_images))[:n]
    return val_images[np.sort(order)]


def check_probe(runner: "OrtModel", probe: bytes) -> dict:
    """Run the twin on the probe on this CPU: does it compute what it computed where the gate ran?"""
    with np.load(io.BytesIO(probe), allow_pickle=False) as f:
        pixels, fp32, built = f["pixels"], f["fp32_logits"], f["int8_logits"]
    here = runner.logits(pixels)
    agreed_at_build = fp32.argmax(1) == built.argmax(1)
    flips = int((here.argmax(1) != fp32.argmax(1))[agreed_at_build].sum())
    deviation = float(np.abs(here - built).max()) if len(pixels) else 0.0
    passed = flips == 0 and deviation <= PROBE_TOLERANCE
    return {"n": int(len(pixels)), "new_disagreements_with_fp32": flips, "max_abs_logit_deviation": deviation,
            "tolerance": PROBE_TOLERANCE, "passed": passed, "cpu": cpu_features()}


def compare(fp32_logits: np.ndarray, int8_logits: np.ndarray, labels: np.ndarray, temperature_fp32: float,
            temperature_int8: float, review_fp32: dict, review_int8: dict) -> dict:
    """int8 against fp32 on one labelled split: agreement, accuracy, ECE after temperature, review figures."""
    from kmnist_core.evaluate import review_metrics

    def side(logits: np.ndarray, temperature: float, review: dict) -> dict:
        probs = calibration.softmax(logits, temperature)
        return {"accuracy": float((logits.argmax(1) == labels).mean()), "temperature": temperature,
                "ece_after": calibration.expected_calibration_error(probs, labels),
                "review": review_metrics(logits, labels, temperature, review)}

    return {"n": int(len(labels)), "agreement": float((fp32_logits.argmax(1) == int8_logits.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(fp32_logits - int8_logits).max()) if len(labels) else 0.0,
            "fp32": side(fp32_logits, temperature_fp32, review_fp32),
            "int8": side(int8_logits, temperature_int8, review_int8)}


def build_int8(fp32_onnx: bytes, card: dict, train_images: np.ndarray, val: tuple[np.ndarray, np.ndarray],
               test: tuple[np.ndarray, np.ndarray], fp32_logits: Callable[[np.ndarray], np.ndarray],
               dataset: str) -> tuple[Int8Twin, Int8Section]:
    """Quantize a model's fp32 twin (kmnist_core/onnx_export.py) and measure it against the torch model's
    logits (`fp32_logits`). Returns the twin's files and the card's `int8` section (calibration refitted on int8 val logits, the gate's verdict and the CPU it ran on,
    test figures, the probe)."""
    import onnxruntime

    sample = calibration_sample(train_images)
    onnx_int8 = quantize(fp32_onnx, sample)
    runner = OrtModel(onnx_int8)
    calib = card.get("calibration", {})
    t_fp32 = float(calib.get("temperature", 1.0))
    (val_x, val_y), (test_x, test_y) = val, test
    val_fp32, val_int8 = fp32_logits(val_x), runner.logits(val_x)
    # A card whose thresholds come from out-of-fold predictions says `int8_refit: false`: its model was
    # trained on val too, so a refit there would fit on trained-on images. The twin then runs on the
    # card's own temperature and thresholds (it agrees with fp32 on >= MIN_AGREEMENT of val, or stays off).
    refit = calib.get("int8_refit", True)
    t_int8 = calibration.fit_temperature(val_int8, val_y) if refit else t_fp32
    int8_calib = {"temperature": t_int8, "ood_score": calib.get("ood_score", "energy")}
    if not refit:
        int8_calib.update({k: calib[k] for k in ("review_below", "ood_threshold") if k in calib})
    elif "review_below" in calib:  # refit both thresholds on the int8 logits, with the card's score and targets
        promise = calib.get("review_promise", {})
        int8_calib.update(calibration.fit_thresholds(
            val_int8, val_y, t_int8, int8_calib["ood_score"], float(promise.get("target_precision", calib.get("review_precision_target", 0.995))),
            float(promise.get("in_set_keep", 0.99)), float(promise.get("confidence_level", 0.95))))
        if calib.get("ood_threshold") is None:
            int8_calib["ood_threshold"] = None
    reviews = Calibration.from_json(calib).review_params(), Calibration.from_json(int8_calib).review_params()
    val_report = compare(val_fp32, val_int8, val_y, t_fp32, t_int8, *reviews)
    probe_x = probe_sample(val_x)
    probe = make_probe(probe_x, fp32_logits(probe_x), runner.logits(probe_x))
    low, high = weight_range(onnx_int8)
    reasons = gate_failures(val_report, max(-low, high))
    section = Int8Section(
        file=INT8_FILE, sha256=sha256(onnx_int8), method=METHOD, runtime=f"onnxruntime {onnxruntime.__version__}",
        calibration_data={"dataset": dataset, "split": "train", "images": int(len(sample)), "seed": CALIBRATION_SEED},
        calibration=int8_calib, fitted_against=calibration_key(calib),
        gate={"split": "val", "min_agreement": MIN_AGREEMENT, "max_accuracy_drop": MAX_ACCURACY_DROP,
              "agreement": val_report["agreement"], "accuracy_fp32": val_report["fp32"]["accuracy"],
              "accuracy_int8": val_report["int8"]["accuracy"], "weight_range": [low, high], "cpu": cpu_features()},
        probe=Int8Probe(PROBE_FILE, sha256(probe), int(len(probe_x)), "val", PROBE_TOLERANCE),
        enabled=not reasons, fallback="; ".join(reasons) + ": precision auto runs fp32" if reasons else None,
        val=val_report, test=compare(fp32_logits(test_x), runner.logits(test_x), test_y, t_fp32, t_int8, *reviews))
    return Int8Twin(onnx_int8, probe), section


def gate_failures(val_report: dict, max_weight: int) -> list[str]:
    """Why a twin may not run under precision auto (none: it passed its gate)."""
    reasons = []
    drop = val_report["fp32"]["accuracy"] - val_report["int8"]["accuracy"]
    if max_weight > MAX_WEIGHT:
        reasons.append(f"int8 weights reach {max_weight} (> {MAX_WEIGHT}): AVX2 kernels could saturate")
    if val_report["agreement"] < MIN_AGREEMENT:
        reasons.append(f"validation top-1 agreement {val_report['agreement']:.4f} < {MIN_AGREEMENT}")
    if drop > MAX_ACCURACY_DROP + 1e-12:
        reasons.append(f"validation accuracy drops {drop * 100:.2f} points (> {MAX_ACCURACY_DROP * 100:.1f})")
    return reasons
