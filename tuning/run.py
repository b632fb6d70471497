"""`gatetune train` and `gatetune eval`: one fixed config, in-process, no Ray.

A run folder (default runs/<name>) holds config.yaml (the resolved config), metrics.csv (one row per
epoch) and checkpoints/epoch_NNN.pt. Running the same command again resumes after the last good
checkpoint; a folder holding a run of a different config is refused, so nothing written is lost.
"""
from __future__ import annotations

__all__ = ["train_run", "eval_checkpoint", "config_diff"]

from pathlib import Path

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
    return out, fit(cfg, on_epoch, resume=resume, progress=progress)


def eval_checkpoint(path: str | Path, overrides: list[str] = ()) -> dict:
    """Top-1/top-5, density and MACs of a checkpoint on the full validation split.

    overrides (dotted, e.g. data.root=/data/imagenet) change where the data is read from."""
    state = ckpt.read(path)
    raw = state["config"]
    for text in overrides:
        key, value = C.parse_override(text)
        if not key.startswith("data."):
            raise ConfigError(f"only data.* keys can be changed for eval, got {key!r}", file="command line", key=key)
        C.set_dotted(raw, key, value)
    cfg = C.load_dict(raw, default_file=str(path))
    from gatetune.tuning.data import load as load_data
    device = pick_device(cfg)
    data = load_data(C.data_spec(cfg), device, seed=cfg.seed)
    net = build_model(cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": None})}), data)
    try:
        net.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ConfigError(f"checkpoint does not match its model ({str(e).splitlines()[0][:120]})",
                          file=str(path)) from None
    net.to(device)
    metrics = evaluate(net, data.val, max(cfg.train.batch_size, 256))
    metrics["images"] = len(data.val)
    return metrics
