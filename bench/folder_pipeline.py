"""Images/s per worker process of gatetune's streaming folder loader against torchvision's ImageFolder + DataLoader.

Both read the same ImageNet-sized JPEGs and produce the same thing per batch: normalised float32 NCHW
224x224 crops with RandomResizedCrop's law (scale 0.08-1, aspect 3/4-4/3) and a random horizontal flip,
shuffled, every image once per epoch, with the same number of DataLoader worker processes.

  gatetune     `data.dataset: folder` with large pictures, as a config loads it (tuning/data/stream.py, through
               tuning.data.load with data.in_memory false): `train.batches(B, shuffle=True, augment=True)`;
               workers send uint8 crops, the batch is normalised on the device
  torchvision  what a user would write: ImageFolder(train/, Compose([RandomResizedCrop(224),
               RandomHorizontalFlip(), ToTensor(), Normalize(ImageNet mean, std)])) in a
               DataLoader(shuffle=True, persistent_workers=True; pin_memory on cuda)

The images: real CIFAR-10 JPEGs (the unpacked full copy in /tmp/cifar when present, else the bundled
data/cifar10-subset), the first files by name of each class, each upscaled with PIL's bicubic filter to one
of 500x375, 375x500, 500x333, 400x300, 300x225 in turn (mean 415x347, about ImageNet's mean picture of
~400x350) and saved as JPEG quality 90 (4:2:0) under train/<class>/ (val/ holds two per class, which the
folder layout needs); nothing else is added. They are made once and kept in the temp folder under a name
keyed on these parameters. Upscaled 32x32 pictures have far less high-frequency detail than photos (about
15 KB per file against ImageNet's ~110 KB), so entropy decoding costs less here than on real photos: the
absolute images/s are high, and the ratio is probably a little lower on photos, where the decode that
both pipelines share weighs more. No box of these sizes is 4x the output, so the DCT-scaled decoding of
tuning/data/decode.py never runs here (photos over ~900 px a side get it); neither does a GPU decoder:
with --device cuda both pipelines still decode on the CPU (in their workers; nvJPEG would need CUDA in
forked workers) and copy batches to the GPU from pinned memory, gatetune's as uint8, normalised there,
torchvision's as float32.

Timing: one epoch = iterate every batch and read it whole (its sum to a Python float, as a training step
reads every pixel; on the CPU this is also where a batch in a worker's shared memory is mapped in); the first epoch
of each (pipeline, workers) is an untimed warm-up (the workers start there; they persist). Epochs of the
pipelines and worker counts are interleaved, round after round, so machine drift hits all alike; each
figure is the median of --repeats epochs. Per worker = images/s / workers. ratio = gatetune's per-worker
images/s / torchvision's, the lower over the worker counts (the goal must hold at each). The lines above
the last also give the consuming process's CPU time per image: on a CPU device gatetune normalises there
(torchvision in its workers), so with as many workers as cores (workers=2 here) that work has no core of
its own and competes with the workers.

    python bench/folder_pipeline.py                    # 1500 images, workers 1 and 2, 5 rounds (~1 min on 2 cores)
    python bench/folder_pipeline.py --quick            # smoke run (tests/test_bench.py)
    python bench/folder_pipeline.py --device cuda      # batches end on the GPU (CPU decoding, as above)
"""
from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import tempfile
import time

import torch

import benchlib
from gatetune.tuning.config import DataCfg
from gatetune.tuning.data import load
from gatetune.tuning.data.base import IMAGENET_STATS

GOAL = 2.0   # gatetune images/s per worker >= 2x torchvision's
SIZES = ((500, 375), (375, 500), (500, 333), (400, 300), (300, 225))   # (width, height), in turn
QUALITY = 90
VAL_PER_CLASS = 2
SOURCES = ("/tmp/cifar", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                                      "cifar10-subset"))


def source() -> str:
    """The CIFAR-10 JPEG copy to upscale: the full unpacked one when present, else the bundled subset."""
    for root in SOURCES:
        if os.path.isdir(os.path.join(root, "train")):
            return root
    raise SystemExit(f"bench folder_pipeline: no CIFAR-10 JPEG copy at {' or '.join(SOURCES)}")


def make_images(n: int) -> str:
    """The image folder (root with train/ and val/) of n upscaled CIFAR-10 JPEGs, made once per parameters."""
    from PIL import Image
    src = os.path.join(source(), "train")
    key = hashlib.blake2b(repr((n, SIZES, QUALITY, VAL_PER_CLASS, "bicubic", src, 1)).encode(),
                          digest_size=6).hexdigest()
    root = os.path.join(tempfile.gettempdir(), "gatetune-bench", f"folder_pipeline-{n}-{key}")
    if os.path.isdir(root):
        return root
    t = time.perf_counter()
    os.makedirs(os.path.dirname(root), exist_ok=True)
    work = tempfile.mkdtemp(dir=os.path.dirname(root), prefix=".making-")
    classes = sorted(os.listdir(src))
    per_class = -(-n // len(classes))
    listed = {c: sorted(os.listdir(os.path.join(src, c))) for c in classes}
    splits = {"train": [(c, f) for c in classes for f in listed[c][:per_class]][:n],
              "val": [(c, f) for c in classes for f in listed[c][per_class:per_class + VAL_PER_CLASS]]}
    for split, files in splits.items():
        for i, (c, name) in enumerate(files):
            os.makedirs(os.path.join(work, split, c), exist_ok=True)
            with Image.open(os.path.join(src, c, name)) as im:
                big = im.convert("RGB").resize(SIZES[i % len(SIZES)], Image.BICUBIC)
            big.save(os.path.join(work, split, c, f"{i:05d}.jpg"), quality=QUALITY)
    try:
        os.rename(work, root)
    except OSError:   # another run made it meanwhile
        shutil.rmtree(work, ignore_errors=True)
    print(f"made {n} JPEGs from {src} in {time.perf_counter() - t:.1f} s: {root}", flush=True)
    return root


def _touch(x: torch.Tensor, y: torch.Tensor) -> float:
    """Read every pixel, as a training step does (a batch in a worker's shared memory maps its pages in here)."""
    return float(x.sum()) + int(y[-1])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gatetune_epoch(loader, batch: int, epoch: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one epoch."""
    _sync(device)
    t, cpu = time.perf_counter(), time.process_time()
    for x, y in loader.batches(batch, epoch=epoch, shuffle=True, augment=True):
        _touch(x, y)
    _sync(device)
    return time.perf_counter() - t, time.process_time() - cpu


def torchvision_epoch(loader, device: torch.device) -> tuple[float, float]:
    _sync(device)
    t, cpu = time.perf_counter(), time.process_time()
    for x, y in loader:
        if device.type == "cuda":
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _touch(x, y)
    _sync(device)
    return time.perf_counter() - t, time.process_time() - cpu


def main() -> None:
    ap = benchlib.parser("folder_pipeline", __doc__, quick="smoke run: 160 images, workers 1, 1 round",
                         device_help="where the batches end up (decoding is on the CPU either way)")
    ap.add_argument("--n", type=int, default=1500, help="training images (an epoch reads each once)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed epochs per (pipeline, workers); median counts")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker processes")
    a = ap.parse_args()
    if a.quick:
        a.n, a.repeats, a.workers = 160, 1, [1]
    device = torch.device(a.device)
    import torchvision
    import torchvision.transforms as T

    root = make_images(a.n)
    mean, std = IMAGENET_STATS
    recipe = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    dataset = torchvision.datasets.ImageFolder(os.path.join(root, "train"), transform=recipe)
    runs = {}
    for w in a.workers:
        cfg = DataCfg(dataset="folder", root=root, in_memory=False, image_size=224, workers=w, mean=list(mean),
                      std=list(std))
        ours = load(cfg, device, seed=0).train
        theirs = torch.utils.data.DataLoader(dataset, batch_size=a.batch, shuffle=True, num_workers=w,
                                             persistent_workers=True, pin_memory=device.type == "cuda")
        runs[("gatetune", w)] = lambda e, ours=ours: gatetune_epoch(ours, a.batch, e, device)
        runs[("torchvision", w)] = lambda e, theirs=theirs: torchvision_epoch(theirs, device)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {benchlib.device_name(a.device)}; "
          f"{len(dataset)} JPEGs (upscaled CIFAR-10, mean {sum(s[0] for s in SIZES) / len(SIZES):.0f}x"
          f"{sum(s[1] for s in SIZES) / len(SIZES):.0f}), batch {a.batch}, workers {a.workers}, "
          f"median of {a.repeats} epochs" + (f"; batches on {device}" if device.type == "cuda" else ""), flush=True)

    times: dict = {k: [] for k in runs}
    for r in range(a.repeats + 1):   # round 0: the warm-up (and the workers' start)
        for k, epoch in runs.items():
            dt = epoch(r)
            if r:
                times[k].append(dt)
    n = len(dataset)
    per_worker = {k: n / statistics.median(t for t, _ in v) / k[1] for k, v in times.items()}
    for (name, w), ips in per_worker.items():
        spread = ", ".join(f"{n / t:.0f}" for t, _ in times[(name, w)])
        main_ms = 1e3 * statistics.median(c for _, c in times[(name, w)]) / n
        print(f"{name:<12} workers={w}  {ips * w:6.0f} img/s  {ips:6.0f} per worker  consumer CPU {main_ms:.2f} "
              f"ms/img  (epochs: {spread} img/s)")
    ratios = {w: per_worker[("gatetune", w)] / per_worker[("torchvision", w)] for w in a.workers}
    for w, q in ratios.items():
        print(f"workers={w}: gatetune / torchvision per worker = {q:.2f}")
    ratio = min(ratios.values())
    benchlib.final_line("folder_pipeline", f"{ratio:.2f}", f"{GOAL:g}", ratio >= GOAL,
                        **{f"ratio_w{w}": f"{q:.2f}" for w, q in ratios.items()},
                        **{f"{name}_w{w}_img_s_per_worker": f"{ips:.0f}" for (name, w), ips in per_worker.items()},
                        n=n, batch=a.batch, device="cuda" if device.type == "cuda" else None)


if __name__ == "__main__":
    main()
