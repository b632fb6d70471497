"""Checks of the machine a config runs on: the weights file, the data root, the GPU, the trackers. Run once per
command (`gatetune train`, `search`, `resume`), never per space value or per trial; a trial on a node
that lacks the data still fails with the data layer's one-line DataError. Settings that would be silently
ignored become notices (printed once the config is valid): train.amp set true for a run that trains on CPU,
and a search whose trials hold GPUs that train.device=cpu leaves unused."""
from __future__ import annotations

__all__ = ["check_environment", "device_notices"]

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
    cfg.add_notices(device_notices(cfg))
    try:
        notices = data.check(cfg.data)
    except data.DataError as e:
        raise e.at(file=file or cfg.source(e.key or "data"), key="data.dataset") from None
    cfg.add_notices(notices)
    check_trackers(cfg.search.track if cfg.search else None, fail)


def device_notices(cfg: Config) -> list[str]:
    """Notices for device settings that do nothing here: train.amp set true (by a file or an override, not
    the default) when the run trains on CPU (`gatetune train` with train.device=cpu or no CUDA GPU; a
    search with train.device=cpu or no GPU per trial), and search trials granted GPUs that train.device=cpu
    keeps them from using."""
    t, s = cfg.train, cfg.search
    granted = [] if s is None else [(k, r.gpu) for k, r in (("search.resources", s.resources),
                                    ("search.pretrain.resources", s.pretrain and s.pretrain.resources)) if r is not None]
    out = []
    if t.device == "cpu" and any(g > 0 for _, g in granted):
        held = " and ".join(f"{k}.gpu is {g:g}" for k, g in granted if g > 0)
        out.append(f"notice: {cfg.source('train.device')}: train.device is cpu, but {held}: trials hold GPUs they do "
                   "not use; set train.device=auto to train on them, or the gpu to 0 to leave them to others")
    src = cfg.source("train.amp", default=None, exact=True)
    if not (t.amp and src):
        return out
    if t.device == "cpu":
        why = "train.device is cpu"
    elif s is not None:
        why = "trials get no GPU (search.resources.gpu is 0)" if all(g == 0 for _, g in granted) else None
    else:
        import torch
        why = None if t.device == "cuda" or torch.cuda.is_available() else "this machine has no CUDA GPU"
    if why:
        out.append(f"notice: {src}: train.amp is true, but {why}: it has no effect on CPU (bf16 autocast and "
                   "channels-last are CUDA only)")
    return out
