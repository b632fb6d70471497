"""The rank side of data-parallel training (distributed.py starts the ranks): each rank runs train.fit
on its shard with the network in DistributedDataParallel; rank 0 sends every epoch to the caller.

- ShardedLoader: step s of an epoch is batches s*N .. s*N+N-1 of the unsharded (seed, epoch) order and
  rank r trains on batch s*N + r, so a step covers what one process would see in one batch of
  N x batch_size; the tail that does not fill a step is dropped (every rank makes the same steps).
- _Replica rebuilds DDP when a training phase changes which parameters train (DDP fixes that at
  construction, a collective every rank reaches at the same step).
- DistContext.any all-reduces the divergence flag, so every rank stops at the same step.
- rank_placement says where a rank trains (its device and the physical GPU id behind it); worker() trains
  there and sends the same record to the caller first, so what a trial records is what the rank did.
"""
from __future__ import annotations

__all__ = ["ShardedLoader", "FirstBatch", "DistContext", "rank_placement", "worker", "dumps", "loads", "TIMEOUT"]

import dataclasses
import inspect
import io
import itertools
import os
import pickle
import signal
import sys
import traceback
from datetime import timedelta
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from gatetune.tuning import config as C
from gatetune.tuning.data import load as load_data
from gatetune.tuning.train.loop import fit

TIMEOUT = timedelta(minutes=30)   # a collective waits this long (rank 0 may be evaluating ImageNet val)


class ShardedLoader:
    """Rank `rank`'s share of a train Loader (see the module docstring): step s of an epoch is batches
    s*world .. s*world+world-1 of the unsharded order and this rank takes batch s*world + rank. Same
    protocol as data.Loader; num_batches is the number of steps, equal on every rank."""

    def __init__(self, loader, rank: int, world: int):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} not in [0, {world})")
        self.loader, self.rank, self.world = loader, rank, world

    def __len__(self) -> int:
        return len(self.loader) // self.world

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return self.loader.num_batches(batch_size * self.world, drop_last=True)

    def batches(self, batch_size: int, *, epoch: int = 0, shuffle: bool = False, augment: bool = False,
                drop_last: bool = False) -> Iterator:
        steps = self.num_batches(batch_size)
        it = self.loader.batches(batch_size, epoch=epoch, shuffle=shuffle, augment=augment, drop_last=True)
        return (b for i, b in enumerate(itertools.islice(it, steps * self.world)) if i % self.world == self.rank)


class FirstBatch:
    """The first batch of a loader only: the validation split of ranks other than 0, whose metrics are
    discarded (evaluating there would only cost time)."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return min(1, self.loader.num_batches(batch_size, drop_last))

    def batches(self, batch_size: int, **kw) -> Iterator:
        return itertools.islice(self.loader.batches(batch_size, **kw), 1)


class _Recorder:
    """Test probe: records a fingerprint (sum of x, sum of y) of every batch a rank trains on."""

    def __init__(self, loader):
        self.loader, self.log = loader, {}

    def __len__(self) -> int:
        return len(self.loader)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return self.loader.num_batches(batch_size, drop_last)

    def batches(self, batch_size: int, *, epoch: int = 0, **kw) -> Iterator:
        log = self.log.setdefault(epoch, [])
        for x, y in self.loader.batches(batch_size, epoch=epoch, **kw):
            log.append((float(x.double().sum()), int(y.sum()), len(y)))
            yield x, y


def _no_buffer_sync() -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP
    if "forward_sync_buffers" in inspect.signature(DDP).parameters:   # torch >= 2.14
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


_NO_BUFFER_SYNC = _no_buffer_sync()


class _Replica:
    """net(x, **kw) through DistributedDataParallel (kw reach GatedNet.forward: with_gate_loss=True returns
    the gate loss beside the logits, so DDP's search for unused parameters sees the parameters only the
    gate loss reaches, the mse policy's predictors). DDP fixes at construction which parameters it
    averages (those with requires_grad) and whether some may go unused, so when either changes (a
    training phase freezes or unfreezes sites, or sets an mse gate's weight to 0) it is rebuilt; every
    rank sees the change at the same step, as the construction is a collective."""

    def __init__(self, net: nn.Module, device: torch.device):
        self.net, self.device = net, device
        self._ddp, self._key = None, None

    def _signature(self) -> tuple:
        trains = tuple(p.requires_grad for p in self.net.parameters())
        gates = getattr(self.net, "gates", {})
        # an mse gate's predictor reads x.detach(): with weight 0 nothing reaches it
        unused = any(g.policy == "mse" and not g.weight for g in gates.values())
        return trains, unused

    def __call__(self, x: torch.Tensor, **kw):
        key = self._signature()
        if key != self._key:
            if self._ddp is not None:
                self._ddp._remove_autograd_hooks()
            from torch.nn.parallel import DistributedDataParallel as DDP
            cuda = self.device.type == "cuda"
            # no buffer broadcast before each forward: rank 0's BN statistics (the ones saved) are the
            # same either way, and training uses batch statistics; this saves a broadcast per step.
            self._ddp = DDP(self.net, device_ids=[self.device.index] if cuda else None,
                            find_unused_parameters=key[1], **_NO_BUFFER_SYNC)
            self._key = key
        return self._ddp(x, **kw)


@dataclasses.dataclass
class DistContext:
    """Handed to train.fit(dist=...) in each rank."""
    rank: int
    world: int
    device: torch.device
    net: nn.Module | None = None
    """The unwrapped network, once wrap() has seen it."""

    def wrap(self, net: nn.Module) -> Callable:
        """A callable for the training forward, called as `net` is (model(x, with_gate_loss=True) ->
        (logits, gate loss)), gradients averaged across ranks; keep `net` for everything else (evaluate,
        state_dict)."""
        self.net = net
        return _Replica(net, self.device)

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any (one all-reduce)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


# ---------------------------------------------------------------------------------------------
# the rank processes

def dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def loads(blob: bytes):
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux; elsewhere the parent's cleanup must do)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() != parent_pid:   # the parent died before prctl
        os._exit(1)


def _portable(e: BaseException) -> BaseException | None:
    try:
        return pickle.loads(pickle.dumps(e))
    except Exception:
        return None


def rank_placement(rank: int, backend: str) -> dict:
    """Where rank `rank` trains: {"rank", "device": "cuda:<rank>" (nccl) or "cpu" (gloo), "gpu_id"}. gpu_id is the
    physical GPU id cuda:<rank> names on this node: the rank-th entry of CUDA_VISIBLE_DEVICES (what Ray sets to
    a trial's GPU ids), or the rank itself when that is unset and the rank is on CUDA; None when there is no
    such entry. A gloo rank of a trial that holds GPUs records the id it would use, and trains on the CPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [i.strip() for i in visible.split(",") if i.strip()] if visible is not None else None
    cuda = backend == "nccl"
    gpu_id = (ids[rank] if rank < len(ids) else None) if ids is not None else (str(rank) if cuda else None)
    return {"rank": rank, "device": f"cuda:{rank}" if cuda else "cpu", "gpu_id": gpu_id}


def worker(rank: int, world: int, backend: str, init_file: str, cfg: C.Config, resume: bytes | None,
            threads: int | None, progress: bool, probe: bool, parent_pid: int, q, live: bool = False) -> None:
    _die_with_parent(parent_pid)
    try:
        placement = rank_placement(rank, backend)
        q.put(("placement", rank, placement))   # first, before any collective (rank 0 reports no epoch before it)
        device = torch.device(placement["device"])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if threads:
            torch.set_num_threads(threads)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=TIMEOUT)
        data = load_data(cfg.data, device, seed=cfg.seed)
        train = ShardedLoader(data.train, rank, world)
        if probe:
            train = _Recorder(train)
        data = dataclasses.replace(data, train=train, val=data.val if rank == 0 else FirstBatch(data.val))
        ctx = DistContext(rank, world, device)

        def on_epoch(metrics: dict, state: dict | None) -> None:
            if rank != 0:
                return
            if state is not None:   # a finished epoch (state["history"][-1] is this same dict)
                metrics["images_per_s"] *= world
            q.put(("epoch", rank, dumps((metrics, state))))

        def on_progress(info: dict) -> None:   # rank 0's, throughput of the world
            q.put(("progress", rank, {**info, "images_per_s": info["images_per_s"] * world}))

        last = fit(cfg, on_epoch, resume=None if resume is None else loads(resume), device=device, data=data,
                   progress=progress and rank == 0, dist=ctx, on_progress=on_progress if live and rank == 0 else None)
        info = {}
        if probe:
            info = {"batches": train.log, "params": {k: v.detach().cpu().clone()
                                                     for k, v in ctx.net.named_parameters()}}
        q.put(("done", rank, dumps((last if rank == 0 else None, info))))
    except KeyboardInterrupt:   # Ctrl-C reaches every rank; the parent reports it
        pass
    except BaseException as e:
        q.put(("error", rank, (_portable(e), traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
