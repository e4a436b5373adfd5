"""How a chunk worker reads local files (batch_infer/stages.py read_file): every byte to the end of the
file, whatever one read returns; a file it cannot read is an error value, not an exception."""

from __future__ import annotations

import os
import threading
import time

from batch_infer.stages import read_file, read_files


def test_files_come_back_byte_for_byte_empty_small_and_larger_than_one_read(tmp_path):
    contents = {b"empty": b"", b"crop": os.urandom(412), b"large": os.urandom(300_000)}
    paths = []
    for name, data in contents.items():
        path = os.fsencode(tmp_path) + b"/" + name + b".png"
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    assert read_files(paths) == list(contents.values())


def test_a_file_that_arrives_in_pieces_is_read_to_its_end(tmp_path):
    """A FIFO's first read returns only what was written so far, as a network file system's read may:
    the reader goes on until the writer is done."""
    fifo = os.fsencode(tmp_path / "slow.png")
    os.mkfifo(fifo)
    pieces = [os.urandom(1000) for _ in range(3)]

    def write() -> None:
        with open(fifo, "wb", buffering=0) as f:
            for piece in pieces:
                f.write(piece)
                time.sleep(0.05)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert read_file(fifo) == b"".join(pieces)
    finally:
        writer.join(timeout=10)


def test_a_missing_file_or_a_folder_is_an_error_value(tmp_path):
    (tmp_path / "folder.png").mkdir()
    for path in (os.fsencode(tmp_path / "gone.png"), os.fsencode(tmp_path / "folder.png")):
        result = read_file(path)
        assert isinstance(result, OSError) and result.strerror
