"""The Ray Tune trainable: one trial = the training loop of `tuning/train.py` on one sampled config.

Each epoch reports the metrics (train.METRICS) with a checkpoint (`tune.report(metrics,
checkpoint=...)`). A trial restarted after its node or worker died gets its latest checkpoint from
`tune.get_checkpoint()` and continues after that epoch. Imports come from `ray.tune` only (ray.train's
report is Train V2 and fails inside Tune). A trial granted N >= 2 GPUs trains data-parallel on them
(distributed.fit_any decides).
"""
from __future__ import annotations

__all__ = ["trial", "resume_state"]

import os
import tempfile
from pathlib import Path

from gatetune.core import layout
from gatetune.tuning import checkpoint as ckpt
from gatetune.tuning import config as C


def resume_state(checkpoint_dir: str) -> dict | None:
    """The state in a trial's checkpoint folder; if it is corrupt, the newest readable older sibling
    (checkpoint_00000N beside it), else None (the trial starts over rather than failing forever)."""
    here = Path(checkpoint_dir)
    older = sorted((s for s in here.parent.glob("checkpoint_*") if s.name < here.name), reverse=True)
    return ckpt.read_newest([here, *older])


def trial(config: dict, base: dict) -> None:
    """config: the sampled dotted keys (a seed replica's also `confirms`); base: the resolved search config."""
    import ray
    from ray import tune

    from gatetune.tuning.distributed import fit_any

    cfg = C.with_params(base, {k: v for k, v in config.items() if k != layout.CONFIRMS})
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    resume = None
    if (checkpoint := tune.get_checkpoint()) is not None:
        with checkpoint.as_directory() as d:
            resume = resume_state(d)

    def report(metrics: dict, state: dict | None) -> None:
        if state is None:   # diverged: report without a checkpoint; the trial then ends
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            ckpt.save_atomic(state, os.path.join(d, layout.CHECKPOINT_STATE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    fit_any(cfg, report, resume=resume, gpus=len(ray.get_gpu_ids()), threads=max(1, int(cpus)), cached=True)
