"""Image folders streamed through a DataLoader with worker processes (decoding is per file): ImageNet, and
`folder` datasets too large or too big-pictured to hold in memory. Train: RandomResizedCrop + flip; val:
resize to size * 256/224 and centre crop. Augmentation draws from per-sample seeds, so an epoch replays
exactly whatever the worker count. A file that cannot be decoded is left out of its batch, named once in
a notice line (a night's search does not die on one corrupt JPEG)."""
from __future__ import annotations

__all__ = ["StreamLoader", "streamed", "load_imagenet", "resized_crop_box", "UNREADABLE"]

import math
import os
import sys
from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor

from gatetune.core.errors import first_line
from gatetune.tuning.data.base import (DEFAULT_SIZE, IMAGENET_STATS, Data, Loader, affine, generator,
                                       stream_seed)
from gatetune.tuning.data.check import root_of
from gatetune.tuning.data.scan import Split, scan

if TYPE_CHECKING:
    from gatetune.tuning.config import DataCfg

UNREADABLE = (OSError, ValueError, SyntaxError)   # what PIL raises for a truncated or garbage file


class _Folder(torch.utils.data.Dataset):
    """A split's samples, read by (index, sample_seed) keys; see the module docstring for the transforms,
    whose parameters come from a generator seeded by sample_seed (never the worker's global RNG, which a
    persistent worker would carry across epochs). Returns uint8 (3, size, size) and the label, or zeros
    and -1 - index for a file that cannot be decoded; normalising happens on the device."""

    def __init__(self, split: Split, size: int, augment: bool):
        # paths: bytes in a numpy array rather than a list of (str, int) tuples, which forked workers would
        # copy page by page as they touch refcounts (~40 MB for ImageNet instead)
        self.folder, self.paths, self.targets = split.folder, split.paths, split.targets
        self.size, self.augment = size, augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        import torchvision.transforms.functional as TF
        from PIL import Image
        i, sample_seed = key
        try:
            with Image.open(os.path.join(self.folder, os.fsdecode(self.paths[i]))) as f:
                img = f.convert("RGB")
        except UNREADABLE:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), -1 - i
        if self.augment:
            g = torch.Generator().manual_seed(sample_seed)
            top, left, h, w = resized_crop_box(img.height, img.width, g)
            img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
            if torch.rand(1, generator=g).item() < 0.5:
                img = TF.hflip(img)
        else:
            img = TF.center_crop(TF.resize(img, int(self.size * 256 / 224), antialias=True), self.size)
        return TF.pil_to_tensor(img), int(self.targets[i])


def resized_crop_box(height: int, width: int, g: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop.get_params (same defaults), drawing from `g` instead of the global RNG."""
    area, log_ratio = height * width, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*scale, generator=g).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=g).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, (1,), generator=g).item()
            left = torch.randint(0, width - w + 1, (1,), generator=g).item()
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop of the nearest allowed aspect ratio
    w, h = ((width, round(width / ratio[0])) if in_ratio < ratio[0] else
            (round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height))
    return (height - h) // 2, (width - w) // 2, h, w


class _EpochSampler(torch.utils.data.Sampler):
    """Yields (index, sample_seed) for one epoch; set `epoch`/`shuffle` before iterating. The order
    comes from (seed, epoch, stream); each sample's augmentation seed is drawn by its index."""

    def __init__(self, n: int, seed: int, stream: str):
        self.n, self.seed, self.stream, self.epoch, self.shuffle = n, seed, stream, 0, False

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = generator(self.seed, self.epoch, self.stream)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        g_aug = generator(self.seed, self.epoch, self.stream + "/augment")
        seeds = torch.randint(0, 2**62, (self.n,), generator=g_aug).tolist()
        return ((i, seeds[i]) for i in order.tolist())


class StreamLoader(Loader):
    """A split read by a DataLoader: `workers` persistent processes, pinned memory on cuda. One DataLoader
    per (batch_size, drop_last, augment), created on first use and kept (its workers too)."""

    def __init__(self, split: Split, size: int, mean, std, *, device: torch.device, seed: int, stream: str,
                 workers: int, augment: bool, name: str):
        self.split, self.size, self.device, self.seed, self.stream = split, size, device, seed, stream
        self.workers, self.can_augment, self.name = workers, augment, name
        self.scale, self.offset = affine(mean, std, 255.0, device)
        self._loaders: dict = {}
        self.unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.split)

    def batches(self, batch_size: int, *, epoch: int = 0, shuffle: bool = False, augment: bool = False,
                drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        self.num_batches(batch_size, drop_last)  # raises on a bad batch_size now, not at first next()
        loader = self._loader(batch_size, drop_last, augment and self.can_augment)
        return self._batches(loader, epoch, shuffle)

    def _batches(self, loader: torch.utils.data.DataLoader, epoch: int, shuffle: bool):
        loader.sampler.epoch, loader.sampler.shuffle = epoch, shuffle
        loader.generator.manual_seed(stream_seed(self.seed, epoch, self.stream + "/workers"))
        pin = self.device.type == "cuda"
        for x, y in loader:
            if bool((y < 0).any()):
                x, y = self._drop_unreadable(x, y)
                if not len(y):
                    continue
            x, y = x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)
            yield torch.addcmul(self.offset, x, self.scale), y

    def _drop_unreadable(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        for i in (-1 - y[y < 0]).tolist():
            if i not in self.unreadable:
                self.unreadable.add(i)
                print(f"notice: {self.name}: cannot decode {self.split.path(i)}: {_why(self.split.path(i))}; "
                      f"left out ({len(self.unreadable)} file(s) so far); delete or replace it",
                      file=sys.stderr, flush=True)
        keep = y >= 0
        return x[keep], y[keep]

    def _loader(self, batch_size: int, drop_last: bool, augment: bool) -> torch.utils.data.DataLoader:
        key = (batch_size, drop_last, augment)
        if key not in self._loaders:
            self._loaders[key] = torch.utils.data.DataLoader(
                _Folder(self.split, self.size, augment), batch_size=batch_size,
                sampler=_EpochSampler(len(self), self.seed, self.stream), drop_last=drop_last,
                num_workers=self.workers, persistent_workers=self.workers > 0,
                pin_memory=self.device.type == "cuda", generator=torch.Generator())
        return self._loaders[key]


def _why(path: str) -> str:
    from PIL import Image
    try:
        with Image.open(path) as f:
            f.convert("RGB")
    except UNREADABLE as e:
        return first_line(e)
    return "unreadable"


def streamed(train: Split, val: Split, size: int, mean, std, *, cfg: DataCfg, device: torch.device,
             seed: int, name: str) -> Data:
    """Data of two scanned splits streamed at `size` pixels."""
    kw = dict(device=device, seed=seed, workers=cfg.workers, name=name)
    return Data(StreamLoader(train, size, mean, std, stream="train", augment=cfg.augment, **kw),
                StreamLoader(val, size, mean, std, stream="val", augment=False, **kw),
                num_classes=len(train.classes), in_channels=3, input_size=size, name=name)


def load_imagenet(cfg: DataCfg, device: torch.device, seed: int) -> Data:
    """ImageNet's train/ and val/ (scanned here; decoded per batch) at data.image_size (224), ImageNet's
    statistics unless data.mean / data.std are given."""
    train, val, _ = scan(root_of(cfg), "imagenet")
    mean, std = cfg.mean or IMAGENET_STATS[0], cfg.std or IMAGENET_STATS[1]
    return streamed(train, val, cfg.image_size or DEFAULT_SIZE["imagenet"], mean, std, cfg=cfg, device=device,
                    seed=seed, name="imagenet")
