"""Data-parallel training: one run (or Ray trial) on several GPUs, or several CPU processes; and
`fit_any`, the one place that chooses between it and the plain single-process loop.

    fit_distributed(cfg, on_epoch, 2, "nccl")    # cuda:0 and cuda:1 (a trial granted 2 GPUs)
    fit_distributed(cfg, on_epoch, 2, "gloo")    # two CPU processes (tests, CPU-only machines)

The notebook ran each trial on two GPUs (system.num_gpus=2, batch_size_per_gpu=256). Here a run with
train.processes = N (default in a Ray trial: the GPUs it was granted) spawns N ranks (tuning/train/ddp.py:
sharding, the DDP wrapper, the all-reduced divergence flag); train.batch_size is per process, so a step
trains on N x batch_size images (the lr is not scaled for you).

The calling process (the Ray trial, or `gatetune train`) starts the ranks and waits. It alone calls
`on_epoch`, so checkpoints, the run folder and `tune.report` stay in the process that owns them: rank 0
sends each epoch's (metrics, state) to it over a queue, the state of rank 0's unwrapped network, so
resuming and `gatetune eval` work as for one process. When on_epoch raises (ASHA stopped the trial,
Ctrl-C), the ranks are killed. A rank that fails sends its exception to the caller, which kills the
others and raises it (a UserError keeps its type: one line on the command line). Ranks die with their
parent (PR_SET_PDEATHSIG), so a SIGKILLed trial leaves no process holding a GPU. images_per_s is the
throughput of all ranks together.

Cost to know about: sharding skips other ranks' batches after the loader made them; for the in-memory
datasets that is a cheap index/crop on the device, but ImageNet decodes every batch on every rank.
"""
from __future__ import annotations

__all__ = ["fit_any", "fit_distributed", "world", "DistributedError"]

import os
import queue as queue_mod
import signal
import tempfile
import time
from typing import Callable

import torch

from gatetune.core.errors import UserError
from gatetune.tuning import config as C
from gatetune.tuning.train import ddp
from gatetune.tuning.data import check, load, load_cached
from gatetune.tuning.train.loop import fit, pick_device


class DistributedError(RuntimeError):
    """A rank failed with an error that is not a user mistake; the message holds its traceback."""


# ---------------------------------------------------------------------------------------------
# the world: how many processes, which backend

def world(cfg: C.Config, gpus_granted: int | None = None) -> tuple[int, str]:
    """(processes, backend) for cfg. gpus_granted: the GPUs a Ray trial was granted (len(ray.get_gpu_ids()));
    None outside Ray (`gatetune train`: train.processes, default 1, of the visible GPUs).
    backend "nccl" means rank r on cuda:r, "gloo" CPU processes."""
    device = pick_device(cfg, gpu_granted=None if gpus_granted is None else gpus_granted > 0)
    want = cfg.train.processes
    if device.type != "cuda":
        return want or 1, "gloo"
    have = gpus_granted if gpus_granted is not None else torch.cuda.device_count()
    n = want or (max(1, have) if gpus_granted is not None else 1)
    if n > max(1, have):   # one process keeps train.device=cuda's old meaning (any visible GPU)
        fix = (f"set search.resources.gpu: {n}" if gpus_granted is not None else
               "use a machine with more GPUs, or train.device=cpu for gloo CPU processes")
        raise UserError(f"{n} processes need one GPU each, but the "
                          f"{'trial was granted' if gpus_granted is not None else 'machine has'} {have}; "
                          f"lower train.processes or {fix}", key="train.processes")
    return n, "nccl"


def fit_any(cfg: C.Config, on_epoch: Callable[[dict, dict | None], None], *, resume: dict | None = None,
            gpus: int | None = None, threads: int | None = None, progress: bool = False,
            cached: bool = False, on_progress: Callable[[dict], None] | None = None,
            on_placement: Callable[[list[dict]], None] | None = None) -> dict:
    """Train cfg the way `world` says: train.fit in this process, or fit_distributed over N ranks.
    gpus: the GPUs a Ray trial was granted (None outside Ray); threads: the CPU threads this run may use
    in all (split between the ranks); cached: keep the dataset in this process (Ray reuses workers);
    on_progress: train.fit's, called in this process (rank 0's progress, images/s of all ranks);
    on_placement(ranks): called once before the first epoch with one ddp.rank_placement record per rank
    ({"rank", "device", "gpu_id"}; one process: rank 0, the device it trains on)."""
    processes, backend = world(cfg, gpus)
    threads = threads or torch.get_num_threads()
    if processes > 1:   # train.threads is per rank
        return fit_distributed(cfg, on_epoch, processes, backend, resume=resume, progress=progress,
                               threads=cfg.train.threads or max(1, threads // processes), on_progress=on_progress,
                               on_placement=on_placement)
    torch.set_num_threads(cfg.train.threads or threads)
    device = pick_device(cfg, gpu_granted=None if gpus is None else gpus > 0)
    if on_placement is not None:   # torch.device("cuda") is the current device: cuda:0 in a fresh process
        on_placement([ddp.rank_placement(0, "nccl" if device.type == "cuda" else "gloo")])
    data = (load_cached if cached else load)(cfg.data, device, seed=cfg.seed)
    return fit(cfg, on_epoch, resume=resume, device=device, data=data, progress=progress, on_progress=on_progress)


# ---------------------------------------------------------------------------------------------
# the caller's side

def fit_distributed(cfg: C.Config, on_epoch: Callable[[dict, dict | None], None], world_size: int,
                    backend: str = "gloo", *, resume: dict | None = None, progress: bool = False,
                    threads: int | None = None, probe: list | None = None,
                    on_progress: Callable[[dict], None] | None = None,
                    on_placement: Callable[[list[dict]], None] | None = None) -> dict:
    """train.fit on `world_size` processes (backend "nccl": rank r on cuda:r; "gloo": CPU); returns rank
    0's last metrics. on_epoch(metrics, state) is called here, in this process, as train.fit calls it, and so
    is on_progress (rank 0's, its images/s times the world), and on_placement(ranks) once every rank has said
    where it trains (ddp.rank_placement, in rank order; see _supervise).
    threads: torch threads per rank (default torch's). probe (tests): a list that receives one dict per
    rank, {"rank", "batches": {epoch: [(sum x, sum y, n), ...]}, "params": {name: tensor}}."""
    import multiprocessing as mp
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be nccl or gloo, got {backend!r}")
    check(cfg.data)   # user mistakes before any process starts
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    blob = None if resume is None else ddp.dumps(resume)
    with tempfile.TemporaryDirectory(prefix="gatetune-ddp-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")   # a file store: no port to pick, nothing listening
        procs = [ctx.Process(target=ddp.worker, name=f"gatetune-rank{r}",
                             args=(r, world_size, backend, init_file, cfg, blob, threads, progress,
                                   probe is not None, os.getpid(), q, on_progress is not None))
                 for r in range(world_size)]
        try:
            for p in procs:
                p.start()
            last, infos = _supervise(procs, q, on_epoch, on_progress, on_placement)
        finally:
            _stop(procs)
            q.close()
            q.cancel_join_thread()
    if probe is not None:
        probe.extend({"rank": r, **infos[r]} for r in sorted(infos))
    return last


def _supervise(procs, q, on_epoch, on_progress=None, on_placement=None) -> tuple[dict, dict]:
    """Relay rank 0's epochs to on_epoch (and its progress to on_progress) until every rank is done; raise
    the first failure. on_placement hears the ranks' placements once all have come, which is before rank 0's
    first epoch: each rank sends its own before the collectives that epoch waits on (should one still be in a
    queue's buffer then, the first epoch brings the placements that came, rather than waiting)."""
    done: dict[int, dict] = {}
    last: dict | None = None
    placed: dict[int, dict] = {}
    told = on_placement is None

    def tell(complete: bool) -> None:
        nonlocal told
        if not told and (complete or len(placed) == len(procs)):
            told = True
            on_placement([placed[r] for r in sorted(placed)])

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
        if kind == "placement":
            placed[rank] = payload
            tell(False)
        elif kind == "epoch":
            tell(True)
            metrics, state = ddp.loads(payload)
            on_epoch(metrics, state)
        elif kind == "progress":
            if on_progress is not None:
                on_progress(payload)
        elif kind == "done":
            metrics, info = ddp.loads(payload)
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
    for rank, exc, tb in errors:
        if isinstance(exc, UserError):
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
