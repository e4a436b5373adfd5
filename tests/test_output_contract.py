"""The output as docs/predict.md's "Output schema (version 4)" promises it to downstream pipelines: every column,
in order, with its type; page columns before the manifest's pass-through columns; prediction fields null
exactly on error and blank rows; each shard's `kmnist_batch.*` footer; `predictions/_run-<run_id>.json`
and `run.json`. Read back with pyarrow in a process that never imports Ray (Ray's extension types
would otherwise be registered and hide a column that needs them)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batch_infer.discover import order_key
from batch_infer.job import PredictOptions, run_predict
from bench.compose_pages import compose_page

# docs/predict.md's table, row by row (the contract: a change here is a new schema version).
README_COLUMNS = [
    ("path", pa.string()), ("path_bytes", pa.binary()), ("rel_path", pa.string()), ("input_root", pa.string()),
    ("sha256", pa.string()), ("size_bytes", pa.int64()), ("width", pa.int32()), ("height", pa.int32()),
    ("inverted", pa.bool_()),
    ("ink_x", pa.int32()), ("ink_y", pa.int32()), ("ink_w", pa.int32()), ("ink_h", pa.int32()),
    ("pred_index", pa.int32()), ("pred_char", pa.string()), ("pred_codepoint", pa.string()),
    ("confidence", pa.float32()), ("topk_indices", pa.list_(pa.int32())), ("topk_chars", pa.list_(pa.string())),
    ("topk_confidences", pa.list_(pa.float32())), ("margin", pa.float32()), ("ood_score", pa.float32()),
    ("needs_review", pa.bool_()), ("review_reason", pa.string()), ("error", pa.string()), ("error_kind", pa.string()),
    ("model_id", pa.string()), ("precision", pa.string()), ("run_id", pa.string()), ("node_id", pa.string()),
]
README_PAGE_COLUMNS = [("page", pa.string()), ("box_x", pa.int32()), ("box_y", pa.int32()), ("box_w", pa.int32()),
                       ("box_h", pa.int32()), ("reading_index", pa.int32()), ("column_index", pa.int32())]
PREDICTION_FIELDS = ["ink_x", "ink_y", "ink_w", "ink_h", "pred_index", "pred_char", "pred_codepoint", "confidence",
                     "topk_indices", "topk_chars", "topk_confidences", "margin", "ood_score"]

READER = textwrap.dedent("""
    import json, sys
    import pyarrow as pa, pyarrow.dataset as ds, pyarrow.parquet as pq
    from pathlib import Path
    kind = lambda t: f"list<{t.value_type}>" if pa.types.is_list(t) else str(t)  # a list's item name is no contract
    result = []
    for folder in sys.argv[1:]:
        shards = []
        for f in sorted(Path(folder).glob("*.parquet")):
            t = pq.read_table(f)
            shards.append({"name": f.name, "columns": [[x.name, kind(x.type)] for x in t.schema],
                           "metadata": {k.decode(): v.decode() for k, v in (t.schema.metadata or {}).items()},
                           "keys": [k.hex() for k in t.column("path_bytes").to_pylist()],
                           "error_kinds": t.column("error_kind").to_pylist()})
        rows = pq.read_table(folder).num_rows, ds.dataset(folder, format="parquet").to_table().num_rows
        result.append({"shards": shards, "rows": rows})
    print(json.dumps({"folders": result, "ray_imported": "ray" in sys.modules}))
""")


def read_without_ray(*folders: Path) -> list[dict]:
    """Each folder's shards as plain pyarrow sees them, from a fresh interpreter that imports no Ray."""
    r = subprocess.run([sys.executable, "-c", READER, *map(str, folders)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["ray_imported"] is False
    return result["folders"]


def as_text(columns: list[tuple[str, pa.DataType]]) -> list[list[str]]:
    return [[name, f"list<{kind.value_type}>" if pa.types.is_list(kind) else str(kind)] for name, kind in columns]


@pytest.fixture(scope="module")
def crop_out(tmp_path_factory, kmnist_dev) -> Path:
    """A small crop run (several shards): light and dark crops, a blank one, an empty and a fake image."""
    root = tmp_path_factory.mktemp("contract")
    scans = root / "scans"
    (scans / "a").mkdir(parents=True)
    (scans / "b").mkdir()
    for i, img in enumerate(kmnist_dev.test.images[:8]):
        Image.fromarray(img if i % 2 else 255 - img).save(scans / "ab"[i % 2] / f"{i}.png")
    Image.fromarray(np.full((40, 30), 225, np.uint8)).save(scans / "b" / "blank.png")
    (scans / "b" / "empty.png").write_bytes(b"")
    (scans / "a" / "fake.png").write_bytes(b"not an image")
    out = root / "out"
    run_predict([scans], out, PredictOptions(executor="local", rows_per_shard=4))
    return out


@pytest.fixture(scope="module")
def crop_shards(crop_out) -> dict:
    (folder,) = read_without_ray(crop_out / "predictions")
    return folder


def test_columns_their_order_and_types_are_the_readme_schema(crop_shards):
    assert len(crop_shards["shards"]) > 1 and crop_shards["rows"] == [11, 11]  # pq.read_table and pyarrow.dataset
    for shard in crop_shards["shards"]:
        assert shard["columns"] == as_text(README_COLUMNS), shard["name"]


def test_every_shard_carries_its_footer(crop_out, crop_shards):
    run = json.loads((crop_out / "run.json").read_text(encoding="utf-8"))
    for shard in crop_shards["shards"]:
        meta = shard["metadata"]
        assert meta["kmnist_batch.schema_version"] == "4"
        record = json.loads(meta["kmnist_batch.run"])
        assert record["run_id"] == run["run_id"] and record["options"]["rows_per_shard"] == 4
        assert record["inputs"] == run["inputs"] and record["review_below"] == run["review_below"]
        card = json.loads(meta["kmnist_batch.model_card"])
        assert card["model_id"] == run["model_id"] and len(card["classes"]) == 10
        chunk = json.loads(meta["kmnist_batch.chunk"])
        keys = sorted((bytes.fromhex(k) for k in shard["keys"]), key=order_key)
        assert shard["name"] == f"chunk-{chunk['id']}.parquet" and chunk["rows"] == len(keys)
        assert (bytes.fromhex(chunk["first"]), bytes.fromhex(chunk["last"])) == (keys[0], keys[-1])
        kinds = [k for k in shard["error_kinds"] if k is not None]
        assert chunk["errors"] == {k: kinds.count(k) for k in set(kinds)}


def test_a_runs_footers_are_held_once_when_read_back(crop_out):
    """A 10,000,000-crop output has ~2,600 shards, each with the same ~14 KB card and run record: reading
    its footers (a report, a resume) keeps one copy of each, and each shard's chunk record its own."""
    from kmnist_core import storage
    from kmnist_core.predictions import footers
    from kmnist_core.schema import FOOTER_CHUNK, FOOTER_MODEL_CARD, FOOTER_RUN

    metas = list(footers(storage.resolve(crop_out)).values())
    assert len(metas) > 1
    for key in (FOOTER_MODEL_CARD, FOOTER_RUN):
        assert all(m[key] is metas[0][key] for m in metas)
    assert len({m[FOOTER_CHUNK] for m in metas}) == len(metas)


def test_run_record_and_run_json(crop_out):
    run = json.loads((crop_out / "run.json").read_text(encoding="utf-8"))
    assert run["status"] == "completed" and run["options"]["executor"] == "local"
    assert run["crops_per_s"] > 0 and set(run["phases_s"]) >= {"prepare", "chunks", "report"}
    names = sorted(p.name for p in (crop_out / "predictions").iterdir() if p.name.startswith("_"))
    assert names == [f"_run-{run['run_id']}.json"]
    record = json.loads((crop_out / "predictions" / names[0]).read_text(encoding="utf-8"))
    assert record["run_id"] == run["run_id"] and record["model_id"] == run["model_id"]
    assert record["discovery"] == {"files": 11, "skipped": {}} and record["inputs"] == run["inputs"]


def test_prediction_fields_are_null_exactly_on_error_and_blank_rows(crop_out):
    from kmnist_core.predictions import read_predictions

    df = read_predictions(crop_out).to_pandas().set_index("rel_path")
    unpredicted = df.review_reason.isin(["error", "blank"])
    assert sorted(df.index[unpredicted]) == ["a/fake.png", "b/blank.png", "b/empty.png"]
    for column in PREDICTION_FIELDS:
        assert (df[column].isna() == unpredicted).all(), column
    assert (df.error.notna() == (df.review_reason == "error")).all()
    assert (df.needs_review == df.review_reason.notna()).all()


def write_manifests(tmp: Path, images: np.ndarray) -> tuple[Path, Path]:
    """One composed page of 6 characters; the same boxes listed in a CSV and in a typed Parquet manifest,
    each with pass-through columns."""
    page, boxes = compose_page(images, np.random.default_rng(3), 2, 3, margin=2)
    Image.fromarray(page).save(tmp / "page.png")
    rows = [{"path": "page.png", "x": b.x, "y": b.y, "width": b.width, "height": b.height, "line_id": f"{i:04d}",
             "score": i / 10, "checked": i % 2 == 0} for i, b in enumerate(boxes)]
    with open(tmp / "boxes.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp / "boxes.parquet")
    return tmp / "boxes.csv", tmp / "boxes.parquet"


def test_page_columns_come_before_the_manifest_columns(tmp_path, kmnist_dev):
    """After schema.py's columns: the page columns, then the manifest's own, in its order; a CSV's as
    text, a Parquet manifest's with their types."""
    csv_manifest, parquet_manifest = write_manifests(tmp_path, kmnist_dev.test.images)
    for manifest in (csv_manifest, parquet_manifest):
        run_predict([], tmp_path / manifest.suffix[1:], PredictOptions(manifest=str(manifest), executor="local"))
    from_csv, from_parquet = read_without_ray(tmp_path / "csv" / "predictions", tmp_path / "parquet" / "predictions")
    base = as_text(README_COLUMNS + README_PAGE_COLUMNS)
    assert from_csv["rows"] == from_parquet["rows"] == [6, 6]
    for shard in from_csv["shards"]:
        assert shard["columns"] == base + [["line_id", "string"], ["score", "string"], ["checked", "string"]]
    for shard in from_parquet["shards"]:
        assert shard["columns"] == base + [["line_id", "string"], ["score", "double"], ["checked", "bool"]]
