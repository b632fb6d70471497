"""The Ray Tune trainable: one trial = the training loop of `tuning/train/loop.py` on one sampled config.

Each epoch reports the metrics (train.METRICS) with a checkpoint (`tune.report(metrics,
checkpoint=...)`); the last epoch of a trial that trains its full budget also reports its latency_ratio
(latency_ms, dense_latency_ms), measured here (train.evaluate.state_latency: the weights, the cached dataset
and the inference modules are at hand in the worker; after the search, pareto_latency measures only the
front's trials that lack one). A trial restarted after its node or worker died gets its latest checkpoint from
`tune.get_checkpoint()` and continues after that epoch, or after a newer one in its folder that Ray's record
lacks (newer_saved: a driver lost between two experiment snapshots, or a node lost between the upload of a
checkpoint and its report); the epochs Ray has no result for are then reported again from that checkpoint's
history (`replayed: true`), not trained again. Imports come from `ray.tune` only (ray.train's
report is Train V2 and fails inside Tune). A trial granted N >= 2 GPUs trains data-parallel on them
(distributed.fit_any decides).

Placement: the first result a trial reports after each (re)start carries `placement` (placement() below: the node,
Ray's GPU ids for the trial, CUDA_VISIBLE_DEVICES, and each rank's device and physical GPU id as the ranks
themselves saw them), so a trial restarted on another node records where it went; the worker log's start line
names the GPU ids.

What a user sees of a trial in the Ray dashboard (docs/design.md, "Watching a search"):
- the Actors page's Repr column: `trial 9aa2fbe5 d=0.50 gate=all` (TrialLabel). Ray reads it once, when the
  worker starts; with reuse_actors a worker that moves on to the next trial says so in its log;
- the worker log (stderr): one line per epoch, `[<trial id>] epoch: 2.00/8 | ...` as the driver prints them,
  one every few seconds inside an epoch (`[<trial id>] epoch: 2.37/8 | 431 img/s | epoch ends in 12 s`),
  and the traceback when the trial fails;
- live gauges through ray.util.metrics, on the node's Prometheus endpoint (tuning/search/live.py), and the
  same in-epoch progress on the driver's live view (live.TrialProgress).
"""
from __future__ import annotations

__all__ = ["trial", "resume_state", "newer_saved", "replays", "label", "placement", "as_result", "gpu_words", "CheckpointWriteError"]

import os
import sys
import tempfile
import traceback
from pathlib import Path

from gatetune.core import layout
from gatetune.core import trials as T
from gatetune.core.errors import UserError, first_line
from gatetune.core.storage import RunStore, is_remote
from gatetune.tuning.train import checkpoint as ckpt
from gatetune.tuning import config as C
from gatetune.tuning.search import live, outage
from gatetune.tuning.search.console import label, progress_line

class TrialLabel:
    """Mixed into Tune's class for the trial function (`trial.__mixins__`): names the worker after its trial
    (Ray shows `_name` as the actor's Repr), and says so in the worker log when reuse_actors hands it the
    next trial."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._name = label(self.trial_id, self.config)

    def reset_config(self, new_config):
        ok = super().reset_config(new_config)
        self._name = label(self.trial_id, new_config)
        for stream in (sys.stdout, sys.stderr):   # Ray's log prefix for the lines that follow
            print(f":actor_name:{self._name}", file=stream, flush=True)
        print(f"[{self.trial_id}] this worker now runs {self._name}", file=sys.stderr, flush=True)
        return ok


def resume_state(checkpoint_dir: str) -> dict | None:
    """The state in a trial's checkpoint folder; if it is corrupt, the newest readable older sibling
    (checkpoint_00000N beside it), else None (the trial starts over rather than failing forever)."""
    here = Path(checkpoint_dir)
    older = sorted((s for s in here.parent.glob("checkpoint_*") if s.name < here.name), reverse=True)
    return ckpt.read_newest([here, *older])


def newer_saved(run_dir: str, trial_id: str, than: int | None) -> tuple[dict | None, int]:
    """(state, top) of the trial's folder in the run folder: the newest readable checkpoint numbered above
    `than` (checkpoint_N, newest first; any when `than` is None; None when there is none) and the highest checkpoint number there (-1
    when none). Ray's record of a trial's newest checkpoint lags the folder when the driver was lost after the
    trial reported but before the next experiment snapshot; restoring from the record would train those epochs
    again. An unreadable folder above the one returned (an upload cut short by the loss; the trial's worker
    that wrote it is gone) is deleted, with a line in the worker log."""
    store = RunStore(run_dir)
    rel = layout.trial_dirname(trial_id)
    numbered = sorted(((n, name) for name in store.listdir(rel)
                       if (n := layout.checkpoint_number(name)) is not None), reverse=True)
    top = numbered[0][0] if numbered else -1
    for n, name in numbered:
        if than is not None and n <= than:
            break
        try:
            if not store.remote:
                return ckpt.read(store.local_path(f"{rel}/{name}")), top
            with tempfile.TemporaryDirectory() as d:
                return ckpt.read(store.download(f"{rel}/{name}", Path(d, name))), top
        except ckpt.CheckpointError as e:
            store.delete(f"{rel}/{name}")
            print(f"[{trial_id}] {name} deleted: {e.message} (an upload cut short); trying the one before it",
                  file=sys.stderr, flush=True)
    return None, top


def replays(state: dict, after: float) -> list[dict]:
    """The history entries of a checkpoint's state for the epochs past `after`, marked `replayed`: what a trial
    reports again, without training, when it continues from a checkpoint newer than Ray's record of it."""
    return [{**entry, "replayed": True} for entry in state.get("history", []) if entry.get("epoch", 0) > after]


def _next_checkpoint_index(top: int) -> None:
    """Number this trial's next checkpoint above every folder it has, `top` (Ray numbers it from its own record,
    and would write a newer epoch over a folder of an older number). Ray's index is the number of the last
    checkpoint written; it adds one before it writes the next."""
    try:
        from ray.train._internal.session import get_session
        storage = get_session().storage
        storage.current_checkpoint_index = max(storage.current_checkpoint_index, top)
    except Exception as e:   # noqa: BLE001  (an internal of Ray's: without it only the numbering suffers)
        print(f"checkpoint numbering not moved past checkpoint_{top:06d} ({type(e).__name__}: {first_line(e)})",
              file=sys.stderr, flush=True)


def placement() -> dict:
    """Where this Ray worker runs: node (hostname), node_id, gpu_ids (ray.get_gpu_ids(), as strings),
    accelerator_ids (the runtime context's GPU ids), cuda_visible_devices (what Ray set for the trial, ""
    when unset) and ranks, [] until fit_any's on_placement fills it (ddp.rank_placement's per rank)."""
    import ray
    context = ray.get_runtime_context()
    return {"node": os.uname().nodename, "node_id": context.get_node_id(),
            "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
            "accelerator_ids": [str(i) for i in context.get_accelerator_ids().get("GPU", [])],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "ranks": []}


def as_result(where: dict) -> dict:
    """A placement as a Tune result field: its lists as tuples. Ray's TBX logger tries a histogram of every
    non-empty list in a result and warns that it cannot; it passes over tuples, which the JSON logger
    (result.json) writes as lists all the same."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in where.items()}


def gpu_words(where: dict) -> str:
    """The start line's words for a placement's GPUs: `, GPU ids 0,1 (CUDA_VISIBLE_DEVICES=0,1)`; "" without."""
    if not where["gpu_ids"]:
        return ""
    return f", GPU ids {','.join(where['gpu_ids'])} (CUDA_VISIBLE_DEVICES={where['cuda_visible_devices']})"


class CheckpointWriteError(RuntimeError):
    """A trial's epoch checkpoint could not be written to the run folder (a full disk, no permission): the
    trial stops; its previous checkpoint is intact and `gatetune resume` continues from it."""


def trial(config: dict, base: dict, run_dir: str = "") -> None:
    """config: the sampled dotted keys (and core.trials.TRIAL_KEYS: a seed replica's `confirms`, the trial whose
    weights it starts from under `started_from`); base: the resolved search config; run_dir: the run folder."""
    from ray import tune

    from gatetune.tuning.train.distributed import fit_any

    context = tune.get_context()
    trial_id = context.get_trial_id()
    params = T.config_params(config)
    try:
        if config.get(T.STARTED_FROM):   # the dense pretraining's weights (search.pretrain)
            params["model.weights"] = ckpt.trial_weights(run_dir, config[T.STARTED_FROM])
        cfg = C.with_params(base, params)
    except UserError as e:
        print(f"[{trial_id}] error: {e}", file=sys.stderr, flush=True)
        raise
    where = placement()
    cpus, gpus = context.get_trial_resources().required_resources.get("CPU", 1), len(where["gpu_ids"])
    print(f"[{trial_id}] start: {label(trial_id, config)} on {where['node']}{gpu_words(where)}", file=sys.stderr, flush=True)
    resume, given = None, None
    if (checkpoint := tune.get_checkpoint()) is not None:
        with checkpoint.as_directory() as d:
            resume = resume_state(d)
        given = layout.checkpoint_number(checkpoint.path)
    again: list[dict] = []
    if run_dir:
        try:
            newer, top = newer_saved(run_dir, trial_id, given)
        except Exception as e:   # noqa: BLE001  (a store that does not answer: Ray's record is still good)
            newer, top = None, -1
            print(f"[{trial_id}] its folder could not be listed ({type(e).__name__}: {first_line(e)}); "
                  "continuing from Ray's record of its newest checkpoint", file=sys.stderr, flush=True)
        done = resume["epoch"] if resume is not None else 0
        if newer is not None and newer["epoch"] > done:
            again = replays(newer, done)
            print(f"[{trial_id}] continues after epoch {newer['epoch']:g}, from a checkpoint newer than Ray's record "
                  f"of it (epoch {done:g}); epochs {done + 1:g}-{newer['epoch']:g} are reported again from it, "
                  "not trained again", file=sys.stderr, flush=True)
            resume = newer
        if top >= 0:
            _next_checkpoint_index(top)
    run = context.get_experiment_name()
    gauges = live.TrialGauges(run, trial_id)
    on_progress = live.TrialProgress(trial_id, cfg.train.epochs, gauges, live.find_board(run))

    unsent = [where]   # the placement, until the first report of this (re)start carries it

    def on_placement(ranks: list[dict]) -> None:
        where["ranks"] = ranks

    def report(metrics: dict, state: dict | None) -> None:
        if state is not None and metrics["epoch"] >= cfg.train.epochs and not T.is_pretrain(config):
            metrics = {**metrics, **_latency(trial_id, cfg, state, gpus)}
        if unsent:   # a copy: `metrics` is also the checkpoint's history entry
            metrics = {**metrics, "placement": as_result(unsent.pop())}
        print(progress_line(trial_id, metrics, cfg.train.epochs), file=sys.stderr, flush=True)
        gauges.set(metrics)
        if state is None:   # diverged (the trial then ends), or an epoch reported again: no checkpoint
            tune.report(metrics)
            return
        try:
            with tempfile.TemporaryDirectory() as d:
                ckpt.save_atomic(state, os.path.join(d, layout.CHECKPOINT_STATE), sync=False)   # Ray copies it
                checkpoint = tune.Checkpoint.from_directory(d)
                if is_remote(run_dir):   # an object store that stops answering is waited for (search/outage.py)
                    outage.report_retrying(trial_id, metrics["epoch"], metrics, checkpoint, cfg.search.storage_timeout_s)
                else:
                    tune.report(metrics, checkpoint=checkpoint)
        except OSError as e:
            line = (f"[{trial_id}] cannot write the epoch-{metrics['epoch']:g} checkpoint into {run_dir or 'the run folder'} "
                    f"({e.strerror or first_line(e)}); the previous checkpoint is intact: free space or fix "
                    "the folder, then `gatetune resume` the search")
            print(line, file=sys.stderr, flush=True)
            raise CheckpointWriteError(line) from None

    try:
        for n, entry in enumerate(again, 1):
            report(entry, resume if n == len(again) else None)
        fit_any(cfg, report, resume=resume, gpus=gpus, threads=max(1, int(cpus)), cached=True, on_progress=on_progress,
                on_placement=on_placement)
    except (CheckpointWriteError, outage.StorageUnreachable):
        raise   # its one line is in the worker log already
    except UserError as e:   # e.g. this node lacks the data: one line, as the command line would print it
        print(f"[{trial_id}] error: {e}", file=sys.stderr, flush=True)
        raise
    except Exception:
        traceback.print_exc(file=sys.stderr)   # into the worker log, beside the trial's error.txt
        sys.stderr.flush()
        raise
    finally:
        gauges.stop()


def _latency(trial_id: str, cfg: C.Config, state: dict, gpus: int) -> dict:
    """latency_ratio, latency_ms, dense_latency_ms of the trial's last epoch for its last report, on the dataset
    fit_any cached in this process; {} when nothing is gated, when the trial trains data-parallel (its data
    lives in the ranks) or when the measurement fails (one line in the worker log): pareto_latency then
    measures it after the search, if the trial is on a front."""
    from gatetune.tuning.data import load_cached
    from gatetune.tuning.train.distributed import world
    from gatetune.tuning.train.evaluate import state_latency
    from gatetune.tuning.train.loop import pick_device
    try:
        if world(cfg, gpus)[0] > 1:
            return {}
        m = state_latency(cfg, state, load_cached(cfg.data, pick_device(cfg, gpu_granted=gpus > 0), seed=cfg.seed))
    except Exception as e:   # noqa: BLE001  (the trial must not fail for want of a latency)
        print(f"[{trial_id}] latency_ratio not measured in the trial ({type(e).__name__}: {first_line(e, 160)})",
              file=sys.stderr, flush=True)
        return {}
    if m["latency_ratio"] is None:
        return {}
    return {k: m[k] for k in ("latency_ratio", "latency_ms", "dense_latency_ms")}


trial.__mixins__ = (TrialLabel,)
