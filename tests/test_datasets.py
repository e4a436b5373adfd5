import gzip
import hashlib
import io
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from kmnist_core.classmap import read_classmap_csv
from kmnist_core.datasets import BUNDLED_DIR, OFFICIAL_MD5, load_dataset, stratified_split
from kmnist_core.download import download
from kmnist_core.errors import KmnistError


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def npz_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, arr_0=arr)
    return buf.getvalue()


def idx_gz_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return gzip.compress(header + arr.astype(np.uint8).tobytes())


def fake_split(n: int, classes: int, size: int = 28, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), np.arange(n, dtype=np.uint8) % classes


def test_kmnist_dev_splits_are_deterministic_stratified_and_disjoint(kmnist_dev):
    d = kmnist_dev
    assert (len(d.train), len(d.val), len(d.test)) == (6000, 1000, 1000)
    for part, per_class in ((d.train, 600), (d.val, 100), (d.test, 100)):
        assert np.bincount(part.labels).tolist() == [per_class] * 10
    again = load_dataset("kmnist-dev")
    assert np.array_equal(again.test.images, d.test.images)
    seen = {img.tobytes() for img in d.train.images}
    assert not any(img.tobytes() in seen for img in d.test.images)
    assert "TEST split" in d.split_note and d.classes.chars[0] == "お"


def test_bundled_data_carries_license_and_attribution():
    readme = (BUNDLED_DIR / "README.md").read_text(encoding="utf-8")
    assert "CC BY-SA 4.0" in readme and "doi:10.20676/00000341" in readme


def test_stratified_split_keeps_rare_classes_in_train():
    labels = np.array([0] * 50 + [1] * 3 + [2])
    train, val, test = stratified_split(labels, (0.8, 0.1, 0.1))
    assert set(labels[train]) == {0, 1, 2}
    assert len(train) + len(val) + len(test) == len(labels)
    assert len(set(train) | set(val) | set(test)) == len(labels)


def test_download_verifies_md5_and_leaves_nothing_on_mismatch(http_root, tmp_path):
    root, url = http_root
    (root / "good.bin").write_bytes(b"kuzushiji" * 1000)
    dest = tmp_path / "data" / "good.bin"
    download(url + "good.bin", dest, md5(b"kuzushiji" * 1000))
    assert dest.read_bytes() == b"kuzushiji" * 1000

    (root / "corrupt.bin").write_bytes(b"flipped bits")
    bad = tmp_path / "data" / "corrupt.bin"
    with pytest.raises(KmnistError, match="failed verification"):
        download(url + "corrupt.bin", bad, md5(b"the real file"))
    assert sorted(p.name for p in bad.parent.iterdir()) == ["good.bin"]


def test_download_of_missing_url_is_a_clear_error(http_root, tmp_path):
    _, url = http_root
    with pytest.raises(KmnistError, match="cannot download"):
        download(url + "nope.npz", tmp_path / "nope.npz", None)
    assert not list(tmp_path.glob("nope*"))


def serve_kmnist(root, n_train=100, n_test=20):
    (root / "kmnist").mkdir()
    files = {"kmnist/kmnist_classmap.csv": (BUNDLED_DIR / "kmnist_classmap.csv").read_bytes()}
    tr, te = fake_split(n_train, 10), fake_split(n_test, 10, seed=1)
    for name, arr in zip(("kmnist-train-imgs", "kmnist-train-labels", "kmnist-test-imgs", "kmnist-test-labels"),
                         (tr[0], tr[1], te[0], te[1])):
        files[f"kmnist/{name}.npz"] = npz_bytes(arr)
    for key, data in files.items():
        (root / key).write_bytes(data)
    return files, tr, te


def test_kmnist_download_refuses_files_that_do_not_match_official_md5(http_root, tmp_path):
    root, url = http_root
    serve_kmnist(root)
    target = tmp_path / "kmnist"
    with pytest.raises(KmnistError, match="md5"):
        load_dataset("kmnist", target, base_url=url)  # official sums: fabricated files must be refused
    assert not [p for p in target.iterdir() if p.name.endswith(".npz") or ".part" in p.name]


def test_kmnist_downloads_npz_from_mirror_and_splits_train(http_root, tmp_path):
    root, url = http_root
    files, tr, te = serve_kmnist(root)
    sums = {k: md5(v) for k, v in files.items()}
    d = load_dataset("kmnist", tmp_path / "kmnist", base_url=url, checksums=sums)
    assert (len(d.train), len(d.val), len(d.test)) == (90, 10, 20)
    assert np.array_equal(d.test.images, te[0])
    # Second load is offline: the verified files are reused.
    d2 = load_dataset("kmnist", tmp_path / "kmnist", allow_download=False, checksums=sums)
    assert np.array_equal(d2.train.images, d.train.images)


def test_kmnist_reads_local_idx_gz_files(tmp_path):
    tr, te = fake_split(30, 10), fake_split(10, 10, seed=2)
    files = {"kmnist_classmap.csv": (BUNDLED_DIR / "kmnist_classmap.csv").read_bytes(),
             "train-images-idx3-ubyte.gz": idx_gz_bytes(tr[0]), "train-labels-idx1-ubyte.gz": idx_gz_bytes(tr[1]),
             "t10k-images-idx3-ubyte.gz": idx_gz_bytes(te[0]), "t10k-labels-idx1-ubyte.gz": idx_gz_bytes(te[1])}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    d = load_dataset("kmnist", tmp_path, allow_download=False, checksums={f"kmnist/{k}": md5(v) for k, v in files.items()})
    assert np.array_equal(d.test.images, te[0]) and d.test.labels.tolist() == te[1].tolist()


def test_corrupt_local_official_file_is_refused(tmp_path):
    (tmp_path / "kmnist_classmap.csv").write_text("index,codepoint,char\n0,U+304A,お\n")
    with pytest.raises(KmnistError, match="corrupt"):
        load_dataset("kmnist", tmp_path, allow_download=False)


def test_missing_files_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(KmnistError, match="missing data file"):
        load_dataset("k49", tmp_path, allow_download=False)


def write_k49_files(root, n_train=98, n_test=49) -> dict[str, str]:
    """Fabricated K49 npz files (official names and format) in `root`; returns their md5 table."""
    tr, te = fake_split(n_train, 49), fake_split(n_test, 49, seed=3)
    files = {"k49_classmap.csv": (BUNDLED_DIR / "k49_classmap.csv").read_bytes()}
    for name, arr in zip(("k49-train-imgs", "k49-train-labels", "k49-test-imgs", "k49-test-labels"), (*tr, *te)):
        files[f"{name}.npz"] = npz_bytes(arr)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return {f"k49/{k}": md5(v) for k, v in files.items()}


def test_k49_local_npz(tmp_path):
    sums = write_k49_files(tmp_path)
    d = load_dataset("k49", tmp_path, allow_download=False, checksums=sums)
    assert len(d.classes) == 49 and d.primary_metric == "balanced_accuracy"
    assert sums["k49/k49_classmap.csv"] == OFFICIAL_MD5["k49/k49_classmap.csv"]


def make_kkanji_tar(path, codepoints=("U+4E00", "U+4E8C", "U+5B57"), per_class=12):
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for cp in codepoints:
            for i in range(per_class):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(buf, "PNG")
                info = tarfile.TarInfo(f"kkanji2/{cp}/{i:04d}.png")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))


def test_kkanji_tar_gives_64px_split_and_characters(http_root, tmp_path):
    root, url = http_root
    (root / "kkanji").mkdir()
    make_kkanji_tar(root / "kkanji" / "kkanji.tar")
    d = load_dataset("kkanji", tmp_path / "kk", base_url=url)
    assert d.input_size == 64 and d.classes.chars == ("一", "二", "字")
    assert (len(d.train), len(d.val), len(d.test)) == (30, 3, 3)
    assert (tmp_path / "kk" / "kkanji-64.npz").exists()


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(KmnistError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


def test_classmap_reads_official_csv():
    cm = read_classmap_csv(BUNDLED_DIR / "k49_classmap.csv")
    assert len(cm) == 49 and cm.codepoints[0] == "U+3042" and cm.chars[0] == "あ"
