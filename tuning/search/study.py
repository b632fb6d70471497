"""Optuna behind Ray Tune's Searcher interface: the ask/tell adapter of a search's study.

Optuna proposes each search trial (ask: the space's define-by-run function, start_from points first)
and learns from how it ended (tell; core.trials.classify, the report's rule):
    completed (trained its full budget)          COMPLETE, with its last top1 (or all objectives)
    stopped by the scheduler (ASHA, off_target)  PRUNED, with its per-epoch top1 as intermediate values,
    or diverged                                  as Optuna treats trials its own pruners stop
    errored                                      FAIL
(Ray's OptunaSearch tells a stopped trial COMPLETE with its truncated top1: TPE then learns that
early-stopped configs end at 10%.)

The study lives in memory and is saved with Ray's experiment snapshots (Tune pickles the searcher with
the trial list it matches), so a resumed search goes on from a consistent pair. At each snapshot the
finished trials are copied to <run>/optuna.db for optuna-dashboard (export.StudyExport).

With search.pretrain, the first trial is the dense network (gating.gate none, `pretrain: true` among its
params) and the search trials are handed out once it has completed, each naming it under `started_from`
(the trainable starts from its last checkpoint); if it fails, the search ends. Confirmation over seeds
(search.confirm) is another searcher that wraps this one (confirm.ConfirmSearch).
"""
from __future__ import annotations

__all__ = ["StudySearch", "NSGAIISampler"]

import math
import pickle
import threading

import optuna
from ray.tune.search import Searcher

from gatetune.core import trials as T
from gatetune.core.dotted import trial_config
from gatetune.tuning.search import space as S
from gatetune.tuning.search.export import StudyExport

_STATE = optuna.trial.TrialState


class NSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II, picklable: from Optuna 5.1 the genetic samplers hold a threading.Lock (their
    generation cache), and Ray pickles this searcher, study and sampler included, at every snapshot. The
    lock is left out of the pickle and a new one made when it is read back."""

    def __getstate__(self):
        state = self.__dict__.copy()
        if "_thread_lock" in state:
            state["_thread_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "_thread_lock" in state:
            self._thread_lock = threading.Lock()



class _Pickler(pickle.Pickler):
    """Pickles each finished Optuna trial as the bytes of its first pickling (`cache`: id -> (trial, bytes)).
    A finished trial never changes, and Ray saves the searcher at every experiment snapshot (every 2 s):
    pickling the whole study each time grew with the study, about 10% of the driver's time at 800 trials."""

    def __init__(self, file, cache: dict):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.cache = cache

    def reducer_override(self, obj):
        if type(obj) is not optuna.trial.FrozenTrial or not obj.state.is_finished():
            return NotImplemented
        hit = self.cache.get(id(obj))
        if hit is None or hit[0] is not obj:   # the trial object is kept, so its id is not reused
            hit = self.cache[id(obj)] = (obj, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        return pickle.loads, (hit[1],)


class StudySearch(Searcher):
    """plan: the search's space.SearchPlan; metric/mode: strings, or lists for several objectives;
    export: the StudyExport that gets the finished trials at every snapshot (None: none)."""

    def __init__(self, plan: S.SearchPlan, *, metric, mode, sampler: optuna.samplers.BaseSampler,
                 export: StudyExport | None, study_name: str):
        super().__init__(metric=metric, mode=mode)
        self.multi = isinstance(metric, list)
        directions = [{"max": "maximize", "min": "minimize"}[m] for m in (mode if self.multi else [mode])]
        self.study = optuna.create_study(sampler=sampler, study_name=study_name, directions=directions)
        self.export, self.pickle_cache = export, {}   # this process's: the export's file, the pickled trials
        for point in plan.points:
            self.study.enqueue_trial(point)
        self.space, self.base, self.n_search = S.define_by_run(plan.params, plan.base), plan.base, plan.trials
        self.trials: dict[str, optuna.trial.Trial] = {}   # Ray trial id -> Optuna trial (running)
        self.reported: dict[str, int] = {}                # Ray trial id -> last epoch told to Optuna
        self.params: dict[str, dict] = {}                 # Ray trial id -> its sampled keys
        self.pretrain = plan.pretrain                     # the dense trial's dotted keys (search.pretrain)
        self.pretrain_id: str | None = None
        self.pretrain_status: T.Status | None = None      # how it ended, once it has

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return metric in (None, self.metric) and mode in (None, self.mode)

    def suggest(self, trial_id: str):
        if self.pretrain is not None:
            if self.pretrain_id is None:
                self.pretrain_id = trial_id
                return {**self.pretrain, T.PRETRAIN: True}
            if self.pretrain_status is None:
                return None   # every search trial starts from its weights
            if self.pretrain_status != T.Status.COMPLETED:
                return Searcher.FINISHED   # nothing to start from: the summary says why
        if len(self.params) >= self.n_search:
            return Searcher.FINISHED
        trial = self.study.ask()
        trial.set_user_attr("trial_id", trial_id)
        self.trials[trial_id], self.params[trial_id] = trial, self.space(trial)
        return {**self.params[trial_id], **({T.STARTED_FROM: self.pretrain_id} if self.pretrain_id else {})}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        result = result or {}
        if trial_id == self.pretrain_id:
            self.pretrain_status = self.ending(self.pretrain, result, error)
            return
        trial = self.trials.pop(trial_id, None)
        if trial is None:   # told already
            return
        status = self.ending(self.params[trial_id], result, error)
        if status != T.Status.ERROR:
            self._report(trial_id, result, trial)   # the result that ended it never reached on_trial_result
        if status == T.Status.COMPLETED:
            values = [result.get(m) for m in self.metric] if self.multi else result.get(self.metric)
            if all(isinstance(v, (int, float)) and math.isfinite(v) for v in (values if self.multi else [values])):
                self.study.tell(trial, values)
                return
            status = T.Status.ERROR
        self.study.tell(trial, state=_STATE.FAIL if status == T.Status.ERROR else _STATE.PRUNED)

    def ending(self, params: dict, result: dict, error: bool) -> T.Status:
        """How a trial of these params ended, by the report's rule (core.trials.classify)."""
        budget = T.epochs_of(trial_config(self.base, T.config_params(params)))
        return T.classify("ERROR" if error else "TERMINATED", result, budget)

    def _report(self, trial_id: str, result: dict, trial=None) -> None:
        trial = trial or self.trials.get(trial_id)
        value, epoch = result.get(self.metric) if not self.multi else None, result.get("epoch")
        step = int(math.ceil(epoch)) if epoch is not None else None   # Optuna keeps one value per step
        if (trial is not None and isinstance(value, (int, float)) and math.isfinite(value) and step is not None
                and step > self.reported.get(trial_id, -1)):
            trial.report(float(value), step=step)
            self.reported[trial_id] = step

    def save(self, checkpoint_path: str) -> None:
        """The study and the trials' bookkeeping (not this process's export or pickle cache), then the export."""
        with open(checkpoint_path, "wb") as f:
            _Pickler(f, self.pickle_cache).dump({k: v for k, v in self.__dict__.items()
                                                 if k not in ("export", "pickle_cache")})
        if self.export is not None:
            self.export.update(self.study)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        self.pickle_cache = {}
        if self.export is not None:
            self.export.reset()   # the next export rebuilds the file from the restored study
