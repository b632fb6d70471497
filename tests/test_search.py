"""A real (tiny) Ray Tune search on a local 2-CPU Ray, its report, and the search-level bad inputs."""
import contextlib
import io
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from gatetune import results
from gatetune.tuning import config as C
from gatetune.tuning.train import checkpoint
from gatetune.core.errors import UserError
from gatetune.tuning.search.run import run_search

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "search_spaces", "quickstart.yaml")
TINY = ["train.epochs=3", "train.keep_checkpoints=1", "search.num_samples=4", "search.scheduler.grace_period=1",
        "space.gating.gate={choice: [all, [conv5, conv6]]}", "search.confirm={seeds: 2, front: top 1}"]


@pytest.fixture(scope="module")
def tiny(ray_local, tmp_path_factory):
    """ONE tiny search for the module's tiny_* tests (a Ray search costs ~20-40 s here): its config, storage
    folder, run folder, success flag, console output, and report split into trials and seed replicas."""
    storage = tmp_path_factory.mktemp("tiny-search")
    cfg = C.load(QUICK, TINY)
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        run_dir, ok = run_search(cfg, storage=str(storage), name="tiny")
    df = results.read_report(os.path.join(run_dir, "report.csv"))
    return SimpleNamespace(cfg=cfg, storage=storage, run_dir=run_dir, ok=ok, out=console.getvalue(),
                           trials=df[df["confirms"].isna()], replicas=df[df["confirms"].notna()],
                           report_md=open(os.path.join(run_dir, "report.md")).read())


def test_tiny_search_succeeds_with_one_quiet_line_per_result(tiny):
    assert tiny.ok
    out, run_dir = tiny.out, tiny.run_dir
    assert f"run folder: {run_dir}" in out and "| network " in out
    assert "epoch:  1.00/3 | gate.loss:" in out          # one compact line per trial result
    assert "\x1b[" not in out                             # not a terminal: plain lines, no live view
    # a quiet console: no Ray Tune box, no TensorBoard hint at Ray's staging folder; TensorBoard on the run folder
    assert "Configuration for experiment" not in out and "driver_artifacts" not in out
    assert f"tensorboard --logdir {run_dir}" in out


def test_tiny_report_has_each_trial_once_and_a_front_of_completed_trials(tiny):
    df = tiny.trials
    assert len(df) == 4 and df["trial_id"].is_unique
    assert set(df["status"]) <= {"completed", "stopped"}
    assert set(df.loc[df.status == "stopped", "stopped_by"]) <= {"asha"}
    # the front is made of trials that trained their full budget
    assert not (df["pareto"] | df["pareto_density"])[df["status"] != "completed"].any()
    assert set(df.loc[df.status == "completed", "gate_health"]) <= {"ok", "static", "collapsed", "dense"}


def test_tiny_confirmation_reruns_the_best_trial_with_the_next_seed_and_averages(tiny):
    df, replicas = tiny.trials, tiny.replicas
    # confirmation: the best completed trial again with seed + 1, never stopped; the mean over both seeds
    best = df[df.status == "completed"].sort_values("top1").iloc[-1]
    # the best trial again with seed + 1, and the best dense trial (the baseline) when it is another one
    assert len(replicas) in (1, 2) and replicas["confirms"].is_unique
    (replica,) = replicas[replicas["confirms"] == best["trial_id"]].itertuples()
    assert replica.seed == best["seed"] + 1
    assert replica.status == "completed" and replica.epochs == 3
    origin = df.set_index("trial_id").loc[best["trial_id"]]
    assert origin["n_seeds"] == 2 and origin["top1_mean"] == pytest.approx((best["top1"] + replica.top1) / 2)
    assert "## Front over 2 seeds" in tiny.report_md
    assert f"confirmed {len(replicas)} front config(s) over 2 seeds" in tiny.out


def test_tiny_optuna_study_has_completed_and_asha_pruned_trials_but_no_replica(tiny):
    # Optuna's study: finished trials COMPLETE, ASHA-stopped ones PRUNED with their per-epoch top1; no replica
    import optuna
    df = tiny.trials
    db = os.path.join(tiny.run_dir, "optuna.db")
    assert os.path.isfile(db)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}")
    states = {t.user_attrs["trial_id"]: t for t in study.trials}
    assert sorted(states) == sorted(df["trial_id"])
    for row in df.itertuples():
        t = states[row.trial_id]
        assert t.state.name == {"completed": "COMPLETE", "stopped": "PRUNED"}[row.status], row
        assert t.intermediate_values[int(row.epochs)] == pytest.approx(row.top1)


def test_tiny_search_learns_and_its_best_trial_meets_its_density(tiny):
    df = tiny.trials
    assert df["top1"].max() > 30          # 3 epochs of a tiny search: well above chance (10%)
    best = df.sort_values("top1").iloc[-1]
    assert abs(best["density"] - best["target_density"]) <= 0.02 or best["gated_layers"] != "all"


def test_tiny_completed_trials_report_their_own_latency_ratio(tiny):
    """A trial that trains its full budget measures latency_ratio on its last epoch in its worker and reports it:
    the report has it for every completed trial, and pareto_latency had nothing left to write after the search."""
    df = pd.concat([tiny.trials, tiny.replicas])
    done = df["status"] == "completed"
    assert done.any() and (df.loc[done, "latency_ratio"] > 0).all()
    assert df.loc[~done, "latency_ratio"].isna().all()
    assert not list(Path(tiny.run_dir).glob("trial_*/latency.json"))


def test_tiny_report_has_the_searched_columns_checkpoints_and_pareto_plot(tiny):
    df = tiny.trials
    assert {"gating.density", "gating.weight", "gating.gate", "train.optimizer.lr"} <= set(df.columns)
    assert (df["checkpoint"].str.len() > 0).all()
    assert os.path.isfile(os.path.join(tiny.run_dir, "pareto.png"))


def test_tiny_search_caps_checkpoints_on_disk_and_reports_the_folder_size(tiny):
    # disk is capped: the best train.keep_checkpoints plus the newest per trial; the report says the size
    run_dir = tiny.run_dir
    for d in os.listdir(run_dir):
        if d.startswith("trial_"):
            kept = [c for c in os.listdir(os.path.join(run_dir, d)) if c.startswith("checkpoint_")]
            assert 1 <= len(kept) <= tiny.cfg.train.keep_checkpoints + 1
    assert "run folder size" in tiny.report_md


def test_tiny_report_works_on_a_copied_folder_without_ray(tiny, tmp_path):
    # the report works on a copy, with Ray not involved
    copy = tmp_path / "copied"
    shutil.copytree(tiny.run_dir, copy)
    again = results.table(copy)
    assert sorted(again["trial_id"]) == sorted([*tiny.trials["trial_id"], *tiny.replicas["trial_id"]])


def test_tiny_second_search_into_the_same_folder_is_refused_and_points_at_resume(tiny):
    # a second search into the same folder is refused and points at resume (the last tiny_* test: it
    # runs into the shared folder)
    with pytest.raises(UserError, match="gatetune resume"):
        run_search(tiny.cfg, storage=str(tiny.storage), name="tiny")


def test_impossible_resources_fail_fast(ray_local, tmp_path):
    cfg = C.load(QUICK, [*TINY, "search.resources.gpu=1"])
    with pytest.raises(UserError, match="no node can run a trial needing 1 CPU and 1 GPU"):
        run_search(cfg, storage=str(tmp_path), name="gpu")
    assert not (tmp_path / "gpu").exists()


def _cifar_folder(root, train: int, val: int):
    """The first `train` and `val` images per class of the bundled CIFAR-10 subset, copied under root."""
    subset = os.path.join(ROOT, "data", "cifar10-subset")
    for split, n in (("train", train), ("val", val)):
        for c in sorted(os.listdir(os.path.join(subset, split))):
            os.makedirs(os.path.join(root, split, c))
            for f in sorted(os.listdir(os.path.join(subset, split, c)))[:n]:
                shutil.copy(os.path.join(subset, split, c, f), os.path.join(root, split, c, f))
    return str(root)


def test_search_pretrains_a_dense_net_and_every_trial_starts_from_it(ray_local, tmp_path, capsys):
    """The notebook's workflow in one search, on natural images: a dense resnet20 trained first as a trial,
    then gated trials (and their seed replica) from its weights: at lr 1e-9 every trial's convolutions end
    where the dense network's did."""
    root = _cifar_folder(tmp_path / "cifar", 150, 40)
    cfg = C.load(os.path.join(ROOT, "search_spaces", "cifar10_demo.yaml"), [
        f"data.root={root}", "search.pretrain.epochs=2", "train.epochs=1", "search.num_samples=1",
        "space.gating.density={grid: [1.0, 0.5]}", "space.train.optimizer.lr={choice: [1.0e-9]}",
        "search.confirm={seeds: 2, front: top 1}", "train.keep_checkpoints=1"])
    run_dir, ok = run_search(cfg, storage=str(tmp_path), name="pretrain")
    assert ok
    out = capsys.readouterr().out
    assert "(dense pretraining) epoch:  2.00/2" in out
    df = results.read_report(os.path.join(run_dir, "report.csv"))
    pre = df[df["pretrain"]]
    assert len(pre) == 1 and pre["status"].iloc[0] == "completed" and pre["gated_layers"].iloc[0] == "none"
    pid, dense_top1 = pre["trial_id"].iloc[0], pre["top1"].iloc[0]
    rest = df[~df["pretrain"]]
    assert len(rest) == 3 and (rest["started_from"] == pid).all() and rest["confirms"].notna().sum() == 1
    assert not pre["pareto"].iloc[0] and pre["started_from"].isna().all()
    assert dense_top1 > 15   # two epochs on 1,500 images: above chance (10%)

    def convs(trial_id):
        state = torch.load(checkpoint.trial_weights(run_dir, trial_id), map_location="cpu", weights_only=False)
        return {k.replace(".conv.weight", ".weight"): v for k, v in state["model"].items() if v.dim() == 4}
    dense = convs(pid)
    assert len(dense) >= 19   # resnet20's convolutions
    for tid in rest["trial_id"]:
        tuned = convs(tid)
        assert all(torch.allclose(tuned[k], w, atol=1e-6) for k, w in dense.items()), tid
    report = open(os.path.join(run_dir, "report.md")).read()
    baseline = f"Dense baseline: trial `{pid}` (the dense pretraining every search trial started from, 2 epochs)"
    assert baseline in report
    assert f"front over 2 seeds; {baseline}" in out and "| config (trial) | density | macs_ratio |" in out
