"""One writer per OUT (kmnist_core/out_lock.py), without any state kept in the module."""

from __future__ import annotations

import json
import os
import socket

import pytest

from kmnist_core.errors import KmnistError
from kmnist_core.out_lock import LOCK_FILE, held_here, hold, holder_alive, process_start, refuse_if_busy


def test_a_second_run_in_the_same_process_is_refused_and_a_clean_end_frees_out(tmp_path):
    with hold(tmp_path, "run-1") as previous:
        assert previous is None
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["pid_start"] == process_start(os.getpid())
        with pytest.raises(KmnistError, match="is in use by run run-1"):
            refuse_if_busy(tmp_path)
        with pytest.raises(KmnistError, match="is in use by run run-1"):
            with hold(tmp_path, "run-2"):
                pass
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean end empties the record
    refuse_if_busy(tmp_path)
    with hold(tmp_path, "run-3") as previous:
        assert previous is None


def test_the_record_names_one_process_even_when_its_pid_is_reused():
    me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid())}
    assert held_here(me) and holder_alive(me)
    reused = {**me, "pid_start": me["pid_start"] - 1}  # the same pid, an earlier process: gone
    assert not held_here(reused) and not holder_alive(reused)
    assert not held_here({**me, "pid": os.getppid(), "pid_start": process_start(os.getppid())})
    assert holder_alive({**me, "pid": os.getppid(), "pid_start": process_start(os.getppid())})
