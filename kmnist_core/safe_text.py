"""Text from data (file names, keys, reviewer names) made safe for where it goes: a terminal, a spreadsheet.

- `terminal(text)`: control characters shown as `\\uXXXX` escapes, so a file name cannot move the cursor,
  recolour or clear the screen, set the window title (C0, DEL, C1: ESC and CSI sequences), nor reorder
  what is shown around it (Unicode bidi controls, as in "Trojan Source"). The escape is JSON's too, so
  JSON text stays valid JSON of the same values when passed through it.
- `csv_cell(value)`: OWASP's advice against CSV injection: a text cell that a spreadsheet would read as a
  formula (starting with = + - @, a tab or a carriage return) gets a leading `'`. Numbers are left as
  they are: a negative number is a number, not a formula.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

# C0 and DEL, C1, the bidi controls (ALM, LRM, RLM, LRE..RLO, LRI..PDI), the line and paragraph
# separators, and lone surrogates (a name that is not UTF-8, decoded with surrogateescape: a terminal
# cannot even encode them).
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff]")
CONTROL_BUT_NEWLINE = re.compile(CONTROL.pattern.replace("\x00-\x1f", "\x00-\x09\x0b-\x1f"))
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _escape(match: re.Match) -> str:
    return f"\\u{ord(match.group()):04x}"


def terminal(text: str, newlines: bool = False) -> str:
    """`text` with every control character escaped (module doc); `newlines`: keep line breaks (text made
    of several lines, such as an error message listing problems)."""
    return (CONTROL_BUT_NEWLINE if newlines else CONTROL).sub(_escape, text)


def csv_cell(value: Any) -> Any:
    """A cell no spreadsheet runs as a formula: text starting with = + - @, a tab or a carriage return
    behind a leading `'`; anything else (numbers, negative ones too; None) unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def csv_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of `frame` with csv_cell applied to its text columns (numeric columns stay numbers)."""
    safe = frame.copy()
    for column in frame.select_dtypes(include=["object", "string"]).columns:
        safe[column] = frame[column].map(csv_cell)
    return safe
