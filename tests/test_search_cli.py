"""`gatetune search` as a user runs it: joining a `ray start --head` cluster, Ctrl-C then `gatetune resume`,
and the command-line errors (each one line, exit 2, nothing started)."""
import os
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
from gatetune.results import read_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "search_spaces", "quickstart.yaml")
BIN = os.path.dirname(sys.executable)
GATETUNE = [os.path.join(BIN, "gatetune")]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _report(run_dir) -> pd.DataFrame:
    return read_report(os.path.join(run_dir, "report.csv"))


@pytest.mark.slow
def test_search_joins_cluster_started_with_ray_start(tmp_path):
    port = _free_port()
    ray = os.path.join(BIN, "ray")
    subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, env=ENV,
                   capture_output=True, timeout=120)
    try:
        r = subprocess.run([*GATETUNE, "search", QUICK, "train.epochs=1", "search.num_samples=2",
                            "--address", f"127.0.0.1:{port}", "--storage", str(tmp_path), "--name", "joined"],
                           env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "ray: 1 node(s), 2 CPU" in r.stdout
    finally:
        subprocess.run([ray, "stop", "--force"], env=ENV, capture_output=True, timeout=120)
    df = _report(tmp_path / "joined")
    assert len(df) == 2 and set(df["status"]) == {"completed"}


@pytest.mark.slow
def test_ctrl_c_then_resume_finishes_every_trial_once(tmp_path):
    run_dir = tmp_path / "s"
    cmd = [*GATETUNE, "search", QUICK, "train.epochs=3", "search.num_samples=5",
           "--storage", str(tmp_path), "--name", "s"]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:    # interrupt once the first epoch of some trial is checkpointed
        if any(run_dir.glob("trial_*/checkpoint_000000")):
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=180)
    assert "gatetune resume" in out, out[-3000:]
    assert "dashboard: http://127.0.0.1:" in out        # the dashboard is bound to loopback by default
    before = set(_report(run_dir)["trial_id"])
    assert 0 < len(before) < 5

    r = subprocess.run([*GATETUNE, "resume", str(run_dir)], env=ENV, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "search finished" in r.stdout
    df = _report(run_dir)
    assert len(df) == 5 and df["trial_id"].is_unique            # every trial once
    assert before <= set(df["trial_id"])                          # the same trial ids
    assert set(df["status"]) <= {"completed", "stopped"}
    for tid in before:   # interrupted trials continued from their checkpoints, no epoch ran twice
        hist = [l for l in open(next(run_dir.glob(f"trial_{tid}/result.json")))]
        epochs = [float(l.split('"epoch": ')[1].split(",")[0]) for l in hist]
        assert epochs == sorted(set(epochs))


@pytest.mark.parametrize("args, words", [
    (["search", QUICK, "--address", "127.0.0.1:1"], ["--address", "cannot reach"]),
    (["resume", "/tmp"], ["not a gatetune search folder"]),
    (["report", "/tmp"], ["/tmp"]),
    (["search", QUICK, "search.scheduler.grace_period=20"], ["grace period 20", "train.epochs=8"]),
    (["search", QUICK, "space.gating.weight={loguniform: [1, 0.1]}"], ["low < high"]),
    (["search", QUICK, "space.gating.densty={choice: [0.5]}"], ["did you mean 'gating.density'"]),
    (["search", os.path.join(ROOT, "search_spaces", "digits.yaml")], ["no `search:` section"]),
])
def test_search_errors_one_line_exit_2(tmp_path, capsys, args, words):
    from gatetune.tuning.cli import main
    assert main([*args, *(["--storage", str(tmp_path)] if args[0] == "search" else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert all(w in err[0] for w in words), err[0]
    assert not any(tmp_path.iterdir())            # nothing created


@pytest.mark.parametrize("name, storage, overrides", [
    (None, None, []), ("n2", "/tmp/elsewhere", ["search.confirm={seeds: 2, front: top 1}"]),
    (None, "s3://bucket/runs/", []), ("n3", "~/runs", ["search.num_samples=3"])])
def test_the_early_ray_start_carries_the_searchs_job_metadata(name, storage, overrides):
    """`gatetune search` starts Ray (cluster.start_local) before it imports the search stack, with the job
    metadata of cluster.search_metadata: the same as run_search's job gets (run.job_metadata)."""
    from gatetune.tuning import config as C
    from gatetune.tuning.search import cluster
    from gatetune.tuning.search.run import job_metadata
    cfg = C.load(QUICK, overrides)
    assert cluster.search_metadata(cfg, name=name, storage=storage) == job_metadata(cfg, name=name, storage=storage)


def test_example_cluster_file_passes_ray_schema():
    """deploy/onprem.yaml is what `ray up` reads: Ray's own validator accepts it."""
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config
    cfg = yaml.safe_load(open(os.path.join(ROOT, "deploy", "onprem.yaml")))
    validate_config(prepare_config(cfg))
    assert cfg["provider"]["type"] == "local" and "--dashboard-host=127.0.0.1" in cfg["head_start_ray_commands"][1]
