"""How predict's processes use Arrow: memory given back, no pandas where none is needed, one thread where
threads only add memory. predict's driver and chunk workers and `report` call `lean_arrow`; a library
user's process keeps its own settings unless it calls predict or the report.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

import pyarrow as pa


def return_freed_memory() -> None:
    """Make Arrow give back what it frees in this process: jemalloc (the system allocator where pyarrow
    lacks it) rather than its default here, mimalloc, which keeps freed pages: a report over 200,000 rows
    left its process ~100 MB more resident (bench/scale.py). predict's driver and chunk workers and
    `report` call it; a library user's process keeps the pool it chose."""
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except NotImplementedError:
        pa.set_memory_pool(pa.system_memory_pool())


class _NoPandas:
    """A meta-path finder under which `import pandas` fails."""

    def find_spec(self, name: str, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("pandas is kept out of pyarrow's first conversion")
        return None


def arrow_without_pandas() -> None:
    """pyarrow imports pandas (~37 MB resident) the first time it converts a list or an array, only to ask
    whether it is a pandas object, and predict's processes hold none. Let that first question find no
    pandas: pyarrow then stops asking, and still imports pandas where it is asked for (to_pandas,
    from_pandas), as the page outputs do. Nothing changes where pandas is already imported. predict's
    driver and chunk workers and `report` call it (lean_arrow)."""
    if "pandas" in sys.modules:
        return
    finder = _NoPandas()
    sys.meta_path.insert(0, finder)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(finder)


@contextmanager
def arrow_on_one_thread() -> Iterator[None]:
    """Arrow's CPU and I/O thread pools at one thread each, then as they were. For reading a local OUT a
    shard at a time (the report): there the pools' threads add no speed, only memory, each with its own
    allocator caches (a report of 1,000,000 rows: 13 MB less resident, and no slower)."""
    cpus, io_threads = pa.cpu_count(), pa.io_thread_count()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    try:
        yield
    finally:
        pa.set_cpu_count(cpus)
        pa.set_io_thread_count(io_threads)


def lean_arrow() -> None:
    """return_freed_memory and arrow_without_pandas: what predict's and report's processes call first."""
    return_freed_memory()
    arrow_without_pandas()
