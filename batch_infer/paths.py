"""File names as bytes and as text. POSIX file names are bytes; Arrow strings must be UTF-8.

Every row keeps the exact name in `path_bytes`. The text columns (`path`, `rel_path`, `input_root`)
hold the name itself when it is valid UTF-8 (nearly always); otherwise each backslash is doubled and
each byte that is not UTF-8 is written as `\\xNN` (e.g. a Shift-JIS name from a zip made on Japanese
Windows). `unescape_name` reverses that; `path_bytes` is simpler and always exact.
"""

from __future__ import annotations

import re


_ESCAPE = re.compile(rb"\\(\\|x[0-9a-f]{2})")


def name_text(raw: bytes) -> str:
    """The text form of a file name (see the module doc)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def unescape_name(text: str) -> bytes:
    """The exact bytes of a name that `name_text` escaped (one whose `path_bytes` differs from
    `path.encode()`). Not for names that were valid UTF-8: those are their own text."""
    return _ESCAPE.sub(lambda m: b"\\" if m[1] == b"\\" else bytes([int(m[1][1:], 16)]), text.encode("utf-8"))
