"""Trial schedulers: ASHA that records why it stopped a trial, and density-stratified ASHA.

Plain ASHA on top-1 compares a density-0.25 trial with a density-1.0 trial. Fewer channels learn
slower, so the low-density trials are cut at the first rung and the left half of the
density/accuracy curve is never trained. `DensityStratifiedASHA` gives every density bucket its own
ASHA (its own rungs and cutoffs): a trial only competes with trials of the same density. It also
stops, as `off_target`, a trial whose achieved density stays further than a tolerance from its
target after the grace period.

Asynchronous ASHA decides once, when a trial reaches a rung, against the results the rung holds at that
moment; early in a search the rungs are nearly empty, so the first trials pass every rung and train to
the end (with 2 trials at a time, no other trial can even reach a rung while they run). `recheck`
revisits that decision: a trial that passed rung r is checked again at each later result against r's
cutoff as it stands then, and stopped once it has fallen below. It keeps its own copy of each rung's
values, fed from the same results, so it needs only Ray's public scheduler hooks.

`promotion` is the rule at a rung. Ray's ASHA lets a trial through when it is at or above the
(1 - 1/rf) quantile of the values the rung held before it: with rf 2 the second of two trials goes on when
it beats the first, and the third of three when it beats the mean of the first two, so on a small search
about two thirds pass each rung early on. `top` is the rule of ASHA's paper and Optuna's
SuccessiveHalvingPruner: a trial goes on only when it is among the best max(1, n // rf) of the n values
the rung holds with its own. It is applied over Ray's decision (a trial Ray stops stays stopped), from the
same copy of the rungs `recheck` keeps; with `recheck`, a trial has fallen behind once it is no longer
among that rung's best n // rf.

Seed replicas (search.confirm: a trial whose config names under `confirms` the trial it repeats) and the
dense pretraining (search.pretrain) are never stopped and never count in a rung. Both append each early stop to the run folder's decisions.jsonl (ASHA-stopped trials look TERMINATED
in Ray), which the report reads for its `stopped_by` column. Only Ray Tune's public scheduler API is
used: the stratified scheduler holds one ASHAScheduler per bucket and hands each trial to its own.

    build(plan, log)          # the scheduler a search config asks for (plan: space.SearchPlan)
"""
from __future__ import annotations

__all__ = ["RecordingASHA", "DensityStratifiedASHA", "DecisionLog", "build", "rungs", "nearest_bucket"]

import json
import math
import os
import warnings

import numpy as np
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from gatetune.core import layout
from gatetune.core import trials as T
from gatetune.core.storage import RunStore


def _unranked(trial) -> bool:
    """A seed replica or the dense pretraining: never stopped, never in a rung."""
    return not T.ranked(trial.config)


def nearest_bucket(buckets, density: float) -> float:
    """The bucket a trial of this target density joins (ties go to the lower bucket)."""
    return min(buckets, key=lambda b: (abs(b - density), b))


def rungs(grace_period: int, reduction_factor: int, max_t: int) -> list[int]:
    """ASHA's milestones in epochs: grace * rf^k below max_t, then max_t (where every trial stops)."""
    out, m = [], grace_period
    while m < max_t:
        out.append(m)
        m *= reduction_factor
    return [*out, max_t]


class DecisionLog:
    """One JSON line per early stop (trial_id, stopped_by, epoch, top1) in the run folder's decisions.jsonl
    (RunStore.append: local or remote)."""

    def __init__(self, run: RunStore | str | os.PathLike):
        self.run = run if isinstance(run, RunStore) else RunStore(run)

    def write(self, record: dict) -> None:
        try:
            self.run.append(layout.DECISIONS, json.dumps(record) + "\n")
        except Exception as e:   # noqa: BLE001  (a scheduler that raises aborts the whole search)
            warnings.warn(f"{self.run.uri(layout.DECISIONS)}: early stop of trial {record.get('trial_id')} not "
                          f"recorded ({type(e).__name__}: {e})")


class RecordingASHA(ASHAScheduler):
    """ASHA (time attribute `epoch`) that logs each early stop to `log` (a DecisionLog, or None).

    recheck: also stop a trial, at any later result, once its value at the last rung it passed falls below
    that rung's current cutoff (see the module docstring); needs one bracket.
    promotion: "quantile" (Ray's rule) or "top" (the best n // reduction_factor go on; module docstring).
    """

    # a scheduler pickled in a run folder by a gatetune without `promotion` (gatetune resume) promotes as it did;
    # the quantile path reads only `keep`, which such a pickle holds
    promotion = "quantile"

    def __init__(self, log: DecisionLog | None = None, *, metric: str, mode: str, time_attr: str = "epoch",
                 max_t: int, grace_period: int = 1, reduction_factor: float = 4, recheck: bool = False,
                 promotion: str = "quantile", **kw):
        if (recheck or promotion == "top") and kw.get("brackets", 1) != 1:
            raise ValueError("recheck and promotion='top' keep one set of rungs: use them with brackets=1")
        if promotion not in ("quantile", "top"):
            raise ValueError(f"promotion: 'quantile' or 'top', not {promotion!r}")
        super().__init__(metric=metric, mode=mode, time_attr=time_attr, max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor, **kw)
        self.log, self.time_attr, self.max_t, self.mode = log, time_attr, max_t, mode
        self.recheck, self.keep, self.rf, self.promotion = recheck, 1 / reduction_factor, reduction_factor, promotion
        # the milestones below max_t, as Ray's single bracket places them (a result at max_t ends the trial)
        self.milestones = [m for m in rungs(grace_period, reduction_factor, max_t) if m < max_t]
        self.rung_values: dict[float, dict[str, float]] = {m: {} for m in self.milestones}
        self.passed: dict[str, float] = {}   # trial id -> the last rung it passed, while it runs

    def set_search_properties(self, metric, mode, **spec) -> bool:
        """Accept TuneConfig's metric and mode when they are ours (Tune refuses a scheduler otherwise)."""
        return metric in (None, self.metric) and mode in (None, self.mode)

    def record(self, trial, result: dict, why: str) -> None:
        if self.log is not None:
            self.log.write({"trial_id": trial.trial_id, "stopped_by": why, "epoch": result.get("epoch"),
                            "top1": result.get("top1")})

    def _note(self, trial, result: dict) -> float | None:
        """Enter the result in the rung it reaches, as Ray's bracket does (the highest milestone reached
        that holds no value of this trial yet); that milestone, or None."""
        t, value = result.get(self.time_attr), result.get(self.metric)
        if t is None or value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        for m in reversed(self.milestones):
            if t >= m and trial.trial_id not in self.rung_values[m]:
                self.rung_values[m][trial.trial_id] = value if self.mode == "max" else -value
                return m
        return None

    def _behind(self, m: float, trial_id: str) -> bool:
        """Whether the trial's value at rung m is below the rung's cutoff as the rung stands now."""
        values = self.rung_values[m]
        mine = values[trial_id]
        if self.promotion == "top":
            return sum(v > mine for v in values.values()) >= max(1, int(len(values) // self.rf))
        return mine < np.nanpercentile(list(values.values()), (1 - self.keep) * 100)

    @property
    def _keeps_rungs(self) -> bool:
        """Whether this scheduler keeps its own copy of the rungs (recheck and promotion 'top' judge from it)."""
        return self.recheck or self.promotion == "top"

    def _fell_behind(self, trial) -> bool:
        m = self.passed.get(trial.trial_id)
        return m is not None and self._behind(m, trial.trial_id)

    def on_trial_add(self, tune_controller, trial):
        if not _unranked(trial):
            super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        if _unranked(trial):
            return TrialScheduler.CONTINUE
        action = super().on_trial_result(tune_controller, trial, result)
        t = result.get(self.time_attr, 0)
        if self._keeps_rungs:
            reached = self._note(trial, result)
            if (reached is not None and action == TrialScheduler.CONTINUE and t < self.max_t
                    and self.promotion == "top" and self._behind(reached, trial.trial_id)):
                action = TrialScheduler.STOP   # Ray's quantile let it through; it is not among the rung's best
        if self.recheck:
            if action != TrialScheduler.CONTINUE or t >= self.max_t:
                self.passed.pop(trial.trial_id, None)
            elif reached is not None:
                self.passed[trial.trial_id] = reached   # it just went through this rung
            elif self._fell_behind(trial):
                self.passed.pop(trial.trial_id)
                action = TrialScheduler.STOP
        if action == TrialScheduler.STOP and t < self.max_t:
            self.record(trial, result, "asha")
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        if not _unranked(trial):
            super().on_trial_complete(tune_controller, trial, result)
            if self._keeps_rungs:
                self._note(trial, result)
                self.passed.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller, trial):
        if not _unranked(trial):
            super().on_trial_remove(tune_controller, trial)
            self.passed.pop(trial.trial_id, None)


class DensityStratifiedASHA(FIFOScheduler):
    """One RecordingASHA per density bucket, plus an `off_target` stop.

    buckets: the density values trials are grouped by (a trial joins the nearest one), e.g. the
    `choice` values of gating.density or the centres of bins over its range.
    density_key: the trial-config key holding the target density; default: trials without it.
    tolerance: stop a trial whose achieved `density` differs from its target by more than this
    after the grace period (None: never).
    recheck, promotion: as RecordingASHA's, within each bucket.
    """

    def __init__(self, buckets, *, density_key: str = "gating.density", default: float = 1.0,
                 tolerance: float | None = 0.05, log: DecisionLog | None = None, metric: str, mode: str,
                 time_attr: str = "epoch", max_t: int, grace_period: int = 1, reduction_factor: int = 2,
                 recheck: bool = False, promotion: str = "quantile"):
        super().__init__()
        self.buckets = sorted(float(b) for b in buckets) or [float(default)]
        self.density_key, self.default, self.tolerance = density_key, default, tolerance
        self.time_attr, self.max_t, self.grace, self.mode, self.objective = time_attr, max_t, grace_period, mode, metric
        self.asha = {b: RecordingASHA(log, metric=metric, mode=mode, time_attr=time_attr, max_t=max_t,
                                      grace_period=grace_period, reduction_factor=reduction_factor, recheck=recheck,
                                      promotion=promotion)
                     for b in self.buckets}

    @property
    def metric(self) -> str:
        return self.objective

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return metric in (None, self.metric) and mode in (None, self.mode)

    def bucket(self, density: float) -> float:
        return nearest_bucket(self.buckets, density)

    def target(self, trial) -> float:
        return float(trial.config.get(self.density_key, self.default))

    def _of(self, trial) -> RecordingASHA:
        return self.asha[self.bucket(self.target(trial))]

    def on_trial_add(self, tune_controller, trial):
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        t = result.get(self.time_attr, 0)
        if (not _unranked(trial) and self.tolerance is not None and "density" in result and self.grace <= t < self.max_t
                and abs(result["density"] - self.target(trial)) > self.tolerance):
            self._of(trial).record(trial, result, "off_target")
            return TrialScheduler.STOP
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "DensityStratifiedASHA: " + "; ".join(f"density {b:g}: {a.debug_string()}" for b, a in self.asha.items())


def build(plan, log: DecisionLog | None):
    """The scheduler of a search plan (space.SearchPlan): FIFO, ASHA or density-stratified ASHA on top1."""
    cfg = plan.cfg
    s = cfg.search.scheduler
    if s.name == "fifo":
        return FIFOScheduler()
    common = dict(metric=cfg.search.metric, mode=cfg.search.mode, time_attr="epoch", max_t=plan.max_epochs,
                  grace_period=s.grace_period, reduction_factor=s.reduction_factor, recheck=s.recheck,
                  promotion=s.promotion)
    if s.name == "asha":
        return RecordingASHA(log, **common)
    return DensityStratifiedASHA(plan.density_buckets, default=cfg.gating.density, tolerance=s.off_target_tolerance,
                                 log=log, **common)
