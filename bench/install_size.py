"""The inference install: a fresh venv with `pip install -c requirements.lock .` (no extras), its
site-packages size, that torch is not importable there, and that it predicts the demo crops and the page
demo with the same rows (and pages, and ALTO bytes) as the full install in .venv/.

    .venv/bin/python bench/install_size.py [--record]

Uses the machine's pip configuration and cache (PIP_CACHE_DIR); writes only under a temp folder.
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.record import append_row  # noqa: E402

FULL_CLI = Path(sys.executable).parent / "kmnist-batch"
DEMOS = {"crops": [str(REPO / "examples" / "crops")],
         "pages": ["--manifest", str(REPO / "examples" / "pages" / "kaggle.csv"), "--export", "alto"]}


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def rows(out: Path):
    return pq.ParquetDataset(out / "predictions").read().drop_columns(["run_id", "node_id"]).sort_by("path")


def same_outputs(a: Path, b: Path) -> bool:
    same = rows(a).equals(rows(b))
    if (a / "pages.parquet").exists():
        same &= pq.read_table(a / "pages.parquet").equals(pq.read_table(b / "pages.parquet"))
        compared = filecmp.dircmp(a / "alto", b / "alto")
        same &= not (compared.diff_files or compared.left_only or compared.right_only)
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="append the result to docs/benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kmnist-install-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "-c", str(REPO / "requirements.lock"), str(REPO)], check=True)
        site = next((venv / "lib").glob("python3*/site-packages"))
        mb = size_mb(site)
        torch_missing = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"],
                                       capture_output=True).returncode != 0
        same = {}
        for name, demo in DEMOS.items():
            for cli, side in ((venv / "bin" / "kmnist-batch", "base"), (FULL_CLI, "full")):
                subprocess.run([str(cli), "predict", *demo, "--out", f"{tmp}/{name}-{side}"], check=True,
                               capture_output=True)
            same[name] = same_outputs(Path(tmp, f"{name}-base"), Path(tmp, f"{name}-full"))
    print(f"inference install (pip install .): site-packages {mb:,.0f} MB; torch importable: {not torch_missing}; "
          f"same outputs as the full install: crops {same['crops']}, pages {same['pages']}")
    if args.record:
        append_row("inference install", [f"{mb:,.0f} MB", "no" if torch_missing else "yes",
                                          f"crops {'same' if same['crops'] else 'DIFFER'}, pages "
                                          f"{'same' if same['pages'] else 'DIFFER'}"])


if __name__ == "__main__":
    main()
