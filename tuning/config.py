"""One typed config for a training run or a search, loaded from YAML.

A config file may extend another with `_import: base.yaml` (paths relative to the importing file;
the child's keys override the parent's, dicts merge, lists replace). Command-line overrides are
dotted keys with YAML values, as in the 2018 notebook (`train.epochs=3 gating.gate=[conv1,conv2]`).
The YAML key, the override, the config field and the report column are the same word.

Everything is validated before any work starts: unknown keys (with the nearest valid key), types,
ranges, model and site names, dataset roots, weight files. Each mistake is one `ConfigError` line
naming the file, the key and the fix.

    cfg = load("search_spaces/digits.yaml", ["train.epochs=3"])
"""
from __future__ import annotations

__all__ = ["Config", "ModelCfg", "DataCfg", "GatingCfg", "SiteCfg", "TrainCfg", "OptimizerCfg",
           "LrScheduleCfg", "SearchCfg", "SchedulerCfg", "ResourcesCfg", "load", "load_dict",
           "parse_override", "set_dotted", "get_dotted", "config_keys", "key_pattern", "site_specs", "to_dict",
           "Phase", "phase_plan", "PhaseCfg", "read_file", "merge",
           "with_params"]

import collections.abc
import copy
import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from gatetune.tuning import mayo
from gatetune.tuning.errors import ConfigError, nearest


class _Strict(BaseModel):
    # Unknown keys are errors (the notebook's `trainbale` was silently ignored); no str->number coercion.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class ModelCfg(_Strict):
    name: str = "digitnet"
    """Network: digitnet, resnet20, mcifarnet, squeezenet_v11, mobilenet_v1, resnet18, vgg16_bn."""
    weights: str | None = None
    """Dense starting weights: a checkpoint file (a state dict), or `torchvision` (needs network)."""


class DataCfg(_Strict):
    dataset: Literal["digits", "cifar10", "cifar100", "imagenet", "fake"] = "digits"
    """digits is bundled with scikit-learn (offline); cifar*/imagenet need `root`; fake is for tests."""
    root: str | None = None
    """Dataset folder (cifar: holds cifar-10-batches-py; imagenet: holds train/ and val/)."""
    augment: bool = True
    """Random crops/shifts (and flips on natural images) on the training split."""
    image_size: int | None = Field(None, gt=0)
    """Crop size for imagenet/fake (default 224 / 32)."""
    workers: int = Field(4, ge=0)
    """DataLoader workers for image folders (in-memory datasets need none)."""
    fake_train: int = Field(256, gt=0)
    fake_val: int = Field(64, gt=0)
    fake_classes: int = Field(10, gt=1)


class SiteCfg(_Strict):
    """Per-site override of the gating defaults; unset fields keep the defaults."""
    gate: bool | None = None
    trainable: bool | None = None
    density: float | None = Field(None, gt=0, le=1)
    weight: float | None = Field(None, ge=0)


class GatingCfg(_Strict):
    policy: Literal["fbs", "mse"] = "fbs"
    """fbs: saliency replaces BN's scale, L1 gate loss (the paper). mse: the notebook's `online: true`."""
    density: float = Field(1.0, gt=0, le=1)
    """Fraction of each gated layer's output channels kept per input (k = ceil(density * C_out))."""
    weight: float = Field(1e-8, ge=0)
    """Gate-loss weight (fbs: L1 of winners' saliencies, ~1e-8; mse: MSE weight, ~1e-4)."""
    gate: str | list[str] = "all"
    """Sites that gate: `all`, `none`, names, aliases (`fire6`), globs (`fire[6-9]`), ranges (`conv{9..13}`)."""
    trainable: str | list[str] = "all"
    """Sites whose conv/BN weights train (the predictors always train)."""
    sites: dict[str, SiteCfg] = Field(default_factory=dict)
    """Overrides per site pattern, e.g. {conv1: {density: 0.9}}."""


class OptimizerCfg(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    """Learning rate at batch_size (no automatic scaling)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = True


class LrScheduleCfg(_Strict):
    name: Literal["step", "cosine", "constant"] = "step"
    decay_epochs: int = Field(30, ge=1)
    """step: multiply the rate by gamma every decay_epochs epochs (the notebook's decay_steps)."""
    gamma: float = Field(0.1, gt=0, le=1)


class PhaseCfg(_Strict):
    """One phase of a multi-phase recipe (the notebook's: reach the density with frozen layers and a large
    gate weight, then recover accuracy with every layer trainable and a lower weight)."""
    epochs: int = Field(ge=1)
    """Epochs in this phase (train.epochs is their sum)."""
    trainable: str | list[str] | None = None
    """Sites whose conv/BN weights train in this phase (replaces gating.trainable and gating.sites.*.trainable)."""
    weight: float | None = Field(None, ge=0)
    """Gate-loss weight of every gated site in this phase (or give weight_factor)."""
    weight_factor: float | None = Field(None, ge=0)
    """Multiplies each gated site's configured weight in this phase (or give weight)."""
    lr: float | None = Field(None, gt=0)
    """Learning rate at the start of this phase (default train.optimizer.lr); lr_schedule restarts per phase."""


class TrainCfg(_Strict):
    epochs: int = Field(10, ge=1)
    """Epochs in all (with phases: their sum, set for you)."""
    phases: list[PhaseCfg] | None = None
    """A multi-phase recipe, e.g. [{epochs: 3, trainable: none, weight: 1e-4}, {epochs: 7, trainable: all,
    weight_factor: 0.1, lr: 0.01}]; every phase key can be searched (space: train.phases.0.weight)."""
    batch_size: int = Field(128, ge=1)
    """Images per step (per GPU when a trial has several)."""
    optimizer: OptimizerCfg = Field(default_factory=OptimizerCfg)
    lr_schedule: LrScheduleCfg = Field(default_factory=LrScheduleCfg)
    max_gate_loss: float = Field(1e3, gt=0)
    """A gate loss above this (or NaN/inf) marks the run diverged and stops it."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    """bf16 autocast and channels-last on CUDA (ignored on CPU)."""
    threads: int | None = Field(None, ge=1)
    """CPU threads for torch (default: what Ray grants the trial, else torch's default)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Epoch checkpoints kept per run/trial (the newest ones)."""
    processes: int | None = Field(None, ge=1)
    """Data-parallel processes (DistributedDataParallel): one per GPU on cuda:0..N-1 with NCCL, or CPU
    processes with gloo. batch_size is per process (effective batch = processes x batch_size; lr is not
    scaled). Default: the GPUs a Ray trial was granted (search.resources.gpu), 1 for `gatetune train`."""


class SchedulerCfg(_Strict):
    name: Literal["asha", "asha_by_density", "fifo"] = "asha"
    """asha: one ASHA on top-1; asha_by_density: an ASHA per density bucket; fifo: every trial to the end."""
    grace_period: int = Field(1, ge=1)
    """Epochs every trial gets before ASHA may stop it."""
    reduction_factor: int = Field(2, ge=2)
    """ASHA keeps the top 1/reduction_factor at each rung."""
    density_bins: int = Field(4, ge=1)
    """asha_by_density with a continuous gating.density range: this many equal-width buckets."""
    off_target_tolerance: float | None = Field(0.05, gt=0)
    """asha_by_density: stop a trial whose achieved density is further than this from its target."""


class ResourcesCfg(_Strict):
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)
    """GPUs per trial; fractions share one GPU (no memory isolation)."""


class SearchCfg(_Strict):
    num_samples: int = Field(16, ge=1)
    """Trials to run (grid values multiply this, as in Ray Tune)."""
    metric: Literal["top1"] = "top1"
    mode: Literal["max"] = "max"
    objectives: list[dict[Literal["top1", "top5", "macs_ratio", "macs", "density", "loss"],
                          Literal["max", "min"]]] | None = None
    """Multi-objective search, e.g. [{top1: max}, {macs_ratio: min}]: Optuna's NSGA-II proposes configs
    (unless sampler says otherwise); the scheduler must be asha_by_density or fifo."""
    sampler: Literal["tpe", "random", "nsga2"] | None = None
    """Optuna sampler, seeded with `seed`: tpe (default), random, nsga2 (default with objectives)."""
    scheduler: SchedulerCfg = Field(default_factory=SchedulerCfg)
    resources: ResourcesCfg = Field(default_factory=ResourcesCfg)
    max_concurrent: int | None = Field(None, ge=1)
    """Trials running at once (default: as many as the resources allow)."""
    max_failures: int = Field(3, ge=0)
    """Retries of a trial whose worker or node died; it resumes from its last epoch checkpoint."""
    time_budget_s: float | None = Field(None, gt=0)
    start_from: list[str] | None = None
    """Known-good configs (gatetune or the notebook's Mayo gating files) whose values of the searched keys
    Optuna evaluates first (points to evaluate); paths relative to the file that names them."""


class Config(_Strict):
    name: str = "run"
    """Run folder name: runs/<name>."""
    seed: int = 0
    model: ModelCfg = Field(default_factory=ModelCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    gating: GatingCfg = Field(default_factory=GatingCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    search: SearchCfg | None = None
    """Present in search files (`gatetune search`)."""
    space: dict[str, dict[str, Any]] | None = None
    """Searched keys (dotted, as in overrides) -> a distribution, e.g. {gating.density: {choice: [0.25, 0.5]}}."""
    _sources: dict[str, str] = PrivateAttr(default_factory=dict)
    _notices: list[str] = PrivateAttr(default_factory=list)

    @property
    def notices(self) -> list[str]:
        """Lines to show the user once the config is valid (e.g. a Mayo model import replaced)."""
        return list(self._notices)

    def source(self, key: str, default: str = "config") -> str:
        """The file (or command-line override) that set a dotted key, for error messages."""
        return _source(key, self._sources) or default


# ---------------------------------------------------------------------------------------------
# YAML loading: _import inheritance, dotted overrides, provenance for error messages

class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML keeps the last one silently) and reads 1e-6 as
    a float (YAML 1.1 wants 1.0e-6; everyone writes 1e-6)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue   # `<<: *anchor` (merge keys): the explicit keys beside it override, by design
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, collections.abc.Hashable):
                break   # PyYAML's own check reports "found unhashable key"
            if key in seen and key != "<<":
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (the second would silently replace the first)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def _read_yaml(path: Path, chain: tuple[Path, ...], notices: list[str] | None = None) -> tuple[dict, dict[str, str]]:
    """Returns (merged dict, {dotted key: file that set it}) for `path` and everything it imports.
    Notices (things done on the user's behalf) are appended to `notices`, to print once all is valid."""
    notices = [] if notices is None else notices
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"_import cycle: {cycle}; remove one of these imports", file=str(chain[-1]), key="_import")
    if not path.is_file():
        where = str(chain[-1]) if chain else None
        raise ConfigError(f"file not found: {path}; check the path", file=where, key="_import" if chain else None)
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml_load(text)
    except UnicodeDecodeError:
        raise ConfigError("not a text file (binary?); give a YAML config", file=str(path)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = "; ".join(p for p in (getattr(e, "context", None), getattr(e, "problem", None)) if p) \
            or str(e).splitlines()[0]
        fix = "fix the YAML"
        if text.lstrip().startswith("--") and not text.lstrip().startswith("---"):
            fix = "the first line `--` is not a YAML document marker: write `---` or delete it"
        raise ConfigError(f"YAML syntax error{at}: {problem}; {fix}", file=str(path)) from None
    if data is None:
        raise ConfigError("the file is empty; give at least `model:` or `_import:`", file=str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of keys at the top level, got {type(data).__name__}",
                          file=str(path))
    merged, sources = {}, {}
    imports = data.pop("_import", None)
    mayo_file = mayo.is_mayo(data)
    if imports is not None and not isinstance(imports, (str, list)):
        raise ConfigError(f"_import must be a file name or a list of them, got {imports!r}", file=str(path),
                          key="_import")
    for imp in [imports] if isinstance(imports, str) else (imports or []):
        if not isinstance(imp, str):
            raise ConfigError(f"_import must be a file name or a list of them, got {imp!r}", file=str(path), key="_import")
        target = (path.parent / imp).resolve()
        if mayo_file and not target.exists():
            # The notebook's files import Mayo's model definition; gatetune's model.name replaces it.
            notices.append(f"notice: {_rel(str(path))}: _import {imp} (a Mayo model file) not found; using "
                           f"gatetune's built-in {(data.get('model') or {}).get('name')!r} (model.name)")
            continue
        parent, parent_src = _read_yaml(target, (*chain, path), notices)
        _merge(merged, parent)
        sources.update(parent_src)
    if mayo_file:
        data = mayo.translate(data, str(path))
    _merge(merged, data)
    sources.update({k: str(path) for k in _dotted_keys(data)})
    return merged, sources


def read_file(path: str | os.PathLike, notices: list[str] | None = None) -> dict:
    """One YAML config file with its imports (and a Mayo gating file translated), unvalidated."""
    return _read_yaml(Path(path).resolve(), (), notices)[0]


def _merge(dst: dict, src: dict, whole: bool = False) -> None:
    """Deep merge; under `space:` each key's distribution is replaced whole, not merged."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and not whole:
            _merge(dst[k], v, whole=k == "space")
        else:
            dst[k] = copy.deepcopy(v)


def _dotted_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, dict) and k != "space":
            out += _dotted_keys(v, key + ".")
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`train.epochs=3` -> ("train.epochs", 3); the value is parsed as YAML (lists, numbers, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")) or " " in key:
        raise ConfigError(f"malformed override {text!r}; write dotted.key=value, e.g. train.epochs=3",
                          file="command line")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: the value is not valid YAML; quote it or fix the brackets",
                          file="command line", key=key) from None
    return key, value


def set_dotted(d: dict, key: str, value: Any) -> None:
    """Set a dotted key; under `space.` the rest is one key (space keys are dotted config keys).
    A number indexes a list that exists (`train.phases.1.lr`)."""
    parts = key.split(".")
    if parts[0] == "space" and len(parts) > 2:
        parts = ["space", ".".join(parts[1:])]
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
        raise ConfigError(f"{where} is a list: give an item number (0..{len(items) - 1}), not {part!r}", key=where)
    if int(part) >= len(items):
        raise ConfigError(f"{where} has {len(items)} item(s), so item {part} does not exist; number them "
                          f"from 0", key=".".join(parts))
    return int(part)


def get_dotted(d: dict, key: str, default: Any = None) -> Any:
    for p in key.split("."):
        if isinstance(d, list) and p.isdigit() and int(p) < len(d):
            d = d[int(p)]
            continue
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def config_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key a config accepts (what `space:` keys and overrides may name); list items
    appear as `N` (`train.phases.N.lr`): see `key_pattern`."""
    keys = []
    for name, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        if sub is not None and name not in ("space",):
            keys += config_keys(sub, f"{prefix}{name}.{'N.' if _is_list(field.annotation) else ''}")
        elif name not in ("space", "sites"):
            keys.append(f"{prefix}{name}")
    return keys


def key_pattern(key: str) -> str:
    """`train.phases.1.lr` -> `train.phases.N.lr`, the form config_keys() lists."""
    return re.sub(r"\.\d+(?=\.|$)", ".N", key)


def _is_list(annotation) -> bool:
    if getattr(annotation, "__origin__", None) is list:
        return True
    return any(_is_list(a) for a in getattr(annotation, "__args__", ()) or ())


def _model_of(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------
# Validation: pydantic errors -> one line with file, key and fix

_RANGE = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than": "< {lt}",
          "less_than_equal": "<= {le}"}
_TYPES = {"float_type": "a number", "int_type": "an integer", "bool_type": "true or false",
          "string_type": "a string", "dict_type": "a mapping", "list_type": "a list",
          "model_type": "a mapping", "int_from_float": "an integer", "model_attributes_type": "a mapping"}


def _fields_at(loc: tuple) -> list[str]:
    """The valid keys of the config section that `loc` points into."""
    model: Any = Config
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        field = model.model_fields.get(part) if isinstance(model, type) else None
        if field is None:
            return []
        model = _model_of(field.annotation)
        if part == "sites" and parts:   # dict[str, SiteCfg]: the next part is a site pattern
            parts.pop(0)
        elif parts and parts[0].isdigit():   # list[PhaseCfg]: the next part is an item number
            parts.pop(0)
    return list(model.model_fields) if isinstance(model, type) else []


def _error_line(err: dict) -> tuple[str, str]:
    loc = tuple(str(p) for p in err["loc"] if not str(p).startswith(("function-", "union[", "literal[")))
    loc = tuple(p for p in loc if p not in ("str", "list[str]", "float", "int", "bool", "none"))
    key = ".".join(loc)
    kind, got = err["type"], err.get("input")
    ctx = err.get("ctx") or {}
    if any(str(part) in ("str", "list[str]") for part in err["loc"]):   # str | list[str]: site patterns
        return key, (f"must be a site pattern or a list of them (strings), got {got!r}; "
                     "write e.g. all, none, conv1, \"fire[6-9]\" or [conv1, conv2]")
    if kind == "missing":
        return key, f"{loc[-1]} is required here; add it"
    if kind == "extra_forbidden":
        return key, f"unknown key {loc[-1]!r}; {nearest(loc[-1], _fields_at(loc))}"
    if kind in _RANGE:
        return key, f"must be {_RANGE[kind].format(**ctx)}, got {got!r}; change the value"
    if kind == "literal_error":
        return key, f"{got!r} is not one of {ctx.get('expected')}; {nearest(got, _literal_options(ctx))}"
    if kind in _TYPES:
        return key, f"must be {_TYPES[kind]}, got {got!r} ({type(got).__name__}); change the value"
    return key, f"{err['msg']} (got {got!r}); change the value"


def _literal_options(ctx: dict) -> list[str]:
    return [s.strip().strip("'") for s in str(ctx.get("expected", "")).replace(" or ", ",").split(",") if s.strip()]


def _source(key: str, sources: dict[str, str]) -> str | None:
    parts = key.split(".")
    if parts[0] == "space" and len(parts) > 2:   # space keys are dotted config keys
        parts = ["space", ".".join(parts[1:])]
    for n in range(len(parts), -1, -1):
        if ".".join(parts[:n]) in sources:
            return sources[".".join(parts[:n])]
    return None


def load_dict(raw: dict, sources: dict[str, str] | None = None, default_file: str | None = None) -> Config:
    """Validate a nested dict into a Config (types, ranges, names); raises ConfigError."""
    sources = sources or {}
    raw = _derive_epochs(copy.deepcopy(raw), lambda key: _source(key, sources) or default_file)
    try:
        cfg = Config.model_validate(raw)
    except pydantic.ValidationError as e:
        # Report the first error only: one line, and fixing it usually fixes the rest.
        errs = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")
        key, msg = _error_line(errs[0])
        raise ConfigError(msg, file=_source(key, sources) or default_file, key=key) from None
    cfg._sources = {k: v for k, v in sources.items()}
    if default_file:
        cfg._sources.setdefault("", default_file)
    _check_names(cfg, lambda key: _source(key, sources) or default_file)
    return cfg


def _derive_epochs(raw: dict, file_of) -> dict:
    """With train.phases, train.epochs is the sum of the phases' epochs (set here when absent)."""
    train = raw.get("train") if isinstance(raw, dict) else None
    phases = train.get("phases") if isinstance(train, dict) else None
    if not (isinstance(phases, list) and phases and all(
            isinstance(p, dict) and type(p.get("epochs")) is int and p["epochs"] >= 1 for p in phases)):
        return raw   # missing or malformed: validation reports it
    total = sum(p["epochs"] for p in phases)
    given = train.get("epochs")
    if given is None:
        train["epochs"] = total
    elif given != total and (file_of("train.epochs") == file_of("train.phases")
                             or str(file_of("train.epochs")).startswith("command line")):
        raise ConfigError(f"train.epochs is {given!r} but train.phases add up to {total} epochs; drop "
                          "train.epochs (it is the phases' sum) or make them agree",
                          file=file_of("train.epochs"), key="train.epochs")
    else:   # an imported file's train.epochs gives way to the phases set on top of it
        train["epochs"] = total
    return raw


def load(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (with _import), apply dotted overrides, validate everything."""
    path = Path(path)
    notices: list[str] = []
    raw, sources = _read_yaml(path.resolve(), (), notices)
    sources = {k: str(path) if v == str(path.resolve()) else _rel(v) for k, v in sources.items()}
    for text in overrides:
        key, value = parse_override(text)
        where = f"command line override {text!r}"
        try:
            set_dotted(raw, key, value)
        except ConfigError as e:
            raise ConfigError(e.message, file=where, key=e.key) from None
        sources[key] = where
        if key.startswith("train.phases") and isinstance(get_dotted(raw, "train"), dict):
            raw["train"].pop("epochs", None)   # re-derived from the phases
            sources.pop("train.epochs", None)
    raw.setdefault("name", path.stem)
    cfg = load_dict(raw, sources, default_file=str(path))
    cfg._notices = notices
    return cfg


def _rel(p: str) -> str:
    try:
        return os.path.relpath(p)
    except ValueError:
        return p


def _check_names(cfg: Config, file_of) -> None:
    """Names that only the models/data layers know: model, sites, dataset root, weights."""
    from gatetune import models
    from gatetune.tuning import data as data_mod

    def fail(key: str, msg: str):
        raise ConfigError(msg, file=file_of(key), key=key)

    if cfg.model.name not in models.list_models():
        fail("model.name", f"unknown model {cfg.model.name!r}; {nearest(cfg.model.name, models.list_models())}")
    try:
        site_specs(cfg)
        phase_plan(cfg)
    except models.ModelError as e:
        fail(getattr(e, "_gatetune_key", "gating.gate"), str(e))
    for i, ph in enumerate(cfg.train.phases or []):
        if ph.weight is not None and ph.weight_factor is not None:
            fail(f"train.phases.{i}.weight_factor", "give weight or weight_factor, not both")
    w = cfg.model.weights
    if w == "torchvision":
        from gatetune.models.registry import entry
        if entry(cfg.model.name).torchvision_weights is None:
            have = [m for m in models.list_models() if entry(m).torchvision_weights]
            fail("model.weights", f"{cfg.model.name} has no torchvision weights (only {', '.join(have)}); "
                                  "give a dense checkpoint path or null")
    elif w is not None:
        if not Path(w).is_file():
            fail("model.weights", f"weights file not found: {w}; give a checkpoint path or `torchvision`")
        from gatetune.models.weights import read_state_file
        try:
            read_state_file(w)
        except models.ModelError as e:
            fail("model.weights", str(e))
    if cfg.train.device == "cuda":
        import torch
        if cfg.search is not None and cfg.search.resources.gpu == 0:
            fail("train.device", "trials get no GPU (search.resources.gpu is 0); set search.resources.gpu "
                                 "or train.device=auto")
        if cfg.search is None and not torch.cuda.is_available():
            fail("train.device", "no CUDA GPU on this machine; use train.device=auto (or cpu)")
    try:
        data_mod.check(data_spec(cfg))
    except data_mod.DataError as e:
        fail("data.root" if cfg.data.root is not None or "root" in str(e) else "data.dataset", str(e))
    if cfg.search is not None and cfg.search.objectives is not None:
        objs = cfg.search.objectives
        if len(objs) < 2 or any(len(o) != 1 for o in objs):
            fail("search.objectives", "give two or more objectives, one per item: [{top1: max}, {macs_ratio: min}]")
        if cfg.search.scheduler.name == "asha":
            fail("search.scheduler.name", "plain asha ranks trials on top-1 alone, which a multi-objective "
                                          "search must not; use asha_by_density or fifo")
    if cfg.search is not None and cfg.search.scheduler.grace_period > cfg.train.epochs:
        fail("search.scheduler.grace_period",
             f"grace period {cfg.search.scheduler.grace_period} is above train.epochs={cfg.train.epochs}; "
             "lower it or train longer")


def data_spec(cfg: Config):
    from gatetune.tuning.data import DataSpec
    d = cfg.data
    return DataSpec(dataset=d.dataset, root=d.root, augment=d.augment, image_size=d.image_size,
                    workers=d.workers, fake_train=d.fake_train, fake_val=d.fake_val,
                    fake_classes=d.fake_classes)


def site_specs(cfg: Config) -> dict:
    """{canonical site: SiteSpec} from gating.gate / gating.trainable / gating.sites."""
    from gatetune import models
    g, name = cfg.gating, cfg.model.name

    def resolve(key: str, patterns):
        try:
            return models.resolve_sites(name, patterns)
        except models.ModelError as e:
            e._gatetune_key = key
            raise

    gated = set(resolve("gating.gate", g.gate))
    trainable = set(resolve("gating.trainable", g.trainable))
    specs = {s: models.SiteSpec(gate=s in gated, trainable=s in trainable, density=g.density, weight=g.weight)
             for s in models.site_names(name)}
    for pattern, over in g.sites.items():
        for s in resolve(f"gating.sites.{pattern}", pattern):
            specs[s] = dataclasses.replace(specs[s], **over.model_dump(exclude_none=True))
    return specs


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stretch of epochs [start, end) and what trains in it (see `phase_plan`)."""
    start: int
    end: int
    trainable: frozenset       # canonical sites whose conv/BN weights train
    weights: dict              # gated site -> gate-loss weight
    lr: float                  # learning rate at the phase's first epoch


def phase_plan(cfg: Config) -> list[Phase]:
    """train.phases resolved against the model's sites; one phase spanning train.epochs when none are given."""
    specs = site_specs(cfg)
    trainable = frozenset(s for s, sp in specs.items() if sp.trainable)
    weights = {s: sp.weight for s, sp in specs.items() if sp.gate}
    if not cfg.train.phases:
        return [Phase(0, cfg.train.epochs, trainable, weights, cfg.train.optimizer.lr)]
    from gatetune import models
    plan, start = [], 0
    for i, ph in enumerate(cfg.train.phases):
        t = trainable
        if ph.trainable is not None:
            try:
                t = frozenset(models.resolve_sites(cfg.model.name, ph.trainable))
            except models.ModelError as e:
                e._gatetune_key = f"train.phases.{i}.trainable"
                raise
        w = {s: ph.weight for s in weights} if ph.weight is not None else \
            {s: v * ph.weight_factor for s, v in weights.items()} if ph.weight_factor is not None else weights
        plan.append(Phase(start, start + ph.epochs, t, w, ph.lr or cfg.train.optimizer.lr))
        start += ph.epochs
    return plan


def merge(dst: dict, src: dict) -> None:
    """Deep-merge `src` into `dst` as `_import` does (dicts merge, lists and space entries replace)."""
    _merge(dst, src)


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (YAML/JSON-safe) of a config."""
    return cfg.model_dump(mode="json")


def with_params(cfg: Config, params: dict[str, Any]) -> Config:
    """A copy of `cfg` with dotted keys set (one trial of a search); validated again."""
    raw = to_dict(cfg)
    for k, v in params.items():
        try:
            set_dotted(raw, k, v)
        except ConfigError as e:
            raise ConfigError(e.message, file="search space", key=e.key) from None
    if any(k.startswith("train.phases") for k in params) and "train.epochs" not in params and raw["train"]["phases"]:
        raw["train"].pop("epochs")   # re-derived from the phases
    return load_dict(raw, {k: "search space" for k in params})
