"""Boxes on page scans: cutting, reading order, manifests (boxes, crops, Kaggle) and the page outputs of a
real run on composed pages of real kmnist-dev characters."""

from __future__ import annotations

import csv
import io
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batch_infer.job import PredictOptions, run_predict
from batch_infer.manifest import manifest_chunks, read_manifest
from bench.compose_pages import PAPER, compose_page
from kmnist_core import storage
from kmnist_core.errors import KmnistError
from kmnist_core.pages import decode_page, page_from_gray, prepare_box, reading_order
from kmnist_core.preprocess import DecodeError, decode_bytes
from reviews import report_set
from reviews.pages_out import ALTO_NS, GETA
from reviews.report import write_report_set

LAYOUTS = {  # columns, per column, layout options
    "plain": (8, 10, {}),
    "jitter": (8, 10, {"jitter": 0.2, "margin": 3}),
    "slant": (7, 12, {"slant": 0.08, "jitter": 0.1}),
    "slant-left": (7, 12, {"slant": -0.06, "jitter": 0.1, "margin": 2}),
    "uneven": (6, 10, {"uneven": 1.0, "jitter": 0.15, "margin": 4}),
    "all": (9, 11, {"uneven": 0.8, "jitter": 0.2, "slant": 0.05, "margin": 3}),
}


def files(folder: Path) -> list[str]:
    """Every file under `folder`, as sorted relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_a_box_cut_from_a_page_is_the_model_input_of_the_same_crop_as_a_file(kmnist_dev):
    rng = np.random.default_rng(0)
    page_pixels, boxes = compose_page(kmnist_dev.test.images, rng, 6, 8, uneven=0.6, jitter=0.15, margin=4)
    page = decode_page(png(page_pixels))
    assert page.dark_ink and np.array_equal(page.gray, page_pixels)
    for b in boxes:
        cut = prepare_box(page, b.x, b.y, b.width, b.height, 28)
        crop = decode_bytes(png(page_pixels[b.y : b.y + b.height, b.x : b.x + b.width]), 28)
        assert np.array_equal(cut.pixels, crop.pixels)
        assert cut.inverted and (cut.width, cut.height) == (b.width, b.height)
        ix, iy, iw, ih = crop.ink_box
        assert cut.ink_box == (b.x + ix, b.y + iy, iw, ih)  # in page pixels


def test_tight_boxes_whose_border_is_mostly_ink_still_read_as_dark_ink(kmnist_dev):
    """Boxes with no margin at all: where the box's border alone would call the polarity wrong, the page's
    decision holds, and the character is found (not blank, not the inverse)."""
    rng = np.random.default_rng(1)
    heavy = np.argsort([-(im > 128).mean() for im in kmnist_dev.test.images[:400]])[:48]
    page_pixels, boxes = compose_page(kmnist_dev.test.images[heavy], rng, 6, 8)
    page = page_from_gray(page_pixels)
    for b in boxes:
        cut = prepare_box(page, b.x, b.y, b.width, b.height, 28)
        assert cut.inverted and not cut.blank
        # KMNIST's own pixels are the model input of a tight 28x28 box (up to the paper/ink round trip).
        assert np.abs(cut.pixels.astype(int) - kmnist_dev.test.images[heavy][b.image]).mean() < 8


@pytest.mark.parametrize("box", [(-1, 0, 20, 20), (0, 0, 0, 10), (300, 10, 20, 20), (10, 10, 20, 10_000),
                                 (None, 1, 2, 3)])
def test_a_box_not_on_the_page_is_a_bad_box(box):
    page = page_from_gray(np.full((100, 310), 230, np.uint8))
    with pytest.raises(DecodeError) as e:
        prepare_box(page, *box, 28)
    assert e.value.kind == "bad_box"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_reading_order_of_shuffled_boxes_on_composed_pages(kmnist_dev, layout):
    columns, per_column, options = LAYOUTS[layout]
    rng = np.random.default_rng(len(layout))
    right = total = 0
    for p in range(10):
        _, boxes = compose_page(kmnist_dev.test.images, rng, columns, per_column, start=p * 100, **options)
        order = rng.permutation(len(boxes))
        xywh = np.array([(boxes[i].x, boxes[i].y, boxes[i].width, boxes[i].height) for i in order])
        index, column = reading_order(*xywh.T)
        right += int((index == [boxes[i].position for i in order]).sum())
        total += len(boxes)
        assert list(column) == [boxes[i].column for i in order]
    assert right / total >= 0.99


def write_pages(tmp: Path, images: np.ndarray, pages: int, rng, **options) -> list[dict]:
    """Composed pages in tmp/pages/ and their box rows (true labels, true reading position)."""
    (tmp / "pages").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(pages):
        page, boxes = compose_page(images, rng, 8, 10, start=p * 80, **options)
        Image.fromarray(page).save(tmp / "pages" / f"p{p:02d}.png")
        rows += [{"path": f"pages/p{p:02d}.png", "x": b.x, "y": b.y, "width": b.width, "height": b.height,
                  "box_id": f"{p:02d}-{b.position:04d}", "volume": f"vol-{p % 2}", "image": b.image,
                  "position": b.position} for b in boxes]
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_manifest_checks_and_pass_through(tmp_path, kmnist_dev):
    rng = np.random.default_rng(2)
    rows = write_pages(tmp_path, kmnist_dev.test.images, 1, rng)
    rows[0]["box_id"] = "00042"  # a CSV's text stays text: leading zeros kept
    write_csv(tmp_path / "m.csv", rows)
    m = read_manifest(str(tmp_path / "m.csv"))
    assert m.boxes and m.passthrough == ["box_id", "volume", "image", "position"]
    assert "00042" in m.rows.column("box_id").to_pylist()
    assert set(m.rows.column("page").to_pylist()) == {str(tmp_path / "pages" / "p00.png")}
    assert m.rows.column("path").to_pylist()[0].startswith(str(tmp_path / "pages" / "p00.png") + "#xywh=")
    # Parquet keeps its types.
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    assert read_manifest(str(tmp_path / "m.parquet")).rows.schema.field("image").type == pa.int64()
    for change, message in [({"confidence": 1}, "'confidence' is also an output column"),
                            ({"reading_index": 1}, "'reading_index' is also an output column")]:
        write_csv(tmp_path / "bad.csv", [{**r, **change} for r in rows])
        with pytest.raises(KmnistError, match=message):
            read_manifest(str(tmp_path / "bad.csv"))
    write_csv(tmp_path / "bad.csv", [{k: v for k, v in r.items() if k != "height"} for r in rows])
    with pytest.raises(KmnistError, match="missing height"):
        read_manifest(str(tmp_path / "bad.csv"))
    write_csv(tmp_path / "bad.csv", rows + rows[:1])
    with pytest.raises(KmnistError, match="lists 1 rows twice"):
        read_manifest(str(tmp_path / "bad.csv"))
    write_csv(tmp_path / "bad.csv", [{k: v for k, v in r.items() if k != "path"} for r in rows])
    with pytest.raises(KmnistError, match="no 'path' column"):
        read_manifest(str(tmp_path / "bad.csv"))
    write_csv(tmp_path / "bad.csv", [{**rows[0], "path": " "}, *rows[1:]])
    with pytest.raises(KmnistError, match="a row with an empty path"):
        read_manifest(str(tmp_path / "bad.csv"))
    # Relative paths resolve against the manifest's folder, local or on an object store.
    assert storage.resolve_against(["a/b.png", "/x/../y.png"], str(tmp_path)) == [str(tmp_path / "a" / "b.png"), "/y.png"]
    assert storage.resolve_against(["a/b.png"], "s3://bucket/dir/") == ["s3://bucket/dir/a/b.png"]


def test_chunks_never_split_a_page(tmp_path, kmnist_dev):
    rows = write_pages(tmp_path, kmnist_dev.test.images, 9, np.random.default_rng(3))
    write_csv(tmp_path / "m.csv", rows)
    m = read_manifest(str(tmp_path / "m.csv"))
    chunks = list(manifest_chunks(m, 100))
    assert len(chunks) > 1 and sum(c.rows.num_rows for c in chunks) == len(rows)
    pages = [set(c.rows.column("page").to_pylist()) for c in chunks]
    assert all(not (a & b) for i, a in enumerate(pages) for b in pages[i + 1 :])
    assert [c.id for c in manifest_chunks(m, 100)] == [c.id for c in chunks]  # deterministic


def test_kaggle_manifest(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("L", (200, 100), 230).save(tmp_path / "imgs" / "book_001.jpg")
    Image.new("L", (200, 100), 230).save(tmp_path / "imgs" / "book_002.png")
    (tmp_path / "train.csv").write_text("image_id,labels\n"
                                        "book_001,U+304A 10 20 30 40 U+3057 50 20 30 40\n"
                                        "book_002,U+3064 1 2 3 4\n"
                                        "book_003,U+306F 5 5 5 5\n"
                                        "book_004,\n", encoding="utf-8")
    m = read_manifest(str(tmp_path / "train.csv"), pages_dir=str(tmp_path / "imgs"))
    rows = m.rows.to_pylist()
    assert m.boxes and m.passthrough == ["image_id", "truth"]
    assert [(r["image_id"], r["truth"], r["box_x"], r["box_w"]) for r in rows] == [
        ("book_001", "お", 10, 30), ("book_001", "し", 50, 30), ("book_002", "つ", 1, 3), ("book_003", "は", 5, 5)]
    assert rows[2]["page"].endswith("imgs/book_002.png")
    assert rows[3]["page"].endswith("imgs/book_003.jpg")  # no such page: its boxes become error rows
    (tmp_path / "bad.csv").write_text("image_id,labels\nbook_001,U+304A 10 20 30\n", encoding="utf-8")
    with pytest.raises(KmnistError, match="not groups of"):
        read_manifest(str(tmp_path / "bad.csv"))


@pytest.fixture(scope="module")
def page_run(tmp_path_factory, kmnist_dev, ray_session):
    """A real Ray run over 10 composed pages (800 real test characters) from a shuffled manifest with id
    columns, plus a box off its page and a page that does not exist."""
    tmp = tmp_path_factory.mktemp("pages")
    rng = np.random.default_rng(14)
    rows = write_pages(tmp, kmnist_dev.test.images, 10, rng, uneven=0.6, jitter=0.15, slant=0.04, margin=3)
    chars = kmnist_dev.classes.chars
    for r in rows:
        r["truth"] = chars[int(kmnist_dev.test.labels[r["image"]])]
    extra = [{**rows[0], "x": -5, "box_id": "off-page", "position": -1},
             {**rows[0], "path": "pages/missing.png", "box_id": "no-page", "position": -1}]
    shuffled = [rows[i] for i in rng.permutation(len(rows))] + extra
    write_csv(tmp / "boxes.csv", shuffled)
    out = tmp / "out"
    summary = run_predict([], out, PredictOptions(manifest=str(tmp / "boxes.csv"), export=("alto",), batch_size=256,
                                                  rows_per_shard=200, workers=1, executor="ray"))
    return tmp, out, rows, summary


@pytest.mark.timeout(300)
def test_page_run_rows(page_run, kmnist_dev):
    from kmnist_core.model_dir import load_model

    tmp, out, rows, summary = page_run
    table = pd.read_parquet(out / "predictions")
    assert len(table) == len(rows) + 2 and table["path_bytes"].is_unique
    assert summary["executor"] == "ray" and summary["chunks_committed"] > 1
    bad = table.set_index("box_id").loc[["off-page", "no-page"]]
    assert list(bad["error_kind"]) == ["bad_box", "unreadable"] and list(bad["review_reason"]) == ["error"] * 2
    good = table[table["error"].isna()].set_index("box_id")
    by_id = {r["box_id"]: r for r in rows}
    assert len(good) == len(rows)
    for column in ("volume", "image", "position", "truth"):  # passed through unchanged (CSV text)
        assert [str(by_id[i][column]) for i in good.index] == list(good[column])
    assert list(good["reading_index"]) == [by_id[i]["position"] for i in good.index]
    assert bad.loc["off-page", "reading_index"] == -1
    # Accuracy of the boxes against the same characters as tight 28x28 crops, same model.
    images = np.stack([kmnist_dev.test.images[by_id[i]["image"]] for i in good.index])
    tight = load_model("default").assess(images).probabilities.argmax(1)
    labels = np.array([kmnist_dev.test.labels[by_id[i]["image"]] for i in good.index])
    box_acc = (good["pred_index"].to_numpy() == labels).mean()
    assert abs(box_acc - (tight == labels).mean()) <= 0.005, (box_acc, (tight == labels).mean())


@pytest.mark.timeout(300)
def test_page_run_pages_text_kaggle_alto_and_overlays(page_run, kmnist_dev):
    tmp, out, rows, summary = page_run
    pages = pd.read_parquet(out / "pages.parquet").set_index("page")
    boxes = pd.read_parquet(out / "predictions")
    assert len(pages) == 11  # ten composed pages and the missing one
    for p in range(10):
        name = str(tmp / "pages" / f"p{p:02d}.png")
        page = pages.loc[name]
        mine = sorted((r for r in rows if r["path"] == f"pages/p{p:02d}.png"), key=lambda r: r["position"])
        predicted = boxes[(boxes["page"] == name) & boxes["error"].isna()].set_index("box_id")
        expected = "".join(predicted.loc[r["box_id"], "pred_char"] for r in mine)
        assert page["text"] == expected
        assert page["n_boxes"] == len(mine) + (p == 0)  # the off-page box is on p00
        assert page["n_columns"] == 8  # write_pages composes 8 columns of 10
        assert page["n_auto_accepted"] + page["n_review"] == page["n_boxes"]
        # Every box needing review is 〓 in text_reviewed (the off-page box has no place in the text).
        assert len(page["text_reviewed"]) == len(page["text"]) and page["text_reviewed"].count(GETA) == page["n_review"] - (p == 0)
        assert page["volume"] == f"vol-{p % 2}"  # constant within the page: a page-level column
        assert 0.9 <= page["accuracy"] <= 1
    assert "box_id" not in pages.columns  # differs within a page: not page-level
    assert summary["report"]["pages"]["accuracy"]["boxes_with_truth"] == len(rows) + 2

    # Kaggle: p00's boxes in reading order, each as its predicted codepoint and the centre of its true box.
    p00 = sorted((r for r in rows if r["path"] == "pages/p00.png"), key=lambda r: r["position"])
    by_id = boxes.set_index("box_id")
    kaggle = pd.read_csv(out / "pages_kaggle.csv", dtype=str).set_index("image_id")
    assert kaggle.index.is_unique and list(kaggle.index) == sorted(pages["page_id"])
    labels = kaggle.loc["pages/p00", "labels"].split()
    centres = [(str(r["x"] + r["width"] // 2), str(r["y"] + r["height"] // 2)) for r in p00]
    assert [tuple(labels[i : i + 3]) for i in range(0, len(labels), 3)] == [
        (by_id.loc[r["box_id"], "pred_codepoint"], *c) for r, c in zip(p00, centres)]
    # Named by page id: the page's path relative to the manifest's folder, without the extension.
    assert files(out / "summary" / "pages") == [f"pages/p{p:02d}.png" for p in range(10)]  # the missing page has none
    with Image.open(out / "summary" / "pages" / "pages" / "p00.png") as img:
        assert img.mode == "RGB" and max(img.size) >= 1000
    # ALTO parses back: one TextLine per column, right to left, one String per box in reading order, at
    # the box's true place on the page.
    root = ET.parse(out / "alto" / "pages" / "p00.xml").getroot()
    ns = {"a": ALTO_NS}
    assert root.tag == f"{{{ALTO_NS}}}alto" and root.find("a:Description/a:MeasurementUnit", ns).text == "pixel"
    page_el = root.find("a:Layout/a:Page", ns)
    with Image.open(tmp / "pages" / "p00.png") as img:
        assert (int(page_el.get("WIDTH")), int(page_el.get("HEIGHT"))) == img.size
    lines = page_el.findall("a:PrintSpace/a:TextBlock/a:TextLine", ns)
    assert len(lines) == 8 and [int(l.get("HPOS")) for l in lines] == sorted((int(l.get("HPOS")) for l in lines), reverse=True)
    strings = [s for line in lines for s in line.findall("a:String", ns)]
    assert [(s.get("CONTENT"), *(int(s.get(k)) for k in ("HPOS", "VPOS", "WIDTH", "HEIGHT"))) for s in strings] == [
        (by_id.loc[r["box_id"], "pred_char"], r["x"], r["y"], r["width"], r["height"]) for r in p00]
    wc = [by_id.loc[r["box_id"], "confidence"] for r in p00]
    assert [float(s.get("WC")) for s in strings] == pytest.approx(wc, abs=1e-4)


@pytest.mark.timeout(300)
def test_page_run_resumes_to_the_same_rows(page_run):
    tmp, out, rows, _ = page_run
    before = pd.read_parquet(out / "predictions").sort_values("path").reset_index(drop=True)
    alto = {name: (out / "alto" / name).read_bytes() for name in files(out / "alto")}
    report_set.withdraw(storage.resolve(out))  # so only the resumed run can have written what is there next
    assert not (out / "alto").exists()
    again = run_predict([], out, PredictOptions(manifest=str(tmp / "boxes.csv"), resume=True, read_retries=0, workers=1,
                                                executor="ray"))
    assert again["rows_written"] == 0 and again["already_done"] == len(rows) + 2 - again["error_rows_reread"]
    after = pd.read_parquet(out / "predictions").sort_values("path").reset_index(drop=True)
    pd.testing.assert_frame_equal(before.drop(columns=["run_id"]), after.drop(columns=["run_id"]))
    # The resumed run, not asked for --export, exports what the first run asked for, from the same rows.
    assert {name: (out / "alto" / name).read_bytes() for name in files(out / "alto")} == alto


@pytest.mark.timeout(300)
def test_kaggle_manifest_and_pages_on_an_object_store(s3_server, tmp_path, monkeypatch):
    """The example pages and their Kaggle CSV in a bucket, OUT in the same bucket, through the CLI's predict."""
    import pyarrow.fs as pafs

    from tests.object_store import client, new_bucket, put_objects, report_root
    from tests.test_cli import invoke

    fs = client(s3_server)
    bucket = new_bucket(s3_server)
    examples = Path(__file__).resolve().parents[1] / "examples" / "pages"
    put_objects(s3_server, [(f"{bucket}/in/{name}", (examples / name).read_bytes())
                            for name in ("kaggle.csv", "page-1.png", "page-2.png")])
    for key, value in s3_server.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    r = invoke("predict", "--manifest", f"s3://{bucket}/in/kaggle.csv", "--export", "alto",
               "--out", f"s3://{bucket}/out", "--executor", "local")
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.stdout and list(tmp_path.iterdir()) == []  # nothing written locally
    report = report_root(fs, f"{bucket}/out")
    assert f"s3://{report}/pages.parquet" in r.stdout  # the printed paths name the published generation
    pages = pq.read_table(f"{report}/pages.parquet", filesystem=fs).to_pandas()
    assert sorted(pages["page"]) == [f"s3://{bucket}/in/page-1.png", f"s3://{bucket}/in/page-2.png"]
    assert list(pages["n_boxes"]) == [48, 45] and pages["accuracy"].min() > 0.9
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(report, recursive=True))}
    assert {"page-1.xml", "page-2.xml", "page-1.png", "page-2.png", "pages_kaggle.csv", "pages.json"} <= names


def blank_and_bad_boxes(tmp: Path, images: np.ndarray, rng) -> list[dict]:
    """Two pages of 3 columns x 4 real characters, each with a fourth (leftmost, last) column holding a box on
    blank paper and, below it, a box running past the page's bottom edge; in tmp/pages/."""
    (tmp / "pages").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(2):
        page, boxes = compose_page(images, rng, 3, 4, start=p * 12)
        page = np.pad(page, ((0, 0), (60, 0)), constant_values=PAPER)  # paper for a fourth column
        Image.fromarray(page).save(tmp / "pages" / f"q{p}.png")
        xywh = [(b.x + 60, b.y, b.width, b.height, b.image) for b in boxes]
        xywh += [(16, boxes[0].y, 28, 28, -1), (16, page.shape[0] - 14, 28, 28, -1)]  # blank, then off the edge
        rows += [{"path": f"pages/q{p}.png", "x": x, "y": y, "width": w, "height": h, "box_id": f"{p:03d}{i:03d}",
                  "image": image} for i, (x, y, w, h, image) in enumerate(xywh)]
    return rows


def write_tsv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def test_tsv_manifest_blank_boxes_a_resorted_resume_and_the_overlay_cap(tmp_path, kmnist_dev, monkeypatch):
    """A TSV manifest; a run cut off after its first page, resumed with the manifest re-sorted: each box one
    row, the first page's rows kept. 〓 stands in the text for a blank box and for a box off its page's
    edge; n_columns counts the columns. Overlays are capped (README: up to 20 pages, most review first)."""
    from reviews import pages_out

    rows = blank_and_bad_boxes(tmp_path, kmnist_dev.test.images, np.random.default_rng(5))
    manifest = tmp_path / "boxes.tsv"
    write_tsv(manifest, rows)
    out = tmp_path / "out"

    def cut_off(stats: dict) -> None:  # an end the user sees as one line (a full disk, a lost cluster)
        raise KmnistError("cut off after the first page")

    opts = dict(manifest=str(manifest), executor="local", rows_per_shard=10)
    with pytest.raises(KmnistError, match="cut off after the first page"):
        run_predict([], out, PredictOptions(**opts, export=("alto",)), on_chunk=cut_off)
    first = pd.read_parquet(out / "predictions")
    assert len(first) == 14 and first["page"].nunique() == 1  # one page of two committed

    write_tsv(manifest, rows[::-1])  # the same boxes, re-sorted
    again = run_predict([], out, PredictOptions(**opts, resume=True))
    assert (again["already_done"], again["rows_written"], again["error_rows_reread"]) == (14, 14, 0)
    table = pd.read_parquet(out / "predictions")
    assert len(table) == 28 and table["path_bytes"].is_unique
    assert sorted(table["box_id"]) == sorted(r["box_id"] for r in rows)  # TSV text kept: "000001", not 1
    assert (table["run_id"] == first["run_id"].iloc[0]).sum() == 14  # the first page was not predicted again
    by_id = table.set_index("box_id")

    pages = pd.read_parquet(out / "pages.parquet").set_index("page")
    for p in range(2):
        mine = [r for r in rows if r["path"] == f"pages/q{p}.png"]
        page = pages.loc[str(tmp_path / "pages" / f"q{p}.png")]
        blank, off_edge = by_id.loc[mine[12]["box_id"]], by_id.loc[mine[13]["box_id"]]
        assert blank["review_reason"] == "blank" and pd.isna(blank["error"])
        assert off_edge["error_kind"] == "bad_box" and off_edge["reading_index"] == 13
        assert page["text"] == "".join(by_id.loc[r["box_id"], "pred_char"] for r in mine[:12]) + GETA * 2
        assert page["text_reviewed"].endswith(GETA * 2) and page["n_columns"] == 4 and page["n_boxes"] == 14
    assert files(out / "alto") == ["pages/q0.xml", "pages/q1.xml"]  # resume kept --export alto

    assert pages_out.OVERLAY_PAGES == 20
    monkeypatch.setattr(pages_out, "OVERLAY_PAGES", 1)
    summary = write_report_set(str(out))["pages"]
    most = pages.reset_index().sort_values(["n_review", "page"], ascending=[False, True])["page"].iloc[0]
    assert files(out / "summary" / "pages") == [f"pages/{Path(most).name}"] and summary["overlays"] == 1


def test_a_manifest_of_crop_files_passes_its_columns_through(tmp_path, kmnist_dev):
    (tmp_path / "crops").mkdir()
    rows = []
    for i in range(30):
        Image.fromarray(255 - kmnist_dev.test.images[i]).save(tmp_path / "crops" / f"c{i}.png")
        rows.append({"path": f"crops/c{i}.png", "item": f"{i:05d}", "label": kmnist_dev.classes.chars[kmnist_dev.test.labels[i]]})
    rows.append({"path": "crops/gone.png", "item": "00099", "label": "?"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "crops.parquet")
    out = tmp_path / "out"
    with pytest.raises(KmnistError, match="not boxes on pages"):
        run_predict([], out, PredictOptions(manifest=str(tmp_path / "crops.parquet"), export=("alto",)))
    with pytest.raises(KmnistError, match="nothing to predict"):
        run_predict([], out, PredictOptions())
    with pytest.raises(KmnistError, match="needs a --manifest"):
        run_predict([tmp_path / "crops"], out, PredictOptions(export=("alto",)))
    examples = Path(__file__).resolve().parents[1] / "examples" / "pages" / "boxes.csv"
    run_predict([], out, PredictOptions(manifest=str(examples), executor="local", export=("alto",)))
    assert (out / "pages.parquet").exists() and (out / "alto" / "page-1.xml").exists()
    # --overwrite with crops: the earlier run's page files go with its rows.
    summary = run_predict([], out, PredictOptions(manifest=str(tmp_path / "crops.parquet"), executor="local",
                                                  overwrite=True))
    assert not (out / "alto").exists() and not (out / "pages_kaggle.csv").exists()
    table = pd.read_parquet(out / "predictions").set_index("item")
    assert len(table) == 31 and "page" not in table.columns and not (out / "pages.parquet").exists()
    assert table.loc["00099", "error_kind"] == "unreadable"
    assert table.loc["00003", "path"] == str(tmp_path / "crops" / "c3.png")
    ok = table[table["error"].isna()]
    assert (ok["pred_char"] == ok["label"]).mean() >= 0.9 and summary["rows_written"] == 31


def test_reading_order_of_degenerate_pages():
    assert [a.tolist() for a in reading_order([], [], [], [])] == [[], []]
    assert [a.tolist() for a in reading_order([5], [5], [10], [10])] == [[0], [0]]
    # One column, boxes given bottom first; then two columns of unequal length.
    index, column = reading_order([0, 2, 1], [60, 30, 0], [20, 20, 20], [20, 20, 20])
    assert index.tolist() == [2, 1, 0] and column.tolist() == [0, 0, 0]
    index, column = reading_order([0, 100, 0, 100, 100], [0, 0, 30, 30, 60], [20] * 5, [20] * 5)
    assert index.tolist() == [3, 0, 4, 1, 2] and column.tolist() == [1, 0, 1, 0, 0]


@pytest.mark.timeout(300)
def test_report_rebuilds_the_page_outputs(page_run):
    from typer.testing import CliRunner

    from jobs.cli import app

    tmp, out, rows, _ = page_run
    (out / "pages.parquet").unlink()
    before = files(out / "alto")
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert "review first" in result.output and "accuracy" in result.output
    assert len(pd.read_parquet(out / "pages.parquet")) == 11
    assert files(out / "alto") == before  # ALTO rebuilt: the run exported it
