"""A search's experiment trackers (search.track): Ray Tune's own MLflow and W&B logger callbacks, and the end
fields written after the report.

    RunConfig(callbacks=[..., *track.callbacks(plan, run_dir)])     # one tracker run per trial, while it trains
    df = results.write_report(run_dir); track.finish(plan, run_dir, df)   # status, gate_health, pareto, checkpoint

Each trial is one tracker run: params are its sampled keys (core.trials.config_params: a seed replica's also
`seed`), metrics the numeric ones of each epoch (train.METRICS, density/<site>, latency_ratio; step: the epoch).
MLflow (track_mlflow.py): the search is one parent run named after it, each trial a run nested under it (tag
`mlflow.parentRunId`, run name trial_<id>, tag `trial_id`). W&B (track_wandb.py): run id = the trial id,
group = the search's name. After the report, each trial's run gets the report's `status` (completed, stopped,
diverged, error), `stopped_by`, `gate_health`, `pareto` and `checkpoint` (its newest checkpoint folder): MLflow
as tags (and the parent the report's files), W&B as summary fields (in offline mode a second offline run
folder of the same id, resume=True, that `wandb sync` merges into the first).

A tracker that fails while the search runs is a warning line, and after 3 failures it is left alone: the search
goes on. A failure after the search is one warning line: the report is written first. Tune pickles these
callbacks into tuner.pkl; they pickle as their settings only, so `gatetune resume` logs into the same runs
(found again by their tags / ids).
"""
from __future__ import annotations

__all__ = ["callbacks", "finish", "end_fields", "wandb_dir", "Guard"]

import math
import os
import sys

from gatetune.core.errors import first_line
from gatetune.core.storage import RunStore
from gatetune.tuning.config.track import WandbTrackCfg
from gatetune.tuning.train.track import mlflow_defaults

MAX_FAILURES = 3   # a tracker that fails this often while the search runs is not called again


def callbacks(plan, run_dir: str) -> list:
    """The Ray Tune callbacks of plan.cfg.search.track (none without it)."""
    track = plan.cfg.search.track
    out = []
    if track is None:
        return out
    if track.mlflow is not None:
        mlflow_defaults()
        from gatetune.tuning.search.track_mlflow import MLflowTrials
        out.append(MLflowTrials(track.mlflow.tracking_uri, track.mlflow.experiment or plan.cfg.name,
                                plan.cfg.name, run_dir))
    if track.wandb is not None and track.wandb.mode != "disabled":
        from gatetune.tuning.search.track_wandb import WandbTrials
        w = track.wandb
        out.append(WandbTrials(w.project, w.mode, w.entity, wandb_dir(w, run_dir), plan.cfg.name))
    return out


def wandb_dir(w: WandbTrackCfg, run_dir: str) -> str:
    """The absolute folder W&B writes its wandb/ into: search.track.wandb.dir, else a local run folder, else
    the current folder (W&B's logging actors change into Ray's trial folders, so relative paths would move)."""
    folder = w.dir or (run_dir if not RunStore(run_dir).remote else ".")
    folder = os.path.abspath(os.path.expanduser(folder))
    os.makedirs(folder, exist_ok=True)
    return folder


def end_fields(run_dir: str, df) -> dict[str, dict]:
    """{trial id: {status, stopped_by, gate_health, pareto, checkpoint}} from the report's table (the checkpoint
    as a full path or URI; "" when the trial has none)."""
    store, out = RunStore(run_dir), {}
    for row in df.to_dict("records"):
        ckpt = _text(row.get("checkpoint"))
        out[str(row["trial_id"])] = {
            "status": _text(row.get("status")), "stopped_by": _text(row.get("stopped_by")),
            "gate_health": _text(row.get("gate_health")),
            "pareto": bool(row.get("pareto") == True),   # noqa: E712  (numpy's bools too; NaN: not on it)
            "checkpoint": store.uri(ckpt) if ckpt else ""}
    return out


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def finish(plan, run_dir: str, df) -> None:
    """After the report: each tracker's end fields (end_fields) on each trial's run, and the search's own
    summary; a tracker that fails is one warning line (the report is already written)."""
    track = plan.cfg.search.track
    if track is None or "trial_id" not in df:
        return
    fields = end_fields(run_dir, df)
    if track.mlflow is not None:
        mlflow_defaults()
        from gatetune.tuning.search import track_mlflow
        _quietly("mlflow", lambda: track_mlflow.finish(track.mlflow, plan.cfg.name, run_dir, df, fields))
    if track.wandb is not None and track.wandb.mode != "disabled":
        from gatetune.tuning.search import track_wandb
        _quietly("wandb", lambda: track_wandb.finish(track.wandb, plan.cfg.name, wandb_dir(track.wandb, run_dir),
                                                     fields))


def _quietly(name: str, write) -> None:
    try:
        for line in write():
            print(line)
    except Exception as e:   # noqa: BLE001  (the report is written; a tracker must not lose it)
        print(f"warning: search.track.{name}: the trials' end fields (status, gate_health, pareto, checkpoint) "
              f"were not written ({type(e).__name__}: {first_line(e)}); the report is complete", file=sys.stderr)


class Guard:
    """Mixed into a tracker callback: `self.guarded(what, fn, *args)` calls fn; an exception is a warning line,
    and after MAX_FAILURES of them the tracker is switched off for the rest of this search."""

    tracker = "tracker"
    failures = 0
    off = False

    def guarded(self, what: str, fn, *args, fatal: bool = False, **kwargs):
        """fn(*args, **kwargs), or None when it raised or the tracker is off; `fatal`: a failure switches it off."""
        if self.off:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:   # noqa: BLE001  (a callback that raises would end the search)
            self.failures += 1
            self.off = fatal or self.failures >= MAX_FAILURES
            tail = "; not logging to it for the rest of this search" if self.off else ""
            print(f"warning: search.track.{self.tracker}: {what} failed ({type(e).__name__}: {first_line(e)}){tail}",
                  file=sys.stderr)
            return None
