"""One writer per OUT (kmnist_core/out_lock.py), without any state kept in the module."""

from __future__ import annotations

import json
import os
import socket

import pytest

from kmnist_core.errors import KmnistError
from kmnist_core.out_lock import (LOCK_FILE, held_here, hold, holder_alive, probe, process_start, refuse_if_busy,
                                  take_if_free)


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


def test_probe_and_take_if_free_tell_a_held_lock_from_a_free_one(tmp_path):
    assert probe(tmp_path) == (False, None)  # no lock file yet
    with pytest.raises(OSError):
        with take_if_free(tmp_path):
            pass
    with hold(tmp_path, "run-1"):
        held, holder = probe(tmp_path)  # another open file: flock conflicts even within one process
        assert held and holder["run_id"] == "run-1"
        with pytest.raises(BlockingIOError):
            with take_if_free(tmp_path):
                pass
    assert probe(tmp_path) == (False, None)  # a clean end empties the record
    (tmp_path / LOCK_FILE).write_text(json.dumps({"run_id": "killed"}))  # a holder that died
    assert probe(tmp_path) == (False, {"run_id": "killed"})
    with take_if_free(tmp_path) as holder:
        assert holder == {"run_id": "killed"} and probe(tmp_path)[0]
    assert probe(tmp_path)[0] is False
