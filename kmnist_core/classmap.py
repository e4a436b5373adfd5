"""Class maps: index -> Unicode codepoint -> character, read from the official classmap CSVs."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from kmnist_core.errors import KmnistError


@dataclass(frozen=True)
class ClassMap:
    codepoints: tuple[str, ...]  # "U+304A", one per class index
    chars: tuple[str, ...]  # "お"

    def __len__(self) -> int:
        return len(self.chars)

    def to_records(self) -> list[dict]:
        return [{"index": i, "codepoint": cp, "char": ch} for i, (cp, ch) in enumerate(zip(self.codepoints, self.chars))]

    @classmethod
    def from_records(cls, records: list[dict]) -> "ClassMap":
        records = sorted(records, key=lambda r: int(r["index"]))
        if [int(r["index"]) for r in records] != list(range(len(records))):
            raise KmnistError("class map indices must be 0..N-1 without gaps")
        return cls(tuple(r["codepoint"] for r in records), tuple(r["char"] for r in records))

    @classmethod
    def from_codepoints(cls, codepoints: list[str]) -> "ClassMap":
        """For datasets whose classes are folder names like 'U+4E00' (Kuzushiji-Kanji)."""
        return cls(tuple(codepoints), tuple(codepoint_to_char(cp) for cp in codepoints))


def codepoint_to_char(codepoint: str) -> str:
    try:
        return chr(int(codepoint.upper().removeprefix("U+"), 16))
    except ValueError:
        raise KmnistError(f"not a Unicode codepoint: {codepoint!r} (expected e.g. U+304A)") from None


def read_classmap_csv(path: Path) -> ClassMap:
    """Official format: header `index,codepoint,char`."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        return ClassMap.from_records(rows)
    except (OSError, KeyError, ValueError, UnicodeDecodeError) as e:
        raise KmnistError(f"cannot read class map {path}: {e}") from None
