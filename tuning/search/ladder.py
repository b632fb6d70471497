"""The density ladder (search.ladder) as a searcher that wraps the study searcher (as confirm.ConfirmSearch does):
densities visited from high to low, the way the FBS authors and the notebook walked them by hand, each step
from the last good checkpoint.

    step 1: trials_per_step trials at densities[0], from the dense start (search.pretrain's trial, whose
            turn the study searcher keeps first; or model.weights; or scratch)
    step k: trials_per_step trials at densities[k-1], each naming under `started_from` the best completed
            trial (top-1, core.trials.classify) of step k-1, whose newest checkpoint it starts from (a gated
            checkpoint continues gated at the same sites: models.weights.load_gated)

A step's trials are handed out once every trial of the step above has ended (ASHA per density, one ASHA
per step, may stop some of them early; only a completed trial can be a parent). Each step's other keys
(gating.weight, the learning rate, ...) are proposed by the one Optuna study of the search, which learns from
every step; gating.gate and gating.policy decide which layers a checkpoint holds gates for, so from step 2
on they are the parent's, handed to Optuna as fixed values (enqueue_trial with those keys: the study records
what was trained). If a step ends with no completed trial the ladder stops there, with one line.

Its state (the step, the trials handed out and how they ended, the parents) is saved in Ray's experiment
snapshots beside the study's (get_state/set_state), so `gatetune resume` goes on from the same step.
"""
from __future__ import annotations

__all__ = ["LadderSearch", "PINNED"]

import re
import sys

from ray.tune.search import Searcher

from gatetune.core import trials as T
from gatetune.tuning.search import space as S
from gatetune.tuning.search.study import StudySearch

PINNED = re.compile(r"gating\.(gate|policy)|gating\.sites\..+\.gate")   # what a checkpoint's gates depend on


class LadderSearch(Searcher):
    """searcher: the study searcher (its trials: trials_per_step * len(densities)); densities, from high to low."""

    def __init__(self, searcher: StudySearch, *, densities: list[float], trials_per_step: int):
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher, self.densities, self.per_step = searcher, list(densities), trials_per_step
        self.step = 0                              # index into densities of the step being handed out
        self.parents: list[str | None] = []        # per step: the trial its trials start from (None: the dense start)
        self.handed: dict[str, int] = {}           # trial id -> its step
        self.params: dict[str, dict] = {}          # trial id -> its params
        self.ended: dict[str, tuple[str, float | None]] = {}   # trial id -> (status, top1)
        self.stopped: str | None = None            # why the ladder ended early

    @property
    def base(self) -> dict:
        return self.searcher.base

    def ending(self, params: dict, result: dict, error: bool) -> T.Status:
        return self.searcher.ending(params, result, error)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def _of_step(self, step: int) -> list[str]:
        return [t for t, s in self.handed.items() if s == step]

    def _advance(self) -> bool:
        """Move to the next step once this one has handed out and ended all its trials; False to wait."""
        mine = self._of_step(self.step)
        if len(mine) < self.per_step:
            return True
        if any(t not in self.ended for t in mine):
            return False
        done = [(top1, t) for t in mine for status, top1 in [self.ended[t]]
                if status == T.Status.COMPLETED.value and top1 is not None]
        if not done and self.step + 1 < len(self.densities):
            self.stopped = (f"ladder stopped after density {self.densities[self.step]:g}: no trial of that step "
                            "completed, so the next has nothing to start from")
            print(self.stopped, file=sys.stderr, flush=True)
            return True
        self.step += 1
        if self.step < len(self.densities):
            self.parents.append(max(done)[1])
        return True

    def suggest(self, trial_id: str):
        if not self.parents:   # the first step starts from the dense start (or the dense pretraining first)
            self.parents.append(None)
        if self.stopped is not None:
            return Searcher.FINISHED
        if len(self._of_step(self.step)) >= self.per_step:
            if not self._advance():
                return None
            if self.stopped is not None or self.step >= len(self.densities):
                return Searcher.FINISHED
        parent = self.parents[self.step]
        if parent is not None:   # the parent's gating, as fixed values of Optuna's trial
            fixed = {k: v for k, v in self.searcher.params[parent].items() if PINNED.fullmatch(k)}
            if fixed:
                self.searcher.study.enqueue_trial(S.enqueued(fixed, self.searcher.space.params), skip_if_exists=False)
        params = self.searcher.suggest(trial_id)
        if params is None or params is Searcher.FINISHED or T.is_pretrain(params):
            return params
        params = {**params, "gating.density": self.densities[self.step]}
        if parent is not None:
            params[T.STARTED_FROM] = parent
        self.handed[trial_id], self.params[trial_id] = self.step, params
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.searcher.on_trial_complete(trial_id, result=result, error=error)
        if trial_id not in self.handed or trial_id in self.ended:   # the dense pretraining, or told already
            return
        result = result or {}
        self.ended[trial_id] = (self.ending(self.params[trial_id], result, error).value, result.get("top1"))

    # Ray's protocol for a searcher that wraps another (see confirm.py)
    def get_state(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "searcher"}

    def set_state(self, state: dict) -> None:
        self.__dict__.update({k: v for k, v in state.items() if k != "searcher"})
