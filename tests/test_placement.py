"""Ray's GPU placement of gatetune trials without GPUs (slow): one loopback head that declares 4 GPUs it does
not have (`ray start --num-gpus=4`, bench/loopback.py), real `gatetune search` commands against it, and each
trial's `placement` record (the first result after each start: tuning/search/trainable.py) read back from its
result.json. Ray hands out the ids and sets CUDA_VISIBLE_DEVICES as on a GPU node; the trials train on the CPU
(no CUDA here), so what this shows is the bookkeeping (which ids each trial and each rank were given), not a
driver honouring CUDA_VISIBLE_DEVICES, NCCL, or memory isolation between fractional trials (`make bench-gpu`).
"""
import json
import os
import shutil
import subprocess
from itertools import combinations
from pathlib import Path

import pytest

from loopback import GATETUNE, LoopbackCluster, env

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "search_spaces", "quickstart.yaml")
# one epoch of 4 steps on 8x8 fake images (bench/scale.py's kind of trial): a trial's time is mostly its start-up
BASE = ["train.device=cpu", "train.epochs=1", "search.scheduler.name=fifo", "train.threads=1", "train.batch_size=8",
        "data={dataset: fake, image_size: 8, fake_train: 64, fake_val: 16, augment: false}"]


@pytest.fixture(scope="module")
def cluster():
    c = LoopbackCluster(workers=0, head_cpus=4, gpus=4)
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.tmp, ignore_errors=True)


def _start_lines(cluster) -> list[str]:
    """The trials' `[<id>] start: ...` lines from the workers' logs (stderr)."""
    logs = Path(cluster.tmp, "session_latest", "logs").glob("worker-*.err")
    return [line for f in logs for line in f.read_text(errors="replace").splitlines() if "] start: " in line]


def _search(cluster, storage, name: str, *overrides: str, base=BASE) -> subprocess.CompletedProcess:
    return subprocess.run([*GATETUNE, "search", QUICK, *base, *overrides, "--address", cluster.address,
                           "--storage", str(storage), "--name", name], env=env(), capture_output=True, text=True,
                          timeout=300)


def _trials(run_dir: Path) -> dict[str, dict]:
    """trial folder -> {"placement", "start", "end"}: the first result's placement, and an interval inside the
    one the trial's function ran in, so that two such intervals that overlap prove the trials (and the GPU
    shares they held) overlapped. A result's `timestamp` is the moment it was reported, in whole seconds rounded
    down; the first result's time_total_s runs from the function's start to a moment after that report (when
    Tune's train() returned it): start = timestamp + 2 - time_total_s is no earlier than the real start, end =
    the last result's timestamp no later than the real end."""
    out = {}
    for d in sorted(run_dir.glob("trial_*")):
        results = [json.loads(line) for line in (d / "result.json").read_text().splitlines() if line.strip()]
        first = results[0]
        assert "placement" in first and all("placement" not in r for r in results[1:]), d
        out[d.name] = {"placement": first["placement"], "start": first["timestamp"] + 2 - first["time_total_s"],
                       "end": results[-1]["timestamp"]}
    return out


def _overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_fractional_gpus_pack_onto_one_id(cluster, tmp_path):
    """4 trials of a quarter GPU at once: Ray gives them all the same GPU id, and CUDA_VISIBLE_DEVICES and the
    runtime context's accelerator ids agree with ray.get_gpu_ids()."""
    r = _search(cluster, tmp_path, "quarter", "search.resources={cpu: 1, gpu: 0.25}", "search.num_samples=4",
                "search.max_concurrent=4")
    assert r.returncode == 0, r.stderr[-3000:]
    trials = _trials(tmp_path / "quarter")
    assert len(trials) == 4, trials
    for t in trials.values():
        p = t["placement"]
        assert len(p["gpu_ids"]) == 1 and p["accelerator_ids"] == p["gpu_ids"], p
        assert p["cuda_visible_devices"] == p["gpu_ids"][0], p
        assert p["ranks"] == [{"rank": 0, "device": "cpu", "gpu_id": p["gpu_ids"][0]}], p   # no CUDA here: CPU
    pairs = [(a, b) for a, b in combinations(trials.values(), 2) if _overlap(a, b)]
    assert pairs, {k: (t["start"], t["end"]) for k, t in trials.items()}   # the packing was real: they overlapped
    assert all(a["placement"]["gpu_ids"] == b["placement"]["gpu_ids"] for a, b in pairs), trials
    lines = _start_lines(cluster)
    for name, t in trials.items():   # the worker log's start line names them too
        ids = t["placement"]["gpu_ids"][0]
        assert any(f"[{name[6:]}] start: " in line and line.endswith(f", GPU ids {ids} (CUDA_VISIBLE_DEVICES={ids})")
                   for line in lines), lines
    print("\nquarter-GPU trials:", {k: (t["placement"]["gpu_ids"], t["start"], t["end"]) for k, t in trials.items()})


def test_two_gpus_per_trial_disjoint_pairs_one_per_rank(cluster, tmp_path):
    """2 trials of 2 GPUs at once, each on 2 gloo ranks: each trial got two distinct ids, the two trials
    disjoint pairs, and rank r (a process of its own, reading its own environment) the r-th id of its trial,
    the GPU cuda:r would name there."""
    r = _search(cluster, tmp_path, "pairs", "search.resources={cpu: 1, gpu: 2}", "train.processes=2",
                "search.num_samples=2", "search.max_concurrent=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trials hold GPUs they do not use" in r.stderr   # train.device=cpu with GPUs granted: a notice
    trials = _trials(tmp_path / "pairs")
    assert len(trials) == 2, trials
    for t in trials.values():
        p = t["placement"]
        ids = p["gpu_ids"]
        assert len(set(ids)) == 2 and set(ids) <= {"0", "1", "2", "3"} and p["accelerator_ids"] == ids, p
        assert p["cuda_visible_devices"] == ",".join(ids), p
        assert p["ranks"] == [{"rank": r, "device": "cpu", "gpu_id": ids[r]} for r in (0, 1)], p
    a, b = trials.values()
    assert _overlap(a, b), trials                    # held at the same time ...
    assert not set(a["placement"]["gpu_ids"]) & set(b["placement"]["gpu_ids"]), trials   # ... on disjoint GPUs
    assert a["placement"]["node_id"] == b["placement"]["node_id"] != ""   # the one node there is
    print("\ntwo-GPU trials:", {k: (t["placement"]["gpu_ids"], t["placement"]["ranks"]) for k, t in trials.items()})


def test_more_gpus_than_a_node_has_is_one_line_before_any_trial(cluster, tmp_path):
    """8 GPUs a trial (the node has 4): Ray would leave the trials pending for ever; gatetune says so in one line
    naming search.resources, exit 2, no run folder. (A fraction above 1, which Ray refuses only once the first
    trial starts, is refused by validation: tests/bad_inputs/range_resources_gpu_fraction_above_one.yaml.)"""
    r = _search(cluster, tmp_path, "nope", "search.resources.gpu=8", base=["train.epochs=1"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    ours = [line for line in r.stderr.splitlines() if "\tINFO " not in line]   # beside ray.init's "Connected" lines
    assert len(ours) == 1 and ours[0].startswith("gatetune search: error: search.resources: ") and \
        "no node can run a trial needing 1 CPU and 8 GPU (nodes: " in ours[0] and "4 GPU)" in ours[0], r.stderr
    assert not (tmp_path / "nope").exists()
