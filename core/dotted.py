"""Dotted config keys on plain nested dicts, as the YAML, the overrides, `space:` and the report use them.

    get_dotted(cfg, "train.phases.1.lr");  set_dotted(cfg, "gating.density", 0.5)
    trial_config(base, {"train.phases.0.epochs": 2})   # a search trial's config, train.epochs re-derived
    flatten(cfg) -> {"gating.density": 0.5, ...};  config_diff(a, b) -> keys that differ

A number indexes a list that exists (`train.phases.1.lr`); under `space.` the rest of the key is one
key (space keys are themselves dotted config keys). Pure Python: results/ uses this without torch.
"""
from __future__ import annotations

__all__ = ["get_dotted", "set_dotted", "flatten", "config_diff", "trial_config", "phases_epochs"]

import copy
from typing import Any

from gatetune.core.errors import UserError


def _parts(key: str) -> list[str]:
    parts = key.split(".")
    if parts[0] == "space" and len(parts) > 2:
        return ["space", ".".join(parts[1:])]
    return parts


def get_dotted(d: dict, key: str, default: Any = None) -> Any:
    for p in _parts(key):
        if isinstance(d, list) and p.isdigit() and int(p) < len(d):
            d = d[int(p)]
            continue
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def set_dotted(d: dict, key: str, value: Any) -> None:
    """Set a dotted key, creating the sections on the way; UserError (with the key) for a list index
    that is not a number or does not exist."""
    parts = _parts(key)
    for i, p in enumerate(parts[:-1]):
        if isinstance(d, list):
            d = d[_index(d, p, parts[:i + 1])]
            continue
        if not isinstance(d.get(p), (dict, list)) or (isinstance(d.get(p), list) and not parts[i + 1].isdigit()):
            d[p] = {}
        d = d[p]
    if isinstance(d, list):
        d[_index(d, parts[-1], parts)] = value
    else:
        d[parts[-1]] = value


def _index(items: list, part: str, parts: list[str]) -> int:
    where = ".".join(parts[:-1])
    if not part.isdigit():
        raise UserError(f"{where} is a list: give an item number (0..{len(items) - 1}), not {part!r}", key=where)
    if int(part) >= len(items):
        raise UserError(f"{where} has {len(items)} item(s), so item {part} does not exist; number them "
                        f"from 0", key=".".join(parts))
    return int(part)


def flatten(tree: dict, prefix: str = "", sep: str = ".") -> dict:
    """{"gating": {"density": 0.5}} -> {"gating.density": 0.5}; lists and empty dicts are values. sep="/"
    names them as Ray Tune's results and pandas.json_normalize(sep="/") do (`outer/inner`)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}{sep}", sep))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def phases_epochs(cfg: dict) -> int | None:
    """The sum of train.phases' epochs when every phase gives a whole number >= 1, else None."""
    phases = get_dotted(cfg, "train.phases")
    if isinstance(phases, list) and phases and all(
            isinstance(p, dict) and type(p.get("epochs")) is int and p["epochs"] >= 1 for p in phases):
        return sum(p["epochs"] for p in phases)
    return None


def trial_config(base: dict, params: dict[str, Any]) -> dict:
    """A copy of the nested config `base` with a search trial's dotted parameters set. A searched phase
    length re-derives train.epochs (the phases' sum) unless train.epochs is searched itself."""
    cfg = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(cfg, key, copy.deepcopy(value))
    if "train.epochs" not in params and any(k.startswith("train.phases") for k in params):
        total = phases_epochs(cfg)
        if total is not None:
            cfg["train"]["epochs"] = total
    return cfg
