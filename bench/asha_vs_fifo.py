"""Epochs trained and best top-1 of the same configs under ASHA and under FIFO, side by side.

N = 48 seeded random configs of digitnet on the bundled digits data (gating.density from
{0.25, 0.5, 0.75, 1.0}, train.optimizer.lr log-uniform in [0.01, 0.2], gating.weight log-uniform in
[1e-8, 1e-5]: the configs a `sampler: random` search seeded with --seed draws), E = 8 epochs each
(cosine learning rate over 8 epochs), on one local Ray instance, two trials at a time (1 CPU each):

  fifo   every config to epoch 8, once, in the order drawn
  asha   gatetune's ASHA on top-1, grace period 1, reduction factor 4 (rungs at epochs 1, 4; a trial that
         passes epoch 4 trains to 8), `recheck` on; once per order: the same configs in --orders seeded
         shuffles

Each search gets its configs through search.start_from (Optuna evaluates them first, in that order), so
every run trains exactly the same configs; the bench checks it. Asynchronous ASHA's decisions depend on
the order results arrive in, hence several orders and their mean. Run folders are read with
gatetune.results (`epochs` = the last epoch each trial reached). ratio = epochs ASHA trained / epochs FIFO
trained, the mean over orders (goal <= 0.35); met=yes only if also ASHA's best top-1, averaged over the
orders, is within 0.5 points of FIFO's (the digits validation split has 360 images: 1 image = 0.28 pt).
Epoch counts do not depend on the machine's speed except through the order results arrive in.
How these settings were chosen (replayed curves, 150 orders each): README.md, Performance.

Why random configs and not a `grid`: a grid runs its points in product order (all density-0.25 trials
first, dense ones last), each trial better than the ones before it, asynchronous ASHA's worst case.

    python bench/asha_vs_fifo.py                  # 48 configs x 8 epochs, 3 orders (~20 min on 2 quiet cores)
    python bench/asha_vs_fifo.py --trials 24 --reduction-factor 2 --no-recheck   # the previous setting
    python bench/asha_vs_fifo.py --quick          # smoke run: 4 configs x 2 epochs (tests/test_bench.py)
"""
from __future__ import annotations

import contextlib
import io
import random
import sys
import tempfile
import time
from pathlib import Path

import benchlib

benchlib.ray_environment()   # before ray's import

import optuna  # noqa: E402
import yaml  # noqa: E402

from gatetune import results  # noqa: E402
from gatetune.core.dotted import set_dotted  # noqa: E402
from gatetune.tuning import config as C  # noqa: E402
from gatetune.tuning.search import space as S  # noqa: E402
from gatetune.tuning.search.run import run_search  # noqa: E402

GOAL = 0.35       # ASHA epochs / FIFO epochs
TOP1_SLACK = 0.5  # points of top-1 ASHA's best may trail FIFO's
ROOT = Path(__file__).resolve().parent.parent
SPACE = {"gating.density": {"choice": [0.25, 0.5, 0.75, 1.0]}, "train.optimizer.lr": {"loguniform": [0.01, 0.2]},
         "gating.weight": {"loguniform": [1.0e-8, 1.0e-5]}}


DEVICE = "cpu"    # --device: cuda trains each trial on a share of one GPU (1 / the trials at once)


def _search_doc(name: str, scheduler: dict, epochs: int, trials: int, seed: int, concurrent: int) -> dict:
    gpu = {"device": "cuda"} if DEVICE == "cuda" else {}
    return {"_import": str(ROOT / "search_spaces" / "digits.yaml"), "name": name, "seed": seed,
            "train": {"epochs": epochs, "keep_checkpoints": 1, **gpu},
            "search": {"num_samples": trials, "sampler": "random", "scheduler": scheduler,
                       "resources": {"cpu": 1, "gpu": 1 / concurrent if gpu else 0}, "max_concurrent": concurrent,
                       "max_failures": 0},
            "space": SPACE}


def draw_configs(folder: Path, epochs: int, trials: int, seed: int) -> list[dict]:
    """The configs a `sampler: random` search seeded with `seed` draws, in its order (its own define-by-run
    function on a study with the same sampler)."""
    path = folder / "draw.yaml"
    path.write_text(yaml.safe_dump(_search_doc("draw", {"name": "fifo"}, epochs, trials, seed, 1), sort_keys=False))
    plan = S.prepare(C.load(str(path)), str(path))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), direction="maximize")
    space = S.define_by_run(plan.params, plan.base)
    return [space(study.ask()) for _ in range(trials)]


def _search_file(folder: Path, name: str, scheduler: dict, configs: list[dict], epochs: int, seed: int,
                 concurrent: int) -> Path:
    """A search whose trials are exactly `configs`, in this order (one start_from file each)."""
    starts = []
    for i, params in enumerate(configs):
        doc: dict = {}
        for key, value in params.items():
            set_dotted(doc, key, value)
        start = folder / f"{name}-{i:03d}.yaml"
        start.write_text(yaml.safe_dump(doc))
        starts.append(str(start))
    doc = _search_doc(f"asha_vs_fifo-{name}", scheduler, epochs, len(configs), seed, concurrent)
    doc["search"]["start_from"] = starts
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _configs(df) -> list[tuple]:
    """The trials' sampled values, rounded, sorted: equal for two searches that ran the same configs."""
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


def _line(label: str, r: dict, df, fifo_epochs: int | None) -> str:
    ratio = f", ratio {r['epochs'] / fifo_epochs:.3f}" if fifo_epochs else ""
    reached = df["epochs"].value_counts().sort_index()
    return (f"{label:<12}: {r['trials']} trials ({r['completed']} completed, {r['stopped']} stopped), {r['epochs']:4d} "
            f"epochs trained{ratio}, best top-1 {r['top1']:.2f}% "
            f"({', '.join(f'{k}={v:.3g}' for k, v in r['best'].items())}), {r['wall']:.0f} s; last epoch reached: "
            + ", ".join(f"{int(e)}: {c}" for e, c in reached.items()))


def main() -> None:
    ap = benchlib.parser("asha_vs_fifo", __doc__, quick="smoke run: 4 configs x 2 epochs", verbose=True,
                         device_help="where the trials train (cuda: the trials at once share one GPU)")
    ap.add_argument("--trials", type=int, default=48, help="configs (N), the same in every search")
    ap.add_argument("--epochs", type=int, default=8, help="max epochs per trial")
    ap.add_argument("--seed", type=int, default=0, help="seeds the config draw, the orders and the training")
    ap.add_argument("--orders", type=int, default=3, help="ASHA runs: the configs in this many seeded shuffles")
    ap.add_argument("--reduction-factor", type=int, default=4, help="ASHA's reduction factor (grace period 1)")
    ap.add_argument("--no-recheck", dest="recheck", action="store_false",
                    help="plain ASHA: a trial's promotion at a rung is never revisited")
    ap.add_argument("--cpus", type=int, default=2, help="Ray num_cpus; trials take 1 CPU each, this many at once")
    a = ap.parse_args()
    if a.device == "cuda":
        global DEVICE
        DEVICE = "cuda"
    if a.quick:
        a.trials, a.epochs = 4, 2
    asha = {"name": "asha", "grace_period": 1, "reduction_factor": a.reduction_factor, "recheck": a.recheck}

    import ray
    t = time.perf_counter()
    ray.init(num_cpus=a.cpus, include_dashboard=False, address="local", log_to_driver=False,
             object_store_memory=200 * 1024 ** 2)
    print(f"{a.trials} configs (random, seed {a.seed}) x {a.epochs} epochs of digitnet on digits, {a.cpus} trials "
          f"at a time (1 CPU each); ASHA: grace 1, reduction factor {a.reduction_factor}, recheck "
          f"{'on' if a.recheck else 'off'}, {a.orders} orders; ray start {time.perf_counter() - t:.1f} s", flush=True)
    runs = []
    try:
        with tempfile.TemporaryDirectory(prefix="gatetune-bench-") as tmp:
            configs = draw_configs(Path(tmp), a.epochs, a.trials, a.seed)
            fifo, df = run(_search_file(Path(tmp), "fifo", {"name": "fifo"}, configs, a.epochs, a.seed, a.cpus),
                           tmp, a.verbose)
            print(_line("fifo", fifo, df, None), flush=True)
            for k in range(1, a.orders + 1):
                order = list(configs)
                random.Random(a.seed * 1000 + k).shuffle(order)
                r, df = run(_search_file(Path(tmp), f"asha-order{k}", asha, order, a.epochs, a.seed, a.cpus),
                            tmp, a.verbose)
                if r["configs"] != fifo["configs"]:
                    raise SystemExit(f"bench asha_vs_fifo: ASHA order {k} ran other configs than FIFO; the comparison "
                                     "is void")
                runs.append(r)
                print(_line(f"asha order {k}", r, df, fifo["epochs"]), flush=True)
    finally:
        ray.shutdown()
    ratios = [r["epochs"] / fifo["epochs"] for r in runs]
    tops = [r["top1"] for r in runs]
    ratio, top1 = sum(ratios) / len(ratios), sum(tops) / len(tops)
    gap = fifo["top1"] - top1
    met = ratio <= GOAL and gap <= TOP1_SLACK
    wall = sum(r["wall"] for r in runs) / len(runs)
    print(f"ASHA trained {ratio:.1%} of FIFO's epochs on average over {len(runs)} orders "
          f"({', '.join(f'{x:.1%}' for x in ratios)}) in {wall / fifo['wall']:.0%} of its wall time; best top-1 "
          f"{top1:.2f}% on average ({', '.join(f'{x:.2f}' for x in tops)}) vs {fifo['top1']:.2f}% (gap {gap:+.2f} pt, "
          f"allowed {TOP1_SLACK}); every search ran the same {a.trials} configs")
    benchlib.final_line("asha_vs_fifo", f"{ratio:.3f}", GOAL, met, ratios=",".join(f"{x:.3f}" for x in ratios),
                        best_top1_asha=f"{top1:.2f}", best_top1_asha_orders=",".join(f"{x:.2f}" for x in tops),
                        best_top1_fifo=f"{fifo['top1']:.2f}", gap=f"{gap:.2f}",
                        epochs_asha=",".join(str(r["epochs"]) for r in runs), epochs_fifo=fifo["epochs"],
                        trials=a.trials, orders=len(runs), seed=a.seed, reduction_factor=a.reduction_factor,
                        recheck=a.recheck, wall_s_asha=f"{wall:.0f}", wall_s_fifo=f"{fifo['wall']:.0f}")


if __name__ == "__main__":
    main()
