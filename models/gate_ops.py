"""Autograd pieces of the FBS gate that keep its cost over a plain conv-BN small: a resnet20 train step
with every conv gated at density 1.0 costs ~1.12-1.18x the plain one on 2 CPU threads (with
torch's own ops, abs + vector_norm + BN + addcmul, it was 3x). Each computes exactly its docstring's
expression; tests/test_gate.py checks them against it in float64.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["mean_abs", "bn_scale_shift"]


class _MeanAbs(torch.autograd.Function):
    """x (N, C, H, W) -> mean over H, W of |x|, (N, C). On CPU abs + mean and sign * grad are several
    times faster than vector_norm(ord=1) and its backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.abs().mean((2, 3))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return x.sign().mul_((g / (x.shape[2] * x.shape[3]))[:, :, None, None])


def mean_abs(x: torch.Tensor) -> torch.Tensor:
    return _MeanAbs.apply(x)


class _ScaleShiftBN(torch.autograd.Function):
    """out = s * xhat + b, written over xhat, where xhat = (y - mu) * invstd is BN_noaffine(y).

    Backward shares its reductions: with G = sum_hw grad and Gy = sum_hw grad * y (both (N, C)),
    grad_b = G, grad_s = sum_hw grad * xhat = invstd * (Gy - mu * G), and, with batch statistics, BN's
    backward of grad * s is grad_y = grad * s * invstd + y * beta_c + gamma_c, its two per-channel means
    being sums over n of s * G and s * grad_s. (Computed from un-centred y: float32 loses about
    |mu| / sigma ulps, harmless for BN'd convs.) No copy of xhat is kept.
    """

    @staticmethod
    def forward(ctx, xhat, s, b, y, mu, invstd, batch_stats):
        ctx.mark_dirty(xhat)
        ctx.save_for_backward(y, s, mu, invstd)
        ctx.b_rows, ctx.batch_stats = b.shape[0], batch_stats
        return xhat.mul_(s[:, :, None, None]).add_(b[:, :, None, None])

    @staticmethod
    def backward(ctx, g):
        y, s, mu, invstd = ctx.saved_tensors
        g_sum = g.sum((2, 3))
        grad_s = invstd * ((g * y).sum((2, 3)) - mu * g_sum)
        grad_b = g_sum.sum(0, keepdim=True) if ctx.b_rows == 1 else g_sum
        alpha = (s * invstd)[:, :, None, None]
        if not ctx.needs_input_grad[3]:  # frozen conv reading a frozen input, e.g. the stem
            return None, grad_s, grad_b, None, None, None, None
        if not ctx.batch_stats:
            return None, grad_s, grad_b, g * alpha, None, None, None
        count = y.numel() // y.shape[1]
        mean_gs = (s * g_sum).sum(0) / count          # mean over n, h, w of grad * s
        mean_gs_xhat = (s * grad_s).sum(0) / count    # mean of grad * s * xhat
        beta = -invstd * invstd * mean_gs_xhat
        gamma = -invstd * mean_gs - mu * beta
        grad_y = (y * beta[None, :, None, None]).add_(gamma[None, :, None, None]).addcmul_(g, alpha)
        return None, grad_s, grad_b, grad_y, None, None, None


def bn_scale_shift(y: torch.Tensor, bn: nn.BatchNorm2d, s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """s * BN_noaffine(y) + b for y (N, C, H, W), s (N, C), b (N, C) or (1, C).

    BN_noaffine is `bn` (affine=False) run as nn.BatchNorm2d runs it: batch statistics in training, with
    the running statistics updated by its momentum (a cumulative average when momentum is None); running
    statistics in eval.
    """
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    batch_stats = bn.training or bn.running_mean is None
    with torch.no_grad():  # _ScaleShiftBN does BN's backward itself
        xhat, mu, invstd = torch.native_batch_norm(y, None, None, bn.running_mean, bn.running_var,
                                                   batch_stats, momentum, bn.eps)
    if not batch_stats:
        mu, invstd = bn.running_mean, torch.rsqrt(bn.running_var + bn.eps)
    return _ScaleShiftBN.apply(xhat, s, b, y, mu, invstd, batch_stats)
