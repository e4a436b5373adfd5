"""Test set-up on the suite's S3-protocol server (moto, tests/conftest.py `s3_server`): buckets and
objects, and the pyarrow client a downstream reader would use to read results back.

Set-up writes objects with plain HTTP PUTs on kept-alive connections, not through pyarrow: pyarrow's S3
client spent ~24 ms per small PUT against moto where the server itself needs ~3 ms (measured on the
2-core machine), and the suite uploads thousands. What is tested (kmnist-batch's own reads and writes)
still goes through pyarrow.
"""

from __future__ import annotations

import http.client
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable
from urllib.parse import quote, urlsplit

import pyarrow.fs as pafs


def client(env: dict) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="test", secret_key="test",
                             allow_bucket_creation=True)


def new_bucket(env: dict) -> str:
    name = f"b-{uuid.uuid4().hex[:8]}"
    client(env).create_dir(name)
    return name


def put_objects(env: dict, objects: Iterable[tuple[str, bytes]], connections: int = 4) -> list[str]:
    """PUT each (key "bucket/path", bytes); returns their s3:// URIs in the given order."""
    endpoint = urlsplit(env["AWS_ENDPOINT_URL"])
    local = threading.local()
    opened: list[http.client.HTTPConnection] = []

    def put(item: tuple[str, bytes]) -> str:
        key, data = item
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(endpoint.hostname, endpoint.port, timeout=30)
            opened.append(local.conn)
        local.conn.request("PUT", "/" + quote(key), body=data)
        response = local.conn.getresponse()
        response.read()
        if response.status != 200:
            raise OSError(f"PUT {key}: HTTP {response.status}")
        return f"s3://{key}"

    try:
        with ThreadPoolExecutor(connections) as pool:
            return list(pool.map(put, objects))
    finally:
        for conn in opened:
            conn.close()


def upload_tree(env: dict, root: Path, bucket: str, prefix: str) -> set[str]:
    """Every file under `root` as an object under s3://bucket/prefix/; returns their URIs."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    return set(put_objects(env, ((f"{bucket}/{prefix}/{p.relative_to(root).as_posix()}", p.read_bytes()) for p in files)))


def report_root(fs: pafs.FileSystem, out: str) -> str:
    """The current report of an object-store OUT ("bucket/prefix"), as a downstream reader finds it with
    pyarrow alone: OUT/report.json names the generation (reviews/report_set.py)."""
    import json

    with fs.open_input_stream(f"{out}/report.json") as f:
        return f"{out}/.reports/{json.loads(f.read())['generation']}"
