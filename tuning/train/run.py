"""`gatetune train`: one fixed config, in-process, no Ray.

A run folder (default runs/<name>) holds config.yaml (the resolved config), metrics.csv (one row per
epoch) and checkpoints/epoch_NNN.pt (core.layout). Running the same command again resumes after the
last good checkpoint; a folder holding a run of a different config is refused, so nothing written is
lost. train.processes=N trains data-parallel in N processes (one per GPU, or CPU processes). With
search.track in the config, the run is also logged to MLflow / W&B (tuning/train/track.py).
"""
from __future__ import annotations

__all__ = ["train_run"]

from pathlib import Path

import yaml

from gatetune.core import layout
from gatetune.core.dotted import config_diff
from gatetune.core.errors import UserError
from gatetune.core.storage import RunStore
from gatetune.tuning.train import checkpoint as ckpt
from gatetune.tuning.train.track import RunTracker
from gatetune.tuning import config as C


def _check_resumable(cfg: C.Config, out: Path) -> dict | None:
    """The checkpoint to resume from in `out` (None: fresh start); refuses a folder of another config."""
    saved = out / layout.TRAIN_CONFIG
    if not saved.is_file():
        return None
    old = yaml.safe_load(saved.read_text()) or {}
    # Only the epoch count may change between a run and its continuation.
    diff = [k for k in config_diff(old, C.to_dict(cfg)) if k != "train.epochs"]
    if diff:
        raise UserError(f"holds a run of a different config (differs at {', '.join(diff[:3])}); "
                        "use --out NEW_DIR or another name=, or delete the folder", file=str(out))
    return ckpt.RunFolder(out, cfg.train.keep_checkpoints).latest()


def train_run(cfg: C.Config, out: str | Path, progress: bool = True) -> tuple[Path, dict]:
    """Train cfg into run folder `out` (resuming if it holds checkpoints); returns (folder, last metrics).

    The folder is created with the first epoch's checkpoint, so a config that fails while the data or
    the model is built leaves nothing behind."""
    from gatetune.tuning.train.distributed import fit_any
    out = Path(out)
    RunStore(out).check_writable()   # a read-only or unwritable folder fails here, before any training
    resume = _check_resumable(cfg, out)
    folder = ckpt.RunFolder(out, cfg.train.keep_checkpoints)
    if resume is not None and resume["epoch"] >= cfg.train.epochs:
        return out, resume["history"][-1]
    rows = list((resume or {}).get("history", []))
    started = False
    tracker = RunTracker(cfg, out)   # search.track of the config: MLflow / W&B (tuning/train/track.py)

    def on_epoch(metrics: dict, state: dict | None):
        nonlocal rows, started
        if not started:   # first save of this call: the folder (and the config it ran) starts here
            out.mkdir(parents=True, exist_ok=True)
            (out / layout.TRAIN_CONFIG).write_text(yaml.safe_dump(C.to_dict(cfg), sort_keys=False))
            started = True
        try:
            if state is not None:
                rows = state["history"]
                folder.save(state, rows)
            else:   # diverged: keep the last good checkpoint, record the failing step
                folder.write_metrics([*rows, metrics])
        except OSError as e:   # a full disk, a folder made read-only: stop with one line, nothing lost
            kept = f"epoch {rows[-2]['epoch']:g}" if state is not None and len(rows) > 1 else "none yet"
            raise UserError(f"cannot write the epoch-{metrics['epoch']:g} checkpoint ({e.strerror or e}); the last "
                            f"checkpoint ({kept}) is intact: free space or fix the folder, then run the same command "
                            "again to resume", file=str(folder.ckpt_dir)) from None
        tracker.epoch(metrics)

    if resume is not None:
        print(f"resuming {out} after epoch {resume['epoch']}")
    return out, tracker.run(lambda: fit_any(cfg, on_epoch, resume=resume, progress=progress))
