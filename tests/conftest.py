"""Shared fixtures: a hermetic environment, a real HTTP server on 127.0.0.1, small real KMNIST data, one
local Ray, an S3-protocol server.

Hermetic: before any test runs, every variable that would make a test read or write outside its temp dirs
points into one per-session folder (HOME, caches, matplotlib's config, Ray's temp dir and auth token), and
what would send the suite's work elsewhere (RAY_ADDRESS, AWS_*, KMNIST_*) is cleared. Every process the
suite starts inherits this environment. The user's environment is restored exactly at the end.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest

# Prefixes of variables that would point the suite at someone else's cluster, bucket, data or mirror.
FOREIGN_PREFIXES = ("RAY_", "AWS_", "KMNIST_", "S3_", "BOTO")
_saved_environ: dict[str, str] | None = None
SESSION_ROOT: Path | None = None


def pytest_configure(config) -> None:
    global _saved_environ, SESSION_ROOT
    _saved_environ = dict(os.environ)
    # Short, under /tmp: Ray's unix socket paths are length-limited.
    SESSION_ROOT = Path(tempfile.mkdtemp(prefix="kmt-", dir="/tmp"))
    if not hasattr(config, "workerinput"):  # the xdist controller, or a run without xdist
        os.environ[SCHEDULE_FILE] = str(SESSION_ROOT / "schedule")
    for key in [k for k in os.environ if k.startswith(FOREIGN_PREFIXES)]:
        del os.environ[key]
    home = SESSION_ROOT / "home"
    for sub in ("home", "cache", "config", "mpl", "ray", "tmp"):
        (SESSION_ROOT / sub).mkdir()
    token = SESSION_ROOT / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ.update({
        "HOME": str(home), "XDG_CACHE_HOME": str(SESSION_ROOT / "cache"),
        "XDG_CONFIG_HOME": str(SESSION_ROOT / "config"), "MPLCONFIGDIR": str(SESSION_ROOT / "mpl"),
        # Every Ray the suite starts (ray.init, the CLI, `ray start`) reads this token and keeps its
        # session files here, so nothing lands in the home folder or the shared /tmp/ray.
        "RAY_AUTH_TOKEN_PATH": str(token), "RAY_TMPDIR": str(SESSION_ROOT / "ray"),
        "RAY_USAGE_STATS_ENABLED": "0", "KMNIST_DATA_DIR": str(SESSION_ROOT / "data"),
        # Temp files of the suite and of every process it starts (a run killed mid-report leaves its
        # duplicate-check spill behind) go where the session's end removes them, not in the shared /tmp.
        "TMPDIR": str(SESSION_ROOT / "tmp"),
    })
    tempfile.tempdir = None  # gettempdir() may have been read already; it is read again from TMPDIR


def pytest_unconfigure(config) -> None:
    if _saved_environ is not None:
        os.environ.clear()
        os.environ.update(_saved_environ)
        tempfile.tempdir = None
    if SESSION_ROOT is not None:
        shutil.rmtree(SESSION_ROOT, ignore_errors=True)


# Fixtures whose use makes a test slow in a way `make test-fast` leaves out.
TRAINING_FIXTURES = {"trained_model_dir"}
RAY_FIXTURES = {"ray_session"}


# A module whose module-level `pytestmark` (one line, as every module here writes it) marks it ray or training.
WHOLE_MODULE_MARK = re.compile(r"^pytestmark = .*\bpytest\.mark\.(ray|training)\b", re.MULTILINE)


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    """Where Ray and training tests are deselected (`make test-fast`), modules made only of them are not even
    imported: collecting them would import Ray Tune and Ray Data in every worker for nothing (~1.5 s)."""
    if config.getoption("markexpr") != "not ray and not training" or collection_path.suffix != ".py":
        return None
    if not collection_path.name.startswith("test_"):
        return None
    return True if WHOLE_MODULE_MARK.search(collection_path.read_text(encoding="utf-8")) else None


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & TRAINING_FIXTURES:
            item.add_marker(pytest.mark.training)
        if names & RAY_FIXTURES:
            item.add_marker(pytest.mark.ray)
    if hasattr(config, "workerinput") and os.environ.get(SCHEDULE_FILE):  # an xdist worker: tell the scheduler
        ray = [i.nodeid for i in items if i.get_closest_marker("ray") and not i.get_closest_marker("own_ray")]
        slow = [i.nodeid for i in items if i.get_closest_marker("own_ray") or i.get_closest_marker("training")]
        listing = Path(f"{os.environ[SCHEDULE_FILE]}.{config.workerinput['workerid']}")
        listing.with_suffix(".tmp").write_text(json.dumps({"ray": ray, "slow": slow}))
        listing.with_suffix(".tmp").rename(listing)


# `make test` runs `pytest -n 2 --dist loadgroup`, scheduled by RayInOneWorker below:
# - every test on the session Ray in one worker, in collection order: one session Ray, its fixtures built once;
# - every other module whole, wherever a worker is free: its fixtures (a trained model, a predicted run) are
#   built once, not in each worker. Tests marked `own_ray` (a `ray start` cluster of their own) are such a module;
# - the Ray tests first, then the modules with slow tests (own_ray, training), then the rest: the long units
#   start at once on both workers, and the short ones fill the gaps (a slow module last would run alone).
# Workers know the markers, the scheduler (in the controller) only node ids: each worker lists the Ray and
# the slow tests in SCHEDULE_FILE.<worker id> as it collects, before scheduling starts. (xdist's
# xdist_group marker cannot do this under pytest 9, whose node ids xdist can no longer suffix.)
SCHEDULE_FILE = "KMT_SCHEDULE_FILE"


def pytest_xdist_make_scheduler(config, log):
    from collections import OrderedDict

    from xdist.scheduler import LoadScopeScheduling

    def module(nodeid: str) -> str:
        return nodeid.split("::", 1)[0]

    class RayInOneWorker(LoadScopeScheduling):
        listed: dict[str, set[str]] | None = None
        ordered = False

        def lists(self) -> dict[str, set[str]]:
            if self.listed is None:
                path = Path(os.environ[SCHEDULE_FILE])
                listing = json.loads(next(path.parent.glob(path.name + ".gw*")).read_text())
                self.listed = {"ray": set(listing["ray"]), "slow": {module(n) for n in listing["slow"]}}
            return self.listed

        def _split_scope(self, nodeid: str) -> str:
            return "ray" if nodeid in self.lists()["ray"] else module(nodeid)

        def _assign_work_unit(self, node) -> None:
            if not self.ordered:  # once, when the whole queue is known
                rank = lambda scope: 0 if scope == "ray" else 1 if scope in self.lists()["slow"] else 2  # noqa: E731
                self.workqueue = OrderedDict(sorted(self.workqueue.items(), key=lambda unit: rank(unit[0])))
                self.ordered = True
            super()._assign_work_unit(node)

    return RayInOneWorker(config, log) if config.getvalue("dist") == "loadgroup" else None


@pytest.fixture
def closed_port():
    """A port on 127.0.0.1 that refuses connections for the whole test: bound here but never listening,
    so no other process can listen on it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


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
def kmnist_dev():
    from kmnist_core.datasets import load_dataset

    return load_dataset("kmnist-dev")


@pytest.fixture(scope="session")
def small_dev(kmnist_dev):
    """600 train / 200 val / 200 test real images: enough for a one-epoch smoke run."""
    from kmnist_core.datasets import Dataset, Split

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
    workers started with it reach the server the standard way (AWS_ENDPOINT_URL). The server picks its
    own port (-p 0) and says which, so no other process can take it between a probe and the bind."""
    import re
    import subprocess
    import sys

    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(server.stderr.readline, "")), daemon=True)
    reader.start()
    port = None
    for _ in range(600):  # 60 s
        found = re.search(r"Running on http://127\.0\.0\.1:(\d+)", "".join(lines))
        if found:
            port = int(found[1])
            break
        if server.poll() is not None:
            break
        threading.Event().wait(0.1)
    if port is None:
        server.kill()
        raise RuntimeError("moto_server did not start: " + "".join(lines)[-2000:])
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    yield {**os.environ, **env}
    server.terminate()
    server.wait(timeout=30)
