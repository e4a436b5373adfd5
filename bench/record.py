"""Append a result row to the table of one section of docs/benchmarks.md."""

import os
import platform
from datetime import datetime, timezone
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def append_row(section: str, cells: list[str]) -> None:
    """Add `| date | machine | *cells |` after the last table line of the section whose heading starts
    with `section`."""
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    row = "| " + " | ".join([f"{datetime.now(timezone.utc):%Y-%m-%d}", machine, *cells]) + " |"
    lines = BENCHMARKS.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## ") and line[3:].startswith(section))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    last_table_line = max(i for i in range(start, end) if lines[i].startswith("|"))
    lines.insert(last_table_line + 1, row)
    BENCHMARKS.write_text("\n".join(lines) + "\n", encoding="utf-8")
