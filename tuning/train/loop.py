"""The training loop: one gated network, one config, one epoch at a time.

Read top to bottom: build data, model and optimizer; resume from a checkpoint if one is given; for
each epoch train (task loss + gate loss), evaluate on the validation split (top-1/top-5, achieved
density, measured MACs), then hand the metrics and the full state to `on_epoch`, which checkpoints
and reports them (a run folder for `gatetune train`, `tune.report` inside a Ray trial).

Resuming is exact: the data order and augmentation of epoch e derive only from (seed, e), and the
torch RNG state is saved with each checkpoint, so a run killed after epoch 3 and resumed finishes
with the same weights as one that never stopped.

A gate loss that becomes NaN/inf or exceeds train.max_gate_loss stops the run at once with
`diverged: True` in its last metrics (the state of that step is not checkpointed).

Inside an epoch, `on_progress` (when given) hears every few seconds how far the epoch is: its fraction,
the images/s so far and the training seconds left in it (a Ray trial's live view, worker log and gauges);
it never changes the per-epoch metrics.

    python -m gatetune.tuning.cli train search_spaces/digits.yaml train.epochs=2
"""
from __future__ import annotations

__all__ = ["fit", "evaluate", "pick_device", "build_model", "lr_at", "phase_of", "METRICS"]

import math
import os
import socket
import sys
import time
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F

from gatetune import models
from gatetune.tuning import config as C
from gatetune.tuning.data import Data, load as load_data
from gatetune.tuning.train.health import health_metrics

# Every epoch reports these (plus density/<site>, and gate_sites: per-site health as JSON); reports and ASHA
# rely on the names.
METRICS = ("epoch", "top1", "top5", "loss", "gate_loss", "density", "macs", "macs_ratio", "lr",
           "images_per_s", "node", "diverged", "dynamic", "gate_health", "gate_health_detail")
_CHECK_EVERY = 16   # batches between divergence checks (each check syncs the GPU once)


def progress_every() -> float:
    """Seconds between two on_progress calls: GATETUNE_PROGRESS_S, default 2."""
    try:
        return max(0.05, float(os.environ.get("GATETUNE_PROGRESS_S", "2")))
    except ValueError:
        return 2.0


def pick_device(cfg: C.Config, gpu_granted: bool | None = None) -> torch.device:
    """cuda when asked or available; inside Ray only when the trial was granted a GPU (Ray >= 2.50
    no longer hides GPUs from CPU-only trials)."""
    want = cfg.train.device
    has_cuda = torch.cuda.is_available() and (gpu_granted is None or gpu_granted)
    if want == "cuda" or (want == "auto" and has_cuda):
        return torch.device("cuda")
    return torch.device("cpu")


def build_model(cfg: C.Config, data: Data) -> models.GatedNet:
    return models.build(cfg.model.name, num_classes=data.num_classes, in_channels=data.in_channels,
                        input_size=data.input_size, policy=cfg.gating.policy,
                        sites=C.site_specs(cfg), weights=cfg.model.weights)


def _optimizer(cfg: C.Config, net: torch.nn.Module) -> torch.optim.Optimizer:
    """Over every parameter: frozen ones (requires_grad False, no grad) are skipped by the step, and a
    later phase may unfreeze them."""
    o = cfg.train.optimizer
    params = list(net.parameters())
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               nesterov=o.nesterov and o.momentum > 0)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=o.lr, weight_decay=o.weight_decay)


def lr_at(cfg: C.Config, phase: C.Phase, epoch: int) -> float:
    """The learning rate of `epoch`: the phase's rate under train.lr_schedule, which restarts each phase
    (one phase = the whole run without train.phases)."""
    s, e, n = cfg.train.lr_schedule, epoch - phase.start, phase.end - phase.start
    if s.name == "step":
        return phase.lr * s.gamma ** (e // s.decay_epochs)
    if s.name == "cosine":
        return phase.lr * (1 + math.cos(math.pi * e / n)) / 2
    return phase.lr


def phase_of(phases: list[C.Phase], epoch: int) -> C.Phase:
    return next(p for p in phases if p.start <= epoch < p.end)


@torch.inference_mode()
def evaluate(net: models.GatedNet, loader, batch_size: int, amp: bool = False) -> dict:
    """Top-1/top-5 (percent), loss, achieved density (overall and per site), measured MACs, and gating
    health (tuning/train/health.py: dynamic/dead/always channels per site, gate_health), all over these
    eval-mode forwards (one GateRecorder for densities and selection counts)."""
    net.eval()
    correct1 = correct5 = 0
    loss_sum = torch.zeros((), device=next(net.parameters()).device)
    n = 0
    with net.record_gates() as rec, net.count_macs() as m:
        for x, y in loader.batches(batch_size):
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top5 == y[:, None]
            correct1 += int(hit[:, 0].sum())
            correct5 += int(hit.any(dim=1).sum())
            n += len(y)
    health = health_metrics(net, rec.selection_counts())
    sites = rec.densities()
    out = {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": float(loss_sum) / n,
           "density": rec.density(sites), "macs": float(m.macs), "macs_ratio": float(m.ratio)}
    out.update({f"density/{s}": d for s, d in sites.items()})
    return out | health


class _Progress:
    """The notebook's live line: `epoch: 2.17 | gate.loss: 1.7e-05±7.01% | gate: 50.00% | ...`."""

    def __init__(self, enabled: bool, stream=sys.stderr):
        self.enabled, self.stream = enabled, stream
        self.live = enabled and stream.isatty()
        self.last = 0.0

    def update(self, epoch: float, gate_losses: list[float], density: float | None, extra: str, final=False):
        if not self.enabled or (not final and (not self.live or time.time() - self.last < 0.5)):
            return
        self.last = time.time()
        if gate_losses:
            mean = sum(gate_losses) / len(gate_losses)
            std = math.sqrt(sum((g - mean) ** 2 for g in gate_losses) / len(gate_losses))
            gl = f"{mean:.5g}±{100 * std / mean:.2f}%" if mean > 0 else f"{mean:.5g}"
        else:
            gl = "-"
        dens = f"{100 * density:.2f}%" if density is not None else "-"
        line = f"epoch: {epoch:.2f} | gate.loss: {gl} | gate: {dens} | {extra}"
        end = "\n" if final or not self.live else ""
        self.stream.write(("\r\033[K" if self.live else "") + line + end)
        self.stream.flush()


def fit(cfg: C.Config, on_epoch: Callable[[dict, dict], None], *, resume: dict | None = None,
        device: torch.device | None = None, data: Data | None = None, progress: bool = False,
        dist=None, on_progress: Callable[[dict], None] | None = None) -> dict:
    """Train `cfg` to train.epochs (or divergence); returns the last metrics.

    on_epoch(metrics, state) is called after every epoch (and once on divergence, with state None).
    on_progress(info) every progress_every() seconds of training: {"epoch": e + fraction done, "images_per_s":
    this epoch's so far, "epoch_left_s": training seconds left in it, "epoch_s": its training seconds at that
    rate} (dist: this rank's share).
    resume: a checkpoint dict from an earlier call's on_epoch; training continues after its epoch.
    dist: a distributed.DistContext when this is one rank of a data-parallel run (data is its shard).
    """
    device = device or pick_device(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    data = data or load_data(cfg.data, device, seed=cfg.seed)
    net = build_model(cfg, data).to(device)
    amp = cfg.train.amp and device.type == "cuda"
    if amp:
        net = net.to(memory_format=torch.channels_last)
    opt = _optimizer(cfg, net)
    model = net if dist is None else dist.wrap(net)   # the training forward; DDP averages gradients
    phases = C.phases(cfg)
    history: list[dict] = []
    start = 0
    if resume is not None:
        net.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"])
        start, history = resume["epoch"], list(resume.get("history", []))
    bar = _Progress(progress)
    last = history[-1] if history else {}
    node = socket.gethostname()
    bs = cfg.train.batch_size
    every = progress_every()
    for epoch in range(start, cfg.train.epochs):
        phase = phase_of(phases, epoch)
        net.set_trainable(phase.trainable)
        net.set_gate_weights(phase.weights)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, phase, epoch)
        net.train()
        nb = data.train.num_batches(bs, drop_last=True)
        seen, t0, gate_losses = 0, time.perf_counter(), []
        told = t0
        lr = opt.param_groups[0]["lr"]
        # the live line's density: this epoch's training forwards (recorded only for a live line)
        with (net.record_gates() if bar.live else nullcontext()) as rec:
            for i, (x, y) in enumerate(data.train.batches(bs, epoch=epoch, shuffle=True,
                                                           augment=cfg.data.augment, drop_last=True)):
                if amp:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits, gate = model(x, with_gate_loss=True)
                    task = F.cross_entropy(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                (task + gate).backward()
                opt.step()
                seen += len(y)
                if i % _CHECK_EVERY == 0 or i == nb - 1:
                    g, t = float(gate.detach()), float(task.detach())
                    gate_losses.append(g)
                    bad = not (math.isfinite(g) and math.isfinite(t)) or g > cfg.train.max_gate_loss
                    if bad if dist is None else dist.any(bad):   # every rank stops at the same step
                        metrics = {**{k: last.get(k, 0.0) for k in METRICS}, **_nonfinite_safe(last)}
                        metrics.update(epoch=epoch + (i + 1) / nb, gate_loss=g if math.isfinite(g) else -1.0,
                                       diverged=True, node=node, lr=lr)
                        bar.update(metrics["epoch"], gate_losses, None, f"DIVERGED (gate loss {g:.4g})",
                                   final=True)
                        on_epoch(metrics, None)
                        return metrics
                    bar.update(epoch + (i + 1) / nb, gate_losses, rec.density() if rec is not None else None,
                               f"loss: {t:.4f} | tp: {seen / (time.perf_counter() - t0):.0f}/s")
                if on_progress is not None and (now := time.perf_counter()) - told >= every and i < nb - 1:
                    told, rate = now, seen / (now - t0)
                    on_progress({"epoch": epoch + (i + 1) / nb, "images_per_s": rate,
                                 "epoch_left_s": (nb - i - 1) * bs / rate, "epoch_s": nb * bs / rate})
        train_s = time.perf_counter() - t0
        metrics = {"epoch": float(epoch + 1), **evaluate(net, data.val, max(bs, 256), amp)}
        metrics.update(gate_loss=sum(gate_losses) / max(len(gate_losses), 1), lr=lr,
                       images_per_s=seen / train_s, node=node, diverged=False)
        metrics = {k: metrics[k] for k in METRICS} | {k: v for k, v in metrics.items() if k not in METRICS}
        history.append(metrics)
        last = metrics
        bar.update(metrics["epoch"], gate_losses, metrics["density"],
                   f"top1: {metrics['top1']:.2f}% | top5: {metrics['top5']:.2f}% | "
                   f"macs: {100 * metrics['macs_ratio']:.1f}% | tp: {metrics['images_per_s']:.0f}/s", final=True)
        state = {"model": net.state_dict(), "optimizer": opt.state_dict(),
                 "epoch": epoch + 1, "rng": torch.get_rng_state(), "config": C.to_dict(cfg),
                 "history": history}
        on_epoch(metrics, state)
    return last


def _nonfinite_safe(last: dict) -> dict:
    return {k: v for k, v in last.items() if k.startswith("density/")}
