"""The 2018 notebook's gating files (Mayo's `gated_convolution` layers) -> gatetune config keys.

The notebook configured gating as Mayo layer overrides, e.g.

    _import: ../../squeezenet_v11.yaml
    model:
        name: squeezenet_v11
        layers:
            _gated_conv: &gated_conv
                type: gated_convolution
                density: 0.9
                trainable: false
                online: true
                weight: 0.0001
            _fire: &fire
                kwargs: {should_gate: null, trainable: null}
                layers:
                    expand1: {<<: *gated_conv, should_gate: ^(should_gate), trainable: ^(trainable)}
                    expand3: {<<: *gated_conv, should_gate: ^(should_gate), trainable: ^(trainable)}
            fire9: {<<: *fire, should_gate: true, trainable: true}

Read as follows:
- layers whose name starts with `_` are templates (YAML anchors), not layers;
- a layer with `layers:` is a module (a fire module, a depthwise-separable block); its `kwargs:` declares
  the arguments it takes (with defaults) and `^(name)` in its children is replaced by their values;
- a leaf `type: gated_convolution` names a gate site: `should_gate` -> gated or plain,
  `trainable` -> gating.trainable, `density`/`weight` -> gating.density/weight (per site where they
  differ), `online: true` -> policy `mse` (the notebook's gate). `online: false` ("offline", given up in
  the notebook's 2018-01-17 summary) is an error;
- a leaf without a type (`squeeze: {trainable: ^(trainable)}`) only sets whether that conv trains.

Exactly the sites the file names are gated (those with should_gate true) and trainable (those with
trainable true); every other site is plain and frozen. The fully connected classifier always trains.
"""
from __future__ import annotations

__all__ = ["is_mayo", "translate"]

from typing import Any

from gatetune.core.errors import UserError, nearest

_GATED_KEYS = ("type", "density", "weight", "online", "trainable", "should_gate")
_PLAIN_KEYS = ("type", "trainable")
_MODULE_KEYS = ("kwargs", "layers", "type")
_MAYO_DEFAULTS = {"should_gate": True, "trainable": True}   # Mayo's own defaults for a null argument


def is_mayo(data: dict) -> bool:
    """A Mayo gating file: `model.layers` (gatetune configs have no such key)."""
    return isinstance(data.get("model"), dict) and "layers" in data["model"]


def translate(data: dict, file: str) -> dict:
    """The file's Mayo `model:` section as gatetune keys (model.name, gating.*); other keys pass through."""
    from gatetune import models
    model = dict(data["model"])
    name = model.pop("name", None)
    layers = model.pop("layers")
    if name is None:
        raise UserError("a Mayo gating file needs model.name (the network, e.g. squeezenet_v11)",
                          file=file, key="model.name")
    if name not in models.list_models():
        raise UserError(f"unknown model {name!r}; {nearest(str(name), models.list_models())}",
                          file=file, key="model.name")
    for key in model:
        raise UserError(f"Mayo key model.{key} is not read by gatetune; remove it (gatetune keeps model.name "
                          "and model.layers of a notebook file)", file=file, key=f"model.{key}")
    if not isinstance(layers, dict):
        raise UserError(f"model.layers must be a mapping of layer names, got {layers!r}", file=file,
                          key="model.layers")
    leaves: list[tuple[str, str, dict]] = []   # (mayo key, site pattern, resolved leaf)
    for lname, entry in layers.items():
        if str(lname).startswith("_"):
            continue   # a template (anchor), not a layer
        _walk(str(lname), entry, {}, f"model.layers.{lname}", file, leaves)

    sites = {}
    for key, pattern, leaf in leaves:
        try:
            found = models.resolve_sites(name, pattern)
        except models.ModelError as e:
            raise UserError(f"{e}", file=file, key=key) from None
        for s in found:
            sites[s] = (key, leaf)
    gated = [s for s, (_, leaf) in sites.items() if leaf.get("type") == "gated_convolution"
             and _flag(leaf, "should_gate", file, sites[s][0])]
    trainable = [s for s, (key, leaf) in sites.items() if _flag(leaf, "trainable", file, key)]
    gating: dict[str, Any] = {"gate": gated or "none", "trainable": trainable or "none"}
    policies = set()
    for s in gated:
        key, leaf = sites[s]
        online = leaf.get("online")
        if online is False:
            raise UserError("online: false (the notebook's offline gate, given up in its 2018-01-17 summary) "
                              "is not supported; set online: true (gatetune's policy mse) or remove `online` "
                              "for FBS", file=file, key=f"{key}.online")
        if online is not None and not isinstance(online, bool):
            raise UserError(f"online must be true or false, got {online!r}", file=file, key=f"{key}.online")
        policies.add("mse" if online else None)
    if len(policies) > 1:
        raise UserError("some gated layers set online: true and others leave it out; one policy per network",
                          file=file, key="model.layers")
    if policies == {"mse"}:
        gating["policy"] = "mse"
    per_site: dict[str, dict] = {}
    for field in ("density", "weight"):
        values = {s: sites[s][1][field] for s in gated if sites[s][1].get(field) is not None}
        if not values:
            continue
        common = next(iter(values.values()))
        gating[field] = common
        for s, v in values.items():
            if v != common:
                per_site.setdefault(s, {})[field] = v
    if per_site:
        gating["sites"] = per_site
    out = {k: v for k, v in data.items() if k != "model"}
    out["model"] = {"name": name}
    if isinstance(out.get("gating"), dict):   # keys the file also sets in gatetune form win
        gating.update(out["gating"])
    out["gating"] = gating
    return out


def _walk(path: str, entry, args: dict, key: str, file: str, leaves: list) -> None:
    if not isinstance(entry, dict):
        raise UserError(f"a layer must be a mapping, got {entry!r}", file=file, key=key)
    entry = {k: _substitute(v, args, f"{key}.{k}", file) for k, v in entry.items()}
    if "layers" in entry:
        declared = entry.get("kwargs") or {}
        if not isinstance(declared, dict):
            raise UserError(f"kwargs must map argument names to defaults, got {declared!r}", file=file,
                              key=f"{key}.kwargs")
        given = {k: v for k, v in entry.items() if k not in _MODULE_KEYS}
        for k in given:
            if k not in declared:
                raise UserError(f"unknown key {k!r}; {nearest(str(k), [*declared, *_MODULE_KEYS])}",
                                  file=file, key=f"{key}.{k}")
        sub_args = {**declared, **given}
        children = entry["layers"]
        if not isinstance(children, dict):
            raise UserError(f"layers must be a mapping of layer names, got {children!r}", file=file,
                              key=f"{key}.layers")
        for child, sub in children.items():
            _walk(f"{path}.{child}", sub, sub_args, f"{key}.layers.{child}", file, leaves)
        return
    allowed = _GATED_KEYS if entry.get("type") == "gated_convolution" else _PLAIN_KEYS
    if entry.get("type") not in (None, "gated_convolution", "convolution"):
        raise UserError(f"layer type {entry['type']!r} is not a gate; use gated_convolution (or leave the "
                          "layer out)", file=file, key=f"{key}.type")
    for k in entry:
        if k not in allowed:
            hint = " (only gated_convolution layers gate; add type: gated_convolution)" \
                if k in _GATED_KEYS else ""
            raise UserError(f"unknown key {k!r}; {nearest(str(k), allowed)}{hint}", file=file, key=f"{key}.{k}")
    leaves.append((key, path, entry))


def _substitute(value, args: dict, key: str, file: str):
    """`^(name)` -> the module argument `name`."""
    if isinstance(value, str) and value.startswith("^(") and value.endswith(")"):
        arg = value[2:-1]
        if arg not in args:
            raise UserError(f"{value} names no argument of this module; {nearest(arg, list(args))} "
                              "(declare it under kwargs:)", file=file, key=key)
        return args[arg]
    return value


def _flag(leaf: dict, field: str, file: str, key: str) -> bool:
    v = leaf.get(field)
    if v is None:
        return _MAYO_DEFAULTS[field]
    if not isinstance(v, bool):
        raise UserError(f"{field} must be true or false, got {v!r}", file=file, key=f"{key}.{field}")
    return v
