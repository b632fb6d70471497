"""The gated convolution: Feature Boosting and Suppression (FBS, Gao et al., ICLR 2019, arXiv 1810.05331)
and the 2018 notebook's `online: true` regression gate.

A GatedConv2d replaces `conv` (+ the BatchNorm2d right after it) of a plain network. The activation
module stays in the network: for ReLU/ReLU6, act(mask * y) == mask * act(y) and act(0) == 0, so
suppressed channels leave the activation exactly 0.

Shapes: x (N, C_in, H, W) -> out (N, C_out, H', W'); saliency s, mask (N, C_out).

A GatedConv2d keeps nothing of a forward: each forward hands its mask and weighted loss term to its
`tap` (a GateTap, a pass-through submodule), where forward hooks read them: GatedNet.forward's gate
loss, models/record.py's GateRecorder (densities, selection counts), models/macs.py's MacCounter.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gatetune.models.gate_ops import bn_scale_shift, mean_abs, mean_hw, scale_free

__all__ = ["GatedConv2d", "GateTap", "active_count", "POLICIES", "INPUT_GAIN", "Z_CLIP"]

POLICIES = ("fbs", "mse")
# The standardised pooled input's scale. With 1.0 a resnet20 fine-tuned from dense weights at density 0.5
# (CIFAR-10, docs/design.md) made 98% of its gated channels dynamic and lost 13 points of top-1 against
# static top-|gamma| gates; with 0.3, 65% dynamic and 2 points.
INPUT_GAIN = 0.3
# The standardised pooled input is clipped to [-Z_CLIP, Z_CLIP] (before INPUT_GAIN). An input channel that
# was almost always zero in training (its gate upstream lost) gets a running variance near 1e-6; in eval,
# where the running statistics replace the batch's, an input that had it on reached |z| ~2000 and picked the
# winners alone: fine-tuned digitnets lost up to 70 points of top-1 in eval that the same weights kept with
# batch statistics (docs/design.md, "Gating semantics").
Z_CLIP = 3.0


def active_count(density: float, channels: int) -> int:
    """k = ceil(density * C), at least 1. The 1e-9 absorbs float error: ceil(0.7 * 10) is 7, not 8."""
    return max(1, min(channels, math.ceil(density * channels - 1e-9)))


class GateTap(nn.Module):
    """Where a GatedConv2d's per-forward results can be observed: the gate calls tap(mask, loss, n) once per
    forward with its 0/1 mask (N, C_out) without gradient (None when k == C_out), its loss term
    (weight * site loss, a scalar tensor; None when weight == 0) and the batch size n; forward hooks read
    them (the call returns mask and computes nothing). Results pass through a call instead of living on
    the gate, so a forward leaves no state behind and only the observers that are hooked pay for it."""

    def forward(self, mask: torch.Tensor | None, loss: torch.Tensor | None, n: int) -> torch.Tensor | None:
        return mask


class GatedConv2d(nn.Module):
    """Per-sample winner-take-all channel gating of one conv (+BN).

    Saliency predictor: s = ReLU(Linear(z)), z = INPUT_GAIN * clip(BN_noaffine(p / mean_c p), +-Z_CLIP), p = mean_{H,W} |x|
        (N, C_in), Linear C_in -> C_out. Dividing by the mean over input channels makes s blind to the scale
        of x (s multiplies the layer's output, so a saliency that grew with its input compounded layer over
        layer); the BN (batch statistics in training, running ones in eval) centres and scales each pooled
        channel over the inputs, so the predictor reads how this input differs from the others, and
        INPUT_GAIN sets how fast the gates learn to follow it (docs/design.md, "Gating semantics"). The BN
        applies when built from dense weights; from scratch z = INPUT_GAIN * p / mean_c p (predictor_input).
    Winner-take-all: per sample, the k = ceil(density * C_out) most salient channels are kept, chosen by
        topk indices + scatter, so exactly k survive whatever the ties. The mask has no gradient. At
        k == C_out neither top-k nor mask is computed (mask is None).
    policy "fbs": out = mask * s * BN_noaffine(conv x) + mask * beta. BN_noaffine keeps the BN's running
        statistics, momentum and eps; s replaces gamma, and beta (learned, from the BN's bias) is masked, so
        losers are exactly 0. Without BN: out = mask * s * conv(x). Loss: mean_n sum_c |mask * s|.
    policy "mse": y = BN(conv x) (affine, as in the plain net); the predictor reads x.detach(), so it gets no
        task gradient; out = mask * y. Loss: MSE(s, t), t = relu(spatial max of y), detached.
    Each forward calls self.tap(mask, weight * that loss (None when weight == 0), N) (see GateTap); the
    module keeps no per-forward state (only the one-time nonneg_input check below).

    Initialisation (see _init_predictor): bias = |gamma| of the BN (1.0 without BN); the weight is zero when
    the conv comes from trained dense weights (dense_start), so at density 1.0 the gated conv computes
    exactly what the plain conv + BN did, and random otherwise. nonneg_input
    (the input is a ReLU output: every site after the stem) lets mean |x| be computed as mean x, one memory
    pass instead of three; it is checked once, on the first forward.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, *, policy: str = "fbs",
                 density: float = 1.0, weight: float = 0.0, nonneg_input: bool = False, dense_start: bool = False):
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.policy, self.density, self.weight = policy, float(density), float(weight)
        self.k = active_count(density, conv.out_channels)
        self.nonneg_input, self._checked = nonneg_input, False
        self.conv = conv
        self.pool_norm = nn.BatchNorm1d(conv.in_channels, affine=False)   # its running statistics: eval's
        # standardise the pooled input (from dense weights) or not (from scratch): see predictor_input
        self.register_buffer("standardise", torch.tensor(bool(dense_start)))
        self.predictor = nn.Linear(conv.in_channels, conv.out_channels)
        gamma = bn.weight.detach().clone() if bn is not None and bn.affine else None
        self.bn, self.beta = bn, None
        if policy == "fbs" and bn is not None:
            self.bn = _affine_free(bn)
            self.beta = nn.Parameter(bn.bias.detach().clone() if bn.affine else torch.zeros(bn.num_features))
            if gamma is not None:
                self._absorb_sign(gamma)
        self._init_predictor(gamma, dense_start)
        self.tap = GateTap()   # no parameters or buffers: the state_dict is unchanged

    @torch.no_grad()
    def _init_predictor(self, gamma: torch.Tensor | None, dense_start: bool) -> None:
        """Bias: |gamma| (1.0 without BN); _absorb_sign makes |gamma| exact for negative gammas.
        Weight, from dense weights: zero, so s = |gamma| (the dense net, exactly, at density 1.0; below 1 the
        first winners are the channels of largest |gamma|, and the rows learn from the winners' gradients).
        From scratch, where every gamma is 1 and a zero weight would tie every channel: nn.Linear's default
        (kaiming-uniform; not tiny, or the gates start static). The input is centred per channel, so a row's
        sum adds nothing common to every sample."""
        if dense_start:
            self.predictor.weight.zero_()
        self.predictor.bias.copy_(gamma.abs() if gamma is not None else torch.ones_like(self.predictor.bias))

    @torch.no_grad()
    def _absorb_sign(self, gamma: torch.Tensor) -> None:
        """gamma * BN(y) == |gamma| * BN(-y) with the running mean negated: flip channels with gamma < 0."""
        sign = torch.where(gamma < 0, -1.0, 1.0).to(self.conv.weight.dtype)
        self.conv.weight.mul_(sign.view(-1, 1, 1, 1))
        if self.conv.bias is not None:
            self.conv.bias.mul_(sign)
        if self.bn.running_mean is not None:
            self.bn.running_mean.mul_(sign)

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> saliency (N, C_out) >= 0."""
        if self.nonneg_input and not self._checked:
            if bool((x < 0).any()):
                raise RuntimeError("GatedConv2d(nonneg_input=True) got a negative input: the site table is wrong")
            self._checked = True
        return F.relu(self.predictor(self.predictor_input(mean_hw(x) if self.nonneg_input else mean_abs(x))))

    def predictor_input(self, p: torch.Tensor) -> torch.Tensor:
        """z (N, C_in) of pooled p: scale-free, standardised per channel, clipped to +-Z_CLIP, times INPUT_GAIN.
        Batch statistics in training (updating the running ones), except for a batch of one, which reads the
        running ones.
        Standardised only when built from dense weights (the `standardise` buffer): there the predictor starts
        at zero and must learn from each sample's deviation, or its gates stay static. From scratch the
        standardisation made the winners input-driven from the first step, before the features meant
        anything: digitnet on digits reached 41% top-1 at density 0.5 instead of 98.6% without it."""
        if not bool(self.standardise):
            return scale_free(p) * INPUT_GAIN
        n = self.pool_norm
        batch = self.training and p.shape[0] > 1
        z = F.batch_norm(scale_free(p), n.running_mean, n.running_var, None, None, batch, n.momentum, n.eps)
        return z.clamp(-Z_CLIP, Z_CLIP) * INPUT_GAIN

    @torch.no_grad()
    def _winners(self, s: torch.Tensor) -> torch.Tensor | None:
        """0/1 mask (N, C_out) with exactly k ones per row, or None when every channel is kept."""
        if self.k == s.shape[1]:
            return None
        return torch.zeros_like(s).scatter_(1, s.topk(self.k, dim=1, sorted=False).indices, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.policy == "mse":
            return self._forward_mse(x)
        s = self._predict(x)
        mask = self._winners(s)
        y = self.conv(x)
        if mask is not None:
            s = s * mask
        # s >= 0: the L1 of the winners' saliencies
        self.tap(mask, self.weight * s.float().sum(1).mean() if self.weight else None, x.shape[0])
        if self.bn is None:
            return y * s[:, :, None, None]
        return bn_scale_shift(y, self.bn, s, self.beta[None] if mask is None else mask * self.beta)

    def _forward_mse(self, x: torch.Tensor) -> torch.Tensor:
        s = self._predict(x.detach())
        mask = self._winners(s)
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        loss = self.weight * F.mse_loss(s, y.detach().amax(dim=(2, 3)).clamp(min=0)) if self.weight else None
        self.tap(mask, loss, x.shape[0])
        return y if mask is None else y * mask[:, :, None, None]

    def extra_repr(self) -> str:
        c = self.conv.out_channels
        return f"policy={self.policy}, k={self.k}/{c} (density {self.density}), weight={self.weight}"


def _affine_free(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """A BatchNorm2d without gamma/beta sharing `bn`'s running statistics, momentum and eps."""
    new = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=False,
                         track_running_stats=bn.track_running_stats,
                         device=bn.running_mean.device if bn.running_mean is not None else None)
    if bn.track_running_stats:
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
    return new.train(bn.training)
