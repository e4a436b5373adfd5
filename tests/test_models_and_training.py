import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kmnist_core import load_model
from kmnist_core.datasets import Split
from kmnist_core.errors import KmnistError
from kmnist_core.model_dir import weights_id
from kmnist_core.models import MODELS, SimpleCNN, create_model, optimize_for_inference
from kmnist_core.train import TeacherEnsemble, TrainConfig, batch_loss, diverged, train_model
from kmnist_core.transforms import AUGMENTATIONS, augment_batch, to_model_tensor


def test_simple_cnn_is_the_study_network():
    m = SimpleCNN(10, 28)
    assert (m.conv1.in_channels, m.conv1.out_channels, m.conv1.kernel_size) == (1, 32, (3, 3))
    assert (m.conv2.in_channels, m.conv2.out_channels) == (32, 64)
    assert (m.fc1.in_features, m.fc1.out_features, m.fc2.out_features) == (1600, 128, 10)
    assert m.dropout.p == 0.5


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("classes,size", [(10, 28), (49, 28), (3832, 64)])
def test_models_follow_dataset_shape(name, classes, size):
    out = create_model(name, classes, size)(torch.zeros(2, 1, size, size))
    assert out.shape == (2, classes)


def test_normalization_maps_to_minus_one_one():
    x = to_model_tensor(np.array([[[0, 255]]], dtype=np.uint8))
    assert x.shape == (1, 1, 1, 2) and x.flatten().tolist() == [-1.0, 1.0]


def test_study_augmentation_rotates_each_image_differently():
    img = torch.full((1, 1, 28, 28), -1.0)
    img[..., 12:16, :] = 1.0  # a horizontal bar
    batch = img.repeat(8, 1, 1, 1)
    out = augment_batch(batch, AUGMENTATIONS["study"], torch.Generator().manual_seed(0))
    assert out.shape == batch.shape
    assert len({o.numpy().tobytes() for o in out}) == 8
    # Bounded at ±10°: the bar's rows stay close to where they were.
    assert (out[:, :, 12:16, 10:18] > 0).float().mean() > 0.9


@pytest.mark.training
def test_training_is_reproducible_on_cpu_and_learns(small_dev):
    cfg = TrainConfig(epochs=1, batch_size=64, seed=7, threads=2)
    a = train_model(cfg, small_dev, "cpu")
    b = train_model(cfg, small_dev, "cpu")
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    h = a.history[0]
    assert set(h) >= {"train_loss", "train_acc", "val_acc", "test_acc", "epoch_time_s"}
    assert h["val_acc"] > 0.3  # well above the 10 % of chance after one epoch on 600 real images


def test_collapse_to_chance_counts_as_divergence():
    ln10 = math.log(10)
    assert diverged({"epoch": 1, "train_loss": float("nan"), "val_loss": 1.0, "val_acc": 0.5}, 10)
    assert diverged({"epoch": 2, "train_loss": ln10, "val_loss": ln10, "val_acc": 0.1}, 10)
    assert not diverged({"epoch": 1, "train_loss": ln10, "val_loss": ln10, "val_acc": 0.1}, 10)
    assert not diverged({"epoch": 3, "train_loss": 0.5, "val_loss": 0.4, "val_acc": 0.9}, 10)


def test_model_directory_round_trip_and_card(trained_model_dir, small_dev):
    card = json.loads((trained_model_dir / "model_card.json").read_text(encoding="utf-8"))
    assert card["architecture"]["name"] == "simple-cnn" and card["input"]["size"] == 28
    assert [c["char"] for c in card["classes"]][:3] == ["お", "き", "す"]
    assert card["input"]["normalization"]["range"] == [-1.0, 1.0]
    assert "TEST split" in card["training"]["split"] and card["code_version"]
    # review_below is just above 1 when no threshold keeps the promise (a one-epoch model): review everything.
    assert card["calibration"]["temperature"] > 0 and 0 <= card["calibration"]["review_below"] <= np.nextafter(1.0, 2.0)
    model = load_model(trained_model_dir, precision="fp32")  # the weights themselves (int8: tests/test_int8.py)
    assert model.model_id == card["model_id"]
    test = small_dev.test
    acc = float((model.probabilities(test.images).argmax(1) == test.labels).mean())
    assert acc == pytest.approx(card["metrics"]["test"]["accuracy"])


def test_predict_api_takes_pil_images_and_arrays_of_either_polarity(trained_model_dir, small_dev):
    model = load_model(trained_model_dir)
    images = small_dev.test.images[:20]
    light = model.predict(list(images))
    assert light[0].char == model.classes.chars[light[0].index]
    assert light[0].probabilities.shape == (10,) and light[0].probabilities.sum() == pytest.approx(1, abs=1e-5)
    # The same crops as PIL images, and as dark ink on light paper (array and PIL): inverted back to the
    # very same model input, so the very same prediction.
    for form in ([Image.fromarray(a) for a in images], list(255 - images), [Image.fromarray(255 - a) for a in images]):
        preds = model.predict(form)
        assert [p.index for p in preds] == [p.index for p in light]
        np.testing.assert_allclose([p.probabilities for p in preds], [p.probabilities for p in light], atol=1e-6)

    def scan(a: np.ndarray) -> Image.Image:
        """Dark ink at twice the size, off-centre on a larger, non-square sheet of paper."""
        page = np.full((80, 70), 255, np.uint8)
        page[10:66, 6:62] = np.asarray(Image.fromarray(255 - a).resize((56, 56), Image.Resampling.BICUBIC))
        return Image.fromarray(page)

    scans = model.predict([scan(a) for a in images])
    assert all(p.review_reason != "blank" for p in scans)
    # Resampled twice, so not bit for bit: the same class for nearly every crop.
    assert np.mean([s.index == p.index for s, p in zip(scans, light)]) >= 0.9
    # A blank crop (paper without ink, either polarity) holds no character, as predict's rows.
    blank = model.predict([np.full((40, 30), 255, np.uint8), Image.new("L", (28, 28), 0), images[0]])
    assert [b.review_reason for b in blank[:2]] == ["blank", "blank"] and blank[2].char == light[0].char
    assert all(b.char is None and b.index is None and b.confidence is None and b.probabilities is None for b in blank[:2])


def test_load_model_refuses_broken_directories(tmp_path, trained_model_dir):
    with pytest.raises(KmnistError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KmnistError, match="model_card.json is missing"):
        load_model(tmp_path / "empty")
    broken = tmp_path / "no-weights"
    broken.mkdir()
    (broken / "model_card.json").write_bytes((trained_model_dir / "model_card.json").read_bytes())
    with pytest.raises(KmnistError, match="model.pt is missing"):
        load_model(broken)
    other = tmp_path / "other-arch"
    other.mkdir()
    (other / "model.pt").write_bytes((trained_model_dir / "model.pt").read_bytes())
    card = json.loads((trained_model_dir / "model_card.json").read_text(encoding="utf-8"))
    card["architecture"]["name"] = "compact-cnn"
    (other / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(KmnistError, match="do not match architecture 'compact-cnn'"):
        load_model(other)


def test_weights_that_need_unpickling_are_refused(tmp_path, trained_model_dir):
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"payload": Image.new("L", (2, 2))}, evil / "model.pt")  # an arbitrary pickled object
    card = json.loads((trained_model_dir / "model_card.json").read_text(encoding="utf-8"))
    # A card that names these bytes, so what refuses them is the loader itself (weights_only), not the hash.
    card["model_id"] = weights_id((evil / "model.pt").read_bytes())
    (evil / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(KmnistError, match="cannot load weights"):
        load_model(evil)


@pytest.mark.training
def test_resuming_from_a_checkpoint_matches_an_uninterrupted_run(small_dev, tmp_path):
    # Exact equality is the point, not learning: 192 training images, 3 steps an epoch.
    data = dataclasses.replace(small_dev, train=Split(small_dev.train.images[:192], small_dev.train.labels[:192]))
    cfg = TrainConfig(epochs=2, batch_size=64, seed=3, threads=2, optimizer="adamw", schedule="onecycle")
    straight = train_model(cfg, data, "cpu")

    class Crash(Exception):
        pass

    def checkpoint_then_crash(metrics, run):
        torch.save(run.state_dict(), tmp_path / "state.pt")
        raise Crash

    with pytest.raises(Crash):
        train_model(cfg, data, "cpu", on_epoch=checkpoint_then_crash)
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # a checkpoint needs no unpickling
    resumed = train_model(cfg, data, "cpu", resume_state=state)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", list(MODELS))
def test_inference_optimization_keeps_outputs_and_leaves_the_model_alone(name):
    torch.manual_seed(0)
    model = create_model(name, 10, 28)
    model.train()
    model(torch.randn(64, 1, 28, 28))  # move batch-norm running statistics off their defaults
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize_for_inference(model)
    x = torch.randn(16, 1, 28, 28)
    with torch.inference_mode():
        assert torch.allclose(fast(x.contiguous(memory_format=torch.channels_last)), model(x), atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules()) or name == "simple-cnn"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_distillation_loss_is_zero_only_when_the_student_matches_the_teacher():
    logits = torch.randn(8, 10)
    y = logits.argmax(1)
    for t in (1.0, 4.0):
        assert batch_loss(logits, y, None, 1.0, logits.clone(), t).item() == pytest.approx(0.0, abs=1e-6)
        assert batch_loss(logits, y, None, 1.0, torch.randn(8, 10), t).item() > 0.01
    # Mixup without a teacher: cross-entropy weighted between the two labels of each mixed image.
    partner = torch.arange(8).flip(0)
    mixed = batch_loss(logits, y, partner, 0.3, None, 1.0)
    expected = 0.3 * F.cross_entropy(logits, y) + 0.7 * F.cross_entropy(logits, y[partner])
    assert mixed.item() == pytest.approx(expected.item())


def test_a_teacher_ensemble_targets_the_mean_of_its_members_probabilities():
    members = [torch.nn.Linear(4, 10) for _ in range(3)]
    x = torch.randn(5, 4)
    with torch.no_grad():
        mean_probs = torch.stack([F.softmax(m(x), 1) for m in members]).mean(0)
        assert torch.allclose(TeacherEnsemble(members)(x).exp(), mean_probs, atol=1e-6)
        # One teacher: its log-softmax, which the distillation loss treats exactly as its logits.
        single = TeacherEnsemble(members[:1])(x)
        assert batch_loss(members[0](x), None, None, 1.0, single, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def permuted_teacher(model_dir: Path, dest: Path) -> Path:
    """`model_dir` with its output classes rotated by one: a teacher that is wrong wherever the original is
    right, so a student that follows it can be told from one that learnt the labels."""
    from kmnist_core.model_dir import save_model_dir

    card = json.loads((model_dir / "model_card.json").read_text(encoding="utf-8"))
    model = create_model(card["architecture"]["name"], 10, 28)
    model.load_state_dict(torch.load(model_dir / "model.pt", weights_only=True))
    with torch.no_grad():
        model.fc2.weight.copy_(model.fc2.weight.roll(1, 0))
        model.fc2.bias.copy_(model.fc2.bias.roll(1, 0))
    save_model_dir(dest, model, {k: v for k, v in card.items() if k not in ("int8", "model_id")})
    return dest


@pytest.mark.training
def test_student_follows_its_teacher_and_its_card_names_it(trained_model_dir, small_dev, tmp_path):
    """Distillation learns the teacher's targets, not the labels: a student of a deliberately wrong
    teacher agrees with the teacher and not with the labels (a student that ignored it would be right)."""
    from kmnist_core.experiment import run_train

    teacher_dir = permuted_teacher(trained_model_dir, tmp_path / "teacher")
    cfg = TrainConfig(epochs=1, batch_size=32, seed=3, threads=2, mixup=0.2, teachers=[str(teacher_dir)])
    card = run_train(cfg, tmp_path / "student", data=small_dev, make_plots=False)
    teacher_card = json.loads((teacher_dir / "model_card.json").read_text(encoding="utf-8"))
    assert [t["model_id"] for t in card["training"]["teachers"]] == [teacher_card["model_id"]]
    test = small_dev.test
    student = load_model(tmp_path / "student", precision="fp32").logits(test.images).argmax(1)
    teacher = load_model(teacher_dir, precision="fp32").logits(test.images).argmax(1)
    original = load_model(trained_model_dir, precision="fp32").logits(test.images).argmax(1)
    assert (teacher == (original + 1) % 10).all()  # rotated indeed
    assert (student == teacher).mean() > 0.5  # chance is ~10 %
    assert (student == test.labels).mean() < 0.2 < (original == test.labels).mean()


def test_a_teacher_for_other_classes_is_refused(trained_model_dir, small_dev):
    k49_like = small_dev.__class__(small_dev.name, small_dev.classes, 64, small_dev.train, small_dev.val,
                                   small_dev.test, small_dev.split_note, small_dev.primary_metric)
    with pytest.raises(KmnistError, match="teacher"):
        train_model(TrainConfig(epochs=1, teachers=[str(trained_model_dir)]), k49_like, "cpu")
