"""The density ladder (search.ladder): steps from high density to low, each from the best completed trial of
the step above; its checks before Ray starts; a gated checkpoint continuing at a lower density; a real search
on digits; and (slow) a driver killed between two steps, then `gatetune resume`."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from conftest import trial_params
from ray.tune.search import SearchGenerator, Searcher

from gatetune import models, results
from gatetune.core import trials as T
from gatetune.core.errors import UserError
from gatetune.models.errors import ModelError
from gatetune.models.sites import SiteSpec
from gatetune.tuning import config as C
from gatetune.tuning.search import space as S
from gatetune.tuning.search.ladder import LadderSearch
from gatetune.tuning.search.run import run_search
from gatetune.tuning.search.study import StudySearch
from gatetune.tuning.train import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LADDER = os.path.join(ROOT, "search_spaces", "ladder.yaml")
NO_PRETRAIN = ["search.pretrain=null", "search.ladder={densities: [0.75, 0.5, 0.25], trials_per_step: 2}"]


def _ladder(overrides):
    plan = S.prepare(C.load(LADDER, overrides))
    study = StudySearch(plan, metric="top1", mode="max", sampler=optuna.samplers.TPESampler(seed=0), export=None,
                        study_name="t")
    ladder = plan.cfg.search.ladder
    return LadderSearch(study, densities=ladder.densities, trials_per_step=ladder.trials_per_step)


def _done(top1, epoch=3):
    return {"top1": top1, "epoch": epoch, "training_iteration": epoch}


def test_each_step_waits_for_the_one_above_and_starts_from_its_best_completed_trial(tmp_path):
    lad = _ladder(NO_PRETRAIN)
    a, b = lad.suggest("a"), lad.suggest("b")
    assert a["gating.density"] == b["gating.density"] == 0.75 and T.STARTED_FROM not in a   # from the dense start
    assert lad.suggest("c") is None                  # step 2 waits for step 1
    lad.on_trial_complete("a", _done(90.0))
    assert lad.suggest("c") is None
    lad.on_trial_complete("b", _done(95.0, epoch=1))   # stopped by its scheduler at epoch 1: not a parent
    c = lad.suggest("c")
    assert c["gating.density"] == 0.5 and c[T.STARTED_FROM] == "a"
    assert c["gating.gate"] == a["gating.gate"]      # the parent's checkpoint holds gates at those sites
    assert lad.searcher.study.trials[-1].params["gating.gate"] == S.enqueued({"gating.gate": a["gating.gate"]},
                                                                             lad.searcher.space.params)["gating.gate"]

    # Ray's snapshot of the wrapper and the study, read back into fresh objects (what `gatetune resume` does)
    SearchGenerator(lad).save_to_dir(str(tmp_path), "s")
    back = _ladder(NO_PRETRAIN)
    SearchGenerator(back).restore_from_dir(str(tmp_path))
    assert back.step == 1 and back.parents == [None, "a"] and back.handed == {"a": 0, "b": 0, "c": 1}
    d = back.suggest("d")
    assert d["gating.density"] == 0.5 and d[T.STARTED_FROM] == "a"
    back.on_trial_complete("c", _done(80.0))
    back.on_trial_complete("d", _done(85.0))
    e = back.suggest("e")
    assert e["gating.density"] == 0.25 and e[T.STARTED_FROM] == "d" and e["gating.gate"] == a["gating.gate"]
    back.on_trial_complete("e", error=True)
    back.suggest("f")
    back.on_trial_complete("f", _done(70.0, epoch=2))
    assert back.suggest("g") is Searcher.FINISHED and back.stopped is None   # every step done
    assert len(back.searcher.study.trials) == 6


def test_a_step_without_a_completed_trial_ends_the_ladder_with_one_line(capsys):
    lad = _ladder(NO_PRETRAIN)
    lad.suggest("a"), lad.suggest("b")
    lad.on_trial_complete("a", error=True)
    lad.on_trial_complete("b", _done(40.0, epoch=1))
    assert lad.suggest("c") is Searcher.FINISHED
    assert "ladder stopped after density 0.75: no trial of that step completed" in capsys.readouterr().err


def test_the_dense_pretraining_comes_first_and_starts_the_first_step():
    lad = _ladder([])
    pre = lad.suggest("p")
    assert pre[T.PRETRAIN] and pre["gating.gate"] == "none"
    assert lad.suggest("a") is None                  # every step-1 trial starts from its weights
    lad.on_trial_complete("p", _done(98.0, epoch=6))
    a = lad.suggest("a")
    assert a["gating.density"] == 0.75 and a[T.STARTED_FROM] == "p"


@pytest.mark.parametrize("override, key, words", [
    (["space.gating.density={choice: [0.5, 0.25]}"], "space.gating.density", "search.ladder.densities"),
    (["space.train.epochs={int: [1, 3]}"], "space.train.epochs", "train.epochs per step"),
    (["space.gating.weight={grid: [1.0e-8, 1.0e-6]}"], "space.gating.weight", "use choice"),
    (["search.scheduler.name=asha"], "search.scheduler.name", "asha_by_density"),
    (["search.ladder.densities=[0.5, 0.75]"], "search.ladder.densities", "from high to low"),
    (["search.ladder.densities=[1.5, 0.5]"], "search.ladder.densities", "(0, 1]"),
])
def test_a_wrong_ladder_is_one_line_naming_the_key(override, key, words):
    with pytest.raises(UserError) as e:
        S.prepare(C.load(LADDER, override))
    assert e.value.key == key and words in e.value.message and "\n" not in str(e.value)


def _gated(density, gate=("conv4", "conv5", "conv6"), weights=None):
    sites = {s: SiteSpec(gate=True, density=density) for s in gate}
    return models.build("digitnet", num_classes=10, in_channels=1, input_size=16, sites=sites, weights=weights)


def test_a_gated_checkpoint_continues_gated_at_the_same_sites_and_a_lower_density(tmp_path):
    torch.manual_seed(0)
    parent = _gated(0.75)
    with torch.no_grad():
        for p in parent.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    for m in parent.modules():   # running statistics away from their defaults too
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
    path = tmp_path / "state.pt"
    torch.save({"model": parent.state_dict(), "epoch": 3}, path)
    child = _gated(0.5, weights=str(path))
    same = _gated(0.75, weights=str(path))
    for k, v in parent.state_dict().items():
        assert torch.equal(child.state_dict()[k], v), k
    x = torch.randn(4, 1, 16, 16)
    parent.eval(), same.eval(), child.eval()
    with torch.no_grad():
        assert torch.equal(same(x), parent(x))
        assert not torch.equal(child(x), parent(x))   # fewer channels kept
    with pytest.raises(ModelError, match="does not fit this gating"):
        _gated(0.5, gate=("conv5", "conv6"), weights=str(path))
    with pytest.raises(ModelError, match="does not fit this gating"):
        models.build("digitnet", num_classes=10, in_channels=1, input_size=16, weights=str(path))


def test_a_ladder_search_on_digits_walks_the_densities_from_the_dense_pretraining(ray_local, tmp_path):
    cfg = C.load(LADDER, ["search.pretrain.epochs=2", "train.epochs=1", "train.keep_checkpoints=1",
                          "search.ladder={densities: [0.75, 0.5], trials_per_step: 2}"])
    run_dir, ok = run_search(cfg, storage=str(tmp_path), name="ladder")
    assert ok
    df = results.read_report(os.path.join(run_dir, "report.csv"))
    assert len(df) == 5 and df["trial_id"].is_unique and (df["status"] == "completed").all()
    pre = df[df["pretrain"]]["trial_id"].iloc[0]
    step1, step2 = df[df["target_density"] == 0.75], df[df["target_density"] == 0.5]
    assert len(step1) == len(step2) == 2 and (step1["started_from"] == pre).all()
    best = step1.sort_values("top1")["trial_id"].iloc[-1]
    assert (step2["started_from"] == best).all()
    parent_gate = step1.set_index("trial_id").loc[best, "gated_layers"]
    assert (step2["gated_layers"] == parent_gate).all()
    assert (step2["density"] - 0.5).abs().max() < 0.03   # the lower density, reached from the step above
    parent_keys = set(torch.load(checkpoint.trial_weights(run_dir, best), weights_only=False)["model"])
    for tid in step2["trial_id"]:
        assert set(torch.load(checkpoint.trial_weights(run_dir, tid), weights_only=False)["model"]) == parent_keys


GATETUNE = [os.path.join(os.path.dirname(sys.executable), "gatetune")]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_driver_killed_between_two_steps_resumes_the_ladder(tmp_path):
    """SIGKILL the driver once a step-2 trial has started; `gatetune resume` ends every trial once, each step-2
    and step-3 trial from the best completed trial of the step above, no trial trained twice."""
    run_dir = tmp_path / "lad"
    cmd = [*GATETUNE, "search", LADDER, "search.pretrain.epochs=1", "train.epochs=2", "search.scheduler.name=fifo",
           "search.ladder={densities: [0.75, 0.5, 0.25], trials_per_step: 2}", "--storage", str(tmp_path),
           "--name", "lad"]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)

    def step2_checkpointed() -> bool:
        return any(params.get("gating.density") == 0.5 and any(folder.glob("checkpoint_*"))
                   for folder, params in trial_params(run_dir))

    deadline = time.time() + 300
    while time.time() < deadline and not step2_checkpointed():
        time.sleep(0.1)
    assert step2_checkpointed(), "no step-2 trial checkpointed within 300 s"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    r = subprocess.run([*GATETUNE, "resume", str(run_dir)], env=ENV, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    df = results.read_report(run_dir / "report.csv")
    assert len(df) == 7 and df["trial_id"].is_unique and (df["status"] == "completed").all(), df
    by_density = {d: g for d, g in df.groupby("target_density")}
    for upper, lower in ((0.75, 0.5), (0.5, 0.25)):
        best = by_density[upper].sort_values("top1")["trial_id"].iloc[-1]
        assert (by_density[lower]["started_from"] == best).all()
    for trial_dir in run_dir.glob("trial_*"):
        epochs = [json.loads(x)["epoch"] for x in open(trial_dir / "result.json") if x.strip()]
        assert len(epochs) - len(set(epochs)) <= 1, (trial_dir.name, epochs)   # at most the epoch killed mid-way
