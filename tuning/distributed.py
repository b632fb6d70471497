"""Data-parallel training: one run (or Ray trial) on several GPUs, or several CPU processes.

    fit_distributed(cfg, on_epoch, 2, "nccl")    # cuda:0 and cuda:1 (a trial granted 2 GPUs)
    fit_distributed(cfg, on_epoch, 2, "gloo")    # two CPU processes (tests, CPU-only machines)

The notebook ran each trial on two GPUs (system.num_gpus=2, batch_size_per_gpu=256). Here a run with
train.processes = N (default in a Ray trial: the GPUs it was granted) spawns N processes, rank r on
cuda:r (NCCL) or the CPU (gloo); each runs `train.fit` on its shard of every epoch with the network in
DistributedDataParallel, so gradients are averaged across ranks after every step and the weights stay
identical. train.batch_size is per process: a step trains on N x batch_size images (the lr is not
scaled for you).

Who does what:
- The calling process (the Ray trial, or `gatetune train`) starts the ranks and waits. It alone calls
  `on_epoch`, so checkpoints, the run folder and `tune.report` stay in the process that owns them.
  Rank 0 sends each epoch's (metrics, state) to it as bytes (torch.save) over a queue; the state is
  rank 0's unwrapped network (no `module.` prefixes), so resuming and `gatetune eval` work as for one
  process. When on_epoch raises (ASHA stopped the trial, Ctrl-C), the ranks are killed.
- Sharding (ShardedLoader): every rank draws the same (seed, epoch) order at batch_size; step s is
  batches s*N .. s*N+N-1 of it and rank r trains on batch s*N + r. A step therefore covers the images a
  single process would see in one batch of N x batch_size; the tail that does not fill a whole step is
  dropped, so every rank makes the same number of steps. Resume stays exact (the order depends only on
  (seed, epoch)).
- Validation: rank 0 evaluates the whole validation split; the others evaluate one batch (discarded).
- Divergence: the check every few batches is all-reduced (DistContext.any), so all ranks stop at the
  same step and none waits forever in a collective.
- images_per_s in the metrics is the throughput of all ranks together (N x rank 0's, as every rank
  trains the same number of images in lock-step).

A rank that fails sends its exception to the caller, which kills the others and raises it (user
errors such as a missing data.root keep their type, so the CLI prints its one line). Ranks die with
their parent (PR_SET_PDEATHSIG), so a SIGKILLed trial leaves no process holding a GPU.

Cost to know about: sharding skips other ranks' batches after the loader made them; for the in-memory
datasets (digits, cifar, fake) that is a cheap index/crop on the device, but ImageNet decodes every
batch on every rank until the loader can shard by itself.
"""
from __future__ import annotations

__all__ = ["fit_distributed", "plan", "DistContext", "ShardedLoader", "DistributedError"]

import dataclasses
import inspect
import io
import itertools
import os
import pickle
import queue as queue_mod
import signal
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from gatetune.tuning import config as C
from gatetune.tuning.errors import ConfigError

_TIMEOUT = timedelta(minutes=30)   # a collective waits this long (rank 0 may be evaluating ImageNet val)


class DistributedError(RuntimeError):
    """A rank failed with an error that is not a user mistake; the message holds its traceback."""


# ---------------------------------------------------------------------------------------------
# planning: how many processes, which backend

def plan(cfg: C.Config, gpus_granted: int | None = None) -> tuple[int, str]:
    """(processes, backend) for cfg. gpus_granted: the GPUs a Ray trial was granted (len(ray.get_gpu_ids()));
    None outside Ray (`gatetune train`: train.processes, default 1, of the visible GPUs).
    backend "nccl" means rank r on cuda:r, "gloo" CPU processes."""
    from gatetune.tuning.train import pick_device
    device = pick_device(cfg, gpu_granted=None if gpus_granted is None else gpus_granted > 0)
    want = cfg.train.processes
    if device.type != "cuda":
        return want or 1, "gloo"
    have = gpus_granted if gpus_granted is not None else torch.cuda.device_count()
    n = want or (max(1, have) if gpus_granted is not None else 1)
    if n > max(1, have):   # one process keeps train.device=cuda's old meaning (any visible GPU)
        fix = (f"set search.resources.gpu: {n}" if gpus_granted is not None else
               "use a machine with more GPUs, or train.device=cpu for gloo CPU processes")
        raise ConfigError(f"{n} processes need one GPU each, but the "
                          f"{'trial was granted' if gpus_granted is not None else 'machine has'} {have}; "
                          f"lower train.processes or {fix}", key="train.processes")
    return n, "nccl"


# ---------------------------------------------------------------------------------------------
# what train.fit sees in each rank

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


class _FirstBatch:
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


class _WithGateLoss(nn.Module):
    """What DDP wraps: returns the gate loss beside the logits, so DDP's search for unused parameters
    sees the parameters that only the gate loss reaches (the mse policy's predictors)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x), self.net.gate_loss()


def _no_buffer_sync() -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP
    if "forward_sync_buffers" in inspect.signature(DDP).parameters:   # torch >= 2.14
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


_NO_BUFFER_SYNC = _no_buffer_sync()


class _Replica:
    """net(x) -> logits through DistributedDataParallel. DDP fixes at construction which parameters it
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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = self._signature()
        if key != self._key:
            if self._ddp is not None:
                self._ddp._remove_autograd_hooks()
            from torch.nn.parallel import DistributedDataParallel as DDP
            cuda = self.device.type == "cuda"
            # no buffer broadcast before each forward: rank 0's BN statistics (the ones saved) are the
            # same either way, and training uses batch statistics; this saves a broadcast per step.
            self._ddp = DDP(_WithGateLoss(self.net), device_ids=[self.device.index] if cuda else None,
                            find_unused_parameters=key[1], **_NO_BUFFER_SYNC)
            self._key = key
        return self._ddp(x)[0]


@dataclasses.dataclass
class DistContext:
    """Handed to train.fit(dist=...) in each rank."""
    rank: int
    world: int
    device: torch.device
    net: nn.Module | None = None
    """The unwrapped network, once wrap() has seen it."""

    def wrap(self, net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """A callable for the training forward (gradients averaged across ranks); keep `net` for
        everything else (gate_loss, evaluate, state_dict)."""
        self.net = net
        return _Replica(net, self.device)

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any (one all-reduce)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


# ---------------------------------------------------------------------------------------------
# the rank processes

def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(blob: bytes):
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


def _worker(rank: int, world: int, backend: str, init_file: str, cfg: C.Config, resume: bytes | None,
            threads: int | None, progress: bool, probe: bool, parent_pid: int, q) -> None:
    _die_with_parent(parent_pid)
    try:
        from gatetune.tuning.data import load as load_data
        from gatetune.tuning.train import fit
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
        if threads:
            torch.set_num_threads(threads)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=_TIMEOUT)
        data = load_data(C.data_spec(cfg), device, seed=cfg.seed)
        train = ShardedLoader(data.train, rank, world)
        if probe:
            train = _Recorder(train)
        data = dataclasses.replace(data, train=train, val=data.val if rank == 0 else _FirstBatch(data.val))
        ctx = DistContext(rank, world, device)

        def on_epoch(metrics: dict, state: dict | None) -> None:
            if rank != 0:
                return
            if state is not None:   # a finished epoch (state["history"][-1] is this same dict)
                metrics["images_per_s"] *= world
            q.put(("epoch", rank, _dumps((metrics, state))))

        last = fit(cfg, on_epoch, resume=None if resume is None else _loads(resume), device=device, data=data,
                   progress=progress and rank == 0, dist=ctx)
        info = {}
        if probe:
            info = {"batches": train.log, "params": {k: v.detach().cpu().clone()
                                                     for k, v in ctx.net.named_parameters()}}
        q.put(("done", rank, _dumps((last if rank == 0 else None, info))))
    except KeyboardInterrupt:   # Ctrl-C reaches every rank; the parent reports it
        pass
    except BaseException as e:
        q.put(("error", rank, (_portable(e), traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# the caller's side

def fit_distributed(cfg: C.Config, on_epoch: Callable[[dict, dict | None], None], world_size: int,
                    backend: str = "gloo", *, resume: dict | None = None, progress: bool = False,
                    threads: int | None = None, probe: list | None = None) -> dict:
    """train.fit on `world_size` processes (backend "nccl": rank r on cuda:r; "gloo": CPU); returns rank
    0's last metrics. on_epoch(metrics, state) is called here, in this process, as train.fit calls it.
    threads: torch threads per rank (default torch's). probe (tests): a list that receives one dict per
    rank, {"rank", "batches": {epoch: [(sum x, sum y, n), ...]}, "params": {name: tensor}}."""
    import multiprocessing as mp
    from gatetune.tuning.data import check
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be nccl or gloo, got {backend!r}")
    check(C.data_spec(cfg))   # user mistakes before any process starts
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    blob = None if resume is None else _dumps(resume)
    with tempfile.TemporaryDirectory(prefix="gatetune-ddp-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")   # a file store: no port to pick, nothing listening
        procs = [ctx.Process(target=_worker, name=f"gatetune-rank{r}",
                             args=(r, world_size, backend, init_file, cfg, blob, threads, progress,
                                   probe is not None, os.getpid(), q))
                 for r in range(world_size)]
        try:
            for p in procs:
                p.start()
            last, infos = _supervise(procs, q, on_epoch)
        finally:
            _stop(procs)
            q.close()
            q.cancel_join_thread()
    if probe is not None:
        probe.extend({"rank": r, **infos[r]} for r in sorted(infos))
    return last


def _supervise(procs, q, on_epoch) -> tuple[dict, dict]:
    """Relay rank 0's epochs to on_epoch until every rank is done; raise the first failure."""
    done: dict[int, dict] = {}
    last: dict | None = None
    while len(done) < len(procs):
        try:
            kind, rank, payload = q.get(timeout=0.5)
        except queue_mod.Empty:
            lost = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in done]
            if lost and q.empty():
                r = lost[0]
                code = procs[r].exitcode
                why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                hint = " (out of memory?)" if code == -signal.SIGKILL else ""
                raise DistributedError(f"rank {r} of {len(procs)} ended ({why}) before finishing{hint}")
            continue
        if kind == "epoch":
            metrics, state = _loads(payload)
            on_epoch(metrics, state)
        elif kind == "done":
            metrics, info = _loads(payload)
            done[rank] = info
            if rank == 0:
                last = metrics
        else:
            _raise(procs, q, [(rank, *payload)])
    return last, done


def _raise(procs, q, errors: list) -> None:
    """Gather the other ranks' errors for a moment (a rank's crash makes the others fail in their next
    collective), then raise the most telling: a user mistake, else the first one."""
    deadline = time.time() + 3
    while time.time() < deadline and any(p.is_alive() for p in procs):
        try:
            kind, rank, payload = q.get(timeout=0.2)
        except queue_mod.Empty:
            continue
        if kind == "error":
            errors.append((rank, *payload))
    from gatetune import models
    from gatetune.tuning.data import DataError
    user = (ConfigError, DataError, models.ModelError)
    for rank, exc, tb in errors:
        if isinstance(exc, user):
            raise exc
    failed = {r for r, *_ in errors}
    killed = [r for r, p in enumerate(procs) if r not in failed and p.exitcode is not None and p.exitcode < 0]
    rank, exc, tb = errors[0]
    first = tb.rstrip().splitlines()[-1]
    if killed:   # the others then fail in their next collective: the killed one is the cause
        r, code = killed[0], procs[killed[0]].exitcode
        hint = " (out of memory?)" if code == -signal.SIGKILL else ""
        raise DistributedError(f"rank {r} of {len(procs)} was killed by {signal.Signals(-code).name}{hint}; "
                               f"rank {rank} then failed: {first}")
    raise DistributedError(f"rank {rank} of {len(procs)} failed: {first}\n{tb.rstrip()}")


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.time() + 10
    for p in procs:
        if p.pid is None:
            continue
        p.join(max(0.0, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join()
