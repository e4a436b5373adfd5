"""Progress of a `predict` run: the start line, a line every `every_s` seconds, OUT/_progress.json.

The driver calls, in order:
    progress = RunProgress(out, every_s=30, quiet=False)
    progress.start(info)            # before the first crop; the listing may still be running
    progress.listing(so_far)        # while the listing streams: files found so far (shown as "done/? (N so far)")
    progress.counted(files, already_done)  # a count of the inputs run ahead of the listing: "done/~N" and an ETA
    progress.listed(total, skipped, already_done)  # once it has finished: the total, from here on with an ETA
    progress.chunk_done(stats)      # for every committed chunk: {"rows", "replaced", "errors_by_kind", "review_by_reason"}
    progress.finish(status, reason) # "completed", "failed" or "interrupted" (with the one-line reason)
Lines are printed from a background thread on time even when no chunk finishes (kmnist_core/progress.py).

Figures: `done` counts this run's rows (files to predict now), `total` the files this run has to
predict (the listing minus what a resumed run already has); rates are crops/s over the last interval
and since start(); the ETA is the remaining files at the overall rate. The listing streams at the pace
the workers take chunks (the driver holds one chunk at a time), so on Ray its total comes only near the
end; until then the total is estimated (`~`) from a count of the inputs that runs ahead
(batch_infer.discover.count_ahead).
"""

from __future__ import annotations

from collections import Counter

from kmnist_core.progress import Reporter, counts_text, duration

MAX_INPUTS_SHOWN = 3


def start_text(info: dict) -> str:
    """The start line: what the job is about to do. Keys that are absent are left out."""
    def get(key, default="-"):
        value = info.get(key)
        return default if value is None else value

    inputs = list(info.get("inputs") or [])
    shown = ", ".join(inputs[:MAX_INPUTS_SHOWN]) + (f" and {len(inputs) - MAX_INPUTS_SHOWN} more"
                                                    if len(inputs) > MAX_INPUTS_SHOWN else "")
    files = info.get("files")
    found = f"{files:,} files found" if files is not None else "files: still listing"
    skipped = counts_text(info.get("skipped") or {}) or "none"
    parts = [f"start predict run {get('run_id')}: {len(inputs)} input{'s' if len(inputs) != 1 else ''} ({shown})",
             f"{found}, skipped: {skipped}"]
    if info.get("already_done") is not None:  # a streamed listing knows it only at its end
        parts.append(f"already done: {info['already_done']:,}")
    model = f"model {get('model_id')}" + (f" {info['precision']}" if info.get("precision") else "") + \
        (f" ({info['precision_note']})" if info.get("precision_note") else "")
    parts.append(model)
    review = f"review below {info['review_below']:.3f}" if info.get("review_below") is not None else "review below -"
    if info.get("ood_threshold") is not None:
        review += f", unknown above out-of-set score {info['ood_threshold']:.3f}"
    where = (f"Ray {info['ray_address']} (dashboard {get('dashboard_url')})" if info.get("ray_address")
             else "in this process (a small job: no Ray)")
    parts += [review, f"out {get('out')}", where]
    if info.get("workers") is not None:
        parts.append(f"{info['workers']} worker{'s' if info['workers'] != 1 else ''}")
    return "; ".join(parts)


def head_text(f: dict) -> str:
    """The count part of a progress line, from figures (RunProgress.figures, or _progress.json as read
    back): "done/total (pct%)", "done/~estimate (pct%)" while the listing streams, or "done/? (...)"."""
    done = f.get("done") or 0
    if f.get("total") is not None:  # an empty run (0/0) is all done
        return f"{done:,}/{f['total']:,} ({f['percent'] if f.get('percent') is not None else 100.0:.1f}%)"
    if f.get("estimated_total") is not None:
        return f"{done:,}/~{f['estimated_total']:,} ({f.get('percent') or 0.0:.1f}%)"
    return f"{done:,}/? (still listing: {f.get('listed_so_far') or 0:,} so far)"


class RunProgress(Reporter):
    kind = "predict"

    def clear(self) -> None:
        self.total: int | None = None
        self.skipped: dict[str, int] = {}
        self.done = 0
        self.listed_so_far = 0  # files to do among those listed so far, while the listing streams
        self.estimate: int | None = None  # files to do, from the count ahead, until the listing's own total
        self.errors: Counter = Counter()
        self.review: Counter = Counter()
        self._done_at_last = 0

    def start(self, info: dict) -> None:
        """Print the start line, write the first record and start the timer. `info` keys: run_id, inputs,
        files (None while the listing streams), skipped, already_done, model_id, precision, review_below,
        ood_threshold, out, ray_address, dashboard_url, workers, and options (asdict(PredictOptions):
        `status` rebuilds the resume command of a run killed before run.json named them)."""
        self.info = dict(info)
        if info.get("files") is not None:  # listed before the start: the total is known from the first line
            self.total = int(info["files"]) - int(info.get("already_done") or 0)
        self.skipped = dict(info.get("skipped") or {})
        self._open(start_text(self.info))

    def listed(self, total: int, skipped: dict[str, int], already_done: int | None = None) -> None:
        """The listing has finished: `total` files (or error rows to re-read) this run has to do,
        `skipped` by reason, `already_done` by earlier runs."""
        with self._lock:
            self.total, self.skipped = int(total), {k: v for k, v in skipped.items() if v}
            if already_done is not None:
                self.info["already_done"] = already_done

    def counted(self, files: int, already_done: int = 0) -> None:
        """The count ahead of the listing has ended: `files` in the inputs, of which about `already_done`
        are in an earlier run's committed chunks."""
        with self._lock:
            self.estimate = max(int(files) - int(already_done), 0)

    def listing(self, so_far: int) -> None:
        """While the listing streams: how many files to do it has found so far."""
        self.listed_so_far = so_far

    def chunk_done(self, stats: dict) -> None:
        with self._lock:
            self.done += int(stats["rows"]) + int(stats.get("replaced", 0))  # new rows and re-read error rows
            self.errors.update({k: v for k, v in (stats.get("errors_by_kind") or {}).items() if v})
            self.review.update({k: v for k, v in (stats.get("review_by_reason") or {}).items() if v})
            self.refresh_bar()
        self.tick()

    def finish(self, status: str, reason: str | None = None) -> None:
        """End the run's reporting: a last line, and the record's final status (and reason, on failure)."""
        with self._lock:
            figures = self.figures(self.clock()) if self.started_at is not None else None
        final = None
        if figures is not None:
            speed = f", {figures['rate_overall']:,.0f} crops/s" if figures["rate_overall"] else ""
            final = (f"{status} {figures['done']:,}/{self._total_text()} in {duration(figures['elapsed_s'])} since the "
                     f"start line{speed}; "
                     + self._tail(figures))
        self._close(status, final, reason)

    def identity(self) -> dict:
        return {"run_id": self.info.get("run_id"), "start": self.info}

    def _total_text(self) -> str:
        return f"{self.total:,}" if self.total is not None else "?"

    def figures(self, now: float) -> dict:
        elapsed = max(now - self.started_at, 0.0)
        since = max(now - self.last_emit, 0.0)
        rate_interval = (self.done - self._done_at_last) / since if since > 0 else None
        rate_overall = self.done / elapsed if elapsed > 0 else None
        expected = self.total if self.total is not None else self.estimate
        if expected is not None:  # the estimate can fall short of what is done (files added meanwhile)
            expected = max(expected, self.done, self.listed_so_far if self.total is None else 0)
        eta = max(expected - self.done, 0) / rate_overall if expected is not None and rate_overall else None
        return {"done": self.done, "total": self.total, "listing_done": self.total is not None,
                "estimated_total": expected if self.total is None else None,
                "listed_so_far": self.listed_so_far if self.total is None else self.total,
                "already_done": self.info.get("already_done"), "skipped": self.skipped,
                "percent": round(100 * self.done / expected, 1) if expected else None,
                "elapsed_s": round(elapsed, 1), "interval_s": round(since, 1),
                "rate_interval": round(rate_interval, 1) if rate_interval is not None else None,
                "rate_overall": round(rate_overall, 1) if rate_overall is not None else None,
                "eta_s": round(eta, 1) if eta is not None else None,
                "errors": sum(self.errors.values()), "errors_by_kind": dict(self.errors),
                "needs_review": sum(self.review.values()), "review_by_reason": dict(self.review)}

    def interval_done(self) -> None:
        self._done_at_last = self.done

    def bar_state(self, figures: dict) -> tuple[int, int | None]:
        return figures["done"], figures["total"] if figures["total"] is not None else figures["estimated_total"]

    def _tail(self, f: dict) -> str:
        errors = f"errors {f['errors']:,}" + (f" ({counts_text(f['errors_by_kind'])})" if f["errors"] else "")
        review = f"review {f['needs_review']:,}" + (f" ({counts_text(f['review_by_reason'])})" if f["needs_review"] else "")
        return f"{errors}; {review}"

    def line(self, f: dict) -> str:
        now = f"{f['rate_interval']:,.0f}" if f["rate_interval"] is not None else "-"
        overall = f"{f['rate_overall']:,.0f}" if f["rate_overall"] is not None else "-"
        return (f"progress {head_text(f)}; {now} crops/s (last {duration(f['interval_s'])}), {overall} overall; "
                f"ETA {duration(f['eta_s'])}; {self._tail(f)}")
