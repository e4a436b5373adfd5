"""Reading a chunk's local files: batch_infer/stages.py `read_file` (os.open, a read of the file's size,
reads until end of file) against `open(path, "rb").read()`, on N real kmnist-dev PNGs from the page
cache, alternating five times; the best pass of each, in µs a file.

    .venv/bin/python bench/read_local.py [--files 20000] [--record]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from batch_infer.stages import read_file  # noqa: E402
from bench.common import arguments, record_flag  # noqa: E402
from bench.record import append_row  # noqa: E402
from bench.scale import link_tree, sources  # noqa: E402


def open_read(path: bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--files", type=int, default=20_000)
    record_flag(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kmnist-read-") as tmp:
        tree = Path(tmp, "in")
        link_tree(tree, args.files, sources(Path(tmp, "src")))
        paths = sorted(str(p).encode() for p in tree.rglob("*.png"))
        assert [read_file(p) for p in paths[:100]] == [open_read(p) for p in paths[:100]]
        best = {"read_file": float("inf"), "open().read()": float("inf")}
        for _ in range(5):
            for name, read in (("read_file", read_file), ("open().read()", open_read)):
                started = time.perf_counter()
                for path in paths:
                    read(path)
                best[name] = min(best[name], (time.perf_counter() - started) / len(paths) * 1e6)
    ratio = best["open().read()"] / best["read_file"]
    print(f"{len(paths):,} files: read_file {best['read_file']:.1f} µs, open().read() {best['open().read()']:.1f} µs "
          f"a file ({ratio:.2f}x)")
    if args.record:
        append_row("reading local files", [f"{len(paths):,}", f"{best['read_file']:.1f} µs",
                                           f"{best['open().read()']:.1f} µs", f"{ratio:.2f}×"])


if __name__ == "__main__":
    main()
