"""Epoch checkpoints: written atomically, read with a fallback, pruned to a fixed number.

A checkpoint is one `torch.save`d dict: model and optimizer state, the number of finished epochs, the
torch RNG state, the resolved config and the metrics history. Writing goes to a temporary file that
is renamed over the target (`os.replace` is atomic on POSIX), so a crash mid-write leaves the
previous checkpoint intact. A corrupt file is a CheckpointError naming it, and `read_newest` falls
back to the previous one (a run folder's epoch_NNN.pt files, a trial's checkpoint_NNNNNN folders).
"""
from __future__ import annotations

__all__ = ["save_atomic", "read", "read_newest", "trial_weights", "RunFolder"]

import csv
import hashlib
import io
import os
import tempfile
import warnings
from pathlib import Path

import torch

from gatetune.core import layout
from gatetune.core.errors import CheckpointError
from gatetune.core.storage import RunStore, write_atomic


def save_atomic(state: dict, path: str | os.PathLike, sync: bool = True) -> None:
    """Write `state` to `path` through a temporary file renamed over it. A full disk or a folder that cannot be
    written raises OSError (ENOSPC, EACCES, EROFS) and leaves the previous file as it was. (The state is
    serialised in memory first: torch.save straight into a full disk raises a RuntimeError with no errno.)
    sync=False skips the fsync, for a file that is only a staging copy (a Ray trial's checkpoint folder,
    which Ray copies into the run folder): waiting for the disk there bought no durability."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, lambda f: f.write(buffer.getbuffer()), sync=sync)


def read(path: str | os.PathLike) -> dict:
    """Load a gatetune checkpoint (a file, or a trial's checkpoint folder); CheckpointError if unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / layout.CHECKPOINT_STATE
    if not path.is_file():
        raise CheckpointError("checkpoint not found; give a run folder's checkpoints/epoch_N.pt "
                              "or a search trial's checkpoint_N directory", file=str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated/garbage files
        raise CheckpointError(f"corrupt or unreadable checkpoint ({type(e).__name__}); "
                              "use an earlier epoch's checkpoint", file=str(path)) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError("not a gatetune checkpoint (no model/config); for dense weights use "
                              "model.weights=PATH", file=str(path))
    return state


def trial_weights(run_dir: str, trial_id: str) -> str:
    """A local file holding the newest checkpoint of another trial of the search in `run_dir` (a path or a
    URI: a remote checkpoint is downloaded once per process), for model.weights; CheckpointError if the
    trial has none."""
    store = RunStore(run_dir)
    folder = layout.trial_dirname(trial_id)
    found = [n for n in store.listdir(folder) if layout.CHECKPOINT_DIR.fullmatch(n)]
    if not found:
        raise CheckpointError(f"trial {trial_id} has no checkpoint to start from; it must complete first",
                              file=store.uri(folder))
    rel = f"{folder}/{max(found)}/{layout.CHECKPOINT_STATE}"
    if not store.remote:
        return str(store.local_path(rel))
    local = Path(tempfile.gettempdir(), "gatetune-weights", hashlib.blake2b(store.uri(rel).encode(),
                                                                            digest_size=8).hexdigest() + ".pt")
    if not local.is_file():
        store.download(rel, local.with_suffix(".part"))
        os.replace(local.with_suffix(".part"), local)
    return str(local)


def read_newest(paths: list[Path]) -> dict | None:
    """The first readable checkpoint of `paths` (newest first); each unreadable one is warned about and
    skipped. None when none can be read: the run starts over rather than failing forever."""
    for p in paths:
        try:
            return read(p)
        except CheckpointError as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint")
    return None


class RunFolder:
    """`gatetune train` output: config.yaml, metrics.csv, checkpoints/epoch_NNN.pt (newest `keep`)."""

    def __init__(self, path: str | os.PathLike, keep: int = 2):
        self.path, self.keep = Path(path), keep
        self.ckpt_dir = self.path / layout.CHECKPOINTS
        self.store = RunStore(self.path)

    def checkpoints(self) -> list[Path]:
        if not self.ckpt_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.ckpt_dir.iterdir()
                 if (m := layout.EPOCH_FILE.fullmatch(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> dict | None:
        """Newest readable checkpoint; a corrupt one is reported and skipped."""
        return read_newest(list(reversed(self.checkpoints())))

    def save(self, state: dict, metrics_rows: list[dict]) -> Path:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        target = self.ckpt_dir / layout.epoch_file(state["epoch"])
        save_atomic(state, target)
        self.write_metrics(metrics_rows)
        self.store.prune(layout.CHECKPOINTS, layout.EPOCH_FILE, self.keep)
        return target

    def write_metrics(self, rows: list[dict]) -> None:
        """metrics.csv rewritten whole (atomically) each epoch from the checkpoint's history, so a resumed
        run never duplicates or loses rows."""
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
        self.store.write_text(layout.METRICS, text.getvalue())
