"""The `space:` section of a search file -> an Optuna define-by-run function.

Keys are the config's dotted keys (the same words as overrides and report columns); each value is
one distribution, optionally with a condition:

    space:
      gating.density:     {choice: [0.25, 0.5, 0.75, 1.0]}
      gating.weight:      {loguniform: [1.0e-8, 1.0e-4]}
      gating.gate:        {choice: [all, [conv4, conv5, conv6]]}     # values may be lists
      train.optimizer.lr: {uniform: [0.02, 0.2]}
      train.lr_schedule.decay_epochs: {int: [2, 6]}
      gating.policy:      {grid: [fbs, mse]}                         # every value, num_samples times each
      train.optimizer.momentum: {uniform: [0.8, 0.95], when: {train.optimizer.name: sgd}}

`grid` values are not sampled: trial number n takes grid point n mod G (G = product of the grid
sizes), and the search runs num_samples * G trials, as Ray Tune's grid_search does. A `when:` key is
sampled only when the named keys (sampled earlier, or fixed in the config) take one of the values.
"""
from __future__ import annotations

__all__ = ["Param", "parse_space", "define_by_run", "grid_size", "check_point"]

import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

from gatetune.tuning.errors import ConfigError, nearest

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice", "grid")


@dataclass(frozen=True)
class Param:
    key: str                       # dotted config key
    kind: str                      # one of DISTRIBUTIONS
    args: tuple                    # (low, high) or the values
    when: dict[str, tuple] = field(default_factory=dict)

    def labels(self) -> list:
        """Values as Optuna accepts them: scalars as they are, lists as comma-joined strings."""
        return [_label(v) for v in self.args]


def _label(v: Any):
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    if isinstance(v, (dict, tuple)):
        return json.dumps(v)
    return v


def parse_space(space: dict, config_keys: list[str], file: str) -> list[Param]:
    """Validate `space:` (distribution names, bounds, keys) into Params; ConfigError otherwise."""
    from gatetune.tuning.config import key_pattern
    params = []
    for key, spec in (space or {}).items():
        where = f"space.{key}"
        if key_pattern(key) not in config_keys and not key.startswith("gating.sites."):
            raise ConfigError(f"{key!r} is not a config key; {nearest(key, config_keys)}", file=file, key=where)
        if not isinstance(spec, dict):
            raise ConfigError(f"expected a distribution like {{choice: [a, b]}}, got {spec!r}", file=file, key=where)
        spec = dict(spec)
        when = spec.pop("when", {}) or {}
        if len(spec) != 1:
            raise ConfigError(f"give exactly one distribution ({', '.join(DISTRIBUTIONS)}), got {sorted(spec)}",
                              file=file, key=where)
        (kind, args), = spec.items()
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"unknown distribution {kind!r}; {nearest(kind, DISTRIBUTIONS)}", file=file, key=where)
        params.append(Param(key, kind, _check_args(kind, args, file, where), _check_when(when, file, where)))
    return params


def _check_args(kind: str, args, file: str, where: str) -> tuple:
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{kind} needs a non-empty list of values, got {args!r}", file=file, key=where)
        if len({json.dumps(_label(v), sort_keys=True) for v in args}) != len(args):
            raise ConfigError(f"{kind} lists a value twice: {args!r}; remove the duplicate", file=file, key=where)
        return tuple(args)
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) and
                                                            not isinstance(a, bool) for a in args)):
        raise ConfigError(f"{kind} needs [low, high] numbers, got {args!r}", file=file, key=where)
    low, high = args
    if not low < high:
        raise ConfigError(f"`low < high` must hold, but got (low={low}, high={high}); swap or widen them",
                          file=file, key=where)
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"loguniform needs low > 0, got low={low}; use uniform or a positive bound",
                          file=file, key=where)
    if kind == "int" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"int needs integer bounds, got {args!r}", file=file, key=where)
    return (low, high)


def _check_when(when, file: str, where: str) -> dict[str, tuple]:
    if not isinstance(when, dict):
        raise ConfigError(f"`when` must map keys to values, got {when!r}", file=file, key=f"{where}.when")
    return {k: tuple(v) if isinstance(v, list) else (v,) for k, v in when.items()}


def grid_size(params: list[Param]) -> int:
    return math.prod(len(p.args) for p in params if p.kind == "grid")


def _grid_points(params: list[Param]) -> list[dict]:
    grids = [p for p in params if p.kind == "grid"]
    return [dict(zip((p.key for p in grids), combo)) for combo in itertools.product(*(p.args for p in grids))]


class define_by_run:
    """The function OptunaSearch calls per trial; returns the non-Optuna values (lists, grid points).

    A class rather than a closure: Ray pickles the searcher (with this) into the run folder."""

    def __init__(self, params: list[Param], base: dict):
        self.params, self.base, self.points = params, base, _grid_points(params)

    def __call__(self, trial) -> dict:
        from gatetune.tuning.config import get_dotted
        chosen = dict(self.points[trial.number % len(self.points)]) if self.points else {}
        for p in self.params:
            if p.kind == "grid":
                continue
            if any(_value(k, chosen, self.base, get_dotted) not in vals for k, vals in p.when.items()):
                continue
            chosen[p.key] = _suggest(trial, p)
        return chosen


def _value(key, chosen, base, get_dotted):
    v = chosen.get(key, get_dotted(base, key))
    return tuple(v) if isinstance(v, list) else v


def _suggest(trial, p: Param):
    if p.kind == "uniform":
        return trial.suggest_float(p.key, *p.args)
    if p.kind == "loguniform":
        return trial.suggest_float(p.key, *p.args, log=True)
    if p.kind == "int":
        return trial.suggest_int(p.key, *p.args)
    labels = p.labels()
    return p.args[labels.index(trial.suggest_categorical(p.key, labels))]


def check_point(point: dict, params: list[Param], file: str, where: str) -> dict:
    """A known-good starting point (search.start_from) -> Optuna's enqueue format (labels)."""
    by_key = {p.key: p for p in params}
    out = {}
    for k, v in point.items():
        p = by_key.get(k)
        if p is None or p.kind == "grid":
            continue
        out[k] = _label(v) if p.kind == "choice" else v
    return out
