"""The `space:` section: parsing, errors, and the Optuna define-by-run function (no Ray)."""
import optuna
import pytest

from gatetune.tuning import config as C
from gatetune.tuning.search import space as S
from gatetune.core.errors import UserError

KEYS = C.config_keys()


def test_define_by_run_samples_lists_grid_and_conditions():
    params = S.parse_space({
        "gating.density": {"grid": [0.25, 0.5]},
        "gating.gate": {"choice": ["all", ["conv5", "conv6"]]},
        "gating.weight": {"loguniform": [1e-8, 1e-4]},
        "train.lr_schedule.decay_epochs": {"int": [2, 6]},
        "train.optimizer.momentum": {"uniform": [0.8, 0.95], "when": {"train.optimizer.name": "adam"}},
    }, KEYS, "f.yaml")
    assert S.grid_size(params) == 2
    space = S.define_by_run(params, C.to_dict(C.Config()))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(6):
        t = study.ask()
        cfg = space(t)
        seen.append(cfg)
        study.tell(t, 0.0)
    assert [c["gating.density"] for c in seen] == [0.25, 0.5] * 3        # grid by trial number
    assert all(c["gating.gate"] in ("all", ["conv5", "conv6"]) for c in seen)   # lists come back as lists
    assert all(1e-8 <= c["gating.weight"] <= 1e-4 for c in seen)
    assert all("train.optimizer.momentum" not in c for c in seen)       # condition false (optimizer is sgd)


@pytest.mark.parametrize("space, words", [
    ({"gating.densty": {"choice": [0.5]}}, ["not a config key", "gating.density"]),
    ({"gating.density": {"choise": [0.5]}}, ["unknown distribution", "choice"]),
    ({"gating.density": {"choice": []}}, ["non-empty"]),
    ({"gating.weight": {"loguniform": [1e-3, 1e-6]}}, ["low < high", "low=0.001"]),
    ({"gating.weight": {"loguniform": [0, 1]}}, ["low > 0"]),
    ({"gating.weight": {"uniform": [0.1]}}, ["[low, high]"]),
    ({"gating.density": 0.5}, ["distribution"]),
])
def test_space_errors(space, words):
    with pytest.raises(UserError) as e:
        S.parse_space(space, KEYS, "s.yaml")
    assert "s.yaml" in str(e.value) and "space." in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_search_values_validated_against_config():
    prepare = S.prepare
    cfg = C.Config(search={}, space={"gating.density": {"choice": [0.5, 1.5]}})
    with pytest.raises(UserError, match=r"space.gating.density.*1.5"):
        prepare(cfg, "s.yaml")
    cfg = C.Config(search={}, space={"gating.gate": {"choice": ["all", "conv9"]}})
    with pytest.raises(UserError, match="conv9"):
        prepare(cfg, "s.yaml")
    with pytest.raises(UserError, match="no `search:` section"):
        prepare(C.Config(), "s.yaml")
