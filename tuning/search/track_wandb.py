"""A search in Weights & Biases (search.track.wandb), through Ray Tune's WandbLoggerCallback.

Each trial is one W&B run: id = the trial id, name trial_<id> (Ray's trial name), group = the search's name,
config = the trial's params (its sampled keys; confirms / started_from / pretrain where set), one history row
per epoch with the numeric metrics (step: the epoch). Ray runs each trial's wandb.init in a small logging actor
on the driver's node; the files go to <dir>/wandb/ (search.track.wandb.dir, default the run folder). After the
report, each trial's run is opened again by its id (resume="allow") for the summary fields status, stopped_by,
gate_health, pareto and checkpoint, and a tag with its status (and `pareto`). Online, that updates the same run.
Offline, it is a second offline-run-*-<id> folder marked as a resume; `wandb sync` of the wandb/ folder sends
both, in order, to one run.
"""
from __future__ import annotations

__all__ = ["WandbTrials", "finish"]

from ray.air.integrations.wandb import WandbLoggerCallback

from gatetune.tuning.search.track import Guard
from gatetune.tuning.train.track import WANDB_SETTINGS, numeric_metrics, step_of


class WandbTrials(Guard, WandbLoggerCallback):
    """One W&B run per trial (see the module's docstring)."""

    tracker = "wandb"

    def __init__(self, project: str, mode: str, entity: str | None, dir: str, group: str):
        super().__init__(project=project, group=group, entity=entity, mode=mode, dir=dir, resume="allow",
                         settings=dict(WANDB_SETTINGS))
        self.mode, self.entity, self.dir = mode, entity, dir

    def __reduce__(self):   # tuner.pkl holds the settings only (no actors, queues or futures)
        return type(self), (self.project, self.mode, self.entity, self.dir, self.group)

    def setup(self, *args, **kwargs):
        if self.mode == "online":   # Ray's setup looks for the API key (checked before the search, too)
            self.guarded("setting up", super().setup, *args, fatal=True, **kwargs)

    def log_trial_start(self, trial):
        self.guarded(f"starting the run of trial {trial.trial_id}", super().log_trial_start, trial)

    def log_trial_result(self, iteration: int, trial, result: dict):
        # the numeric gatetune metrics only, at the epoch (Ray's actor logs at step=training_iteration)
        slim = {**numeric_metrics(result), "training_iteration": step_of(result)}
        self.guarded(f"logging a result of trial {trial.trial_id}", super().log_trial_result, iteration, trial, slim)

    def log_trial_end(self, trial, failed: bool = False):
        if trial in self._trial_queues:
            self.guarded(f"ending the run of trial {trial.trial_id}", super().log_trial_end, trial, failed)

    def on_experiment_end(self, trials, **info):
        self.guarded("waiting for the runs to finish", super().on_experiment_end, trials, **info)


def finish(cfg, search: str, folder: str, fields: dict[str, dict]) -> list[str]:
    """The end fields as each trial's run summary (and a status tag); returns the lines to print."""
    import wandb
    started = {tid: values for tid, values in fields.items() if values["status"] != "pending"}   # they have runs
    for tid, values in started.items():
        run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=folder, id=tid, group=search,
                         resume="allow", settings=WANDB_SETTINGS)
        try:
            run.summary.update(values)
            run.tags = tuple(t for t in (values["status"], "pareto" if values["pareto"] else "") if t)
        finally:
            run.finish()
    where = (f"`wandb sync {folder}/wandb/offline-run-*` sends them" if cfg.mode == "offline"
             else f"project {cfg.project!r}, group {search!r}")
    return [f"wandb: {len(started)} trial runs ({cfg.mode}): {where}"]
