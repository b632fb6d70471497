"""What every dataset shares: the Loader protocol, the Data bundle, DataError, and the seeded streams
that make an epoch's order and augmentation depend only on (seed, epoch, split)."""
from __future__ import annotations

__all__ = ["DATASETS", "Data", "DataError", "Loader", "stream_seed", "generator", "count_batches", "affine",
           "CIFAR_STATS", "IMAGENET_STATS", "NATIVE_SIZE", "DEFAULT_SIZE"]

import hashlib
import math
from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor

from gatetune.core.errors import UserError

DATASETS = ("digits", "cifar10", "cifar100", "imagenet", "folder", "fake")

# Per-channel mean, std of the training images in [0, 1] (the usual published values).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NATIVE_SIZE = {"digits": 16, "cifar10": 32, "cifar100": 32}
DEFAULT_SIZE = {"imagenet": 224, "fake": 32}


class DataError(UserError):
    """A user mistake about data (missing root, wrong layout, a size the dataset does not have). One
    line: the dataset and path, what was expected, and the fix; `key` is the config key at fault."""


@runtime_checkable
class Loader(Protocol):
    def __len__(self) -> int:
        """Number of samples."""

    def batches(self, batch_size: int, *, epoch: int = 0, shuffle: bool = False, augment: bool = False,
                drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """(x float32 NCHW normalised, y int64), both on the device. Order and augmentation depend only
        on (seed, epoch). `augment` is a no-op on the val split and when the spec says augment: false."""

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """How many batches `batches` yields (for a loader of whole batches over its samples: this one;
        ShardedLoader counts its own)."""
        return count_batches(len(self), batch_size, drop_last)


@dataclass
class Data:
    train: Loader
    val: Loader
    num_classes: int
    in_channels: int
    input_size: int
    """Height = width of x in pixels."""
    name: str


def stream_seed(seed: int, epoch: int, stream: str) -> int:
    """A 63-bit seed for one (seed, epoch, stream): a hash, so nearby seeds give unrelated streams."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(seed: int, epoch: int, stream: str) -> torch.Generator:
    """A CPU generator for one (seed, epoch, stream); CPU so a run replays identically on any device."""
    return torch.Generator().manual_seed(stream_seed(seed, epoch, stream))


def count_batches(n: int, batch_size: int, drop_last: bool) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, but got {batch_size}")
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def affine(mean, std, unit: float, device) -> tuple[Tensor, Tensor]:
    """(scale, offset), each (1, C, 1, 1), so that normalised x = raw x * scale + offset,
    where raw x is in [0, unit] (255 for uint8 images, 1 for float ones)."""
    mean = torch.as_tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    return (1 / (unit * std)).float().to(device), (-mean / std).float().to(device)
