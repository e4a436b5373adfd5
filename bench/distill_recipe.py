"""The default model's recipe: train an ensemble of teachers, then distill students from it.

Every run is a plain `kmnist-batch train` (same code as the CLI), several at once; with a GPU they share it.
A run whose model directory is already complete is skipped, so an interrupted recipe picks up where it
stopped. It names the student that is best on validation (accuracy, then loss) before printing any test
figure. The comparison table (bench/compare_models.py) comes last.

    .venv/bin/python bench/distill_recipe.py --out runs/distill --device cuda --parallel 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The recipe every run shares (README, "How the default model was made"): AdamW one-cycle with strong
# augmentation. The defaults below are the shipped default model's recipe.
COMMON = ["--lr", "3e-3", "--batch-size", "128", "--optimizer", "adamw", "--weight-decay", "5e-4",
          "--schedule", "onecycle", "--augment", "strong"]


def train(out: Path, args: list[str], log: Path) -> tuple[Path, float]:
    """One `kmnist-batch train` run, logged to `log`; skipped when `out` already holds a model."""
    started = time.perf_counter()
    if not (out / "model_card.json").exists():
        with open(log, "w") as f:
            cmd = [sys.executable, "-m", "jobs.cli", "train", *args, "--out", str(out)]
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode:
            sys.exit(f"error: {out.name} failed (exit {proc.returncode}); see {log}")
    return out, time.perf_counter() - started


def run_stage(jobs: dict[str, list[str]], root: Path, parallel: int) -> list[Path]:
    (root / "logs").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(parallel) as pool:
        futures = [pool.submit(train, root / name, job, root / "logs" / f"{name}.log") for name, job in jobs.items()]
        done = [f.result() for f in futures]
    for out, seconds in done:
        print(f"  {out.name}: {seconds:.0f}s", flush=True)
    return [out for out, _ in done]


def val_key(model_dir: Path) -> tuple[float, float]:
    last = json.loads((model_dir / "model_card.json").read_text(encoding="utf-8"))["metrics"]["final_epoch"]
    return (-last["val_acc"], last["val_loss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dataset", default="kmnist-dev")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--parallel", type=int, default=1, help="training runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    parser.add_argument("--teacher-model", default="vgg-cnn")
    parser.add_argument("--teachers", type=int, default=5, help="ensemble size (seeds 0..N-1)")
    parser.add_argument("--teacher-epochs", type=int, default=60)
    parser.add_argument("--students", default="compact-cnn-wide:0", help="comma-separated model:seed pairs")
    parser.add_argument("--student-epochs", type=int, default=180)
    parser.add_argument("--mixup", type=float, default=0.2, help="students' mixup")
    args = parser.parse_args()

    shared = ["--dataset", args.dataset, "--device", args.device, "--threads", str(args.threads), *COMMON]
    started = time.perf_counter()
    print(f"teachers: {args.teachers} x {args.teacher_model}, {args.teacher_epochs} epochs", flush=True)
    teachers = run_stage({f"teacher-{args.teacher_model}-s{seed}": [
        *shared, "--model", args.teacher_model, "--epochs", str(args.teacher_epochs), "--seed", str(seed)]
        for seed in range(args.teachers)}, args.out, args.parallel)
    print(f"students: {args.students}, {args.student_epochs} epochs, mixup {args.mixup}", flush=True)
    distill = [arg for t in teachers for arg in ("--teacher", str(t))]
    students = run_stage({f"student-{model}-s{seed}": [
        *shared, "--model", model, "--epochs", str(args.student_epochs), "--seed", seed, "--mixup", str(args.mixup),
        *distill] for model, seed in (pair.split(":") for pair in args.students.split(","))}, args.out, args.parallel)
    print(f"all runs: {time.perf_counter() - started:.0f}s", flush=True)
    print(f"best student on validation: {min(students, key=val_key)}", flush=True)
    subprocess.run([sys.executable, str(ROOT / "bench" / "compare_models.py"), "--dataset", args.dataset,
                    *map(str, teachers + students)], check=True)


if __name__ == "__main__":
    main()
