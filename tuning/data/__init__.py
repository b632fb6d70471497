"""Datasets: a config's `data:` block -> train/val loaders that yield normalised batches on the device.

    cfg = load_config("search_spaces/digits.yaml")     # cfg.data: the `data:` section (config.DataCfg)
    check(cfg.data)                                    # cheap: paths and layout; DataError before any work
    data = load(cfg.data, torch.device("cuda"), seed=0)
    for x, y in data.train.batches(512, epoch=3, shuffle=True, augment=True, drop_last=True): ...

Two kinds of loader, one protocol (`Loader`):
- small datasets (digits, cifar10/100, fake) live whole as one tensor on the device (airbench style):
  a batch is an index slice of a permutation, augmented with batched tensor ops; no per-sample Python.
- imagenet streams its image folders through a DataLoader with worker processes (decoding is per file).
- folder (any image folders: train/ and val/, one subfolder per class) is held in memory, decoded once
  and cached, when its pictures are small (<= 64 px) and fit; otherwise it streams like imagenet.

Exact resume: the order and the augmentation of epoch e derive only from (seed, e, split) through
private torch.Generators, never the global RNG, and each sample's augmentation is drawn by its index,
so it does not depend on the batch size or on the shuffle. A resumed run replays epoch e exactly.
"""
from __future__ import annotations

__all__ = ["DATASETS", "Data", "DataError", "Loader", "check", "load", "load_cached", "prepare", "from_tensors"]

from typing import TYPE_CHECKING

import torch

from gatetune.tuning.data.base import DATASETS, Data, DataError, Loader
from gatetune.tuning.data.check import check
from gatetune.tuning.data.folder import load_folder, prepare_folder
from gatetune.tuning.data.memory import from_tensors, load_cifar, load_digits, load_fake
from gatetune.tuning.data.stream import load_imagenet

if TYPE_CHECKING:
    from gatetune.tuning.config import DataCfg

_LOADERS = {"digits": load_digits, "cifar10": load_cifar, "cifar100": load_cifar, "imagenet": load_imagenet,
            "folder": load_folder, "fake": load_fake}
assert tuple(_LOADERS) == DATASETS


def load(cfg: DataCfg, device: torch.device, seed: int = 0) -> Data:
    """Check `cfg` (a config's `data:` section), then read the dataset: in-memory ones onto `device` now, imagenet lazily.
    `seed` sets the shuffle/augmentation streams only; the data and the digits split never depend on it."""
    check(cfg)
    return _LOADERS[cfg.dataset](cfg, torch.device(device), seed)


def prepare(cfg: DataCfg) -> None:
    """Work a dataset needs once per machine, done before any trial: an in-memory folder decoded into the
    cache (each trial then reads it in well under a second)."""
    if cfg.dataset == "folder":
        prepare_folder(cfg)


_CACHE: dict = {}


def load_cached(cfg: DataCfg, device: torch.device, seed: int = 0) -> Data:
    """`load`, keeping the last dataset in this process: a Ray worker reused across trials, or latency
    measured over many trials' checkpoints, reads it once."""
    key = (repr(cfg), str(device), seed)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = load(cfg, device, seed=seed)
    return _CACHE[key]
