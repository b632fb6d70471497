"""`gatetune train` and `gatetune eval`: one fixed config, in-process, no Ray.

A run folder (default runs/<name>) holds config.yaml (the resolved config), metrics.csv (one row per
epoch) and checkpoints/epoch_NNN.pt. Running the same command again resumes after the last good
checkpoint; a folder holding a run of a different config is refused, so nothing written is lost.
train.processes=N trains data-parallel in N processes (one per GPU, or CPU processes; tuning/distributed.py).
"""
from __future__ import annotations

__all__ = ["train_run", "eval_checkpoint", "config_diff", "measure_latency", "pareto_latency"]

from pathlib import Path

import torch
import yaml

from gatetune.tuning import checkpoint as ckpt
from gatetune.tuning import config as C
from gatetune.tuning.errors import ConfigError
from gatetune.tuning.train import build_model, evaluate, fit, pick_device


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def _check_resumable(cfg: C.Config, out: Path) -> dict | None:
    """The checkpoint to resume from in `out` (None: fresh start); refuses a folder of another config."""
    saved = out / "config.yaml"
    if not saved.is_file():
        return None
    old = yaml.safe_load(saved.read_text()) or {}
    # Only the epoch count may change between a run and its continuation.
    diff = [k for k in config_diff(old, C.to_dict(cfg)) if k != "train.epochs"]
    if diff:
        raise ConfigError(f"holds a run of a different config (differs at {', '.join(diff[:3])}); "
                          "use --out NEW_DIR or another name=, or delete the folder", file=str(out))
    return ckpt.RunFolder(out, cfg.train.keep_checkpoints).latest()


def train_run(cfg: C.Config, out: str | Path, progress: bool = True) -> tuple[Path, dict]:
    """Train cfg into run folder `out` (resuming if it holds checkpoints); returns (folder, last metrics).

    The folder is created with the first epoch's checkpoint, so a config that fails while the data or
    the model is built leaves nothing behind."""
    out = Path(out)
    resume = _check_resumable(cfg, out)
    folder = ckpt.RunFolder(out, cfg.train.keep_checkpoints)
    if resume is not None and resume["epoch"] >= cfg.train.epochs:
        return out, resume["history"][-1]
    rows = list((resume or {}).get("history", []))
    started = False

    def on_epoch(metrics: dict, state: dict | None):
        nonlocal rows, started
        if not started:   # first save of this call: the folder (and the config it ran) starts here
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(yaml.safe_dump(C.to_dict(cfg), sort_keys=False))
            started = True
        if state is not None:
            rows = state["history"]
            folder.save(state, rows)
        else:   # diverged: keep the last good checkpoint, record the failing step
            folder.write_metrics([*rows, metrics])

    if resume is not None:
        print(f"resuming {out} after epoch {resume['epoch']}")
    from gatetune.tuning.distributed import fit_distributed, plan
    processes, backend = plan(cfg)   # train.processes > 1: data-parallel, batch_size per process
    if processes > 1:
        threads = cfg.train.threads or max(1, torch.get_num_threads() // processes)
        return out, fit_distributed(cfg, on_epoch, processes, backend, resume=resume, progress=progress,
                                    threads=threads)
    return out, fit(cfg, on_epoch, resume=resume, progress=progress)


def eval_checkpoint(path: str | Path, overrides: list[str] = (), latency: bool = True) -> dict:
    """Top-1/top-5, density and MACs of a checkpoint on the full validation split, and latency_ratio
    (see `measure_latency`; None for a network with no gated site), unless latency is False.

    overrides (dotted, e.g. data.root=/data/imagenet) change where the data is read from."""
    cfg, net, data = _load_checkpoint(path, overrides)
    metrics = evaluate(net, data.val, max(cfg.train.batch_size, 256))
    metrics["images"] = len(data.val)
    if latency:
        metrics.update(measure_latency(net, data))
    return metrics


LATENCY_FILE = "latency.json"   # in a trial folder; results/_collect.py reads it


def measure_latency(net, data, images: int = 8, rounds: int = 3) -> dict:
    """Batch-1 CPU latency (one thread) of the channel-skipping path (models.SkipNet) over the dense
    network with the same weights (models.dense_net: every gated conv computes all its channels, BN folded,
    no predictors), on the first `images` validation images, interleaved, medians:
    latency_ratio = skip / dense, latency_ms (skip), dense_latency_ms. None values, and latency_note saying
    why, when nothing is gated or the skipping path does not support the network."""
    from gatetune import models
    none = {"latency_ratio": None, "latency_ms": None, "dense_latency_ms": None}
    if not net.gates:
        return {**none, "latency_note": "no gated site: the network runs dense"}
    x = next(iter(data.val.batches(images)))[0][:images]
    try:
        m = models.measure_latency(net, x, rounds=rounds, threads=1)
    except models.ModelError as e:   # a network the skipping path does not support
        return {**none, "latency_note": str(e)}
    return {"latency_ratio": m["latency_ratio"], "latency_ms": m["skip_ms"], "dense_latency_ms": m["dense_ms"]}


def pareto_latency(run_dir: str | Path, images: int = 8, rounds: int = 2) -> int:
    """For each trial on a Pareto front of a search folder, measure latency_ratio on its latest checkpoint
    (the one the report's row names) and write it to <trial>/latency.json, which the report reads.
    Returns the number of trials measured. A trial that cannot be measured is skipped with one line."""
    import json

    from gatetune import results as R
    run_dir = Path(run_dir)
    try:
        df = R.table(run_dir)
    except R.ReportError:
        return 0
    front = df[(df["pareto"] | df["pareto_density"]) & (df["checkpoint"] != "")]
    done = 0
    for _, row in front.iterrows():
        trial, checkpoint = row["checkpoint"].split("/", 1)
        try:
            _, net, data = _load_checkpoint(run_dir / row["checkpoint"], (), device="cpu", cached=True)
            m = measure_latency(net, data, images, rounds)
        except Exception as e:   # noqa: BLE001  (a report must not fail for want of a latency)
            print(f"latency_ratio of trial {row['trial_id']} not measured: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:160] if str(e) else ''}")
            continue
        if m["latency_ratio"] is None:
            continue
        record = {**m, "checkpoint": checkpoint, "images": images, "threads": 1}
        (run_dir / trial / LATENCY_FILE).write_text(json.dumps(record) + "\n")
        done += 1
    return done


def _load_checkpoint(path, overrides=(), device=None, cached: bool = False):
    """(config, GatedNet with the checkpoint's weights, eval mode, data) of a checkpoint; data is loaded on
    `device` (default: the config's), through data.load_cached when `cached`."""
    state = ckpt.read(path)
    raw = state["config"]
    for text in overrides:
        key, value = C.parse_override(text)
        if not key.startswith("data."):
            raise ConfigError(f"only data.* keys can be changed for eval, got {key!r}", file="command line", key=key)
        C.set_dotted(raw, key, value)
    cfg = C.load_dict(raw, default_file=str(path))
    from gatetune.tuning.data import load as load_data, load_cached
    device = torch.device(device) if device is not None else pick_device(cfg)
    data = (load_cached if cached else load_data)(C.data_spec(cfg), device, seed=cfg.seed)
    net = build_model(cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": None})}), data)
    try:
        net.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ConfigError(f"checkpoint does not match its model ({str(e).splitlines()[0][:120]})",
                          file=str(path)) from None
    return cfg, net.to(device).eval(), data
