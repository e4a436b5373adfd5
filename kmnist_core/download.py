"""Download with md5 verification. A file is only ever visible at its final path once it is verified."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from kmnist_core.errors import KmnistError

CHUNK = 1 << 20


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: Path, md5: str | None) -> None:
    if md5 is not None and (actual := file_md5(path)) != md5:
        raise KmnistError(f"{path} is corrupt: md5 {actual}, expected {md5}; delete it and download again")


def download(url: str, dest: Path, md5: str | None, timeout_s: float = 60.0) -> Path:
    """Fetch `url` to `dest` unless a verified copy is there. A bad md5 leaves nothing behind.

    `md5=None` is only for files without a published checksum (Kuzushiji-Kanji's tar).
    """
    if dest.exists():
        verify_md5(dest, md5)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + f".part-{os.getpid()}")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(partial, "wb") as out:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
        if md5 is not None and digest.hexdigest() != md5:
            raise KmnistError(f"download of {url} failed verification: md5 {digest.hexdigest()}, expected {md5}; nothing was kept")
        os.replace(partial, dest)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise KmnistError(f"cannot download {url}: {reason}") from None
    finally:
        partial.unlink(missing_ok=True)
    return dest
