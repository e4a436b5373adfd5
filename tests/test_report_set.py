"""Every page keeps its own text, and every report is whole or absent (kmnist_core/page_ids.py,
reviews/report_set.py): two volumes with the same page file names, unsafe manifest ids refused before
anything is written, and `report` stopped at every write or killed at random never leaving half a set."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from batch_infer.job import PredictOptions, run_predict
from kmnist_core import storage
from kmnist_core.errors import KmnistError
from reviews import report_set
from reviews.pages_out import ALTO_NS
from reviews.report import write_report_set

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "pages"


def two_volumes(root: Path) -> Path:
    """vol1/0001.png and vol2/0001.png (the two example pages), their boxes in one manifest."""
    boxes = pd.read_csv(EXAMPLES / "boxes.csv", dtype=str)
    for vol, page in (("vol1", "page-1.png"), ("vol2", "page-2.png")):
        (root / vol).mkdir(parents=True)
        shutil.copy(EXAMPLES / page, root / vol / "0001.png")
        boxes.loc[boxes["path"] == page, "path"] = f"{vol}/0001.png"
    boxes.to_csv(root / "boxes.csv", index=False)
    return root / "boxes.csv"


def alto_strings(path: Path) -> str:
    root = ET.parse(path).getroot()
    return "".join(s.get("CONTENT") for s in root.iter(f"{{{ALTO_NS}}}String"))


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("volumes")
    manifest = two_volumes(root)
    out = root / "out"
    run_predict([], out, PredictOptions(manifest=str(manifest), export=("alto",), executor="local"))
    return root, out


def test_two_volumes_with_the_same_page_names_keep_their_own_text(volumes):
    root, out = volumes
    pages = pd.read_parquet(out / "pages.parquet").set_index("page_id")
    assert sorted(pages.index) == ["vol1/0001", "vol2/0001"]
    assert pages.loc["vol1/0001", "page"] == str(root / "vol1" / "0001.png")
    assert pages.loc["vol1/0001", "text"] != pages.loc["vol2/0001", "text"]
    for page_id in pages.index:  # one ALTO file per page, holding that page's own strings
        assert alto_strings(out / "alto" / f"{page_id}.xml") == pages.loc[page_id, "text"]
    with open(out / "pages_kaggle.csv", newline="", encoding="utf-8") as f:
        kaggle = list(csv.DictReader(f))
    assert [r["image_id"] for r in kaggle] == ["vol1/0001", "vol2/0001"]  # one row per page
    assert sorted((out / "summary" / "pages").rglob("*.png")) == [
        out / "summary" / "pages" / v / "0001.png" for v in ("vol1", "vol2")]

    # `report` rebuilds the same set (ALTO included: the run exported it) as a new generation.
    first = report_set.current_record(storage.resolve(out))
    alto = {p: p.read_bytes() for p in (out / "alto").rglob("*.xml")}
    write_report_set(str(out))
    again = report_set.current_record(storage.resolve(out))
    assert again["generation"] != first["generation"] and again["export"] == ["alto"]
    assert {p: p.read_bytes() for p in (out / "alto").rglob("*.xml")} == alto
    assert set(again["files"]) == set(first["files"])


@pytest.mark.parametrize("image_id", ["../../../tmp/x", "a/b", "page\x1b[31m", "", "..", "a\u202eb"])
def test_an_unsafe_manifest_id_is_refused_before_anything_is_written(tmp_path, image_id):
    shutil.copy(EXAMPLES / "page-1.png", tmp_path / "page-1.png")
    buf = io.StringIO()
    csv.writer(buf).writerows([["image_id", "labels", "path", "x", "y", "width", "height"],
                               [image_id, "x", "page-1.png", 10, 10, 40, 40]])
    (tmp_path / "m.csv").write_text(buf.getvalue(), encoding="utf-8")
    with pytest.raises(KmnistError, match="cannot name a file"):
        run_predict([], tmp_path / "out", PredictOptions(manifest=str(tmp_path / "m.csv"), executor="local"))
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "page-1.png"]


def test_a_kaggle_id_that_climbs_out_of_out_is_refused(tmp_path):
    shutil.copy(EXAMPLES / "page-1.png", tmp_path / "page-1.png")
    (tmp_path / "k.csv").write_text("image_id,labels\n../../../tmp/x,U+3059 10 10 40 40\n", encoding="utf-8")
    with pytest.raises(KmnistError, match="cannot name a file"):
        run_predict([], tmp_path / "out", PredictOptions(manifest=str(tmp_path / "k.csv"), executor="local"))
    assert not (tmp_path / "out").exists()


def test_pages_whose_names_collide_are_refused_naming_both(tmp_path):
    for name in ("Page.png", "page.jpg"):  # one name on a case-insensitive disk
        shutil.copy(EXAMPLES / "page-1.png", tmp_path / name)
    (tmp_path / "m.csv").write_text("path,x,y,width,height\nPage.png,1,1,9,9\npage.jpg,1,1,9,9\n", encoding="utf-8")
    with pytest.raises(KmnistError, match=r"pages .*Page\.png.* and .*page\.jpg.* would both be named"):
        run_predict([], tmp_path / "out", PredictOptions(manifest=str(tmp_path / "m.csv"), executor="local"))
    assert not (tmp_path / "out").exists()


def test_a_kaggle_csv_cell_with_a_comma_is_quoted(tmp_path):
    shutil.copy(EXAMPLES / "page-1.png", tmp_path / "page,1.png")
    (tmp_path / "m.csv").write_text('path,x,y,width,height\n"page,1.png",24,176,42,42\n', encoding="utf-8")
    run_predict([], tmp_path / "out", PredictOptions(manifest=str(tmp_path / "m.csv"), executor="local"))
    with open(tmp_path / "out" / "pages_kaggle.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image_id", "labels"] and rows[1][0] == "page,1" and len(rows) == 2


def test_a_kaggle_id_a_spreadsheet_would_run_is_neutralised(tmp_path):
    shutil.copy(EXAMPLES / "page-1.png", tmp_path / "=1+2.png")
    (tmp_path / "m.csv").write_text("path,x,y,width,height\n=1+2.png,24,176,42,42\n", encoding="utf-8")
    run_predict([], tmp_path / "out", PredictOptions(manifest=str(tmp_path / "m.csv"), executor="local"))
    with open(tmp_path / "out" / "pages_kaggle.csv", newline="", encoding="utf-8") as f:
        assert list(csv.reader(f))[1][0] == "'=1+2"


# ------------------------------------------------------------------------------------- whole or absent


def published(out: Path) -> dict[str, bytes]:
    """What a reader sees through OUT's published names, checked against the completion marker."""
    record = report_set.current_record(storage.resolve(out))
    assert record is not None
    seen = {}
    for rel, size in record["files"].items():
        data = (out / report_set.LINK / rel).read_bytes()
        assert len(data) == size, rel
        seen[rel] = data
    return seen


def test_report_stopped_at_any_write_leaves_the_previous_set_and_the_next_report_finishes(volumes, monkeypatch):
    _, out = volumes
    before = published(out)
    writes = {"n": 0}
    real = storage.write_bytes_atomic

    def counting(loc, data, fsync=False):
        writes["n"] += 1
        return real(loc, data, fsync)

    monkeypatch.setattr(storage, "write_bytes_atomic", counting)
    write_report_set(str(out))
    total = writes["n"]
    assert total >= 8  # final/, summary files, pages.parquet, the Kaggle CSV, two ALTO files, two overlays, the marker
    before = published(out)

    for stop_at in range(1, total + 1):
        writes["n"] = 0

        def failing(loc, data, fsync=False):
            writes["n"] += 1
            if writes["n"] == stop_at:
                raise OSError(28, "No space left on device (injected)")
            return real(loc, data, fsync)

        monkeypatch.setattr(storage, "write_bytes_atomic", failing)
        with pytest.raises(OSError, match="injected"):
            write_report_set(str(out))
        assert published(out) == before, f"stopped at write {stop_at}"
    monkeypatch.setattr(storage, "write_bytes_atomic", real)
    write_report_set(str(out))
    after = published(out)
    assert set(after) == set(before)
    # Half-built generations of the failed reports are gone: only the current and the previous set remain.
    assert len(os.listdir(out / report_set.GENERATIONS)) == 2


@pytest.mark.timeout(600)
def test_report_killed_at_random_points_never_shows_half_a_set(volumes, tmp_path):
    _, out = volumes
    env = dict(os.environ)
    cli = [str(Path(sys.executable).parent / "kmnist-batch"), "report", str(out)]
    started = time.perf_counter()
    subprocess.run(cli, env=env, check=True, capture_output=True, timeout=300)
    whole = time.perf_counter() - started
    rng = random.Random(7)
    generations = set()
    for _ in range(6):
        proc = subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, whole))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        seen = published(out)  # the old complete set or the new one
        assert {"summary/summary.json", "pages.parquet", "pages_kaggle.csv"} <= set(seen)
        assert json.loads(seen["summary/summary.json"])["files_seen"] > 0
        generations.add(report_set.current_record(storage.resolve(out))["generation"])
    done = subprocess.run(cli, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    published(out)
    assert len(os.listdir(out / report_set.GENERATIONS)) == 2


def test_duplicate_keys_are_counted_exactly_across_shards_and_buckets_and_leave_no_files():
    """The summary's duplicate check spills key hashes to bucket files (reviews/report.py DuplicateKeys):
    repeats within a shard, across shards and in every bucket are all counted, and the files go."""
    from reviews.report import DuplicateKeys

    keys = np.random.default_rng(0).integers(-2**63, 2**63 - 1, 20_000, dtype=np.int64)
    counter = DuplicateKeys()
    counter.add(keys[:12_000])
    counter.add(np.concatenate([keys[11_000:], keys[:5], keys[:5]]))  # 1,000 across shards, 5 twice more
    folder = Path(counter.folder.name)
    assert len(set((keys.view(np.uint64) >> np.uint64(64 - DuplicateKeys.BUCKET_BITS)).tolist())) == DuplicateKeys.BUCKETS
    assert counter.count() == 1_000 + 10 and not folder.exists()
