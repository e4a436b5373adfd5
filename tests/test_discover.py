import os

import pytest

from batch_infer.discover import discover
from kmnist_core.errors import KmnistError


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_walk_skips_hidden_and_non_images_and_survives_symlink_loops(tmp_path):
    touch(tmp_path / "a" / "x.PNG")
    touch(tmp_path / "a" / "y.TiFf")
    touch(tmp_path / "a b" / "日本.jpeg")
    touch(tmp_path / ".git" / "z.png")
    touch(tmp_path / "a" / ".x.png")
    touch(tmp_path / "a" / "readme.md")
    os.symlink("..", tmp_path / "a" / "up")
    os.symlink(tmp_path / "a", tmp_path / "again")
    found = discover([tmp_path])
    rels = sorted(f["rel_path"] for f in found.files)
    assert rels[:3] == ["a b/日本.jpeg", "a/x.PNG", "a/y.TiFf"]
    assert found.skipped["hidden"] == 2 and found.skipped["not_image_extension"] == 1
    assert found.skipped["symlink_loop"] >= 1
    assert all(f["input_root"] == str(tmp_path) for f in found.files)


def test_overlapping_inputs_give_one_entry_per_file(tmp_path):
    touch(tmp_path / "a" / "x.png")
    found = discover([tmp_path, tmp_path / "a", tmp_path / "a" / "x.png"])
    assert len(found.files) == 1 and found.skipped["duplicate_input"] == 2


def test_missing_input_is_an_error(tmp_path):
    with pytest.raises(KmnistError, match="does not exist"):
        discover([tmp_path / "nope"])


def test_names_that_are_not_utf8_are_found_with_exact_bytes(tmp_path):
    from batch_infer.paths import unescape_name

    raw = os.fsencode(tmp_path) + b"/" + "日本語.png".encode("cp932")  # a zip made on Japanese Windows
    with open(raw, "wb") as f:
        f.write(b"x")
    touch(tmp_path / "back\\slash.png")
    found = {f["path_bytes"]: f for f in discover([tmp_path]).files}
    assert set(found) == {raw, os.fsencode(tmp_path / "back\\slash.png")}
    entry = found[raw]
    assert entry["rel_path"] == "\\x93\\xfa\\x96{\\x8c\\xea.png" and unescape_name(entry["path"]) == raw
    assert found[os.fsencode(tmp_path / "back\\slash.png")]["rel_path"] == "back\\slash.png"  # UTF-8: unchanged
    assert discover([os.fsdecode(raw)]).files[0]["path_bytes"] == raw  # given as an argument, too
