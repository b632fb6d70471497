"""Training throughput of resnet20 trials: one trial alone on a GPU against four sharing it, side by side.

CIFAR-shaped data (data.dataset=fake: --n random 3x32x32 images, 10 labels, image_size 32; no
download), resnet20 gated at density 0.5 everywhere, batch 128, bf16 autocast + channels_last
(train.amp: true; --no-amp for fp32), FIFO, on one local Ray instance started once:

  alone   a 1-trial search, search.resources.gpu: 1
  shared  a 4-trial search (seeds 0..3), search.resources.gpu: 0.25, all four at once on the one GPU

Throughput is the training loop's own `images_per_s` metric (images trained / seconds of the epoch's
training steps, evaluation and checkpoint excluded; on CUDA the loop's per-epoch metrics read back
from the GPU, so the time covers the work), per trial the median over its epochs after the first
(cuDNN autotuning and allocator warm-up). shared total = the sum of the four trials' figures, which
holds only while they train at the same time: `overlap` = the time all four were past their first
epoch / a trial's mean time past it (1.0: fully overlapped), and a note says when it is below 0.8
(then raise --n or --epochs). ratio = shared total / alone; goal >= 2: sharing one GPU between four
small-network trials is worth its memory risk (no isolation between fractions) when it at least
doubles what one trial gets out of the GPU. The goal is a judgement, not a measured baseline.

On a machine without CUDA, --device cuda (the default) fails with one line; --device cpu runs the
same measurement on the CPU, with fractional CPU resources instead (Ray started with 1 CPU: alone
takes cpu: 1, shared 0.25 each; every trial trains with one torch thread), so CI can smoke-test it.

    python bench/gpu_throughput.py                         # cuda, 50000 images, 3 epochs
    python bench/gpu_throughput.py --rounds 2 --n 100000   # alone, shared, shared, alone
    python bench/gpu_throughput.py --device cpu --quick    # smoke run (tests/test_bench.py)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import benchlib

benchlib.ray_environment()   # before ray's import

import torch  # noqa: E402
import yaml  # noqa: E402

GOAL = 2.0      # shared total images/s / alone images/s, at least
SHARED = 4      # trials sharing the device


def search_file(folder: Path, kind: str, a) -> Path:
    """The search config of one side: `alone` (1 trial, the whole device) or `shared` (4 trials)."""
    trials = 1 if kind == "alone" else SHARED
    share = 1.0 if kind == "alone" else 1.0 / SHARED
    resources = {"cpu": 1, "gpu": share} if a.device == "cuda" else {"cpu": share, "gpu": 0}
    doc = {"name": f"gpu_throughput-{kind}-{a.tag}", "seed": 0,
           "model": {"name": "resnet20"},
           "data": {"dataset": "fake", "image_size": 32, "fake_train": a.n, "fake_val": a.val, "fake_classes": 10},
           "gating": {"policy": "fbs", "density": 0.5, "gate": "all", "trainable": "all"},
           "train": {"epochs": a.epochs, "batch_size": a.batch, "device": a.device, "amp": a.amp,
                     "keep_checkpoints": 1, "threads": 1 if a.device == "cpu" else None,
                     # noise has nothing to learn: at lr 0.05 the loss turns NaN in epoch 1 and the trial stops as
                     # diverged; a small rate keeps it finite and costs the same per step
                     "optimizer": {"name": "sgd", "lr": 0.002, "momentum": 0.9, "weight_decay": 5.0e-4}},
           "search": {"num_samples": 1, "scheduler": {"name": "fifo"}, "resources": resources,
                      "max_concurrent": trials, "max_failures": 0},
           "space": {"seed": {"grid": list(range(trials))}}}
    path = folder / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run(kind: str, folder: Path, a) -> dict:
    """One search; per trial the steady images/s, and how long all trials trained side by side."""
    from ray.tune import Callback

    from gatetune import results
    from gatetune.tuning import config as C
    from gatetune.tuning.search.run import run_search
    arrivals = []   # (time, trial id, epoch, seconds of that iteration), recorded in this process

    class Recording(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            arrivals.append((time.time(), trial.trial_id, float(result.get("epoch", 0)),
                             float(result.get("time_this_iter_s", 0))))

    cfg = C.load(str(search_file(folder, kind, a)))
    sink = contextlib.nullcontext() if a.verbose else contextlib.redirect_stdout(io.StringIO())
    t = time.perf_counter()
    with sink:
        run_dir, ok = run_search(cfg, storage=str(folder), callbacks=[Recording()])
    wall = time.perf_counter() - t
    df = results.table(run_dir)
    want = 1 if kind == "alone" else SHARED
    if not ok or int((df["status"] == "completed").sum()) != want:
        raise SystemExit(f"bench gpu_throughput: the {kind} search in {run_dir} did not complete {want} trial(s):\n"
                         f"{df[['trial_id', 'status', 'epochs']]}")
    _, history = results.collect(run_dir)
    steady = history[history["epoch"] > 1] if a.epochs > 1 else history
    per_trial = steady.groupby("trial_id")["images_per_s"].median().sort_index()
    # each trial's time past its first epoch: from the end of epoch 1 to its last result
    spans = {}
    for tid in per_trial.index:
        mine = sorted((t, e, s) for t, i, e, s in arrivals if i == tid)
        first = next(((t, e, s) for t, e, s in mine if e > 1), mine[0]) if mine else None
        if first:
            spans[tid] = (first[0] - first[2], mine[-1][0])
    common = min(e for _, e in spans.values()) - max(s for s, _ in spans.values()) if spans else 0.0
    mean_span = statistics.mean(e - s for s, e in spans.values()) if spans else 0.0
    overlap = max(0.0, common) / mean_span if mean_span > 0 else 0.0
    return {"wall": wall, "per_trial": [float(v) for v in per_trial], "total": float(per_trial.sum()),
            "overlap": overlap if kind == "shared" else 1.0,
            "epochs": {tid: [round(float(v)) for v in g["images_per_s"]] for tid, g in history.groupby("trial_id")}}


def main() -> None:
    ap = benchlib.parser("gpu_throughput", __doc__, device="cuda",
                         quick="smoke run: 512 images, 2 epochs, batch 64", verbose=True)
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                    help="bf16 autocast + channels_last on cuda (train.amp); ignored on cpu")
    ap.add_argument("--n", type=int, default=50000, help="training images (fake, 3x32x32)")
    ap.add_argument("--val", type=int, default=1000, help="validation images")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per trial (the first is warm-up)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1, help="alone+shared pairs, interleaved (ABBA)")
    a = ap.parse_args()
    if a.quick:
        a.n, a.val, a.epochs, a.batch, a.rounds = 512, 128, 2, 64, 1
    amp = a.amp and a.device == "cuda"
    where = benchlib.device_name(a.device)
    import ray
    t = time.perf_counter()
    benchlib.start_ray(a.device)
    print(f"torch {torch.__version__}, resnet20 on {a.n} fake 3x32x32 images, batch {a.batch}, {a.epochs} epochs, "
          f"{'bf16 autocast + channels_last' if amp else 'fp32'}, {where}; ray start {time.perf_counter() - t:.1f} s; "
          f"alone: 1 trial with the whole {a.device}, shared: {SHARED} trials at 1/{SHARED} each", flush=True)
    out = {"alone": [], "shared": []}
    try:
        with tempfile.TemporaryDirectory(prefix="gatetune-bench-") as tmp:
            for r in range(a.rounds):
                for kind in (("alone", "shared") if r % 2 == 0 else ("shared", "alone")):
                    a.tag = r
                    res = run(kind, Path(tmp), a)
                    out[kind].append(res)
                    per = " ".join(f"{v:.0f}" for v in res["per_trial"])
                    print(f"{kind:<6} round {r + 1}: {res['total']:8.0f} img/s in all (per trial: {per}; per epoch: "
                          f"{' | '.join(' '.join(map(str, v)) for v in res['epochs'].values())})"
                          + (f", overlap {res['overlap']:.2f}" if kind == "shared" else "")
                          + f", search {res['wall']:.0f} s", flush=True)
    finally:
        ray.shutdown()
    alone = max(r["total"] for r in out["alone"])     # the better alone run: errs against sharing
    shared = statistics.median(r["total"] for r in out["shared"])
    per_trial = statistics.median(v for r in out["shared"] for v in r["per_trial"])
    overlap = min(r["overlap"] for r in out["shared"])
    ratio = shared / alone
    if overlap < 0.8:
        print(f"note: the shared trials overlapped only {overlap:.0%} of their steady epochs; the total is "
              "optimistic: raise --n or --epochs")
    print(f"shared total / alone = {shared:.0f} / {alone:.0f} = {ratio:.2f}; one shared trial gets "
          f"{per_trial / alone:.0%} of an alone trial's throughput")
    benchlib.final_line("gpu_throughput", f"{ratio:.2f}", GOAL, ratio >= GOAL, alone_img_s=f"{alone:.0f}",
                        shared_total_img_s=f"{shared:.0f}", shared_per_trial_img_s=f"{per_trial:.0f}",
                        overlap=f"{overlap:.2f}", device=a.device, amp=amp, where=where.replace(" ", "_"), n=a.n,
                        epochs=a.epochs, batch=a.batch, rounds=a.rounds)


if __name__ == "__main__":
    main()
