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

`prepare(cfg)` checks a search config once, before Ray starts: every key names a config key, every
value a trial could take gives a valid config (schema and names only; the machine is checked once by
config.check_environment), and the `search.start_from` files fit the space; it returns the SearchPlan
the search runs (the base config with absolute paths, the params, Optuna's points to evaluate first).
"""
from __future__ import annotations

__all__ = ["Param", "SearchPlan", "prepare", "parse_space", "define_by_run", "enqueued", "grid_size", "grid_points",
           "start_points"]

import copy
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatetune.core.dotted import config_diff, get_dotted, set_dotted
from gatetune.core.errors import UserError, nearest, short_repr
from gatetune.tuning import config as C

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice", "grid")
MAX_VALUES = 1000      # values of one choice or grid
MAX_KEYS = 100         # searched keys of one space
MAX_GRID = 100_000     # grid points (the product of the grid sizes)


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
    """Validate `space:` (distribution names, bounds, keys) into Params; UserError otherwise."""
    key_pattern = C.key_pattern
    params = []
    for key, spec in (space or {}).items():
        where = f"space.{key}"
        if key_pattern(key) not in config_keys and not key.startswith("gating.sites."):
            raise UserError(f"{key!r} is not a config key; {nearest(key, config_keys)}", file=file, key=where)
        if not isinstance(spec, dict):
            raise UserError(f"expected a distribution like {{choice: [a, b]}}, got {short_repr(spec)}", file=file, key=where)
        spec = dict(spec)
        when = spec.pop("when", {}) or {}
        if len(spec) != 1:
            raise UserError(f"give exactly one distribution ({', '.join(DISTRIBUTIONS)}), got {sorted(spec)}",
                              file=file, key=where)
        (kind, args), = spec.items()
        if kind not in DISTRIBUTIONS:
            raise UserError(f"unknown distribution {kind!r}; {nearest(kind, DISTRIBUTIONS)}", file=file, key=where)
        params.append(Param(key, kind, _check_args(kind, args, file, where), _check_when(when, file, where)))
    return params


def _check_args(kind: str, args, file: str, where: str) -> tuple:
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise UserError(f"{kind} needs a non-empty list of values, got {short_repr(args)}", file=file, key=where)
        if len(args) > MAX_VALUES:
            raise UserError(f"{kind} lists {len(args)} values (at most {MAX_VALUES}); use a range (uniform, int)",
                            file=file, key=where)
        if len({json.dumps(_label(v), sort_keys=True) for v in args}) != len(args):
            raise UserError(f"{kind} lists a value twice: {args!r}; remove the duplicate", file=file, key=where)
        return tuple(args)
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) and
                                                            not isinstance(a, bool) for a in args)):
        raise UserError(f"{kind} needs [low, high] numbers, got {short_repr(args)}", file=file, key=where)
    low, high = args
    if not low < high:
        raise UserError(f"`low < high` must hold, but got (low={low}, high={high}); swap or widen them",
                          file=file, key=where)
    if kind == "loguniform" and low <= 0:
        raise UserError(f"loguniform needs low > 0, got low={low}; use uniform or a positive bound",
                          file=file, key=where)
    if kind == "int" and not all(isinstance(a, int) for a in args):
        raise UserError(f"int needs integer bounds, got {short_repr(args)}", file=file, key=where)
    return (low, high)


def _check_when(when, file: str, where: str) -> dict[str, tuple]:
    if not isinstance(when, dict):
        raise UserError(f"`when` must map keys to values, got {short_repr(when)}", file=file, key=f"{where}.when")
    return {k: tuple(v) if isinstance(v, list) else (v,) for k, v in when.items()}


def grid_size(params: list[Param]) -> int:
    return math.prod(len(p.args) for p in params if p.kind == "grid")


def grid_points(params: list[Param]) -> list[dict]:
    """Every combination of the `grid` values, in the order trials take them (trial n: point n mod G)."""
    grids = [p for p in params if p.kind == "grid"]
    return [dict(zip((p.key for p in grids), combo)) for combo in itertools.product(*(p.args for p in grids))]


class define_by_run:
    """The function OptunaSearch calls per trial; returns the non-Optuna values (lists, grid points).

    A class rather than a closure: Ray pickles the searcher (with this) into the run folder."""

    def __init__(self, params: list[Param], base: dict):
        self.params, self.base, self.points = params, base, grid_points(params)

    def __call__(self, trial) -> dict:
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


def enqueued(point: dict, params: list[Param]) -> dict:
    """A known-good starting point (search.start_from) -> Optuna's enqueue format (labels)."""
    by_key = {p.key: p for p in params}
    return {k: _label(v) if by_key[k].kind == "choice" else v for k, v in point.items()
            if k in by_key and by_key[k].kind != "grid"}


# ---------------------------------------------------------------------------------------------
# a search's plan: checked once, before Ray starts

_ENVIRONMENT_KEYS = ("model.weights", "data.", "train.device")   # values that need the machine checked


@dataclass
class SearchPlan:
    """What a search runs: `base`, the resolved config (paths absolute: trials run elsewhere) that every
    trial's config starts from; `params`, the searched keys; `points`, configs Optuna evaluates first."""
    cfg: C.Config
    base: dict
    params: list[Param]
    points: list[dict] = field(default_factory=list)

    @property
    def trials(self) -> int:
        """Search trials: num_samples times the number of grid points (the dense pretraining and the seed
        replicas come on top); a ladder's: trials_per_step per density."""
        ladder = self.cfg.search.ladder
        if ladder is not None:
            return ladder.trials_per_step * len(ladder.densities)
        return self.cfg.search.num_samples * grid_size(self.params)

    @property
    def pretrain(self) -> dict | None:
        """The dotted keys of the dense trial search.pretrain trains first (over `base`), or None."""
        p = self.cfg.search.pretrain
        if p is None:
            return None
        return {"gating.gate": "none", "gating.density": 1.0, "train.phases": None, "train.epochs": p.epochs,
                "train.optimizer.lr": p.lr or self.cfg.train.optimizer.lr, "train.lr_schedule.name": p.lr_schedule}

    @property
    def max_epochs(self) -> int:
        """The most epochs any trial can train (ASHA's max_t): train.epochs, or more when the space
        searches it or a phase's epochs."""
        top = {p.key: int(max(p.args)) for p in self.params if p.key == "train.epochs"
               or re.fullmatch(r"train\.phases\.\d+\.epochs", p.key)}
        if "train.epochs" in top:
            return top["train.epochs"]
        phases = self.cfg.train.phases or []
        return sum(max(ph.epochs, top.get(f"train.phases.{i}.epochs", 0)) for i, ph in enumerate(phases)) \
            or self.cfg.train.epochs

    @property
    def density_buckets(self) -> list[float]:
        """The `choice`/`grid` values of gating.density, or the centres of density_bins equal bins of its
        range; the configured density when it is not searched; a ladder's densities."""
        if self.cfg.search.ladder is not None:
            return list(self.cfg.search.ladder.densities)
        p = next((p for p in self.params if p.key == "gating.density"), None)
        if p is None:
            return [self.cfg.gating.density]
        if p.kind in ("choice", "grid"):
            return [float(v) for v in p.args]
        lo, hi, n = p.args[0], p.args[1], self.cfg.search.scheduler.density_bins
        return [lo + (hi - lo) * (i + 0.5) / n for i in range(n)]


def prepare(cfg: C.Config, file: str | None = None, notices: list[str] | None = None,
            start: bool = True) -> SearchPlan:
    """Check the search/space sections (and, with `start`, the start_from files); the SearchPlan."""
    where = (lambda key: file or cfg.source(key))
    if cfg.search is None:
        raise UserError("no `search:` section; add one (see search_spaces/quickstart.yaml) or use "
                        "`gatetune train` for a fixed config", file=where("search"), key="search")
    if len(cfg.space or {}) > MAX_KEYS:
        raise UserError(f"the space searches {len(cfg.space)} keys (at most {MAX_KEYS}); search fewer",
                        file=where("space"), key="space")
    params = []
    for key, spec in (cfg.space or {}).items():   # one at a time: each key may come from another file
        params += parse_space({key: spec}, C.config_keys(), where(f"space.{key}"))
    if grid_size(params) > MAX_GRID:
        raise UserError(f"the grid has {grid_size(params):,} points (at most {MAX_GRID:,}); search some keys with "
                        "choice or a range instead", file=where("space"), key="space")
    base = C.to_dict(cfg)
    for key in ("data.root", "model.weights"):   # trials chdir away: make paths absolute here
        v = get_dotted(base, key)
        if v and v != "torchvision" and "://" not in v:
            set_dotted(base, key, os.path.abspath(v))
    for p in params:   # every value a trial could take must be a valid config value
        _check_values(base, p, where(f"space.{p.key}"))
    plan = SearchPlan(cfg, base, params)
    if plan.pretrain is not None:
        if cfg.model.weights is not None or any(p.key == "model.weights" for p in params):
            raise UserError("search.pretrain trains the dense weights every trial starts from, but model.weights "
                            "gives them too; drop one of the two", file=where("search.pretrain"), key="search.pretrain")
        try:
            C.with_params(base, plan.pretrain)
        except UserError as e:
            raise UserError(f"the dense pretraining's config is invalid: {e.message}", file=where("search.pretrain"),
                            key="search.pretrain") from None
    if cfg.search.start_from and start:
        src = cfg.source("search.start_from")
        root = Path(src).parent if not src.startswith(("command line", "config")) else Path.cwd()
        base["search"]["start_from"] = [str((root / f).resolve()) for f in cfg.search.start_from]
        plan.points = start_points(base, params, where("search.start_from"), notices)
    return plan


def _check_values(base: dict, p: Param, file: str) -> None:
    values = p.args
    if p.kind in ("uniform", "loguniform"):   # floats anywhere in between: the midpoint stands for them
        values = (*p.args, (p.args[0] + p.args[1]) / 2)
    for v in values:
        try:
            trial = C.with_params(base, {p.key: v})
            if p.key.startswith(_ENVIRONMENT_KEYS):
                C.check_environment(trial, file="search space")
        except UserError as e:
            hint = f"; {p.kind} gives floats: use int: [{p.args[0]}, {p.args[1]}]" \
                if p.kind in ("uniform", "loguniform") and "integer" in e.message else ""
            raise UserError(f"value {v!r} is invalid: {e.message}{hint}", file=file, key=f"space.{p.key}") from None
    for k, vals in p.when.items():
        if k not in C.config_keys() and k not in (base.get("space") or {}):
            raise UserError(f"`when` names {k!r}, not a config key; {nearest(k, C.config_keys())}",
                            file=file, key=f"space.{p.key}.when")
        for v in vals:
            try:
                C.with_params(base, {k: list(v) if isinstance(v, tuple) else v})
            except UserError as e:
                raise UserError(f"`when` value {v!r} for {k} can never occur: {e.message}",
                                file=file, key=f"space.{p.key}.when") from None


def start_points(base: dict, params: list[Param], file: str | None = None,
                 notices: list[str] | None = None) -> list[dict]:
    """search.start_from files -> Optuna points to evaluate first: each file's values of the searched keys
    (the file is read on top of the search config, so it need only set what it changes)."""
    base_cfg = C.load_dict(base)
    searched = {p.key for p in params}
    points = []
    for f in base["search"]["start_from"] or []:
        key = f"search.start_from: {os.path.relpath(f)}"
        start = _start_config(base, base_cfg, f, file)
        values = C.to_dict(start)
        point = {p.key: _fit(p, get_dotted(values, p.key), start.model.name, file, key)
                 for p in params if p.kind != "grid"}
        ignored = [k for k in config_diff(C.to_dict(base_cfg), values)
                   if k not in searched and k != "name" and not k.startswith(("search", "space"))]
        if ignored and notices is not None:
            notices.append(f"notice: start_from {os.path.relpath(f)} also sets {', '.join(ignored[:4])}, which the "
                           "space does not search: the search config's values are used")
        points.append(enqueued(point, params))
    return points


def _start_config(base: dict, base_cfg: C.Config, f: str, file: str | None) -> C.Config:
    """A start_from file read on top of the search config (its search and space sections dropped)."""
    if not Path(f).is_file():
        raise UserError(f"start_from file not found: {f}; check the path (relative to the search file)",
                        file=file, key="search.start_from")
    try:
        raw = copy.deepcopy({k: v for k, v in base.items() if k not in ("search", "space")})
        C.merge(raw, C.read_file(f, []))
        if raw["model"]["name"] != base_cfg.model.name:
            raise UserError(f"is a config of {raw['model']['name']}, but the search trains "
                            f"{base_cfg.model.name}; give a {base_cfg.model.name} config", file=f, key="model.name")
        return C.load_dict({**raw, "search": None, "space": None}, default_file=f)
    except UserError as e:
        raise UserError(f"start_from: {e}", file=file, key="search.start_from") from None


def _fit(p: Param, v, model: str, file: str | None, key: str):
    """The space's own value equal to a start_from file's value `v` of p's key; UserError if none is."""
    if p.kind in ("uniform", "loguniform", "int"):
        if not (isinstance(v, (int, float)) and p.args[0] <= v <= p.args[1]):
            raise UserError(f"{p.key} = {v!r} lies outside the space's range {list(p.args)}; widen the "
                            "range or change the file", file=file, key=key)
        return v
    match = [a for a in p.args if a == v]
    if not match and v is not None and (p.key in ("gating.gate", "gating.trainable")
                                        or re.fullmatch(r"train\.phases\.\d+\.trainable", p.key)):
        from gatetune import models
        sites = set(models.resolve_sites(model, v))
        match = [a for a in p.args if set(models.resolve_sites(model, a)) == sites]
    if not match:
        raise UserError(f"{p.key} = {v!r} is not one of the space's choices {list(p.args)}; add it to "
                        "the choice or change the file", file=file, key=key)
    return match[0]
