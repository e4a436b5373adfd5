"""A real multi-node Ray on this machine: a head and a worker node started with `ray start`, jobs sent
with `ray job submit` exactly as the README's "Run on a cluster" section does. Only the processes this
module started are stopped (found by a marker in their environment).

Every node runs with KMNIST_BATCH_TEST_HOLD=1, so a job's driver and workers honour hold files
(tests/crop_tree.py, tune/grid.py): a test that needs a job busy while it acts holds it busy."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.crop_tree import HOLD_ENV, hold_file, plain_tree, release
from tests.object_store import client, new_bucket, upload_tree
from tests.processes import wait_for
from tests.tune_helpers import hold, small_data_dir, trial_epochs  # noqa: F401 (small_data_dir: a fixture)

pytestmark = [pytest.mark.timeout(300), pytest.mark.own_ray]  # its own `ray start` nodes, never the session Ray
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


def processes_with(*markers: str) -> list[int]:
    """Processes whose environment holds every marker: those this module started carry one."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                environ = (proc / "environ").read_bytes()
            except OSError:
                continue
            if all(marker.encode() in environ for marker in markers):
                pids.append(int(proc.name))
    return pids


WORKER_NODE = "KMNIST_TEST_NODE=worker"  # in the environment of the worker node's processes


class Cluster:
    def __init__(self):
        self.marker = f"KMNIST_TEST_CLUSTER={uuid.uuid4().hex}"
        self.temp = tempfile.mkdtemp(prefix="kmray-", dir="/tmp")  # short: Ray's socket paths are length-limited
        (Path(self.temp) / "tmp").mkdir()
        # Both nodes keep their session files here, and every process's temporary files go here too, so a
        # test can see what a job wrote on this machine. The token comes from the session (conftest).
        self.env = {**os.environ, **HOLD_ENV, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}",
                    "RAY_TMPDIR": self.temp, "TMPDIR": str(Path(self.temp) / "tmp"),
                    self.marker.split("=")[0]: self.marker.split("=")[1]}
        self.gcs = self.dashboard = ""

    def ray(self, *args, env=None, timeout=120, check=True):
        r = subprocess.run([str(BIN / "ray"), *args], env=env or self.env, capture_output=True, text=True,
                           timeout=timeout, cwd=REPO)
        if check and r.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def start(self):
        # Port 0: Ray binds the GCS, the dashboard and the agents to ports of the kernel's choosing and
        # says which; no port is probed first and taken by someone else in between.
        head = self.ray("start", "--head", "--port=0", "--dashboard-port=0", "--dashboard-host=127.0.0.1",
                        "--include-dashboard=true", "--dashboard-agent-listen-port=0", "--num-cpus=2",
                        f"--temp-dir={self.temp}", "--disable-usage-stats")
        self.gcs = re.search(r"ray start --address='([^']+)'", head.stdout)[1]
        self.dashboard = re.search(r"RAY_API_SERVER_ADDRESS='([^']+)'", head.stdout)[1]
        self.ray("start", f"--address={self.gcs}", "--num-cpus=2", "--disable-usage-stats",
                 "--dashboard-agent-listen-port=0", env={**self.env, "KMNIST_TEST_NODE": "worker"})
        wait_for(lambda: len(self.alive_nodes()) == 2, timeout=60)
        return self

    def alive_nodes(self) -> list[dict]:
        r = self.ray("list", "nodes", f"--address={self.dashboard}", "--format", "json", check=False, timeout=60)
        try:
            return [n for n in json.loads(r.stdout) if n["state"] == "ALIVE"]
        except ValueError:
            return []

    def job_args(self, *entrypoint, runtime_env: dict | None = None) -> list[str]:
        args = [str(BIN / "ray"), "job", "submit", f"--address={self.dashboard}", "--working-dir", "."]
        if runtime_env:
            args += ["--runtime-env-json", json.dumps(runtime_env)]
        return [*args, "--", "python", "-m", *entrypoint]

    def submit(self, *entrypoint, runtime_env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.job_args(*entrypoint, runtime_env=runtime_env), env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    def start_job(self, *entrypoint, log: Path) -> subprocess.Popen:
        """Submit without waiting; what `ray job submit` prints (the job's logs) goes to `log`."""
        with open(log, "w") as f:
            return subprocess.Popen(self.job_args(*entrypoint), env=self.env, cwd=REPO, stdout=f,
                                    stderr=subprocess.STDOUT)

    def lose_worker_node(self) -> None:
        """Kill -9 every process of the worker node at once, as when its machine is lost, and return once
        they are gone (a worker killed only through its raylet could still commit what it was doing)."""
        node = processes_with(self.marker, WORKER_NODE)
        assert node, "no worker node process found"
        for pid in node:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not processes_with(self.marker, WORKER_NODE), timeout=60)

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


def succeeded(r: subprocess.CompletedProcess) -> bool:
    return r.returncode == 0 and "succeeded" in r.stdout


@pytest.mark.ray
def test_job_api_requires_the_auth_token(cluster):
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    r = cluster.ray("job", "list", f"--address={cluster.dashboard}", env=env, check=False, timeout=60)
    assert r.returncode != 0 and "auth" in (r.stdout + r.stderr).lower()
    assert cluster.ray("job", "list", f"--address={cluster.dashboard}", timeout=60).returncode == 0


@pytest.mark.ray
@pytest.mark.training
def test_tune_job_runs_trials_on_both_nodes(cluster, tmp_path, small_data_dir):
    """Trial lr 0.001 waits before its first epoch until trial lr 0.0003 has trained one: the two run at
    the same time, and 1.5 CPUs each fit once per node, so they run on different nodes."""
    out = tmp_path / "grid"
    out.mkdir()
    held = hold(out, 0.001, 128, 1)
    job = cluster.start_job("jobs.tune_grid", "--out", str(out), "--lr", "0.001,0.0003", "--batch-size", "128",
                            "--epochs", "1", "--cpus-per-trial", "1.5", "--data-dir", str(small_data_dir),
                            log=tmp_path / "job.log")
    try:
        wait_for(lambda: trial_epochs(out / "ray_results" / "grid").get(0.0003, 0) >= 1 or job.poll() is not None)
    finally:
        release(held)
        job.wait(timeout=300)
    log = (tmp_path / "job.log").read_text()
    assert job.returncode == 0 and "succeeded" in log, log[-3000:]
    params = [json.loads(p.read_text()) for p in (out / "ray_results" / "grid").glob("*/params.json")]
    assert len(params) == 2 and all(p.get("test_hold") for p in params)  # the job's driver had the hold on
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2 and (trials.status == "completed").all()
    assert set(trials.node_id) == {n["node_id"] for n in cluster.alive_nodes()}
    assert (out / "best" / "model.pt").exists()


OUTPUT_NAMES = {"run.json", "_progress.json", ".lock", "predictions", "summary"}


def output_like(roots: list[Path]) -> set[Path]:
    """Files and folders under `roots` named like a predict OUT's, or like an object-store URI taken
    for a local path ("s3:")."""
    found = set()
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                if name in OUTPUT_NAMES or name.startswith("_run-") or name.endswith(".parquet") or "s3:" in name:
                    found.add(Path(folder) / name)
    return found


@pytest.mark.ray
def test_predict_job_reads_and_writes_only_the_object_store_on_both_nodes(cluster, s3_server, tmp_path, kmnist_dev):
    """Inputs and OUT on S3: the workers on both nodes read their crops and write their shards there, and
    nothing of the output lands on this machine (the nodes' session folders, where the job runs, and
    every process's temporary folder are under the cluster's folder)."""
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    fs = client(s3_server)
    bucket = new_bucket(s3_server)
    plain_tree(tmp_path / "crops", kmnist_dev.test.images, 500)
    objects = upload_tree(s3_server, tmp_path / "crops", bucket, "crops")
    aws = {k: v for k, v in s3_server.items() if k.startswith("AWS_")}
    local = [Path(cluster.temp), tmp_path, Path(os.environ["HOME"])]
    before = output_like(local)
    # The standard way to hand a job its credentials and endpoint: the job's runtime environment.
    r = cluster.submit("jobs.predict", f"s3://{bucket}/crops", "--out", f"s3://{bucket}/out", "--executor", "ray",
                       "--workers", "2", "--cpus-per-worker", "1.5", "--batch-size", "256", "--rows-per-shard", "100",
                       runtime_env={"env_vars": aws})
    assert succeeded(r), r.stdout[-3000:] + r.stderr[-3000:]
    assert output_like(local) == before
    assert {"run.json", "predictions"} <= {Path(i.path).name for i in fs.get_file_info(pafs.FileSelector(f"{bucket}/out"))}
    t = ds.dataset(f"{bucket}/out/predictions", format="parquet", filesystem=fs).to_table(columns=["path", "node_id"])
    assert sorted(t.column("path").to_pylist()) == sorted(objects)
    assert set(t.column("node_id").to_pylist()) == {n["node_id"] for n in cluster.alive_nodes()}


def committed(predictions: Path) -> pd.DataFrame:
    """The rows committed so far (a shard appears whole, by rename)."""
    shards = sorted(predictions.glob("*.parquet"))
    return pd.concat([pd.read_parquet(f, columns=["path", "node_id"]) for f in shards]) if shards else \
        pd.DataFrame(columns=["path", "node_id"])


@pytest.mark.ray
def test_predict_job_runs_on_both_nodes_and_losing_one_mid_run_still_gives_one_row_per_file(cluster, tmp_path,
                                                                                          kmnist_dev):
    """Runs last: it kills the worker node. One model worker per node (1.5 CPUs each do not fit twice on a
    node); 50 files a chunk gives at least 6 chunks, and the driver queues two on each worker before any
    result is back, so both nodes commit shards. The last crop is a hold file (its chunk cannot finish
    before the test releases it), so the worker node dies mid-run, after both nodes have committed."""
    files = plain_tree(tmp_path / "scans", kmnist_dev.test.images, 600)
    held = hold_file(tmp_path / "scans" / "zz", kmnist_dev.test.images[0])  # sorted last: in the last chunk
    out = tmp_path / "out"
    args = ["jobs.predict", str(tmp_path / "scans"), "--out", str(out), "--executor", "ray", "--workers", "2",
            "--cpus-per-worker", "1.5", "--batch-size", "64", "--rows-per-shard", "50"]
    nodes = {n["node_id"]: n["is_head_node"] for n in cluster.alive_nodes()}
    job = cluster.start_job(*args, log=tmp_path / "job.log")
    try:
        wait_for(lambda: committed(out / "predictions").node_id.nunique() == 2 or job.poll() is not None)
        at_loss = committed(out / "predictions")
        cluster.lose_worker_node()  # with its model actor
    finally:
        release(held)
        job.wait(timeout=300)
    assert set(at_loss.node_id) == set(nodes) and str(held) not in set(at_loss.path)  # cut off mid-run
    if job.returncode != 0:  # the documented fallback: the job failed clearly, --resume completes it
        assert len(committed(out / "predictions")) < len(files) + 1  # it left work for --resume
        r = cluster.submit(*args, "--resume")
        assert succeeded(r), r.stdout[-3000:]
    df = pd.read_parquet(out / "predictions")
    assert len(df) == len(files) + 1 and not df.path.duplicated().any() and df.error.isna().all()
    assert set(df.node_id) == set(nodes)  # rows from before the loss came from the lost node too
    head = next(node for node, is_head in nodes.items() if is_head)
    assert df.node_id[df.path == str(held)].tolist() == [head]  # finished by the node that survived
