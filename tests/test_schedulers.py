"""Density-stratified ASHA against plain ASHA, driven directly (no Ray cluster): the same trials, the
same results in the same asynchronous order, and lower density learning slower, as it does."""
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler

from gatetune.tuning.search.schedulers import DecisionLog, DensityStratifiedASHA, RecordingASHA, rungs

DENSITIES = (0.25, 0.5, 0.75, 1.0)
MAX_T = 8


def _top1(density: float, epoch: int, i: int) -> float:
    # fewer channels learn slower; a little per-trial spread
    return 100 - 60 / (1 + epoch * density) + (i % 3) * 0.1


def _run(scheduler, n_trials: int = 16, achieved=lambda d: d, order=DENSITIES) -> tuple[dict, list]:
    """Trials start two at a time (2 CPUs); each reports once per epoch until stopped or MAX_T.
    Densities arrive cycling through `order` (ASHA always lets the very first trials through: its
    rungs are empty then)."""
    trials = [SimpleNamespace(trial_id=f"t{i:02d}", config={"gating.density": order[i % 4]}) for i in range(n_trials)]
    reached, stops = {}, []
    for t in trials:
        scheduler.on_trial_add(None, t)
    queue = list(trials)
    running = [queue.pop(0), queue.pop(0)]
    epoch = {t.trial_id: 0 for t in trials}
    while running:
        t = min(running, key=lambda r: (epoch[r.trial_id], r.trial_id))   # the laggard reports next
        epoch[t.trial_id] += 1
        e, d = epoch[t.trial_id], t.config["gating.density"]
        action = scheduler.on_trial_result(None, t, {"epoch": float(e), "top1": _top1(d, e, int(t.trial_id[1:])),
                                                     "density": achieved(d)})
        if action == TrialScheduler.STOP or e >= MAX_T:
            scheduler.on_trial_complete(None, t, {"epoch": float(e), "top1": 0.0})
            running.remove(t)
            reached[t.trial_id] = (d, e)
            if action == TrialScheduler.STOP and e < MAX_T:
                stops.append(t.trial_id)
            if queue:
                running.append(queue.pop(0))
    return reached, stops


def _full_by_bucket(reached: dict) -> dict:
    return {d: sum(1 for dd, e in reached.values() if dd == d and e >= MAX_T) for d in DENSITIES}


def _schedulers():
    kw = dict(time_attr="epoch", metric="top1", mode="max", max_t=MAX_T, grace_period=1, reduction_factor=2)
    return RecordingASHA(**kw), DensityStratifiedASHA(DENSITIES, **kw)


@pytest.mark.parametrize("order", [DENSITIES[::-1], DENSITIES])
def test_plain_asha_starves_low_density_and_stratified_does_not(order):
    plain, strat = _schedulers()
    full_plain = _full_by_bucket(_run(plain, order=order)[0])
    full_strat = _full_by_bucket(_run(strat, order=order)[0])
    if order[0] == 1.0:   # dense trials first, as in the demo's search: low density never gets through
        assert full_plain[0.25] == 0, full_plain
    assert all(n >= 1 for n in full_strat.values()), full_strat   # every density has a full-length trial
    assert sum(full_strat.values()) < 16                           # and it still stops trials early


def test_buckets_nearest_and_rungs():
    _, strat = _schedulers()
    assert strat.bucket(0.3) == 0.25 and strat.bucket(0.9) == 1.0
    assert sorted(strat.asha) == list(DENSITIES)       # one ASHA per bucket
    assert rungs(1, 2, MAX_T) == [1, 2, 4, 8] and rungs(1, 4, 10) == [1, 4, 10] and rungs(2, 3, 8) == [2, 6, 8]


def test_off_target_trials_are_stopped_and_recorded(tmp_path):
    log = tmp_path / "decisions.jsonl"
    strat = DensityStratifiedASHA(DENSITIES, time_attr="epoch", metric="top1", mode="max", max_t=MAX_T,
                                  grace_period=1, reduction_factor=2, tolerance=0.05, log=DecisionLog(tmp_path))
    reached, stops = _run(strat, n_trials=4, achieved=lambda d: min(1.0, d + 0.2))   # density misses its target
    assert set(stops) == {"t00", "t01", "t02"}                     # 1.0 -> 1.0 is on target
    assert '"stopped_by": "off_target"' in log.read_text()


def test_recheck_stops_a_trial_that_passed_an_empty_rung(tmp_path):
    """Trial a reaches rung 1 first (empty: ASHA lets it through); b then does much better there. Plain ASHA
    never looks back at rung 1 for a; with recheck, a's next result stops it and the stop is recorded."""
    kw = dict(time_attr="epoch", metric="top1", mode="max", max_t=MAX_T, grace_period=1, reduction_factor=4)
    for recheck, expected in ((False, TrialScheduler.CONTINUE), (True, TrialScheduler.STOP)):
        folder = tmp_path / str(recheck)
        folder.mkdir()
        asha = RecordingASHA(DecisionLog(folder), recheck=recheck, **kw)
        a, b = (SimpleNamespace(trial_id=i, config={}) for i in ("a", "b"))
        asha.on_trial_add(None, a)
        asha.on_trial_add(None, b)
        assert asha.on_trial_result(None, a, {"epoch": 1.0, "top1": 10.0}) == TrialScheduler.CONTINUE
        assert asha.on_trial_result(None, b, {"epoch": 1.0, "top1": 50.0}) == TrialScheduler.CONTINUE
        assert asha.on_trial_result(None, a, {"epoch": 2.0, "top1": 12.0}) == expected   # a: last of 2 at rung 1
        assert asha.on_trial_result(None, b, {"epoch": 2.0, "top1": 60.0}) == TrialScheduler.CONTINUE
        log = folder / "decisions.jsonl"
        assert (log.exists() and '"trial_id": "a", "stopped_by": "asha", "epoch": 2.0' in log.read_text()) == recheck


@pytest.mark.parametrize("order", [DENSITIES, DENSITIES[::-1], (0.5, 1.0, 0.25, 0.75)])
@pytest.mark.parametrize("rf", [2, 4])
def test_recheck_trains_fewer_epochs_and_still_finishes_the_best(order, rf):
    kw = dict(time_attr="epoch", metric="top1", mode="max", max_t=MAX_T, grace_period=1, reduction_factor=rf)
    plain, rechecked = (_run(RecordingASHA(recheck=r, **kw), order=order)[0] for r in (False, True))
    assert sum(e for _, e in rechecked.values()) < sum(e for _, e in plain.values())
    assert any(d == 1.0 and e == MAX_T for d, e in rechecked.values())   # a dense trial (the best) trains to the end


def test_top_promotion_stops_the_third_of_three_that_rays_quantile_lets_through():
    """rf 2, rung 1 holds 10 and 30: Ray's rule passes a third trial at 25 (above their mean, 20); ASHA's paper
    and Optuna's pruner keep only the best 3 // 2 = 1 of the three, so `top` stops it; at 40 it goes on."""
    kw = dict(time_attr="epoch", metric="top1", mode="max", max_t=MAX_T, grace_period=1, reduction_factor=2)
    for promotion, third, expected in (("quantile", 25.0, TrialScheduler.CONTINUE), ("top", 25.0, TrialScheduler.STOP),
                                       ("top", 40.0, TrialScheduler.CONTINUE)):
        asha = RecordingASHA(promotion=promotion, **kw)
        a, b, c = (SimpleNamespace(trial_id=i, config={}) for i in "abc")
        for t in (a, b, c):
            asha.on_trial_add(None, t)
        assert asha.on_trial_result(None, a, {"epoch": 1.0, "top1": 10.0}) == TrialScheduler.CONTINUE   # empty rung
        assert asha.on_trial_result(None, b, {"epoch": 1.0, "top1": 30.0}) == TrialScheduler.CONTINUE   # best of 2
        assert asha.on_trial_result(None, c, {"epoch": 1.0, "top1": third}) == expected, (promotion, third)
    with pytest.raises(ValueError, match="'quantile' or 'top'"):
        RecordingASHA(promotion="median", **kw)


def test_top_promotion_trains_fewer_epochs_and_still_finishes_the_best():
    """Never more epochs than Ray's rule; fewer where the better trials come later (87 -> 79, 61 -> 51); the same
    where the best come first (40: Ray's quantile is then as strict)."""
    kw = dict(time_attr="epoch", metric="top1", mode="max", max_t=MAX_T, grace_period=1, reduction_factor=2)
    epochs = {}
    for order in (DENSITIES, DENSITIES[::-1], (0.5, 1.0, 0.25, 0.75)):
        quantile, top = (_run(RecordingASHA(promotion=p, **kw), order=order)[0] for p in ("quantile", "top"))
        epochs[order] = [sum(e for _, e in r.values()) for r in (quantile, top)]
        assert any(d == 1.0 and e == MAX_T for d, e in top.values()), order   # a dense trial trains to the end
    assert all(t <= q for q, t in epochs.values()) and sum(q - t for q, t in epochs.values()) >= 10, epochs


def test_a_scheduler_pickled_before_promotion_existed_promotes_as_before():
    """gatetune resume unpickles the run's RecordingASHA: one saved by a gatetune without `promotion` and `rf`
    must still decide by Ray's rule (rf 4: rungs 1, 4; the third at 25 passes 10 and 30's 75% quantile, 25)."""
    import pickle
    kw = dict(time_attr="epoch", metric="top1", mode="max", max_t=MAX_T, grace_period=1, reduction_factor=4)
    asha = RecordingASHA(recheck=True, **kw)
    for name in ("promotion", "rf"):
        del asha.__dict__[name]
    old = pickle.loads(pickle.dumps(asha))
    a, b, c = (SimpleNamespace(trial_id=i, config={}) for i in "abc")
    for t, top1 in ((a, 10.0), (b, 30.0), (c, 25.0)):
        old.on_trial_add(None, t)
        assert old.on_trial_result(None, t, {"epoch": 1.0, "top1": top1}) == TrialScheduler.CONTINUE
    assert old.on_trial_result(None, a, {"epoch": 2.0, "top1": 11.0}) == TrialScheduler.STOP   # recheck still works


def test_recheck_needs_one_bracket():
    with pytest.raises(ValueError, match="brackets=1"):
        RecordingASHA(time_attr="epoch", metric="top1", mode="max", max_t=MAX_T, recheck=True, brackets=2)


@pytest.mark.parametrize("name", ["asha", "asha_by_density"])
def test_recheck_from_config(tmp_path, name):
    from gatetune.tuning import config as C
    from gatetune.tuning.search import space as S
    from gatetune.tuning.search.schedulers import build
    cfg = C.Config(train={"epochs": 8}, search={"scheduler": {"name": name, "reduction_factor": 4, "recheck": True}},
                   space={"gating.density": {"choice": [0.25, 1.0]}})
    sched = build(S.prepare(cfg, "x.yaml"), DecisionLog(tmp_path))
    ashas = [sched] if name == "asha" else list(sched.asha.values())
    assert all(a.recheck and a.milestones == [1, 4] for a in ashas)   # rungs 1, 4; epoch 8 ends every trial
    assert C.Config().search is None and not C.SchedulerCfg().recheck   # off unless asked for
    assert all(a.promotion == "quantile" for a in ashas)   # Ray's rule unless asked for
    top = build(S.prepare(C.Config(train={"epochs": 8}, search={"scheduler": {"name": name, "promotion": "top"}},
                                   space={"gating.density": {"choice": [0.25, 1.0]}}), "x.yaml"), DecisionLog(tmp_path))
    assert all(a.promotion == "top" for a in ([top] if name == "asha" else top.asha.values()))


@pytest.mark.parametrize("name", ["asha", "asha_by_density", "fifo"])
def test_scheduler_from_config(tmp_path, name):
    from gatetune.tuning import config as C
    from gatetune.tuning.search import space as S
    from gatetune.tuning.search.schedulers import build
    cfg = C.Config(search={"scheduler": {"name": name}},
                   space={"gating.density": {"uniform": [0.2, 1.0]}})
    plan = S.prepare(cfg, "x.yaml")
    sched = build(plan, DecisionLog(tmp_path))
    assert type(sched).__name__ == {"asha": "RecordingASHA", "asha_by_density": "DensityStratifiedASHA",
                                    "fifo": "FIFOScheduler"}[name]
    assert plan.density_buckets == pytest.approx([0.3, 0.5, 0.7, 0.9])


def test_multi_objective_config():
    import optuna
    from gatetune.tuning import config as C
    from gatetune.core.errors import UserError
    from gatetune.tuning.search.run import objectives, sampler
    cfg = C.Config(search={"objectives": [{"top1": "max"}, {"macs_ratio": "min"}],
                           "scheduler": {"name": "asha_by_density"}})
    assert objectives(cfg) == (["top1", "macs_ratio"], ["max", "min"])
    assert isinstance(sampler(cfg), optuna.samplers.NSGAIISampler)
    with pytest.raises(UserError, match="plain asha ranks trials on top-1 alone"):
        C.load_dict({"search": {"objectives": [{"top1": "max"}, {"macs_ratio": "min"}]}})
    with pytest.raises(UserError, match="two or more objectives"):
        C.load_dict({"search": {"objectives": [{"top1": "max"}], "scheduler": {"name": "fifo"}}})


@pytest.mark.parametrize("name", ["tpe", "random", "nsga2"])
def test_every_sampler_survives_the_snapshot_pickle(name):
    """Ray pickles the searcher, its study and sampler included, at every snapshot; Optuna 5.1's NSGA-II
    holds a lock that cannot be pickled. The sampler read back samples like the original."""
    import optuna
    import ray.cloudpickle
    from gatetune.tuning import config as C
    from gatetune.tuning.search.run import sampler
    cfg = C.Config(seed=3, search={"sampler": name, "num_samples": 8})
    study = optuna.create_study(sampler=sampler(cfg), directions=["maximize", "minimize"])
    for _ in range(6):
        t = study.ask()
        study.tell(t, [t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)])
    again = ray.cloudpickle.loads(ray.cloudpickle.dumps(study))
    a, b = study.ask(), again.ask()
    assert a.suggest_float("x", 0, 1) == b.suggest_float("x", 0, 1)


@pytest.mark.slow
def test_real_search_plain_asha_starves_a_density_bucket_stratified_does_not(ray_local, tmp_path):
    """The same tiny digits search (density grid {1.0, 0.75, 0.5, 0.25} x 2, 4 epochs, rungs 1, 2, 4) under
    plain ASHA and under asha_by_density: which density buckets get a trial trained to the last epoch."""
    import os
    from gatetune import results
    from gatetune.tuning import config as C
    from gatetune.tuning.search.run import run_search
    quick = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "search_spaces",
                         "quickstart.yaml")
    common = ["train.epochs=4", "train.keep_checkpoints=1", "search.num_samples=2", "search.max_concurrent=2",
              "gating.gate=all", "gating.weight=1.0e-6", "train.optimizer.lr=0.05",
              "space={gating.density: {grid: [1.0, 0.75, 0.5, 0.25]}}"]
    reached = {}
    for name in ("asha", "asha_by_density"):
        cfg = C.load(quick, [*common, f"search.scheduler.name={name}"])
        run_dir, ok = run_search(cfg, storage=str(tmp_path), name=name)
        df = results.table(run_dir)
        assert ok and len(df) == 8
        reached[name] = df.groupby("target_density")["epochs"].max().to_dict()
    assert min(reached["asha"].values()) < 4, reached               # some bucket never trained to the end
    assert set(reached["asha_by_density"].values()) == {4}, reached  # every bucket did
