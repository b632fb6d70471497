"""One trial vocabulary (core.trials): the status classifier every part of gatetune uses, and a trial's role."""
from types import SimpleNamespace

import pytest

from gatetune.core import trials as T
from gatetune.core.dotted import trial_config

CASES = [  # (Ray's status, last result, budget, ended by a decision) -> status
    ("TERMINATED", {"epoch": 3}, 3, False, "completed"),
    ("TERMINATED", {"epoch": 3.0}, 3, False, "completed"),
    ("TERMINATED", {"epoch": 1}, 3, False, "stopped"),
    ("TERMINATED", {"training_iteration": 3}, 3, False, "completed"),   # no `epoch`: the iteration counts
    ("TERMINATED", None, 3, False, "stopped"),                          # ended before its first result
    ("TERMINATED", {"epoch": 1}, None, False, "completed"),             # no budget: any end completes
    ("terminated", {"epoch": 3}, 3, False, "completed"),                # Ray's enum printed in lower case
    ("ERROR", {"epoch": 2}, 3, False, "error"),
    ("ERROR", {"epoch": 2, "diverged": True}, 3, False, "diverged"),    # the divergence ended it
    ("TERMINATED", {"epoch": 0.5, "diverged": True}, 3, False, "diverged"),
    ("TERMINATED", {"epoch": 0.5, "diverged": float("nan")}, 3, False, "stopped"),   # NaN is not a flag
    ("RUNNING", {"epoch": 1}, 3, False, "running"),
    ("RUNNING", {"epoch": 1}, 3, True, "stopped"),      # a scheduler stopped it; Ray's state lags
    ("RUNNING", {"epoch": 3, "done": True}, 3, False, "completed"),
    ("PAUSED", {"epoch": 1}, 3, False, "running"),
    ("PENDING", None, 3, False, "pending"),
    (None, {"epoch": 1}, 3, False, "running"),          # not in Ray's saved state yet, but reporting
    (None, None, 3, False, "pending"),
]


@pytest.mark.parametrize("ray, last, budget, ended, want", CASES)
def test_classify(ray, last, budget, ended, want):
    got = T.classify(ray, last, budget, ended=ended)
    assert got == want and got.value == want and str(got) == want
    assert got.ended == (want not in ("running", "pending"))


def test_statuses_in_report_order():
    assert T.STATUSES == ("completed", "stopped", "running", "pending", "diverged", "error")


def test_the_searcher_the_gauges_and_the_report_agree():
    """The three places that need a trial's status (Optuna's tell, the `gatetune_trials` gauge, report.csv)
    all ask core.trials.classify: for every ended case they give the same answer."""
    from gatetune.results import trial_status as report_status
    from gatetune.tuning.search.live import TrialCounts
    base = {"train": {"epochs": 3}, "search": {"scheduler": {"name": "asha"}}}
    counts = TrialCounts("run", base)
    searcher = SimpleNamespace(base=base)
    from gatetune.tuning.search.study import StudySearch
    for ray, last, _, _, _ in CASES:
        if ray not in ("TERMINATED", "ERROR"):
            continue
        live = counts.status(SimpleNamespace(status=ray, last_result=last or {}, config={}))
        told = StudySearch.ending(searcher, {}, last or {}, ray == "ERROR")
        flat = {"train.epochs": trial_config(base, {})["train"]["epochs"]}
        report, _ = report_status(ray, last, flat, None)
        assert live.value == told.value == report, (ray, last)


def test_roles():
    search = {"gating.density": 0.5, T.STARTED_FROM: "dense1"}
    assert T.ranked(search) and T.origin_of(search) == "" and not T.is_pretrain(search)
    assert T.config_params(search) == {"gating.density": 0.5}
    rep = T.replica(search, "a1", seed=4)
    assert rep == {"gating.density": 0.5, "seed": 4, T.CONFIRMS: "a1"}
    assert T.origin_of(rep) == "a1" and not T.ranked(rep)
    assert not T.ranked({T.PRETRAIN: True}) and T.is_pretrain({T.PRETRAIN: "True"})
    assert T.epochs_of({"train": {"epochs": 4}}) == 4.0 and T.epochs_of({"train.epochs": 2}) == 2.0
    assert T.epochs_of({}) is None
