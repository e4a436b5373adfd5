"""Append a result row to the table of one section of docs/benchmarks.md."""

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def append_row(section: str, row: str) -> None:
    """Insert `row` after the last table line of the section whose heading starts with `section`."""
    lines = BENCHMARKS.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## ") and line[3:].startswith(section))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    last_table_line = max(i for i in range(start, end) if lines[i].startswith("|"))
    lines.insert(last_table_line + 1, row.rstrip("\n"))
    BENCHMARKS.write_text("\n".join(lines) + "\n", encoding="utf-8")
