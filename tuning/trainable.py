"""The Ray Tune trainable: one trial = the training loop of `tuning/train.py` on one sampled config.

Each epoch reports the metrics of DESIGN.md with a checkpoint (`tune.report(metrics, checkpoint=...)`).
A trial restarted after its node or worker died gets its latest checkpoint from `tune.get_checkpoint()`
and continues after that epoch. Imports come from `ray.tune` only (ray.train's report is Train V2 and
fails inside Tune). A trial granted N >= 2 GPUs (search.resources.gpu: N) trains data-parallel on them,
train.batch_size per GPU (tuning/distributed.py; train.processes overrides N, and on CPU starts gloo
processes).
"""
from __future__ import annotations

__all__ = ["trial", "resume_state"]

import os
import tempfile
import warnings
from pathlib import Path

import torch

from gatetune.tuning import checkpoint as ckpt
from gatetune.tuning import config as C
from gatetune.tuning.errors import ConfigError

def _data(cfg: C.Config, device: torch.device):
    from gatetune.tuning.data import load_cached   # reuse_actors keeps this process alive across trials
    return load_cached(C.data_spec(cfg), device, seed=cfg.seed)


def resume_state(checkpoint_dir: str) -> dict | None:
    """The state in a trial's checkpoint dir; if it is corrupt, the newest readable sibling
    (checkpoint_00000N beside it), else None (the trial starts over rather than failing forever)."""
    here = Path(checkpoint_dir)
    siblings = sorted(here.parent.glob("checkpoint_*"), reverse=True)
    for d in [here, *[s for s in siblings if s.name < here.name]]:
        try:
            return ckpt.read(d / ckpt.CKPT_NAME)
        except ConfigError as e:
            warnings.warn(f"{e}; trying the previous checkpoint")
    return None


def trial(config: dict, base: dict) -> None:
    """config: the sampled dotted keys; base: the resolved search config (a dict)."""
    from ray import tune
    import ray

    from gatetune.tuning.train import fit, pick_device

    cfg = C.with_params(C.load_dict(base), config)
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(cfg.train.threads or max(1, int(cpus)))
    gpus = len(ray.get_gpu_ids())
    device = pick_device(cfg, gpu_granted=gpus > 0)
    resume = None
    if (checkpoint := tune.get_checkpoint()) is not None:
        with checkpoint.as_directory() as d:
            resume = resume_state(d)

    def report(metrics: dict, state: dict | None) -> None:
        if state is None:   # diverged: report without a checkpoint; the trial then ends
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            ckpt.save_atomic(state, os.path.join(d, ckpt.CKPT_NAME))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    from gatetune.tuning.distributed import fit_distributed, plan
    processes, backend = plan(cfg, gpus)
    if processes > 1:   # data-parallel over the granted GPUs (cuda:0..N-1 here), or CPU processes
        fit_distributed(cfg, report, processes, backend, resume=resume,
                        threads=cfg.train.threads or max(1, int(cpus) // processes))
        return
    fit(cfg, report, resume=resume, device=device, data=_data(cfg, device))
