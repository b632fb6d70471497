"""How gatetune's orchestration scales with the number of trials: a 1,000-trial search of one-step trials.

Two searches run one after the other on one local Ray (2 CPUs, started here): N/10 trials, then N
(default 100 and 1,000), so the growth from the small search to the large one shows (linear or worse).
Every trial is as short as a trial gets: digitnet on data.dataset=fake with 8 training and 8 validation
images of 8x8 pixels, batch 4 (two steps), one epoch; FIFO, TPE over gating.density and gating.weight (the
default sampler), 2 trials at a time with 1 CPU each (--device cuda: 0.5 GPU each). train.keep_checkpoints
is 1, as in the other benches. (Given to Ray as CheckpointConfig(num_to_keep), it would force a snapshot of
the whole experiment after every trial here; gatetune prunes checkpoints itself, so Ray snapshots every
2 s, and the copy of the last complete snapshot in .state/ is renewed at most 5% of the time.)
What is measured per search:

  orchestration  run_search wall / N - plain / 2, in seconds per trial slot: what a trial costs beyond its
                 own work, all-in (Ray's scheduling and result processing, Optuna's suggest and tell, the
                 experiment snapshots, the searcher's study export, the setup and the end-of-search report
                 spread over N). `plain` is a trial's own work timed in this process, as bench/overhead.py
                 does: fit of the same config on data already loaded (the workers cache it) with one thread,
                 and its checkpoint written as the trainable writes it; the fastest of 5, before Ray starts
                 and again after the searches, the faster counting (noise only adds time: this errs against
                 gatetune). Ray's `time_total_s` is no measure of it: a function trainable's last result
                 counts its wait for the driver too. Ray is started before the searches, so its start is in
                 no wall. `last tenth` is the same over the last tenth of the trials alone (completion to
                 completion): what one more trial costs there, which says whether the cost per trial grows.
  driver RSS     the growth of this process's resident memory from before run_search to after it, in MB.
  report         wall time of `gatetune report RUN` in a fresh process (imports included) on the run folder.
  bytes/trial    bytes of the run folder but the checkpoint_* folders' contents, after the search, / N.

Also printed, to find where the time goes: the driver's CPU seconds per trial (if it nears the wall per
trial, the driver is the bottleneck), the median step of a trial in its worker, the largest kinds of file
per trial, and the machine's load: on a shared 2-core machine every figure moves with other jobs, so
compare runs made side by side. met= is the ratio's goal; all_goals_met= adds the other three goals
(driver RSS <= 200 MB, report <= 10 s, <= 50 KB per trial), all at N.

    python bench/scale.py                 # 100, then 1,000 trials (4 to 8 minutes on 2 busy cores)
    python bench/scale.py --quick         # 5, then 20 trials (tests/test_bench.py)
    python bench/scale.py --trials 300 --keep /tmp/scale   # keep the run folders for a look
"""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import benchlib

benchlib.ray_environment()   # before ray's import

import yaml  # noqa: E402

from gatetune.core import layout  # noqa: E402
from gatetune.tuning import config as C  # noqa: E402
from gatetune.tuning.search.run import run_search  # noqa: E402

GOAL = 0.2   # seconds of orchestration per trial at N (Ray's scalability runs: ~0.14 s per trial slot)
GOALS = {"rss_mb": 200, "report_s": 10, "bytes_per_trial": 50_000}
CONCURRENT = 2


def search_yaml(folder: Path, trials: int, device: str, keep: int = 1) -> Path:
    """A FIFO search of `trials` one-step trials on fake data, `keep` checkpoints kept per trial."""
    doc = {"name": "scale", "seed": 0, "model": {"name": "digitnet"},
           "data": {"dataset": "fake", "image_size": 8, "fake_train": 8, "fake_val": 8, "augment": False},
           "gating": {"density": 0.5, "weight": 1.0e-6},
           "train": {"epochs": 1, "batch_size": 4, "keep_checkpoints": keep, "device": device},
           "search": {"num_samples": trials, "scheduler": {"name": "fifo"}, "max_concurrent": CONCURRENT,
                      "resources": {"cpu": 1, "gpu": 0.5 if device == "cuda" else 0}, "max_failures": 0},
           "space": {"gating.density": {"uniform": [0.25, 1.0]}, "gating.weight": {"loguniform": [1.0e-8, 1.0e-4]}}}
    path = folder / f"scale-{trials}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def recorder(ends: list, steps: list):
    """A Tune callback (it runs in the driver): each trial's completion time, and its result's
    time_this_iter_s (Ray's time of the trial's step in the worker: its start, fit, checkpoint, report)."""
    from ray.tune import Callback

    class Ends(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            steps.append(float(result.get("time_this_iter_s") or 0.0))

        def on_trial_complete(self, iteration, trials, trial, **info):
            ends.append(time.perf_counter())

        def on_trial_error(self, iteration, trials, trial, **info):
            ends.append(time.perf_counter())

    return Ends()


def plain_fit_s(cfg: C.Config, repeats: int = 5) -> float:
    """A trial's own work, in this process with the one thread a trial gets: tuning.train.fit of the
    search's base config on data already loaded (the workers cache it too), and its epoch checkpoint
    written as the trainable writes it. The fastest of `repeats` (noise only adds time)."""
    import torch

    from gatetune.tuning.train import checkpoint
    from gatetune.tuning.data import load
    from gatetune.tuning.train.loop import fit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    device = torch.device(cfg.train.device)
    data = load(cfg.data, device, seed=cfg.seed)
    times = []
    with tempfile.TemporaryDirectory() as d:
        def save(metrics: dict, state: dict) -> None:
            checkpoint.save_atomic(state, os.path.join(d, layout.CHECKPOINT_STATE), sync=False)

        for _ in range(repeats):
            t = time.perf_counter()
            fit(cfg, save, data=data, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    torch.set_num_threads(threads)
    return min(times)


def rss_mb() -> float:
    """This process's resident memory now (Linux's /proc; elsewhere its peak, which only grows)."""
    gc.collect()
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def search(cfg: C.Config, storage: str, name: str, verbose: bool) -> dict:
    """Run one search (Ray already up): its wall and driver CPU seconds, completion times, driver RSS growth."""
    ends, steps = [], []
    before = rss_mb()
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(open(os.devnull, "w"))
    t0, cpu0 = time.perf_counter(), time.process_time()
    with sink:
        run_dir, ok = run_search(cfg, storage=storage, name=name, callbacks=[recorder(ends, steps)])
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    n = cfg.search.num_samples
    if not ok or len(ends) != n:
        raise SystemExit(f"bench scale: the search in {run_dir} ended {len(ends)} of {n} trials (ok={ok})")
    return {"run_dir": run_dir, "n": n, "wall": wall, "cpu": cpu, "ends": ends, "step": statistics.median(steps),
            "rss": rss_mb() - before}


def orchestration(r: dict, plain: float) -> None:
    """Seconds per trial slot beyond a trial's own work: over the whole search, and over its last tenth."""
    n, tail = r["n"], r["ends"][-max(2, r["n"] // 10):]
    r["per"] = r["wall"] / n - plain / CONCURRENT
    r["late"] = (tail[-1] - tail[0]) / (len(tail) - 1) - plain / CONCURRENT


def report_s(run_dir: str) -> float:
    """`gatetune report RUN` in a fresh process, as a user types it."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "gatetune.tuning.cli", "report", run_dir], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"bench scale: gatetune report {run_dir} failed:\n{p.stderr[-2000:]}")
    return time.perf_counter() - t


def folder_bytes(run_dir: str) -> Counter:
    """Bytes per kind of file (a trial's files by name, the run folder's own by name), checkpoints left out."""
    kinds: Counter = Counter()
    for top, dirs, files in os.walk(run_dir):
        dirs[:] = [d for d in dirs if not layout.CHECKPOINT_DIR.fullmatch(d)]
        in_trial = Path(top).name.startswith(layout.TRIAL_PREFIX)
        for f in files:
            kind = f.split(".out.tfevents")[0] + " (tensorboard)" if ".tfevents" in f else f
            kind = kind.split("-")[0] + "-*" if kind.startswith(("experiment_state-", "searcher-state-")) else kind
            kind = ".state/ (gzipped copy)" if Path(top).name == layout.STATE_COPY else kind
            kinds[("trial/" if in_trial else "") + kind] += os.lstat(os.path.join(top, f)).st_size
    return kinds


def measure(tmp: str, trials: int, device: str, keep: int, verbose: bool) -> dict:
    cfg = C.load(str(search_yaml(Path(tmp), trials, device, keep)))
    r = search(cfg, tmp, f"scale-{trials}", verbose)
    kinds = folder_bytes(r["run_dir"])
    r["bytes"] = sum(kinds.values()) / trials
    r["report"] = report_s(r["run_dir"])
    biggest = ", ".join(f"{k} {v / trials / 1024:.1f}" for k, v in kinds.most_common(6))
    print(f"{trials:5d} trials: wall {r['wall']:7.1f} s, driver CPU {r['cpu'] / trials:.3f} s/trial, a trial's step "
          f"in its worker {r['step']:.3f} s (median); driver RSS +{r['rss']:.0f} MB; report {r['report']:.1f} s; "
          f"{r['bytes'] / 1024:.1f} KiB/trial besides checkpoints ({biggest} KiB/trial); load {load()}", flush=True)
    return r


def load() -> str:
    """The machine's 1-minute load average over its cores: other jobs' share of the CPUs."""
    return f"{os.getloadavg()[0]:.1f}/{os.cpu_count()}" if hasattr(os, "getloadavg") else "?"


def main() -> None:
    ap = benchlib.parser("scale", __doc__, quick="smoke run: 5, then 20 trials", verbose=True,
                         device_help="cuda: each trial asks for 0.5 GPU")
    ap.add_argument("--trials", type=int, default=1000, help="trials of the large search (the small one: a tenth)")
    ap.add_argument("--keep-checkpoints", type=int, default=1, metavar="K",
                    help="train.keep_checkpoints (2 is a search's default)")
    ap.add_argument("--keep", help="write the run folders here (kept) instead of a temporary folder")
    a = ap.parse_args()
    if a.trials < 4:
        ap.error("--trials must be at least 4")
    sizes = (5, 20) if a.quick else (max(2, a.trials // 10), a.trials)
    with tempfile.TemporaryDirectory() as d:
        cfg = C.load(str(search_yaml(Path(d), sizes[1], a.device)))
    plain = [plain_fit_s(cfg)]
    import ray
    t0 = time.perf_counter()
    ray.init(num_cpus=CONCURRENT, include_dashboard=False, address="local", log_to_driver=False,
             object_store_memory=200 * 1024 ** 2)
    print(f"ray start {time.perf_counter() - t0:.1f} s; searches of {sizes[0]} and {sizes[1]} one-step trials, "
          f"{CONCURRENT} at a time, device {a.device}, keep_checkpoints {a.keep_checkpoints}; load {load()}",
          flush=True)
    with (contextlib.nullcontext(a.keep) if a.keep else tempfile.TemporaryDirectory(prefix="gatetune-scale-")) as tmp:
        os.makedirs(tmp, exist_ok=True)
        try:
            small, large = (measure(tmp, n, a.device, a.keep_checkpoints, a.verbose) for n in sizes)
        finally:
            ray.shutdown()
    plain.append(plain_fit_s(cfg))
    print(f"a trial's own work in this process (plain fit + checkpoint), before and after: "
          f"{plain[0]:.3f} s, {plain[1]:.3f} s (the faster counts)")
    for r in (small, large):
        orchestration(r, min(plain))
        print(f"{r['n']:5d} trials: orchestration {r['per']:.3f} s/trial slot (last tenth {r['late']:.3f})")
    wall = time.perf_counter() - t0
    met = large["per"] <= GOAL
    all_met = met and large["rss"] <= GOALS["rss_mb"] and large["report"] <= GOALS["report_s"] \
        and large["bytes"] <= GOALS["bytes_per_trial"]
    figures = {f"{k}_{r['n']}": v for r in (small, large) for k, v in (
        ("s_per_trial", f"{r['per']:.3f}"), ("late_s_per_trial", f"{r['late']:.3f}"),
        ("driver_cpu_s_per_trial", f"{r['cpu'] / r['n']:.3f}"),
        ("driver_rss_growth_mb", f"{r['rss']:.0f}"), ("report_s", f"{r['report']:.1f}"),
        ("bytes_per_trial", f"{r['bytes']:.0f}"))}
    benchlib.final_line("scale", f"{large['per']:.3f}", GOAL, met, **figures, all_goals_met=all_met,
                        wall=f"{wall:.0f}")


if __name__ == "__main__":
    sys.exit(main())
