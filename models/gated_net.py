"""GatedNet: a plain network after gating surgery, and `build`, the one entry point that makes one.

Surgery: for each site with gate=True, the conv module is replaced by GatedConv2d(conv, bn) and the BN
module by nn.Identity; activations, pooling and residual adds stay where the plain network has them.
Sites with gate=False keep the plain conv and BN (trainable=False still freezes them).
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch
from torch import nn

from gatetune.models.errors import ModelError, nearest
from gatetune.models.gate import POLICIES, GatedConv2d
from gatetune.models.macs import MacCounter
from gatetune.models.registry import ModelEntry, entry
from gatetune.models.sites import SiteSpec
from gatetune.models.weights import load_dense

__all__ = ["GatedNet", "build"]


def build(model: str, *, num_classes: int, in_channels: int, input_size: int, policy: str = "fbs",
          sites: dict[str, SiteSpec] | None = None, weights: str | None = None) -> "GatedNet":
    """Plain `model` -> dense `weights` loaded (optional) -> gated at `sites` (canonical name -> SiteSpec;
    missing sites are SiteSpec(): plain and trainable). Every name is checked before anything is built."""
    e = entry(model)
    if policy not in POLICIES:
        raise ModelError(f"unknown gating policy {policy!r}; {nearest(str(policy), POLICIES)} "
                         f"(policies: {', '.join(POLICIES)})")
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("input_size", input_size)):
        if not (isinstance(value, int) and value >= 1):
            raise ModelError(f"`{name} >= 1` (an int) must hold, but got {name}={value!r}")
    specs = _complete(e, sites or {})
    plain = e.plain(num_classes, in_channels, input_size)
    if weights is not None:
        load_dense(plain, e, weights)
    return GatedNet(plain, e, policy, specs, dense_start=weights is not None)


def _complete(e: ModelEntry, sites: dict[str, SiteSpec]) -> dict[str, SiteSpec]:
    names = [s.name for s in e.sites]
    for key, spec in sites.items():
        if key not in names:
            raise ModelError(f"unknown site {key!r} for {e.name}; {nearest(str(key), names)} (sites are keyed "
                             f"by canonical name: expand aliases and globs with resolve_sites({e.name!r}, ...))")
        if not isinstance(spec, SiteSpec):
            raise ModelError(f"site {key!r} of {e.name}: expected a SiteSpec, got {type(spec).__name__}")
    return {n: sites.get(n, SiteSpec()) for n in names}


class GatedNet(nn.Module):
    """A plain network whose selected convs are GatedConv2d. forward(x (N, C, H, W)) -> logits (N, classes).

    model_name, policy, sites (canonical name -> SiteSpec, every site) describe how it was built;
    dense_start: `plain` holds trained dense weights (the gates' predictors then start from a zero weight).
    """

    def __init__(self, plain: nn.Module, e: ModelEntry, policy: str, sites: dict[str, SiteSpec], *,
                 dense_start: bool = False):
        super().__init__()
        self.model_name, self.policy, self.sites = e.name, policy, dict(sites)
        self.net = plain
        self._gates: dict[str, GatedConv2d] = {}  # plain dict: the modules live (once) inside self.net
        self._site_of: dict[nn.Module, str] = {}
        self.c_out: dict[str, int] = {}  # site -> output channels
        self._site_params: dict[str, list[nn.Parameter]] = {}  # site -> its conv's and BN's parameters
        signed = e.signed_inputs if e.signed_inputs is not None else (e.sites[0].name,)
        for s in e.sites:
            spec = self.sites[s.name]
            conv, bn = plain.get_submodule(s.conv), plain.get_submodule(s.bn) if s.bn else None
            self._site_params[s.name] = [*conv.parameters(), *(bn.parameters() if bn is not None else [])]
            if not spec.trainable:
                for p in self._site_params[s.name]:
                    p.requires_grad_(False)
            self._site_of[conv] = s.name
            self.c_out[s.name] = conv.out_channels
            if spec.gate:
                gate = GatedConv2d(conv, bn, policy=policy, density=spec.density, weight=spec.weight,
                                   nonneg_input=s.name not in signed, dense_start=dense_start)
                _replace(plain, s.conv, gate)
                if s.bn:
                    _replace(plain, s.bn, nn.Identity())
                self._gates[s.name] = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def gates(self) -> dict[str, GatedConv2d]:
        """Gated site name -> its GatedConv2d, forward order."""
        return dict(self._gates)

    def set_trainable(self, trainable) -> None:
        """Train the conv/BN weights of exactly the sites in `trainable` (a set of canonical names); the
        predictors and the layers outside the site table always train."""
        for name, params in self._site_params.items():
            for p in params:
                p.requires_grad_(name in trainable)
        self.sites = {n: dataclasses.replace(sp, trainable=n in trainable) for n, sp in self.sites.items()}

    def set_gate_weights(self, weights: dict[str, float]) -> None:
        """Gate-loss weight per gated site (sites not named keep theirs)."""
        for name, w in weights.items():
            self._gates[name].weight = float(w)
            if not w:
                self._gates[name].loss = None   # a zero weight adds no term (not the last one computed)
            self.sites[name] = dataclasses.replace(self.sites[name], weight=float(w))

    def gate_loss(self) -> torch.Tensor:
        """Scalar: sum over gated sites of weight * site loss of the last forward (0 when none)."""
        terms = [g.loss for g in self._gates.values() if g.loss is not None]
        if terms:
            return torch.stack(terms).sum()
        return torch.zeros((), device=next(self.parameters()).device)

    def read_densities(self, reset: bool = True) -> dict[str, float]:
        """Achieved density (mean fraction of kept channels) per gated site over every sample since the last
        reset; NaN for a site that has seen no sample. One device sync for all sites."""
        if not self._gates:
            return {}
        active, slots = zip(*(g.density_terms() for g in self._gates.values()))
        values = torch.stack(list(active)).tolist()
        if reset:
            for g in self._gates.values():
                g.reset_density()
        return {n: (a / s if s else float("nan")) for n, a, s in zip(self._gates, values, slots)}

    def selection_counts(self, reset: bool = True) -> dict[str, tuple[torch.Tensor, int]]:
        """Per gated site: (how many eval-mode samples kept each output channel, a float32 (C_out,) tensor
        on the CPU; the number of eval-mode samples seen) since the last reset. A site with k == C_out
        keeps every channel (counts == samples); each sample keeps exactly k, so counts sum to k *
        samples (exact up to 2**24 per channel). Training-mode forwards are not counted. One device sync
        for all sites. reset zeroes these counters only; reset_density / read_densities(reset=True) zero
        them together with the densities."""
        if not self._gates:
            return {}
        kept, seen = zip(*(g.selection_terms() for g in self._gates.values()))
        flat = torch.cat([k.reshape(-1) for k in kept]).to("cpu", torch.float32).split([k.numel() for k in kept])
        if reset:
            for g in self._gates.values():
                g.reset_selection()
        return {n: (c.clone(), s) for n, c, s in zip(self._gates, flat, seen)}

    def density_of(self, d: dict[str, float]) -> float:
        """Overall density of a read_densities() result: kept channels / C_out summed over its sites; 1.0 if none."""
        total = sum(self.c_out[n] for n in d)
        return sum(d[n] * self.c_out[n] for n in d) / total if total else 1.0

    @contextmanager
    def count_macs(self):
        """`with net.count_macs() as m: net(x)` -> m.macs, m.dense_macs (per image), m.ratio, m.macs_per_site."""
        counter = MacCounter(self, self._site_of)
        with counter:
            yield counter


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)
