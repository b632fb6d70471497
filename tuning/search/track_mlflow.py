"""A search in MLflow (search.track.mlflow), through Ray Tune's MLflowLoggerCallback.

    experiment (search.track.mlflow.experiment, default the search's name)
      <search name>            the parent run: tags gatetune.run (a hash of the run folder), run_folder; at the
                               end metrics trials / completed / stopped / diverged / error / best_top1 and the
                               report's files as artifacts (report.csv, report.md, pareto.png)
        trial_<id>             one nested run per trial (tag mlflow.parentRunId): params = its sampled keys, a
                               metric history per epoch, tags trial_id (confirms, started_from, pretrain where
                               set) and, after the report, status, stopped_by, gate_health, pareto, checkpoint

Ray's callback gives the plumbing (its setup sets the tracking URI and creates the experiment, its hooks are
called per trial start, result and end); the subclass nests the runs, logs one batch per result with the epoch
as step, finds the runs of a resumed search again by their tags, and never raises into Tune (track.Guard).
"""
from __future__ import annotations

__all__ = ["MLflowTrials", "finish", "search_run", "trial_runs"]

import time
import urllib.parse

from ray.air.integrations.mlflow import MLflowLoggerCallback

from gatetune.core import layout
from gatetune.core import trials as T
from gatetune.core.errors import first_line
from gatetune.core.storage import RunStore
from gatetune.tuning.search.track import Guard
from gatetune.tuning.train.track import numeric_metrics, param_text, run_key, step_of

PARENT = "mlflow.parentRunId"   # the tag MLflow's UI nests runs by


def search_run(client, experiment_id: str, run_dir: str) -> str | None:
    """The id of the parent run of the search in `run_dir`, if it has one."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`gatetune.run` = '{run_key(run_dir)}' "
                                                             "AND tags.`gatetune.role` = 'search'", max_results=1)
    return found[0].info.run_id if found else None


def trial_runs(client, experiment_id: str, parent: str) -> dict[str, str]:
    """{trial id: run id} of the runs nested under `parent`."""
    out, token = {}, None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT}` = '{parent}'",
                                  max_results=1000, page_token=token)
        out.update({r.data.tags["trial_id"]: r.info.run_id for r in page if "trial_id" in r.data.tags})
        token = page.token
        if not token:
            return out


def _tag(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


class MLflowTrials(Guard, MLflowLoggerCallback):
    """One MLflow run per trial, nested under one run of the search (see the module's docstring)."""

    tracker = "mlflow"

    def __init__(self, tracking_uri: str, experiment: str, search: str, run_dir: str):
        super().__init__(tracking_uri=tracking_uri, experiment_name=experiment)
        self.search, self.run_dir = search, run_dir
        self.client = self.parent = None
        self.known: dict[str, str] = {}   # trial id -> run id, of a search resumed

    def __reduce__(self):   # tuner.pkl holds the settings only (no client, no module, no run ids)
        return type(self), (self.tracking_uri, self.experiment_name, self.search, self.run_dir)

    def setup(self, *args, **kwargs):
        self.guarded("setting up the experiment", self._setup, *args, fatal=True, **kwargs)

    def _setup(self, *args, **kwargs):
        from mlflow.tracking import MlflowClient
        super().setup(*args, **kwargs)   # Ray's: the tracking URI, the experiment (created when missing)
        client = self.client = MlflowClient(tracking_uri=self.tracking_uri)
        exp = self.mlflow_util.experiment_id
        self.parent = search_run(client, exp, self.run_dir)
        if self.parent is None:
            self.parent = client.create_run(exp, run_name=self.search, tags={
                "gatetune.run": run_key(self.run_dir), "gatetune.role": "search", "run_folder": self.run_dir,
                "mlflow.note.content": f"gatetune search `{self.search}`, run folder {self.run_dir}"}).info.run_id
        else:   # `gatetune resume`: the same runs again
            client.update_run(self.parent, status="RUNNING")
            self.known = trial_runs(client, exp, self.parent)

    def log_trial_start(self, trial):
        self.guarded(f"starting the run of trial {trial.trial_id}", self._start, trial)

    def _start(self, trial) -> str:
        from mlflow.entities import Param
        tid, config = trial.trial_id, trial.config
        run_id = self._trial_runs.get(trial) or self.known.get(tid)
        if run_id is None:
            tags = {PARENT: self.parent, "trial_id": tid, "gatetune.role": "trial",
                    **{k: str(config[k]) for k in T.TRIAL_KEYS if k in config}}
            run_id = self.client.create_run(self.mlflow_util.experiment_id, run_name=layout.trial_dirname(tid),
                                            tags=tags).info.run_id
        else:   # restarted after a failure, or resumed
            self.client.update_run(run_id, status="RUNNING")
        self._trial_runs[trial] = self.known[tid] = run_id
        params = [Param(k, param_text(v)) for k, v in T.config_params(config).items()]
        for i in range(0, len(params), 100):   # MLflow takes at most 100 params per request
            self.client.log_batch(run_id, params=params[i:i + 100])
        return run_id

    def log_trial_result(self, iteration: int, trial, result: dict):
        self.guarded(f"logging a result of trial {trial.trial_id}", self._result, trial, result)

    def _result(self, trial, result: dict):
        from mlflow.entities import Metric
        run_id = self._trial_runs.get(trial) or self._start(trial)
        now, step = int(time.time() * 1000), step_of(result)
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in numeric_metrics(result).items()])

    def log_trial_end(self, trial, failed: bool = False):
        run_id = None if self.off else self._trial_runs.get(trial)
        if run_id is not None:
            self.guarded(f"ending the run of trial {trial.trial_id}", self.client.set_terminated, run_id,
                         "FAILED" if failed else "FINISHED")


def finish(cfg, search: str, run_dir: str, df, fields: dict[str, dict]) -> list[str]:
    """The end fields on each trial's run, the search's counts and report files on its parent run (then
    FINISHED); returns the lines to print (where to look)."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    name = cfg.experiment or search
    exp = client.get_experiment_by_name(name)
    parent = search_run(client, exp.experiment_id, run_dir) if exp is not None else None
    if parent is None:
        raise LookupError(f"experiment {name!r} at {cfg.tracking_uri} has no run of this search")
    runs = trial_runs(client, exp.experiment_id, parent)
    for tid, values in fields.items():
        if tid in runs:
            client.log_batch(runs[tid], tags=[RunTag(k, _tag(v)) for k, v in values.items()])
    statuses = [v["status"] for v in fields.values()]
    counts = {"trials": len(fields), **{s: statuses.count(s) for s in ("completed", "stopped", "diverged", "error")}}
    done = df[df["status"] == "completed"]["top1"] if {"status", "top1"} <= set(df.columns) else []
    if len(done) and done.notna().any():
        counts["best_top1"] = float(done.max())
    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in counts.items()])
    lines = []
    store = RunStore(run_dir)
    try:
        for rel in (layout.REPORT_CSV, layout.REPORT_MD, layout.PARETO_PNG):
            if not store.remote and store.exists(rel):
                client.log_artifact(parent, str(store.local_path(rel)))
    except Exception as e:   # noqa: BLE001  (an artifact store this machine cannot write: the tags are in)
        lines.append(f"warning: search.track.mlflow: the report's files were not attached to the search's run "
                     f"({type(e).__name__}: {first_line(e)})")
    client.set_terminated(parent, "FINISHED" if counts["error"] < counts["trials"] else "FAILED")
    missing = len([t for t in fields if t not in runs])
    where = (f"{cfg.tracking_uri.rstrip('/')}/#/experiments/{exp.experiment_id}/runs/{parent}"
             if urllib.parse.urlsplit(cfg.tracking_uri).scheme in ("http", "https")
             else f"`mlflow ui --backend-store-uri {cfg.tracking_uri}`")
    lines.append(f"mlflow: experiment {name!r}, run {search!r} with {len(fields) - missing} trial runs: {where}"
                 + (f" ({missing} trials never started: no run)" if missing else ""))
    return lines
