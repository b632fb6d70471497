"""Every file gatetune writes or reads in a run folder, named once (tuning writes, results reads).

A search's run folder (`--storage`/`--name`, default runs/<name>) is Ray Tune's experiment folder plus
gatetune's own files:

    <run>/gatetune.yaml            the resolved search config (base of every trial's config)
    <run>/optuna.db                a copy of the Optuna study, renewed at each snapshot (optuna-dashboard)
    <run>/decisions.jsonl          one line per early stop: trial_id, stopped_by, epoch, top1
    <run>/report.csv, report.md, pareto.png          written at the end, and by `gatetune report`
    <run>/tuner.pkl, experiment_state-*.json, searcher-state-*.pkl   Ray Tune's
    <run>/.state/                  a copy of Ray Tune's last complete snapshot, put back by `gatetune resume`
                                      when a full disk cut the newest one short (folders on a filesystem)
    <run>/trial_<id>/              one trial: params.json (its sampled keys; a seed replica's also hold
                                      `seed` and `confirms`: the trial it repeats; the dense pretraining's
                                      `pretrain`; a trial that starts from another's weights, `started_from`),
                                      result.json (one line per epoch),
        checkpoint_NNNNNN/state.pt    its epoch checkpoints (the newest train.keep_checkpoints),
        latency.json                  latency_ratio of one checkpoint (Pareto trials)
    <run>/wandb/offline-run-*      W&B's own run folders (search.track.wandb without a dir; offline: for `wandb sync`)

`gatetune train` writes a smaller folder (default runs/<name>):

    <run>/config.yaml, metrics.csv, checkpoints/epoch_NNN.pt
    <run>/wandb/                   W&B's, with search.track.wandb in the config (as a search's)
"""
from __future__ import annotations

import re

# --- a search's run folder
CONFIG = "gatetune.yaml"
STUDY = "optuna.db"
DECISIONS = "decisions.jsonl"
REPORT_CSV = "report.csv"
REPORT_MD = "report.md"
PARETO_PNG = "pareto.png"
TUNER = "tuner.pkl"
EXPERIMENT_STATE_GLOB = "experiment_state-*.json"
STATE_COPY = ".state"                   # a copy of Ray Tune's last complete snapshot (local folders)
STORAGE_MARKER = ".gatetune_marker"     # written by the driver, looked for by every node

# The keys a trial's params.json holds beside config keys (confirms, pretrain, started_from): core.trials.

# --- one trial's folder inside it
TRIAL_PREFIX = "trial_"
PARAMS = "params.json"
RESULT = "result.json"
LATENCY = "latency.json"
CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)")
CHECKPOINT_STATE = "state.pt"           # the file inside a Ray Tune checkpoint directory

# --- `gatetune train`'s run folder
TRAIN_CONFIG = "config.yaml"
METRICS = "metrics.csv"
CHECKPOINTS = "checkpoints"
EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")


def checkpoint_number(path: str) -> int | None:
    """N of a trial's checkpoint_N folder, from its name or a path or URI ending in it; None for any other."""
    m = CHECKPOINT_DIR.fullmatch(str(path).rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def trial_dirname(trial_id: str) -> str:
    """`trial_<id>`: short, so the report's checkpoint column stays readable."""
    return f"{TRIAL_PREFIX}{trial_id}"


def epoch_file(epoch: int) -> str:
    return f"epoch_{epoch:03d}.pt"
