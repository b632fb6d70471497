"""Epochs trained and best top-1 of the same search under ASHA and under FIFO, side by side.

The same seeded set of N = 24 configs of digitnet on the bundled digits data (gating.density from
{0.25, 0.5, 0.75, 1.0}, train.optimizer.lr log-uniform in [0.01, 0.2], gating.weight log-uniform in
[1e-8, 1e-5], drawn by Optuna's random sampler seeded with --seed, which ignores results, so both
searches draw the same configs in the same order; the bench checks it), E = 8 epochs each (cosine
learning rate over 8 epochs), run twice on one local Ray instance, two trials at a time (1 CPU each):

  asha   gatetune's ASHA on top-1 (grace period 1, reduction factor 2: rungs at epochs 1, 2, 4, 8)
  fifo   every trial to epoch 8

Both run folders are read with gatetune.results (`epochs` = the last epoch each trial reached).
ratio = epochs ASHA trained / epochs FIFO trained (goal <= 0.35); met=yes only if also ASHA's best
top-1 is within 0.5 points of FIFO's (the digits validation split has 360 images: 1 image = 0.28 pt).
Epoch counts do not depend on the machine's speed except through the order results arrive in.

Why random configs and not a `grid`: a grid runs its points in product order (all density-0.25 trials
first, dense ones last), each trial better than the ones before it, which is asynchronous ASHA's worst
case (early trials are promoted while the rungs hold only weaker ones): replaying 24 grid curves in that
order gave 65% of FIFO's epochs, against 39% on average over random orders of the same curves.

    python bench/asha_vs_fifo.py                 # 24 configs x 8 epochs (~4 min on 2 quiet cores)
    python bench/asha_vs_fifo.py --trials 32 --seed 1
    python bench/asha_vs_fifo.py --quick         # smoke run: 4 configs x 2 epochs (tests/test_bench.py)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # as tests/conftest.py: no token file written
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import yaml  # noqa: E402

from gatetune import results  # noqa: E402
from gatetune.tuning import config as C  # noqa: E402
from gatetune.tuning.search import run_search  # noqa: E402

GOAL = 0.35       # ASHA epochs / FIFO epochs
TOP1_SLACK = 0.5  # points of top-1 ASHA's best may trail FIFO's
ROOT = Path(__file__).resolve().parent.parent
SPACE = {"gating.density": {"choice": [0.25, 0.5, 0.75, 1.0]}, "train.optimizer.lr": {"loguniform": [0.01, 0.2]},
         "gating.weight": {"loguniform": [1.0e-8, 1.0e-5]}}


def _search_file(folder: Path, scheduler: str, epochs: int, trials: int, seed: int, concurrent: int) -> Path:
    doc = {"_import": str(ROOT / "search_spaces" / "digits.yaml"), "name": f"asha_vs_fifo-{scheduler}",
           "seed": seed, "train": {"epochs": epochs, "keep_checkpoints": 1},
           "search": {"num_samples": trials, "sampler": "random",
                      "scheduler": {"name": scheduler, "grace_period": 1, "reduction_factor": 2},
                      "resources": {"cpu": 1, "gpu": 0}, "max_concurrent": concurrent, "max_failures": 0},
           "space": SPACE}
    path = folder / f"{scheduler}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _configs(df) -> list[tuple]:
    """The trials' sampled values, rounded, sorted: equal for both searches when they drew the same configs."""
    return sorted(tuple(round(float(row[k]), 12) for k in SPACE) for _, row in df.iterrows())


def run(file: Path, storage: str, verbose: bool) -> tuple[dict, object]:
    cfg = C.load(str(file))
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    t = time.perf_counter()
    with sink:
        run_dir, ok = run_search(cfg, storage=storage, name=cfg.name)
    wall = time.perf_counter() - t
    df = results.table(run_dir)
    bad = df["status"].isin(["error", "diverged", "pending", "running"])
    if not ok or bad.any():
        print(f"{run_dir}: {int(bad.sum())} trials errored, diverged or did not finish:\n"
              + df[["trial_id", "status", "epochs", "top1"]].to_string(), file=sys.stderr)
    best = df.loc[df["top1"].idxmax()]
    return {"wall": wall, "trials": len(df), "epochs": int(df["epochs"].sum()), "top1": float(best["top1"]),
            "best": {k: best[k] for k in SPACE}, "configs": _configs(df),
            "stopped": int((df["status"] == "stopped").sum()),
            "completed": int((df["status"] == "completed").sum())}, df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=24, help="configs (N), the same in both searches")
    ap.add_argument("--epochs", type=int, default=8, help="max epochs per trial (ASHA rungs 1, 2, 4, ...)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the config draw and the training")
    ap.add_argument("--cpus", type=int, default=2, help="Ray num_cpus; trials take 1 CPU each, this many at once")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 configs x 2 epochs")
    ap.add_argument("--verbose", action="store_true", help="show the searches' own output")
    a = ap.parse_args()
    if a.quick:
        a.trials, a.epochs = 4, 2

    import ray
    t = time.perf_counter()
    ray.init(num_cpus=a.cpus, include_dashboard=False, address="local", log_to_driver=False,
             object_store_memory=200 * 1024 ** 2)
    print(f"{a.trials} configs (random, seed {a.seed}) x {a.epochs} epochs of digitnet on digits, {a.cpus} trials "
          f"at a time (1 CPU each); ray start {time.perf_counter() - t:.1f} s", flush=True)
    out = {}
    try:
        with tempfile.TemporaryDirectory(prefix="gatetune-bench-") as tmp:
            for sched in ("asha", "fifo"):
                file = _search_file(Path(tmp), sched, a.epochs, a.trials, a.seed, a.cpus)
                out[sched], df = run(file, tmp, a.verbose)
                r = out[sched]
                print(f"{sched:<4}: {r['trials']} trials ({r['completed']} completed, {r['stopped']} stopped), "
                      f"{r['epochs']:4d} epochs trained, best top-1 {r['top1']:.2f}% "
                      f"({', '.join(f'{k}={v:.3g}' for k, v in r['best'].items())}), {r['wall']:.0f} s", flush=True)
                if sched == "asha":
                    reached = df["epochs"].value_counts().sort_index()
                    print("      last epoch reached: " + ", ".join(f"{int(e)}: {c} trials" for e, c in reached.items()))
    finally:
        ray.shutdown()
    asha, fifo = out["asha"], out["fifo"]
    if asha["configs"] != fifo["configs"]:
        raise SystemExit("bench asha_vs_fifo: the two searches drew different configs; the comparison is void")
    ratio = asha["epochs"] / fifo["epochs"]
    gap = fifo["top1"] - asha["top1"]
    met = ratio <= GOAL and gap <= TOP1_SLACK
    print(f"ASHA trained {ratio:.1%} of FIFO's epochs in {asha['wall'] / fifo['wall']:.0%} of its wall time; "
          f"best top-1 {asha['top1']:.2f}% vs {fifo['top1']:.2f}% (gap {gap:+.2f} pt, allowed {TOP1_SLACK}); "
          f"both searches ran the same {a.trials} configs")
    print(f"bench asha_vs_fifo: ratio={ratio:.3f} goal={GOAL} met={'yes' if met else 'no'} "
          f"best_top1_asha={asha['top1']:.2f} best_top1_fifo={fifo['top1']:.2f} epochs_asha={asha['epochs']} "
          f"epochs_fifo={fifo['epochs']} trials={a.trials} seed={a.seed} wall_s_asha={asha['wall']:.0f} "
          f"wall_s_fifo={fifo['wall']:.0f}")


if __name__ == "__main__":
    main()
