"""Measured multiply-accumulates (MACs) of a GatedNet: forward hooks on every nn.Conv2d and nn.Linear.

Per sample and layer: effective = dense * (active input fraction) * (active output fraction), where an
input channel is active unless it is entirely zero in that sample (it was suppressed upstream, or a ReLU
zeroed it), and the output fraction is the gate mask's mean for a gated conv, else 1. Depthwise convs
(groups == C_in): dense * fraction of channels active in both input and output. Linear: dense * fraction
of non-zero input features. Gate predictors (Linear C_in -> C_out) count dense into `macs` but not into
`dense_macs`, which is the same network without gating (convs + linears only; BN, pooling and the
saliency multiply are not counted). This is the quadratic input x output saving of FBS section 3.

A gated conv's mask is read from its gate's tap (models/gate.py GateTap), which the gate calls after its
conv: the conv's hook keeps its input's active channels until then (the gate keeps no mask).
"""
from __future__ import annotations

import torch
from torch import nn

from gatetune.models.gate import GatedConv2d

__all__ = ["MacCounter", "conv_macs"]


def conv_macs(conv: nn.Conv2d, out: torch.Tensor) -> int:
    """Dense MACs of `conv` per image that produced `out` (N, C_out, H', W')."""
    kh, kw = conv.kernel_size
    return conv.out_channels * (conv.in_channels // conv.groups) * kh * kw * out.shape[2] * out.shape[3]


def _active(x: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) -> (N, C) bool: channel (or feature) not entirely zero."""
    return x.flatten(2).ne(0).any(2) if x.dim() > 2 else x.ne(0)


class MacCounter:
    """`with net.count_macs() as m: net(x)` -> m.macs, m.dense_macs (mean per image), m.ratio, m.macs_per_site.

    Sums stay on the device during the forwards; reading a property synchronises once.
    """

    def __init__(self, net: nn.Module, site_of: dict[nn.Module, str] | None = None):
        self.net = net
        self._site_of = site_of or {}          # conv module -> site name
        gates = [g for g in net.modules() if isinstance(g, GatedConv2d)]
        self._conv_of_tap = {g.tap: g.conv for g in gates}
        self._gated_convs = set(self._conv_of_tap.values())
        self._predictors = {g.predictor for g in gates}
        self._pending: dict[nn.Module, tuple] = {}   # gated conv -> (images, active inputs, dense) until its tap
        self._images = 0
        self._dense = 0                       # dense MACs summed over images (python int: shapes only)
        self._eff: dict[str, torch.Tensor] = {}  # effective MACs summed over images, per site or '' (rest)
        self._hooks = []

    def __enter__(self) -> "MacCounter":
        self._hooks.append(self.net.register_forward_pre_hook(self._count_images))
        for m in self.net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                self._hooks.append(m.register_forward_hook(self._hook))
        for tap in self._conv_of_tap:
            self._hooks.append(tap.register_forward_hook(self._tap_hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._pending.clear()

    def _count_images(self, module, inputs):
        self._images += inputs[0].shape[0]

    @torch.no_grad()
    def _hook(self, m: nn.Module, inputs, out: torch.Tensor) -> None:
        x = inputs[0]
        if isinstance(m, nn.Linear):
            dense = m.in_features * m.out_features
            if m in self._predictors:
                self._add("", torch.tensor(float(dense * x.shape[0]), device=x.device))
                return
            eff = dense * _active(x).float().mean(1)
        else:
            dense = conv_macs(m, out)
            if m in self._gated_convs:   # finished by _tap_hook, with the gate's mask
                self._pending[m] = (x.shape[0], _active(x), dense)
                return
            eff = self._conv_eff(m, _active(x), None, dense)
        self._dense += dense * x.shape[0]
        self._add(self._site_of.get(m, ""), eff.sum())

    @torch.no_grad()
    def _tap_hook(self, tap: nn.Module, args: tuple, out) -> None:
        m = self._conv_of_tap[tap]
        n, a_in, dense = self._pending.pop(m)
        self._dense += dense * n
        self._add(self._site_of.get(m, ""), self._conv_eff(m, a_in, args[0], dense).sum())

    @staticmethod
    def _conv_eff(m: nn.Conv2d, a_in: torch.Tensor, mask: torch.Tensor | None, dense: int) -> torch.Tensor:
        """(N,) effective MACs of conv m: a_in its active inputs (N, C_in), mask its gate's (None: all kept)."""
        if m.groups > 1 and m.groups == m.in_channels:
            both = a_in if mask is None else a_in & (mask > 0)
            return dense * both.float().mean(1)
        out_frac = 1.0 if mask is None else mask.float().mean(1)  # float: the mask may be bf16
        return dense * a_in.float().mean(1) * out_frac

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.double()
        self._eff[key] = self._eff[key] + value if key in self._eff else value

    @property
    def macs(self) -> float:
        """Mean effective MACs per image, predictors included."""
        total = sum(self._eff.values())
        return float(total) / max(self._images, 1) if self._eff else 0.0

    @property
    def dense_macs(self) -> float:
        """Mean dense MACs per image of the same network without gating (no predictors)."""
        return self._dense / max(self._images, 1)

    @property
    def ratio(self) -> float:
        return self.macs / self.dense_macs if self._dense else float("nan")

    @property
    def macs_per_site(self) -> dict[str, float]:
        """Effective MACs per image of each site's conv (predictor excluded), in forward order of first use."""
        n = max(self._images, 1)
        keys = [k for k in self._eff if k]
        values = torch.stack([self._eff[k] for k in keys]).tolist() if keys else []
        return {k: v / n for k, v in zip(keys, values)}
