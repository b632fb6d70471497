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
}


def check(cfg: DataCfg) -> None:
    """Raise DataError if the data cannot load: a size the dataset does not have, a missing root or a
    wrong layout. Looks at folders and file names only (no md5, no image decoding)."""
    _check_sizes(cfg)
    if cfg.dataset in CIFAR_STATS:
        _check_cifar(cfg.dataset, root_of(cfg))
    elif cfg.dataset == "imagenet":
        _check_imagenet(root_of(cfg))


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


def _check_imagenet(root: str) -> None:
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"imagenet: no '{split}' folder under {root} (data.root); expected {root}/train "
                            f"and {root}/val; {FETCH['imagenet']}", key="data.root")
    classes = {}
    for split in ("train", "val"):
        folder = os.path.join(root, split)
        classes[split] = _class_folders(folder)
        if not classes[split]:
            raise DataError(f"imagenet: {folder} has no class subfolders; expected one subfolder of images "
                            f"per class (ImageFolder layout); {FETCH['imagenet']}", key="data.root")
        empty = [c for c in classes[split] if not _has_image(os.path.join(folder, c))]
        if empty:
            raise DataError(f"imagenet: {len(empty)} class folder(s) under {folder} hold no images "
                            f"({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''}); add images "
                            "(.jpg/.jpeg/.png/...) or remove those folders", key="data.root")
    if classes["train"] != classes["val"]:
        diff = sorted(set(classes["train"]) ^ set(classes["val"]))
        raise DataError(f"imagenet: class folders differ between {root}/train ({len(classes['train'])}) and "
                        f"{root}/val ({len(classes['val'])}), e.g. {', '.join(diff[:3])}; both splits must "
                        "hold the same class folders so the labels agree", key="data.root")


def _class_folders(folder: str) -> list[str]:
    """Class names the way ImageFolder finds them: sorted subfolder names."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir())


def _has_image(folder: str) -> bool:
    """True at the first image file found (recursively, as ImageFolder searches); stops early so a
    check of 1000 ImageNet classes reads a few directory entries each, not all 1.3M."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    subfolders = []
    with os.scandir(folder) as it:
        for e in it:
            if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS):
                return True
            if e.is_dir():
                subfolders.append(e.path)
    return any(_has_image(f) for f in subfolders)
