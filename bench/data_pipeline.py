"""Epoch time of gatetune's in-memory CIFAR pipeline against a torchvision DataLoader, side by side.

Both read the same CIFAR-shaped data made in memory (N random uint8 32x32x3 images, 10 labels; no
download) and produce the same thing per batch: normalised float32 NCHW images with a random 4-pixel
translation (zero fill) and a random horizontal flip, shuffled, batch 128, every sample once.

  gatetune    tuning/data's tensor loader (data.from_tensors), fed as its CIFAR reader feeds it (uint8 (N, 3, 32, 32) on the
              device, CIFAR-10 mean/std, pad 4, flip): `Loader.batches(128, shuffle=True, augment=True)`;
              a batch is an index gather plus one batched crop/flip gather and one fused normalise
  DataLoader  the classic recipe: a Dataset returning PIL images as torchvision's CIFAR10 does,
              transforms RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize, per
              sample; num_workers 0 and 2 (persistent workers, so the worker start is not timed)

Only the data is timed: one epoch = iterate all batches and touch each one (sum it to a Python float).
Each figure is the best of --repeats epochs (the first epoch of each pipeline is an untimed warm-up),
with the pipelines' epochs interleaved so machine noise hits all alike. The in-process pipelines
(gatetune, num_workers=0) are timed at 1 and 2 torch threads: on a 2-core machine shared with other
jobs, 2 threads can be several times slower than 1 (the threads wait on each other). Each pipeline
counts at its best setting: ratio = the fastest DataLoader setting's epoch time / gatetune's fastest.

    python bench/data_pipeline.py                    # 10000 images, batch 128, 3 timed epochs each
    python bench/data_pipeline.py --n 50000          # CIFAR-10's training set size
    python bench/data_pipeline.py --quick            # smoke run (tests/test_bench.py)
    python bench/data_pipeline.py --device cuda      # gatetune's tensors on the GPU; DataLoader batches copied
                                                     # there from pinned memory, as a training loop does
"""
from __future__ import annotations

import time

import numpy as np
import torch

import benchlib
from gatetune.tuning import data as D
from gatetune.tuning.data.base import CIFAR_STATS

GOAL = 5.0   # DataLoader epoch time / gatetune epoch time >= 5


class _PILDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per sample: HWC uint8 -> PIL image -> transform."""

    def __init__(self, images: np.ndarray, labels: list[int], transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def _touch(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(x.sum()) + int(y[0])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":   # kernels queued before (or by) the epoch are timed where they run
        torch.cuda.synchronize()


def gatetune_epoch(loader, batch: int, epoch: int, device: torch.device = torch.device("cpu")) -> float:
    _sync(device)
    t = time.perf_counter()
    for x, y in loader.batches(batch, epoch=epoch, shuffle=True, augment=True):
        _touch(x, y)
    _sync(device)
    return time.perf_counter() - t


def dataloader_epoch(loader, device: torch.device = torch.device("cpu")) -> float:
    _sync(device)
    t = time.perf_counter()
    for x, y in loader:
        if device.type == "cuda":
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _touch(x, y)
    _sync(device)
    return time.perf_counter() - t


def main() -> None:
    ap = benchlib.parser("data_pipeline", __doc__, quick="smoke run: 2000 images, 1 repeat, workers 0, 1 thread",
                         device_help="where the batches end up (cuda: gatetune's tensors live there, DataLoader "
                                     "batches are copied)")
    ap.add_argument("--n", type=int, default=10000, help="images in the epoch")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs per pipeline (best one counts)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers settings")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="torch threads tried for the in-process pipelines (gatetune, num_workers=0)")
    a = ap.parse_args()
    device = torch.device(a.device)
    if a.quick:
        a.n, a.repeats, a.workers, a.threads = 2000, 1, [0], [1]
    import torchvision
    import torchvision.transforms as T

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(a.n, 32, 32, 3), dtype=np.uint8)    # HWC, as CIFAR's pickles
    labels = rng.integers(0, 10, size=a.n).tolist()
    mean, std = CIFAR_STATS["cifar10"]

    # gatetune: exactly what _load_cifar builds (NCHW uint8 tensor on the device, pad 4, flip)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    y = torch.tensor(labels, dtype=torch.int64, device=device)
    ours = D.from_tensors("cifar10", (x, y), (x[:a.batch], y[:a.batch]), mean, std, seed=0, pad=4, flip=True,
                          augment=True, num_classes=10).train

    recipe = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    dataset = _PILDataset(images, labels, recipe)
    loaders = {w: torch.utils.data.DataLoader(dataset, batch_size=a.batch, shuffle=True, num_workers=w,
                                              persistent_workers=w > 0, pin_memory=device.type == "cuda")
               for w in a.workers}
    default_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {a.n} images 3x32x32, "
          f"batch {a.batch}, best of {a.repeats} epochs; in-process pipelines at {a.threads} torch thread(s)"
          + (f"; batches on {torch.cuda.get_device_name(0)}" if device.type == "cuda" else ""),
          flush=True)

    # (pipeline, setting) -> (threads, one epoch); workers > 0 decode in their processes (1 thread each)
    runs = {("gatetune", t): (t, lambda e: gatetune_epoch(ours, a.batch, e, device)) for t in a.threads}
    for w, dl in loaders.items():
        for t in (a.threads if w == 0 else [default_threads]):
            runs[(f"workers={w}", t)] = (t, lambda e, dl=dl: dataloader_epoch(dl, device))
    times: dict = {k: [] for k in runs}
    for r in range(a.repeats + 1):                # epoch 0 is the warm-up (and the workers' start)
        for k, (t, epoch) in runs.items():
            torch.set_num_threads(t)
            dt = epoch(r)
            if r:
                times[k].append(dt)
    torch.set_num_threads(default_threads)
    best = {k: min(v) for k, v in times.items()}
    for (name, t), s in best.items():
        label = "gatetune tensor loader" if name == "gatetune" else f"DataLoader num_workers={name[8:]}"
        print(f"{label:<26} threads={t}  {s:7.3f} s/epoch  {a.n / s:9.0f} img/s")
    g_key = min((k for k in best if k[0] == "gatetune"), key=best.get)
    d_key = min((k for k in best if k[0] != "gatetune"), key=best.get)
    g, d = best[g_key], best[d_key]
    ratio = d / g
    per_w = {w: min(s for (name, _), s in best.items() if name == f"workers={w}") for w in a.workers}
    benchlib.final_line("data_pipeline", f"{ratio:.1f}", f"{GOAL:g}", ratio >= GOAL, gatetune_s=f"{g:.3f}",
                        **{f"dataloader_w{w}_s": f"{s:.3f}" for w, s in per_w.items()},
                        gatetune_threads=g_key[1], dataloader_best=d_key[0].replace("=", ""), n=a.n, batch=a.batch,
                        device="cuda" if device.type == "cuda" else None)


if __name__ == "__main__":
    main()
