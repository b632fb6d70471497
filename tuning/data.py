"""Datasets: a config's `data:` block -> train/val loaders that yield normalised batches on the device.

    spec = DataSpec("cifar10", root="/data")     # what the config asks for
    check(spec)                                  # cheap: names, paths, layout; DataError before any work
    data = load(spec, torch.device("cuda"), seed=0)
    for x, y in data.train.batches(512, epoch=3, shuffle=True, augment=True, drop_last=True): ...

Two kinds of loader, one protocol (`Loader`):
- small datasets (digits, cifar10/100, fake) live whole as one tensor on the device (airbench style):
  a batch is an index slice of a permutation, augmented with batched tensor ops; no per-sample Python.
- imagenet reads an ImageFolder through a DataLoader with worker processes (decoding JPEGs is per-file).

Exact resume: the order and the augmentation of epoch e derive only from (seed, e, split) through
private torch.Generators, never the global RNG, and each sample's augmentation is drawn by its index,
so it does not depend on the batch size or on the shuffle. A resumed run replays epoch e exactly.
"""
from __future__ import annotations

__all__ = ["DATASETS", "Data", "DataError", "DataSpec", "Loader", "check", "load"]

import difflib
import hashlib
import math
import os
from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DATASETS = ("digits", "cifar10", "cifar100", "imagenet", "fake")

# Per-channel mean, std of the training images in [0, 1] (the usual published values).
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_NATIVE_SIZE = {"digits": 16, "cifar10": 32, "cifar100": 32}
_DEFAULT_SIZE = {"imagenet": 224, "fake": 32}
_FETCH = {  # how to get the data; ends every "not found" message
    "cifar10": "download CIFAR-10 (python version, cifar-10-python.tar.gz) and extract it there",
    "cifar100": "download CIFAR-100 (python version, cifar-100-python.tar.gz) and extract it there",
    "imagenet": "put ImageNet's train/ and val/ there, one subfolder per class in each "
                "(val images sorted into class folders too)",
}


class DataError(ValueError):
    """A user mistake about data (unknown dataset, missing root, wrong layout). One-line message:
    the dataset and path, what was expected, and the fix."""


@dataclass
class DataSpec:
    """What a config asks for. Field names are the config keys under `data:`."""
    dataset: str = "digits"
    """One of DATASETS."""
    root: str | None = None
    """Folder holding the data (cifar*: holds cifar-10-batches-py/ or cifar-100-python/; imagenet:
    holds train/ and val/). Made absolute (relative to the cwd) when the spec is built."""
    augment: bool = True
    """Random translation (+ horizontal flip on natural images) on the train split."""
    image_size: int | None = None
    """imagenet/fake: crop size in pixels (default 224 imagenet, 32 fake). Others: native size only."""
    workers: int = 4
    """imagenet: DataLoader worker processes (0 = decode in this process)."""
    fake_train: int = 256
    fake_val: int = 64
    fake_classes: int = 10

    def __post_init__(self):
        # Resolve now: Ray moves each trial into its own folder, so a relative path would change meaning.
        if self.root is not None:
            self.root = os.path.abspath(os.path.expanduser(str(self.root)))


@runtime_checkable
class Loader(Protocol):
    def __len__(self) -> int:
        """Number of samples."""

    def batches(self, batch_size: int, *, epoch: int = 0, shuffle: bool = False, augment: bool = False,
                drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """(x float32 NCHW normalised, y int64), both on the device. Order and augmentation depend only
        on (seed, epoch). `augment` is a no-op on the val split and when the spec says augment: false."""

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """How many batches `batches` yields."""


@dataclass
class Data:
    train: Loader
    val: Loader
    num_classes: int
    in_channels: int
    input_size: int
    """Height = width of x in pixels."""
    name: str


# ---------------------------------------------------------------------------------------------------
# check: cheap validation, before any training or Ray start


def check(spec: DataSpec) -> None:
    """Raise DataError if `spec` cannot load: unknown name, bad sizes, missing root or wrong layout.
    Looks at names and folders only (no md5, no image decoding)."""
    if spec.dataset not in DATASETS:
        close = difflib.get_close_matches(str(spec.dataset).lower(), DATASETS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "set data.dataset to one of them"
        raise DataError(f"data.dataset: unknown dataset {spec.dataset!r}; expected one of "
                        f"{', '.join(DATASETS)}; {hint}")
    _check_sizes(spec)
    if spec.dataset in _CIFAR_STATS:
        _check_cifar(spec.dataset, _root(spec))
    elif spec.dataset == "imagenet":
        _check_imagenet(_root(spec))


def _check_sizes(spec: DataSpec) -> None:
    name, size = spec.dataset, spec.image_size
    native = _NATIVE_SIZE.get(name)
    if native is not None and size not in (None, native):
        raise DataError(f"{name}: data.image_size={size}, but {name} images are {native}x{native} pixels; "
                        "remove data.image_size (it applies to imagenet/fake)")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise DataError(f"{name}: data.image_size={size!r} must be a positive integer (pixels)")
    for key in ("workers", "fake_train", "fake_val", "fake_classes"):
        v, low = getattr(spec, key), 0 if key == "workers" else 1
        if not isinstance(v, int) or v < low:
            raise DataError(f"{name}: data.{key}={v!r} must be an integer >= {low}")


def _root(spec: DataSpec) -> str:
    name, root = spec.dataset, spec.root
    if root is None:
        raise DataError(f"{name}: data.root is not set; set it to the folder that holds the data and "
                        f"{_FETCH[name]}")
    if not os.path.isdir(root):
        raise DataError(f"{name}: data.root {root} does not exist or is not a folder; fix the path, or "
                        f"{_FETCH[name]}")
    return root


def _cifar_class(name: str):
    import torchvision.datasets as tvd
    return {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]


def _check_cifar(name: str, root: str) -> None:
    cls = _cifar_class(name)
    folder = os.path.join(root, cls.base_folder)
    if not os.path.isdir(folder):
        hint = (f"data.root must be the folder that holds it ({os.path.dirname(root)})"
                if os.path.basename(root) == cls.base_folder else _FETCH[name])
        raise DataError(f"{name}: no '{cls.base_folder}' under {root} (data.root); {hint}")
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(f"{name}: {folder} lacks {', '.join(missing)} (expected {', '.join(files)}); "
                        f"the folder is incomplete: delete it and {_FETCH[name]}")


def _check_imagenet(root: str) -> None:
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"imagenet: no '{split}' folder under {root} (data.root); expected {root}/train "
                            f"and {root}/val; {_FETCH['imagenet']}")
    classes = {}
    for split in ("train", "val"):
        folder = os.path.join(root, split)
        classes[split] = _class_folders(folder)
        if not classes[split]:
            raise DataError(f"imagenet: {folder} has no class subfolders; expected one subfolder of images "
                            f"per class (ImageFolder layout); {_FETCH['imagenet']}")
        empty = [c for c in classes[split] if not _has_image(os.path.join(folder, c))]
        if empty:
            raise DataError(f"imagenet: {len(empty)} class folder(s) under {folder} hold no images "
                            f"({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''}); add images "
                            "(.jpg/.jpeg/.png/...) or remove those folders")
    if classes["train"] != classes["val"]:
        diff = sorted(set(classes["train"]) ^ set(classes["val"]))
        raise DataError(f"imagenet: class folders differ between {root}/train ({len(classes['train'])}) and "
                        f"{root}/val ({len(classes['val'])}), e.g. {', '.join(diff[:3])}; both splits must "
                        "hold the same class folders so the labels agree")


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


# ---------------------------------------------------------------------------------------------------
# load


def load(spec: DataSpec, device: torch.device, seed: int = 0) -> Data:
    """Check `spec`, then read the dataset: in-memory ones onto `device` now, imagenet lazily.
    `seed` sets the shuffle/augmentation streams only; the data and the digits split never depend on it."""
    check(spec)
    return _LOADERS[spec.dataset](spec, torch.device(device), seed)


_CACHE: dict = {}


def load_cached(spec: DataSpec, device: torch.device, seed: int = 0) -> Data:
    """`load`, keeping the last dataset in this process: a Ray worker reused across trials, or latency
    measured over many trials' checkpoints, reads it once."""
    key = (repr(spec), str(device), seed)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = load(spec, device, seed=seed)
    return _CACHE[key]


def _seed(seed: int, epoch: int, stream: str) -> int:
    """A 63-bit seed for one (seed, epoch, stream): a hash, so nearby seeds give unrelated streams."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generator(seed: int, epoch: int, stream: str) -> torch.Generator:
    """A CPU generator for one (seed, epoch, stream); CPU so a run replays identically on any device."""
    return torch.Generator().manual_seed(_seed(seed, epoch, stream))


def _count(n: int, batch_size: int, drop_last: bool) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, but got {batch_size}")
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def _affine(mean, std, unit: float, device) -> tuple[Tensor, Tensor]:
    """(scale, offset), each (1, C, 1, 1), so that normalised x = raw x * scale + offset,
    where raw x is in [0, unit] (255 for uint8 images, 1 for float ones)."""
    mean = torch.as_tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    return (1 / (unit * std)).float().to(device), (-mean / std).float().to(device)


class _TensorLoader:
    """A split held whole on the device: images (N, C, H, W) uint8 in [0, 255] or float32 in [0, 1],
    labels (N,) int64. Normalised per batch. Augmentation (train only): translate by up to `pad` pixels
    (zero fill = black before normalising, as torchvision's RandomCrop(padding=pad)) and, with `flip`,
    mirror left-right with probability 1/2."""

    def __init__(self, images: Tensor, labels: Tensor, mean, std, *, seed: int, stream: str,
                 pad: int = 0, flip: bool = False):
        self.images, self.labels = images, labels
        unit = 255.0 if images.dtype == torch.uint8 else 1.0
        self._scale, self._offset = _affine(mean, std, unit, images.device)
        self.seed, self.stream, self.pad, self.flip = seed, stream, pad, flip

    def __len__(self) -> int:
        return len(self.labels)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return _count(len(self), batch_size, drop_last)

    def batches(self, batch_size: int, *, epoch: int = 0, shuffle: bool = False, augment: bool = False,
                drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        nb = self.num_batches(batch_size, drop_last)  # raises on a bad batch_size now, not at first next()
        return self._batches(nb, batch_size, epoch, shuffle, augment and (self.pad > 0 or self.flip))

    def _batches(self, nb: int, batch_size: int, epoch: int, shuffle: bool, augment: bool):
        n, device, order = len(self), self.images.device, None
        if shuffle:
            order = torch.randperm(n, generator=_generator(self.seed, epoch, self.stream)).to(device)
        aug = self._draw(epoch, n) if augment else None
        for b in range(nb):
            lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
            # index_select, not x[idx]: 4-10x faster on CPU for these shapes (same result)
            take = (lambda t: t[lo:hi]) if order is None else (lambda t: t.index_select(0, order[lo:hi]))
            x = take(self.images)
            if aug is not None:
                x = _crop_flip(x, *map(take, aug), self.pad)
            yield torch.addcmul(self._offset, x, self._scale), take(self.labels)

    def _draw(self, epoch: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample shifts dy, dx in [0, 2*pad] and flips (N,) for one epoch, indexed by sample id."""
        g = _generator(self.seed, epoch, self.stream + "/augment")
        shift = torch.randint(0, 2 * self.pad + 1, (2, n), generator=g)
        flip = torch.rand(n, generator=g) < (0.5 if self.flip else 0.0)
        device = self.images.device
        return shift[0].to(device), shift[1].to(device), flip.to(device)


def _crop_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, pad: int) -> Tensor:
    """Random translation and mirror of a batch (B, C, H, W) in one gather, no per-sample Python:
    out[b] = pad(x[b])[:, dy[b]:dy[b]+H, dx[b]:dx[b]+W], mirrored left-right where flip[b].
    dy, dx in [0, 2*pad] (pad is the centre, i.e. no shift); zero fill, as RandomCrop(padding=pad)."""
    B, C, H, W = x.shape
    j = torch.arange(W, device=x.device)
    cols = dx.view(B, 1) + torch.where(flip.view(B, 1), W - 1 - j, j)                   # (B, W)
    rows = (dy.view(B, 1) + torch.arange(H, device=x.device)) * (W + 2 * pad)           # (B, H)
    index = (rows.view(B, H, 1) + cols.view(B, 1, W)).view(B, 1, H * W).expand(B, C, H * W)
    return F.pad(x, (pad, pad, pad, pad)).flatten(2).gather(2, index).view(B, C, H, W)


def _tensor_data(name: str, train: tuple, val: tuple, mean, std, seed: int, *, pad: int, flip: bool,
                 augment: bool, num_classes: int) -> Data:
    """Data from (images, labels) of both splits already on the device."""
    tr = _TensorLoader(*train, mean, std, seed=seed, stream="train", pad=pad if augment else 0,
                       flip=flip and augment)
    va = _TensorLoader(*val, mean, std, seed=seed, stream="val")
    return Data(tr, va, num_classes=num_classes, in_channels=train[0].shape[1],
                input_size=train[0].shape[-1], name=name)


# --- digits -----------------------------------------------------------------------------------------


def _digits_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train, val indices: a stratified 80/20 split fixed at random_state=0, whatever the run
    seed, so every run of a search sees the same validation images."""
    from sklearn.model_selection import train_test_split
    tr, va = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    return np.sort(tr), np.sort(va)


def _load_digits(spec: DataSpec, device: torch.device, seed: int) -> Data:
    """scikit-learn's 1797 handwritten digits (8x8, values 0..16) -> 1x16x16 in [0, 1]."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.from_numpy(d.images).float().div(16).unsqueeze(1)            # (1797, 1, 8, 8)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)  # stays in [0, 1]
    y = torch.from_numpy(d.target).long()
    tr, va = (torch.from_numpy(i) for i in _digits_split(d.target))
    mean, std = x[tr].mean().item(), x[tr].std().item()
    return _tensor_data("digits", (x[tr].to(device), y[tr].to(device)), (x[va].to(device), y[va].to(device)),
                        (mean,), (std,), seed, pad=2, flip=False, augment=spec.augment, num_classes=10)


# --- cifar ------------------------------------------------------------------------------------------


def _load_cifar(spec: DataSpec, device: torch.device, seed: int) -> Data:
    """torchvision's CIFAR reader (pickles, md5-checked) -> uint8 (N, 3, 32, 32) on the device."""
    name, cls = spec.dataset, _cifar_class(spec.dataset)
    try:
        splits = [cls(spec.root, train=t, download=False) for t in (True, False)]
    except RuntimeError as e:  # torchvision's "not found or corrupted": the md5 check failed
        raise DataError(f"{name}: files under {os.path.join(spec.root, cls.base_folder)} fail torchvision's "
                        f"md5 check ({e}); delete the folder and {_FETCH[name]}") from e
    train, val = ((torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous().to(device),
                   torch.tensor(s.targets, dtype=torch.int64, device=device)) for s in splits)
    mean, std = _CIFAR_STATS[name]
    return _tensor_data(name, train, val, mean, std, seed, pad=4, flip=True, augment=spec.augment,
                        num_classes=len(splits[0].classes))


# --- fake -------------------------------------------------------------------------------------------


def _fake_split(size: int, image_size: int, num_classes: int, offset: int) -> tuple[Tensor, Tensor]:
    """Every sample of torchvision FakeData(size, (3, s, s), num_classes, random_offset=offset), as
    uint8 (N, 3, s, s) and int64 (N,). Bit-identical to FakeData[i] with PILToTensor, but drawn from a
    private generator: FakeData.__getitem__ calls torch.manual_seed, which also reseeds (even lazily)
    every CUDA generator and would tie the trials' CUDA RNG to the fake data, whatever their seed."""
    from torchvision.datasets import FakeData
    ds = FakeData(size, image_size=(3, image_size, image_size), num_classes=num_classes, random_offset=offset)
    images, labels = torch.empty(len(ds), *ds.image_size), torch.empty(len(ds), dtype=torch.int64)
    for i in range(len(ds)):  # once, at load
        g = torch.Generator().manual_seed(i + ds.random_offset)
        images[i] = torch.randn(*ds.image_size, generator=g)
        labels[i] = torch.randint(0, ds.num_classes, (1,), generator=g)[0]
    return images.mul(255).byte(), labels  # what ToPILImage does to a float image


def _load_fake(spec: DataSpec, device: torch.device, seed: int) -> Data:
    """Random noise images and labels (nothing to learn), fixed whatever the seed; train and val use
    disjoint per-index seeds (val's random_offset = fake_train)."""
    s = spec.image_size or _DEFAULT_SIZE["fake"]
    x, y = _fake_split(spec.fake_train, s, spec.fake_classes, 0)
    xv, yv = _fake_split(spec.fake_val, s, spec.fake_classes, spec.fake_train)
    raw = x.double() / 255
    mean, std = raw.mean((0, 2, 3)), raw.std((0, 2, 3)).clamp_min(1e-3)
    return _tensor_data("fake", (x.to(device), y.to(device)), (xv.to(device), yv.to(device)), mean, std, seed,
                        pad=max(1, s // 8), flip=True, augment=spec.augment, num_classes=spec.fake_classes)


# --- imagenet ---------------------------------------------------------------------------------------


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
            top, left, h, w = _resized_crop_box(img.height, img.width, g)
            img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
            if torch.rand(1, generator=g).item() < 0.5:
                img = TF.hflip(img)
        else:
            img = TF.center_crop(TF.resize(img, int(self.size * 256 / 224), antialias=True), self.size)
        return TF.pil_to_tensor(img), int(self.targets[i])


def _resized_crop_box(height: int, width: int, g: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
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
        g = _generator(self.seed, self.epoch, self.stream)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        g_aug = _generator(self.seed, self.epoch, self.stream + "/augment")
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
        self._scale, self._offset = _affine(mean, std, 255.0, device)
        self._loaders: dict = {}

    def __len__(self) -> int:
        return len(self.paths)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return _count(len(self), batch_size, drop_last)

    def batches(self, batch_size: int, *, epoch: int = 0, shuffle: bool = False, augment: bool = False,
                drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        _count(len(self), batch_size, drop_last)  # raises on a bad batch_size now, not at first next()
        loader = self._loader(batch_size, drop_last, augment and self.can_augment)
        return self._batches(loader, epoch, shuffle)

    def _batches(self, loader: torch.utils.data.DataLoader, epoch: int, shuffle: bool):
        loader.sampler.epoch, loader.sampler.shuffle = epoch, shuffle
        loader.generator.manual_seed(_seed(self.seed, epoch, self.stream + "/workers"))
        pin = self.device.type == "cuda"
        for x, y in loader:
            x, y = x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)
            yield torch.addcmul(self._offset, x, self._scale), y

    def _loader(self, batch_size: int, drop_last: bool, augment: bool) -> torch.utils.data.DataLoader:
        key = (batch_size, drop_last, augment)
        if key not in self._loaders:
            self._loaders[key] = torch.utils.data.DataLoader(
                _Folder(self.root, self.paths, self.targets, self.size, augment), batch_size=batch_size,
                sampler=_EpochSampler(len(self), self.seed, self.stream), drop_last=drop_last,
                num_workers=self.workers, persistent_workers=self.workers > 0,
                pin_memory=self.device.type == "cuda", generator=torch.Generator())
        return self._loaders[key]


def _load_imagenet(spec: DataSpec, device: torch.device, seed: int) -> Data:
    """ImageFolder on root/train and root/val (scanning the folders happens here; decoding per batch)."""
    from torchvision.datasets import ImageFolder
    size = spec.image_size or _DEFAULT_SIZE["imagenet"]
    train, val = (ImageFolder(os.path.join(spec.root, s)) for s in ("train", "val"))
    kw = dict(device=device, seed=seed, workers=spec.workers)
    return Data(_FolderLoader(train, size, *_IMAGENET_STATS, stream="train", augment=spec.augment, **kw),
                _FolderLoader(val, size, *_IMAGENET_STATS, stream="val", augment=False, **kw),
                num_classes=len(train.classes), in_channels=3, input_size=size, name="imagenet")


_LOADERS = {"digits": _load_digits, "cifar10": _load_cifar, "cifar100": _load_cifar,
            "imagenet": _load_imagenet, "fake": _load_fake}
assert tuple(_LOADERS) == DATASETS
