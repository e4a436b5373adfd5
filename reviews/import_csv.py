"""`kmnist-batch review OUT --import FILE`: decisions made elsewhere (a spreadsheet, another tool), recorded
exactly as the review UI records them (reviews/store.py: kind `review`, source `import:<file
name>`, with the model, run, predicted character, confidence and review reason of the matched row).

The file: CSV, or TSV when named `.tsv` or `.tab`; UTF-8 (a spreadsheet's byte-order mark is fine); a
header line naming
- `path` (the prediction row's `path`, exactly as in predictions/) or `key` (its `path_bytes` in hex,
  exact for any file name); one of the two;
- `label`: a character of the model's card (`お`, or its code point `U+304A`), `not_a_character` or
  `unreadable`; a line whose label is empty is no decision and is skipped;
- `reviewer` (optional): who decided; where absent or empty, the reviewer the import is run as.
Other columns are ignored, so a sheet exported from the predictions can keep its confidence columns.

All or nothing: every line is checked (its label on the card, its row among the predictions, a key at
most once per reviewer) before the decisions are appended as one batch; a file with a refused line
records nothing, and the error names every refused line as `file:line: why`.
Scale: the file's keys are matched a shard at a time, reading the key column only (and the few columns
a decision records, for shards holding a match); memory: the file's lines and one shard's keys.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from kmnist_core import predictions
from kmnist_core.classmap import ClassMap
from kmnist_core.errors import KmnistError
from kmnist_core.storage import Location
from reviews import store

LISTED = 20  # refused lines named in the error; the rest are counted
TAB_SUFFIXES = (".tsv", ".tab")


@dataclass(frozen=True)
class Line:
    number: int  # in the file, from 1 (the header)
    key: str | bytes  # a path (text) or a key (bytes)
    label: str
    reviewer: str


def label_of(text: str, classes: ClassMap) -> str | None:
    """The decision label a cell names (a character, its code point, or a special label); None if none."""
    if text in classes.chars or text in store.SPECIAL_LABELS:
        return text
    if text.upper() in classes.codepoints:
        return classes.chars[classes.codepoints.index(text.upper())]
    return None


def refusal(text: str, classes: ClassMap) -> str:
    shown = f" ({''.join(classes.chars)})" if len(classes) <= 50 else ""
    return (f"label {text!r} is not one of the model's {len(classes)} characters{shown} nor "
            f"{' / '.join(store.SPECIAL_LABELS)}")


def read_lines(csv_path: Path, classes: ClassMap, reviewer: str) -> tuple[str, list[Line], list[tuple[int, str]], int]:
    """(the key column, the decisions the file holds, its refused lines as (line, `file:line: why`),
    how many data lines it has)."""
    delimiter = "\t" if csv_path.suffix.lower() in TAB_SUFFIXES else ","
    lines, problems, first_on, data = [], [], {}, 0
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            key_column = check_header(csv_path, reader.fieldnames or [])
            for row in reader:
                data += 1
                number = reader.line_num
                line, why = parse_row(row, key_column, classes, reviewer)
                if line is not None and (line.key, line.reviewer) in first_on:
                    why = (f"{key_column} {row[key_column]!r} is labelled again by {line.reviewer} "
                           f"(first on line {first_on[line.key, line.reviewer]})")
                if why:
                    problems.append((number, f"{csv_path.name}:{number}: {why}"))
                elif line is not None:
                    first_on[line.key, line.reviewer] = number
                    lines.append(Line(number, line.key, line.label, line.reviewer))
    except FileNotFoundError:
        raise KmnistError(f"{csv_path}: no such file") from None
    except UnicodeDecodeError:
        raise KmnistError(f"{csv_path} is not UTF-8 text") from None
    except csv.Error as e:
        raise KmnistError(f"{csv_path}: not a readable CSV: {e}") from None
    return key_column, lines, problems, data


def parse_row(row: dict, key_column: str, classes: ClassMap, reviewer: str) -> tuple[Line | None, str]:
    """(the row's decision, line number 0; None when it has none) or (None, why it is refused)."""
    label_text = (row.get("label") or "").strip()
    if not label_text:
        return None, ""  # no decision on this line (a sheet filled in part)
    label = label_of(label_text, classes)
    if label is None:
        return None, refusal(label_text, classes)
    value = row.get(key_column) or ""
    if not value:
        return None, f"no {key_column}"
    key: str | bytes = value
    if key_column == "key":
        try:
            key = bytes.fromhex(value.strip())
        except ValueError:
            return None, f"key {value!r} is not hexadecimal (a row's path_bytes in hex)"
    return Line(0, key, label, (row.get("reviewer") or "").strip() or reviewer), ""


def check_header(csv_path: Path, columns: list[str]) -> str:
    """The key column the header names; refuses a header without a label or a key column."""
    named = f"(its columns: {', '.join(columns) or 'none'})"
    if "label" not in columns:
        raise KmnistError(f"{csv_path} has no label column {named}")
    if ("path" in columns) == ("key" in columns):
        which = "both" if "path" in columns else "neither"
        raise KmnistError(f"{csv_path} must have a path column or a key column, not {which} {named}")
    return "path" if "path" in columns else "key"


def matching_rows(out: Location, key_column: str, keys: set) -> dict:
    """{key: the prediction row's store.SEEN columns} for the keys present in OUT, a shard at a time."""
    column = "path" if key_column == "path" else "path_bytes"
    folder, found = predictions.predictions_dir(out), {}
    for name in predictions.shard_names(out):
        shard_keys = predictions.read_shard(folder, name, [column])[column].to_pylist()
        hits = [i for i, k in enumerate(shard_keys) if k in keys]
        if hits:
            rows = predictions.read_shard(folder, name, store.SEEN).take(pa.array(hits, pa.int64()))
            found.update(zip(rows[column].to_pylist(), rows.to_pylist()))
    return found


def import_decisions(out: Location, csv_path: Path, reviewer: str) -> int:
    """Record the decisions of `csv_path` (module doc) in OUT/reviews/ as one batch; returns how many.
    Raises KmnistError, recording nothing, on a bad file or any refused line."""
    card = predictions.open_predictions(out, need_card=True).card  # the labels are checked against its card
    key_column, lines, problems, data = read_lines(Path(csv_path), card.classes, reviewer)
    found = matching_rows(out, key_column, {line.key for line in lines})
    for line in lines:
        if line.key not in found:
            shown = line.key.hex() if isinstance(line.key, bytes) else repr(line.key)
            problems.append((line.number, f"{Path(csv_path).name}:{line.number}: no prediction row in {out.uri} "
                                          f"has {key_column} {shown}"))
    if problems:
        problems.sort()
        more = f"\n... and {len(problems) - LISTED} more" if len(problems) > LISTED else ""
        raise KmnistError(f"{csv_path}: {len(problems)} of {data} lines refused, nothing imported\n"
                          + "\n".join(why for _, why in problems[:LISTED]) + more)
    if not lines:
        return 0
    source = f"import:{Path(csv_path).name}"
    rows = [store.decision_row(found[line.key], line.label, line.reviewer, "review", source) for line in lines]
    store.append(out, store.decision_table(rows, card.classes.chars))
    return len(rows)
