"""Checks of the machine a config runs on: the weights file, the data root, the GPU, the trackers. Run once per
command (`gatetune train`, `search`, `resume`), never per space value or per trial; a trial on a node
that lacks the data still fails with the data layer's one-line DataError."""
from __future__ import annotations

__all__ = ["check_environment"]

from pathlib import Path

from gatetune.core.errors import UserError
from gatetune.tuning.config.schema import Config
from gatetune.tuning.config.track import check_trackers


def check_environment(cfg: Config, file: str | None = None) -> None:
    """UserError (file, key, fix) if the weights file, the dataset or a requested GPU is missing here, or an
    experiment tracker of search.track cannot work from here (config/track.py)."""
    from gatetune.tuning import data

    def fail(key: str, msg: str):
        raise UserError(msg, file=file or cfg.source(key), key=key)

    w = cfg.model.weights
    if w is not None and w != "torchvision":
        if not Path(w).is_file():
            fail("model.weights", f"weights file not found: {w}; give a checkpoint path or `torchvision`")
        from gatetune.models.weights import read_state_file
        try:
            read_state_file(w)
        except UserError as e:
            fail("model.weights", e.message)
    if cfg.train.device == "cuda" and cfg.search is None:
        import torch
        if not torch.cuda.is_available():
            fail("train.device", "no CUDA GPU on this machine; use train.device=auto (or cpu)")
    try:
        notices = data.check(cfg.data)
    except data.DataError as e:
        raise e.at(file=file or cfg.source(e.key or "data"), key="data.dataset") from None
    cfg.add_notices(notices)
    check_trackers(cfg.search.track if cfg.search else None, fail)
