"""A Ray cluster on this one machine, started the way a lab starts one (`ray start --head`, then `ray start
--address` per worker node), every node on 127.0.0.1 with ports of its own: what the cluster tests and
bench/chaos.py run searches on. Worker nodes can be killed (SIGKILL of the raylet and every process under
it, as when a machine loses power) and started again (a new node to Ray, with new ports). Nodes may declare
GPUs they do not have (`ray start --num-gpus=N`): Ray then places trials on those GPU ids as on a GPU node.

    cluster = LoopbackCluster(workers=2, gpus=0)
    ... gatetune search ... --address cluster.address
    cluster.kill_worker(0); cluster.start_worker(0)
    cluster.stop()     # kills exactly this cluster's processes (never `ray stop`, which stops every Ray here)

Used by tests (tests/conftest.py puts this folder on sys.path) and by bench scripts (run from here).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

RAY = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"]
GATETUNE = [sys.executable, "-m", "gatetune.tuning.cli"]


def env() -> dict[str, str]:
    """The environment of `ray start` and of the `gatetune` commands run against the cluster."""
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """A head and `workers` worker nodes (`ray start`, head_cpus / worker_cpus CPUs and `gpus` GPUs each)."""

    def __init__(self, workers: int = 1, head_cpus: int = 1, worker_cpus: int = 1, gpus: int = 0,
                 dashboard: bool = False, object_store_mb: int = 100):
        """dashboard: the head runs Ray's dashboard and job server on 127.0.0.1 (self.dashboard is its URL)."""
        self.tmp = tempfile.mkdtemp(prefix="gt-ray-")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.worker_cpus, self.gpus = worker_cpus, gpus
        self.common = [f"--object-store-memory={object_store_mb * 1000 * 1000}", "--disable-usage-stats",
                       *([f"--num-gpus={gpus}"] if gpus else [])]
        ports = [free_port() for _ in range(8)]
        self.dashboard = f"http://127.0.0.1:{ports[0]}"
        self.manager_ports: list[int | None] = [None] * workers   # each worker node's raylet, None when down
        self.monitors: dict[int, set[int]] = {}   # each worker node's log monitor (a sibling of its raylet)
        try:
            self._start_head(ports, head_cpus, dashboard)
            for i in range(workers):
                self.start_worker(i)
        except BaseException:
            self.stop()
            raise

    def _start_head(self, ports: list[int], head_cpus: int, dashboard: bool) -> None:
        _ray(["start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}", f"--temp-dir={self.tmp}",
              f"--include-dashboard={'true' if dashboard else 'false'}", "--dashboard-host=127.0.0.1",
              f"--dashboard-port={ports[0]}", f"--ray-client-server-port={ports[1]}", *_node_ports(ports[2:8]),
              "--min-worker-port=21000", "--max-worker-port=21099", f"--num-cpus={head_cpus}", *self.common])

    def start_worker(self, i: int) -> None:
        """Start worker node i (again): new ports, its own range of worker ports; RuntimeError if `ray start`
        fails."""
        ports = [free_port() for _ in range(6)]
        low = 21100 + 100 * i
        before = pids(_log_monitor)
        _ray(["start", f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={self.worker_cpus}",
              *_node_ports(ports), f"--min-worker-port={low}", f"--max-worker-port={low + 99}", *self.common])
        self.manager_ports[i] = ports[0]
        self.monitors[i] = pids(_log_monitor) - before

    def kill_worker(self, i: int) -> int:
        """SIGKILL worker node i's raylet and every process under it; how many processes that was."""
        port, self.manager_ports[i] = self.manager_ports[i], None
        raylet = _raylet(port)
        assert raylet, f"worker node {i}'s raylet is not running"
        # its log monitor is no child of the raylet: left running, one per kill, they would poll the shared
        # session's logs and take the machine's CPU (a rebooted node takes its own with it)
        procs = tree(raylet) | self.monitors.pop(i, set())
        send(procs, signal.SIGKILL)
        return len(procs)

    def busy(self, i: int) -> bool:
        """Whether worker node i (up) runs an actor: a worker process titled ray::<class> (a trial), not one of
        Ray's idle workers or agents."""
        procs = processes()
        return any(procs[pid][1].startswith("ray::") and not procs[pid][1].startswith(_NOT_TRIALS)
                   for pid in tree(_raylet(self.manager_ports[i]), procs) if pid in procs)

    def stop(self) -> None:
        procs = tree(pids(lambda cmd: self.tmp in cmd or f":{self.port} " in cmd + " "))
        send(procs, signal.SIGTERM)
        time.sleep(3)
        send(procs, signal.SIGKILL)


_NOT_TRIALS = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _raylet(port) -> set[int]:
    """The raylet of the node whose node manager listens on `port` (a set: empty once it is gone)."""
    return pids(lambda cmd: f"--node_manager_port={port}" in cmd)


def _log_monitor(cmd: str) -> bool:
    return "ray/_private/log_monitor.py" in cmd


def _ray(args: list[str]) -> None:
    r = subprocess.run([*RAY, *args], env=env(), capture_output=True, text=True, timeout=180)
    if r.returncode:
        raise RuntimeError(f"ray {' '.join(args[:2])} failed: {r.stderr[-2000:]}")


def _node_ports(p) -> list[str]:
    return [f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}", f"--dashboard-agent-listen-port={p[2]}",
            f"--dashboard-agent-grpc-port={p[3]}", f"--runtime-env-agent-port={p[4]}", f"--metrics-export-port={p[5]}"]


def processes() -> dict[int, tuple[int, str]]:
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


def pids(match) -> set[int]:
    """The processes (not this one) whose command line `match` accepts."""
    return {pid for pid, (_, cmd) in processes().items() if match(cmd) and pid != os.getpid()}


def tree(roots: set[int], procs: dict[int, tuple[int, str]] | None = None) -> set[int]:
    """roots and every process under them, in `procs` (processes(); read now when None)."""
    procs, found = processes() if procs is None else procs, set(roots)
    while True:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in found} - found
        if not more:
            return found
        found |= more


def send(procs, sig) -> None:
    for pid in procs:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
