"""The Ray Tune trainable: one trial = the training loop of `tuning/train/loop.py` on one sampled config.

Each epoch reports the metrics (train.METRICS) with a checkpoint (`tune.report(metrics,
checkpoint=...)`). A trial restarted after its node or worker died gets its latest checkpoint from
`tune.get_checkpoint()` and continues after that epoch. Imports come from `ray.tune` only (ray.train's
report is Train V2 and fails inside Tune). A trial granted N >= 2 GPUs trains data-parallel on them
(distributed.fit_any decides).

What a user sees of a trial in the Ray dashboard (docs/design.md, "Watching a search"):
- the Actors page's Repr column: `trial 9aa2fbe5 d=0.50 gate=all` (TrialLabel). Ray reads it once, when the
  worker starts; with reuse_actors a worker that moves on to the next trial says so in its log;
- the worker log (stderr): one line per epoch, `[<trial id>] epoch: 2.00/8 | ...` as the driver prints them,
  and the traceback when the trial fails;
- live gauges through ray.util.metrics, on the node's Prometheus endpoint (tuning/search/live.py).
"""
from __future__ import annotations

__all__ = ["trial", "resume_state", "label", "CheckpointWriteError"]

import os
import sys
import tempfile
import traceback
from pathlib import Path

from gatetune.core import layout
from gatetune.core import trials as T
from gatetune.core.errors import UserError, first_line
from gatetune.tuning.train import checkpoint as ckpt
from gatetune.tuning import config as C
from gatetune.tuning.search import live
from gatetune.tuning.search.console import progress_line

_SHOWN = (("gating.density", "d", "{:.2f}"), ("gating.gate", "gate", "{}"), ("gating.weight", "w", "{:.1e}"),
          ("train.optimizer.lr", "lr", "{:.3g}"), ("seed", "seed", "{}"))


def label(trial_id: str, config: dict) -> str:
    """`trial 9aa2fbe5 d=0.50 gate=all`: the trial id and its key sampled settings."""
    def text(fmt, v):
        v = ",".join(map(str, v)) if isinstance(v, list) else v
        try:
            return fmt.format(v)
        except (ValueError, TypeError):
            return str(v)
    parts = [f"{short}={text(fmt, config[key])}" for key, short, fmt in _SHOWN if key in config]
    return " ".join([f"trial {trial_id}", *parts[:4]])


class TrialLabel:
    """Mixed into Tune's class for the trial function (`trial.__mixins__`): names the worker after its trial
    (Ray shows `_name` as the actor's Repr), and says so in the worker log when reuse_actors hands it the
    next trial."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._name = label(self.trial_id, self.config)

    def reset_config(self, new_config):
        ok = super().reset_config(new_config)
        self._name = label(self.trial_id, new_config)
        for stream in (sys.stdout, sys.stderr):   # Ray's log prefix for the lines that follow
            print(f":actor_name:{self._name}", file=stream, flush=True)
        print(f"[{self.trial_id}] this worker now runs {self._name}", file=sys.stderr, flush=True)
        return ok


def resume_state(checkpoint_dir: str) -> dict | None:
    """The state in a trial's checkpoint folder; if it is corrupt, the newest readable older sibling
    (checkpoint_00000N beside it), else None (the trial starts over rather than failing forever)."""
    here = Path(checkpoint_dir)
    older = sorted((s for s in here.parent.glob("checkpoint_*") if s.name < here.name), reverse=True)
    return ckpt.read_newest([here, *older])


class CheckpointWriteError(RuntimeError):
    """A trial's epoch checkpoint could not be written to the run folder (a full disk, no permission): the
    trial stops; its previous checkpoint is intact and `gatetune resume` continues from it."""


def trial(config: dict, base: dict, run_dir: str = "") -> None:
    """config: the sampled dotted keys (and core.trials.TRIAL_KEYS: a seed replica's `confirms`, the trial whose
    weights it starts from under `started_from`); base: the resolved search config; run_dir: the run folder."""
    import ray
    from ray import tune

    from gatetune.tuning.train.distributed import fit_any

    context = tune.get_context()
    trial_id = context.get_trial_id()
    params = T.config_params(config)
    try:
        if config.get(T.STARTED_FROM):   # the dense pretraining's weights (search.pretrain)
            params["model.weights"] = ckpt.trial_weights(run_dir, config[T.STARTED_FROM])
        cfg = C.with_params(base, params)
    except UserError as e:
        print(f"[{trial_id}] error: {e}", file=sys.stderr, flush=True)
        raise
    cpus = context.get_trial_resources().required_resources.get("CPU", 1)
    print(f"[{trial_id}] start: {label(trial_id, config)} on {os.uname().nodename}", file=sys.stderr, flush=True)
    resume = None
    if (checkpoint := tune.get_checkpoint()) is not None:
        with checkpoint.as_directory() as d:
            resume = resume_state(d)
    gauges = live.TrialGauges(context.get_experiment_name(), trial_id)

    def report(metrics: dict, state: dict | None) -> None:
        print(progress_line(trial_id, metrics, cfg.train.epochs), file=sys.stderr, flush=True)
        gauges.set(metrics)
        if state is None:   # diverged: report without a checkpoint; the trial then ends
            tune.report(metrics)
            return
        try:
            with tempfile.TemporaryDirectory() as d:
                ckpt.save_atomic(state, os.path.join(d, layout.CHECKPOINT_STATE), sync=False)   # Ray copies it
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        except OSError as e:
            line = (f"[{trial_id}] cannot write the epoch-{metrics['epoch']:g} checkpoint into {run_dir or 'the run folder'} "
                    f"({e.strerror or first_line(e)}); the previous checkpoint is intact: free space or fix "
                    "the folder, then `gatetune resume` the search")
            print(line, file=sys.stderr, flush=True)
            raise CheckpointWriteError(line) from None

    try:
        fit_any(cfg, report, resume=resume, gpus=len(ray.get_gpu_ids()), threads=max(1, int(cpus)), cached=True)
    except CheckpointWriteError:
        raise   # its one line is in the worker log already
    except UserError as e:   # e.g. this node lacks the data: one line, as the command line would print it
        print(f"[{trial_id}] error: {e}", file=sys.stderr, flush=True)
        raise
    except Exception:
        traceback.print_exc(file=sys.stderr)   # into the worker log, beside the trial's error.txt
        sys.stderr.flush()
        raise
    finally:
        gauges.stop()


trial.__mixins__ = (TrialLabel,)
