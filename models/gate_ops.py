"""Autograd pieces of the FBS gate that keep its cost over a plain conv-BN small: a resnet20 train step
with every conv gated at density 1.0 costs ~1.05-1.10x the plain one on CPU (with torch's own ops, abs +
vector_norm + BN + addcmul, it was 3x; with an earlier version of these ops, 1.12-1.18x).

Where the gated step's extra time went (resnet20, batch 128, 1 thread, per step): ~9 ms materialising
mean-pool gradients (torch's MeanBackward writes the broadcast before autograd adds it), ~10 ms in
g * y products and separate sums, ~6 ms in addcmul with two broadcast operands (a scalar loop on CPU),
~2 extra full passes forward for the saliency scale and shift; the predictor Linear, top-k / mask and
gate loss are (N, C)-sized and negligible. Now each gate costs one more full pass forward than a
conv + BN (the pool) and about two more backward (grad_y is two passes; the pool gradient one add).

Each computes exactly its docstring's expression; tests/test_gate.py checks them against it in float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["mean_abs", "mean_hw", "scale_free", "SCALE_EPS", "bn_scale_shift"]


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


class _MeanHW(torch.autograd.Function):
    """x (N, C, H, W) -> mean over H, W, (N, C). The backward hands autograd the broadcast view
    g / (H W) expanded to x's shape, which it adds into x's other gradient (the conv's) in one pass;
    torch's MeanBackward materialises the broadcast first (one more full-size pass per gate)."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.mean((2, 3))

    @staticmethod
    def backward(ctx, g):
        hw = ctx.shape[2] * ctx.shape[3]
        return (g / hw)[:, :, None, None].expand(ctx.shape)


def mean_hw(x: torch.Tensor) -> torch.Tensor:
    return _MeanHW.apply(x)


SCALE_EPS = 1e-6   # an all-zero input pools to zeros and stays zero


def scale_free(p: torch.Tensor) -> torch.Tensor:
    """p (N, C) >= 0 divided by its mean over C (+ SCALE_EPS): the same for x and a * x, a > 0. The saliency
    predictor reads this, so its output cannot grow with the activations' scale."""
    return p / (p.mean(1, keepdim=True) + SCALE_EPS)


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x * scale + shift for x (N, C, H, W), scale and shift (N, C) or (1, C), in one pass; x's dtype.

    On CPU (contiguous x) this is eval-mode batch_norm on the view (1, N*C, H, W) with mean 0, variance 1,
    eps 0, weight `scale` and bias `shift`: exactly x * scale + shift, and vectorised, where addcmul with
    two broadcast operands runs 3-4x slower (it falls back to a scalar loop on CPU)."""
    n, c = x.shape[:2]
    if x.device.type == "cpu" and x.is_contiguous():
        w, b = scale.expand(n, c).reshape(-1), shift.expand(n, c).reshape(-1)
        zeros, ones = torch.zeros_like(w), torch.ones_like(w)
        out = F.batch_norm(x.view(1, n * c, *x.shape[2:]), zeros, ones, w, b, False, 0.0, 0.0)
        # the same memory as a tensor of its own, not a view: autograd forbids in-place ops (the ReLU
        # after a gate) on a view made inside a custom Function
        return out.new_empty(0).set_(out.untyped_storage(), 0, x.shape, x.stride())
    return torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None], out=torch.empty_like(x))


def _hw_sums(g: torch.Tensor, y: torch.Tensor, ct: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_hw g, sum_hw g * y), both (N, C) in dtype ct. On CPU (contiguous, same dtype) one fused pass:
    the weight and bias gradients of training-mode BN over the view (1, N*C, H, W) with mean 0 and
    inverse std 1 are exactly these sums; otherwise g.sum and (g * y).sum (a full-size temporary)."""
    n, c = g.shape[:2]
    if g.device.type == "cpu" and g.dtype == y.dtype == ct and g.is_contiguous() and y.is_contiguous():
        zeros = torch.zeros(n * c, dtype=ct)
        view = (1, n * c, *g.shape[2:])
        _, gy, gs = torch.ops.aten.native_batch_norm_backward(g.view(view), y.view(view), None, None, None,
                                                              zeros, torch.ones_like(zeros), True, 0.0,
                                                              [False, True, True])
        return gs.view(n, c), gy.view(n, c)
    return g.sum((2, 3), dtype=ct), (g * y).sum((2, 3), dtype=ct)


def _batch_stats(y: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                 momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel of y (N, C, H, W), the running statistics updated as
    native_batch_norm updates them (running_var with the unbiased variance).

    On CPU (contiguous float y) two vectorised passes, 3-5x faster than torch's own statistics here:
    S_nc = sum_hw y, mu = sum_n S / count; then sum_hw y * (y - mu_c) per (n, c), which is the weight
    gradient of training-mode BN over the view (1, N*C, H, W) with grad = input = y, mean mu, inverse
    std 1. Summed over n it is the centred sum of squares plus mu_c * sum (y - mu_c), a rounding-level
    term that is subtracted; the error grows like |mu| / sigma, not its square as with sum y^2.
    Elsewhere (CUDA, bf16, channels_last): torch.batch_norm_update_stats.
    """
    n, c = y.shape[:2]
    if not (y.device.type == "cpu" and y.dtype in (torch.float32, torch.float64) and y.is_contiguous()):
        return torch.batch_norm_update_stats(y, running_mean, running_var, momentum)
    count = y.numel() // c
    s1 = y.sum((2, 3))                                    # (N, C)
    total = s1.sum(0)
    mu = total / count
    view = (1, n * c, *y.shape[2:])
    mu_nc = mu.expand(n, c).reshape(-1)
    _, gw, _ = torch.ops.aten.native_batch_norm_backward(y.view(view), y.view(view), None, None, None, mu_nc,
                                                         torch.ones_like(mu_nc), True, 0.0, [False, True, False])
    ss = gw.view(n, c).sum(0) - mu * (total - count * mu)
    var = (ss / count).clamp_(min=0)
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(mu.to(running_mean.dtype), alpha=momentum)
        unbiased = var * (count / max(count - 1, 1))
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return mu, var


class _ScaleShiftBN(torch.autograd.Function):
    """out = s * (y - mu) * invstd + b = s * BN_noaffine(y) + b, computed in one pass over y as
    out = y * a + (b - a * mu) with a = s * invstd ((N, C); float32 even when y is bf16).

    Backward shares its reductions: with G = sum_hw grad and Gy = sum_hw grad * y (both (N, C)),
    grad_b = G, grad_s = sum_hw grad * xhat = invstd * (Gy - mu * G), and, with batch statistics, BN's
    backward of grad * s is grad_y = grad * s * invstd + y * beta_c + gamma_c, its two per-channel means
    being sums over n of s * G and s * grad_s. (Computed from un-centred y: float32 loses about
    |mu| / sigma ulps, harmless for BN'd convs.) Full-size passes, CPU: forward 2 (torch's statistics,
    the output), backward 3 (G and Gy together, grad_y in two); no copy of xhat is kept.
    """

    @staticmethod
    def forward(ctx, y, s, b, mu, invstd, batch_stats):
        ctx.save_for_backward(y, s, mu, invstd)
        ctx.b_rows, ctx.batch_stats = b.shape[0], batch_stats
        ct = torch.promote_types(y.dtype, torch.float32)   # float32 for bf16 / fp16 y
        a = s.to(ct) * invstd
        with torch.autocast(y.device.type, enabled=False):
            return _affine(y, a, b.to(ct) - a * mu)

    @staticmethod
    def backward(ctx, g):
        y, s, mu, invstd = ctx.saved_tensors
        ct = torch.promote_types(y.dtype, torch.float32)
        with torch.autocast(y.device.type, enabled=False):
            g_sum, gy = _hw_sums(g, y, ct)
            grad_s = invstd * (gy - mu * g_sum)
            grad_b = g_sum.sum(0, keepdim=True) if ctx.b_rows == 1 else g_sum
            if not ctx.needs_input_grad[0]:  # frozen conv reading a frozen input, e.g. the stem
                return None, grad_s.to(s.dtype), grad_b, None, None, None
            s32 = s.to(ct)
            alpha = s32 * invstd
            if not ctx.batch_stats:
                return _affine(g, alpha, torch.zeros_like(alpha)), grad_s.to(s.dtype), grad_b, None, None, None
            count = y.numel() // y.shape[1]
            mean_gs = (s32 * g_sum).sum(0) / count          # mean over n, h, w of grad * s
            mean_gs_xhat = (s32 * grad_s).sum(0) / count    # mean of grad * s * xhat
            beta = -invstd * invstd * mean_gs_xhat
            gamma = -invstd * mean_gs - mu * beta
            grad_y = _affine(y, beta[None], gamma[None]).addcmul_(g, alpha[:, :, None, None])
        return grad_y, grad_s.to(s.dtype), grad_b, None, None, None


def bn_scale_shift(y: torch.Tensor, bn: nn.BatchNorm2d, s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """s * BN_noaffine(y) + b for y (N, C, H, W), s (N, C), b (N, C) or (1, C).

    BN_noaffine is `bn` (affine=False) run as nn.BatchNorm2d runs it: batch statistics in training, with
    the running statistics updated by its momentum (a cumulative average when momentum is None); running
    statistics in eval. The batch statistics are torch's own (batch_norm_update_stats: what
    native_batch_norm computes, without writing a normalised copy).
    """
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    batch_stats = bn.training or bn.running_mean is None
    with torch.no_grad():  # _ScaleShiftBN does BN's backward itself
        if batch_stats:
            running = bn.training and bn.running_mean is not None
            mu, var = _batch_stats(y, bn.running_mean if running else None, bn.running_var if running else None,
                                   momentum)
            invstd = torch.rsqrt(var + bn.eps)
        else:
            mu, invstd = bn.running_mean, torch.rsqrt(bn.running_var + bn.eps)
    return _ScaleShiftBN.apply(y, s, b, mu, invstd, batch_stats)
