"""GateRecorder: what the gates of a network did over some forwards, observed through their taps.

    with net.record_gates() as rec:            # GatedNet.record_gates(); or GateRecorder(module)
        net(x); net(x2)
    rec.densities()         # {site: achieved density over every recorded forward}
    rec.density()           # overall: kept channels / C_out summed over the sites (1.0 with no site)
    rec.selection_counts()  # {site: (per-channel keeps, float32 (C_out,) CPU; samples)}, eval-mode forwards

A forward hook on each GatedConv2d's tap (models/gate.py GateTap) adds the mask's sums to counters of the
recorder on the gate's device (no sync per batch; each read syncs once for all sites), the way MacCounter
(models/macs.py) observes convs: the gates keep no state, so what is counted, and since when, is the scope
of one `with` block. Hooks are removed on exit; the counts stay readable.
"""
from __future__ import annotations

import torch
from torch import nn

from gatetune.models.gate import GatedConv2d, GateTap

__all__ = ["GateRecorder"]


class _Site:
    """One gate's counters; called as the forward hook of its tap, with (mask, loss, n) as args."""

    __slots__ = ("channels", "kept", "seen", "full", "chosen", "eval_seen", "eval_full")

    def __init__(self, channels: int, device: torch.device):
        self.channels = channels
        with torch.inference_mode(False):   # normal tensors: updated in and out of inference mode
            self.kept = torch.zeros((), dtype=torch.float64, device=device)          # kept channels, all forwards
            self.chosen = torch.zeros(channels, dtype=torch.float64, device=device)  # per channel, eval mode
        self.seen = self.full = 0            # samples; of which ran with k == C_out (no mask built)
        self.eval_seen = self.eval_full = 0  # the same, eval-mode forwards only

    def __call__(self, tap: GateTap, args: tuple, out) -> None:
        mask, n, counted = args[0], args[2], not tap.training   # tap.training: its gate's mode
        self.seen += n
        if counted:
            self.eval_seen += n
        if mask is None:
            self.full += n
            if counted:
                self.eval_full += n
            return
        self.kept += mask.sum(dtype=torch.float32)   # exact, also for a bf16 mask under autocast
        if counted:   # selection counts: one sum over the batch of the 0/1 mask
            self.chosen += mask.sum(0, dtype=torch.float64)


class GateRecorder:
    """Context manager counting, per gated site, the channels its gate kept in the forwards run inside the
    block: densities over every forward (training and eval mode), per-channel selection counts over the
    eval-mode forwards only (what the gating health report judges: validation inputs, running statistics).

    `gates`: a {site: GatedConv2d} dict, or a module (its GatedNet.gates if it has them, else every
    GatedConv2d in it, named by module path).
    """

    def __init__(self, gates: dict[str, GatedConv2d] | nn.Module):
        if isinstance(gates, nn.Module):
            gates = dict(gates.gates) if hasattr(gates, "gates") else {
                n: m for n, m in gates.named_modules() if isinstance(m, GatedConv2d)}
        self._gates = dict(gates)
        self._sites: dict[str, _Site] = {}
        self._hooks = []

    def __enter__(self) -> "GateRecorder":
        for name, g in self._gates.items():
            site = self._sites[name] = _Site(g.conv.out_channels, g.predictor.weight.device)
            self._hooks.append(g.tap.register_forward_hook(site))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def densities(self) -> dict[str, float]:
        """Achieved density (mean fraction of kept channels) per gated site over every recorded sample; NaN
        for a site that has seen no sample. One device sync for all sites."""
        if not self._sites:
            return {}
        sites = self._sites.values()
        values = torch.stack([s.kept + s.full * s.channels for s in sites]).tolist()
        return {n: (a / (s.seen * s.channels) if s.seen else float("nan"))
                for (n, s), a in zip(self._sites.items(), values)}

    def density(self, densities: dict[str, float] | None = None) -> float:
        """Overall density of `densities` (default: self.densities()): kept channels / C_out summed over its
        sites; 1.0 if none."""
        d = self.densities() if densities is None else densities
        c = {n: g.conv.out_channels for n, g in self._gates.items()}
        total = sum(c[n] for n in d)
        return sum(d[n] * c[n] for n in d) / total if total else 1.0

    def selection_counts(self) -> dict[str, tuple[torch.Tensor, int]]:
        """Per gated site: (how many eval-mode samples kept each output channel, a float32 (C_out,) tensor
        on the CPU; the number of eval-mode samples seen). A site with k == C_out keeps every channel
        (counts == samples); each sample keeps exactly k, so counts sum to k * samples (exact up to 2**24
        per channel). Training-mode forwards are not counted. One device sync for all sites."""
        if not self._sites:
            return {}
        kept = [s.chosen + s.eval_full for s in self._sites.values()]
        flat = torch.cat(kept).to("cpu", torch.float32).split([k.numel() for k in kept])
        return {n: (c.clone(), s.eval_seen) for (n, s), c in zip(self._sites.items(), flat)}
