"""Where inputs and outputs live: a local folder or an object store, resolved the same way by every stage.

A location is a plain local path or a URI (`s3://bucket/prefix`, `gs://...`, anything pyarrow or fsspec
resolves). Object stores are configured the standard way: for S3, credentials from the environment or
~/.aws and `AWS_ENDPOINT_URL` for a non-AWS server (MinIO, Ceph, moto). Local paths keep their exact
bytes (names need not be UTF-8); object-store keys are text.

Commits are atomic on both: locally a hidden temp file renamed into place, on an object store a single
PUT (an object appears whole or not at all). A durable commit (fsync=True) also survives a power cut once
it returns: locally the bytes are fsynced before the rename and the folder after it (a rename lives in
the folder, not in the file); a PUT is durable when it is acknowledged.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from kmnist_core.errors import KmnistError


def is_uri(text: str | os.PathLike) -> bool:
    return "://" in os.fspath(text) if not isinstance(text, bytes) else b"://" in text


@lru_cache(maxsize=16)
def _filesystem(scheme_and_bucket: str) -> pafs.FileSystem:
    try:
        fs, _ = pafs.FileSystem.from_uri(scheme_and_bucket)
        return fs
    except (pa.ArrowInvalid, OSError, ValueError) as first:  # a scheme pyarrow lacks: try fsspec
        try:
            import fsspec

            protocol = scheme_and_bucket.split("://", 1)[0]
            return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(protocol)))
        except (ImportError, ValueError) as e:
            raise KmnistError(f"cannot open {scheme_and_bucket}: {first} ({e})") from None


@dataclass(frozen=True)
class Location:
    """A folder or file: its filesystem, the path that filesystem takes, and the text a user wrote."""

    fs: pafs.FileSystem | None  # None: local, addressed by `path` directly (bytes-safe os calls)
    path: str  # local: absolute path; object store: "bucket/key"
    uri: str  # what rows and messages show: the absolute local path or the full URI

    @property
    def local(self) -> bool:
        return self.fs is None

    def join(self, *parts: str) -> Location:
        sep = os.sep if self.local else "/"
        path = sep.join([self.path.rstrip(sep), *parts])
        uri = path if self.local else self.uri.rstrip("/") + "/" + "/".join(parts)
        return Location(self.fs, path, uri)


def resolve(text: str | os.PathLike) -> Location:
    """A local path (made absolute) or a URI, resolved to its filesystem."""
    text = os.fspath(text)
    if not is_uri(text):
        absolute = os.path.abspath(text)
        return Location(None, absolute, absolute)
    scheme, rest = text.split("://", 1)
    if scheme == "file":
        return resolve(rest)
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise KmnistError(f"{text} names no bucket")
    return Location(_filesystem(f"{scheme}://{bucket}"), rest.rstrip("/"), f"{scheme}://{rest.rstrip('/')}")


def resolve_against(paths: list[str], folder: str) -> list[str]:
    """Paths a listing names, as rows show them: relative ones against `folder` (a local folder or a URI),
    absolute local paths normalized, URIs resolved."""
    out = []
    for p in paths:
        if is_uri(p):
            out.append(resolve(p).uri)
        elif os.path.isabs(p):
            out.append(os.path.normpath(p))
        elif is_uri(folder):
            out.append(folder.rstrip("/") + "/" + p)
        else:
            out.append(os.path.normpath(os.path.join(folder, p)))
    return out


def exists(loc: Location) -> bool:
    if loc.local:
        return os.path.exists(loc.path)
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def is_dir(loc: Location) -> bool:
    if loc.local:
        return os.path.isdir(loc.path)
    return loc.fs.get_file_info(loc.path).type == pafs.FileType.Directory


def read_bytes(loc: Location) -> bytes:
    if loc.local:
        with open(loc.path, "rb") as f:
            return f.read()
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()


def write_bytes_atomic(loc: Location, data: bytes, fsync: bool = False) -> None:
    """Publish `data` at `loc` whole or not at all (replacing what is there); `fsync`: durably, so that
    a power cut after this returns cannot lose it (module doc)."""
    if loc.local:
        final = Path(loc.path)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")  # hidden from readers, one per writer
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if fsync:  # a rename must never publish bytes that are not on disk
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, loc.path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # on a full disk, free what the failed write took
            raise
        if fsync:  # the rename itself is an entry of the folder: on disk only once the folder is
            fsync_dir(final.parent)
        return
    with loc.fs.open_output_stream(loc.path) as f:  # one PUT (or a multipart upload, completed at close)
        f.write(data)


def fsync_dir(path: str | os.PathLike) -> None:
    """Put a local folder's entries (files created, renamed or removed in it) on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a folder at all (as PostgreSQL found): nothing to do
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def make_dirs(loc: Location, durable: bool = False) -> None:
    """Create folder `loc` and its missing parents. `durable` (a folder of durable commits): each folder
    created is on disk in its parent when this returns, and so is `loc` when it was there already (another
    process may have created it an instant ago, without its parent fsynced yet). Locally only: an object
    store has no folders to lose."""
    if not loc.local:
        loc.fs.create_dir(loc.path, recursive=True)
        return
    if not durable:
        os.makedirs(loc.path, exist_ok=True)
        return
    missing, folder = [], os.path.abspath(loc.path)
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(loc.path, exist_ok=True)
    for created in reversed(missing or [loc.path]):
        fsync_dir(os.path.dirname(created))


def list_names(loc: Location, suffix: str = "") -> list[str]:
    """Names (not paths) of the files directly in folder `loc` ending with `suffix`, sorted; [] if absent."""
    if loc.local:
        try:
            names = os.listdir(loc.path)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(suffix) and not n.startswith("."))
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    return sorted(i.base_name for i in infos
                  if i.type == pafs.FileType.File and i.base_name.endswith(suffix) and not i.base_name.startswith("."))


def move(src: Location, dst: Location) -> None:
    """Move a file to another name on the same filesystem: a rename locally, a copy then a delete on an
    object store (which has no rename). Raises FileNotFoundError when `src` is gone."""
    if src.local:
        os.makedirs(os.path.dirname(dst.path), exist_ok=True)
        os.rename(src.path, dst.path)
    else:
        src.fs.copy_file(src.path, dst.path)
        src.fs.delete_file(src.path)


# write_bytes_atomic's temp files: ".<name>.<pid of the writer>.tmp".
TEMP_FILE = re.compile(r"^\.(.+)\.([0-9]+)\.tmp$")
STALE_TEMP_S = 10 * 60  # a writer holds its temp file for the time of one write: milliseconds, seconds at most
ORPHAN_TEMP_S = 24 * 3600  # whatever its pid: a pid reused by another process must not keep a temp file forever


def pid_gone(pid: int) -> bool:
    """No process `pid` on this machine (one of another user counts as alive: the probe is refused)."""
    if pid <= 0:
        return True  # no writer has it (and os.kill(0) would signal our own process group)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a number no pid can be
        return True
    except OSError:
        return False
    return False


def remove_stale_temps(folder: Location, now: float | None = None) -> list[str]:
    """Delete the temp files of writers that died mid-write (a crash, kill -9, a power cut) from local
    `folder`; returns their names. Conservative, since a live writer's temp file must never go: a file
    goes when untouched for STALE_TEMP_S and its writer's pid is not running here, or when untouched for
    ORPHAN_TEMP_S. Both ages, since a folder on a network filesystem has writers on other machines, whose
    pids mean nothing here. An object store has no temp files (a PUT is atomic)."""
    if not folder.local:
        return []
    now = time.time() if now is None else now
    names: list[str] = []
    with contextlib.suppress(OSError):  # a folder that cannot be listed has nothing to remove
        names = os.listdir(folder.path)
    removed = []
    for name in names:
        match = TEMP_FILE.match(name)
        if not match:
            continue
        path = os.path.join(folder.path, name)
        try:
            age = now - os.lstat(path).st_mtime
            if age >= ORPHAN_TEMP_S or (age >= STALE_TEMP_S and pid_gone(int(match.group(2)))):
                os.unlink(path)
                removed.append(name)
        except OSError:  # gone meanwhile, or not ours to remove: left as it is
            continue
    return removed


def delete(loc: Location) -> None:
    """Remove a file; nothing if absent."""
    with contextlib.suppress(FileNotFoundError):
        if loc.local:
            os.unlink(loc.path)
        else:
            loc.fs.delete_file(loc.path)


def delete_tree(loc: Location) -> None:
    """Remove a folder and everything under it; nothing if absent."""
    if loc.local:
        shutil.rmtree(loc.path, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        loc.fs.delete_dir(loc.path)
