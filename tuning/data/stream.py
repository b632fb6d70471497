"""Image folders streamed through a DataLoader with worker processes (decoding is per file): ImageNet, and
`folder` datasets too large or too big-pictured to hold in memory. Train: RandomResizedCrop + flip; val:
resize to size * 256/224 and centre crop. Augmentation draws from per-sample seeds, so an epoch replays
exactly whatever the worker count. A file that cannot be decoded is left out of its batch, named once in
a notice line (a night's search does not die on one corrupt JPEG).

Per file, a worker reads the header, draws the box, then decodes and resizes it (tuning/data/decode.py):
libjpeg-turbo into a tensor and torch's antialiased uint8 resize, which gives PIL's bilinear pixels
(torchvision's transforms on PIL images) to 0.002 levels on average. Workers send uint8 HWC (the decoder's
and the resize's own layout: no transposition there); the device converts to float32 NCHW, transposing in
the same pass, and normalises in place. Measured on one core, ImageNet-sized JPEGs (bench/folder_pipeline.py:
upscaled CIFAR-10, ~415x347), per image:
- decode: PIL 0.47 ms, torchvision.io.decode_jpeg 0.33 ms: taken (PIL stays for other formats and CMYK);
- crop + resize to 224: PIL crop then resize 0.64 ms, one PIL resize with a box 0.59 ms, torch's uint8
  antialiased interpolate on channels-last 0.17 ms: taken;
- PIL's `draft` (libjpeg's DCT scaling, decoding at 1/2-1/8): only when the box stays at least twice the
  output once scaled. A 500x375 picture's crop is at most 375 px tall, so it never applies at 224 there;
  on photos over ~900 px a side it saves the inverse DCT and colour conversion, not the entropy decoding
  (a smooth 3000x2000 JPEG decodes 2.2x faster at 1/2, 4.9x at 1/4; a detailed 3 MB one 1.8x at 1/2).
  On detailed pictures a box 1-1.5x the output once scaled came out 3.7 levels off on average, 2-3x 1.0
  (hence the factor two);
- the workers' batch to NCHW: stacking channels-last crops 0.17 ms, HWC ones 0.01 ms (the device's float
  conversion transposes for free); normalising a batch on the CPU: the mixed-dtype addcmul used before
  0.6-1.4 ms/image, float conversion then in-place multiply and add 0.3-0.4 (most of it the page faults
  of the fresh float batch).
Already so and kept: uint8 out of the workers (no ToTensor / Normalize there: a quarter of the bytes through
shared memory and to the GPU), one round trip per batch (the DataLoader hands a worker a whole batch's
keys; a batch sampler would change nothing), batches in shared memory (the DataLoader's collate in a
worker) and pinned on cuda. On a CPU device the conversion and the normalisation run in the consuming
process, which has no core of its own when there are as many workers as cores; glibc's malloc mmapped each
fresh float batch and faulted it in again (heap_for_large_batches keeps it in the heap instead). Three runs
of bench/folder_pipeline.py (2 shared cores, batches on the CPU): 2.18-2.54x torchvision's images/s per
worker at 1 worker and 1.88-2.17x at 2, the consuming process's CPU 0.46-0.63 ms per image against
torchvision's 0.33-0.36; the same run without heap_for_large_batches: 2.26x and 1.57x, 0.88-0.96 ms. On a
GPU the conversion runs there.
"""
from __future__ import annotations

__all__ = ["StreamLoader", "streamed", "load_imagenet", "resized_crop_box", "centre_crop", "UNREADABLE"]

import ctypes
import ctypes.util
import functools
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
from gatetune.tuning.data.decode import UNREADABLE, read_box
from gatetune.tuning.data.scan import Split, scan

if TYPE_CHECKING:
    from gatetune.tuning.config import DataCfg


class _Folder(torch.utils.data.Dataset):
    """A split's samples, read by (index, sample_seed) keys; see the module docstring for the transforms,
    whose parameters come from a generator seeded by sample_seed (never the worker's global RNG, which a
    persistent worker would carry across epochs). Returns uint8 (size, size, 3) and the label, or zeros
    and -1 - index for a file that cannot be decoded; the batch is laid out as NCHW and normalised on the
    device (see StreamLoader)."""

    def __init__(self, split: Split, size: int, augment: bool):
        # paths: bytes in a numpy array rather than a list of (str, int) tuples, which forked workers would
        # copy page by page as they touch refcounts (~40 MB for ImageNet instead)
        self.folder, self.paths, self.targets = split.folder, split.paths, split.targets
        self.size, self.augment = size, augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        i, sample_seed = key
        path = os.path.join(self.folder, os.fsdecode(self.paths[i]))
        try:
            if self.augment:
                g = torch.Generator().manual_seed(sample_seed)
                x = read_box(path, lambda h, w: (resized_crop_box(h, w, g), (self.size, self.size)))
                if torch.rand(1, generator=g).item() < 0.5:
                    x = x.flip(-1)
            else:
                x = centre_crop(read_box(path, self._val_plan), self.size)
        except UNREADABLE:
            return torch.zeros(self.size, self.size, 3, dtype=torch.uint8), -1 - i
        return x.permute(1, 2, 0), int(self.targets[i])   # HWC: the decoder's and the resize's own layout

    def _val_plan(self, height: int, width: int):
        """torchvision's Resize(size * 256 / 224): the whole picture, its shorter side to that length."""
        short, long = sorted((height, width))
        side = int(self.size * 256 / 224)
        other = int(side * long / short)
        return (0, 0, height, width), ((side, other) if height <= width else (other, side))


def centre_crop(x: Tensor, size: int) -> Tensor:
    """torchvision's CenterCrop(size) of a (C, H, W) tensor at least size x size (a view)."""
    top, left = int(round((x.shape[1] - size) / 2.0)), int(round((x.shape[2] - size) / 2.0))
    return x[:, top:top + size, left:left + size]


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
        if device.type == "cpu":
            heap_for_large_batches()
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
            yield self._normalised(x), y

    def _normalised(self, x: Tensor) -> Tensor:
        """uint8 NHWC -> float32 NCHW (contiguous), x * scale + offset: the transposition rides on the float
        conversion, then an in-place multiply and add (a mixed-dtype addcmul ran 2-3x slower on the CPU)."""
        out = torch.empty((x.shape[0], x.shape[3], x.shape[1], x.shape[2]), dtype=torch.float32, device=x.device)
        return out.copy_(x.permute(0, 3, 1, 2)).mul_(self.scale).add_(self.offset)

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


HEAP_BLOCKS = 1 << 30   # glibc's mmap and trim thresholds set by heap_for_large_batches


@functools.cache
def heap_for_large_batches() -> bool:
    """Lets glibc's malloc serve blocks up to HEAP_BLOCKS from its heap and keep them when freed (mallopt
    M_MMAP_THRESHOLD, M_TRIM_THRESHOLD), once per process; False where there is no glibc. By default a block
    over 32 MB (a float batch of 64 crops at 224 px is 38.5 MB, its activations more) is mmapped fresh at
    each allocation and unmapped when freed, so every batch page-faults its memory in again: converting a
    uint8 batch to normalised float took 0.53 ms/image that way and 0.16 once the heap keeps the block
    (bench/folder_pipeline.py's consuming-process CPU time). What tcmalloc or jemalloc preloaded (PyTorch's
    CPU tuning advice) also give, without either; the cost is freed memory up to HEAP_BLOCKS kept by the
    process instead of returned at once."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_BLOCKS)) and bool(mallopt(M_TRIM_THRESHOLD, HEAP_BLOCKS))


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
