import os
from collections import Counter

import pytest

from batch_infer.chunks import chunked
from batch_infer.discover import check_inputs, iter_files, order_key
from batch_infer.paths import name_text
from kmnist_core.errors import KmnistError


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def listing(inputs):
    skipped = Counter()
    files = list(iter_files([str(i) for i in inputs], skipped))
    return files, skipped


def test_walk_skips_hidden_and_non_images_and_survives_symlink_loops(tmp_path):
    touch(tmp_path / "a" / "x.PNG")
    touch(tmp_path / "a" / "y.TiFf")
    touch(tmp_path / "a b" / "日本.jpeg")
    touch(tmp_path / ".git" / "z.png")
    touch(tmp_path / "a" / ".x.png")
    touch(tmp_path / "a" / "readme.md")
    os.symlink("..", tmp_path / "a" / "up")
    os.symlink(tmp_path / "a", tmp_path / "again")
    files, skipped = listing([tmp_path])
    rels = [name_text(f.rel_path) for f in files]
    assert rels == ["a/x.PNG", "a/y.TiFf", "a b/日本.jpeg"]  # listing order: by path components
    assert skipped["hidden"] == 2 and skipped["not_image_extension"] == 1
    assert skipped["symlink_loop"] >= 1
    assert all(f.input_root == os.fsencode(tmp_path) for f in files)


def test_listing_order_is_component_order_whatever_the_input_order(tmp_path):
    for rel in ["b/1.png", "a.png", "a/2.png", "a/b/3.png", "z.png", "a-b/4.png"]:
        touch(tmp_path / rel)
    files, _ = listing([tmp_path / "z.png", tmp_path / "a", tmp_path / "b", tmp_path / "a.png", tmp_path / "a-b"])
    keys = [f.path_bytes for f in files]
    assert keys == sorted(keys, key=order_key)
    assert [os.path.relpath(os.fsdecode(k), tmp_path) for k in keys] == ["a/2.png", "a/b/3.png", "a-b/4.png", "a.png",
                                                                        "b/1.png", "z.png"]


def test_overlapping_inputs_give_one_entry_per_file(tmp_path):
    touch(tmp_path / "a" / "x.png")
    files, skipped = listing([tmp_path, tmp_path / "a", tmp_path / "a" / "x.png"])
    assert len(files) == 1 and skipped["duplicate_input"] == 2


def test_missing_input_is_an_error(tmp_path):
    with pytest.raises(KmnistError, match="does not exist"):
        check_inputs([str(tmp_path / "nope")])


def test_names_that_are_not_utf8_are_found_with_exact_bytes(tmp_path):
    from batch_infer.paths import unescape_name

    raw = os.fsencode(tmp_path) + b"/" + "日本語.png".encode("cp932")  # a zip made on Japanese Windows
    with open(raw, "wb") as f:
        f.write(b"x")
    touch(tmp_path / "back\\slash.png")
    found = {f.path_bytes: f for f in listing([tmp_path])[0]}
    assert set(found) == {raw, os.fsencode(tmp_path / "back\\slash.png")}
    entry = found[raw]
    assert name_text(entry.rel_path) == "\\x93\\xfa\\x96{\\x8c\\xea.png" and unescape_name(name_text(entry.path_bytes)) == raw
    assert name_text(found[os.fsencode(tmp_path / "back\\slash.png")].rel_path) == "back\\slash.png"  # UTF-8: unchanged
    assert listing([os.fsdecode(raw)])[0][0].path_bytes == raw  # given as an argument, too


def test_chunks_keep_their_ids_when_files_are_added(tmp_path):
    for i in range(3000):
        touch(tmp_path / f"f{i // 500}" / f"{i:05d}.png")
    before = list(chunked(listing([tmp_path])[0], 200))
    assert 100 <= min(len(c.files) for c in before[:-1]) and max(len(c.files) for c in before) <= 400
    assert sum(len(c.files) for c in before) == 3000
    touch(tmp_path / "f2" / "01234a.png")  # one file added in the middle of the listing
    after = list(chunked(listing([tmp_path])[0], 200))
    changed = {c.id for c in after} - {c.id for c in before}
    assert 1 <= len(changed) <= 3  # the chunk it joined (rarely one or two more), not every chunk after it
    same = [c for c in after if c.id not in changed]
    assert all(c.files == next(b for b in before if b.id == c.id).files for c in same)
