"""README promises about `predict --resume` that need no Ray and no separate process: what resume
refuses (another model, precision or schema version), and how it finishes a run whose inputs grew
(a changed chunk minus the files already held; the first run's --rows-per-shard). Runs are in-process
(`executor="local"`); a run is cut off after a given number of chunks by a hook that raises."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest
from PIL import Image

from batch_infer.chunks import chunked
from batch_infer.discover import iter_files
from batch_infer.job import PredictOptions, run_predict
from kmnist_core.errors import KmnistError
from kmnist_core.predictions import read_predictions
from tests.crop_tree import plain_tree, save


def files_of(out: Path) -> dict[Path, bytes]:
    """OUT's files and their bytes, but the lock file (a refused run takes and releases the lock)."""
    return {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished_out(tmp_path_factory, kmnist_dev) -> tuple[Path, Path]:
    """A finished fp32 run of the default model over 150 crops: (inputs, OUT). Tests only read it."""
    root = tmp_path_factory.mktemp("promises")
    plain_tree(root / "in", kmnist_dev.test.images, 150)
    run_predict([root / "in"], root / "out", PredictOptions(precision="fp32", rows_per_shard=50, executor="local"))
    return root / "in", root / "out"


def test_resume_refuses_another_precision_and_accepts_the_same(finished_out, tmp_path):
    inputs, out = finished_out
    before = files_of(out)
    with pytest.raises(KmnistError, match="was predicted at precision fp32, this run would use int8"):
        run_predict([inputs], out, PredictOptions(resume=True, precision="int8", executor="local"))
    assert files_of(out) == before
    shutil.copytree(out, tmp_path / "out")
    again = run_predict([inputs], tmp_path / "out", PredictOptions(resume=True, precision="fp32", executor="local"))
    assert again["already_done"] == 150 and again["rows_written"] == 0


def test_resume_refuses_another_model(finished_out, trained_model_dir):
    inputs, out = finished_out
    before = files_of(out)
    card = json.loads((trained_model_dir / "model_card.json").read_text())
    with pytest.raises(KmnistError, match=f"was written by model .*, not {card['model_id']}"):
        run_predict([inputs], out, PredictOptions(resume=True, model=str(trained_model_dir), precision="fp32",
                                                  executor="local"))
    assert files_of(out) == before


def test_resume_refuses_another_schema_version(finished_out, tmp_path):
    inputs, finished = finished_out
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    shard = sorted((out / "predictions").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    meta = {**table.schema.metadata, b"kmnist_batch.schema_version": b"2"}  # as an earlier version wrote it
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf)
    shard.write_bytes(buf.getvalue())
    before = files_of(out)
    with pytest.raises(KmnistError, match="holds output schema 2; .* use --overwrite or another --out"):
        run_predict([inputs], out, PredictOptions(resume=True, precision="fp32", executor="local"))
    assert files_of(out) == before


def shards_if_cut(root: Path, target: int) -> set[str]:
    """The shard names of the listing of `root` cut into chunks of about `target` files."""
    return {f"chunk-{c.id}.parquet" for c in chunked(iter_files([str(root)], Counter()), target)}


class Stop(KmnistError):
    """Raised by the chunk hook to cut a run off, as an end the user sees on one line (a full disk, a lost
    cluster); any other exception would be a bug, which run_predict re-raises as itself."""


def stop_after(chunks: int) -> Callable[[dict], None]:
    """A chunk hook that cuts an in-process run off once it has committed `chunks` chunks."""
    committed = []

    def hook(stats: dict) -> None:
        committed.append(stats["chunk_id"])
        if len(committed) == chunks:
            raise Stop(f"stopped after {chunks} chunks")

    return hook


def test_resume_after_files_were_added_predicts_only_files_without_a_row(tmp_path, kmnist_dev):
    """Files added inside a committed chunk's range change that chunk: its new files get rows, its old
    ones keep theirs. The resumed run cuts the listing with the first run's --rows-per-shard."""
    root, out = tmp_path / "in", tmp_path / "out"
    plain_tree(root, kmnist_dev.test.images, 600, per_folder=200)
    with pytest.raises(KmnistError, match="stopped after 2 chunks"):  # of at most 200 files each: f002 not reached
        run_predict([root], out, PredictOptions(rows_per_shard=100, executor="local"), on_chunk=stop_after(2))
    first = {p.name: p.read_bytes() for p in (out / "predictions").glob("*.parquet")}
    first_rows = read_predictions(out).to_pandas()
    assert len(first) == 2 and 0 < len(first_rows) <= 400  # cut off mid-way

    image = Image.fromarray(kmnist_dev.test.images[7])
    inside = save(image, root / "f000" / "000000a.png")  # between the first two files: in a committed chunk
    later = save(image, root / "f002" / "000599a.png")  # in the part the first run never reached
    new_folder = save(image, root / "f001x" / "new.png")
    added = {str(p).encode() for p in (inside, later, new_folder)}
    assert str(inside).encode() not in set(first_rows.path_bytes)

    resumed = run_predict([root], out, PredictOptions(resume=True, rows_per_shard=37, executor="local"))
    df = read_predictions(out).to_pandas()
    keys = {str(p).encode() for p in root.rglob("*.png")}
    assert len(df) == len(keys) == 603 and set(df.path_bytes) == keys  # exactly once
    assert all((out / "predictions" / name).read_bytes() == data for name, data in first.items())  # kept as they were
    mine = df[df.run_id == resumed["run_id"]]
    assert set(mine.path_bytes) == keys - set(first_rows.path_bytes) and added <= set(mine.path_bytes)
    assert resumed["already_done"] == len(first_rows) and resumed["rows_written"] == 603 - len(first_rows)

    # The first run's chunk size, not the 37 given: every new shard is a chunk of the listing cut at 100
    # (a chunk or two may come out the same in both cuts; not all of them).
    assert resumed["options"]["rows_per_shard"] == 100
    new_shards = {p.name for p in (out / "predictions").glob("*.parquet")} - set(first)
    assert new_shards and new_shards <= shards_if_cut(root, 100) and not new_shards <= shards_if_cut(root, 37)


def test_review_below_and_ood_threshold_replace_the_card_s_for_the_run(finished_out, tmp_path):
    """`--review-below` and `--ood-threshold`: rows are decided by the run's thresholds, which run.json
    records; the scores themselves do not change. The thresholds chosen split the first run's rows, so a
    run that ignored either option would flag other rows."""
    inputs, first_out = finished_out
    first = pq.read_table(first_out / "predictions").to_pandas().set_index("path")
    ood_cut = float(first["ood_score"].quantile(0.6))  # 40 % of the crops above it
    conf_cut = float(first["confidence"].quantile(0.5))
    out = tmp_path / "out"
    run_predict([inputs], out, PredictOptions(precision="fp32", executor="local", review_below=conf_cut,
                                              ood_threshold=ood_cut))
    rows = pq.read_table(out / "predictions").to_pandas().set_index("path").loc[first.index]
    assert (rows["ood_score"] == first["ood_score"]).all() and (rows["confidence"] == first["confidence"]).all()
    unknown = rows["ood_score"] > ood_cut
    low = ~unknown & (rows["confidence"] < conf_cut)
    expected = unknown.map({True: "unknown_character", False: None}).where(unknown, low.map({True: "low_confidence", False: None}))
    assert list(rows["review_reason"]) == list(expected)
    assert 0 < unknown.sum() < len(rows) and 0 < low.sum() and list(rows["review_reason"]) != list(first["review_reason"])
    record = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert (record["review_below"], record["ood_threshold"]) == (conf_cut, ood_cut)
    with pytest.raises(KmnistError, match="--ood-threshold must be a finite number"):
        run_predict([inputs], tmp_path / "nan", PredictOptions(executor="local", ood_threshold=float("nan")))
