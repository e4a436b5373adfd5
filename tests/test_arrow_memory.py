"""How predict's processes use Arrow (kmnist_core/arrow_memory.py): pandas kept out of pyarrow's conversions,
the thread pools at one thread and back."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from kmnist_core.arrow_memory import arrow_on_one_thread


def test_arrow_converts_without_pandas_and_still_gives_pandas_when_asked(tmp_path):
    """predict's processes keep pandas (~37 MB) out of pyarrow's conversions (kmnist_core/arrow_memory.py),
    and a later to_pandas still works: a fresh interpreter, so no earlier test has imported pandas."""
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import pyarrow as pa
        from kmnist_core.arrow_memory import arrow_without_pandas
        arrow_without_pandas()
        t = pa.Table.from_pydict({"n": np.arange(3), "s": ["a", None, "c"]})
        assert t.column("n").to_pylist() == [0, 1, 2] and "pandas" not in sys.modules
        frame = t.to_pandas()
        assert "pandas" in sys.modules and frame["n"].tolist() == [0, 1, 2] and frame["s"].iloc[2] == "c"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_arrow_on_one_thread_gives_the_pools_back_as_they_were():
    before = pa.cpu_count(), pa.io_thread_count()
    with pytest.raises(RuntimeError), arrow_on_one_thread():
        assert (pa.cpu_count(), pa.io_thread_count()) == (1, 1)
        raise RuntimeError("a report that fails half way")
    assert (pa.cpu_count(), pa.io_thread_count()) == before
