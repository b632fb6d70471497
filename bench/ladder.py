"""The density ladder (search.ladder) against independent trials: the compute each needs to the density curve.

Both sides start from the same dense network (trained once here and cached: `gatetune train` with
gating.gate=none), search the same space (gate-loss weight, learning rate; on digits also which layers
gate) with Optuna's TPE, run 2 trials at a time on the 2 cores, and stop laggards with one ASHA per
density (asha_by_density, grace 1, reduction factor 2):

  independent   gating.density as a grid over the densities, num_samples trials per density, each
                fine-tuning the dense weights for E_ind epochs (what gatetune did before the ladder)
  ladder        search.ladder over the same densities, trials_per_step per step, each training E_lad
                epochs from the best completed trial of the step above (the first from the dense weights)

Each side's front: the best completed top-1 at each density. The better front: the higher of the two at
each density. Each side's trial-epochs (and wall) to a front within SLACK (0.5) points of the better
front at every density: its results replayed in the order they arrived, epochs counted as they were
trained, the running best of completed trials compared after each. ratio = the ladder's trial-epochs to
that front / the independent trials'; goal <= 0.5. A side that never gets there counts its whole search
and the line says at which densities it fell short: if only the independent trials fall short the ratio
is 0 (the ladder got there, they never did); if the ladder does, met=no.

Workloads (the space and the budgets are in WORKLOADS below; each gives the ladder at most half the
independent trials' trial-epochs: trials_per_step x E_lad = per_density x E_ind / 2):
  digits   digitnet on the bundled digits (1,438 train / 359 val), densities 0.75 0.5 0.35 0.25
  cifar    resnet20 on a 2,000-train / 1,000-val slice of the bundled CIFAR-10 JPEG subset (the first
           200 / 100 images of each class of data/cifar10-subset, linked into a temporary folder),
           conv1 dense, densities 0.75 0.5 0.3

    python bench/ladder.py                    # both workloads (~3.5 min on 2 cores)
    python bench/ladder.py --workload digits  # one of them
    python bench/ladder.py --quick            # smoke run: digits, 2 densities, 1 trial per step (tests/test_bench.py)
    python bench/ladder.py --device cuda      # trials on the GPU (0.5 GPU each)
The final line's ratio is the cifar workload's when it ran (the natural images are the question), else digits'.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

benchlib.ray_environment(dedup_logs=True)

GOAL = 0.5
SLACK = 0.5   # points of top-1
ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(tempfile.gettempdir()) / "gatetune-bench-ladder"

WORKLOADS = {
    "digits": dict(
        file="search_spaces/ladder.yaml", densities=[0.75, 0.5, 0.35, 0.25], dense_epochs=6,
        independent=dict(per_density=3, epochs=6), ladder=dict(per_step=3, epochs=3),
        common=[]),
    "cifar": dict(
        file="cifar-bench.yaml", densities=[0.75, 0.5, 0.3], dense_epochs=8,
        independent=dict(per_density=2, epochs=4), ladder=dict(per_step=2, epochs=2), common=[]),
}
# search_spaces/cifar10_demo.yaml's model, data, gating and training, with TPE on top-1 and no confirmation
CIFAR_YAML = """\
name: cifar-bench
seed: 0
model: {name: resnet20}
data: {dataset: folder}
gating: {density: 0.5, weight: 1.0e-8, gate: "layer*", trainable: all}
train:
  batch_size: 128
  keep_checkpoints: 1
  optimizer: {name: sgd, lr: 0.02, momentum: 0.9, weight_decay: 5.0e-4, nesterov: true}
  lr_schedule: {name: cosine}
search:
  sampler: tpe
  resources: {cpu: 1, gpu: 0}
space:
  gating.weight: {loguniform: [1.0e-8, 1.0e-5]}
  train.optimizer.lr: {loguniform: [0.01, 0.03]}
"""
QUICK = dict(densities=[0.75, 0.5], dense_epochs=2, independent=dict(per_density=1, epochs=2),
             ladder=dict(per_step=1, epochs=1))


def cifar_slice(train: int = 200, val: int = 100) -> Path:
    """The first `train` / `val` images of each class of the bundled subset, as symlinks."""
    out = CACHE / f"cifar-{train}-{val}"
    if (out / ".done").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    src = ROOT / "data" / "cifar10-subset"
    for split, n in (("train", train), ("val", val)):
        for cls in sorted(p.name for p in (src / split).iterdir() if p.is_dir()):
            (out / split / cls).mkdir(parents=True)
            for f in sorted((src / split / cls).iterdir())[:n]:
                (out / split / cls / f.name).symlink_to(f)
    (out / ".done").touch()
    return out


def config_file(w: dict) -> Path:
    if w["file"] == "cifar-bench.yaml":
        CACHE.mkdir(parents=True, exist_ok=True)
        (CACHE / w["file"]).write_text(CIFAR_YAML)
        return CACHE / w["file"]
    return ROOT / w["file"]


def dense_start(name: str, w: dict, data: list[str], device: str) -> tuple[str, float]:
    """The dense network both sides start from (trained once per workload and setting, then cached)."""
    from gatetune.tuning import config as C
    from gatetune.tuning.train.run import train_run
    out = CACHE / f"dense-{name}-{w['dense_epochs']}-{device}"
    cfg = C.load(str(config_file(w)), [*data, "gating.gate=none", f"train.epochs={w['dense_epochs']}",
                                         "train.optimizer.lr=0.1", "search=null", "space=null",
                                         f"train.device={device}"])
    t = time.perf_counter()
    _, metrics = train_run(cfg, out, progress=False)
    print(f"dense start: {metrics['top1']:.2f}% top-1 after {w['dense_epochs']} epochs "
          f"({time.perf_counter() - t:.0f} s; {out})", flush=True)
    return max(glob.glob(str(out / "checkpoints" / "epoch_*.pt"))), float(metrics["top1"])


def search(tmp: Path, tag: str, w: dict, side: str, overrides: list[str], verbose: bool) -> dict:
    from gatetune import results
    exe = Path(sys.executable).with_name("gatetune")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gatetune.tuning.cli"]
    cmd += ["search", str(config_file(w)), *overrides, "--storage", str(tmp), "--name", f"{tag}-{side}"]
    t = time.time()
    p = subprocess.run(cmd, capture_output=not verbose, text=True, cwd=ROOT)
    wall = time.time() - t
    if p.returncode != 0:
        raise SystemExit(f"bench ladder: the {side} search failed (exit {p.returncode}):\n"
                         + (p.stdout or "")[-3000:] + (p.stderr or "")[-2000:])
    run_dir = tmp / f"{tag}-{side}"
    df = results.table(run_dir)
    _, history = results.collect(run_dir)
    return {"wall": wall, "df": df, "history": history}


def fronts(df) -> dict[float, float]:
    done = df[df["status"] == "completed"]
    return {round(float(d), 4): float(g["top1"].max()) for d, g in done.groupby("target_density")}


def to_front(run: dict, better: dict[float, float]) -> dict:
    """Trial-epochs and seconds (from the first result) until the running front is within SLACK of `better`."""
    h = run["history"].sort_values(["timestamp", "time_total_s"]).reset_index(drop=True)
    status = run["df"].set_index("trial_id")
    budget = run["df"].set_index("trial_id")["epochs"]
    target = status["target_density"].round(4)
    best: dict[float, float] = {}
    t0 = h["timestamp"].min() - float(h.iloc[0]["time_this_iter_s"])
    for i, row in h.iterrows():
        tid = row["trial_id"]
        if status.loc[tid, "status"] == "completed" and row["epoch"] >= budget.loc[tid]:
            d = float(target.loc[tid])
            best[d] = max(best.get(d, -1.0), float(row["top1"]))
        if all(best.get(d, -1.0) >= b - SLACK for d, b in better.items()):
            return {"epochs": i + 1, "seconds": float(row["timestamp"] - t0), "reached": True, "short": []}
    short = [f"{d:g}" for d, b in better.items() if best.get(d, -1.0) < b - SLACK]
    return {"epochs": len(h), "seconds": float(h["timestamp"].max() - t0), "reached": False, "short": short}


def workload(name: str, a, tmp: Path, round_no: int) -> dict:
    w = {**WORKLOADS[name], **(QUICK if a.quick else {})}
    data = [f"data.root={cifar_slice()}"] if name == "cifar" else []
    weights, dense_top1 = dense_start(name, w, data, a.device)
    gpu = ["search.resources.gpu=0.5", "train.device=cuda"] if a.device == "cuda" else []
    common = [*data, *w["common"], "search.pretrain=null", f"model.weights={weights}", "search.max_concurrent=2",
              "search.scheduler={name: asha_by_density, grace_period: 1, reduction_factor: 2}", *gpu]
    dens = "[" + ", ".join(f"{d:g}" for d in w["densities"]) + "]"
    ind, lad = w["independent"], w["ladder"]
    runs = {}
    for side in (("independent", "ladder") if round_no % 2 == 0 else ("ladder", "independent")):
        if side == "independent":
            extra = ["search.ladder=null", f"space.gating.density={{grid: {dens}}}",
                     f"search.num_samples={ind['per_density']}", f"train.epochs={ind['epochs']}"]
        else:
            extra = [f"search.ladder={{densities: {dens}, trials_per_step: {lad['per_step']}}}",
                     f"train.epochs={lad['epochs']}"]
        runs[side] = search(tmp, f"{name}-{round_no}", w, side, [*common, *extra], a.verbose)
    fr = {s: fronts(r["df"]) for s, r in runs.items()}
    better = {d: max(fr[s].get(d, -1.0) for s in fr) for d in (round(x, 4) for x in w["densities"])}
    out = {"dense": dense_top1, "better": better}
    for s, r in runs.items():
        reach = to_front(r, better)
        out[s] = {"front": fr[s], "total": int(r["df"]["epochs"].sum()), "wall": r["wall"], **reach}
        print(f"  {name} {s:<11}: {reach['epochs']:3d} trial-epochs to the front ({reach['seconds']:.0f} s of "
              f"trials; {'reached' if reach['reached'] else 'never, short at ' + ','.join(reach['short'])}); "
              f"{out[s]['total']} trial-epochs in all, {r['wall']:.0f} s wall; front "
              + " ".join(f"{d:g}:{fr[s].get(d, float('nan')):.2f}" for d in better), flush=True)
    lad_, ind_ = out["ladder"], out["independent"]
    if lad_["reached"] and not ind_["reached"]:   # only the ladder got there: the independent trials, never
        out["ratio"] = 0.0
    else:   # neither: the trial-epochs of the whole searches (met=no; the line names the densities short)
        out["ratio"] = lad_["epochs"] / ind_["epochs"]
    out["met"] = out["ratio"] <= GOAL and lad_["reached"]
    print(f"  {name}: ladder / independent trial-epochs to the better front = {out['ratio']:.2f} "
          f"(better front " + " ".join(f"{d:g}:{b:.2f}" for d, b in better.items()) + f"; dense {dense_top1:.2f})",
          flush=True)
    return out


def main() -> None:
    ap = benchlib.parser("ladder", __doc__, quick="smoke run: digits, 2 densities, 1 trial per step", verbose=True)
    ap.add_argument("--workload", choices=["digits", "cifar", "both"], default="both")
    a = ap.parse_args()
    names = ["digits"] if a.quick else (["digits", "cifar"] if a.workload == "both" else [a.workload])
    print(f"bench ladder on {benchlib.device_name(a.device)}: {', '.join(names)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-ladder-") as d:
        got = {n: workload(n, a, Path(d), 0) for n in names}
    last = got[names[-1]]
    benchlib.final_line("ladder", f"{last['ratio']:.2f}", GOAL, last["met"], workload=names[-1],
                        ladder_epochs=last["ladder"]["epochs"], independent_epochs=last["independent"]["epochs"],
                        ladder_s=f"{last['ladder']['seconds']:.0f}", independent_s=f"{last['independent']['seconds']:.0f}",
                        digits_ratio=f"{got['digits']['ratio']:.2f}" if "digits" in got and len(got) > 1 else None,
                        short=",".join(last["ladder"]["short"]) or None, device=a.device if a.device != "cpu" else None)


if __name__ == "__main__":
    main()
