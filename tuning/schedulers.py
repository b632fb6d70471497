"""Trial schedulers: ASHA that records why it stopped a trial, and density-stratified ASHA.

Plain ASHA on top-1 compares a density-0.25 trial with a density-1.0 trial. Fewer channels learn
slower, so the low-density trials are cut at the first rung and the left half of the
density/accuracy curve is never trained. `DensityStratifiedASHA` gives every density bucket its own
ASHA bracket (its own rungs and cutoffs): a trial only competes with trials of the same density.
It also stops, as `off_target`, a trial whose achieved density stays further than a tolerance from
its target after the grace period.

Both append each early stop to RUN_DIR/decisions.jsonl (ASHA-stopped trials look TERMINATED in Ray),
which the report reads for its `stopped_by` column.
"""
from __future__ import annotations

__all__ = ["RecordingASHA", "DensityStratifiedASHA", "nearest_bucket"]

import json

from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket


def nearest_bucket(buckets, density: float) -> float:
    """The bucket a trial of this target density joins (ties go to the lower bucket)."""
    return min(buckets, key=lambda b: (abs(b - density), b))


class RecordingASHA(ASHAScheduler):
    """ASHA (`time_attr` = epoch) that logs each early stop to `log` (a JSON-lines file, or None)."""

    def __init__(self, log: str | None = None, **kw):
        super().__init__(**kw)
        self.log = log

    def _record(self, trial, result: dict, why: str) -> None:
        if self.log:
            with open(self.log, "a") as f:
                f.write(json.dumps({"trial_id": trial.trial_id, "stopped_by": why, "epoch": result.get("epoch"),
                                    "top1": result.get("top1")}) + "\n")

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(self._time_attr, 0) < self._max_t:
            self._record(trial, result, "asha")
        return action


class DensityStratifiedASHA(RecordingASHA):
    """ASHA with one bracket per density bucket, plus an `off_target` stop.

    buckets: the density values trials are grouped by (a trial joins the nearest one), e.g. the
    `choice` values of gating.density or the centres of bins over its range.
    density_key: the trial-config key holding the target density; default: trials without it.
    tolerance: stop a trial whose achieved `density` differs from its target by more than this
    after the grace period (None: never).
    """

    def __init__(self, buckets, *, density_key: str = "gating.density", default: float = 1.0,
                 tolerance: float | None = 0.05, log: str | None = None, grace_period: int = 1, **kw):
        super().__init__(log=log, grace_period=grace_period, **kw)
        self._buckets = sorted(float(b) for b in buckets) or [default]
        self._density_key, self._default, self._tolerance = density_key, default, tolerance
        self._grace = grace_period
        self._bracket_of_bucket: dict[float, _Bracket] = {}

    def bucket(self, density: float) -> float:
        return nearest_bucket(self._buckets, density)

    def target(self, trial) -> float:
        return float(trial.config.get(self._density_key, self._default))

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)    # validates metric/mode
        b = self.bucket(self.target(trial))
        if b not in self._bracket_of_bucket:
            self._bracket_of_bucket[b] = _Bracket(self._grace, self._max_t, self._reduction_factor, 0,
                                                  stop_last_trials=self._stop_last_trials)
        self._trial_info[trial.trial_id] = self._bracket_of_bucket[b]

    def on_trial_result(self, tune_controller, trial, result):
        t = result.get(self._time_attr, 0)
        if (self._tolerance is not None and "density" in result and t >= self._grace and t < self._max_t
                and abs(result["density"] - self.target(trial)) > self._tolerance):
            self._num_stopped += 1
            self._record(trial, result, "off_target")
            return TrialScheduler.STOP
        return super().on_trial_result(tune_controller, trial, result)

    def rungs(self) -> dict[float, list[tuple[float, int]]]:
        """{bucket: [(milestone, trials recorded there), ...]} for the console summary."""
        return {b: [(m, len(rec)) for m, rec in reversed(br._rungs)] for b, br in sorted(self._bracket_of_bucket.items())}
