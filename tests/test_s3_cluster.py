"""Cluster storage on S3 (slow), against a real S3-compatible server on 127.0.0.1 (moto): a 2-node loopback
Ray cluster started with `ray start` searching into s3://, a worker node killed mid-trial, the driver
SIGKILLed and `gatetune resume s3://...`, and `gatetune report s3://...` equal to the report of a local copy."""
import io
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import s3, s3_files, s3_read
from gatetune.results import read_report
from loopback import GATETUNE, LoopbackCluster, env as _env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "search_spaces", "quickstart.yaml")


def _epochs(uri: str, trial: str) -> list[float]:
    return [json.loads(line)["epoch"] for line in s3_read(uri, f"{trial}/result.json").splitlines() if line.strip()]


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
            if sum(f.endswith("checkpoint_000001/state.pt") for f in s3_files(uri)) >= 2:
                break
            time.sleep(0.5)
        cluster.kill_worker(0)
        out, _ = p.communicate(timeout=400)
        assert p.returncode == 0, out[-3000:]
    finally:
        cluster.stop()
    files = s3_files(uri)
    report = read_report(io.StringIO(s3_read(uri, "report.csv")))
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
    while time.time() < deadline and not any(f.endswith("checkpoint_000001/state.pt") for f in s3_files(uri)):
        time.sleep(0.3)
    os.killpg(p.pid, signal.SIGKILL)        # the driver and the local Ray it started
    p.wait()
    r = subprocess.run([*GATETUNE, "resume", uri], env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "search finished" in r.stdout
    remote = read_report(io.StringIO(s3_read(uri, "report.csv")))
    assert len(remote) == 4 and remote["trial_id"].is_unique and (remote["status"] == "completed").all()
    assert (remote["epochs"] == 3).all()
    # the Optuna study copy in the bucket holds each trial once
    import optuna
    local_db = tmp_path / "optuna.db"
    local_db.write_bytes(s3(uri)[0].open_input_stream(f"{s3(uri)[1]}/optuna.db").read())
    study = optuna.load_study(study_name="crash", storage=f"sqlite:///{local_db}")
    assert sorted(t.user_attrs["trial_id"] for t in study.trials) == sorted(remote["trial_id"])
    # `gatetune report s3://...` gives the table a local copy of the folder gives
    from pyarrow import fs
    copy = tmp_path / "copy" / "crash"
    copy.mkdir(parents=True)
    fs.copy_files(s3(uri)[1], str(copy), source_filesystem=s3(uri)[0], destination_filesystem=fs.LocalFileSystem())
    r = subprocess.run([*GATETUNE, "report", uri], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    r_local = subprocess.run([*GATETUNE, "report", str(copy)], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.stdout == r_local.stdout and "| digitnet" in r.stdout
