"""Validation: a raw config dict -> a typed Config, or one UserError line naming the file, key and fix.

    cfg = load("search_spaces/digits.yaml", ["train.epochs=3"])      # read, validate, check the machine
    cfg = load_dict(raw)                                              # validate only (no file or data I/O)
    trial = with_params(base, {"gating.density": 0.5})                # one search trial's config

`load_dict` checks types, ranges and names (model, sites, phases, scheduler and objectives) without
touching the disk, so a search validates every value of its space and every trial its config cheaply;
`check_environment` (environment.py) looks at files, data and GPUs, once per command.
"""
from __future__ import annotations

__all__ = ["load", "load_dict", "with_params", "to_dict"]

import copy
import os
import re
from typing import Any

import pydantic

from gatetune.core.dotted import phases_epochs, trial_config
from gatetune.core.errors import UserError, nearest, short_repr
from gatetune.tuning.config.loader import read_config
from gatetune.tuning.config.resolve import phases, site_specs
from gatetune.tuning.config.schema import Config, fields_at, key_of, source_of

_RANGE = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than": "< {lt}",
          "less_than_equal": "<= {le}"}
_TYPES = {"float_type": "a number", "int_type": "an integer", "bool_type": "true or false",
          "string_type": "a string", "dict_type": "a mapping", "list_type": "a list",
          "model_type": "a mapping", "int_from_float": "an integer", "model_attributes_type": "a mapping",
          "finite_number": "a finite number"}


def load(path: str | os.PathLike, overrides=(), *, environment: bool = True) -> Config:
    """Read a YAML config (with _import and the dotted overrides), validate it, and (unless environment
    is False) check the machine it will run on: weights file, data root, GPU."""
    raw, sources, notices = read_config(path, overrides)
    cfg = load_dict(raw, sources, default_file=str(path)).set_origin({**sources, "": str(path)}, notices)
    if environment:
        from gatetune.tuning.config.environment import check_environment
        check_environment(cfg)
    return cfg


def load_dict(raw: dict, sources: dict[str, str] | None = None, default_file: str | None = None) -> Config:
    """Validate a nested dict into a Config (types, ranges, names); raises UserError. No I/O."""
    sources = sources or {}
    file_of = (lambda key: source_of(key, sources) or default_file)
    raw = _derive_epochs(copy.deepcopy(raw), file_of)
    try:
        cfg = Config.model_validate(raw)
    except pydantic.ValidationError as e:
        # Report the first error only: one line, and fixing it usually fixes the rest.
        errs = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")
        key, msg = _error_line(errs[0])
        raise UserError(msg, file=file_of(key), key=key) from None
    cfg.set_origin({**sources, **({"": default_file} if default_file else {})})
    _check_names(cfg, file_of)
    return cfg


def with_params(base: dict, params: dict[str, Any]) -> Config:
    """One search trial's config: the base config dict with the trial's dotted keys set, validated (no I/O)."""
    try:
        raw = trial_config(base, params)
    except UserError as e:
        raise e.at(file="search space") from None
    return load_dict(raw, {k: "search space" for k in params})


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (YAML/JSON-safe) of a config."""
    return cfg.model_dump(mode="json")


def _derive_epochs(raw: dict, file_of) -> dict:
    """With train.phases, train.epochs is the sum of the phases' epochs (set here when absent)."""
    total = phases_epochs(raw) if isinstance(raw, dict) else None
    if total is None:
        return raw   # no phases, or malformed ones: validation reports them
    train = raw["train"]
    given = train.get("epochs")
    if given is not None and given != total and (file_of("train.epochs") == file_of("train.phases")
                                                 or str(file_of("train.epochs")).startswith("command line")):
        raise UserError(f"train.epochs is {given!r} but train.phases add up to {total} epochs; drop "
                        "train.epochs (it is the phases' sum) or make them agree",
                        file=file_of("train.epochs"), key="train.epochs")
    train["epochs"] = total   # an imported file's train.epochs gives way to the phases set on top of it
    return raw


def _error_line(err: dict) -> tuple[str, str]:
    """(dotted key, message) of one pydantic error."""
    kind, got = err["type"], err.get("input")
    key = key_of(err["loc"]) or "config"
    loc = tuple(key.split("."))
    shown = short_repr(got)
    ctx = err.get("ctx") or {}
    if kind != "extra_forbidden" and any(str(part) in ("str", "list[str]") for part in err["loc"][-2:]):
        # str | list[str]: site patterns
        return key, (f"must be a site pattern or a list of them (strings), got {shown}; "
                     "write e.g. all, none, conv1, \"fire[6-9]\" or [conv1, conv2]")
    if kind == "string_pattern_mismatch" and key.endswith("confirm.front"):
        return key, f"must be pareto, pareto_density or `top K` (e.g. top 3), got {shown}; change the value"
    if kind == "string_pattern_mismatch" and key == "name":
        return key, (f"must be a folder name (1-128 letters, digits or . _ - + = @, not starting with a dot), "
                     f"got {shown}; change the name")
    if kind == "missing":
        return key, f"{loc[-1]} is required here; add it"
    if kind == "extra_forbidden":
        return key, f"unknown key {short_repr(loc[-1])}; {nearest(loc[-1], fields_at(loc))}"
    if kind in _RANGE:
        return key, f"must be {_RANGE[kind].format(**ctx)}, got {shown}; change the value"
    if kind == "literal_error":
        return key, f"{shown} is not one of {ctx.get('expected')}; {nearest(got, _literal_options(ctx))}"
    if kind in _TYPES:
        return key, f"must be {_TYPES[kind]}, got {shown} ({type(got).__name__}); change the value"
    return key, f"{err['msg']} (got {shown}); change the value"


def _literal_options(ctx: dict) -> list[str]:
    return [s.strip().strip("'") for s in str(ctx.get("expected", "")).replace(" or ", ",").split(",") if s.strip()]


def _check_names(cfg: Config, file_of) -> None:
    """What only the models layer knows (model, sites, phases) and rules across sections; no I/O."""
    from gatetune import models
    from gatetune.models.registry import entry

    def fail(key: str, msg: str):
        raise UserError(msg, file=file_of(key), key=key)

    if cfg.model.name not in models.list_models():
        fail("model.name", f"unknown model {cfg.model.name!r}; {nearest(cfg.model.name, models.list_models())}")
    try:
        site_specs(cfg)
        phases(cfg)
    except UserError as e:
        raise e.at(file=file_of(e.key or "gating.gate"), key="gating.gate") from None
    for i, ph in enumerate(cfg.train.phases or []):
        if ph.weight is not None and ph.weight_factor is not None:
            fail(f"train.phases.{i}.weight_factor", "give weight or weight_factor, not both")
    if cfg.model.weights == "torchvision" and entry(cfg.model.name).torchvision_weights is None:
        have = [m for m in models.list_models() if entry(m).torchvision_weights]
        fail("model.weights", f"{cfg.model.name} has no torchvision weights (only {', '.join(have)}); "
                              "give a dense checkpoint path or null")
    if cfg.train.device == "cuda" and cfg.search is not None and cfg.search.resources.gpu == 0:
        fail("train.device", "trials get no GPU (search.resources.gpu is 0); set search.resources.gpu "
                             "or train.device=auto")
    if cfg.search is None:
        return
    for key, r in (("search.resources", cfg.search.resources),
                   ("search.pretrain.resources", cfg.search.pretrain and cfg.search.pretrain.resources)):
        if r is not None and r.gpu > 1 and r.gpu != int(r.gpu):   # Ray refuses it only once a trial starts
            fail(f"{key}.gpu", f"must be a fraction of one GPU (below 1) or a whole number of GPUs, got {r.gpu:g}; "
                               f"use e.g. {int(r.gpu)} or {int(r.gpu) + 1}")
    if cfg.search.objectives is not None:
        objs = cfg.search.objectives
        if len(objs) < 2 or any(len(o) != 1 for o in objs):
            fail("search.objectives", "give two or more objectives, one per item: [{top1: max}, {macs_ratio: min}]")
        if cfg.search.scheduler.name == "asha":
            fail("search.scheduler.name", "plain asha ranks trials on top-1 alone, which a multi-objective "
                                          "search must not; use asha_by_density or fifo")
    if cfg.search.ladder is not None:
        ladder = cfg.search.ladder
        d = ladder.densities
        if any(not 0 < x <= 1 for x in d) or any(a <= b for a, b in zip(d, d[1:])):
            fail("search.ladder.densities", f"give densities in (0, 1] from high to low, each below the one "
                                            f"before, e.g. [0.9, 0.75, 0.5]; got {d}")
        if cfg.search.scheduler.name == "asha":
            fail("search.scheduler.name", "plain asha would rank trials of different ladder steps (densities) "
                                          "against each other; use asha_by_density (one ASHA per step) or fifo")
        if cfg.train.phases:
            fail("train.phases", "a ladder step trains train.epochs from the step above; drop train.phases")
        for key, spec in (cfg.space or {}).items():
            if key.startswith(("gating.density", "train.epochs", "train.phases")) or re.fullmatch(r"gating\.sites\..+\.density", key):
                fail(f"space.{key}", "search.ladder sets each step's density and trains train.epochs per step; drop "
                                     "this key from the space (put the densities in search.ladder.densities)")
            if isinstance(spec, dict) and "grid" in spec:
                fail(f"space.{key}", "a ladder step's trials are proposed by Optuna; use choice instead of grid")
    if cfg.search.scheduler.grace_period > cfg.train.epochs:
        fail("search.scheduler.grace_period",
             f"grace period {cfg.search.scheduler.grace_period} is above train.epochs={cfg.train.epochs}; "
             "lower it or train longer")
