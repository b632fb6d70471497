"""The object store unreachable in the middle of a search (slow): the search writes into s3:// on the storage
tests' S3 server (moto) through a TCP proxy on 127.0.0.1 that the test takes down (connections refused,
open ones cut) for a while and brings back, as when the store's host reboots or the network to it drops.

- an outage shorter than search.storage_timeout_s: the trials wait for their checkpoint uploads and go on,
  the search finishes with every trial and epoch there;
- an outage that outlasts it: the search stops with one line, and `gatetune resume s3://...` finishes it
  once the store is back.
"""
import io
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from conftest import free_port, s3_files, s3_read
from gatetune.results import read_report
from loopback import GATETUNE, env

QUICK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "search_spaces", "quickstart.yaml")


class Proxy:
    """A TCP proxy from 127.0.0.1:self.port to the S3 server that can be taken down and brought back."""

    def __init__(self, target: str):
        self.target = int(target.rsplit(":", 1)[1])
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.lock, self.conns, self.server = threading.Lock(), set(), None
        self.up()

    def up(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.server = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and cut the open ones."""
        server, self.server = self.server, None
        server.close()
        with self.lock:
            conns, self.conns = self.conns, set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, server) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns |= {client, upstream}
            pair = [client, upstream, 2]   # the sockets, and the pumps still running between them
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, pair), daemon=True).start()

    def _pump(self, src, dst, pair) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        with self.lock:
            pair[2] -= 1
            if pair[2] == 0:   # the second pump to end closes both sockets
                self.conns -= set(pair[:2])
                pair[0].close()
                pair[1].close()


def _search(uri_parent: str, name: str, proxy: Proxy, *overrides: str) -> subprocess.Popen:
    cmd = [*GATETUNE, "search", QUICK, "search.num_samples=8", "train.epochs=4", "search.scheduler.name=fifo",
           *overrides, "--storage", uri_parent, "--name", name]
    return subprocess.Popen(cmd, env={**env(), "AWS_ENDPOINT_URL": proxy.endpoint}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoints(uri: str, n: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and sum(f.endswith("/state.pt") for f in s3_files(uri)) < n:
        time.sleep(0.5)


def _search_then_outage(s3_server, s3_bucket, name: str, storage_timeout_s: int):
    """A search into the proxied store, which goes down once two checkpoints are in: (proxy, run uri, process)."""
    proxy = Proxy(s3_server)
    uri = f"{s3_bucket}/runs/{name}"
    p = _search(f"{s3_bucket}/runs", name, proxy, f"search.storage_timeout_s={storage_timeout_s}")
    _wait_for_checkpoints(uri, 2)
    proxy.down()
    return proxy, uri, p


def _check_complete(uri: str, trials: int, epochs: int):
    report = read_report(io.StringIO(s3_read(uri, "report.csv")))
    assert len(report) == trials and report["trial_id"].is_unique
    assert (report["status"] == "completed").all() and (report["epochs"] == epochs).all(), report
    for tid in report["trial_id"]:
        seen = [json.loads(line)["epoch"] for line in s3_read(uri, f"trial_{tid}/result.json").splitlines() if line]
        assert sorted(set(seen)) == list(range(1, epochs + 1)), (tid, seen)   # no epoch lost
    return report


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_store_down_for_a_minute_the_search_waits_and_finishes(s3_server, s3_bucket):
    proxy, uri, p = _search_then_outage(s3_server, s3_bucket, "outage", 300)
    down_at = time.time()
    time.sleep(45)
    proxy.up()
    outage_s = time.time() - down_at
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-4000:]
    assert "search finished" in out and "8 trials, 0 errors" in out, out[-3000:]
    print(f"an outage of {outage_s:.0f} s survived; the search's lines about it:")
    print("\n".join(line for line in out.splitlines() if "storage" in line))
    _check_complete(uri, 8, 4)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_store_down_longer_than_the_bound_stops_the_search_and_resume_finishes(s3_server, s3_bucket):
    proxy, uri, p = _search_then_outage(s3_server, s3_bucket, "long-outage", 20)
    out, _ = p.communicate(timeout=300)
    proxy.up()
    assert p.returncode == 2, out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith("gatetune search: error: ")]
    assert len(errors) == 1 and "has not answered" in errors[0] and "gatetune resume" in errors[0], out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    print("\n".join(line for line in out.splitlines() if "storage" in line or "error" in line))
    r = subprocess.run([*GATETUNE, "resume", uri], env={**env(), "AWS_ENDPOINT_URL": proxy.endpoint},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _check_complete(uri, 8, 4)
