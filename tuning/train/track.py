"""Experiment trackers for `gatetune train` (the config's search.track), and what a search's trackers share with
it (tuning/search/track.py): which metrics are logged, at which step, and the limits that keep MLflow from hanging.

    tracker = RunTracker(cfg, out)          # nothing happens without search.track
    on_epoch: ... tracker.epoch(metrics)    # the first epoch starts the run (a config that fails first logs nothing)
    last = tracker.run(lambda: fit_any(cfg, on_epoch))

One run per run folder: MLflow's is found again by its tag `gatetune.run` (a hash of the folder), so training
the same command again after a crash continues the same run; W&B's id is that hash (resume="allow"). Params are
the resolved config's dotted keys (search and space left out), metrics the numeric ones of each epoch (step: the
epoch), and at the end the tags `status` (completed or diverged), `gate_health` and `checkpoint` (the newest
epoch file). A tracker that fails is a warning line; it never stops training.
"""
from __future__ import annotations

__all__ = ["RunTracker", "numeric_metrics", "step_of", "mlflow_defaults", "run_key", "param_text", "WANDB_SETTINGS"]

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

from gatetune.core import trials as T
from gatetune.core.dotted import flatten
from gatetune.core.errors import first_line
from gatetune.tuning import config as C

EXTRA_METRICS = ("latency_ratio", "latency_ms", "dense_latency_ms")   # a completed search trial's last epoch
WANDB_SETTINGS = {"silent": True, "console": "off"}   # wandb.init(settings=...): no banner, stdout not captured


def numeric_metrics(result: dict) -> dict[str, float]:
    """The numbers among a result's gatetune metrics (train.METRICS, density/<site>, latency_ratio ...);
    text (node, gate_health), flags (diverged) and Ray's own keys are left out."""
    from gatetune.tuning.train.loop import METRICS   # torch's import: only once something is logged
    out = {}
    for key, value in result.items():
        if key in METRICS or key in EXTRA_METRICS or key.startswith("density/"):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[key] = float(value)
    return out


def step_of(result: dict) -> int:
    """The epoch a result is the end of (a diverged one's, rounded up): the trackers' step."""
    epoch = T.last_epoch(result)
    return int(math.ceil(epoch)) if epoch is not None else 0


def mlflow_defaults() -> None:
    """MLflow retries a failed request 7 times with backoff, each waiting up to 120 s: a tracker must not hold
    up a search or a training run that long; and it prints a "View run" line per ended run (a user's own
    MLFLOW_* settings win)."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def run_key(folder: str) -> str:
    """A short stable name of a run folder (its absolute path or URI): the MLflow tag and the W&B run id."""
    return hashlib.sha1(str(folder).encode()).hexdigest()[:16]


def _params(cfg: C.Config) -> dict:
    """The resolved config's dotted keys and values (search and space left out)."""
    return flatten({k: v for k, v in C.to_dict(cfg).items() if k not in ("search", "space")})


def param_text(value) -> str:
    """An MLflow param's text: strings as they are, anything else as JSON (`["conv5", "conv6"]`, `0.5`)."""
    return value if isinstance(value, str) else json.dumps(value)


class RunTracker:
    """The MLflow and W&B runs of one `gatetune train` run folder (either, both or neither)."""

    def __init__(self, cfg: C.Config, out: str | os.PathLike):
        self.cfg, self.out = cfg, Path(out).resolve()
        self.track = cfg.search.track if cfg.search is not None else None
        self.key = run_key(self.out)
        self.mlflow = self.wandb = None   # (client, run id) / the wandb run, once started
        self.started = False

    def __bool__(self) -> bool:
        return self.track is not None and (self.track.mlflow is not None or self.track.wandb is not None)

    def run(self, fit: Callable[[], dict]) -> dict:
        """fit(), then the runs' end (FINISHED with the end tags; FAILED or KILLED when fit raises)."""
        try:
            last = fit()
        except BaseException as e:
            self._end(None, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        self._end(last, "FINISHED")
        return last

    def epoch(self, metrics: dict) -> None:
        """Log one epoch's numeric metrics (the first call starts the runs)."""
        if not self:
            return
        if not self.started:
            self.started = True
            self._guard("mlflow", self._start_mlflow)
            self._guard("wandb", self._start_wandb)
        numbers, step = numeric_metrics(metrics), step_of(metrics)
        if self.mlflow is not None:
            from mlflow.entities import Metric
            client, run_id = self.mlflow
            now = int(time.time() * 1000)
            self._guard("mlflow", lambda: client.log_batch(run_id, metrics=[
                Metric(k, v, now, step) for k, v in numbers.items()]))
        if self.wandb is not None:
            self._guard("wandb", lambda: self.wandb.log(numbers, step=step))

    # --- MLflow
    def _start_mlflow(self) -> None:
        if self.track.mlflow is None:
            return
        mlflow_defaults()
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=self.track.mlflow.tracking_uri)
        name = self.track.mlflow.experiment or self.cfg.name
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
        found = client.search_runs([exp_id], filter_string=f"tags.`gatetune.run` = '{self.key}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found:   # the same folder trained again (resumed after a crash, or more epochs)
            run_id, logged = found[0].info.run_id, found[0].data.params
            client.update_run(run_id, status="RUNNING")
        else:
            run_id, logged = client.create_run(exp_id, run_name=self.cfg.name, tags={
                "gatetune.run": self.key, "gatetune.role": "train", "run_folder": str(self.out)}).info.run_id, {}
        params = [Param(k, param_text(v)) for k, v in _params(self.cfg).items() if k not in logged]   # immutable
        for i in range(0, len(params), 100):   # MLflow takes at most 100 params per request
            client.log_batch(run_id, params=params[i:i + 100])
        self.mlflow = client, run_id

    # --- W&B
    def _start_wandb(self) -> None:
        w = self.track.wandb
        if w is None or w.mode == "disabled":
            return
        import wandb
        folder = Path(w.dir).expanduser().resolve() if w.dir else self.out
        folder.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb.init(project=w.project, entity=w.entity, mode=w.mode, dir=str(folder), id=self.key,
                                resume="allow", name=self.cfg.name, job_type="train", config=_params(self.cfg),
                                settings=WANDB_SETTINGS)

    def _end(self, last: dict | None, status: str) -> None:
        if not self.started:
            return
        tags = {}
        if last is not None:
            tags = {"status": T.classify("TERMINATED", last, self.cfg.train.epochs).value,
                    "gate_health": str(last.get("gate_health", "")), "checkpoint": self._checkpoint()}
        if self.mlflow is not None:
            client, run_id = self.mlflow
            self._guard("mlflow", lambda: client.log_batch(run_id, tags=_tags(tags)))
            self._guard("mlflow", lambda: client.set_terminated(run_id, status=status))
        if self.wandb is not None:
            run = self.wandb
            self._guard("wandb", lambda: run.summary.update(tags))
            self._guard("wandb", lambda: run.finish(exit_code=0 if status == "FINISHED" else 1))
        self.mlflow = self.wandb = None

    def _checkpoint(self) -> str:
        """The newest epoch checkpoint of the run folder ("" if none)."""
        from gatetune.tuning.train.checkpoint import RunFolder
        files = RunFolder(self.out).checkpoints()   # oldest first
        return str(files[-1]) if files else ""

    def _guard(self, name: str, do: Callable[[], object]) -> None:
        """do(); a tracker that fails is one warning line and is not used again in this run."""
        try:
            do()
        except Exception as e:   # noqa: BLE001  (a tracker must never stop training)
            print(f"warning: search.track.{name}: logging stopped ({type(e).__name__}: {first_line(e)}); "
                  f"training goes on", file=sys.stderr)
            if name == "mlflow":
                self.mlflow = None
            else:
                self.wandb = None


def _tags(values: dict) -> list:
    from mlflow.entities import RunTag
    return [RunTag(k, str(v)) for k, v in values.items()]
