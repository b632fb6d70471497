"""Evaluating checkpoints: `gatetune eval`, and the latency_ratio of a search's Pareto trials.

    eval_checkpoint("runs/digits/checkpoints/epoch_010.pt")   # top1, top5, density, macs, latency_ratio
    state_latency(cfg, state, data)                            # a search trial's last epoch, in the trial
    pareto_latency("runs/quickstart")                          # <trial>/latency.json for the front's trials left

latency_ratio is measured by models.measure_latency on the deployed inference path (models.SkipNet) over
the dense network with the same weights, at batch 1 on the CPU with one thread. In a search each trial that
trains its full budget measures its last epoch itself and reports it (tuning/search/trainable.py: the worker
has the weights, the data and the inference modules at hand); pareto_latency, after the search, measures
only the front's trials that carry no latency_ratio for their latest checkpoint.
"""
from __future__ import annotations

__all__ = ["eval_checkpoint", "open_checkpoint", "measure_latency", "state_latency", "pareto_latency",
           "LATENCY_IMAGES", "LATENCY_ROUNDS"]

import json
from pathlib import Path

import torch

from gatetune.core import layout
from gatetune.core.dotted import set_dotted
from gatetune.core.errors import CheckpointError, UserError, first_line
from gatetune.core.storage import RunStore
from gatetune.tuning.train import checkpoint as ckpt
from gatetune.tuning import config as C
from gatetune.tuning.data import load, load_cached
from gatetune.tuning.train.loop import build_model, evaluate, pick_device

LATENCY_IMAGES, LATENCY_ROUNDS = 8, 2   # a search's latency_ratio: first 8 validation images, 2 timed rounds


def eval_checkpoint(path: str | Path, overrides: list[str] = (), latency: bool = True) -> dict:
    """Top-1/top-5, density and MACs of a checkpoint on the full validation split, and latency_ratio
    (see `measure_latency`; None for a network with no gated site), unless latency is False.

    overrides (dotted, e.g. data.root=/data/imagenet) change where the data is read from."""
    cfg, net, data = open_checkpoint(path, overrides)
    metrics = evaluate(net, data.val, max(cfg.train.batch_size, 256))
    metrics["images"] = len(data.val)
    if latency:
        metrics.update(measure_latency(net, data))
    return metrics


def open_checkpoint(path, overrides=(), device=None, cached: bool = False):
    """(config, GatedNet with the checkpoint's weights in eval mode, data) of a checkpoint; data is loaded
    on `device` (default: the config's), through data.load_cached when `cached`."""
    state = ckpt.read(path)
    raw = state["config"]
    for text in overrides:
        key, value = C.parse_override(text)
        if not key.startswith("data."):
            raise UserError(f"only data.* keys can be changed for eval, got {key!r}", file="command line", key=key)
        set_dotted(raw, key, value)
    cfg = C.load_dict(raw, default_file=str(path))
    device = torch.device(device) if device is not None else pick_device(cfg)
    data = (load_cached if cached else load)(cfg.data, device, seed=cfg.seed)
    net = _bare_net(cfg, data)
    try:
        net.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not match its model ({str(e).splitlines()[0][:120]})",
                              file=str(path)) from None
    return cfg, net.to(device).eval(), data


def _bare_net(cfg: C.Config, data):
    """cfg's GatedNet built without model.weights, on the CPU: a checkpoint's or training state's weights go in next."""
    return build_model(cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": None})}), data)


def measure_latency(net, data, images: int = 8, rounds: int = 3) -> dict:
    """Batch-1 CPU latency (one thread) of the deployed inference path (models.SkipNet) over the dense
    network with the same weights (models.dense_net), on the first `images` validation images,
    interleaved, medians: latency_ratio = skip / dense, latency_ms (skip), dense_latency_ms. None values,
    and latency_note saying why, when nothing is gated or the network has no skipping path."""
    from gatetune import models
    none = {"latency_ratio": None, "latency_ms": None, "dense_latency_ms": None}
    if not net.gates:
        return {**none, "latency_note": "no gated site: the network runs dense"}
    x = next(iter(data.val.batches(images)))[0][:images]
    try:
        m = models.measure_latency(net, x, rounds=rounds, threads=1)
    except models.ModelError as e:   # a network the skipping path does not support
        return {**none, "latency_note": e.message}
    return {"latency_ratio": m["latency_ratio"], "latency_ms": m["skip_ms"], "dense_latency_ms": m["dense_ms"]}


def state_latency(cfg: C.Config, state: dict, data, images: int = LATENCY_IMAGES,
                  rounds: int = LATENCY_ROUNDS) -> dict:
    """`measure_latency` of a training state (train.fit's on_epoch state) on `data`, the dataset it trained on
    (the images are copied to the CPU): what a search trial reports with its last epoch."""
    net = _bare_net(cfg, data)
    net.load_state_dict(state["model"])
    return measure_latency(net.eval(), data, images, rounds)


def pareto_latency(run_dir: str | Path, images: int = LATENCY_IMAGES, rounds: int = LATENCY_ROUNDS) -> int:
    """For each trial on a Pareto front of a search folder (local or remote) that has no latency_ratio for
    its latest checkpoint yet (neither reported by the trial with its last epoch nor in a latency.json
    naming that checkpoint), measure it on that checkpoint (the one the report's row names) and write it
    to <trial>/latency.json, which the report reads. Returns the number of trials measured. A trial that
    cannot be measured is skipped with one line."""
    import tempfile

    from gatetune import results as R
    store = RunStore(run_dir)
    try:
        df = R.table(run_dir)
    except R.ReportError:
        return 0
    front = df[(df["pareto"] | df["pareto_density"] | df["pareto_seeds"]) & (df["checkpoint"] != "")]
    if "latency_ratio" in front:   # measured already: by the trial (its last report) or by an earlier call
        front = front[front["latency_ratio"].isna()]
    done = 0
    for _, row in front.iterrows():
        trial, checkpoint = row["checkpoint"].split("/", 1)
        try:
            with tempfile.TemporaryDirectory(prefix="gatetune-latency-") as tmp:
                path = store.local_path(row["checkpoint"]) if not store.remote else \
                    store.download(row["checkpoint"], Path(tmp) / checkpoint)
                _, net, data = open_checkpoint(path, (), device="cpu", cached=True)
            m = measure_latency(net, data, images, rounds)
        except Exception as e:   # noqa: BLE001  (a report must not fail for want of a latency)
            print(f"latency_ratio of trial {row['trial_id']} not measured: {type(e).__name__}: "
                  f"{first_line(e, 160)}")
            continue
        if m["latency_ratio"] is None:
            continue
        record = {**m, "checkpoint": checkpoint, "images": images, "threads": 1}
        store.write_text(f"{trial}/{layout.LATENCY}", json.dumps(record) + "\n")
        done += 1
    return done
