"""Optuna behind Ray Tune's Searcher interface: the trials of the space, then the seed replicas.

Optuna proposes each search trial (ask: the space's define-by-run function, start_from points first)
and learns from how it ended (tell):
    completed (trained its full budget)          COMPLETE, with its last top1 (or all objectives)
    stopped by the scheduler (ASHA, off_target)  PRUNED, with its per-epoch top1 as intermediate values,
    or diverged                                  as Optuna treats trials its own pruners stop
    errored                                      FAIL
Ray's OptunaSearch tells every stopped trial COMPLETE with its truncated top1, so TPE learned that
early-stopped configs end at 10% and optuna-dashboard could not tell stopped from finished.

The study lives in memory and is saved with Ray's experiment snapshots (Tune pickles this searcher with
the trial list it matches), so a resumed search goes on from a consistent pair. At each snapshot the
finished trials are exported to <run>/optuna.db, a read-only copy for optuna-dashboard (each Optuna
trial carries its Ray trial id as the user attribute `trial_id`); a resumed search rebuilds it from the
restored study. (An SQLite study written live goes ahead of the snapshot it is resumed with: after a
driver crash it would hold trials the restored searcher never heard of.)

With search.pretrain, the first trial is the dense network (gating.gate none, `pretrain: true` among its
params) and the search trials are handed out once it has completed, each naming it under `started_from`
(the trainable starts from its last checkpoint); if it fails, the search ends.

With search.confirm, once every search trial has ended, the finished trials the confirm rule selects
(results.front_trials: pareto, pareto_density or top K, and the best dense trial) train again with seeds + 1, ..., as further
Ray trials whose config names the trial they repeat under `confirms` (schedulers never stop those).
The searcher's state, the study and the replicas it has handed out, is saved with Ray's experiment
snapshots, so a resumed search hands out no seed twice.
"""
from __future__ import annotations

__all__ = ["StudySearch", "NSGAIISampler"]

import math
import os
import pickle
import tempfile
import threading
import warnings

import optuna
from ray.tune.search import Searcher

from gatetune.core import layout
from gatetune.core.dotted import get_dotted, trial_config
from gatetune.core.storage import RunStore
from gatetune.tuning.search import space as S

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

_PROCESS_ONLY = ("exported", "_copy", "_sink", "_pickled")   # this process's export and pickle cache, never pickled


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
    export: the run folder (core.storage.RunStore) whose optuna.db gets the finished trials at every
    snapshot (None: none)."""

    def __init__(self, plan: S.SearchPlan, *, metric, mode, sampler: optuna.samplers.BaseSampler,
                 export: RunStore | None, study_name: str):
        super().__init__(metric=metric, mode=mode)
        self.multi = isinstance(metric, list)
        directions = [{"max": "maximize", "min": "minimize"}[m] for m in (mode if self.multi else [mode])]
        self.study = optuna.create_study(sampler=sampler, study_name=study_name, directions=directions)
        self.export, self.exported, self._copy, self._sink, self._pickled = export, set(), None, None, {}
        for point in plan.points:
            self.study.enqueue_trial(point)
        self.space, self.base, self.n_search = S.define_by_run(plan.params, plan.base), plan.base, plan.trials
        confirm = plan.cfg.search.confirm
        self.confirm = (confirm.seeds, confirm.front) if confirm else None
        self.trials: dict[str, optuna.trial.Trial] = {}   # Ray trial id -> Optuna trial (running)
        self.reported: dict[str, int] = {}                # Ray trial id -> last epoch told to Optuna
        self.params: dict[str, dict] = {}                 # Ray trial id -> its sampled keys
        self.ended: dict[str, dict] = {}                  # Ray trial id -> {status, top1, macs_ratio, density}
        self.replicas: list[dict] | None = None           # the seed replicas' configs, once decided
        self.handed_out = 0
        self.pretrain = plan.pretrain                     # the dense trial's dotted keys (search.pretrain)
        self.pretrain_id: str | None = None
        self.pretrain_status: str | None = None           # how it ended, once it has

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return metric in (None, self.metric) and mode in (None, self.mode)

    def suggest(self, trial_id: str):
        if self.pretrain is not None:
            if self.pretrain_id is None:
                self.pretrain_id = trial_id
                return {**self.pretrain, layout.PRETRAIN: True}
            if self.pretrain_status is None:
                return None   # every search trial starts from its weights
            if self.pretrain_status != "completed":
                return Searcher.FINISHED   # nothing to start from: the summary says why
        start = {layout.STARTED_FROM: self.pretrain_id} if self.pretrain_id else {}
        if len(self.params) < self.n_search:
            trial = self.study.ask()
            trial.set_user_attr("trial_id", trial_id)
            self.trials[trial_id], self.params[trial_id] = trial, self.space(trial)
            return {**self.params[trial_id], **start}
        if len(self.ended) < self.n_search:
            return None   # the front is known once every search trial has ended
        if self.replicas is None:
            self.replicas = self._replicas()
        if self.handed_out < len(self.replicas):
            self.handed_out += 1
            return {**self.replicas[self.handed_out - 1], **start}
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id == self.pretrain_id:
            self.pretrain_status = "error" if error else self._ending((result or {}), self.pretrain)
            return
        trial = self.trials.pop(trial_id, None)
        if trial is None:   # a seed replica (not an Optuna trial), or told already
            return
        result = result or {}
        status = "error" if error else self._ending(result, self.params[trial_id])
        config = trial_config(self.base, self.params[trial_id])
        gate = get_dotted(config, "gating.gate")
        self.ended[trial_id] = {"trial_id": trial_id, "status": status,
                                **{k: result.get(k) for k in ("top1", "macs_ratio", "density")},
                                "target_density": get_dotted(config, "gating.density"),
                                "gated_layers": ",".join(map(str, gate)) if isinstance(gate, list) else str(gate)}
        if status != "error":
            self._report(trial_id, result, trial)   # the result that ended it never reached on_trial_result
        if status == "completed":
            values = [result.get(m) for m in self.metric] if self.multi else result.get(self.metric)
            if all(isinstance(v, (int, float)) and math.isfinite(v) for v in (values if self.multi else [values])):
                self.study.tell(trial, values)
                return
            status = "error"
        self.study.tell(trial, state=_STATE.FAIL if status == "error" else _STATE.PRUNED)

    def _report(self, trial_id: str, result: dict, trial=None) -> None:
        trial = trial or self.trials.get(trial_id)
        value, epoch = result.get(self.metric) if not self.multi else None, result.get("epoch")
        step = int(math.ceil(epoch)) if epoch is not None else None   # Optuna keeps one value per step
        if (trial is not None and isinstance(value, (int, float)) and math.isfinite(value) and step is not None
                and step > self.reported.get(trial_id, -1)):
            trial.report(float(value), step=step)
            self.reported[trial_id] = step

    def _ending(self, result: dict, params: dict) -> str:
        """completed (trained its full budget), diverged or stopped: as the report says (results._collect)."""
        if result.get("diverged"):
            return "diverged"
        epochs = get_dotted(trial_config(self.base, params), "train.epochs")
        return "completed" if (result.get("epoch") or 0) >= epochs else "stopped"

    def _replicas(self) -> list[dict]:
        if self.confirm is None:
            return []
        import pandas as pd

        from gatetune import results
        seeds, rule = self.confirm
        front = results.front_trials(pd.DataFrame(list(self.ended.values())), rule, baseline=self.pretrain is None)
        base_seed = self.base.get("seed", 0)
        out = []
        for origin in front:
            seed = self.params[origin].get("seed", base_seed)
            out += [{**self.params[origin], "seed": seed + i, layout.CONFIRMS: origin} for i in range(1, seeds)]
        return out

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            _Pickler(f, self._pickled).dump({k: v for k, v in self.__dict__.items() if k not in _PROCESS_ONLY})
        self._export()

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        # the next export rebuilds the file from the restored study
        self.exported, self._copy, self._sink, self._pickled = set(), None, None, {}

    def _export(self) -> None:
        """Copy the finished trials not exported yet to the SQLite file (all of them, into a new file, the
        first time in this process). Best effort: a report must not fail for want of the copy."""
        if not self.export:
            return
        done = [t for t in self.study.get_trials(deepcopy=False) if t.state.is_finished()]
        new = [t for t in done if t.number not in self.exported]
        if not new:
            return
        try:
            if self._copy is None:   # this process's SQLite file: in the run folder, or uploaded from /tmp
                self._copy = str(self.export.local_path(f".{layout.STUDY}.new")) if not self.export.remote else \
                    os.path.join(tempfile.mkdtemp(prefix="gatetune-study-"), layout.STUDY)
                if os.path.exists(self._copy):
                    os.remove(self._copy)
            self._copy_study().add_trials(new)
            if self.export.remote:
                self.export.upload(self._copy, layout.STUDY)
            elif not self.exported:   # the first file of this process replaces the folder's (readers see one or the other)
                self._close()
                os.replace(self._copy, self.export.local_path(layout.STUDY))
                self._copy = str(self.export.local_path(layout.STUDY))
            self.exported |= {t.number for t in new}
        except Exception as e:   # noqa: BLE001
            warnings.warn(f"{self.export.uri(layout.STUDY)}: Optuna study not exported ({type(e).__name__}: {e})")

    def _copy_study(self) -> optuna.Study:
        """The study in the SQLite file, opened once per file: opening one loads and checks every Optuna
        migration script (20-70 ms), which at every snapshot was 40% of the driver's time in 100 trials."""
        if self._sink is None:
            storage = optuna.storages.RDBStorage(f"sqlite:///{self._copy}")
            self._sink = optuna.create_study(storage=storage, study_name=self.study.study_name,
                                             directions=self.study.directions, load_if_exists=True), storage
        return self._sink[0]

    def _close(self) -> None:
        """Close the file's connections (before it is renamed: a pooled connection would keep writing the
        renamed file under its old name's journal)."""
        if self._sink is not None:
            self._sink[1].engine.dispose()
            self._sink = None
