"""One trial vocabulary for the searcher, the schedulers, the trainable, the console, the gauges and the report:
how a trial ended (Status, classify) and its role in the search (the TRIAL_KEYS of its params). Plain Python:
no pandas, no Ray, so the driver, a worker and a report on a laptop share it.

A trial's role: a search trial (Optuna proposed it), a seed replica (search.confirm: its params name under
`confirms` the trial whose config it repeats with another seed), or the dense pretraining (search.pretrain:
`pretrain: true`). A trial that starts from another's weights names it under `started_from`.
"""
from __future__ import annotations

__all__ = ["Status", "STATUSES", "classify", "CONFIRMS", "PRETRAIN", "STARTED_FROM", "TRIAL_KEYS",
           "config_params", "origin_of", "is_pretrain", "ranked", "replica", "epochs_of", "last_epoch"]

import enum
import math


class Status(str, enum.Enum):
    """How a trial stands; the values are the report's `status` column, in the order reports list them."""
    COMPLETED = "completed"   # trained its full budget (train.epochs)
    STOPPED = "stopped"       # ended before it: a scheduler (ASHA, off_target) stopped it
    RUNNING = "running"
    PENDING = "pending"       # not started yet
    DIVERGED = "diverged"     # its loss went non-finite: it ended itself
    ERROR = "error"           # failed (after its retries)

    def __str__(self) -> str:
        return self.value

    @property
    def ended(self) -> bool:
        return self not in (Status.RUNNING, Status.PENDING)


STATUSES = tuple(s.value for s in Status)


def classify(ray_status: str | None, last: dict | None, epochs: float | None, *, ended: bool = False) -> Status:
    """The Status of one trial from Ray's status of it (PENDING RUNNING PAUSED TERMINATED ERROR, any case;
    None when Ray's state does not list it), its last result (None before any) and its budget (train.epochs
    of its config; None: any end is completion). `ended`: known to have ended whatever Ray says (a
    scheduler's decision; Ray's saved state lags the result files by up to one snapshot).

    A diverged last result wins over ERROR (the divergence ended it); a last result with `done` has ended;
    an ended trial completed when its last epoch (`epoch`, else `training_iteration`) reached its budget."""
    ray = str(ray_status).upper() if ray_status is not None else None
    if last is not None and _flag(last.get("diverged")):
        return Status.DIVERGED
    if ray == "ERROR":
        return Status.ERROR
    if not (ended or ray == "TERMINATED" or (last is not None and _flag(last.get("done")))):
        if ray in ("RUNNING", "PAUSED") or (ray is None and last is not None):
            return Status.RUNNING
        return Status.PENDING
    epoch = last_epoch(last)
    return Status.COMPLETED if epochs is None or (epoch is not None and epoch >= float(epochs)) else Status.STOPPED


def last_epoch(last: dict | None) -> float | None:
    """The epochs a result says were trained: `epoch`, else `training_iteration`; None when neither is a number."""
    for key in ("epoch", "training_iteration"):
        value = (last or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _flag(value) -> bool:
    """True for a true boolean or number (numpy's too) or the text `true`; missing values (NaN, None) are false."""
    if isinstance(value, str):
        return value.strip().lower() == "true"
    try:
        return bool(value) and value == value   # NaN != NaN
    except (TypeError, ValueError):   # a list or other container
        return False


# --- a trial's role: keys of its params that are not config keys
CONFIRMS = "confirms"           # in a seed replica's params: the trial id whose config it repeats
PRETRAIN = "pretrain"           # true in the dense trial search.pretrain trains before the search
STARTED_FROM = "started_from"   # the trial whose last checkpoint this trial's weights start from
TRIAL_KEYS = (CONFIRMS, PRETRAIN, STARTED_FROM)


def config_params(params: dict) -> dict:
    """A trial's params without the TRIAL_KEYS: the dotted config keys it sets."""
    return {k: v for k, v in params.items() if k not in TRIAL_KEYS}


def origin_of(params: dict) -> str:
    """The trial a seed replica repeats; "" for any other trial."""
    return str(params.get(CONFIRMS) or "")


def is_pretrain(params: dict) -> bool:
    return _flag(params.get(PRETRAIN))


def ranked(params: dict) -> bool:
    """Whether schedulers may rank and stop the trial: not a seed replica, not the dense pretraining."""
    return not (origin_of(params) or is_pretrain(params))


def replica(params: dict, origin: str, seed: int) -> dict:
    """The params of a seed replica of `origin` (whose params are `params`) trained with `seed`."""
    return {**config_params(params), "seed": seed, CONFIRMS: origin}


def epochs_of(config: dict) -> float | None:
    """A trial's budget: train.epochs of its resolved config (nested; core.dotted.trial_config re-derives it
    from train.phases), None when it has none."""
    value = (config.get("train") or {}).get("epochs") if isinstance(config.get("train"), dict) else \
        config.get("train.epochs")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
