"""Gate sites: what a config says about one conv (SiteSpec), where that conv lives in a network (Site),
and how names, aliases, globs and brace ranges resolve to canonical site names (SiteIndex).

A model's site table lists its convs in forward order. Every site answers to
- its canonical name (`layer1.0.conv1`, `fire6.expand3`, `conv9.pointwise`),
- each dotted prefix of that name as a group alias (`layer1`, `layer1.0`, `fire6`, `conv9`),
- the conv's module path in the plain network when it differs (`features.3.expand1x1`),
- extra group aliases from the table (`features.3` for fire2, `conv1` for VGG's block 1).
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field

from gatetune.models.errors import ModelError, nearest

__all__ = ["SiteSpec", "Site", "SiteIndex"]


@dataclass(frozen=True)
class SiteSpec:
    """How one site is gated. The notebook's keys: `should_gate` -> gate, `trainable`, `density`, `weight`."""

    gate: bool = False      # False: the plain conv runs, no predictor is built
    trainable: bool = True  # False: the conv's (and its BN's) weights are frozen; the predictor always trains
    density: float = 1.0    # fraction of output channels kept per sample, 0 < density <= 1
    weight: float = 0.0     # gate-loss weight of this site (L1 of saliencies for fbs, MSE for mse)

    def __post_init__(self):
        if not (isinstance(self.density, (int, float)) and 0.0 < self.density <= 1.0):
            raise ModelError(f"`0 < density <= 1` must hold, but got density={self.density!r}; "
                             "set a fraction such as 0.5")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight >= 0):
            raise ModelError(f"`weight >= 0` (finite) must hold, but got weight={self.weight!r}; "
                             "use 0 to disable the gate loss")


@dataclass(frozen=True)
class Site:
    """One gateable conv of a plain network: canonical name, module paths of the conv and its BN."""

    name: str
    conv: str               # module path of the nn.Conv2d in the plain network
    bn: str | None = None   # module path of the BatchNorm2d right after it, None when there is none
    groups: tuple[str, ...] = ()  # extra group aliases beyond the automatic ones


_BRACE = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}")


def _prefixes(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@dataclass
class SiteIndex:
    """Canonical names in forward order and alias -> sites, for one model."""

    model: str
    sites: tuple[Site, ...]
    aliases: dict[str, list[str]] = field(init=False)

    def __post_init__(self):
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.model}: duplicate site names in the site table")
        self.aliases = {}
        for s in self.sites:
            extra = _prefixes(s.name) + ([s.conv] if s.conv != s.name else []) + list(s.groups)
            for a in extra:
                if a in names and a != s.name:
                    raise ValueError(f"{self.model}: alias {a!r} of {s.name!r} is also a site name")
                members = self.aliases.setdefault(a, [])
                if s.name not in members:
                    members.append(s.name)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def aliases_of(self, name: str) -> list[str]:
        return [a for a, members in self.aliases.items() if name in members]

    def resolve(self, patterns: str | list[str]) -> list[str]:
        """Canonical names selected by `patterns`, in forward order, without duplicates.

        A pattern is `all`, `none`, a name, an alias, an fnmatch glob (`fire[6-9]`, `layer3.*`) or an
        integer brace range (`conv{9..13}`); a string may hold several separated by commas.
        """
        if isinstance(patterns, str):
            patterns = patterns.split(",")
        chosen: set[str] = set()
        for raw in patterns:
            if not isinstance(raw, str):
                raise ModelError(f"site patterns must be strings, but got {raw!r} for {self.model}; "
                                 "quote the name in the config")
            for p in _expand_braces(raw.strip()) if raw.strip() else []:
                chosen.update(self._match(p))
        return [n for n in self.names if n in chosen]

    def _match(self, p: str) -> list[str]:
        if p == "all":
            return self.names
        if p == "none":
            return []
        if p in self.names:
            return [p]
        if p in self.aliases:
            return self.aliases[p]
        if any(c in p for c in "*?["):
            hits = [n for n in self.names if fnmatch.fnmatchcase(n, p)]
            hits += [m for a, ms in self.aliases.items() if fnmatch.fnmatchcase(a, p) for m in ms]
            if hits:
                return hits
        raise ModelError(f"site pattern {p!r} matches no site of {self.model}; "
                         f"{nearest(p, self.names + list(self.aliases))} "
                         f"(`gatetune layers {self.model}` lists the sites)")


def _expand_braces(p: str) -> list[str]:
    """`conv{9..13}` -> conv9 .. conv13 (inclusive, either direction); several ranges expand as a product."""
    m = _BRACE.search(p)
    if not m:
        return [p]
    a, b = int(m.group(1)), int(m.group(2))
    step = 1 if b >= a else -1
    return [q for i in range(a, b + step, step)
            for q in _expand_braces(p[:m.start()] + str(i) + p[m.end():])]
