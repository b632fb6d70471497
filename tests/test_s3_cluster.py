"""Cluster storage on S3 (slow), against a real S3-compatible server on 127.0.0.1 (moto): a 2-node loopback
Ray cluster started with `ray start` searching into s3://, a worker node killed mid-trial, the driver
SIGKILLed and `gatetune resume s3://...`, and `gatetune report s3://...` equal to the report of a local copy."""
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import free_port
from gatetune.results import read_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "search_spaces", "quickstart.yaml")
GATETUNE = [sys.executable, "-m", "gatetune.tuning.cli"]
RAY = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"]


def _env():
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _s3(uri: str):
    from pyarrow import fs
    return fs.FileSystem.from_uri(uri)


def _files(uri: str) -> list[str]:
    from pyarrow import fs
    remote, root = _s3(uri)
    try:
        return [i.path[len(root):].lstrip("/") for i in remote.get_file_info(fs.FileSelector(root, recursive=True))]
    except FileNotFoundError:
        return []


def _read(uri: str, rel: str) -> str:
    remote, root = _s3(uri)
    with remote.open_input_stream(f"{root}/{rel}") as f:
        return f.read().decode()


class LoopbackCluster:
    """A head and a worker node on this machine (`ray start`, one CPU each, every port distinct), stopped by
    killing exactly its own processes (never `ray stop`, which would stop every Ray on the machine)."""

    def __init__(self, worker: bool = True, dashboard: bool = False):
        """worker=False: the head alone (with two CPUs); dashboard: the head runs Ray's dashboard and job
        server on 127.0.0.1 (self.dashboard is its URL)."""
        self.tmp = tempfile.mkdtemp(prefix="gt-ray-")
        self.port = free_port()
        ports = [free_port() for _ in range(16)]
        common = ["--object-store-memory=100000000", "--disable-usage-stats"]
        self.dashboard = f"http://127.0.0.1:{ports[0]}"
        head = ["start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}", f"--temp-dir={self.tmp}",
                f"--include-dashboard={'true' if dashboard else 'false'}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={ports[0]}", f"--ray-client-server-port={ports[1]}", *self._node_ports(ports[2:8]),
                "--min-worker-port=21000", "--max-worker-port=21099", f"--num-cpus={1 if worker else 2}", *common]
        self.worker_manager_port = ports[8]
        workers = [["start", f"--address=127.0.0.1:{self.port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                    *self._node_ports(ports[8:14]), "--min-worker-port=21100", "--max-worker-port=21199", *common]]
        for args in [head, *workers[:int(worker)]]:
            r = subprocess.run([*RAY, *args], env=_env(), capture_output=True, text=True, timeout=180)
            if r.returncode:
                self.stop()
                raise RuntimeError(f"ray {' '.join(args[:2])} failed: {r.stderr[-2000:]}")
        self.address = f"127.0.0.1:{self.port}"

    @staticmethod
    def _node_ports(p):
        return [f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}", f"--dashboard-agent-listen-port={p[2]}",
                f"--dashboard-agent-grpc-port={p[3]}", f"--runtime-env-agent-port={p[4]}", f"--metrics-export-port={p[5]}"]

    def kill_worker_node(self):
        raylet = _pids(lambda cmd: f"--node_manager_port={self.worker_manager_port}" in cmd)
        assert raylet, "the worker node's raylet is not running"
        _signal(_tree(raylet), signal.SIGKILL)

    def stop(self):
        procs = _tree(_pids(lambda cmd: self.tmp in cmd or f":{self.port} " in cmd + " "))
        _signal(procs, signal.SIGTERM)
        time.sleep(3)
        _signal(procs, signal.SIGKILL)


def _procs() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command line)} from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            out[int(entry)] = (ppid, cmd)
    return out


def _pids(match) -> set[int]:
    return {pid for pid, (_, cmd) in _procs().items() if match(cmd) and pid != os.getpid()}


def _tree(roots: set[int]) -> set[int]:
    procs, tree = _procs(), set(roots)
    while True:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in tree} - tree
        if not more:
            return tree
        tree |= more


def _signal(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _epochs(uri: str, trial: str) -> list[float]:
    return [json.loads(line)["epoch"] for line in _read(uri, f"{trial}/result.json").splitlines() if line.strip()]


@pytest.mark.slow
def test_worker_node_killed_mid_trial_resumes_from_s3_checkpoint(s3_bucket, tmp_path):
    cluster = LoopbackCluster()
    uri = f"{s3_bucket}/runs/nodes"
    try:
        cmd = [*GATETUNE, "search", QUICK, "train.epochs=6", "search.num_samples=2", "search.scheduler.name=fifo",
               "search.max_concurrent=2", "--address", cluster.address, "--storage", f"{s3_bucket}/runs",
               "--name", "nodes"]
        p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while time.time() < deadline:   # both trials (one per node) have an epoch checkpointed in the bucket
            if sum(f.endswith("checkpoint_000001/state.pt") for f in _files(uri)) >= 2:
                break
            time.sleep(0.5)
        cluster.kill_worker_node()
        out, _ = p.communicate(timeout=400)
        assert p.returncode == 0, out[-3000:]
    finally:
        cluster.stop()
    files = _files(uri)
    report = read_report(io.StringIO(_read(uri, "report.csv")))
    assert len(report) == 2 and (report["status"] == "completed").all() and (report["epochs"] == 6).all()
    failed = [t for t in {f.split("/")[0] for f in files if f.startswith("trial_")} if f"{t}/error.txt" in files]
    assert len(failed) == 1, files                    # the trial on the killed node failed once ...
    epochs = _epochs(uri, failed[0])
    assert epochs[-1] == 6 and len(epochs) - len(set(epochs)) <= 1, epochs   # ... and went on: <= 1 epoch again


@pytest.mark.slow
def test_driver_sigkill_then_resume_s3_and_report_equals_local_copy(s3_bucket, tmp_path):
    uri = f"{s3_bucket}/runs/crash"
    cmd = [*GATETUNE, "search", QUICK, "train.epochs=3", "search.num_samples=4", "search.scheduler.name=fifo",
           "--storage", f"{s3_bucket}/runs", "--name", "crash"]
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not any(f.endswith("checkpoint_000001/state.pt") for f in _files(uri)):
        time.sleep(0.3)
    os.killpg(p.pid, signal.SIGKILL)        # the driver and the local Ray it started
    p.wait()
    r = subprocess.run([*GATETUNE, "resume", uri], env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "search finished" in r.stdout
    remote = read_report(io.StringIO(_read(uri, "report.csv")))
    assert len(remote) == 4 and remote["trial_id"].is_unique and (remote["status"] == "completed").all()
    assert (remote["epochs"] == 3).all()
    # the Optuna study copy in the bucket holds each trial once
    import optuna
    local_db = tmp_path / "optuna.db"
    local_db.write_bytes(_s3(uri)[0].open_input_stream(f"{_s3(uri)[1]}/optuna.db").read())
    study = optuna.load_study(study_name="crash", storage=f"sqlite:///{local_db}")
    assert sorted(t.user_attrs["trial_id"] for t in study.trials) == sorted(remote["trial_id"])
    # `gatetune report s3://...` gives the table a local copy of the folder gives
    from pyarrow import fs
    copy = tmp_path / "copy" / "crash"
    copy.mkdir(parents=True)
    fs.copy_files(_s3(uri)[1], str(copy), source_filesystem=_s3(uri)[0], destination_filesystem=fs.LocalFileSystem())
    r = subprocess.run([*GATETUNE, "report", uri], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    r_local = subprocess.run([*GATETUNE, "report", str(copy)], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.stdout == r_local.stdout and "| digitnet" in r.stdout
