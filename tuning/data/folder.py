"""`data.dataset: folder`: image folders of any origin (CIFAR-10 as JPEGs, Tiny-ImageNet, a lab's own), with
the layout of tuning/data/scan.py.

Small pictures are held in memory: when the images' native side (from a sample of headers) is at most 64
pixels and both splits decoded at data.image_size (default: the native side) take at most 2 GiB, every
image is decoded once into uint8 (N, 3, S, S), kept in the cache folder (core.cache: datasets/) under a
name that holds the folder's fingerprint (every file's path, size and time: a changed folder decodes
again) and served by the in-memory loader with CIFAR's augmentation (pad by S/8, random crop, flip).
Otherwise images stream through a DataLoader with ImageNet's (tuning/data/stream.py), at image_size
(default 224). data.in_memory: true or false overrides the rule. Mean and std are the train split's
(in memory: every pixel; streamed: 256 images spread over the split), unless data.mean / data.std say.
A file that cannot be decoded is left out with a notice naming it.
"""
from __future__ import annotations

__all__ = ["load_folder", "prepare_folder", "decoded", "MAX_SIDE", "MAX_BYTES"]

import concurrent.futures
import glob
import hashlib
import json
import os
import sys
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from gatetune.core.cache import cache_dir
from gatetune.core.errors import first_line
from gatetune.core.storage import write_atomic
from gatetune.tuning.data.base import DEFAULT_SIZE, Data, DataError
from gatetune.tuning.data.check import root_of
from gatetune.tuning.data.memory import from_tensors
from gatetune.tuning.data.scan import Split, native_size, scan
from gatetune.tuning.data.stream import UNREADABLE, streamed

if TYPE_CHECKING:
    from gatetune.tuning.config import DataCfg

MAX_SIDE = 64                 # native side (pixels) up to which a folder is held in memory
MAX_BYTES = 2 * 1024 ** 3     # ... when both splits decoded take at most this
_STATS_SAMPLE = 256           # streamed folders: images read for mean / std
_VERSION = 1                  # of the cache files' content


def _placement(cfg: DataCfg, train: Split, val: Split) -> tuple[bool, int]:
    """(in memory?, image side) for a scanned folder."""
    native = native_size(train)
    if cfg.in_memory is False:
        return False, cfg.image_size or DEFAULT_SIZE["imagenet"]
    size = cfg.image_size or native
    fits = (len(train) + len(val)) * 3 * size * size <= MAX_BYTES
    if cfg.in_memory or (native <= MAX_SIDE and fits):
        return True, size
    return False, cfg.image_size or DEFAULT_SIZE["imagenet"]


def load_folder(cfg: DataCfg, device: torch.device, seed: int) -> Data:
    root = root_of(cfg)
    train, val, _ = scan(root, "folder")
    in_memory, size = _placement(cfg, train, val)
    if not in_memory:
        mean, std = _given_or(cfg, lambda: _sampled_stats(train))
        return streamed(train, val, size, mean, std, cfg=cfg, device=device, seed=seed, name="folder")
    (x, y, stats), (xv, yv, _) = decoded(train, size), decoded(val, size)
    mean, std = _given_or(cfg, lambda: stats)
    return from_tensors("folder", (x.to(device), y.to(device)), (xv.to(device), yv.to(device)), mean, std, seed,
                        pad=max(1, size // 8), flip=True, augment=cfg.augment, num_classes=len(train.classes))


def _given_or(cfg: DataCfg, measured) -> tuple[list[float], list[float]]:
    """data.mean / data.std where given, the measured ones (a call, made only when needed) otherwise."""
    if cfg.mean is not None and cfg.std is not None:
        return cfg.mean, cfg.std
    mean, std = measured()
    return cfg.mean or mean, cfg.std or std


def prepare_folder(cfg: DataCfg) -> None:
    """Decode an in-memory folder into the cache now (the driver, before any trial), so trials read it."""
    train, val, _ = scan(root_of(cfg), "folder")
    in_memory, size = _placement(cfg, train, val)
    if in_memory:
        decoded(train, size)
        decoded(val, size)


def _cache_file(split: Split, size: int) -> tuple[str, str]:
    """(this split's cache file, the glob of every cache file of the same folder)."""
    where = hashlib.blake2b(os.path.abspath(split.folder).encode(), digest_size=6).hexdigest()
    name = f"folder-{where}-{split.fingerprint()}-{size}px-v{_VERSION}.pt"
    return cache_dir("datasets", name), cache_dir("datasets", f"folder-{where}-*.pt")


def decoded(split: Split, size: int) -> tuple[torch.Tensor, torch.Tensor, tuple[list, list]]:
    """(uint8 (N, 3, size, size), int64 labels (N,), (per-channel mean, std in [0, 1])) of every readable
    image of the split, from the cache or decoded now (and cached). Unreadable files are left out, with a
    notice naming the first."""
    path, same_folder = _cache_file(split, size)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, EOFError):   # not cached yet, or a file cut short
        state = None
    if state is None:
        state = _decode_all(split, size)
        try:
            write_atomic(path, lambda f: torch.save(state, f))
            for old in glob.glob(same_folder):   # earlier contents of this folder
                if old != path:
                    os.remove(old)
        except OSError as e:   # a read-only home: decode again next time
            print(f"notice: folder: cannot cache the decoded images in {os.path.dirname(path)} "
                  f"({e.strerror or first_line(e)}); they will be decoded again", file=sys.stderr)
    bad = state["unreadable"]
    if bad:
        print(f"notice: folder: left out {len(bad)} image(s) that cannot be decoded under {split.folder}, e.g. "
              f"{bad[0]}; delete or replace them", file=sys.stderr, flush=True)
    return state["images"], state["labels"], (state["mean"], state["std"])


def _decode(path: str, size: int):
    """uint8 (size, size, 3) of one image (RGB, resized when its size differs), or the error's text."""
    from PIL import Image
    try:
        with Image.open(path) as f:
            img = f.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            return np.asarray(img)
    except UNREADABLE as e:
        return f"{type(e).__name__}: {first_line(e)}"


def _decode_all(split: Split, size: int) -> dict:
    t0 = time.perf_counter()
    n = len(split)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    ok = np.ones(n, dtype=bool)
    unreadable = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        # PIL decodes with the GIL released: threads scale with the cores
        for i, out in enumerate(pool.map(lambda i: _decode(split.path(i), size), range(n), chunksize=256)):
            if isinstance(out, str):
                ok[i] = False
                unreadable.append(f"{os.fsdecode(split.paths[i])} ({out})")
            else:
                images[i] = out
    if not ok.any():
        raise DataError(f"folder: none of the {n} images under {split.folder} could be decoded (e.g. "
                        f"{unreadable[0]}); check the files", key="data.root")
    x = torch.from_numpy(images[ok]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(split.targets[ok].copy())
    print(f"folder: decoded {int(ok.sum())} images of {split.folder} at {size}x{size} in "
          f"{time.perf_counter() - t0:.1f} s (cached for the next run)", file=sys.stderr, flush=True)
    mean, std = _pixel_stats(x)
    return {"images": x, "labels": y, "unreadable": unreadable, "mean": mean, "std": std}


def _pixel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of uint8 images (N, C, H, W), in float64, in chunks."""
    c = x.shape[1]
    s1, s2, count = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for chunk in x.split(4096):
        v = chunk.to(torch.float64).div_(255).transpose(0, 1).reshape(c, -1)
        s1 += v.sum(1)
        s2 += v.square().sum(1)
        count += v.shape[1]
    mean = s1 / count
    std = (s2 / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.clamp_min(1e-3).tolist()


def _sampled_stats(split: Split) -> tuple[list[float], list[float]]:
    """Mean and std of up to 256 images spread over a streamed split, decoded at 64x64 (enough for
    per-channel moments), remembered in the cache folder by the split's fingerprint."""
    path = cache_dir("datasets", f"stats-{split.fingerprint()}.json")
    try:
        with open(path) as f:
            saved = json.load(f)
        return saved["mean"], saved["std"]
    except (OSError, ValueError, KeyError):
        pass
    n = len(split)
    picks = np.linspace(0, n - 1, min(n, _STATS_SAMPLE)).round().astype(int)
    arrays = [a for a in (_decode(split.path(i), 64) for i in picks) if not isinstance(a, str)]
    if not arrays:
        raise DataError(f"folder: none of {len(picks)} images sampled under {split.folder} could be decoded; "
                        "check the files", key="data.root")
    mean, std = _pixel_stats(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))
    try:
        text = json.dumps({"mean": mean, "std": std}).encode()
        write_atomic(path, lambda f: f.write(text))
    except OSError:
        pass
    return mean, std
