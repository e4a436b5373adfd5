"""The data side of review (issue 23): decisions as append-only data, the audit figure, importing a CSV of
labels, and `report` folding the decisions into final/, page text, the Kaggle CSV, ALTO, summary.json
and the status line; predict --resume / --overwrite keep OUT/reviews/.

Real predict runs (in-process, no Ray) over the demo crops and the demo pages; every output is read back
with pyarrow, csv or ElementTree, not through the code under test."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from scipy.stats import beta

from batch_infer.job import PredictOptions, run_predict
from kmnist_core import storage
from kmnist_core.card import read_card
from kmnist_core.errors import KmnistError
from kmnist_core.model_dir import CARD_FILE, DEFAULT_MODEL_DIR, WEIGHTS_FILE, weights_id
from reviews import stats, store
from reviews.import_csv import import_decisions
from tests.test_cli import invoke
from tests.test_int8 import bare_copy

ROOT = Path(__file__).resolve().parents[1]
ALTO = {"a": "http://www.loc.gov/standards/alto/ns-v4#"}
GETA = "〓"
CARD = read_card(DEFAULT_MODEL_DIR)
CHARS = CARD.classes.chars
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


# ------------------------------------------------------------------------------------------ helpers


def read_dir(folder: Path) -> pa.Table:
    """Every Parquet file in a folder, read with pyarrow itself."""
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))])


def predictions(out: Path) -> list[dict]:
    return read_dir(out / "predictions").to_pylist()


def review_files(out: Path) -> dict[str, str]:
    """{file name: sha256} of OUT/reviews/."""
    folder = out / "reviews"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())} if folder.exists() else {}


def write_csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def other_char(char: str) -> str:
    return next(c for c in CHARS if c != char)


def decision(key: bytes, label: str | None, reviewer: str, minutes: int, kind: str = "review", model_id: str = CARD.model_id,
             pred_char: str | None = "お", review_reason: str | None = "low_confidence") -> dict:
    return {"key": key, "path": key.decode(), "label": label, "reviewer": reviewer, "kind": kind,
            "decided_at": T0 + timedelta(minutes=minutes), "model_id": model_id, "run_id": "r1",
            "pred_char": pred_char, "confidence": 0.5, "review_reason": review_reason}


@pytest.fixture(scope="module")
def crop_run(tmp_path_factory) -> Path:
    """The 300 demo crops, a blank crop and a file that is no image, predicted in this process. The default
    model flags one of the demo crops at its own threshold: review below 0.99999 gives the several flags
    the tests decide."""
    tmp = tmp_path_factory.mktemp("crops")
    shutil.copytree(ROOT / "examples" / "crops", tmp / "crops")
    Image.new("L", (32, 32), 255).save(tmp / "crops" / "blank.png")
    (tmp / "crops" / "broken.png").write_bytes(b"not an image")
    out = tmp / "out"
    run_predict([tmp / "crops"], out, PredictOptions(executor="local", rows_per_shard=100, review_below=0.99999))
    return out


@pytest.fixture(scope="module")
def page_run(tmp_path_factory) -> Path:
    """The two demo pages (93 boxes) from their box manifest, with ALTO. The default model flags only 2 of
    them at its own threshold: review below 0.99 gives page 1 the several flags the corrections need."""
    out = tmp_path_factory.mktemp("pages") / "out"
    run_predict([], out, PredictOptions(manifest=str(ROOT / "examples" / "pages" / "boxes.csv"), executor="local",
                                        export=("alto",), review_below=0.99))
    return out


@pytest.fixture
def crops_out(crop_run, tmp_path) -> Path:
    """A copy of the crop run's OUT of this test's own."""
    return Path(shutil.copytree(crop_run, tmp_path / "out"))


@pytest.fixture
def pages_out(page_run, tmp_path) -> Path:
    return Path(shutil.copytree(page_run, tmp_path / "out"))


def truths() -> dict[str, str]:
    with open(ROOT / "examples" / "labels.csv", encoding="utf-8") as f:
        return {r["rel_path"]: r["char"] for r in csv.DictReader(f)}


# ------------------------------------------------------------------------------ store.py


def test_latest_decision_wins_history_is_kept_withdrawal_and_conflicts(tmp_path):
    out = storage.resolve(tmp_path / "out")
    a, b, c = b"/x/a.png", b"/x/b.png", b"/x/c.png"
    batches = [[decision(a, "お", "alice", 1), decision(b, "き", "alice", 1), decision(c, "す", "alice", 1)],
               [decision(a, "き", "bob", 2)],  # bob disagrees with alice on a: a conflict; bob's is the latest
               [decision(b, None, "alice", 3)],  # alice withdraws b (an undo)
               [decision(c, "つ", "alice", 4)]]  # alice changes her own mind on c: no conflict
    names = [store.append(out, store.decision_table(rows, CHARS)) for rows in batches]
    assert len(set(names)) == 4 and sorted(review_files(tmp_path / "out")) == sorted(names)
    on_disk = read_dir(tmp_path / "out" / "reviews")
    assert on_disk.num_rows == 6 and on_disk.schema.equals(store.SCHEMA)  # every decision kept, as written

    history = store.read_history(out)
    assert history.num_rows == 6 and history["decided_at"].to_pylist() == sorted(history["decided_at"].to_pylist())
    now = {r["key"]: r for r in store.latest(history).to_pylist()}
    assert set(now) == {a, c}  # b withdrawn
    assert (now[a]["label"], now[a]["reviewer"], now[c]["label"]) == ("き", "bob", "つ")
    found = stats.conflicts(history).to_pylist()
    assert [(r["key"], r["labels"], r["current"]) for r in found] == [(a, "お (alice) / き (bob)", "き")]
    assert stats.conflicts_text(stats.conflicts(history)).splitlines() == [
        "/x/a.png: お (alice) / き (bob)", "1 keys with different labels from different reviewers"]
    # alice comes round to bob's label: the conflict is gone, and the history still holds both of hers.
    store.append(out, store.decision_table([decision(a, "き", "alice", 5)], CHARS))
    history = store.read_history(out)
    assert stats.conflicts(history).num_rows == 0 and history.num_rows == 7
    assert stats.conflicts_text(stats.conflicts(history)) == "0 keys with different labels from different reviewers"
    # Only some columns: decided_at comes along, since it orders the history.
    assert store.read_history(out, ["key", "label"]).column_names == ["key", "label", "decided_at"]


def test_a_label_outside_the_card_is_refused_and_nothing_written(tmp_path):
    out = storage.resolve(tmp_path / "out")
    with pytest.raises(KmnistError, match="'x' is not one of the model's characters"):  # the batch, not half of it
        store.append(out, store.decision_table([decision(b"/a.png", "お", "alice", 1),
                                                        decision(b"/b.png", "x", "alice", 1)], CHARS))
    with pytest.raises(KmnistError, match="kind must be"):
        store.append(out, store.decision_table([decision(b"/a.png", "お", "alice", 1, kind="guess")], CHARS))
    assert review_files(tmp_path / "out") == {}
    assert store.decision_table([decision(b"/a.png", store.NOT_A_CHARACTER, "a", 1),
                                     decision(b"/b.png", store.UNREADABLE, "a", 1)], CHARS).num_rows == 2


def audits(n: int, wrong: int, wrong_label: str = "き", folder: str = "audit", **overrides) -> list[dict]:
    """n audit decisions of auto-accepted rows predicted お, `wrong` of them labelled `wrong_label`."""
    return [decision(f"/{folder}/{i}.png".encode(), wrong_label if i < wrong else "お", "auditor", 1, kind="audit",
                     review_reason=None, **overrides) for i in range(n)]


def history_of(rows: list[dict]) -> pa.Table:
    return store.decision_table(rows, CHARS)


def test_audit_summary_error_rate_interval_and_the_cards_promise():
    promise = CARD.raw["calibration"]["review_promise"]
    s = stats.audit_summary(history_of(audits(200, 3)), CARD)
    assert (s["audited"], s["wrong"], s["error_rate"]) == (200, 3, 3 / 200)
    # The two-sided 95 % Clopper-Pearson interval, as scipy's beta quantiles give it.
    assert s["interval"] == pytest.approx([beta.ppf(0.025, 3, 198), beta.ppf(0.975, 4, 197)], rel=1e-6)
    assert s["promise"]["max_error_rate"] == pytest.approx(1 - promise["target_precision"])
    assert s["promise"]["validation_precision_lower_bound"] == promise["precision_lower_bound"]
    assert s["verdict"] == "open"  # 1.5 % measured, but the interval reaches below 0.5 %
    assert stats.audit_summary(history_of(audits(1000, 0)), CARD)["verdict"] == "kept"  # upper end 0.37 %
    assert stats.audit_summary(history_of(audits(100, 5)), CARD)["verdict"] == "broken"  # lower end 1.6 %
    assert stats.audit_summary(history_of(audits(10, 0)), CARD)["interval"][0] == 0.0
    assert "error rate 1.50%" in stats.audit_text(s) and "open" not in stats.audit_text(s)


def test_audit_counts_not_a_character_and_unreadable_as_wrong_latest_per_key_and_this_model_only():
    rows = audits(10, 2, wrong_label=store.NOT_A_CHARACTER)
    rows.append({**rows[5], "label": store.UNREADABLE, "decided_at": T0 + timedelta(minutes=9)})  # replaces a right one
    rows.append({**rows[0], "label": "お", "decided_at": T0 + timedelta(minutes=9)})  # a wrong one corrected
    rows += audits(4, 4, folder="other", model_id="another-model")  # another model's rows: not this model's error rate
    rows += [decision(b"/flagged.png", "き", "a", 1, kind="audit")]  # a flagged row is no auto-accepted row
    rows += [decision(b"/reviewed.png", "き", "a", 1, review_reason=None)]  # a review, not an audit
    rows += [decision(b"/withdrawn.png", "き", "a", 1, kind="audit", review_reason=None),
             decision(b"/withdrawn.png", None, "a", 2, kind="audit", review_reason=None)]
    s = stats.audit_summary(history_of(rows), CARD)
    assert (s["audited"], s["wrong"], s["other_model"]) == (10, 2, 4)
    assert s["wrong_by"] == {"other_character": 0, "not_a_character": 1, "unreadable": 1}
    assert stats.audit_summary(history_of(audits(3, 0, model_id="another-model")), CARD) is None
    assert stats.audit_summary(store.SCHEMA.empty_table(), CARD) is None
    assert stats.audit_summary(history_of(audits(5, 1)), None)["verdict"] is None  # no card, no promise


# -------------------------------------------------------------------------------------- import


def test_import_records_decisions_exactly_as_the_ui_does(crops_out, tmp_path):
    rows = predictions(crops_out)
    truth = truths()
    flagged = [r for r in rows if r["needs_review"]]
    accepted = next(r for r in rows if not r["needs_review"])
    assert len(flagged) >= 5
    lines, expected = [], {}
    for i, r in enumerate(flagged):
        label = truth.get(r["rel_path"], store.NOT_A_CHARACTER)  # blank.png, broken.png: no character
        who = "carol" if i % 2 else ""  # the reviewer column, or else the argument
        lines.append([r["path"], label, who])
        expected[r["path_bytes"]] = (label, who or "dave")
    lines.append([accepted["path"], "U+304A", ""])  # a code point names the card's character お
    expected[accepted["path_bytes"]] = ("お", "dave")
    lines.append([flagged[0]["path"], " ", ""])  # an empty label: no decision on that line
    labels = write_csv(tmp_path / "labels.csv", ["path", "label", "reviewer", "note"],
                       [line + ["anything"] for line in lines])

    assert import_decisions(storage.resolve(crops_out), labels, "dave") == len(expected)
    assert len(review_files(crops_out)) == 1  # one batch, one file
    recorded = read_dir(crops_out / "reviews").to_pylist()
    by_key = {r["path_bytes"]: r for r in rows}
    assert {r["key"]: (r["label"], r["reviewer"]) for r in recorded} == expected
    for d in recorded:
        row = by_key[d["key"]]
        assert (d["kind"], d["source"], d["path"]) == ("review", "import:labels.csv", row["path"])
        assert [d[k] for k in ("model_id", "run_id", "pred_char", "review_reason")] == \
            [row[k] for k in ("model_id", "run_id", "pred_char", "review_reason")]
        assert d["confidence"] == pytest.approx(row["confidence"]) if row["confidence"] is not None else d["confidence"] is None

    # A TSV keyed by path_bytes in hex, with a BOM as spreadsheets write it.
    tsv = tmp_path / "more.tsv"
    tsv.write_text("\ufeffkey\tlabel\n" + f"{accepted['path_bytes'].hex()}\tき\n", encoding="utf-8")
    assert import_decisions(storage.resolve(crops_out), tsv, "erin") == 1
    latest = store.latest(store.read_history(storage.resolve(crops_out))).to_pylist()
    assert next(d for d in latest if d["key"] == accepted["path_bytes"])["label"] == "き"


def test_import_refuses_bad_lines_and_files_and_writes_nothing(crops_out, tmp_path):
    out = storage.resolve(crops_out)
    row = predictions(crops_out)[0]
    bad = write_csv(tmp_path / "bad.csv", ["path", "label"], [
        [row["path"], "お"],  # line 2: fine on its own
        ["/no/such/crop.png", "お"],  # line 3: unknown key
        [row["path"], "x"],  # line 4: not on the card
        [row["path"], "き"],  # line 5: the same key again by the same reviewer
        ["", "お"],  # line 6: no path
    ])
    with pytest.raises(KmnistError) as e:
        import_decisions(out, bad, "dave")
    message = str(e.value).splitlines()
    assert message[0] == f"{bad}: 4 of 5 lines refused, nothing imported"
    assert message[1] == f"bad.csv:3: no prediction row in {out.uri} has path '/no/such/crop.png'"
    assert message[2].startswith("bad.csv:4: label 'x' is not one of the model's 10 characters (おきすつなはまやれを)")
    assert message[3] == f"bad.csv:5: path {row['path']!r} is labelled again by dave (first on line 2)"
    assert message[4] == "bad.csv:6: no path"
    cases = [
        (write_csv(tmp_path / "nolabel.csv", ["path", "char"], [[row["path"], "お"]]), "has no label column"),
        (write_csv(tmp_path / "neither.csv", ["file", "label"], [[row["path"], "お"]]), "not neither"),
        (write_csv(tmp_path / "both.csv", ["path", "key", "label"], [[row["path"], "00", "お"]]), "not both"),
        (write_csv(tmp_path / "hex.csv", ["key", "label"], [["zz", "お"]]), "hex.csv:2: key 'zz' is not hexadecimal"),
        (write_csv(tmp_path / "unknown.tsv", ["key", "label"], [[b"/nope".hex(), "お"]], "\t"),
         f"unknown.tsv:2: no prediction row in {out.uri} has key {b'/nope'.hex()}"),
        (tmp_path / "missing.csv", "no such file"),
    ]
    (tmp_path / "latin1.csv").write_bytes("path,label\n/é.png,お\n".encode("utf-16"))
    cases.append((tmp_path / "latin1.csv", "not UTF-8 text"))
    for path, needle in cases:
        with pytest.raises(KmnistError, match=needle):
            import_decisions(out, path, "dave")
    with pytest.raises(KmnistError, match="holds no predictions"):
        import_decisions(storage.resolve(tmp_path / "empty"), bad, "dave")
    assert review_files(crops_out) == {}


# ------------------------------------------------------------------------ report: final/, summary


def test_report_writes_final_one_row_per_prediction_row_with_every_decision(crops_out, tmp_path):
    rows = predictions(crops_out)
    flagged = [r for r in rows if r["needs_review"]]
    accepted = [r for r in rows if not r["needs_review"]]
    corrected, undecided = flagged[0], flagged[-1]
    labels = {corrected["path_bytes"]: other_char(corrected["pred_char"] or "お"),
              flagged[1]["path_bytes"]: store.NOT_A_CHARACTER, flagged[2]["path_bytes"]: store.UNREADABLE,
              accepted[1]["path_bytes"]: other_char(accepted[1]["pred_char"])}  # a review that corrects an accepted row
    by_key = {r["path_bytes"]: r for r in rows}
    write_csv(tmp_path / "l.csv", ["key", "label"], [[k.hex(), v] for k, v in labels.items()])
    import_decisions(storage.resolve(crops_out), tmp_path / "l.csv", "dave")
    audit = [decision(r["path_bytes"], r["pred_char"] if i else other_char(r["pred_char"]), "auditor", 0, kind="audit",
                      pred_char=r["pred_char"], review_reason=None) | {"decided_at": None, "path": r["path"], "run_id": r["run_id"]}
             for i, r in enumerate(accepted[2:22])]  # 20 audits, one wrong
    store.append(storage.resolve(crops_out), store.decision_table(audit, CHARS))
    labels.update({d["key"]: d["label"] for d in audit})

    result = invoke("report", crops_out)
    assert result.exit_code == 0, result.output
    assert f"final        {crops_out}/final" in result.output
    assert f"reviewed     3 of {len(flagged)} flagged rows decided, {len(flagged) - 3} left" in result.output
    assert "audit        20 auto-accepted rows checked, 1 wrong: error rate 5.00%" in result.output

    # final/: one file per predictions shard, one row per prediction row, in the shard's order.
    shards = sorted(p.name for p in (crops_out / "predictions").glob("*.parquet"))
    assert sorted(p.name for p in (crops_out / "final").glob("*.parquet")) == shards
    for name in shards:
        assert pq.read_table(crops_out / "final" / name)["path_bytes"].to_pylist() == \
            pq.read_table(crops_out / "predictions" / name)["path_bytes"].to_pylist()
    final = read_dir(crops_out / "final")
    assert final.column_names == ["path", "path_bytes", "pred_char", "review_reason", "final_char", "final_source",
                                  "review_label", "reviewer", "reviewed_at"]
    assert final.num_rows == len(rows) and len(set(final["path_bytes"].to_pylist())) == len(rows)
    for f in final.to_pylist():
        row = by_key[f["path_bytes"]]
        if f["path_bytes"] in labels:
            label = labels[f["path_bytes"]]
            assert (f["final_source"], f["review_label"]) == ("review", label)
            assert f["final_char"] == (None if label in store.SPECIAL_LABELS else label)
            assert f["reviewer"] in ("dave", "auditor") and f["reviewed_at"] is not None
        elif row["needs_review"]:
            assert (f["final_char"], f["final_source"], f["reviewer"]) == (None, None, None)
        else:
            assert (f["final_char"], f["final_source"]) == (row["pred_char"], "model")
    assert not (undecided["path_bytes"] in labels)

    summary = json.loads((crops_out / "summary" / "summary.json").read_text(encoding="utf-8"))
    reviews = summary["reviews"]
    assert reviews["decisions"] == 24 and reviews["decided_rows"] == 24 and reviews["not_in_predictions"] == 0
    reasons = {reason: sum(r["review_reason"] == reason for r in rows) for reason in summary["review_reasons"]}
    for reason, counts in reviews["by_reason"].items():
        decided = sum(1 for k in labels if by_key[k]["review_reason"] == reason)
        assert counts == {"flagged": reasons[reason], "reviewed": decided, "left": reasons[reason] - decided}
    assert reviews["auto_accepted"] == {"rows": len(accepted), "reviewed": 21}
    assert reviews["labels"] == {"not_a_character": 1, "unreadable": 1} and reviews["corrected"] == 5
    assert reviews["reviewers"] == {"dave": 4, "auditor": 20} and reviews["predicted_again"] == 0
    assert (reviews["audit"]["audited"], reviews["audit"]["wrong"]) == (20, 1)

    # A second report, after a decision is withdrawn (its row is undecided again) and one is made on a key
    # no row has (counted, not folded in).
    store.append(storage.resolve(crops_out), store.decision_table(
        [{"key": corrected["path_bytes"], "path": corrected["path"], "label": None, "reviewer": "dave"},
         {"key": b"/gone.png", "path": "/gone.png", "label": "お", "reviewer": "dave"}], CHARS))
    again = invoke("report", crops_out)
    assert again.exit_code == 0 and "decisions on keys no prediction row has: 1" in again.output
    final = {f["path_bytes"]: f for f in read_dir(crops_out / "final").to_pylist()}
    assert len(final) == len(rows) and b"/gone.png" not in final
    assert (final[corrected["path_bytes"]]["final_char"], final[corrected["path_bytes"]]["final_source"]) == (None, None)
    reviews = json.loads((crops_out / "summary" / "summary.json").read_text(encoding="utf-8"))["reviews"]
    assert (reviews["decisions"], reviews["decided_rows"], reviews["not_in_predictions"]) == (26, 23, 1)


def test_status_shows_reviewed_left_per_reason_and_the_audit(crops_out, tmp_path):
    rows = predictions(crops_out)
    low = [r for r in rows if r["review_reason"] == "low_confidence"]
    accepted = [r for r in rows if not r["needs_review"]]
    write_csv(tmp_path / "l.csv", ["path", "label"], [[r["path"], r["pred_char"]] for r in low[:2]])
    import_decisions(storage.resolve(crops_out), tmp_path / "l.csv", "dave")
    before = invoke("status", crops_out)
    assert before.exit_code == 0 and "audit" not in before.output
    store.append(storage.resolve(crops_out), store.decision_table(
        [decision(r["path_bytes"], r["pred_char"], "auditor", 1, kind="audit", pred_char=r["pred_char"], review_reason=None)
         for r in accepted[:30]], CHARS))
    result = invoke("status", crops_out)
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert f"low_confidence {len(low) - 2} left of {len(low)}" in lines["reviewed"]
    assert "30 auto-accepted rows reviewed" in lines["reviewed"] and "by 2 reviewers" in lines["reviewed"]
    assert lines["audit"].startswith("audit     30 auto-accepted rows checked, 0 wrong: error rate 0.00% (95% CI 0.00%-11.57%)")
    assert "not settled" in lines["audit"]
    state = json.loads(invoke("status", crops_out, "--json").output)
    assert state["reviews"]["by_reason"]["low_confidence"]["reviewed"] == 2 and state["reviews"]["audit"]["audited"] == 30


# ------------------------------------------------------------------------------------------- pages


def test_page_corrections_reach_text_kaggle_and_alto(pages_out, tmp_path):
    rows = [r for r in predictions(pages_out) if r["page"].endswith("page-1.png")]
    order = sorted(rows, key=lambda r: r["reading_index"])
    flagged = [r for r in order if r["needs_review"]]
    fixed, unread = flagged[0], flagged[1]
    dropped = next(r for r in order if not r["needs_review"])
    label = other_char(fixed["pred_char"])
    write_csv(tmp_path / "l.csv", ["path", "label"], [[fixed["path"], label], [dropped["path"], store.NOT_A_CHARACTER],
                                                      [unread["path"], store.UNREADABLE]])
    import_decisions(storage.resolve(pages_out), tmp_path / "l.csv", "dave")
    result = invoke("report", pages_out)
    assert result.exit_code == 0, result.output

    def reading(r: dict) -> str:
        return {fixed["path"]: label, unread["path"]: GETA}.get(r["path"], r["pred_char"] or GETA)

    kept = [r for r in order if r["path"] != dropped["path"]]  # a box that is no character leaves the text
    page = next(p for p in pq.read_table(pages_out / "pages.parquet").to_pylist() if p["page"].endswith("page-1.png"))
    assert page["text"] == "".join(reading(r) for r in kept) and len(page["text"]) == len(order) - 1
    settled = "".join(GETA if r["needs_review"] and r["path"] != fixed["path"] else reading(r) for r in kept)
    assert page["text_reviewed"] == settled
    assert (page["n_reviewed"], page["n_corrected"], page["n_left"]) == (3, 3, len(flagged) - 2)

    with open(pages_out / "pages_kaggle.csv", encoding="utf-8") as f:
        kaggle = {r["image_id"]: r["labels"].split() for r in csv.DictReader(f)}
    triples = [tuple(kaggle["page-1"][i:i + 3]) for i in range(0, len(kaggle["page-1"]), 3)]
    centre = lambda r: (str(r["box_x"] + r["box_w"] // 2), str(r["box_y"] + r["box_h"] // 2))  # noqa: E731
    assert (f"U+{ord(label):04X}", *centre(fixed)) in triples
    assert all(t[1:] != centre(dropped) and t[1:] != centre(unread) for t in triples)
    assert len(triples) == len(order) - 2

    root = ET.parse(pages_out / "alto" / "page-1.xml").getroot()
    strings = {(int(s.get("HPOS")), int(s.get("VPOS"))): s for s in root.iterfind(".//a:String", ALTO)}
    at = lambda r: strings.get((r["box_x"], r["box_y"]))  # noqa: E731
    assert (at(fixed).get("CONTENT"), at(fixed).get("CS"), at(fixed).get("WC")) == (label, "true", "1.0000")
    assert (at(unread).get("CONTENT"), at(unread).get("CS")) == (GETA, "true")
    assert at(dropped) is None and len(strings) == len(order) - 1
    untouched = [r for r in kept if r["path"] not in (fixed["path"], unread["path"])]
    assert all(at(r).get("CS") is None and at(r).get("CONTENT") == r["pred_char"] for r in untouched)

    final = [f for f in read_dir(pages_out / "final").to_pylist() if f["page"].endswith("page-1.png")]
    assert {f["path"]: f["final_char"] for f in final}[fixed["path"]] == label
    assert all(f["box_w"] and f["reading_index"] is not None for f in final)
    assert "left after 3 reviewed" in result.output


# ---------------------------------------------------------------------------- resume and overwrite


def another_model(tmp: Path) -> Path:
    """The default model with one bias nudged: other weights, so another model_id (fp32, no int8 twin)."""
    model = bare_copy(DEFAULT_MODEL_DIR, tmp / "other-model")
    state = torch.load(model / WEIGHTS_FILE, weights_only=True)
    name = next(k for k in state if k.endswith("bias"))
    state[name] = state[name] + 1e-4
    buf = io.BytesIO()
    torch.save(state, buf)
    (model / WEIGHTS_FILE).write_bytes(buf.getvalue())
    card = json.loads((model / CARD_FILE).read_text(encoding="utf-8"))
    card["model_id"] = weights_id(buf.getvalue())
    (model / CARD_FILE).write_text(json.dumps(card), encoding="utf-8")
    return model


def test_resume_and_overwrite_keep_reviews_and_count_the_rows_predicted_again(crops_out, tmp_path):
    rows = predictions(crops_out)
    flagged = [r for r in rows if r["needs_review"]][:4]
    write_csv(tmp_path / "l.csv", ["path", "label"], [[r["path"], store.UNREADABLE] for r in flagged])
    import_decisions(storage.resolve(crops_out), tmp_path / "l.csv", "dave")
    kept = review_files(crops_out)
    inputs = json.loads((crops_out / "run.json").read_text(encoding="utf-8"))["inputs"]

    resumed = run_predict(inputs, crops_out, PredictOptions(executor="local", resume=True, read_retries=0))
    assert review_files(crops_out) == kept
    assert resumed["rows_written"] == 0 and resumed["reviews"]["predicted_again"] == 0

    model = another_model(tmp_path)
    result = invoke("predict", *inputs, "--out", crops_out, "--overwrite", "--model", model, "--executor", "local",
                    "--quiet")
    assert result.exit_code == 0, result.output
    assert review_files(crops_out) == kept  # same files, same bytes
    run = json.loads((crops_out / "run.json").read_text(encoding="utf-8"))
    assert run["model_id"] == weights_id((model / WEIGHTS_FILE).read_bytes()) != flagged[0]["model_id"]
    assert run["reviews"] == {"decisions": 4, "decided_rows": 4, "predicted_again": 4, "made_on_another_model": 4}
    assert ("reviews kept 4 review decisions point at rows this run predicted again (4 made on another model's "
            "predictions)") in result.output
    # The decisions apply to the new predictions: final/ has them, and only the new run's rows.
    final = read_dir(crops_out / "final").to_pylist()
    assert len(final) == len(rows) and {f["path_bytes"] for f in final if f["review_label"]} == {r["path_bytes"] for r in flagged}
    summary = json.loads((crops_out / "summary" / "summary.json").read_text(encoding="utf-8"))
    assert summary["reviews"]["predicted_again_by_run"] == {run["run_id"]: 4}


# ------------------------------------------------------- files of no decisions, the terminal, CSV cells


@pytest.fixture
def run_copy(crop_run, tmp_path) -> Path:
    """A copy of the crop run's OUT, its report links (OUT/summary -> report/summary ...) copied as links."""
    return Path(shutil.copytree(crop_run, tmp_path / "out", symlinks=True))


def test_a_file_of_no_decisions_fails_neither_the_app_nor_report_nor_status_and_each_names_it(run_copy, capsys):
    from reviews.queue import key_hashes
    from reviews.server import Review

    out = storage.resolve(run_copy)
    low = [r for r in predictions(run_copy) if r["review_reason"] == "low_confidence"]
    decided = low[:2]
    store.append(out, store.decision_table(
        [decision(r["path_bytes"], r["pred_char"], "dave", 1) for r in decided], CHARS))
    reviews = run_copy / "reviews"

    def spoil() -> None:  # a foreign file, as a sync tool or a hand might leave one
        (reviews / "broken.parquet").write_bytes(b"not parquet")

    spoil()
    app = Review(out, "erin")  # the app's queue and ledger, without the HTTP layer
    page = app.page("low_confidence", 0, 200)
    assert page["left"] == len(low) - 2 and len(page["tiles"]) == len(low)
    shown = {t["path"]: t["decision"] for t in page["tiles"]}
    assert all(shown[r["path"]]["label"] == r["pred_char"] for r in decided)
    assert app.ledger.decision(int(key_hashes([decided[0]["path_bytes"]])[0])).reviewer == "dave"
    err = capsys.readouterr().err
    assert f"warning: {reviews}/broken.parquet holds no review decisions" in err
    assert f"moved to {reviews}/_quarantine/broken.parquet" in err

    spoil()
    result = invoke("report", run_copy)
    assert result.exit_code == 0, result.output
    assert f"{reviews}/broken.parquet holds no review decisions" in result.output
    assert f"reviewed     2 of" in result.output
    assert json.loads((run_copy / "summary" / "summary.json").read_text(encoding="utf-8"))["reviews"]["decisions"] == 2

    spoil()
    result = invoke("status", run_copy)
    assert result.exit_code == 0, result.output
    assert f"{reviews}/broken.parquet holds no review decisions" in result.output
    assert (f"set aside 3 files of reviews/ holding no decisions, in {reviews}/_quarantine: broken.parquet, "
            f"broken.parquet.1, broken.parquet.2") in result.output
    state = json.loads(invoke("status", run_copy, "--json").stdout)
    assert state["reviews_set_aside"] == ["broken.parquet", "broken.parquet.1", "broken.parquet.2"]
    assert state["reviews"]["decisions"] == 2


def test_conflicts_escape_control_characters_in_names_and_reviewers(run_copy):
    out = storage.resolve(run_copy)
    key = "/x/\x1b]0;owned\x07\x1b[2J\u202egnp.exe".encode()
    store.append(out, store.decision_table([decision(key, "お", "alice\x1b[31m", 1),
                                                    decision(key, "き", "bob", 2)], CHARS))
    result = invoke("review", run_copy, "--conflicts")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output and "\u202e" not in result.output
    assert ("/x/\\u001b]0;owned\\u0007\\u001b[2J\\u202egnp.exe: お (alice\\u001b[31m) / き (bob)"
            in result.output.splitlines())
    assert "1 keys with different labels from different reviewers" in result.output


def test_by_folder_csv_cells_do_not_run_as_formulas_and_read_back(tmp_path):
    """Folder names that a spreadsheet would run: "=cmd|' /C calc'!A0" (a name holds no "/": its top
    folder is "=cmd|' "), "-1", "@SUM(A1)"; and one it would not."""
    crops = sorted((ROOT / "examples" / "crops" / "dark-on-light").glob("*.png"))[:8]
    folders = ["=cmd|' /C calc'!A0", "-1", "@SUM(A1)", "plain"]
    for i, crop in enumerate(crops):
        target = tmp_path / "in" / folders[i % len(folders)] / crop.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(crop, target)
    run_predict([tmp_path / "in"], tmp_path / "out", PredictOptions(executor="local"))
    with open(tmp_path / "out" / "summary" / "by_folder.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["top_folder"] for r in rows) == sorted(["'=cmd|' ", "'-1", "'@SUM(A1)", "plain"])
    assert all(int(r["files"]) == 2 and 0 < float(r["mean_confidence"]) <= 1 for r in rows)  # numbers stay numbers
    assert {r["input_root"] for r in rows} == {str(tmp_path / "in")}
