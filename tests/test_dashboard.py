"""Watching a search in the Ray dashboard, through real clients (slow): the state API names each trial's
actor, the log API returns its epoch lines, the node's Prometheus endpoint holds gatetune's gauges with
the trial's last values, the job carries gatetune's metadata, and every series of the shipped Grafana
dashboard exists. Where Debian's `prometheus` is installed (.ci/run installs it), a real Prometheus
server scrapes the node and answers a query."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from gatetune.tuning import config as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "search_spaces", "quickstart.yaml")
GRAFANA = os.path.join(ROOT, "deploy", "grafana_gatetune.json")


def _scrape() -> dict:
    """{(metric, trial_id or status): value} of every ray_gatetune_* sample on every alive node."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for n in ray.nodes():
        if not n.get("Alive") or not n.get("MetricsExportPort"):
            continue
        url = f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("ray_gatetune_"):
                    out[(s.name, s.labels.get("trial_id") or s.labels.get("status"))] = s.value
    return out


def _probe():
    from ray.tune import Callback

    class Probe(Callback):
        """Runs in the driver while the search runs: what the state API and the metrics endpoint show."""

        def __init__(self):
            self.last, self.reprs, self.names, self.gauge_matches = {}, set(), set(), {}
            self.prometheus, self.answered = None, {}
            self.fractional, self._scraped = set(), 0.0   # in-epoch values of ray_gatetune_epoch

        def on_step_begin(self, iteration, trials, **info):
            if time.monotonic() - self._scraped < 0.3:
                return
            self._scraped = time.monotonic()
            self.fractional |= {v for (name, _), v in _scrape().items()
                                if name == "ray_gatetune_epoch" and v != int(v)}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            import ray
            from ray.util.state import list_actors
            if self.prometheus is None and shutil.which("prometheus"):
                self.prometheus = Prometheus()
            self.last[trial.trial_id] = result
            if self.prometheus is not None:
                for r in self.prometheus.query('ray_gatetune_top1{run="dash"}'):
                    self.answered[r["metric"]["trial_id"]] = float(r["value"][1])
            actors = list_actors(address=ray.get_runtime_context().gcs_address, detail=True,
                                 filters=[("state", "=", "ALIVE")])
            self.reprs |= {(a.actor_id, a.repr_name or "") for a in actors}
            self.names |= {name for name, _ in _scrape()}

        def on_trial_complete(self, iteration, trials, trial, **info):
            want = self.last[trial.trial_id]["top1"]
            deadline = time.time() + 6
            while time.time() < deadline:   # the last epoch's value reaches the endpoint within an interval
                got = _scrape()
                self.names |= {name for name, _ in got}
                if got.get(("ray_gatetune_top1", trial.trial_id)) == pytest.approx(want):
                    self.gauge_matches[trial.trial_id] = got
                    return
                time.sleep(0.2)

    return Probe()


@pytest.mark.slow
def test_dashboard_shows_trials_logs_metrics_and_the_job(tmp_path, monkeypatch, capsys):
    import ray
    from ray.util.state import get_log

    from gatetune.tuning.search.run import run_search
    monkeypatch.setenv("RAY_metrics_report_interval_ms", "1000")   # export every second (Ray: 10 s)
    monkeypatch.setenv("GATETUNE_PROGRESS_S", "0.2")               # in-epoch progress every 0.2 s (default 2)
    if ray.is_initialized():
        ray.shutdown()
    cfg = C.load(QUICK, ["train.epochs=3", "train.keep_checkpoints=1", "search.num_samples=4",
                         "search.scheduler.name=fifo", "search.max_concurrent=2"])
    probe = _probe()
    try:
        run_dir, ok = run_search(cfg, storage=str(tmp_path), name="dash", callbacks=[probe])
        out = capsys.readouterr().out
        assert ok
        trials = set(probe.last)
        assert len(trials) == 4
        # (a) the state API lists the trials' actors, named after a trial of this search
        named = {aid: r for aid, r in probe.reprs if r.startswith("trial ")}
        assert named and all(r.split()[1] in trials for r in named.values()), probe.reprs
        assert any(re.fullmatch(r"trial [0-9a-f]{8} d=\d\.\d\d gate=\S+.*", r) for r in named.values()), named
        # (b) the log API: each trial's epoch lines, prefixed with its id, in the log of a trial actor
        gcs = ray.get_runtime_context().gcs_address
        logs = "".join("".join(get_log(address=gcs, actor_id=aid, suffix="err", tail=1000, timeout=10))
                       for aid in named)
        for t in trials:
            assert f"{t} epoch:  3.00/3 | gate.loss:" in logs, (t, logs[-2000:])
        # ... and between them, every few seconds, the trial's progress inside an epoch
        assert re.search(r"\[[0-9a-f]{8}\] epoch:  \d\.\d\d/3 \| \d+ img/s \| epoch ends in \d+ s", logs), logs[-2000:]
        # (c) the node's Prometheus endpoint: every trial's gauges held its last result
        assert set(probe.gauge_matches) == trials, (sorted(probe.gauge_matches), sorted(trials))
        assert probe.fractional, "ray_gatetune_epoch never showed a fraction of an epoch"
        for t, got in probe.gauge_matches.items():
            for m in ("epoch", "density", "macs_ratio"):
                assert got[(f"ray_gatetune_{m}", t)] == pytest.approx(probe.last[t][m])
        # (d) every series the shipped Grafana dashboard plots was exported
        wanted = set(re.findall(r"ray_gatetune_\w+", open(GRAFANA).read()))
        assert wanted and wanted <= probe.names, (wanted - probe.names)
        # the job carries gatetune's metadata: the dashboard's job API and `ray job list`
        dashboard = re.search(r"dashboard: (http://\S+)", out).group(1)
        jobs = json.loads(urllib.request.urlopen(f"{dashboard}/api/jobs/", timeout=10).read())
        (meta,) = [j["metadata"] for j in jobs if j.get("metadata", {}).get("run_name") == "dash"]
        assert meta["job_name"] == "gatetune search dash" and meta["run_folder"] == run_dir
        assert meta["trials"] == "4" and meta["config_file"] == QUICK and meta["gatetune_version"]
        ray_cli = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"]
        listed = subprocess.run([*ray_cli, "job", "list", "--address", dashboard],
                                capture_output=True, text=True, timeout=60).stdout
        assert "gatetune search dash" in listed
        # (e) a real Prometheus server scraping the nodes answered a query for the trials' top-1
        if probe.prometheus is not None:
            # its first scrapes may come after the search's last result: ask over the last minutes, where
            # the series of finished trials (marked stale by later scrapes) still hold their last sample
            deadline = time.time() + 60
            while not probe.answered and time.time() < deadline:
                for r in probe.prometheus.query('last_over_time(ray_gatetune_top1{run="dash"}[10m])'):
                    probe.answered[r["metric"]["trial_id"]] = float(r["value"][1])
                time.sleep(1)
            assert probe.answered and set(probe.answered) <= trials, probe.answered
    finally:
        if probe.prometheus is not None:
            probe.prometheus.close()
        ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A real Prometheus server (Debian's package) scraping the Ray nodes' metrics endpoints every second."""

    def __init__(self):
        import ray
        targets = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n.get("Alive")]
        self.tmp = tempfile.mkdtemp(prefix="gatetune-prometheus-")
        self.port = _free_port()
        with open(os.path.join(self.tmp, "prometheus.yml"), "w") as f:
            f.write("global: {scrape_interval: 1s}\nscrape_configs:\n- job_name: ray\n  static_configs:\n"
                    f"  - targets: {json.dumps(targets)}\n")
        self.proc = subprocess.Popen(["prometheus", f"--config.file={self.tmp}/prometheus.yml",
                                      f"--storage.tsdb.path={self.tmp}/data", "--log.level=warn",
                                      f"--web.listen-address=127.0.0.1:{self.port}"])

    def query(self, expr: str) -> list:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?query={urllib.request.quote(expr)}"
        try:
            return json.loads(urllib.request.urlopen(url, timeout=5).read())["data"]["result"]
        except OSError:
            return []

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_carries_the_metadata_gatetune_prints(tmp_path):
    """The README's cluster recipe: `gatetune search ... --job-metadata` into `ray job submit --metadata-json`;
    the job runs the search on the cluster and `ray job list` shows it by name, with its run folder."""
    from loopback import GATETUNE, RAY, LoopbackCluster, env as _env
    args = [QUICK, "train.epochs=1", "search.num_samples=2", "search.scheduler.name=fifo", "--name", "sub",
            "--storage", str(tmp_path)]
    meta = subprocess.run([*GATETUNE, "search", *args, "--job-metadata"], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert meta.returncode == 0 and json.loads(meta.stdout)["job_name"] == "gatetune search sub", meta.stderr
    cluster = LoopbackCluster(workers=0, head_cpus=2, dashboard=True)
    try:
        r = subprocess.run([*RAY, "job", "submit", "--address", cluster.dashboard, "--metadata-json", meta.stdout.strip(),
                            "--", *GATETUNE, "search", *args, "--address", "auto"],
                           env=_env(), capture_output=True, text=True, timeout=400)
        assert r.returncode == 0 and "search finished" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
        listed = subprocess.run([*RAY, "job", "list", "--address", cluster.dashboard], env=_env(),
                                capture_output=True, text=True, timeout=60).stdout
        assert "gatetune search sub" in listed and str(tmp_path / "sub") in listed and "SUCCEEDED" in listed, listed
        assert (tmp_path / "sub" / "report.csv").exists()
    finally:
        cluster.stop()
