"""Channel-skipping inference: the realised speed of gating at batch 1.

The masked GatedNet computes every output channel and zeroes the losers, so it is slower than the
dense network. `SkipNet(net)` is an eval-only copy of a GatedNet that computes only what the gates keep:
each gated conv first runs its saliency predictor, picks the top-k output channels, and convolves only
those output channels over only the input channels that can be non-zero:

    s = relu(W_p . pool(x) + b_p);  o = topk(s, k);  i = the input channels kept (see below)
    z = conv(x[i], W'[o][:, i]);  fbs: out[o] = s[o] * (z + shift[o]) + beta[o];  mse: out[o] = z + shift[o]

W' and shift fold the eval-mode BN into the conv once, when the SkipNet is built (fbs: W * invstd and
(bias - mean) * invstd, the saliency replacing gamma; mse: the affine BN, gamma * invstd). Per call only
the kept weight rows and columns are copied (two index_selects): 5-25% of the smaller conv's time, the
most at 8x8 feature maps.

Which input channels: along a sequential chain (nn.Sequential, a BasicBlock's conv1 -> conv2, a Fire
module's squeeze -> expands -> concat) a gated conv hands on a compact tensor, its k kept channels and their
indices, and the next conv reads just those (no scatter, no gather of the activations); zero-preserving
channelwise modules (ReLU, ReLU6, pooling, Identity, Dropout in eval) run on the compact tensor. A residual
add scatters into the skip tensor (index_add); any other module gets the full-width tensor. A gate reading a
full-width ReLU output skips its all-zero channels (found from the pooled vector the predictor needs
anyway). Every registered model runs this way: mcifarnet, digitnet, vgg16_bn and mobilenet_v1 (depthwise
gates read their kept channels only) are chains; resnet20 and resnet18 are compact inside each BasicBlock;
squeezenet_v11 inside each Fire module. A gated conv with groups other than 1 or depthwise, or padding
other than zeros, is refused (ModelError): the masked GatedNet is then the path to use.

Outputs equal the masked GatedNet's eval outputs at batch 1 up to the float rounding of the folded BN: the
same top-k channels are picked, the saliency being computed by the same ops on the same values. (A batch
of N > 1 through the masked net rounds differently and can, at a near-tie of two saliencies, keep the
other channel.) The copy shares every tensor with `net` except the folded weights: rebuild it after the
weights change. A batch of N runs as N batch-1 forwards. Each torch op costs 3-20 us at batch 1, so
small networks (resnet20: 16-64 channels) gain little or nothing; see bench/inference.py.
`dense_net(net)` is the dense counterpart, the latency baseline; `measure_latency` times both.

    fast = SkipNet(net)                 # net: a GatedNet, in any mode (the copy is eval)
    logits = fast(x)                    # == net.eval()(x[i:i+1]) per sample, up to ~1e-6 relative
    measure_latency(net, images)        # {'latency_ratio': skip / dense, 'skip_ms': .., 'dense_ms': .., ...}
"""
from __future__ import annotations

import copy
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock
from torchvision.models.squeezenet import Fire

from gatetune.models.errors import ModelError
from gatetune.models.gate import GatedConv2d

__all__ = ["SkipNet", "dense_net", "measure_latency", "time_interleaved"]

# Modules that act on each channel alone and map an all-zero channel to an all-zero channel: they run on
# compact tensors unchanged. (Dropout: eval mode only, which a SkipNet always is.)
_ZERO_PRESERVING = (nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d,
                    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _expand(t: torch.Tensor, idx: torch.Tensor | None, channels: int) -> torch.Tensor:
    """Compact (1, k, H, W) with channel indices idx -> full width (1, channels, H, W), zeros elsewhere."""
    if idx is None:
        return t
    out = t.new_zeros(t.shape[0], channels, *t.shape[2:])
    return out.index_copy_(1, idx, t)


def _folded(g: GatedConv2d) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(W', shift, beta) with, on every channel, fbs: s * BN_noaffine(conv x) + beta ==
    s * (conv(x, W') + shift) + beta (no BN: beta None, W' = W); mse: BN(conv x) == conv(x, W') + shift."""
    conv, bn = g.conv, g.bn
    w = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(w[:, 0, 0, 0])
    if bn is None:
        return w.clone(), bias.clone(), None
    if bn.running_mean is None:
        raise ModelError("channel skipping needs BN running statistics (track_running_stats=True) to fold "
                         "the BN into the conv; use the masked GatedNet for this network")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = (bias - bn.running_mean) * scale
    if g.policy == "fbs":
        return w * scale[:, None, None, None], shift, g.beta.detach().clone()
    if bn.affine:
        scale, shift = scale * bn.weight.detach(), shift * bn.weight.detach() + bn.bias.detach()
    return w * scale[:, None, None, None], shift, None


class _SkipGate(nn.Module):
    """The skipping form of one GatedConv2d (see the module docstring). compact(t, idx) -> (z, idx_out):
    t holds the channels idx of the full input (idx None: all of them), z the channels idx_out of the
    output (idx_out None: all, when k == C_out). forward(x): full width in and out."""

    def __init__(self, g: GatedConv2d):
        super().__init__()
        conv = g.conv
        self.c_in, self.c_out, self.k = conv.in_channels, conv.out_channels, g.k
        self.depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
        if conv.groups != 1 and not self.depthwise:
            raise ModelError(f"channel skipping supports dense (groups=1) and depthwise gated convs, not "
                             f"groups={conv.groups}; use the masked GatedNet for this network")
        if conv.padding_mode != "zeros":
            raise ModelError(f"channel skipping supports zero padding only, not {conv.padding_mode!r}; "
                             "use the masked GatedNet for this network")
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.nonneg, self.scaled = g.nonneg_input, g.policy == "fbs"
        w, shift, beta = _folded(g)
        beta = beta if beta is not None else torch.zeros_like(shift)
        self.register_buffer("weight", w.contiguous())
        self.register_buffer("shift", shift)
        self.register_buffer("beta", beta)
        # [shift | beta] per output channel: one gather picks both. (Not appended to the weight rows: the
        # column gather of a non-contiguous weight is almost twice as slow.)
        self.register_buffer("shift_beta", torch.stack([shift, beta], 1))
        self.register_buffer("p_weight", g.predictor.weight.detach())
        self.register_buffer("p_bias", g.predictor.bias.detach())
        self.register_buffer("zeros_in", torch.zeros(1, self.c_in, dtype=w.dtype, device=w.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, idx = self.compact(x, None)
        return _expand(z, idx, self.c_out)

    def compact(self, t: torch.Tensor, idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Each torch op costs 3-20 us at batch 1 (more with caches cold after a conv), so the op count per
        # gate (9 here on a compact input) matters as much as the MACs.
        # Saliency: the masked path's ops on the same values (zeros where t is compact): the same winners.
        # (sum + div_ is how CPU torch computes mean, bit for bit, but 3x faster than calling mean here)
        pooled = (t if self.nonneg else t.abs()).sum((2, 3)).div_(t.shape[2] * t.shape[3])
        full = pooled if idx is None else self.zeros_in.index_copy(1, idx, pooled)
        s = F.linear(full, self.p_weight, self.p_bias).relu_()
        if self.k == self.c_out:
            out, w, shift, beta = None, self.weight, self.shift, self.beta
        else:
            s, out = s.topk(self.k, dim=1, sorted=False)   # s: the winners' saliencies
            out = out[0]
            w, sb = self.weight.index_select(0, out), self.shift_beta.index_select(0, out)
            shift, beta = sb[:, 0], sb[:, 1]
        if self.depthwise:   # output channel c reads input channel c only
            x = _expand(t, idx, self.c_in)
            x = x if out is None else x.index_select(1, out)
            z = F.conv2d(x, w, shift, self.stride, self.padding, self.dilation, x.shape[1])
        else:
            if idx is None and self.nonneg:   # a full-width ReLU output (after a residual add, a gate whose
                keep = pooled[0].nonzero()[:, 0]   # consumer needs full width): skip its all-zero channels
                if keep.shape[0] < pooled.shape[1]:
                    keep = keep if keep.shape[0] else keep.new_zeros(1)
                    t, idx = t.index_select(1, keep), keep
            if idx is not None:
                w = w.index_select(1, idx)
            if self.scaled and w[0].numel() < t.shape[2] * t.shape[3]:
                # s * (conv(t, w) + shift) + beta, with s folded into the (smaller) weight
                w = w.mul_(s.view(-1, 1, 1, 1)) if w is not self.weight else w * s.view(-1, 1, 1, 1)
                return F.conv2d(t, w, torch.addcmul(beta, s[0], shift), self.stride, self.padding,
                                self.dilation), out
            z = F.conv2d(t, w, shift, self.stride, self.padding, self.dilation)
        if not self.scaled:
            return z, out
        return torch.addcmul(beta.view(1, -1, 1, 1), z, s.view(1, -1, 1, 1)), out   # s * (z + shift) + beta


class _Chain(nn.Sequential):
    """An nn.Sequential that passes compact tensors from child to child; full width in and out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _expand(*_run(self, x, None, x.shape[1]))


def _run(m: nn.Module, t: torch.Tensor, idx: torch.Tensor | None, c: int):
    """Apply module m to t, the channels idx (None: all) of a c-channel tensor; returns (t, idx, c) after m."""
    if isinstance(m, _SkipGate):
        z, out = m.compact(t, idx)
        return z, out, m.c_out
    if isinstance(m, nn.Sequential):
        for child in m:
            t, idx, c = _run(child, t, idx, c)
        return t, idx, c
    if isinstance(m, _ZERO_PRESERVING):
        return m(t), idx, c
    if isinstance(m, BasicBlock):
        return _basic_block(m, t, idx, c)
    if isinstance(m, Fire):
        return _fire(m, t, idx, c)
    y = m(_expand(t, idx, c))   # anything else reads the full-width tensor
    return y, None, y.shape[1]


def _basic_block(b: BasicBlock, t: torch.Tensor, idx: torch.Tensor | None, c: int):
    """torchvision's BasicBlock: relu(bn2(conv2(relu(bn1(conv1 x)))) + identity), compact up to the add."""
    out = (t, idx, c)
    for m in (b.conv1, b.bn1, b.relu, b.conv2, b.bn2):
        out = _run(m, *out)
    out, i, _ = out
    x = _expand(t, idx, c)
    identity = b.downsample(x) if b.downsample is not None else x
    out = out + identity if i is None else identity.index_add(1, i, out)
    return out.relu_(), None, out.shape[1]


def _fire(f: Fire, t: torch.Tensor, idx: torch.Tensor | None, c: int):
    """torchvision's Fire: cat(relu(expand1x1 s), relu(expand3x3 s)), s = relu(squeeze x); compact throughout."""
    s = _run(f.squeeze_activation, *_run(f.squeeze, t, idx, c))
    a, ia, ca = _run(f.expand1x1_activation, *_run(f.expand1x1, *s))
    b, ib, cb = _run(f.expand3x3_activation, *_run(f.expand3x3, *s))
    if ia is None and ib is None:
        return torch.cat([a, b], 1), None, ca + cb
    ia = torch.arange(ca, device=a.device) if ia is None else ia
    ib = torch.arange(cb, device=b.device) if ib is None else ib
    return torch.cat([a, b], 1), torch.cat([ia, ib + ca]), ca + cb


def _convert(m: nn.Module) -> nn.Module:
    """Gated convs -> _SkipGate, nn.Sequential -> _Chain, recursively (in place below m; returns m's replacement)."""
    if isinstance(m, GatedConv2d):
        return _SkipGate(m)
    for name, child in list(m.named_children()):
        setattr(m, name, _convert(child))
    if type(m) is nn.Sequential:
        return _Chain(OrderedDict(m._modules))
    return m


def _shared_copy(net: nn.Module) -> nn.Module:
    """A deep copy of the module tree that shares every parameter and buffer tensor with `net`."""
    memo = {id(t): t for t in [*net.parameters(), *net.buffers()]}
    return copy.deepcopy(net, memo)


class SkipNet(nn.Module):
    """Channel-skipping eval-only copy of a GatedNet; forward(x (N, C, H, W)) -> logits, N batch-1 passes."""

    def __init__(self, net: nn.Module):
        super().__init__()
        gates = [m for m in net.modules() if isinstance(m, GatedConv2d)]
        if not gates:
            raise ModelError("the network has no gated conv: nothing to skip (run it as it is)")
        self.model_name = getattr(net, "model_name", type(net).__name__)
        body = getattr(net, "net", net)   # a GatedNet wraps the plain network
        self.net = _convert(_shared_copy(body))
        self.train(False)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return self.net(x)
        return torch.cat([self.net(x[i:i + 1]) for i in range(x.shape[0])])

    def train(self, mode: bool = True) -> SkipNet:
        if mode:
            raise RuntimeError("a SkipNet is for inference only; train the GatedNet and rebuild the SkipNet")
        return super().train(False)


def _dense_conv(g: GatedConv2d) -> nn.Conv2d:
    """The gate's conv with every channel kept and its BN folded in: fbs with the saliency of a zero
    predictor weight, relu(predictor bias) (the BN's |gamma| at gating time); mse: the affine BN."""
    conv = g.conv
    w, shift, beta = _folded(g)
    if g.policy == "fbs":
        s = F.relu(g.predictor.bias.detach())
        w, shift = w * s[:, None, None, None], s * shift + (beta if beta is not None else 0)
    dense = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        dense.weight.copy_(w)
        dense.bias.copy_(shift)
    return dense


def dense_net(net: nn.Module) -> nn.Module:
    """The dense counterpart of a GatedNet, the latency baseline: the same network with every gated conv
    replaced by a plain conv computing all channels, its BN folded in (see _dense_conv), no predictors;
    every other module shared with `net`. Eval mode. (Folding makes the baseline strict: the conv + BN +
    ReLU network as trained was 6% (mcifarnet) and 14% (resnet20) slower at batch 1, bench/inference.py.)"""
    body = _shared_copy(getattr(net, "net", net))

    def swap(m: nn.Module) -> None:
        for name, child in list(m.named_children()):
            if isinstance(child, GatedConv2d):
                setattr(m, name, _dense_conv(child))
            else:
                swap(child)

    swap(body)
    return body.eval()


def time_interleaved(fns: dict[str, Callable[[torch.Tensor], object]], inputs: Iterable[torch.Tensor],
                     rounds: int = 3, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each fn on each input, the fns interleaved call by call (so machine noise hits
    all alike), `rounds` passes over the inputs after `warmup` untimed ones. Inference mode."""
    inputs = list(inputs)
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for r in range(warmup + rounds):
            for x in inputs:
                for name, fn in fns.items():
                    t = time.perf_counter()
                    fn(x)
                    dt = time.perf_counter() - t
                    if r >= warmup:
                        times[name].append(dt)
    return times


def measure_latency(net: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], rounds: int = 3,
                    threads: int | None = 1) -> dict[str, float]:
    """Batch-1 CPU latency of the channel-skipping path against the dense network (`dense_net`), same
    weights, on each image (a (N, C, H, W) tensor or (1, C, H, W) tensors), interleaved; medians.

    Returns latency_ratio (skip / dense), skip_ms, dense_ms, images, threads. `threads` (torch intra-op
    threads during the measurement, restored after; None: as set) defaults to 1: batch-1 convs this
    small gain little from more threads, and one thread makes the figure comparable across machines.
    """
    images = [x.detach().to("cpu", torch.float32) for x in (images.split(1) if torch.is_tensor(images)
                                                              else images)]
    if not images:
        raise ValueError("measure_latency needs at least one image")
    on_cpu = all(t.device.type == "cpu" for t in [*net.parameters(), *net.buffers()])
    gated = net if on_cpu else copy.deepcopy(net).cpu()   # a GPU net is copied, not moved
    fast, dense = SkipNet(gated), dense_net(gated)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        times = time_interleaved({"skip": fast, "dense": dense}, images, rounds=rounds)
    finally:
        torch.set_num_threads(before)
    skip, dense_s = statistics.median(times["skip"]), statistics.median(times["dense"])
    return {"latency_ratio": skip / dense_s, "skip_ms": 1e3 * skip, "dense_ms": 1e3 * dense_s,
            "images": len(images), "threads": torch.get_num_threads() if not threads else threads}
