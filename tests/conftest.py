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

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
