"""Run folders on S3 (core.storage.RunStore) against a real S3-compatible server on 127.0.0.1 (moto):
files written and read back, the report of an s3:// run folder equal to the report of a local copy,
and a folder that cannot be written refused before any work."""
import json
import shutil

import pandas as pd
import pytest
import yaml

from gatetune import results
from gatetune.core.errors import UserError
from gatetune.core.storage import RunStore


def _run_folder(path):
    """A small search folder as gatetune and Ray write it: config, experiment state, two trials."""
    base = {"name": "s3run", "model": {"name": "digitnet"}, "gating": {"density": 0.5, "gate": "all"},
            "train": {"epochs": 2, "optimizer": {"lr": 0.05}}, "search": {"scheduler": {"name": "asha"}},
            "space": {"gating.density": {"choice": [0.5, 1.0]}}}
    path.mkdir(parents=True)
    (path / "gatetune.yaml").write_text(yaml.safe_dump(base))
    trials = []
    for tid, d, top1s in (("aaaa1111", 0.5, [80.0, 90.0]), ("bbbb2222", 1.0, [85.0])):
        t = path / f"trial_{tid}"
        for i, top1 in enumerate(top1s):
            (t / f"checkpoint_{i:06d}").mkdir(parents=True)
            (t / f"checkpoint_{i:06d}" / "state.pt").write_bytes(b"x" * 1000)
        (t / "params.json").write_text(json.dumps({"gating.density": d}))
        (t / "result.json").write_text("".join(json.dumps({"trial_id": tid, "epoch": float(e + 1), "top1": v,
                                                           "density": d, "macs_ratio": d * d, "training_iteration": e + 1,
                                                           "gate_health": "ok"}) + "\n" for e, v in enumerate(top1s)))
        trials.append([json.dumps({"trial_id": tid, "status": "TERMINATED", "relative_logdir": t.name,
                                   "config": {"gating.density": d}}), "{}"])
    (path / "experiment_state-2026-11-25_00-00-00.json").write_text(json.dumps({"trial_data": trials}))
    (path / "decisions.jsonl").write_text(json.dumps({"trial_id": "bbbb2222", "stopped_by": "asha"}) + "\n")


def _upload(local, uri):
    from pyarrow import fs
    remote, root = fs.FileSystem.from_uri(uri)
    fs.copy_files(str(local), root, source_filesystem=fs.LocalFileSystem(), destination_filesystem=remote,
                  use_threads=False)


def test_files_round_trip(s3_bucket, tmp_path):
    store = RunStore(f"{s3_bucket}/runs/r1")
    assert store.remote and not store.exists("gatetune.yaml")
    store.write_text("gatetune.yaml", "name: r1\n")
    store.write_bytes("trial_x/latency.json", b"{}")
    assert store.exists("gatetune.yaml") and store.read_text("gatetune.yaml") == "name: r1\n"
    store.check_writable()
    local = store.mirror(tmp_path / "m")
    assert (local / "gatetune.yaml").read_text() == "name: r1\n" and (local / "trial_x" / "latency.json").is_file()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_append_and_prune_work_the_same_local_and_remote(where, request, tmp_path):
    """One store for every run-folder write: append (decisions.jsonl) keeps earlier lines across processes
    (a new RunStore, as after a resume), prune keeps the newest numbered entries, files and folders alike."""
    import pickle

    from gatetune.core import layout
    uri = f"{request.getfixturevalue('s3_bucket')}/runs/p" if where == "s3" else str(tmp_path / "run")
    store = RunStore(uri)
    store.append("decisions.jsonl", "a\n")
    store.append("decisions.jsonl", "b\n")
    again = pickle.loads(pickle.dumps(store))   # a resumed search's scheduler: a new process
    again.append("decisions.jsonl", "c\n")
    assert RunStore(uri).read_text("decisions.jsonl") == "a\nb\nc\n"
    for i in (1, 2, 10, 3):
        store.write_bytes(f"trial_x/checkpoint_{i:06d}/state.pt", b"x")
    store.write_bytes("trial_x/result.json", b"{}")
    assert store.prune("trial_x", layout.CHECKPOINT_DIR, keep=2) == ["checkpoint_000001", "checkpoint_000002"]
    assert store.listdir("trial_x") == ["checkpoint_000003", "checkpoint_000010", "result.json"]
    assert store.prune("trial_x", layout.CHECKPOINT_DIR, keep=2) == []
    assert store.read_bytes("trial_x/checkpoint_000010/state.pt") == b"x"


def test_report_of_an_s3_folder_equals_the_report_of_a_local_copy(s3_bucket, tmp_path):
    local = tmp_path / "local" / "s3run"
    _run_folder(local)
    uri = f"{s3_bucket}/runs/s3run"
    _upload(local, uri)
    remote_df = results.write_report(uri)          # written back into the bucket
    local_df = results.table(local)
    pd.testing.assert_frame_equal(remote_df, local_df)
    assert set(remote_df["status"]) == {"completed", "stopped"}
    assert list(remote_df["checkpoint"]) == ["trial_aaaa1111/checkpoint_000001", "trial_bbbb2222/checkpoint_000000"]
    store = RunStore(uri)
    for name in ("report.csv", "report.md", "pareto.png"):
        assert store.exists(name)
    assert "# s3run: gatetune search report" in store.read_text("report.md")
    with pytest.raises(UserError, match="not a gatetune search folder"):
        results.table(f"{s3_bucket}/runs/nothing-here")


def test_unwritable_targets_fail_before_any_work(s3_server, tmp_path):
    with pytest.raises(UserError, match="cannot write here"):
        RunStore("s3://no-such-bucket-xyz/runs/a").check_writable()
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(UserError, match="cannot write here"):
        RunStore(blocker / "runs" / "a").check_writable()
    fresh = tmp_path / "new" / "runs" / "a"
    RunStore(fresh).check_writable()
    assert not (tmp_path / "new").exists()     # what the check created is gone again
    shutil.rmtree(tmp_path, ignore_errors=True)
