"""A real multi-node Ray on this machine: a head and a worker node started with `ray start`, jobs sent
with `ray job submit` exactly as the README's "Run on a cluster" section does. Only the processes this
module started are stopped (found by a marker in their environment)."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.crop_tree import plain_tree

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def validated(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(copy.deepcopy(config))
    validate_config(full)
    return full


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-onprem.yaml"])
def test_cluster_configs_pass_rays_validation(name):
    config = yaml.safe_load((REPO / name).read_text())
    full = validated(config)
    assert full["cluster_name"].startswith("kmnist-batch")
    assert any("RAY_AUTH_MODE=token" in c for c in full["head_start_ray_commands"])  # auth stays on
    broken = {**config, "not_a_ray_field": 1}
    with pytest.raises(Exception, match="not_a_ray_field"):
        validated(broken)


def test_aws_config_has_cpu_and_gpu_worker_types():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert {"cpu_worker", "gpu_worker"} <= set(types)
    assert all("min_workers" in t and "max_workers" in t for k, t in types.items() if k != config["head_node_type"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_with(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "environ").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


class Cluster:
    def __init__(self):
        self.marker = f"KMNIST_TEST_CLUSTER={uuid.uuid4().hex}"
        self.temp = tempfile.mkdtemp(prefix="kmray-", dir="/tmp")  # short: Ray's socket paths are length-limited
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}",
                    self.marker.split("=")[0]: self.marker.split("=")[1]}
        self.env.pop("RAY_ADDRESS", None)

    def ray(self, *args, env=None, timeout=120, check=True):
        r = subprocess.run([str(BIN / "ray"), *args], env=env or self.env, capture_output=True, text=True,
                           timeout=timeout, cwd=REPO)
        if check and r.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def start(self):
        self.ray("start", "--head", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
                 "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
                 f"--temp-dir={self.temp}", "--disable-usage-stats")
        worker_env = {**self.env, "KMNIST_TEST_NODE": "worker"}
        self.ray("start", f"--address=127.0.0.1:{self.gcs_port}", "--num-cpus=2", "--disable-usage-stats",
                 f"--dashboard-agent-listen-port={free_port()}", env=worker_env)
        deadline = time.time() + 60
        while time.time() < deadline:
            status = self.ray("status", f"--address=127.0.0.1:{self.gcs_port}", check=False).stdout
            if status.split("Pending:")[0].count(" node_") >= 2:
                return self
            time.sleep(1)
        raise AssertionError("the worker node never joined")

    def submit(self, *entrypoint, timeout=300):
        return self.ray("job", "submit", f"--address={self.dashboard}", "--working-dir", ".", "--",
                        "python", "-m", *entrypoint, timeout=timeout, check=False)

    def worker_raylet(self) -> int:
        for pid in processes_with("KMNIST_TEST_NODE=worker"):
            try:
                if b"raylet/raylet" in Path(f"/proc/{pid}/cmdline").read_bytes() and self.marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                    return pid
            except OSError:
                pass
        raise AssertionError("no worker raylet found")

    def stop(self):
        for _ in range(3):
            for pid in processes_with(self.marker):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        yield c.start()
    finally:
        c.stop()
    assert not processes_with(c.marker)


def test_job_api_requires_the_auth_token(cluster):
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    r = cluster.ray("job", "list", f"--address={cluster.dashboard}", env=env, check=False, timeout=60)
    assert r.returncode != 0 and "auth" in (r.stdout + r.stderr).lower()
    assert cluster.ray("job", "list", f"--address={cluster.dashboard}", timeout=60).returncode == 0


def test_predict_job_runs_on_both_nodes(cluster, tmp_path, kmnist_dev):
    files = plain_tree(tmp_path / "scans", kmnist_dev.test.images, 6000)
    out = tmp_path / "out"
    # 500 files a chunk gives about 12 chunks; at the default 4096, 6000 files are one chunk in
    # about one run of seven (no content-defined boundary falls in range) and only one worker has work.
    r = cluster.submit("jobs.predict", str(tmp_path / "scans"), "--out", str(out), "--workers", "2",
                       "--cpus-per-worker", "1.5", "--batch-size", "256", "--rows-per-shard", "500")
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    df = pd.read_parquet(out / "predictions")
    assert len(df) == len(files) and not df.path.duplicated().any()
    assert df.node_id.nunique() == 2  # one model actor per node (1.5 CPUs each do not fit twice on a node)


def test_tune_job_runs_trials_on_both_nodes(cluster, tmp_path):
    out = tmp_path / "grid"
    r = cluster.submit("jobs.tune_grid", "--out", str(out), "--lr", "0.001,0.0003", "--batch-size", "128",
                       "--epochs", "1", "--cpus-per-trial", "1.5")
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2 and (trials.status == "completed").all()
    assert trials.node_id.nunique() == 2
    assert (out / "best" / "model.pt").exists()


def test_predict_job_reads_and_writes_only_the_object_store_on_both_nodes(cluster, s3_server, tmp_path, kmnist_dev):
    """Inputs and OUT on S3: the workers on both nodes read their crops and write their shards there."""
    import json

    import pyarrow.dataset as ds

    from tests.test_object_store import upload_tree

    plain_tree(tmp_path / "crops", kmnist_dev.test.images, 3000)
    bucket = f"b-{uuid.uuid4().hex[:8]}"
    objects = upload_tree(s3_server, tmp_path / "crops", bucket, "crops")
    aws = {k: v for k, v in s3_server.items() if k.startswith("AWS_")}
    # The standard way to hand a job its credentials and endpoint: the job's runtime environment.
    r = cluster.ray("job", "submit", f"--address={cluster.dashboard}", "--working-dir", ".",
                    "--runtime-env-json", json.dumps({"env_vars": aws}), "--", "python", "-m", "jobs.predict",
                    f"s3://{bucket}/crops", "--out", f"s3://{bucket}/out", "--workers", "2", "--cpus-per-worker", "1.5",
                    "--batch-size", "256", "--rows-per-shard", "500", timeout=300, check=False)
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    os.environ.update(aws)
    try:
        t = ds.dataset(f"s3://{bucket}/out/predictions", format="parquet").to_table(columns=["path", "node_id"])
    finally:
        for k in aws:
            os.environ.pop(k)
    assert sorted(t.column("path").to_pylist()) == sorted(objects)
    assert len(set(t.column("node_id").to_pylist())) == 2


def committed_nodes(predictions: Path) -> set[str]:
    """The nodes that have committed a shard so far (a shard appears whole, by rename)."""
    import pyarrow.parquet as pq

    return {n for f in predictions.glob("*.parquet") for n in pq.read_table(f, columns=["node_id"]).column(0).to_pylist()}


def test_losing_the_worker_node_mid_predict_still_gives_one_row_per_file(cluster, tmp_path, kmnist_dev):
    """Runs last: it kills the worker node."""
    files = plain_tree(tmp_path / "scans", kmnist_dev.test.images, 20000)
    out = tmp_path / "out"
    args = ["jobs.predict", str(tmp_path / "scans"), "--out", str(out), "--workers", "2",
            "--cpus-per-worker", "1.5", "--batch-size", "64", "--rows-per-shard", "500"]
    job = subprocess.Popen([str(BIN / "ray"), "job", "submit", f"--address={cluster.dashboard}", "--working-dir",
                            ".", "--", "python", "-m", *args], env=cluster.env, cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and len(committed_nodes(out / "predictions")) < 2:
        time.sleep(0.1)
    os.kill(cluster.worker_raylet(), signal.SIGKILL)  # the worker node dies with its model actor
    log, _ = job.communicate(timeout=400)
    if job.returncode != 0:  # the documented fallback: the job failed clearly, --resume completes it
        r = cluster.submit(*args, "--resume")
        assert r.returncode == 0, r.stdout[-3000:]
    df = pd.read_parquet(out / "predictions")
    assert len(df) == len(files) and not df.path.duplicated().any() and df.error.isna().all()
    assert df.node_id.nunique() == 2  # rows from before the loss came from the lost node too
