"""What a valid config means for one network: which sites gate and train, and the training phases."""
from __future__ import annotations

__all__ = ["site_specs", "Phase", "phases"]

import dataclasses

from gatetune.core.errors import UserError
from gatetune.tuning.config.schema import Config


def _resolve(model: str, patterns, key: str) -> list[str]:
    from gatetune import models
    try:
        return models.resolve_sites(model, patterns)
    except UserError as e:
        raise e.at(key=key) from None


def site_specs(cfg: Config) -> dict:
    """{canonical site: models.SiteSpec} from gating.gate / gating.trainable / gating.sites."""
    from gatetune import models
    g, name = cfg.gating, cfg.model.name
    gated = set(_resolve(name, g.gate, "gating.gate"))
    trainable = set(_resolve(name, g.trainable, "gating.trainable"))
    specs = {s: models.SiteSpec(gate=s in gated, trainable=s in trainable, density=g.density, weight=g.weight)
             for s in models.site_names(name)}
    for pattern, over in g.sites.items():
        for s in _resolve(name, pattern, f"gating.sites.{pattern}"):
            specs[s] = dataclasses.replace(specs[s], **over.model_dump(exclude_none=True))
    return specs


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stretch of epochs [start, end) and what trains in it (see `phases`)."""
    start: int
    end: int
    trainable: frozenset       # canonical sites whose conv/BN weights train
    weights: dict              # gated site -> gate-loss weight
    lr: float                  # learning rate at the phase's first epoch


def phases(cfg: Config) -> list[Phase]:
    """train.phases resolved against the model's sites; one phase spanning train.epochs when none are given."""
    specs = site_specs(cfg)
    trainable = frozenset(s for s, sp in specs.items() if sp.trainable)
    weights = {s: sp.weight for s, sp in specs.items() if sp.gate}
    if not cfg.train.phases:
        return [Phase(0, cfg.train.epochs, trainable, weights, cfg.train.optimizer.lr)]
    out, start = [], 0
    for i, ph in enumerate(cfg.train.phases):
        t = trainable if ph.trainable is None else \
            frozenset(_resolve(cfg.model.name, ph.trainable, f"train.phases.{i}.trainable"))
        w = {s: ph.weight for s in weights} if ph.weight is not None else \
            {s: v * ph.weight_factor for s, v in weights.items()} if ph.weight_factor is not None else weights
        out.append(Phase(start, start + ph.epochs, t, w, ph.lr or cfg.train.optimizer.lr))
        start += ph.epochs
    return out
