"""Per-trial orchestration overhead of a gatetune search against the same trials in a plain loop.

The same N fixed digits configs (a grid over gating.density x gating.weight, digitnet, E epochs each)
run three ways in one process, side by side:

  plain   data load + N x tuning.train.fit, one after another in this process (torch and sklearn
          already imported), with the threads a trial gets (--cpus); timed before and after the searches
  search  tuning.search.run_search on a local Ray (num_cpus=--cpus): FIFO, so every trial runs all its
          epochs, one trial at a time with all --cpus CPUs, so trials get the CPUs the plain loop had; twice:
            reuse   gatetune's settings (reuse_actors=True: one worker process runs trial after trial)
            fresh   Ray Tune's default (reuse_actors=False: a new worker process per trial)

What is counted. run_search's wall time (Ray already started) splits at the driver's callbacks into
  setup    start -> the first trial's actor is ready: config checks, Optuna study (SQLite), Tuner,
           the first worker process and its imports (torch, gatetune)
  trial i  the previous trial completed -> trial i completed (i >= 2; trial 1: its start -> completed):
           its training plus everything Ray adds per trial: trial creation (Optuna suggest), actor
           start or reset, the trainable's setup and data load (cached per worker process with reuse),
           per-epoch checkpoint + report, Ray's result processing and experiment-state saves
  finish   last trial completed -> return: Tuner teardown, report.csv/md, pareto.png, the Pareto
           trials' latency_ratio
    overhead per trial = mean over trials 2..N of (trial i - plain fit of the same config)   ratio=, goal 0.5 s
                         (the median is printed too: on a shared machine it shrugs off other jobs' bursts)
    once per search    = setup + trial 1's extra (the worker's first data load) + finish, and Ray's start
                         (ray.init, ~7 s on 2 cores): paid once, whatever N, not charged per trial
    all-in per trial   = (run_search wall - plain loop) / N: the brief's formula; fixed costs / N included
A config's plain time is the faster of its two plain fits (noise only adds time, so this errs against
Ray). The times are recorded by a Tune callback passed to run_search (it runs in this process); the
trials themselves run unmodified.

    python bench/overhead.py                    # 8 trials x 1 epoch, 2 CPUs, both reuse settings
    python bench/overhead.py --quick            # smoke run: 3 trials, reuse only (tests/test_bench.py)
    python bench/overhead.py --epochs 2 --only reuse
    python bench/overhead.py --device cuda      # trials and the plain loop on the GPU (search.resources.gpu: 1)
"""
from __future__ import annotations

import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchlib

benchlib.ray_environment()   # before ray's import

import torch  # noqa: E402

from gatetune.tuning import config as C  # noqa: E402
from gatetune.tuning.search import run as search_mod  # noqa: E402
from gatetune.tuning.search import space as S  # noqa: E402

GOAL = 0.5   # seconds of orchestration per trial, gatetune's settings
ROOT = Path(__file__).resolve().parent.parent
DENSITIES = [0.25, 0.5, 0.75, 1.0, 0.375, 0.625, 0.875, 0.125]
WEIGHTS = [1.0e-8, 1.0e-6]


def _search_yaml(folder: Path, trials: int, epochs: int, cpus: int, device: str = "cpu") -> Path:
    """A search file: digits.yaml plus a FIFO search over a fixed grid of exactly `trials` configs."""
    nd = max(1, min(len(DENSITIES), (trials + 1) // 2))
    nw = 2 if trials >= 2 and trials % 2 == 0 else 1
    if nd * nw != trials:
        nd, nw = trials, 1
    assert nd <= len(DENSITIES), f"at most {len(DENSITIES) * 2} trials"
    space = {"gating.density": {"grid": DENSITIES[:nd]}}
    if nw > 1:
        space["gating.weight"] = {"grid": WEIGHTS[:nw]}
    doc = {"_import": str(ROOT / "search_spaces" / "digits.yaml"), "name": "overhead",
           "train": {"epochs": epochs, "keep_checkpoints": 1, **({"device": "cuda"} if device == "cuda" else {})},
           "search": {"num_samples": 1, "scheduler": {"name": "fifo"}, "resources": {"cpu": cpus, "gpu": 0},
                      "max_concurrent": 1, "max_failures": 0},
           "space": space}
    if device == "cuda":   # one trial at a time with the whole GPU, as the plain loop has it
        doc["search"]["resources"]["gpu"] = 1
    import yaml
    path = folder / "overhead.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _key(point: dict) -> tuple:
    return tuple(sorted((k, float(v)) for k, v in point.items()))


def _configs(cfg: C.Config) -> dict[tuple, C.Config]:
    """The N trial configs, as the search's define-by-run builds them (its grid points), by grid point."""
    plan = S.prepare(cfg)
    return {_key(point): C.with_params(plan.base, point) for point in S.grid_points(plan.params)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":   # queued kernels belong to the step that queued them
        torch.cuda.synchronize()


def plain_loop(configs: dict[tuple, C.Config], cpus: int, device: str = "cpu") -> tuple[float, dict[tuple, float]]:
    """(data load seconds, fit seconds per config)."""
    from gatetune.tuning.data import load
    from gatetune.tuning.train.loop import fit
    torch.set_num_threads(cpus)
    dev = torch.device(device)
    first = next(iter(configs.values()))
    _sync(dev)
    t = time.perf_counter()
    data = load(first.data, dev, seed=first.seed)
    _sync(dev)
    load_s, fits = time.perf_counter() - t, {}
    for key, cfg in configs.items():
        t = time.perf_counter()
        fit(cfg, lambda metrics, state: None, data=data, device=dev)
        _sync(dev)
        fits[key] = time.perf_counter() - t
    return load_s, fits


def search(cfg: C.Config, storage: str, name: str, reuse: bool, verbose: bool) -> dict:
    """Time run_search (Ray already up), with the driver's trial start/complete times recorded by a Tune
    callback (it runs in this process; the trials are untouched)."""
    from ray.tune import Callback
    starts, ends = [], []   # (time, grid point of the trial)

    class Recording(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            starts.append((time.perf_counter(), _key(trial.config)))

        def on_trial_complete(self, iteration, trials, trial, **info):
            ends.append((time.perf_counter(), _key(trial.config)))

        def on_trial_error(self, iteration, trials, trial, **info):
            ends.append((time.perf_counter(), _key(trial.config)))

    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    t0 = time.perf_counter()
    with sink:
        run_dir, ok = search_mod.run_search(cfg, storage=storage, name=name, callbacks=[Recording()],
                                            reuse_actors=reuse)
    t1 = time.perf_counter()
    from gatetune import results
    df = results.table(run_dir)
    if not ok or not starts or not ends:
        raise SystemExit(f"bench overhead: the search in {run_dir} failed:\n{df[['trial_id', 'status']]}")
    ends.sort()
    # one trial at a time: trial i (i >= 2) takes from the previous trial's completion to its own
    cycles = [(ends[0][0] - starts[0][0], ends[0][1])] + \
        [(ends[i][0] - ends[i - 1][0], ends[i][1]) for i in range(1, len(ends))]
    return {"wall": t1 - t0, "setup": starts[0][0] - t0, "finish": t1 - ends[-1][0], "cycles": cycles,
            "trials": len(df), "epochs": int(df["epochs"].sum()),
            "completed": int((df["status"] == "completed").sum())}


def main() -> None:
    ap = benchlib.parser("overhead", __doc__, quick="smoke run: 3 trials, 1 epoch, reuse only", verbose=True,
                         device_help="where the trials and the plain loop train (cuda: one GPU, "
                                     "search.resources.gpu: 1)")
    ap.add_argument("--trials", type=int, default=8, help="N trials (a density x weight grid), at most 16")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=2, help="Ray num_cpus, and CPUs (threads) per trial")
    ap.add_argument("--only", choices=["reuse", "fresh"], help="measure one reuse_actors setting only")
    a = ap.parse_args()
    if a.quick:
        a.trials, a.epochs, a.only = 3, 1, a.only or "reuse"
    if a.trials < 2:
        ap.error("--trials must be at least 2 (the first trial is set apart)")
    settings = [s for s in ("reuse", "fresh") if a.only in (None, s)]

    with tempfile.TemporaryDirectory(prefix="gatetune-bench-") as tmp:
        cfg = C.load(str(_search_yaml(Path(tmp), a.trials, a.epochs, a.cpus, a.device)))
        configs = _configs(cfg)
        n = len(configs)
        print(f"torch {torch.__version__}, {n} trials x {a.epochs} epoch(s) of {cfg.model.name} on "
              f"{cfg.data.dataset}, {a.cpus} CPU(s) per trial{', 1 GPU' if a.device == 'cuda' else ''}, one trial at a time",
              flush=True)

        import sklearn.datasets  # noqa: F401  (imported once per process; the plain loop times a warm load)
        plain = [plain_loop(configs, a.cpus, a.device)]
        print(f"plain loop             {plain[0][0] + sum(plain[0][1].values()):7.2f} s  (data load "
              f"{plain[0][0]:.2f} s, fits {' '.join(f'{v:.2f}' for v in plain[0][1].values())})", flush=True)

        import ray
        t = time.perf_counter()
        ray.init(num_cpus=a.cpus, include_dashboard=False, address="local", log_to_driver=False,
                 object_store_memory=200 * 1024 ** 2, **({"num_gpus": 1} if a.device == "cuda" else {}))
        ray_start = time.perf_counter() - t
        print(f"ray start              {ray_start:7.2f} s  (once per search, not charged per trial)", flush=True)

        runs = {}
        try:
            for s in settings:
                runs[s] = r = search(cfg, tmp, f"overhead-{s}", reuse=(s == "reuse"), verbose=a.verbose)
                print(f"search {s:<5} {'(reuse_actors=' + str(s == 'reuse') + ')':<21} {r['wall']:7.2f} s  (setup "
                      f"{r['setup']:.2f}, trials {' '.join(f'{c:.2f}' for c, _ in r['cycles'])}, finish "
                      f"{r['finish']:.2f}; {r['completed']}/{r['trials']} completed, {r['epochs']} epochs)", flush=True)
                if r["trials"] != n or r["completed"] != n:
                    raise SystemExit(f"bench overhead: expected {n} completed trials, got {r}")
        finally:
            ray.shutdown()

        plain.append(plain_loop(configs, a.cpus, a.device))
        print(f"plain loop (again)     {plain[1][0] + sum(plain[1][1].values()):7.2f} s  (data load "
              f"{plain[1][0]:.2f} s, fits {' '.join(f'{v:.2f}' for v in plain[1][1].values())})", flush=True)

    # each config's plain time: the faster of its two fits (noise only ever adds time; errs against Ray)
    fit_s = {k: min(p[1][k] for p in plain) for k in configs}
    load_s = min(p[0] for p in plain)
    plain_s = load_s + sum(fit_s.values())
    out = {}
    for s, r in runs.items():
        extra = [c - fit_s[k] for c, k in r["cycles"][1:]]
        first = r["cycles"][0][0] - fit_s[r["cycles"][0][1]]
        out[s] = {"per": statistics.mean(extra), "median": statistics.median(extra), "first": first,
                  "search": r["setup"] + first + r["finish"], "all_in": (r["wall"] - plain_s) / n}
        o = out[s]
        print(f"{s:<5}: {o['per']:5.2f} s/trial (median {o['median']:.2f}) over trials 2..{n}; once per search: "
              f"{o['search']:.2f} s = setup {r['setup']:.2f} + first trial's extra {first:.2f} + finish "
              f"{r['finish']:.2f}, plus ray start {ray_start:.2f}; all-in (wall - plain {plain_s:.2f}) / {n} = "
              f"{o['all_in']:.2f} s/trial")
    ratio = out["reuse"]["per"] if "reuse" in out else out["fresh"]["per"]
    per_setting = {k: v for s, o in out.items() for k, v in (
        (f"{s}_s_per_trial", f"{o['per']:.2f}"), (f"{s}_median_s", f"{o['median']:.2f}"),
        (f"{s}_per_search_s", f"{o['search']:.1f}"), (f"{s}_all_in_s_per_trial", f"{o['all_in']:.2f}"))}
    benchlib.final_line("overhead", f"{ratio:.2f}", GOAL, ratio <= GOAL, **per_setting,
                        ray_start_s=f"{ray_start:.1f}", plain_s=f"{plain_s:.1f}", trials=n, epochs=a.epochs,
                        device="cuda" if a.device == "cuda" else None)


if __name__ == "__main__":
    sys.exit(main())
