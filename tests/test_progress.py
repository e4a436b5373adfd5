"""RunProgress, the predict reporter: real files, a fake clock and a StringIO stream (no Ray)."""

from __future__ import annotations

import io
import json
import re
import time

from batch_infer.progress import RunProgress
from kmnist_core.progress import PROGRESS_FILE

INFO = {"run_id": "20261202T180000-abcdef", "inputs": ["/data/a", "/data/b"], "files": None, "skipped": {"hidden": 2},
        "already_done": 0, "model_id": "5d977e926e757428", "precision": "fp32", "review_below": 0.99,
        "ood_threshold": 0.412, "out": "/runs/x", "ray_address": "127.0.0.1:6379",
        "dashboard_url": "http://127.0.0.1:8265", "workers": 2}


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def reporter(out, stream, clock, **kw) -> RunProgress:
    return RunProgress(out, every_s=1.0, stream=stream, clock=clock, wall=lambda: 1_796_000_000 + clock.t,
                       background=False, **kw)


def record(out) -> dict:
    return json.loads((out / PROGRESS_FILE).read_text(encoding="utf-8"))


def test_a_count_ahead_of_the_streaming_listing_gives_an_estimated_total_and_an_eta(tmp_path):
    stream, clock = io.StringIO(), FakeClock()
    p = reporter(tmp_path, stream, clock)
    p.start(INFO)
    p.listing(300)
    p.counted(1200, already_done=200)  # 1,200 files, 200 of them in an earlier run's committed chunks
    clock.t += 1.0
    p.chunk_done({"rows": 250, "errors_by_kind": {}, "review_by_reason": {}})
    line = stream.getvalue().splitlines()[-1]
    # 250 of ~1,000 after 1 s at 250/s: 750 left -> 3 s.
    assert "progress 250/~1,000 (25.0%); 250 crops/s (last 1s), 250 overall; ETA 3s" in line, line
    r = record(tmp_path)
    assert (r["total"], r["estimated_total"], r["percent"], r["eta_s"]) == (None, 1000, 25.0, 3.0)

    # Files added after the count: the estimate never falls below what is done or listed.
    p.listing(1500)
    clock.t += 1.0
    p.chunk_done({"rows": 1250, "errors_by_kind": {}, "review_by_reason": {}})
    assert "progress 1,500/~1,500 (100.0%)" in stream.getvalue().splitlines()[-1]

    p.listed(1600, {})  # the listing's own total replaces the estimate
    clock.t += 1.0
    p.chunk_done({"rows": 50, "errors_by_kind": {}, "review_by_reason": {}})
    assert "progress 1,550/1,600 (96.9%)" in stream.getvalue().splitlines()[-1]
    assert record(tmp_path)["estimated_total"] is None


def test_start_line_then_a_progress_line_per_interval_with_counts_rates_and_eta(tmp_path):
    stream, clock = io.StringIO(), FakeClock()
    p = reporter(tmp_path, stream, clock)
    p.start(INFO)
    first = stream.getvalue().splitlines()
    assert len(first) == 1 and "start predict run 20261202T180000-abcdef" in first[0]
    for needle in ("2 inputs (/data/a, /data/b)", "files: still listing", "skipped: hidden 2", "already done: 0",
                   "model 5d977e926e757428 fp32", "review below 0.990", "out-of-set score 0.412", "out /runs/x",
                   "Ray 127.0.0.1:6379 (dashboard http://127.0.0.1:8265)", "2 workers"):
        assert needle in first[0], needle
    assert record(tmp_path)["status"] == "running" and record(tmp_path)["total"] is None

    clock.t += 0.5
    p.listing(900)
    p.chunk_done({"rows": 500, "replaced": 0, "errors_by_kind": {"truncated": 2, "corrupt": 0},
                  "review_by_reason": {"low_confidence": 40}})
    assert len(stream.getvalue().splitlines()) == 1  # half an interval: nothing yet
    clock.t += 0.5
    p.tick()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    # Before the listing ends the total is unknown: done/? and no ETA.
    assert "progress 500/? (still listing: 900 so far)" in lines[1] and "ETA -" in lines[1]
    assert "errors 2 (truncated 2)" in lines[1]  # kinds with no row are not listed
    assert "500 crops/s (last 1s), 500 overall" in lines[1]

    p.listed(2000, {"hidden": 2, "not_image": 1})
    clock.t += 1.0
    p.chunk_done({"rows": 1000, "errors_by_kind": {"truncated": 1, "not_image": 3}, "review_by_reason": {"blank": 5}})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    # 1,500 of 2,000 after 2 s: 1,000/s in the last interval, 750/s overall, 500 left at 750/s -> 1 s.
    assert "progress 1,500/2,000 (75.0%); 1,000 crops/s (last 1s), 750 overall; ETA 1s" in lines[2]
    assert "errors 6 (not_image 3, truncated 3)" in lines[2] and "review 45 (low_confidence 40, blank 5)" in lines[2]
    r = record(tmp_path)
    assert (r["done"], r["total"], r["percent"], r["rate_overall"], r["eta_s"]) == (1500, 2000, 75.0, 750.0, 0.7)
    assert r["errors_by_kind"] == {"truncated": 3, "not_image": 3} and r["skipped"] == {"hidden": 2, "not_image": 1}
    assert r["run_id"] == INFO["run_id"] and r["holder"]["pid"] > 0 and r["holder"]["host"]

    clock.t += 1.0
    p.chunk_done({"rows": 500, "replaced": 0, "errors_by_kind": {}, "review_by_reason": {}})
    p.finish("completed")
    last = stream.getvalue().splitlines()[-1]
    assert re.search(r"completed 2,000/2,000 in 3s since the start line, 667 crops/s", last), last
    assert record(tmp_path)["status"] == "completed" and record(tmp_path)["done"] == 2000


def test_a_line_is_due_even_when_no_chunk_finishes(tmp_path):
    stream, clock = io.StringIO(), FakeClock()
    p = reporter(tmp_path, stream, clock)
    p.start({**INFO, "files": 100})
    for _ in range(3):
        clock.t += 1.0
        p.tick()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and all("progress 0/100 (0.0%); 0 crops/s" in line for line in lines[1:])


def test_background_thread_prints_each_line_when_due_though_no_chunk_finishes(tmp_path):
    """A stalled run still reports: the thread, not a chunk, emits a line once the clock says it is due."""
    stream, clock = io.StringIO(), FakeClock()
    p = RunProgress(tmp_path, every_s=0.2, stream=stream, clock=clock)
    p.start({**INFO, "files": 10})
    for due in (2, 3):
        clock.t += 0.2
        deadline = time.monotonic() + 30
        while len(stream.getvalue().splitlines()) < due:
            assert time.monotonic() < deadline, stream.getvalue()
            time.sleep(0.01)
    p.finish("interrupted")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and all("progress 0/10" in line for line in lines[1:3]), lines
    assert lines[-1].split(" ", 1)[1].startswith("interrupted 0/10")
    assert record(tmp_path)["status"] == "interrupted"


def test_quiet_prints_nothing_but_keeps_the_record(tmp_path):
    stream, clock = io.StringIO(), FakeClock()
    p = reporter(tmp_path, stream, clock, quiet=True)
    p.start({**INFO, "files": 10})
    clock.t += 2
    p.chunk_done({"rows": 10, "errors_by_kind": {}, "review_by_reason": {}})
    p.finish("completed")
    assert stream.getvalue() == ""
    assert record(tmp_path)["done"] == 10 and record(tmp_path)["status"] == "completed"


def test_resume_counts_only_what_is_left(tmp_path):
    stream, clock = io.StringIO(), FakeClock()
    p = reporter(tmp_path, stream, clock)
    p.start({**INFO, "files": 1000, "already_done": 600})
    assert "1,000 files found" in stream.getvalue() and "already done: 600" in stream.getvalue()
    clock.t += 1
    p.chunk_done({"rows": 100, "errors_by_kind": {}, "review_by_reason": {}})
    assert "progress 100/400 (25.0%)" in stream.getvalue().splitlines()[-1]


class TerminalStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_bar_carries_the_same_figures_instead_of_lines(tmp_path):
    stream, clock = TerminalStream(), FakeClock()
    p = reporter(tmp_path, stream, clock)
    p.start({**INFO, "files": 2000})
    clock.t += 1
    p.chunk_done({"rows": 1500, "errors_by_kind": {"truncated": 3}, "review_by_reason": {}})
    p.finish("completed")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", stream.getvalue())
    assert "start predict run" in text and "completed 1,500/2,000" in text
    assert "progress 1,500/2,000 (75.0%); 1,500 crops/s" in text and "errors 3 (truncated 3)" in text
    assert not re.search(r"^\d\d:\d\d:\d\d progress", text, re.M)  # the figures are in the bar, not in lines
    assert record(tmp_path)["done"] == 1500


def test_an_interrupt_while_the_progress_thread_starts_still_records_the_end(tmp_path, monkeypatch):
    """A Ctrl-C or SIGTERM that lands inside Thread.start leaves a thread that never started: finish still
    writes the end (it once raised "cannot join thread before it is started", and the run ended as a bug)."""
    import threading

    import pytest

    def interrupted(thread):
        raise KeyboardInterrupt

    p = RunProgress(tmp_path, every_s=1.0, stream=io.StringIO())
    monkeypatch.setattr(threading.Thread, "start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        p.start(INFO)
    monkeypatch.undo()
    p.finish("interrupted", "interrupted (Ctrl-C or SIGTERM)")
    assert record(tmp_path)["status"] == "interrupted"
