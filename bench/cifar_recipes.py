"""The full-scale CIFAR-10 recipes (search_spaces/cifar10_resnet20.yaml, cifar10_mcifarnet.yaml), short:
each recipe's own search (its dense pretraining, then one gated fine-tune from it at density 0.5, no seed
confirmation) for a few epochs on the data at hand, timed, and the full recipe's time extrapolated.

Data: --root with --dataset folder (default: the bundled JPEG subset, data/cifar10-subset) or cifar10 (a
folder holding cifar-10-batches-py). Throughput is the training loop's `images_per_s` (training steps
only), per trial the median over its epochs after the first. The full recipe's time on this device:

  pretrain epochs x 50,000 / dense img/s  +  gated trials x epochs x 50,000 / gated img/s / trials at once

with every gated trial training its full budget (ASHA stops some: an upper bound), the seed replicas
counted (confirm.seeds - 1 per front config, assumed all of the grid's densities), trials at once = 1 /
search.resources.gpu (the recipe's sharing; assumes sharing costs nothing, see bench/gpu_throughput.py).

ratio = gated img/s / dense img/s of the same network on the same device; goal >= 0.5: FBS training (the
saliency predictor, top-k and the masked convolutions, all computed densely) at most doubles the time of
an epoch. The goal is a judgement, not a measured baseline.

    python bench/cifar_recipes.py                              # cuda, both recipes, 3 epochs each
    python bench/cifar_recipes.py --root /data --dataset cifar10 --epochs 5
    python bench/cifar_recipes.py --device cpu --quick         # smoke run (tests/test_bench.py)

On a machine without CUDA, --device cuda (the default) stops with one line.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import benchlib

benchlib.ray_environment()   # before ray's import

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("cifar10_resnet20", "cifar10_mcifarnet")
GOAL = 0.5
FULL_TRAIN = 50_000   # CIFAR-10's training images


def small_copy(src: Path, dst: Path, per_class: int) -> Path:
    """The first `per_class` images of each class of a train/ + val/ folder (the quick smoke run)."""
    for split in ("train", "val"):
        for c in sorted(os.listdir(src / split)):
            (dst / split / c).mkdir(parents=True)
            for f in sorted(os.listdir(src / split / c))[:per_class]:
                shutil.copy(src / split / c / f, dst / split / c / f)
    return dst


def run(recipe: str, a, storage: Path) -> dict:
    """The short search of one recipe: dense and gated img/s, top-1, and the full recipe's hours."""
    from gatetune import results
    from gatetune.tuning import config as C
    from gatetune.tuning.search.run import run_search
    path = ROOT / "search_spaces" / f"{recipe}.yaml"
    full = C.load(str(path), [f"data.dataset={a.dataset}", f"data.root={a.root}"])
    resources = "{cpu: 1, gpu: 0}" if a.device == "cpu" else "{cpu: 2, gpu: 1}"
    short = [f"data.dataset={a.dataset}", f"data.root={a.root}", f"train.device={a.device}",
             f"search.pretrain.epochs={a.epochs}", f"train.epochs={a.epochs}", "search.num_samples=1",
             "space.gating.density={grid: [0.5]}", "search.confirm=null", "train.keep_checkpoints=1",
             "search.scheduler={name: fifo}",
             f"train.batch_size={a.batch}", f"search.resources={resources}",
             f"search.pretrain.resources={resources}"]
    if a.device == "cpu":
        short.append("train.threads=1")
    cfg = C.load(str(path), short)
    sink = contextlib.nullcontext() if a.verbose else contextlib.redirect_stdout(io.StringIO())
    t = time.perf_counter()
    with sink:
        run_dir, ok = run_search(cfg, storage=str(storage), name=recipe)
    wall = time.perf_counter() - t
    df = results.table(run_dir)
    if not ok or int((df["status"] == "completed").sum()) != 2:
        raise SystemExit(f"bench cifar_recipes: the short {recipe} search in {run_dir} did not complete its two "
                         f"trials:\n{df[['trial_id', 'status', 'epochs']]}")
    _, history = results.collect(run_dir)
    steady = history[history["epoch"] > 1] if a.epochs > 1 else history
    ips = steady.groupby("trial_id")["images_per_s"].median()
    pre = df[df["pretrain"]].iloc[0]
    gated = df[~df["pretrain"]].iloc[0]
    dense_ips, gated_ips = float(ips[pre["trial_id"]]), float(ips[gated["trial_id"]])
    search = full.search
    grid = len(full.space["gating.density"]["grid"])
    trials = search.num_samples * grid + ((search.confirm.seeds - 1) * grid if search.confirm else 0)
    at_once = max(1, round(1 / search.resources.gpu)) if search.resources.gpu else 1
    hours = (search.pretrain.epochs * FULL_TRAIN / dense_ips
             + trials * full.train.epochs * FULL_TRAIN / gated_ips / at_once) / 3600
    return {"dense_ips": dense_ips, "gated_ips": gated_ips, "ratio": gated_ips / dense_ips, "hours": hours,
            "trials": trials, "at_once": at_once, "wall": wall, "dense_top1": float(pre["top1"]),
            "gated_top1": float(gated["top1"]), "macs_ratio": float(gated["macs_ratio"]),
            "pretrain_epochs": search.pretrain.epochs, "epochs": full.train.epochs}


def main() -> None:
    ap = benchlib.parser("cifar_recipes", __doc__, device="cuda",
                         quick="smoke run: resnet20, 20 images per class, 1 epoch", verbose=True)
    ap.add_argument("--dataset", choices=["folder", "cifar10"], default="folder")
    ap.add_argument("--root", default=str(ROOT / "data" / "cifar10-subset"))
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the dense and of the gated trial")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    a = ap.parse_args()
    recipes = a.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        sys.exit(f"bench cifar_recipes: --recipes {','.join(unknown)}: not one of {', '.join(RECIPES)}")
    where = benchlib.device_name(a.device)
    import ray
    with tempfile.TemporaryDirectory(prefix="gatetune-bench-") as tmp:
        if a.quick:   # a throwaway copy: its decoded cache goes with it
            os.environ["GATETUNE_CACHE_DIR"] = str(Path(tmp, "cache"))
            a.root, a.dataset, a.epochs, a.batch, recipes = str(small_copy(Path(a.root), Path(tmp, "data"), 20)), \
                "folder", 1, 32, ["cifar10_resnet20"]
        benchlib.start_ray(a.device)
        print(f"torch {torch.__version__}, {where}; data.dataset={a.dataset} data.root={a.root}; {a.epochs} "
              f"epoch(s) of dense pretraining and of one gated fine-tune (density 0.5) per recipe", flush=True)
        out = {}
        try:
            for r in recipes:
                res = out[r] = run(r, a, Path(tmp, "runs"))
                print(f"{r}: dense {res['dense_ips']:.0f} img/s (top-1 {res['dense_top1']:.2f}), gated "
                      f"{res['gated_ips']:.0f} img/s (top-1 {res['gated_top1']:.2f}, macs_ratio "
                      f"{res['macs_ratio']:.3f}), ratio {res['ratio']:.2f}; the full recipe ({res['pretrain_epochs']} "
                      f"dense epochs, {res['trials']} gated trials x {res['epochs']} epochs, {res['at_once']} at "
                      f"once) takes about {res['hours']:.1f} h here; short search {res['wall']:.0f} s", flush=True)
        finally:
            ray.shutdown()
    ratio = min(res["ratio"] for res in out.values())
    hours = {f"{r.removeprefix('cifar10_')}_full_h": f"{res['hours']:.1f}" for r, res in out.items()}
    benchlib.final_line("cifar_recipes", f"{ratio:.2f}", GOAL, ratio >= GOAL, **hours, device=a.device,
                        where=where.replace(" ", "_"), dataset=a.dataset, epochs=a.epochs)


if __name__ == "__main__":
    main()
