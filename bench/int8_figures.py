"""The int8 path and the lean decode, measured in one run on this machine (issue 15's figures):

1. model images/s at one batch size on N threads: the torch fp32 path `predict` ran until now (batch
   norm folded, channels-last), the same model on ONNX Runtime fp32, the int8 twin on ONNX Runtime alone
   and as predict runs it (rows near a decision recomputed in fp32); rounds interleaved so all see the
   same load, median reported, ratios against torch;
2. decode µs per file, full path (decode_bytes_full) against the lean path (decode_bytes one file at a
   time, decode_many in chunks), per form: tight 28x28 PNGs and bench/crop_forms.py's scan forms;
3. a plain single-process loop over 28x28 PNG files on disk (read, decode, model), before (full decode +
   torch fp32) and after (decode_many + int8), crops/s;
4. int8 against fp32 on kmnist-dev test (1,000 images, a subset of the official KMNIST test split, not the
   official protocol): top-1 agreement, accuracy, ECE after each one's temperature.

    .venv/bin/python bench/int8_figures.py [--model default] [--threads 2] [--files 10000] [--record]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import arguments, model_flags, record_flag  # noqa: E402
from bench.crop_forms import FORMS, png  # noqa: E402
from bench.record import append_row  # noqa: E402
from kmnist_core.datasets import load_dataset  # noqa: E402
from kmnist_core.int8 import compare  # noqa: E402
from kmnist_core.model_dir import load_model, read_model_files  # noqa: E402
from kmnist_core.models import TorchModel, load_torch_model  # noqa: E402
from kmnist_core.preprocess import decode_bytes, decode_bytes_full, decode_many  # noqa: E402


def rate(fn, n: int, seconds: float) -> float:
    """Calls of `fn` (each handling n items) per second, after one warm-up call: items/s."""
    fn()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        done += n
    return done / (time.perf_counter() - started)


TORCH_FP32 = "torch fp32 (predict's fp32 path before the fp32 twin)"
TIGHT = "tight 28x28 PNG (KMNIST as is)"


def model_speeds(model: str, fp32, q, x: np.ndarray, batch: int, rounds: int) -> dict[str, float]:
    """images/s of each runtime on the batch `x`."""
    card, weights = read_model_files(model)
    torch_fp32 = TorchModel(load_torch_model(card, weights, model), "cpu")
    runs = {TORCH_FP32: lambda: torch_fp32.logits(x, batch),
            "ONNX Runtime fp32 (the fp32 twin)": lambda: fp32.fp32_logits(x, batch),
            "ONNX Runtime int8, the twin alone": lambda: q.int8.logits(x, batch),
            # what predict runs: the rows near a decision recomputed in fp32 (kmnist_core/int8.py near_decision)
            "int8 as predict runs it (rows near a decision in fp32)": lambda: q.logits(x, batch)}
    got: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            got[name].append(rate(fn, batch, 1.0))
    return {k: statistics.median(v) for k, v in got.items()}


def decode_us(methods: dict, files: list[bytes], rounds: int) -> dict[str, float]:
    """µs per file of each decode method, best of `rounds` passes, passes interleaved (same load for all)."""
    best = {name: float("inf") for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            started = time.perf_counter()
            fn(files)
            best[name] = min(best[name], (time.perf_counter() - started) / len(files) * 1e6)
    return best


def chunks(files: list[bytes], size: int, n: int = 1024) -> None:
    for s in range(0, len(files), n):
        decode_many(files[s : s + n], size)


def plain_loop(paths: list[Path], fp32, q, lean: bool, batch: int = 1024) -> float:
    """crops/s: read each file, decode, batched model call. lean: decode_many + int8; else full + torch."""
    started = time.perf_counter()
    for s in range(0, len(paths), batch):
        data = [p.read_bytes() for p in paths[s : s + batch]]
        if lean:
            q.probabilities(np.stack([r.pixels for r in decode_many(data, q.input_size)]))
        else:
            fp32.probabilities(np.stack([decode_bytes_full(d, fp32.input_size).pixels for d in data]))
    return len(paths) / (time.perf_counter() - started)


def parse_args() -> argparse.Namespace:
    parser = arguments(__doc__)
    model_flags(parser)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decode-rounds", type=int, default=5)
    parser.add_argument("--form-images", type=int, default=500, help="test images cut into each scan form")
    parser.add_argument("--files", type=int, default=10000, help="28x28 PNGs on disk for the plain loop")
    parser.add_argument("--machine", default="2-core shared CI-class machine", help="named in the recorded rows")
    record_flag(parser)
    return parser.parse_args()


def measure_models(args: argparse.Namespace, fp32, q, train_images: np.ndarray) -> dict[str, float]:
    """1. images/s of each runtime on one batch of training images, printed."""
    batch = train_images[np.arange(args.batch) % len(train_images)]
    speeds = model_speeds(args.model, fp32, q, batch, args.batch, args.rounds)
    base = speeds[TORCH_FP32]
    print(f"model {fp32.card.architecture} `{fp32.model_id}`, batch {args.batch}, {args.threads} threads "
          f"(median of {args.rounds} interleaved 1 s rounds):")
    for name, v in speeds.items():
        print(f"  {name:40s} {v:9,.0f} images/s  {v / base:5.2f}x")
    near = q.assess(batch).fp32_rows.mean()
    print(f"  ({near:.1%} of the batch's rows are near a decision: kmnist-dev train images, which the default "
          f"model was trained on; out of fold 7.1 %)")
    return speeds


def measure_decode(args: argparse.Namespace, size: int, test_images: np.ndarray) -> tuple[dict, list[tuple]]:
    """2. decode µs per file of each method and scan form, printed; returns the forms' files and the rows."""
    rng = np.random.default_rng(0)
    forms = {TIGHT: [png(g) for g in test_images]}
    forms.update({name: [make(g, rng) for g in test_images[: args.form_images]] for name, make in FORMS.items()
                  if not name.startswith("tight")})
    methods = {"full": lambda fs: [decode_bytes_full(f, size) for f in fs],
               "lean one by one": lambda fs: [decode_bytes(f, size) for f in fs],
               "decode_many": lambda fs: chunks(fs, size)}
    rows = []
    print(f"decode µs per file (best of {args.decode_rounds} interleaved passes over kmnist-dev test images):")
    for name, files in forms.items():
        us = decode_us(methods, files, args.decode_rounds)
        rows.append((name, *us.values()))
        print(f"  {name:36s} " + "   ".join(f"{k} {v:6.1f}" for k, v in us.items()) + f"  ({us['full'] / us['decode_many']:.2f}x)")
    return forms, rows


def measure_plain_loop(n_files: int, tight: list[bytes], fp32, q) -> tuple[float, float]:
    """3. crops/s of the plain loop over `n_files` tight PNG files on disk, before and after, printed."""
    with tempfile.TemporaryDirectory(prefix="kmnist-int8-bench-") as tmp:
        paths = []
        for i in range(n_files):
            p = Path(tmp) / f"{i // 1000:03d}" / f"{i:06d}.png"
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(tight[i % len(tight)])
            paths.append(p)
        plain_loop(paths[:1024], fp32, q, False), plain_loop(paths[:1024], fp32, q, True)  # warm-up
        loops = {"before": [], "after": []}
        for _ in range(2):
            loops["before"].append(plain_loop(paths, fp32, q, lean=False))
            loops["after"].append(plain_loop(paths, fp32, q, lean=True))
        before, after = max(loops["before"]), max(loops["after"])
    print(f"plain loop over {n_files:,} 28x28 PNG files: full decode + torch fp32 {before:,.0f} crops/s, "
          f"decode_many + int8 {after:,.0f} crops/s ({after / before:.2f}x)")
    return before, after


def int8_against_fp32(fp32, q, test) -> str:
    """4. int8 against fp32 on the test split (kmnist_core/int8.py compare), printed; returns the recorded cell."""
    c = compare(fp32.logits(test.images), q.logits(test.images), test.labels, fp32.temperature, q.temperature,
                fp32.calibration.review_params(), q.calibration.review_params())
    f, i = c["fp32"], c["int8"]
    print(f"kmnist-dev test (1,000 images; a subset of the official test split): agreement {c['agreement']:.2%}, "
          f"accuracy {i['accuracy']:.2%} int8 vs {f['accuracy']:.2%} fp32, ECE {i['ece_after']:.2%} vs {f['ece_after']:.2%}")
    return (f"{c['agreement']:.2%}; {f['accuracy']:.1%} → {i['accuracy']:.1%}; "
            f"{f['ece_after']:.2%} → {i['ece_after']:.2%}")


def record(args: argparse.Namespace, model_id: str, speeds: dict, decode_rows: list[tuple], loop: tuple[float, float],
           versus: str) -> None:
    """Append the rows to docs/benchmarks.md's two sections."""
    base, (before, after) = speeds[TORCH_FP32], loop
    model = f"`{model_id}`, batch {args.batch}, {args.threads} threads"
    append_row("int8 and lean decode", [args.machine, model,
                                        *(f"{v:,.0f} ({v / base:.2f}×)" for v in list(speeds.values())[:2]),
                                        "; ".join(f"{v:,.0f} ({v / base:.2f}×)" for v in list(speeds.values())[2:]),
                                        f"{decode_rows[0][1]:.1f} / {decode_rows[0][2]:.1f} / **{decode_rows[0][3]:.1f}**",
                                        f"{before:,.0f} → {after:,.0f} ({after / before:.2f}×)", versus])
    for name, full, single, many in decode_rows:
        append_row("decode per form", [args.machine, name, f"{full:.1f}", f"{single:.1f}", f"**{many:.1f}**",
                                       f"{full / many:.2f}×"])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    fp32, q = load_model(args.model, precision="fp32"), load_model(args.model, precision="int8", threads=args.threads)
    data = load_dataset("kmnist-dev")
    speeds = measure_models(args, fp32, q, data.train.images)
    forms, decode_rows = measure_decode(args, fp32.input_size, data.test.images)
    loop = measure_plain_loop(args.files, forms[TIGHT], fp32, q)
    versus = int8_against_fp32(fp32, q, data.test)
    if args.record:
        record(args, fp32.model_id, speeds, decode_rows, loop, versus)


if __name__ == "__main__":
    main()
