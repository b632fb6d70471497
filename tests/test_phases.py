"""train.phases (the notebook's two-phase recipe), searching phase keys, and search.start_from."""
import os
import textwrap

import pytest
import torch

from gatetune.tuning import config as C
from gatetune.tuning.search import space as S
from gatetune.core.errors import UserError
from gatetune.tuning.search.space import SearchPlan, prepare, start_points
from gatetune.tuning.train.loop import fit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "search_spaces", "digits.yaml")
QUICK = os.path.join(ROOT, "search_spaces", "quickstart.yaml")
TWO = ["train.phases=[{epochs: 1, trainable: none, weight: 1.0e-4, lr: 0.05}, "
       "{epochs: 2, trainable: all, weight_factor: 0.1, lr: 0.02}]", "train.lr_schedule.name=constant"]


def test_phases_freeze_then_train_with_their_own_weight_and_lr(one_thread):
    cfg = C.load(DIGITS, TWO)
    assert cfg.train.epochs == 3                                   # the phases' sum replaces digits.yaml's 10
    phases = C.phases(cfg)
    assert [(p.start, p.end, p.lr) for p in phases] == [(0, 1, 0.05), (1, 3, 0.02)]
    assert phases[0].trainable == frozenset() and len(phases[1].trainable) == 6
    assert set(phases[0].weights.values()) == {1e-4} and all(w == pytest.approx(1e-7) for w in phases[1].weights.values())
    states, metrics = [], []
    fit(cfg, lambda m, s: (metrics.append(m), states.append({k: v.clone() for k, v in s["model"].items()})))
    torch.manual_seed(cfg.seed)
    from gatetune.tuning.train.loop import build_model
    from gatetune.tuning.data import load
    init = build_model(cfg, load(cfg.data, torch.device("cpu"), seed=cfg.seed)).state_dict()
    convs = [k for k in init if k.endswith("conv.weight")]
    preds = [k for k in init if "predictor" in k]
    assert convs and preds
    assert all(torch.equal(states[0][k], init[k]) for k in convs)            # phase 1: frozen
    assert all(not torch.equal(states[0][k], init[k]) for k in preds)        # ... while the predictors learn
    assert all(not torch.equal(states[1][k], states[0][k]) for k in convs)   # phase 2: everything trains
    assert [m["lr"] for m in metrics] == [0.05, 0.02, 0.02]
    assert metrics[0]["gate_loss"] > 100 * metrics[1]["gate_loss"] > 0      # weight 1e-4, then 1e-7


def test_phase_keys_can_be_searched():
    keys = C.config_keys()
    assert "train.phases.N.weight_factor" in keys
    params = S.parse_space({"train.phases.0.epochs": {"int": [1, 4]}, "train.phases.1.lr": {"uniform": [0.01, 0.1]},
                            "train.phases.0.trainable": {"choice": ["none", ["conv6"]]}}, keys, "s.yaml")
    cfg = C.load(QUICK, TWO)
    trial = C.with_params(C.to_dict(cfg), {"train.phases.0.epochs": 4, "train.phases.1.lr": 0.07})
    assert trial.train.epochs == 6 and trial.train.phases[1].lr == 0.07      # epochs re-derived
    assert SearchPlan(cfg, C.to_dict(cfg), params).max_epochs == 6            # ASHA's max_t covers the longest
    with pytest.raises(UserError, match="did you mean 'train.phases.N.weight'"):
        S.parse_space({"train.phases.0.wieght": {"uniform": [0, 1]}}, keys, "s.yaml")
    with pytest.raises(UserError, match="item 2 does not exist"):
        C.with_params(C.to_dict(cfg), {"train.phases.2.lr": 0.1})


@pytest.mark.parametrize("override, key, says", [
    ("train.epochs=5", "train.epochs", "add up to 3 epochs"),
    ("train.phases.0.weight_factor=2", "train.phases.0.weight_factor", "not both"),
    ("train.phases.1.trainable=[conv9]", "train.phases.1.trainable", "did you mean"),
    ("train.phases=[{lr: 0.1}]", "train.phases.0.epochs", "required"),
])
def test_bad_phases_are_one_line_errors(override, key, says):
    with pytest.raises(UserError, match=says) as e:
        C.load(DIGITS, [*TWO, override])
    assert e.value.key == key and "\n" not in str(e.value)


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_start_from_gives_optuna_the_files_values(tmp_path):
    _write(tmp_path / "good.yaml", """
        gating: {density: 0.5, gate: [conv6, conv5], weight: 1.0e-6}
        train: {optimizer: {lr: 0.1}, epochs: 3}
    """)
    search = _write(tmp_path / "s.yaml", f"""
        _import: {QUICK}
        search: {{start_from: [good.yaml]}}
    """)
    cfg = C.load(search)
    plan = prepare(cfg, search)
    assert plan.base["search"]["start_from"] == [str(tmp_path / "good.yaml")]
    notices = []
    (point,) = start_points(plan.base, plan.params, search, notices)
    assert plan.points == [point]
    # list choices are Optuna labels; [conv6, conv5] is the same site set as the choice [conv5, conv6]
    assert point == {"gating.density": 0.5, "gating.weight": 1e-6, "gating.gate": "conv5,conv6",
                     "gating.trainable": "all", "train.optimizer.lr": 0.1}
    assert notices and "train.epochs" in notices[0]

    for body, says in [("gating: {density: 0.3}", "not one of the space's choices"),
                       ("train: {optimizer: {lr: 0.5}}", "outside the space's range"),
                       ("model: {name: resnet20}", "config of resnet20"),
                       ("gating: {densty: 0.5}", "did you mean 'density'")]:
        _write(tmp_path / "good.yaml", body)
        with pytest.raises(UserError, match=says) as e:
            prepare(C.load(search), search)
        assert e.value.key.startswith("search.start_from") and "\n" not in str(e.value)
    with pytest.raises(UserError, match="start_from file not found"):
        prepare(C.load(search, ["search.start_from=[nothere.yaml]"]), search)
