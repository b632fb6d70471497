"""Channel-skipping inference: the realised speed of gating at batch 1.

The masked GatedNet computes every output channel and zeroes the losers, so it is slower than the
dense network. `SkipNet(net)` is an eval-only copy of a GatedNet that computes only what the gates keep:
each gated conv first runs its saliency predictor, picks the top-k output channels, and convolves only
those output channels over only the input channels that can be non-zero:

    s = relu(W_p . pool(x) + b_p);  o = topk(s, k);  i = the input channels kept (see below)
    z = conv(x[i], W'[o][:, i]);  fbs: out[o] = s[o] * (z + shift[o]) + beta[o];  mse: out[o] = z + shift[o]

W' and shift fold the eval-mode BN into the conv once, when the SkipNet is built (fbs: W * invstd and
(bias - mean) * invstd, the saliency replacing gamma; mse: the affine BN, gamma * invstd).

Per gate and input shape, one of several variants computing that output runs (models/inference/autotune.py picks the
fastest on this machine, measured in situ on the first forward and cached per machine):
  skip-*   the kept rows x non-zero columns of W' (the saliency folded in), one conv of the kept channels
  dense-*  the full conv over the full-width input, then the winners kept and scaled (no weight copy)
  *-native / *-mkldnn   torch's own conv choice, or oneDNN forced
  *-kernel / *-torch    the predictor, top-k and weight gather done by one compiled C++ call
           (models/inference/kernel.py: CPU float32 convs with groups=1) or by torch ops (any device and dtype,
           depthwise convs, machines without a C++ compiler, SkipNet(net, kernel=False))
At batch 1 a torch op costs 1-3 us and a small conv 10-100 us, so a gate written in torch ops (a dozen
of them) ate most of what skipping saves on resnet20; the kernel makes a gate ~3 us plus its conv.

Which input channels: along a sequential chain (nn.Sequential, a BasicBlock's conv1 -> conv2, a Fire
module's squeeze -> expands -> concat) a gated conv hands on a compact tensor, its k kept channels and their
indices, and the next conv reads just those (no scatter, no gather of the activations); zero-preserving
channelwise modules (ReLU, ReLU6, pooling, Identity, Dropout in eval) run on the compact tensor. A residual
add scatters into the skip tensor (with the ReLU after it, one kernel pass); any other module gets the
full-width tensor. (The torch-op skip variant also skips the all-zero channels of a full-width ReLU
output, found from the pooled vector.) Every registered model runs this way: mcifarnet, digitnet,
vgg16_bn and mobilenet_v1 (depthwise gates read their kept channels only) are chains; resnet20 and
resnet18 are compact inside each BasicBlock; squeezenet_v11 inside each Fire module. A gated conv with
groups other than 1 or depthwise, or padding other than zeros, is refused (ModelError): the masked
GatedNet is then the path to use.

Outputs equal the masked GatedNet's eval outputs at batch 1 up to float rounding (the folded BN; the
kernel accumulates the saliency in double): the same top-k channels are picked, ties included, except at
a near-tie of two saliencies within rounding (as a batch of N > 1 through the masked net can differ
too). The copy shares every tensor with `net` except the folded weights: rebuild it after the weights
change. A batch of N runs as N batch-1 forwards. `dense_net(net)` is the dense counterpart, the latency
baseline; `measure_latency` times both (the same SkipNet path, so `gatetune eval` reports what runs).

    fast = SkipNet(net)                 # net: a GatedNet, in any mode (the copy is eval)
    logits = fast(x)                    # == net.eval()(x[i:i+1]) per sample, up to ~1e-6 relative
    fast.choices()                        # gate -> {input shape: chosen variant}
    measure_latency(net, images)        # {'latency_ratio': skip / dense, 'skip_ms': .., 'dense_ms': .., ...}
"""
from __future__ import annotations

import copy
import statistics
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from gatetune.models.errors import ModelError
from gatetune.models.gate import GatedConv2d
from gatetune.models.inference.kernel import load as load_kernel
from gatetune.models.inference.autotune import choose, time_call
from gatetune.models.inference.skip_gate import SkipGate, expand, folded

__all__ = ["SkipNet", "dense_net", "measure_latency", "time_interleaved"]

# Modules that act on each channel alone and map an all-zero channel to an all-zero channel: they run on
# compact tensors unchanged. (Dropout: eval mode only, which a SkipNet always is.)
_ZERO_PRESERVING = (nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d,
                    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class _Chain(nn.Sequential):
    """An nn.Sequential that passes compact tensors from child to child; full width in and out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return expand(*_run(self, x, None, x.shape[1]))


def _run(m: nn.Module, t: torch.Tensor, idx: torch.Tensor | None, c: int):
    """Apply module m to t, the channels idx (None: all) of a c-channel tensor; returns (t, idx, c) after m."""
    if isinstance(m, SkipGate):
        z, out = m.compact(t, idx)
        return z, out, m.c_out
    if isinstance(m, nn.Sequential):
        for child in m:
            t, idx, c = _run(child, t, idx, c)
        return t, idx, c
    kind = type(m)
    if kind is nn.Identity:   # (the BN a gate replaced) without the module call
        return t, idx, c
    if kind is nn.ReLU:
        return (t.relu_() if m.inplace else t.relu()), idx, c
    if isinstance(m, _ZERO_PRESERVING):
        return m(t), idx, c
    for block, run in _BLOCKS:
        if isinstance(m, block):
            return run(m, t, idx, c)
    y = m(expand(t, idx, c))   # anything else reads the full-width tensor
    return y, None, y.shape[1]


def _basic_block(b: BasicBlock, t: torch.Tensor, idx: torch.Tensor | None, c: int):
    """torchvision's BasicBlock: relu(bn2(conv2(relu(bn1(conv1 x)))) + identity), compact up to the add."""
    out = (t, idx, c)
    for m in (b.conv1, b.bn1, b.relu, b.conv2, b.bn2):
        out = _run(m, *out)
    out, i, _ = out
    x = expand(t, idx, c)
    identity = b.downsample(x) if b.downsample is not None else x
    gate = b.conv2
    if (isinstance(gate, SkipGate) and gate.spec is not None and out.dtype == identity.dtype == torch.float32
            and out.device.type == "cpu" and identity.shape[0] == 1 and out.is_contiguous()
            and identity.is_contiguous() and (i is None or (i.dtype == torch.long and i.is_contiguous()))):
        # relu(identity + out scattered) in one pass (torch's index_add plus relu_: 3 passes, ~6 us here)
        res = torch.empty_like(identity)
        gate.lib.gt_residual_relu(identity.data_ptr(), out.data_ptr(), None if i is None else i.data_ptr(),
                                   out.shape[1], identity.shape[1], identity.shape[2] * identity.shape[3],
                                   res.data_ptr())
        return res, None, res.shape[1]
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


def _convert(m: nn.Module, lib, force: str | None) -> nn.Module:
    """Gated convs -> SkipGate, nn.Sequential -> _Chain, recursively (in place below m; returns m's replacement)."""
    if isinstance(m, GatedConv2d):
        return SkipGate(m, lib, force)
    for name, child in list(m.named_children()):
        setattr(m, name, _convert(child, lib, force))
    if type(m) is nn.Sequential:
        return _Chain(OrderedDict(m._modules))
    return m


def _shared_copy(net: nn.Module) -> nn.Module:
    """A deep copy of the module tree that shares every parameter and buffer tensor with `net`."""
    memo = {id(t): t for t in [*net.parameters(), *net.buffers()]}
    return copy.deepcopy(net, memo)


class _Trial:
    """One in-situ calibration of a SkipNet: gates without a choice run their variants in turn, one per
    forward (gate i uses variant (round + i) mod V, so neighbours differ), and time each call."""

    def __init__(self, gates: list):
        self.round = 0
        self.offset = {id(g): i for i, g in enumerate(gates)}
        self.samples: dict[tuple, dict[str, list[float]]] = {}   # (gate, input key) -> variant -> seconds


# torchvision's blocks that run compact inside: filled by the first SkipNet, so that importing gatetune.models
# does not import torchvision (0.8 s in every process: the driver and each trial's worker)
_BLOCKS: list[tuple[type, Callable]] = []


def _load_blocks() -> None:
    if not _BLOCKS:
        from torchvision.models.resnet import BasicBlock
        from torchvision.models.squeezenet import Fire
        _BLOCKS.extend([(BasicBlock, _basic_block), (Fire, _fire)])


class SkipNet(nn.Module):
    """Channel-skipping eval-only copy of a GatedNet; forward(x (N, C, H, W)) -> logits, N batch-1 passes.

    Each gate has variants computing the same output (skip or dense conv; native or mkldnn conv; compiled
    kernel or torch ops). The first forward at a new input shape (dtype, device, thread count) picks one
    per gate: the choice cached for this machine (models/inference/autotune.py), else the fastest measured in situ,
    over `CALIBRATION_REPS` full forwards per variant with the gates rotating through theirs (tens of ms
    for the small CIFAR nets). `force` restricts every gate to the variants whose name holds each of its
    '-'-separated words ("skip", "dense", "skip-native", "dense-torch-mkldnn", ...; a single match is not
    timed). kernel=False runs every gate in torch ops, as on a machine without a C++ compiler.
    One forward at a time (a lock): gates reuse scratch buffers.
    """

    CALIBRATION_REPS = 5
    CALIBRATION_FLUSH_BYTES = 8 << 20   # written between calibration forwards (evicts L2 and part of L3)

    def __init__(self, net: nn.Module, kernel: bool = True, force: str | None = None):
        super().__init__()
        _load_blocks()
        gates = [m for m in net.modules() if isinstance(m, GatedConv2d)]
        if not gates:
            raise ModelError("the network has no gated conv: nothing to skip (run it as it is)")
        self.model_name = getattr(net, "model_name", type(net).__name__)
        body = getattr(net, "net", net)   # a GatedNet wraps the plain network
        self.net = _convert(_shared_copy(body), load_kernel() if kernel else None, force)
        self._gates = [m for m in self.net.modules() if isinstance(m, SkipGate)]
        self._ready: set[tuple] = set()
        self._lock = threading.Lock()
        self.train(False)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._lock:
            if x.shape[0] == 1:
                return self._single(x)
            return torch.cat([self._single(x[i:i + 1]) for i in range(x.shape[0])])

    def _single(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape, x.dtype, x.device, torch.get_num_threads())
        if key not in self._ready:
            self._calibrate(x)
            self._ready.add(key)
        return self.net(x)

    def _calibrate(self, x: torch.Tensor) -> None:
        """Plan every gate for inputs shaped like x (see the class docstring)."""
        trial = _Trial(self._gates)
        for g in self._gates:
            g.trial = trial
        try:
            rounds = 1 + 4 * (self.CALIBRATION_REPS + 1)   # up to 4 variants, the first call of each a warm-up
            flush = None
            for trial.round in range(rounds):
                self.net(x)
                if not trial.samples:   # every gate had a choice (cached)
                    return
                if flush is None:
                    flush = torch.zeros(self.CALIBRATION_FLUSH_BYTES // 4, device=x.device)
                flush.add_(1.0)   # other work between two inferences: the next one starts with caches cold
        finally:
            for g in self._gates:
                g.trial = None
        for (gate, key), times in trial.samples.items():
            if key in gate.pending:
                warm = {n: v[1:] for n, v in times.items()}
                gate.settle(key, choose(gate.pending[key][0], warm, where="in situ"))

    def choices(self) -> dict[str, dict[str, str]]:
        """Gate module path -> {input signature: chosen variant}, for the shapes run so far."""
        return {name: m.choices for name, m in self.net.named_modules() if isinstance(m, SkipGate)}

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state["_ready"] = set()   # the gates forget their choices when copied
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.Lock()

    def train(self, mode: bool = True) -> SkipNet:
        if mode:
            raise RuntimeError("a SkipNet is for inference only; train the GatedNet and rebuild the SkipNet")
        return super().train(False)


def _dense_conv(g: GatedConv2d) -> nn.Conv2d:
    """The gate's conv with every channel kept and its BN folded in: fbs with the saliency of a zero
    predictor weight, relu(predictor bias) (the BN's |gamma| at gating time); mse: the affine BN."""
    conv = g.conv
    w, shift, beta = folded(g)
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
                     rounds: int = 3, warmup: int = 2, sync: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each fn on each input, the fns interleaved call by call (so machine noise hits
    all alike), `rounds` passes over the inputs after `warmup` untimed ones. Inference mode. sync: a
    torch.cuda.synchronize() before and after each call (CUDA inputs)."""
    inputs = list(inputs)
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for r in range(warmup + rounds):
            for x in inputs:
                for name, fn in fns.items():
                    dt = time_call(partial(fn, x), sync)
                    if r >= warmup:
                        times[name].append(dt)
    return times


def measure_latency(net: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], rounds: int = 3,
                    threads: int | None = 1) -> dict[str, float]:
    """Batch-1 CPU latency of the channel-skipping path against the dense network (`dense_net`), same
    weights, on each image (a (N, C, H, W) tensor or (1, C, H, W) tensors), interleaved; medians.

    The skipping path is SkipNet's, variants chosen per gate as SkipNet chooses them (cached per machine;
    else calibrated during the untimed warm-up round). Returns latency_ratio (skip / dense), skip_ms,
    dense_ms, images, threads. `threads` (torch intra-op
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
