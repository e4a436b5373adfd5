"""Kuzushiji-49 and Kuzushiji-Kanji go through the same train -> model directory -> predict path.
This machine cannot download them, so small files in the official formats are fabricated."""

import pytest
from PIL import Image

from batch_infer.job import PredictOptions, run_predict
from kmnist_core import load_model
from kmnist_core.classmap import codepoint_to_char
from kmnist_core.datasets import load_dataset
from kmnist_core.experiment import run_train
from kmnist_core.predictions import read_predictions
from kmnist_core.train import TrainConfig
from tests.test_datasets import make_kkanji_tar, write_k49_files

pytestmark = [pytest.mark.training, pytest.mark.timeout(300)]


def k49_dataset(root):
    return load_dataset("k49", root, allow_download=False, checksums=write_k49_files(root, n_train=490, n_test=98))


def kkanji_dataset(root):
    make_kkanji_tar(root / "kkanji.tar", codepoints=("U+4E00", "U+4E8C", "U+5B57", "U+66F8"), per_class=10)
    return load_dataset("kkanji", root, allow_download=False, checksums={"kkanji/kkanji.tar": None})


@pytest.mark.parametrize("make_data,size,classes", [(k49_dataset, 28, 49), (kkanji_dataset, 64, 4)])
def test_train_and_predict_many_class_models(tmp_path, monkeypatch, make_data, size, classes):
    from kmnist_core import experiment, train

    # 200 validation negatives for the out-of-set threshold instead of 2,000: the many-class path is the point.
    fewer = lambda cfg, data: train.validation_negatives(cfg, data, n=200)  # noqa: E731
    monkeypatch.setattr(experiment, "validation_negatives", fewer)
    (tmp_path / "data").mkdir()
    data = make_data(tmp_path / "data")
    model_dir = tmp_path / "model"
    card = run_train(TrainConfig(dataset=data.name, epochs=1, batch_size=16, threads=2), model_dir, data=data)
    assert card["input"]["size"] == size and card["architecture"]["num_classes"] == classes
    assert (model_dir / "confusion_matrix.png").exists()

    scans = tmp_path / "scans"
    scans.mkdir()
    # The fabricated training images are noise, which predict rightly calls blank; real characters
    # (kmnist-dev, upscaled to the model's size) exercise the prediction path.
    crops = load_dataset("kmnist-dev").test.images[:6]
    for i, img in enumerate(crops):
        Image.fromarray(255 - img).resize((size + 10, size + 20)).save(scans / f"{i}.png")
    out = tmp_path / "out"
    run_predict([scans], out, PredictOptions(model=str(model_dir), executor="local"))
    df = read_predictions(out).to_pandas()
    chars = {c["char"] for c in card["classes"]}
    assert len(df) == len(crops) and df.error.isna().all()
    for _, row in df.iterrows():
        assert row.pred_char in chars and row.pred_char == codepoint_to_char(row.pred_codepoint)
        assert row.pred_char == card["classes"][row.pred_index]["char"] and len(row.topk_chars) == 3
    # The Python API agrees with the batch job.
    api = load_model(model_dir).predict([Image.open(scans / "0.png")])[0]
    assert api.char == df.set_index("rel_path").loc["0.png", "pred_char"]
