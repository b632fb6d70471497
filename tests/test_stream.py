"""The streaming loader's pixels (tuning/data/stream.py, tuning/data/decode.py) against torchvision's pipeline on
the same JPEGs: the crop law, the pixels of a given box (full-size and DCT-scaled decoding), the val transform,
an epoch's statistics, the replay whatever the worker count, unreadable files left out. The pictures are made
here from the bundled CIFAR-10 JPEGs: upscaled (smooth) and 32-px tiles side by side (hard edges, detail)."""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from gatetune.tuning.config import DataCfg
from gatetune.tuning.data import load
from gatetune.tuning.data.decode import dct_scale, read_box
from gatetune.tuning.data.stream import resized_crop_box

CPU = torch.device("cpu")
SUBSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "cifar10-subset", "train")
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


@functools.lru_cache(maxsize=None)
def listing() -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple((c, tuple(sorted(os.listdir(os.path.join(SUBSET, c))))) for c in sorted(os.listdir(SUBSET)))


@functools.lru_cache(maxsize=None)
def cifar(k: int) -> Image.Image:
    """The k-th bundled CIFAR-10 picture (32x32 RGB), taken across the classes."""
    c, files = listing()[k % len(listing())]
    with Image.open(os.path.join(SUBSET, c, files[k // len(listing())])) as img:
        return img.convert("RGB")


def upscaled(k: int, size) -> Image.Image:
    return cifar(k).resize(size, Image.BICUBIC)


def mosaic(k: int, size) -> Image.Image:
    out = Image.new("RGB", size)
    for i, (y, x) in enumerate((y, x) for y in range(0, size[1], 32) for x in range(0, size[0], 32)):
        out.paste(cifar(k + i % 500), (x, y))
    return out


SIZES = ((500, 375), (375, 500), (500, 333), (300, 225), (400, 300))


def write_folder(root, n: int, big: int = 0) -> None:
    """root/train/<a|b>/ with n upscaled JPEGs of ImageNet's sizes and `big` 2000x1500 ones (DCT-scaled
    decoding), root/val/ with four (one big when there are)."""
    for split, count, large in (("train", n, big), ("val", 4, min(big, 1))):
        for i in range(count + large):
            size = SIZES[i % len(SIZES)] if i < count else (2000, 1500)
            folder = root / split / "ab"[i % 2]
            folder.mkdir(parents=True, exist_ok=True)
            upscaled(i + (0 if split == "train" else 300), size).save(folder / f"{i:03d}.jpg", quality=90)


def cfg(root, **kw) -> DataCfg:
    return DataCfg(dataset="folder", root=str(root), in_memory=False, image_size=224, mean=MEAN, std=STD,
                   **{"workers": 0, **kw})


def raw(loader, x: torch.Tensor) -> torch.Tensor:
    """A batch back in uint8 levels (0-255) from its normalised floats."""
    return ((x - loader.offset) / loader.scale).round()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GATETUNE_CACHE_DIR", str(tmp_path / "cache"))


# per-picture ops are small: on a busy 2-core box, 2 intra-op threads wait on each other for milliseconds
pytestmark = pytest.mark.usefixtures("one_thread")


def test_crop_boxes_are_random_resized_crops_draws():
    """resized_crop_box is RandomResizedCrop.get_params drawing from a generator: with the same seed it draws the
    same box (the float32 vs float64 logarithm may move a rounding, hence 99%), and its scale and aspect have the
    same distribution (two-sample Kolmogorov-Smirnov distance below the 0.1% critical value)."""
    same, n = 0, 0
    with torch.random.fork_rng():
        for h, w in ((375, 500), (500, 375), (225, 300), (1500, 2000)):
            ours, theirs, picture = [], [], torch.empty(1).expand(3, h, w)   # only its shape is read
            for k in range(1500):
                box = resized_crop_box(h, w, torch.Generator().manual_seed(k))
                torch.default_generator.manual_seed(k)   # the global CPU RNG (torch.manual_seed also queues CUDA's)
                ref = T.RandomResizedCrop.get_params(picture, [0.08, 1.0], [3 / 4, 4 / 3])
                same, n = same + (tuple(box) == tuple(ref)), n + 1
                ours.append(box)
                theirs.append(T.RandomResizedCrop.get_params(picture, [0.08, 1.0], [3 / 4, 4 / 3]))
            for law in (lambda b: b[2] * b[3] / (h * w), lambda b: np.log(b[3] / b[2])):
                a, b = np.sort([law(x) for x in ours]), np.sort([law(x) for x in theirs])
                grid = np.concatenate([a, b])
                ks = np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()
                assert ks < 1.95 * np.sqrt(2 / len(a)), (h, w, ks)
            scales = np.array([x[2] * x[3] / (h * w) for x in ours])
            assert scales.min() > 0.07 and scales.max() <= 1 and np.median(scales) > 0.4
    assert same / n >= 0.99


def test_a_box_gives_torchvisions_pixels(tmp_path):
    """read_box against torchvision's resized_crop of the PIL image, per box, in uint8 levels: full-size decoding
    (RGB, greyscale, CMYK JPEGs, PNG) agrees to 0.05 mean and 2 at most (measured: 0.002, 1); DCT-scaled decoding
    (boxes >= 4x the output) to 0.5 on upscaled pictures (measured ~0.1) and 2.0 on 32-px tiles (measured ~1)."""
    files = {"rgb": (upscaled(0, (500, 375)), "JPEG"), "portrait": (upscaled(1, (375, 500)), "JPEG"),
             "grey": (upscaled(2, (500, 333)).convert("L"), "JPEG"), "cmyk": (upscaled(3, (400, 300)).convert("CMYK"), "JPEG"),
             "png": (upscaled(4, (500, 375)), "PNG"), "big": (upscaled(5, (2000, 1500)), "JPEG"),
             "tiles": (mosaic(6, (1920, 1440)), "JPEG")}
    g = torch.Generator().manual_seed(0)
    diffs: dict = {}
    for name, (img, fmt) in files.items():
        path = tmp_path / f"{name}.{fmt.lower()}"
        img.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        ref_img = Image.open(path).convert("RGB")
        for _ in range(12 if name in ("big", "tiles") else 4):
            box = resized_crop_box(ref_img.height, ref_img.width, g)
            ours = read_box(str(path), lambda h, w: (box, (224, 224))).permute(1, 2, 0).numpy().astype(int)
            ref = np.asarray(TF.resized_crop(ref_img, *box, [224, 224])).astype(int)
            scaled = dct_scale(box[2], box[3], 224, 224) > 1
            diffs.setdefault((name, scaled), []).append((np.abs(ours - ref).mean(), np.abs(ours - ref).max()))
    assert {k[1] for k in diffs if k[0] == "big"} == {True, False}   # both paths ran on the large picture
    assert ("tiles", True) in diffs
    for (name, scaled), d in diffs.items():
        mean, worst = np.mean([m for m, _ in d]), max(x for _, x in d)
        if not scaled:
            assert mean < 0.05 and worst <= 2, (name, mean, worst)
        else:
            assert mean < (2.0 if name == "tiles" else 0.5), (name, mean)


def test_without_torchvisions_jpeg_decoder_pil_decodes_the_same_pixels(tmp_path, monkeypatch):
    """torchvision.io's decoders are deprecated (TorchCodec replaces them): where decode_jpeg is gone, PIL decodes."""
    from gatetune.tuning.data import decode
    path = tmp_path / "a.jpg"
    upscaled(7, (500, 375)).save(path, quality=90)
    plan = lambda h, w: ((20, 30, 300, 400), (224, 224))   # noqa: E731
    fast = read_box(str(path), plan)
    monkeypatch.setattr(decode, "_DECODE_JPEG", None)
    assert torch.equal(read_box(str(path), plan), fast)


def test_the_val_transform_is_torchvisions_resize_and_centre_crop(tmp_path):
    write_folder(tmp_path, n=2, big=1)
    data = load(cfg(tmp_path), CPU)
    x, y = next(data.val.batches(8))
    ref_t = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    files = sorted((c, f) for c in os.listdir(tmp_path / "val") for f in os.listdir(tmp_path / "val" / c))
    ref = torch.stack([ref_t(Image.open(tmp_path / "val" / c / f).convert("RGB")) for c, f in files])
    diff = (raw(data.val, x) - ref).abs().mean((1, 2, 3))
    assert x.shape == (5, 3, 224, 224) and diff.max() < 0.5 and diff.median() < 0.05, diff


def moments(batches) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and std (float64) of (N, 3, H, W) batches in [0, 1], and N."""
    s1, s2, pixels, n = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0, 0
    for x in batches:
        v = x.transpose(0, 1).reshape(3, -1).double()
        s1, s2, pixels, n = s1 + v.sum(1), s2 + v.square().sum(1), pixels + v.shape[1], n + len(x)
    mean = s1 / pixels
    return mean, (s2 / pixels - mean.square()).sqrt(), n


def test_an_epoch_has_torchvisions_pixel_statistics(tmp_path):
    """Per-channel mean and std over 10 augmented epochs (independent draws) against ImageFolder +
    RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor on the same pictures: within 0.02 in [0, 1] units
    (measured: 0.006 at most over three seeds; the channels' means differ by 0.08, so a swap would show)."""
    write_folder(tmp_path, n=22, big=2)
    data = load(cfg(tmp_path), CPU)
    ours = moments(raw(data.train, x) / 255 for e in range(10) for x, _ in data.train.batches(24, epoch=e,
                                                                                           augment=True))
    import torchvision
    tv = torchvision.datasets.ImageFolder(str(tmp_path / "train"), transform=T.Compose(
        [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor()]))
    with torch.random.fork_rng():
        torch.default_generator.manual_seed(0)
        theirs = moments(tv[i][0][None] for _ in range(10) for i in range(len(tv)))
    assert ours[2] == theirs[2] == 240
    for a, b in zip(ours[:2], theirs[:2]):
        assert (a - b).abs().max() < 0.02, (a, b)


def test_jpeg_epochs_replay_whatever_the_workers_and_leave_broken_files_out(tmp_path, capsys):
    write_folder(tmp_path, n=8, big=1)
    good = (tmp_path / "train" / "a" / "000.jpg").read_bytes()
    (tmp_path / "train" / "a" / "cut.jpg").write_bytes(good[:len(good) // 2])   # truncated: libjpeg and PIL refuse
    (tmp_path / "train" / "b" / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")

    def epoch(data, bs, e):
        xs, ys = zip(*data.train.batches(bs, epoch=e, shuffle=True, augment=True))
        return torch.cat(xs), torch.cat(ys)

    inline = load(cfg(tmp_path), CPU, seed=3)
    pooled = load(cfg(tmp_path, workers=2), CPU, seed=3)
    ref = epoch(inline, 4, 1)
    epoch(pooled, 5, 0)   # persistent workers, another batch size first: neither may matter
    got = epoch(pooled, 5, 1)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    assert len(ref[1]) == 9 and ref[0].shape[1:] == (3, 224, 224)   # 11 files, 2 unreadable
    assert not torch.equal(ref[0], epoch(inline, 4, 2)[0])
    err = capsys.readouterr().err
    assert "cut.jpg" in err and "junk.jpg" in err and "cannot decode" in err


FAULTS = """
import resource, sys, torch
if sys.argv[1] == "heap":
    from gatetune.tuning.data.stream import heap_for_large_batches
    assert heap_for_large_batches()
def batch():   # a float batch of 64 crops at 224 px (38.5 MB), written whole as the conversion does
    torch.empty((64, 3, 224, 224)).fill_(1.0)
for _ in range(5):   # glibc places the first few apart (posix_memalign's split chunks) before it reuses them
    batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    batch()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(not os.path.exists("/lib/x86_64-linux-gnu/libc.so.6") and not os.path.exists("/lib64/libc.so.6"),
                    reason="glibc's mallopt")
def test_a_cpu_stream_keeps_freed_batches_in_the_heap_instead_of_faulting_them_in_again():
    """heap_for_large_batches (called by a StreamLoader on the CPU): batch-sized allocations, once a few have
    come and gone, reuse freed pages; by default glibc maps each fresh, and filling it faults in all ~9,400."""
    import subprocess
    import sys
    faults = {how: float(subprocess.run([sys.executable, "-c", FAULTS, how], check=True, capture_output=True,
                                        text=True).stdout) for how in ("default", "heap")}
    assert faults["default"] > 5000, faults
    assert faults["heap"] < 500, faults
