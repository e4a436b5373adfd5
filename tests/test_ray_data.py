"""The Ray Data stage (batch_infer/ray_data.py) on the session's real local Ray: one row per input row,
columns passed through, the same rows as `predict`, Parquet as the CLI writes it, a killed actor."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_infer.discover import iter_files
from batch_infer.job import PredictOptions, run_predict
from batch_infer.paths import name_text
from batch_infer.ray_data import CropPredictor, actor_pool, predict_dataset, write_predictions
from kmnist_core.errors import KmnistError
from kmnist_core.model_dir import load_bundle
from kmnist_core.predictions import read_predictions
from kmnist_core.schema import FOOTER_RUN, SCHEMA, SCHEMA_VERSION
from tests.actor_faults import KillOnce
from tests.crop_tree import mixed_tree

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[1]
SJIS_NAME = "日本語の字.png".encode("shift_jis")  # as a zip made on Japanese Windows names it
FLOATS = {"confidence", "margin", "ood_score"}
NOT_COMPARED = {"rel_path", "input_root", "run_id", "node_id"}  # no input root here; another run and process


@pytest.fixture(scope="module")
def tree(tmp_path_factory, kmnist_dev) -> Path:
    """Crops in every form predict takes (sizes, modes, polarity, EXIF), bad files, and a Shift-JIS name."""
    root = tmp_path_factory.mktemp("crops")
    d = kmnist_dev
    mixed_tree(root, d.test.images, d.test.labels, d.classes.chars)
    shutil.copyfile(root / "book1/page1/scan.PNG", os.path.join(os.fsencode(root / "book2"), SJIS_NAME))
    return root


@pytest.fixture(scope="module")
def listed(tree) -> list[dict]:
    """The files predict lists, as rows a user's pipeline holds: exact name, bytes, an id, an array."""
    rows = []
    for i, f in enumerate(iter_files([str(tree)], Counter())):
        with open(f.path_bytes, "rb") as fh:
            rows.append({"id": i, "path": f.path_bytes, "bytes": fh.read(), "vec": np.array([i, -i], np.int64)})
    return rows


@pytest.fixture(scope="module")
def cli_rows(tree, tmp_path_factory) -> dict[bytes, dict]:
    """`kmnist-batch predict`'s rows for the same tree, read back from its Parquet with pyarrow."""
    out = tmp_path_factory.mktemp("cli")
    run_predict([tree], out, PredictOptions(executor="local", batch_size=4))
    return {r["path_bytes"]: r for r in pq.read_table(out / "predictions").to_pylist()}


@pytest.fixture(scope="module")
def predicted(listed, ray_session):
    import ray.data

    # One actor: the pool's default size is for the read_binary_files test (and test_actor_pool_leaves_cpus).
    ds = ray.data.from_items(listed, override_num_blocks=3)
    return predict_dataset(ds, batch_size=4, workers=1).materialize()


def arrow(ds) -> pa.Table:
    import ray

    return pa.concat_tables(ray.get(ds.to_arrow_refs()))


def assert_same_prediction(mine: dict, theirs: dict, where) -> None:
    for name in SCHEMA.names:
        if name in NOT_COMPARED:
            continue
        a, b = mine[name], theirs[name]
        if name in FLOATS or name == "topk_confidences":
            assert (a is None) == (b is None), (where, name)
            if a is not None:
                assert a == pytest.approx(b, abs=1e-6), (where, name)
        else:
            assert a == b, (where, name)


def test_one_row_per_input_row_with_junk_empty_and_shift_jis_names(listed, predicted):
    rows = arrow(predicted).to_pylist()
    assert sorted(r["id"] for r in rows) == list(range(len(listed)))
    by_name = {os.path.basename(r["path_bytes"]): r for r in rows}
    sjis = by_name[SJIS_NAME]
    assert sjis["path"] == sjis["rel_path"] == name_text(sjis["path_bytes"]) and "\\x" in sjis["path"]
    assert sjis["error"] is None and sjis["pred_char"]
    assert by_name[b"empty.png"]["error_kind"] == "empty" and by_name[b"fake.jpg"]["error_kind"] == "not_image"
    for r in rows:
        assert r["input_root"] == ""
        if r["error"] is not None:
            assert r["review_reason"] == "error" and r["needs_review"]
            assert r["pred_char"] is None and r["confidence"] is None and r["topk_chars"] is None


def test_other_columns_pass_through_unchanged(listed, predicted):
    table = arrow(predicted)
    assert table.column_names == [*SCHEMA.names, "id", "vec"]  # the crop's bytes are consumed, its path is the key
    for r in table.to_pylist():
        given = listed[r["id"]]
        assert r["path_bytes"] == given["path"]
        assert np.array_equal(r["vec"], given["vec"])


def test_rows_equal_predicts_rows_for_the_same_crops(predicted, cli_rows):
    mine = {r["path_bytes"]: r for r in arrow(predicted).to_pylist()}
    assert mine.keys() == cli_rows.keys()
    for key, theirs in cli_rows.items():
        assert_same_prediction(mine[key], theirs, key)


def test_written_predictions_read_as_the_clis_output_without_ray(predicted, listed, tmp_path):
    out = tmp_path / "out"
    summary = write_predictions(predicted, out, rows_per_file=8)
    assert summary["rows"] == len(listed) and summary["errors_by_kind"]["empty"] == 1
    shards = sorted((out / "predictions").glob("*.parquet"))
    assert len(shards) == summary["shards"] > 1
    for shard in shards:
        schema = pq.read_schema(shard)
        assert not any(isinstance(f.type, pa.ExtensionType) for f in schema)  # Ray's types would be rebuilt here
        assert schema.metadata[b"kmnist_batch.schema_version"] == SCHEMA_VERSION.encode()
        assert json.loads(schema.metadata[b"kmnist_batch.run"])["executor"] == "ray-data"
        assert json.loads(schema.metadata[b"kmnist_batch.model_card"])["model_id"]
    plain = pq.read_table(out / "predictions")
    assert [plain.schema.field(n).type for n in SCHEMA.names] == SCHEMA.types
    assert plain.schema.field("vec").type == pa.list_(pa.int64())
    assert read_predictions(out).num_rows == len(listed)  # the CLI's own reader accepts the footers
    script = textwrap.dedent(f"""
        import sys, duckdb, pandas as pd
        df = pd.read_parquet({str(out / "predictions")!r})
        assert "ray" not in sys.modules
        assert df.vec.map(list).tolist() == [[i, -i] for i in df.id], df.vec
        print(duckdb.sql("select count(*), sum(vec[1]) from read_parquet('{out}/predictions/*.parquet')").fetchall()[0])
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str((len(listed), sum(range(len(listed)))))
    with pytest.raises(KmnistError, match="already holds predictions"):
        write_predictions(predicted, out)


def test_read_binary_files_gives_a_row_per_file_and_predicts_characters(tree, cli_rows, ray_session):
    import ray.data

    folder = tree / "book1"
    rows = predict_dataset(ray.data.read_binary_files(str(folder), include_paths=True), batch_size=8).take_all()
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in folder.rglob("*") if p.is_file())
    for r in rows:
        theirs = cli_rows.get(r["path_bytes"])
        if theirs is None:  # notes.txt, Thumbs.db: predict skips them by name, here they are rows
            assert r["error_kind"] == "not_image"
        else:
            assert_same_prediction(r, theirs, r["path"])


@pytest.fixture(scope="module")
def in_process():
    """The stage called directly in this process: for what needs no actor."""
    return CropPredictor("default", batch_size=4)


def test_image_arrays_from_read_images_predict_as_their_files(tree, cli_rows, in_process, ray_session):
    import ray.data

    folder = tree / "book1" / "page1"  # grey and colour files: Ray pads the grey arrays to (1, H, W)
    batch = ray.data.read_images(str(folder), include_paths=True).take_batch(20, batch_format="pyarrow")
    rows = in_process(batch).to_pylist()
    assert len(rows) == batch.num_rows >= 3
    for r in rows:
        theirs = cli_rows[r["path_bytes"]]
        assert r["sha256"] is None and r["size_bytes"] is None  # no file bytes: arrays
        for name in ("pred_char", "review_reason", "inverted", "width", "height", "ink_x", "ink_y", "ink_w", "ink_h"):
            assert r[name] == theirs[name], (r["path"], name)
        assert r["confidence"] == pytest.approx(theirs["confidence"], abs=1e-6)


def test_other_input_forms_and_misuse(tree, in_process):
    png = (tree / "book1/page1/light.png").read_bytes()
    hf = pa.table({"image": pa.array([{"bytes": png, "path": "x.png"}, {"bytes": None, "path": None}]), "id": [1, 2]})
    out = in_process(hf)
    assert out.column("error_kind").to_pylist() == [None, "empty"] and out.column("id").to_pylist() == [1, 2]
    arrays = pa.table({"image": pa.array([np.zeros((2, 2, 7), np.uint8).tolist(), None])})
    assert in_process(arrays).column("error_kind").to_pylist() == ["bad_array", "empty"]
    assert in_process(pa.table({"bytes": pa.array([], pa.binary())})).schema.names == SCHEMA.names
    with pytest.raises(KmnistError, match="confidence"):
        in_process(pa.table({"bytes": [png], "confidence": [0.5]}))
    with pytest.raises(KmnistError, match="needs a `bytes` column"):
        in_process(pa.table({"id": [1]}))
    with pytest.raises(TypeError, match="pyarrow"):
        in_process({"bytes": np.array([png], dtype=object)})
    with pytest.raises(TypeError, match="resume"):  # predict's options that mean nothing for a Dataset
        predict_dataset(None, resume=True)


def test_an_actor_killed_mid_dataset_still_gives_one_row_per_input(listed, predicted, tmp_path, ray_session):
    import ray.data

    marker = tmp_path / "killed"
    bundle = ray_session.put(load_bundle("default"))  # the restarted actor gets the model from the object store again
    ds = ray.data.from_items(listed, override_num_blocks=3).map_batches(
        KillOnce, fn_constructor_kwargs={"model": bundle, "marker": str(marker), "batch_size": 4},
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5, batch_size=4, batch_format="pyarrow")
    rows = ds.take_all()
    assert marker.exists()  # written by the actor just before it killed itself
    assert sorted(r["id"] for r in rows) == list(range(len(listed)))
    expected = {r["id"]: r["pred_char"] for r in arrow(predicted).to_pylist()}
    assert {r["id"]: r["pred_char"] for r in rows} == expected


class FakeCluster:
    def __init__(self, **resources):
        self.resources = resources

    def cluster_resources(self):
        return self.resources


@pytest.mark.parametrize("resources, options, expected", [
    ({"CPU": 2}, {}, (2, 0.5)),  # 1 CPU left for reads: two actors at 1 CPU each would starve them for ever
    ({"CPU": 16}, {}, (16, 0.75)),
    ({"CPU": 2}, {"workers": 4}, (4, 0.25)),
    ({"CPU": 1}, {}, (1, 0.01)),
    ({"CPU": 8, "GPU": 2}, {"gpus_per_worker": 1.0}, (2, 1.0)),
])
def test_actor_pool_leaves_cpus_for_ray_datas_tasks(resources, options, expected):
    assert actor_pool(FakeCluster(**resources), PredictOptions(**options)) == expected


def test_the_clis_small_job_path_does_not_import_ray_data():
    code = ("import sys, jobs.cli, batch_infer.job; "
            "print(sorted(m for m in ('ray.data', 'batch_infer.ray_data') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def shard_footers_and_rows(out: Path) -> tuple[list[dict], pa.Table]:
    shards = sorted((out / "predictions").glob("*.parquet"))
    return [json.loads(pq.read_schema(s).metadata[FOOTER_RUN]) for s in shards], pq.read_table(out / "predictions")


def test_threshold_overrides_are_recorded_exactly_as_the_rows_used_them(listed, tmp_path, ray_session):
    """--review-below and --ood-threshold given to the stage: every footer records those values (not the
    card's), and every row's review reason is the one they give."""
    import ray.data

    review_below, ood_threshold = 0.9999995, -0.995  # among the default model's confidences on these crops
    ds = ray.data.from_items(listed, override_num_blocks=3)
    write_predictions(predict_dataset(ds, batch_size=4, workers=1, review_below=review_below,
                                      ood_threshold=ood_threshold), tmp_path / "out", rows_per_file=8)
    footers, rows = shard_footers_and_rows(tmp_path / "out")
    card = load_bundle("default").card.calibration
    assert len(footers) > 1 and (review_below, ood_threshold) != (card.review_below, card.ood_threshold)
    for run in footers:
        assert (run["review_below"], run["ood_threshold"]) == (review_below, ood_threshold)
        assert run["thresholds_set_by_user"] == ["review_below", "ood_threshold"] and run["temperature"] == card.temperature
    df = rows.to_pandas()
    known = df[df.error.isna() & df.pred_char.notna()]
    unknown = known.ood_score.to_numpy() > np.float32(ood_threshold)
    low = ~unknown & ~(known.confidence.to_numpy().astype(np.float64) >= review_below)
    assert [r if isinstance(r, str) else None for r in known.review_reason] == ["unknown_character" if u else "low_confidence" if lo else None
                                         for u, lo in zip(unknown, low)]
    assert unknown.any() and low.any() and not (unknown | low).all()
    # The card's thresholds would have decided some of these rows otherwise.
    assert (known.ood_score.to_numpy() > np.float32(card.ood_threshold)).sum() < unknown.sum()


def test_a_stage_whose_int8_probe_fails_runs_fp32_and_says_so_in_footer_and_rows(listed, tmp_path, ray_session):
    import ray.data

    from tests.test_int8_twin import saturating_copy

    model_dir = saturating_copy(tmp_path)
    ds = ray.data.from_items(listed[:12], override_num_blocks=2)
    write_predictions(predict_dataset(ds, model_dir, batch_size=4, workers=1), tmp_path / "out")
    footers, rows = shard_footers_and_rows(tmp_path / "out")
    for run in footers:
        assert run["precision"] == "fp32" and "fails its probe on this CPU" in run["precision_note"]
    assert set(rows.column("precision").to_pylist()) == {"fp32"}
