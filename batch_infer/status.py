"""`kmnist-batch status OUT`: where a predict or tune run stands, from OUT alone (no Ray).

A run's records are read through kmnist_core/run_record.py (`read_state`, for predict and tune alike):
OUT/run.json (predict's own record of its status and reason), OUT/_progress.json (kmnist_core/progress.py;
predict and tune) and, once a tune run completed, OUT/grid.json; whether its process is alive, from
OUT/.lock (kmnist_core/out_lock.py). Where people
have reviewed rows, their decisions (OUT/reviews/) give the review lines: reviewed and left per reason
(left: against the flagged counts of summary/summary.json, once the run has ended) and the audit figure;
files of OUT/reviews/ that hold no decisions, set aside to OUT/reviews/_quarantine/, are listed.

Alive or not:
- local OUT: the lock decides. A live run holds the flock on OUT/.lock; the kernel drops it when the
  process dies, however it dies, while the holder's name stays in the file. So a record that says
  "running" with no lock held is a run that was killed (kill -9, out of memory, a lost machine). The
  probe takes a shared lock for an instant, as `predict` itself does before it starts.
- object-store OUT (s3://...): there is no lock to probe. OUT/.lock is an object naming its holder
  with a heartbeat (out_lock.hold_store), and a holder counts as alive exactly as `predict` itself
  judges it before taking over: on this host, its pid is running; on another host, its heartbeat is
  younger than out_lock.STALE_S. So a run killed on another machine shows as running until its
  heartbeat goes stale (2 minutes); a judgement from the record's age, not proof of death.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import pyarrow.compute as pc

from batch_infer.progress import head_text
from kmnist_core import predictions, storage
from kmnist_core.card import ModelCard
from kmnist_core.errors import KmnistError
from kmnist_core.out_lock import holder_alive, probe, store_holder
from kmnist_core.progress import PROGRESS_FILE, counts_text, duration
from kmnist_core.review_reasons import REVIEW_REASONS
from kmnist_core.run_record import ENDS, RUN_FILE, RunState, read_shown, read_state
from kmnist_core.storage import Location
from reviews import report_set, stats, store
from reviews.final import HISTORY_COLUMNS, review_lines
from reviews.report import SUMMARY_DIR


def predict_resume_command(out: Location, given: str, record: dict) -> str | None:
    """The command that finishes the run: its inputs and the arguments it recorded for a resume. An
    --overwrite run that never committed a shard left the earlier predictions in place: it is run again
    as such."""
    inputs, options, args = record.get("inputs"), record.get("options") or {}, record.get("resume_args")
    if not inputs or args is None:
        return None
    mode = "--resume"
    if options.get("overwrite"):  # did it commit a shard? Its shards carry its run id in their footers
        runs = predictions.run_metadata(predictions.footers(out))[0]
        if record.get("run_id") not in {r.get("run_id") for r in runs}:
            mode = "--overwrite"
    positional = [] if options.get("manifest") else inputs
    return shlex.join(["kmnist-batch", "predict", *positional, "--out", given, mode, *args])


def tune_resume_command(out: str, start: dict) -> str | None:
    """The command that finishes a tune run, from the arguments its progress record's start names."""
    args = start.get("resume_args")
    if args is None:
        return None
    return shlex.join(["kmnist-batch", "tune", "--out", out, "--resume", *args])


def review_status(out: Location, run: dict | None, ended: bool) -> dict | None:
    """What people settled, from OUT/reviews/ (the latest decision per key, on rows of the run's model);
    None when nobody decided anything. `ended`: the run completed, so the flagged counts in summary.json
    are its rows' (and `left` can be given)."""
    history = store.read_history(out, HISTORY_COLUMNS)
    if history.num_rows == 0:
        return None
    card = ModelCard.from_json(run["model_card"], "run.json's model card") if (run or {}).get("model_card") else None
    decided = store.latest(history)
    if card is not None:
        decided = decided.filter(pc.fill_null(pc.equal(decided["model_id"], card.model_id), False))
    reviewed = predictions.value_counts(pc.fill_null(decided["review_reason"], ""))  # "": auto-accepted rows
    report = report_set.current(out) if ended else None  # the published report, on a file system or an object store
    flagged = (read_shown(report.join(SUMMARY_DIR), "summary.json") or {}).get("review_reasons") if report else None
    return {"decisions": history.num_rows, "reviewers": predictions.value_counts(decided["reviewer"]),
            "by_reason": {r: {"flagged": flagged.get(r, 0) if flagged else None, "reviewed": reviewed.get(r, 0),
                              "left": max(0, flagged.get(r, 0) - reviewed.get(r, 0)) if flagged else None}
                          for r in REVIEW_REASONS},
            "auto_accepted": {"reviewed": reviewed.get("", 0)},
            "conflicts": stats.conflicts(history).num_rows,
            "audit": stats.audit_summary(history, card, (run or {}).get("precision"))}


def alive_now(loc: Location) -> tuple[bool, dict | None, str]:
    """(is a live process holding OUT, the holder its lock names, what judged it: the lock or the heartbeat)."""
    if loc.local:
        alive, holder = probe(Path(loc.path))
        return alive, holder, "lock"
    holder = store_holder(loc)
    return holder_alive(holder), holder, "heartbeat"


def end_of(state: RunState, alive: bool, holder: dict | None, judged_by: str, now: float) -> dict:
    """The run's state, and the reason it ended: as recorded, or killed when it is recorded as running
    but nobody holds OUT."""
    if alive:
        return {"state": "running"}
    if state.recorded in ENDS:
        return {"state": state.recorded, "reason": state.reason}
    who = f" (host {holder.get('host')}, pid {holder.get('pid')})" if holder else ""
    reason = (f"the run's process{who} ended without recording an end: killed (kill -9, out of "
              f"memory) or its machine was lost")
    if judged_by == "heartbeat" and holder and holder.get("heartbeat"):
        reason += f" (its last heartbeat was {duration(now - float(holder['heartbeat']))} ago)"
    return {"state": "interrupted", "reason": reason}


def run_status(out: str | Path, now: float | None = None) -> dict:
    """The state of the run in `out`: running, completed, failed or interrupted, with its figures."""
    given = str(out)  # the resume command names OUT as the user did
    loc = storage.resolve(out)
    now = time.time() if now is None else now
    alive, holder, judged_by = alive_now(loc)
    state = read_state(loc, (holder or {}).get("run_id") if alive else None)
    if not state.found and not alive:
        raise KmnistError(f"{loc.uri} holds no kmnist-batch run (no {RUN_FILE} or {PROGRESS_FILE})")
    holder = holder or state.holder
    progress = state.progress
    age = now - progress["updated_unix"] if progress and progress.get("updated_unix") else None
    status = {"out": loc.uri, "kind": state.kind, "run_id": state.run_id, "holder": holder,
              "alive_judged_by": judged_by, "progress": progress,
              "progress_age_s": round(age, 1) if age is not None else None,
              **end_of(state, alive, holder, judged_by, now)}
    if state.summary is not None and (state.kind == "predict" or status["state"] == "completed"):
        status["summary"] = state.summary
    if state.kind == "predict":
        status["reviews"] = review_status(loc, state.run, ended=status["state"] == "completed")
        status["reviews_set_aside"] = store.quarantined(loc)  # after review_status, which sets them aside
    if status["state"] in ("failed", "interrupted"):
        status["resume_command"] = (predict_resume_command(loc, given, state.resume_from) if state.kind == "predict"
                                    else tune_resume_command(given, state.resume_from))
    return status


def progress_text(p: dict, kind: str) -> list[str]:
    if kind == "tune":
        best = p.get("best") or {}
        best_text = (f"best val {best['val_acc']:.4f} (lr {best['lr']} batch {best['batch_size']})"
                     if best.get("val_acc") is not None else "best val -")
        return [f"trials    {p.get('done', 0)}/{p.get('trials_total', '?')} done, {p.get('running', 0)} running, "
                f"{p.get('pending', 0)} pending, {p.get('errored', 0)} errored; {best_text}; "
                f"ETA {duration(p.get('eta_s'))}"]
    rate = p.get("rate_interval")
    rates = (f"{rate:,.0f} crops/s last interval, " if rate is not None else "") + \
        (f"{p['rate_overall']:,.0f} overall" if p.get("rate_overall") is not None else "- overall")
    return [f"progress  {head_text(p)}; {rates}; ETA {duration(p.get('eta_s'))}",
            f"errors    {p.get('errors', 0):,}" + (f" ({counts_text(p['errors_by_kind'])})" if p.get("errors") else ""),
            f"review    {p.get('needs_review', 0):,}" + (f" ({counts_text(p['review_by_reason'])})" if p.get("needs_review") else "")]


def status_text(s: dict) -> str:
    holder = s.get("holder") or {}
    who = f"host {holder.get('host')}, pid {holder.get('pid')}" if holder else "holder unknown"
    lines = [f"{s['out']}: {s['kind']} run {s.get('run_id') or '?'} {s['state'].upper()}"]
    if s["state"] == "running":
        heard = f", updated {duration(s['progress_age_s'])} ago" if s.get("progress_age_s") is not None else ""
        lines[0] += f" ({who}{heard})"
    if s.get("reason"):
        lines.append(f"reason    {s['reason']}")
    summary = s.get("summary") or {}
    if s["state"] == "completed" and s["kind"] == "predict":
        speed = f", {summary['crops_per_s']:,.0f} crops/s" if summary.get("crops_per_s") else ""
        lines.append(f"finished  {summary.get('finished', '-')}: {summary.get('rows_written', 0):,} rows written, "
                     f"{summary.get('rows_replaced', 0):,} replaced, in {duration(summary.get('elapsed_s'))}{speed}")
    if s["state"] == "completed" and s["kind"] == "tune" and summary.get("trials") is not None:
        best = summary.get("best") or {}
        lines.append(f"trials    {summary['trials']}: " + counts_text(summary.get("by_status") or {})
                     + (f"; best (on val) lr {best['lr']} batch {best['batch_size']}: val {best['best_val_acc']:.4f}"
                        if best else ""))
    if s.get("progress"):
        prefix = {"running": "", "completed": "final figures:"}.get(s["state"], f"last record ({s['progress'].get('updated')}):")
        if prefix:
            lines.append(prefix)
        lines += progress_text(s["progress"], s["kind"])
    if summary.get("rows_committed") is not None:
        lines.append(f"committed {summary['rows_committed']:,} rows by this run")
    if s.get("reviews"):
        lines += [f"{label:<9} {text}" for label, text in review_lines(s["reviews"])]
    if s.get("reviews_set_aside"):
        aside = s["reviews_set_aside"]
        more = f" and {len(aside) - 10:,} more" if len(aside) > 10 else ""
        lines.append(f"set aside {len(aside):,} file{'s' * (len(aside) != 1)} of reviews/ holding no decisions, in "
                     f"{s['out']}/{store.REVIEWS_DIR}/{store.QUARANTINE_DIR}: {', '.join(aside[:10])}{more}")
    if s.get("resume_command"):
        lines.append(f"to finish {s['resume_command']}")
    return "\n".join(lines)
