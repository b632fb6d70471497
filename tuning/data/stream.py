"""ImageNet-style image folders (train/ and val/, one subfolder per class) read by a DataLoader with
worker processes: decoding JPEGs is per file. Augmentation draws from per-sample seeds, so an epoch
replays exactly whatever the worker count."""
from __future__ import annotations

__all__ = ["load_imagenet", "resized_crop_box"]

import math
import os
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch import Tensor

from gatetune.tuning.data.base import DEFAULT_SIZE, IMAGENET_STATS, Data, affine, count_batches, generator, stream_seed
from gatetune.tuning.data.check import root_of

if TYPE_CHECKING:
    from gatetune.tuning.config import DataCfg


class _Folder(torch.utils.data.Dataset):
    """ImageFolder samples, read by (index, sample_seed) keys. Train: RandomResizedCrop(size) + flip,
    with parameters from a generator seeded by sample_seed (never the worker's global RNG, which a
    persistent worker would carry across epochs). Val: Resize(size*256/224) + CenterCrop(size).
    Returns uint8 (3, size, size); normalising happens on the device."""

    def __init__(self, root: str, paths: np.ndarray, targets: np.ndarray, size: int, augment: bool):
        # paths: bytes relative to root, in numpy arrays rather than a list of (str, int) tuples, which
        # forked workers would copy page by page as they touch refcounts (~40 MB for ImageNet instead)
        self.root, self.paths, self.targets, self.size, self.augment = root, paths, targets, size, augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        import torchvision.transforms.functional as TF
        from torchvision.datasets.folder import default_loader
        i, sample_seed = key
        img = default_loader(os.path.join(self.root, os.fsdecode(self.paths[i])))
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


class _FolderLoader:
    """An ImageFolder split read by a DataLoader: `workers` persistent processes, pinned memory on cuda.
    One DataLoader per (batch_size, drop_last, augment), created on first use and kept (its workers too)."""

    def __init__(self, folder, size: int, mean, std, *, device: torch.device, seed: int, stream: str,
                 workers: int, augment: bool):
        prefix = os.path.join(folder.root, "")  # paths are stored relative to it (join keeps absolute ones)
        rel = (p[len(prefix):] if p.startswith(prefix) else p for p, _ in folder.samples)
        self.root, self.paths = folder.root, np.array([os.fsencode(p) for p in rel])
        self.targets = np.array(folder.targets, dtype=np.int64)
        self.size, self.device, self.seed, self.stream = size, device, seed, stream
        self.workers, self.can_augment = workers, augment
        self.scale, self.offset = affine(mean, std, 255.0, device)
        self._loaders: dict = {}

    def __len__(self) -> int:
        return len(self.paths)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return count_batches(len(self), batch_size, drop_last)

    def batches(self, batch_size: int, *, epoch: int = 0, shuffle: bool = False, augment: bool = False,
                drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        count_batches(len(self), batch_size, drop_last)  # raises on a bad batch_size now, not at first next()
        loader = self._loader(batch_size, drop_last, augment and self.can_augment)
        return self._batches(loader, epoch, shuffle)

    def _batches(self, loader: torch.utils.data.DataLoader, epoch: int, shuffle: bool):
        loader.sampler.epoch, loader.sampler.shuffle = epoch, shuffle
        loader.generator.manual_seed(stream_seed(self.seed, epoch, self.stream + "/workers"))
        pin = self.device.type == "cuda"
        for x, y in loader:
            x, y = x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)
            yield torch.addcmul(self.offset, x, self.scale), y

    def _loader(self, batch_size: int, drop_last: bool, augment: bool) -> torch.utils.data.DataLoader:
        key = (batch_size, drop_last, augment)
        if key not in self._loaders:
            self._loaders[key] = torch.utils.data.DataLoader(
                _Folder(self.root, self.paths, self.targets, self.size, augment), batch_size=batch_size,
                sampler=_EpochSampler(len(self), self.seed, self.stream), drop_last=drop_last,
                num_workers=self.workers, persistent_workers=self.workers > 0,
                pin_memory=self.device.type == "cuda", generator=torch.Generator())
        return self._loaders[key]


def load_imagenet(cfg: DataCfg, device: torch.device, seed: int) -> Data:
    """ImageFolder on root/train and root/val (scanning the folders happens here; decoding per batch)."""
    from torchvision.datasets import ImageFolder
    size = cfg.image_size or DEFAULT_SIZE["imagenet"]
    train, val = (ImageFolder(os.path.join(root_of(cfg), s)) for s in ("train", "val"))
    kw = dict(device=device, seed=seed, workers=cfg.workers)
    return Data(_FolderLoader(train, size, *IMAGENET_STATS, stream="train", augment=cfg.augment, **kw),
                _FolderLoader(val, size, *IMAGENET_STATS, stream="val", augment=False, **kw),
                num_classes=len(train.classes), in_channels=3, input_size=size, name="imagenet")
