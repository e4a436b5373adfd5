"""Shared fixtures: a real HTTP server on 127.0.0.1 and small real KMNIST data."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest

from kmnist_core.datasets import Dataset, Split, load_dataset


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """Serve a fresh directory over HTTP on 127.0.0.1; yields (directory, base_url)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def kmnist_dev() -> Dataset:
    return load_dataset("kmnist-dev")


@pytest.fixture(scope="session")
def small_dev(kmnist_dev) -> Dataset:
    """600 train / 200 val / 200 test real images: enough for a one-epoch smoke run."""
    cut = lambda s, n: Split(s.images[:n], s.labels[:n])  # noqa: E731
    d = kmnist_dev
    return Dataset(d.name, d.classes, d.input_size, cut(d.train, 600), cut(d.val, 200), cut(d.test, 200),
                   d.split_note + " (first 600/200/200 for tests)", d.primary_metric)


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory, small_dev) -> Path:
    """A real simple-cnn model directory trained for one epoch on real images."""
    from kmnist_core.experiment import run_train
    from kmnist_core.train import TrainConfig

    out = tmp_path_factory.mktemp("model")
    run_train(TrainConfig(epochs=1, batch_size=64, threads=2), out, data=small_dev, make_plots=False)
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole session (2 CPUs, as on CI)."""
    import ray

    # address="local": always a fresh Ray, never a cluster someone else started on this machine with `ray start`.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto's standalone server) on 127.0.0.1, as s3fs's own tests use.
    Yields the environment a client needs (endpoint and dummy credentials); pyarrow, the CLI and Ray
    workers started with it reach the server the standard way (AWS_ENDPOINT_URL)."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    yield {**os.environ, **env}
    server.terminate()
    server.wait(timeout=30)
