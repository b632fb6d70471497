"""Node loss, driver crash, divergence and corrupt checkpoints cost at most the lost epoch.

The notebook ended with "sigyn is down for moving location. The following commands were running:".
These tests kill a Ray worker node mid-trial, SIGKILL the search driver, blow up a gate loss and
corrupt checkpoints, and check that every trial still ends once, where it was scheduled to end.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import trial_params

from gatetune.core import layout, trials
from gatetune.tuning.train import checkpoint as ckpt
from gatetune.tuning import config as C
from gatetune.tuning.train.run import train_run
from gatetune.tuning.search.trainable import newer_saved, replays, resume_state
from gatetune.results import read_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "search_spaces", "quickstart.yaml")
DIGITS = os.path.join(ROOT, "search_spaces", "digits.yaml")
GATETUNE = [os.path.join(os.path.dirname(sys.executable), "gatetune")]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _epochs(trial_dir: Path) -> list[float]:
    return [json.loads(line)["epoch"] for line in open(trial_dir / "result.json") if line.strip()]


@pytest.mark.slow
def test_worker_node_dies_mid_trial(tmp_path):
    """Two nodes on loopback, a trial on each; the worker node is killed after both have checkpoints."""
    import ray
    from ray.cluster_utils import Cluster
    from gatetune.tuning.search.run import run_search

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    run_dir = tmp_path / "nodeloss"
    killed = threading.Event()

    def kill_worker_when_both_checkpointed():
        deadline = time.time() + 240
        while time.time() < deadline:
            if len(list(run_dir.glob("trial_*/checkpoint_000000"))) >= 2:
                cluster.remove_node(worker, allow_graceful=False)
                killed.set()
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_worker_when_both_checkpointed, daemon=True)
    killer.start()
    try:
        cfg = C.load(QUICK, ["train.epochs=4", "search.num_samples=2", "search.scheduler.name=fifo",
                             "search.max_failures=3"])
        run_search(cfg, storage=str(tmp_path), name="nodeloss")
    finally:
        killer.join(timeout=5)
        ray.shutdown()
        cluster.shutdown()
    assert killed.is_set(), "the worker node was never killed"
    df = read_report(run_dir / "report.csv")
    assert len(df) == 2 and df["trial_id"].is_unique
    assert (df["status"] == "completed").all() and (df["epochs"] == 4).all()
    state = json.loads(sorted(run_dir.glob("experiment_state-*.json"))[-1].read_text())
    failures = [json.loads(meta)["num_failures"] for _, meta in state["trial_data"]]
    assert sum(failures) >= 1, "no trial was on the killed node"
    for d in run_dir.glob("trial_*"):
        ep = _epochs(d)
        assert ep[-1] == 4.0 and len(ep) - len(set(ep)) <= 1      # at most one epoch ran twice
    # the first result of each (re)start says where it ran: the trial that lost its node, the node it moved to
    trial_of = (lambda t: json.loads(t) if isinstance(t, str) else t)
    restarted = {trial_of(t)["trial_id"] for t, meta in state["trial_data"] if json.loads(meta)["num_failures"]}
    for d in run_dir.glob("trial_*"):
        nodes = [json.loads(line)["placement"]["node_id"] for line in open(d / "result.json") if '"placement"' in line]
        if d.name.removeprefix("trial_") in restarted:
            assert len(nodes) >= 2 and nodes[-1] != nodes[0], nodes
        else:
            assert len(nodes) == 1, nodes


@pytest.mark.slow
def test_driver_sigkill_then_resume(tmp_path):
    run_dir = tmp_path / "crash"
    cmd = [*GATETUNE, "search", QUICK, "train.epochs=3", "search.num_samples=4", "search.scheduler.name=fifo",
           "--storage", str(tmp_path), "--name", "crash"]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not any(run_dir.glob("trial_*/checkpoint_000001")):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)        # the driver and the local Ray it started
    p.wait()
    assert (run_dir / "tuner.pkl").exists()
    r = subprocess.run([*GATETUNE, "resume", str(run_dir)], env=ENV, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    df = read_report(run_dir / "report.csv")
    assert len(df) == 4 and df["trial_id"].is_unique                  # nothing lost or duplicated
    assert (df["status"] == "completed").all() and (df["epochs"] == 3).all()
    import optuna                                                       # searcher history kept, nothing twice
    study = optuna.load_study(study_name="crash", storage=f"sqlite:///{run_dir / 'optuna.db'}")
    assert len(study.trials) == 4


def test_divergent_trial_is_marked_and_others_go_on(ray_local, tmp_path):
    from gatetune.tuning.search.run import run_search
    cfg = C.load(QUICK, ["train.epochs=2", "search.num_samples=1", "train.max_gate_loss=100",
                         "space.gating.weight={grid: [1.0e-6, 1.0e+6]}", "search.scheduler.name=fifo"])
    run_search(cfg, storage=str(tmp_path), name="div")
    df = read_report(tmp_path / "div" / "report.csv").set_index("weight")
    assert df.loc[1e6, "status"] == "diverged" and df.loc[1e6, "stopped_by"] == "diverged"
    assert df.loc[1e6, "epochs"] <= 1.0                                   # within one epoch
    assert df.loc[1e-6, "status"] == "completed" and df.loc[1e-6, "epochs"] == 2


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    torch.set_num_threads(1)
    cfg = C.load(DIGITS, ["train.epochs=2", "train.keep_checkpoints=2"])
    out, _ = train_run(cfg, tmp_path / "r", progress=False)
    latest = out / "checkpoints" / "epoch_002.pt"
    latest.write_bytes(latest.read_bytes()[:1000])                       # truncated
    with pytest.warns(UserWarning, match="epoch_002.pt: corrupt"):
        state = ckpt.RunFolder(out).latest()
    assert state["epoch"] == 1
    # the same for a search trial's Ray checkpoint directories
    trial = tmp_path / "trial_x"
    for i in (0, 1):
        (trial / f"checkpoint_00000{i}").mkdir(parents=True)
        ckpt.save_atomic({"model": {}, "config": {}, "epoch": i + 1}, trial / f"checkpoint_00000{i}" / layout.CHECKPOINT_STATE)
    (trial / "checkpoint_000001" / layout.CHECKPOINT_STATE).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="corrupt"):
        assert resume_state(str(trial / "checkpoint_000001"))["epoch"] == 1


def test_a_restart_continues_from_a_checkpoint_newer_than_rays_record(tmp_path):
    """A driver lost between two snapshots: Ray's record names checkpoint_000001 (epoch 2), the trial's folder
    holds up to checkpoint_000004 (epoch 5, its upload cut short, so epoch 4's is the newest readable)."""
    trial = tmp_path / layout.trial_dirname("t1")
    history = [{"epoch": e, "top1": 10.0 * e} for e in range(1, 6)]
    for i in range(5):
        (trial / f"checkpoint_{i:06d}").mkdir(parents=True)
        ckpt.save_atomic({"model": {}, "config": {}, "epoch": i + 1, "history": history[:i + 1]},
                         trial / f"checkpoint_{i:06d}" / layout.CHECKPOINT_STATE)
    (trial / "checkpoint_000004" / layout.CHECKPOINT_STATE).write_bytes(b"cut short")
    state, top = newer_saved(str(tmp_path), "t1", than=1)
    assert state["epoch"] == 4 and top == 4
    assert not (trial / "checkpoint_000004").exists()                 # the cut-short one is gone
    again = replays(state, after=2)
    assert [r["epoch"] for r in again] == [3, 4] and all(r["replayed"] for r in again)
    assert [r["top1"] for r in again] == [30.0, 40.0] and "replayed" not in state["history"][-1]
    assert newer_saved(str(tmp_path), "t1", than=3) == (None, 3)      # Ray's record is the newest
    assert newer_saved(str(tmp_path), "new", than=None) == (None, -1)  # a trial that has no folder yet
    assert newer_saved(str(tmp_path), "t1", than=None)[0]["epoch"] == 4   # no record at all: any folder counts


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "epoch_001.pt"
    ckpt.save_atomic({"model": {}, "config": {}, "epoch": 1}, target)

    def dies_halfway(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(ckpt.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic({"model": {}, "config": {}, "epoch": 2}, target)
    monkeypatch.undo()
    assert ckpt.read(target)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_001.pt"]      # no temp file left


@pytest.mark.slow
def test_driver_killed_during_confirmation_runs_no_seed_twice(tmp_path):
    """search.confirm: the driver is SIGKILLed while the seed replicas train; `gatetune resume` finishes them
    and no (config, seed) trains twice."""
    run_dir = tmp_path / "confirm"
    cmd = [*GATETUNE, "search", QUICK, "train.epochs=3", "search.num_samples=2", "search.scheduler.name=fifo",
           "search.max_concurrent=2", "search.confirm={seeds: 3, front: top 1}", "--storage", str(tmp_path),
           "--name", "confirm"]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)

    def replica_checkpointed() -> bool:
        return any("confirms" in params and any(folder.glob("checkpoint_000001"))
                   for folder, params in trial_params(run_dir))

    deadline = time.time() + 300
    while time.time() < deadline and not replica_checkpointed():
        time.sleep(0.2)
    assert replica_checkpointed(), "no seed replica started within 300 s"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    r = subprocess.run([*GATETUNE, "resume", str(run_dir)], env=ENV, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    df = read_report(run_dir / "report.csv")
    replicas = df[df["confirms"].notna()]
    assert len(df) == 4 and df["trial_id"].is_unique, df[["trial_id", "status", "confirms", "seed"]]
    assert sorted(replicas["seed"]) == [1, 2] and replicas["confirms"].nunique() == 1
    assert (df["status"] == "completed").all() and (df["epochs"] == 3).all()
    origin = df.set_index("trial_id").loc[replicas["confirms"].iloc[0]]
    assert origin["n_seeds"] == 3


@pytest.mark.slow
def test_driver_killed_during_the_dense_pretraining_resumes_it(tmp_path):
    """search.pretrain: the driver is SIGKILLed after the dense trial's first epoch; `gatetune resume` goes on
    from that checkpoint (epoch 1 is not trained again), then every search trial starts from its weights."""
    run_dir = tmp_path / "pretrain"
    cmd = [*GATETUNE, "search", QUICK, "train.epochs=2", "search.num_samples=2", "search.scheduler.name=fifo",
           "search.pretrain={epochs: 4, lr: 0.05}", "--storage", str(tmp_path), "--name", "pretrain"]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)

    def pretrain_dir() -> Path | None:
        return next((folder for folder, params in trial_params(run_dir) if params.get(trials.PRETRAIN)), None)

    deadline = time.time() + 300
    while time.time() < deadline and not (pretrain_dir() and any(pretrain_dir().glob("checkpoint_000000"))):
        time.sleep(0.1)
    assert pretrain_dir() is not None, "the dense pretraining wrote no checkpoint within 300 s"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not any(pretrain_dir().glob("checkpoint_000003")), "killed too late: the pretraining had ended"
    r = subprocess.run([*GATETUNE, "resume", str(run_dir)], env=ENV, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    df = read_report(run_dir / "report.csv")
    pre = df[df["pretrain"]]
    assert len(pre) == 1 and pre["status"].iloc[0] == "completed" and pre["epochs"].iloc[0] == 4
    epochs = _epochs(pretrain_dir())
    assert epochs.count(1.0) == 1 and epochs[-1] == 4.0, epochs   # resumed, not started over
    rest = df[~df["pretrain"]]
    assert len(rest) == 2 and (rest["started_from"] == pre["trial_id"].iloc[0]).all()
    assert (rest["status"] == "completed").all() and (rest["epochs"] == 2).all()
