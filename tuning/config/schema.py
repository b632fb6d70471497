"""The config schema: one typed, documented field per YAML key (pydantic, strict).

Unknown keys are errors, numbers are not read from strings, every range is checked. The YAML key, the dotted
override, the field and the report column are one word (`gating.density` -> `density`); docstrings document.
"""
from __future__ import annotations

__all__ = ["Config", "ModelCfg", "DataCfg", "SiteCfg", "GatingCfg", "OptimizerCfg", "LrScheduleCfg", "PhaseCfg",
           "TrainCfg", "SchedulerCfg", "ResourcesCfg", "SearchCfg", "ConfirmCfg", "PretrainCfg", "config_keys", "key_pattern", "fields_at",
           "key_of", "source_of"]

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from gatetune.tuning.config.track import TrackCfg


class _Strict(BaseModel):
    # Unknown keys are errors (the notebook's `trainbale` was silently ignored); no str->number coercion;
    # no NaN or infinity where a number goes.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, allow_inf_nan=False)


class ModelCfg(_Strict):
    name: str = "digitnet"
    """Network: digitnet, resnet20, mcifarnet, squeezenet_v11, mobilenet_v1, resnet18, vgg16_bn."""
    weights: str | None = None
    """Dense starting weights: a checkpoint file (a state dict), or `torchvision` (needs network)."""


class DataCfg(_Strict):
    dataset: Literal["digits", "cifar10", "cifar100", "imagenet", "folder", "fake"] = "digits"
    """digits is bundled with scikit-learn (offline); cifar*/imagenet/folder need `root`; fake is for tests."""
    root: str | None = None
    """Dataset folder (cifar: holds cifar-10-batches-py; imagenet and folder: hold train/ and val/, one
    subfolder of images per class in each; folder also takes test/ for val/)."""
    augment: bool = True
    """Random crops/shifts (and flips on natural images) on the training split."""
    image_size: int | None = Field(None, gt=0)
    """Image side in pixels for imagenet/folder/fake (default 224 / the folder's native side up to 64 px,
    else 224 / 32)."""
    in_memory: bool | None = None
    """folder: hold the decoded images in memory (true) or stream them (false); default: in memory when
    their native side is at most 64 px and both splits decoded take at most 2 GiB."""
    mean: list[float] | None = Field(None, min_length=1, max_length=4)
    """imagenet/folder: per-channel mean of the images in [0, 1] (default: ImageNet's for imagenet, measured
    on the train split for folder)."""
    std: list[float] | None = Field(None, min_length=1, max_length=4)
    """Per-channel standard deviation, as `mean`."""
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
    """bf16 autocast and channels-last on CUDA (no effect on CPU; set true for a CPU run, a notice says so)."""
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
    recheck: bool = False
    """Also stop a trial that passed a rung (nearly empty early on) once it falls below that rung's cutoff."""
    promotion: Literal["quantile", "top"] = "quantile"
    """Who passes a rung. quantile (Ray's ASHA): at or above the rung's (1 - 1/rf) quantile before it; top (ASHA's
    paper, Optuna's pruner): among the best max(1, n // rf) of the rung's n values, its own counted."""


class ResourcesCfg(_Strict):
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)
    """GPUs per trial; fractions share one GPU (no memory isolation)."""


class ConfirmCfg(_Strict):
    """Confirmation over seeds: after the search, each front config trains again with more seeds."""
    seeds: int = Field(3, ge=2)
    """Seeds per confirmed config in all: the search's own trial plus seeds - 1 replicas (seed + 1, ...)."""
    front: str = Field("pareto", pattern=r"^(pareto|pareto_density|top [1-9][0-9]*)$")
    """Which finished trials to confirm: pareto (top1 vs macs_ratio), pareto_density (top1 vs density), or
    `top K` (the K best by top1)."""


class PretrainCfg(_Strict):
    """The dense network every search trial starts from, trained first as a trial of the search."""
    epochs: int = Field(ge=1)
    """Epochs of dense training (every site plain: gating.gate none)."""
    lr: float | None = Field(None, gt=0)
    """Its learning rate (default train.optimizer.lr)."""
    lr_schedule: Literal["step", "cosine", "constant"] = "cosine"
    """Its schedule over `epochs` (step uses train.lr_schedule's decay_epochs and gamma)."""
    resources: ResourcesCfg | None = None
    """What the pretraining trial asks of Ray (default search.resources): it runs alone, so it may take a
    whole node, e.g. {cpu: 8, gpu: 2} (two GPUs: data-parallel)."""


class LadderCfg(_Strict):
    """The density curve walked downward: each step's trials start from the best completed trial of the step
    above (the first step from the dense start: search.pretrain, model.weights, or scratch)."""
    densities: list[float] = Field(min_length=1, max_length=100)
    """Target densities, one step each, from high to low, e.g. [0.9, 0.75, 0.5, 0.35, 0.25]."""
    trials_per_step: int = Field(4, ge=1, le=10_000)
    """Trials per step (Optuna proposes the space's keys for each); each trains train.epochs."""


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
    storage_timeout_s: float = Field(600, gt=0)
    """How long an s3:// (gs://) run folder may not answer: trials wait as long to store a checkpoint, then the
    search stops with one line (`gatetune resume` goes on)."""
    confirm: ConfirmCfg | None = None
    """e.g. {seeds: 3, front: pareto}: after the search, the front's configs train again with more seeds, as Ray
    trials of the same run (never stopped early); the report gives their mean and std over seeds."""
    pretrain: PretrainCfg | None = None
    """e.g. {epochs: 30}: train a dense network first (one Ray trial of the search, resumable, its checkpoints
    in the run folder), and start every search trial from its weights (the notebook's dense-then-gated
    workflow). Instead of model.weights; the report names it as the dense baseline."""
    ladder: LadderCfg | None = None
    """e.g. {densities: [0.9, 0.75, 0.5], trials_per_step: 4}: a density ladder instead of independent trials
    (the space must not search gating.density or train.epochs; the ladder's trials replace num_samples)."""
    start_from: list[str] | None = None
    """Known-good configs (gatetune or the notebook's Mayo gating files) whose values of the searched keys
    Optuna evaluates first (points to evaluate); paths relative to the file that names them."""
    track: TrackCfg | None = None
    """Experiment trackers (MLflow, W&B) the search logs to; `gatetune train` of the file logs its run too."""


class Config(_Strict):
    name: str = Field("run", pattern=r"^[A-Za-z0-9_+=@-][A-Za-z0-9._+=@-]{0,127}$")
    """Run folder name: runs/<name> (letters, digits, . _ - + = @, not starting with a dot; no folder separators)."""
    seed: int = Field(0, ge=0, lt=2 ** 32)
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

    def set_origin(self, sources: dict[str, str], notices: list[str] | None = None) -> Config:
        """Remember which file (or command-line override) set each dotted key, and the notices to show."""
        self._sources = dict(sources)
        self._notices = list(notices or [])
        return self

    def add_notices(self, notices: list[str]) -> Config:
        """Append lines to show the user (e.g. files of the dataset left out)."""
        self._notices += [n for n in notices if n not in self._notices]
        return self

    def source(self, key: str, default: str | None = "config", exact: bool = False) -> str | None:
        """The file (or command-line override) that set a dotted key (exact: the key itself, not a section above it)."""
        return (self._sources.get(key) if exact else source_of(key, self._sources)) or default


# ---------------------------------------------------------------------------------------------
# introspection: which dotted keys exist (for `space:`, overrides, "did you mean")

def config_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key a config accepts (what `space:` keys and overrides may name); list items
    appear as `N` (`train.phases.N.lr`): see `key_pattern`."""
    keys = []
    for name, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        if sub is not None and name != "space":
            keys += config_keys(sub, f"{prefix}{name}.{'N.' if _is_list(field.annotation) else ''}")
        elif name not in ("space", "sites"):
            keys.append(f"{prefix}{name}")
    return keys


def key_pattern(key: str) -> str:
    """`train.phases.1.lr` -> `train.phases.N.lr`, the form config_keys() lists."""
    return re.sub(r"\.\d+(?=\.|$)", ".N", key)


def fields_at(loc: tuple) -> list[str]:
    """The valid keys of the config section that the key path `loc` (its last part excluded) points into."""
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


def key_of(loc: tuple) -> str:
    """The dotted config key of a pydantic error location: dict keys and list items kept, the names pydantic
    gives the members of a union (`str`, `list[str]`, ...) dropped."""
    parts = [str(p) for p in loc if not str(p).startswith(("function-", "union[", "literal["))]
    out, node = [], Config   # node: a model, "item" (the next part is a dict key or list index), or a leaf
    for p in parts:
        if node == "item":
            out.append(p)
            node = item
        elif isinstance(node, type) and issubclass(node, BaseModel):
            out.append(p)
            field = node.model_fields.get(p)
            if field is None:
                break   # an unknown key
            sub = _model_of(field.annotation)
            if _container(field.annotation):
                node, item = "item", sub or "leaf"   # dict keys and list items are the user's words
            else:
                node = sub or "leaf"
        # else: a leaf's union member name
    return ".".join(out)


def source_of(key: str, sources: dict[str, str]) -> str | None:
    """The file that set `key` or the nearest section above it, from a {dotted key: file} map."""
    parts = key.split(".")
    if parts[0] == "space" and len(parts) > 2:   # space keys are dotted config keys
        parts = ["space", ".".join(parts[1:])]
    for n in range(len(parts), -1, -1):
        if ".".join(parts[:n]) in sources:
            return sources[".".join(parts[:n])]
    return None


def _is_list(annotation) -> bool:
    if getattr(annotation, "__origin__", None) is list:
        return True
    return any(_is_list(a) for a in getattr(annotation, "__args__", ()) or ())


def _container(annotation) -> bool:
    """A list or dict field (or an optional one); not a union that also takes a scalar (str | list[str])."""
    if getattr(annotation, "__origin__", None) in (list, dict):
        return True
    members = [a for a in getattr(annotation, "__args__", ()) or () if a is not type(None)]
    return bool(members) and all(getattr(a, "__origin__", None) in (list, dict) for a in members)


def _model_of(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None
