"""Cheap checks that a config's data can be loaded on this machine: folders and files, no decoding.

    check(cfg.data)     # DataError (one line, with the config key) before any training or Ray start
"""
from __future__ import annotations

__all__ = ["check", "root_of", "cifar_class", "FETCH"]

import os
from typing import TYPE_CHECKING

from gatetune.tuning.data.base import CIFAR_STATS, NATIVE_SIZE, DataError

if TYPE_CHECKING:
    from gatetune.tuning.config import DataCfg

FETCH = {  # how to get the data; ends every "not found" message
    "cifar10": "download CIFAR-10 (python version, cifar-10-python.tar.gz) and extract it there",
    "cifar100": "download CIFAR-100 (python version, cifar-100-python.tar.gz) and extract it there",
    "imagenet": "put ImageNet's train/ and val/ there, one subfolder per class in each "
                "(val images sorted into class folders too)",
    "folder": "put the images there as train/ and val/, one subfolder of images per class in each",
}


def check(cfg: DataCfg) -> list[str]:
    """Raise DataError if the data cannot load: a size the dataset does not have, a missing root or a
    wrong layout. Looks at folders, file names and sizes only (no md5, no image decoding). Returns the
    notices to show (files left out)."""
    _check_sizes(cfg)
    _check_stats(cfg)
    if cfg.dataset in CIFAR_STATS:
        _check_cifar(cfg.dataset, root_of(cfg))
    elif cfg.dataset in ("imagenet", "folder"):
        from gatetune.tuning.data.scan import scan
        return scan(root_of(cfg), cfg.dataset)[2]
    return []


def _check_stats(cfg: DataCfg) -> None:
    for key in ("mean", "std"):
        v = getattr(cfg, key)
        if v is None:
            continue
        if cfg.dataset not in ("imagenet", "folder"):
            raise DataError(f"{cfg.dataset}: data.{key} applies to imagenet and folder datasets only; remove it",
                            key=f"data.{key}")
        if len(v) != 3:
            raise DataError(f"{cfg.dataset}: data.{key} has {len(v)} value(s), but images are read as RGB; "
                            "give three, one per channel", key=f"data.{key}")
        if key == "std" and min(v) <= 0:
            raise DataError(f"{cfg.dataset}: data.std must be > 0 on every channel, got {v}; change the value",
                            key="data.std")
    if cfg.in_memory is not None and cfg.dataset != "folder":
        raise DataError(f"{cfg.dataset}: data.in_memory applies to folder datasets only; remove it",
                        key="data.in_memory")


def _check_sizes(cfg: DataCfg) -> None:
    name, size = cfg.dataset, cfg.image_size
    native = NATIVE_SIZE.get(name)
    if native is not None and size not in (None, native):
        raise DataError(f"{name}: data.image_size={size}, but {name} images are {native}x{native} pixels; "
                        "remove data.image_size (it applies to imagenet/fake)", key="data.image_size")


def root_of(cfg: DataCfg) -> str:
    """data.root made absolute (relative to the working directory: Ray moves trials elsewhere), checked."""
    name, root = cfg.dataset, cfg.root
    if root is not None:
        root = os.path.abspath(os.path.expanduser(root))
    if root is None:
        raise DataError(f"{name}: data.root is not set; set it to the folder that holds the data and "
                        f"{FETCH[name]}", key="data.root")
    if not os.path.isdir(root):
        raise DataError(f"{name}: data.root {root} does not exist or is not a folder; fix the path, or "
                        f"{FETCH[name]}", key="data.root")
    return root


def cifar_class(name: str):
    import torchvision.datasets as tvd
    return {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]


def _check_cifar(name: str, root: str) -> None:
    cls = cifar_class(name)
    folder = os.path.join(root, cls.base_folder)
    if not os.path.isdir(folder):
        hint = (f"data.root must be the folder that holds it ({os.path.dirname(root)})"
                if os.path.basename(root) == cls.base_folder else FETCH[name])
        raise DataError(f"{name}: no '{cls.base_folder}' under {root} (data.root); {hint}", key="data.root")
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(f"{name}: {folder} lacks {', '.join(missing)} (expected {', '.join(files)}); "
                        f"the folder is incomplete: delete it and {FETCH[name]}", key="data.root")
