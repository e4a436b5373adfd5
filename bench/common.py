"""What the bench scripts share: their command line (the docstring as the description, the flags most of
them take) and the one place their results go (bench/record.py, docs/benchmarks.md)."""

from __future__ import annotations

import argparse


def arguments(doc: str) -> argparse.ArgumentParser:
    """A bench script's parser: its docstring as the description, shown as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def model_flags(parser: argparse.ArgumentParser, threads: int = 2) -> None:
    """--model (a model directory, or 'default') and --threads (torch's CPU threads)."""
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=threads)


def record_flag(parser: argparse.ArgumentParser, what: str = "the results") -> None:
    """--record: append what the script measured to docs/benchmarks.md (bench/record.py)."""
    parser.add_argument("--record", action="store_true", help=f"append {what} to docs/benchmarks.md")
