"""GatedNet: a plain network after gating surgery, and `build`, the one entry point that makes one.

Surgery: for each site with gate=True, the conv module is replaced by GatedConv2d(conv, bn) and the BN
module by nn.Identity; activations, pooling and residual adds stay where the plain network has them.
Sites with gate=False keep the plain conv and BN (trainable=False still freezes them).
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from gatetune.models.errors import ModelError, nearest
from gatetune.models.gate import POLICIES, GatedConv2d
from gatetune.models.macs import MacCounter
from gatetune.models.record import GateRecorder
from gatetune.models.registry import ModelEntry, entry
from gatetune.models.sites import SiteSpec
from gatetune.models.weights import is_gated, load_dense, load_gated, load_state, read_state_file

__all__ = ["GatedNet", "build"]


def build(model: str, *, num_classes: int, in_channels: int, input_size: int, policy: str = "fbs",
          sites: dict[str, SiteSpec] | None = None, weights: str | None = None) -> "GatedNet":
    """Plain `model` -> dense `weights` loaded (optional) -> gated at `sites` (canonical name -> SiteSpec;
    missing sites are SiteSpec(): plain and trainable). Every name is checked before anything is built.
    `weights` may also be a gated network's checkpoint, gated at the same sites: it is loaded after the
    surgery, every key (weights.load_gated), as a density ladder's step starts from the step above."""
    e = entry(model)
    if policy not in POLICIES:
        raise ModelError(f"unknown gating policy {policy!r}; {nearest(str(policy), POLICIES)} "
                         f"(policies: {', '.join(POLICIES)})")
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("input_size", input_size)):
        if not (isinstance(value, int) and value >= 1):
            raise ModelError(f"`{name} >= 1` (an int) must hold, but got {name}={value!r}")
    specs = _complete(e, sites or {})
    plain = e.plain(num_classes, in_channels, input_size)
    state = read_state_file(weights) if weights not in (None, "torchvision") else None
    if weights == "torchvision":
        load_dense(plain, e, weights)
    elif state is not None and not is_gated(state):
        load_state(plain, state, f"weights file {weights!r}", e)
    net = GatedNet(plain, e, policy, specs, dense_start=weights is not None)
    if state is not None and is_gated(state):
        load_gated(net, state, f"weights file {weights!r}")
    return net


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
    """A plain network whose selected convs are GatedConv2d. forward(x (N, C, H, W)) -> logits (N, classes);
    forward(x, with_gate_loss=True) -> (logits, gate loss). What the gates did (densities, selection
    counts, MACs) is measured by observers around the forwards: record_gates(), count_macs().

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

    def forward(self, x: torch.Tensor, *, with_gate_loss: bool = False):
        """logits; with_gate_loss: (logits, gate loss), the scalar sum over gated sites of weight * site loss
        of this forward (a zero tensor when no site has a weight). Returned, not kept on the modules, so
        DDP sees the parameters only the gate loss reaches (the mse policy's predictors) in its output."""
        if not with_gate_loss:
            return self.net(x)
        gates = list(self._gates.values())
        terms: list[torch.Tensor | None] = [None] * len(gates)
        hooks = [g.tap.register_forward_hook(partial(_keep_loss, terms, i)) for i, g in enumerate(gates)]
        try:
            logits = self.net(x)
        finally:
            for h in hooks:
                h.remove()
        terms = [t for t in terms if t is not None]   # in site order, whatever the forward order
        if terms:
            return logits, torch.stack(terms).sum()
        return logits, torch.zeros((), device=next(self.parameters()).device)

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
        """Gate-loss weight per gated site (sites not named keep theirs; a zero weight adds no term)."""
        for name, w in weights.items():
            self._gates[name].weight = float(w)
            self.sites[name] = dataclasses.replace(self.sites[name], weight=float(w))

    def record_gates(self) -> GateRecorder:
        """`with net.record_gates() as rec: net(x)` -> rec.densities(), rec.density(), rec.selection_counts()
        of the forwards inside the block (models/record.py)."""
        return GateRecorder(self._gates)

    @contextmanager
    def count_macs(self):
        """`with net.count_macs() as m: net(x)` -> m.macs, m.dense_macs (per image), m.ratio, m.macs_per_site."""
        counter = MacCounter(self, self._site_of)
        with counter:
            yield counter


def _keep_loss(terms: list, i: int, tap: nn.Module, args: tuple, out) -> None:
    terms[i] = args[1]   # GateTap args: (mask, loss, n)


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)
