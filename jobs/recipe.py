"""Entry point of the default model's recipe (kmnist_core/recipe.py): `python -m jobs.recipe folds`.

    nice -n 19 python -m jobs.recipe folds --parallel 2     # every fold, two at a time; rerun to resume
    nice -n 19 python -m jobs.recipe folds --fold 3         # one fold
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from kmnist_core.errors import KmnistError, require_torch

try:  # an entry point: one error line, not a traceback, where the [train] extra is missing
    require_torch("python -m jobs.recipe (the default model's recipe)")
except KmnistError as e:
    raise SystemExit(f"error: {e}") from None
from kmnist_core.recipe import RECIPES, Recipe, run_fold  # noqa: E402


def run_in_parallel(command: list[str], folds: int, parallel: int) -> None:
    """`command --fold K` for every fold, `parallel` processes at a time; fails if any fold failed."""
    pending, running, failed = list(range(folds)), [], []
    while pending or running:
        while pending and len(running) < parallel:
            k = pending.pop(0)
            running.append((k, subprocess.Popen([*command, "--fold", str(k)])))
        time.sleep(1)
        for k, proc in [r for r in running if r[1].poll() is not None]:
            running.remove((k, proc))
            if proc.returncode:
                failed.append(k)
    if failed:
        raise SystemExit(f"error: fold(s) {', '.join(map(str, failed))} failed; rerun the same command to resume")


def write_review(recipe: Recipe) -> None:
    from kmnist_core.files import write_json_atomic
    from kmnist_core.recipe_thresholds import review_report, score_fold_negatives, score_fold_views

    done = [k for k in range(recipe.folds) if (recipe.results / f"fold-{k}.npz").exists()]
    for k in done:
        score_fold_negatives(recipe, k)
        score_fold_views(recipe, k)
    if len(done) < recipe.folds:
        raise SystemExit(f"error: folds {sorted(set(range(recipe.folds)) - set(done))} are not trained yet; "
                         f"run `python -m jobs.recipe folds` first")
    report = review_report(recipe)
    write_json_atomic(recipe.results / "review.json", report)
    chosen = report["scores"]["chosen"]
    print(f"{recipe.name}: top-1 out of fold {report['top1']} (as is: {report['top1_as_is']}); views on "
          f"{report['views']['viewed_share']}; fitted {chosen['fitted']}")
    for name, check in chosen["held_out_checks"].items():
        print(f"  {name}: accepted {check['auto_accepted_share']:.4f}, {check['auto_accepted_errors']} errors in "
              f"{check['auto_accepted']}, bound {check['precision_lower_bound']:.4f}")
    for score, figures in report["scores"].items():
        print(f"  {score}: other characters in held-out hands accepted "
              + ", ".join(f"{s} {f['share']:.2%}" for s, f in figures["held_out_hands"]["by_script"].items())
              + "; other kinds " + ", ".join(f"{k} {f['share']:.2%}" for k, f in figures["other_kinds"].items()))


def fold_flags(parser: argparse.ArgumentParser, recipes: dict, default: str) -> None:
    """The flags of a k-fold recipe's runs (here, and bench/oof_folds.py's): which recipe, how many folds, one
    fold only, torch's CPU threads."""
    parser.add_argument("--recipe", default=default, choices=sorted(recipes))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fold", type=int, help="run this fold only")
    parser.add_argument("--threads", type=int, default=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["folds", "review", "final"],
                        help="folds: train them; review: score each finished fold's negatives, then fit and check "
                             "the review thresholds (recipes/RECIPE/review.json); final: train on every image and "
                             "write the model directory (--out; --install makes it the default)")
    parser.add_argument("--out", type=Path, help="final: the model directory to write (default runs/recipes/RECIPE-model)")
    parser.add_argument("--install", action="store_true", help="final: copy the model into kmnist_core/default_model/")
    fold_flags(parser, RECIPES, "hands-oe")
    parser.add_argument("--parallel", type=int, default=1, help="folds at once, each in a process of its own")
    parser.add_argument("--results", type=Path, help="default recipes/RECIPE (committed)")
    parser.add_argument("--work", type=Path, help="checkpoints; default recipes/RECIPE/checkpoints (committed while a "
                                                  "fold runs, a few MB, so a session on another machine resumes it)")
    args = parser.parse_args(argv)
    recipe = Recipe(args.recipe, args.folds, args.results or Path("recipes") / args.recipe,
                    args.work or Path("recipes") / args.recipe / "checkpoints", threads=args.threads)
    if args.stage == "review":
        write_review(recipe)
    elif args.stage == "final":
        from kmnist_core.recipe_model import build_default

        out = args.out or Path("runs") / "recipes" / f"{recipe.name}-model"
        card = build_default(recipe, out, args.install)
        print(f"{out}: model_id {card['model_id']}; int8 {'enabled' if card['int8']['enabled'] else 'off'}"
              + (" (installed as the default model)" if args.install else ""))
    elif args.fold is not None:
        run_fold(recipe, args.fold)
    elif args.parallel > 1:
        passed = ["folds", "--recipe", recipe.name, "--folds", str(recipe.folds), "--threads", str(recipe.threads),
                  "--results", str(recipe.results), "--work", str(recipe.work)]
        run_in_parallel([sys.executable, "-m", "jobs.recipe", *passed], recipe.folds, args.parallel)
    else:
        for k in range(recipe.folds):
            run_fold(recipe, k)


if __name__ == "__main__":
    main()
