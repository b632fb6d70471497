"""`gatetune search` against what a user would run instead on one machine: Optuna alone, side by side.

Both run the quickstart search (search_spaces/quickstart.yaml: digitnet on digits, 8 epochs, its
`space:`, 16 trials, two at a time on the 2 cores) through gatetune's own training loop:

  optuna    two processes sharing one SQLite study (create_study(storage="sqlite:///...",
            load_if_exists=True)), study.optimize with 8 trials each; TPESampler seeded (seed + process
            index, or both processes would draw the same random start-up configs),
            SuccessiveHalvingPruner(min_resource=1, reduction_factor=2) (rungs 1, 2, 4, 8 like the
            quickstart's ASHA). A trial is tuning.space.define_by_run (the search's own translation of
            `space:` into suggest calls) -> config.with_params -> tuning.train.fit with an on_epoch that
            reports top-1 to the trial and raises TrialPruned when should_prune(). Each process loads
            the data once and trains with 1 torch thread, as a gatetune trial granted 1 CPU does.
  gatetune  `gatetune search search_spaces/quickstart.yaml` as a subprocess, all in: Python start,
            Ray start (with its dashboard, as the CLI starts it: in a thread, while the search stack
            imports), the search (each trial that trains its full budget measures its latency_ratio with
            its last epoch), the report (after the latency of any front trial that lacks one), Ray's
            shutdown.

Wall time is the subprocess(es) from launch to exit. Rounds run interleaved (optuna, gatetune, then
gatetune, optuna, ...) so a slow drift of the shared machine's load hits both sides alike.
ratio = gatetune wall / Optuna wall (sum over rounds); goal <= 1.10 with the best top-1 (median
over rounds) within 0.5 pt of Optuna's. Trial-epochs = epochs trained over all trials (a pruned or
stopped trial counts the epochs it reached).

Where the time goes, per side, from the subprocesses' own output and files:
  start    launch -> the first trial starts training (gatetune: config, Ray's start beside the imports,
           checks, the banner line, Tuner setup, the first worker process; optuna: imports, data, study)
  trials   first trial starts -> last result; `busy` = the trials' own time (gatetune: Ray's
           time_total_s, which includes per-epoch checkpoint + report and a completed trial's latency;
           optuna: fit + suggest), `idle` = 2 slots x trials span - busy, per trial: what the scheduler
           adds between trials
  end      last result -> exit (gatetune: Tuner teardown, pareto_latency of front trials without a
           latency_ratio (normally none), report, printing, Ray shutdown)
  cpu      CPU seconds of every process of the side (sampled from /proc once a second), by role:
           on 2 cores, CPU that Ray's own processes use is CPU the trials wait for
Then, outside the timed runs, each in a fresh process: Ray's start alone (ray.init as the CLI calls it,
with and without the dashboard, after the search stack's imports) and as `gatetune search` starts it
(search.cluster.start_local, then those imports, then connect: both done), Ray's shutdown
(search.cluster.shutdown); and the end-of-search steps re-run on the last run folder
(tuning.evaluate.pareto_latency, with how many front trials their own trials measured, and
results.write_report).

    python bench/vs_optuna.py                 # 2 rounds (~5 min on 2 cores)
    python bench/vs_optuna.py --rounds 3
    python bench/vs_optuna.py --quick         # smoke run: 4 trials x 2 epochs, 1 round (tests/test_bench.py)
    python bench/vs_optuna.py --quick --rounds 3   # the 3-round bookkeeping, on the smoke run
    python bench/vs_optuna.py --device cuda   # both sides train on the GPU (gatetune: 0.5 GPU per trial)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchlib

benchlib.ray_environment(dedup_logs=True)   # Ray's own log dedup left as it is, as `gatetune search` has it

GOAL = 1.10        # gatetune all-in wall / Optuna wall
TOP1_SLACK = 0.5   # points of top-1 gatetune's best may trail Optuna's
ROOT = Path(__file__).resolve().parent.parent
SEARCH = ROOT / "search_spaces" / "quickstart.yaml"
QUICK = ["train.epochs=2", "search.num_samples=4"]
WORKERS = 2        # Optuna processes: the quickstart runs 2 trials at a time (max_concurrent: 2)
RESULT = re.compile(r"^(\w+)(?: \(seed .*\))? epoch:\s*([\d.]+)/\d+ \|")

# Ray's start in a fresh process. on/off: ray.init as tuning/search/cluster.py calls it (include_dashboard=None
# starts the dashboard when its packages are installed; no idle workers prestarted) after the search stack's
# imports; beside: as `gatetune search` does it, cluster.start_local, the imports, then cluster.connect.
PROBE = r"""
import json, os, sys, time
t0 = time.perf_counter()
import ray
from gatetune.tuning.search import cluster
if sys.argv[1] == "beside":
    cluster.start_local("127.0.0.1", {})
    from gatetune.tuning.search import run as search  # noqa: F401
    imports = time.perf_counter() - t0
    url = cluster.connect(None)
    init = time.perf_counter() - t0
else:
    from gatetune.tuning.search import run as search  # noqa: F401
    imports = time.perf_counter() - t0
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    t = time.perf_counter()
    url = getattr(ray.init(address="local", include_dashboard=None if sys.argv[1] == "on" else False,
                           dashboard_host="127.0.0.1", log_to_driver=False), "dashboard_url", None)
    init = time.perf_counter() - t
t = time.perf_counter()
cluster.shutdown()
print(json.dumps({"imports": imports, "init": init, "shutdown": time.perf_counter() - t,
                  "dashboard": bool(url) and url != "off"}))
"""


# --- CPU use of a process tree, from /proc (Linux) -----------------------------------------------

def _role(argv: list[str]) -> str:
    """A Ray process's role from its program (gcs_server, raylet) or, for Python ones, its script:
    the full command lines name each other's paths (the raylet's holds the dashboard agent's)."""
    if not argv:
        return "other"
    if argv[0].startswith(("ray::DashboardAgent", "ray-dashboard-")):
        return "dashboard"
    if argv[0].startswith("ray::RuntimeEnvAgent"):
        return "agents"
    if argv[0].startswith("ray::"):   # trial workers (ray::IDLE until they run a trial)
        return "workers"
    program = os.path.basename(argv[0])
    if program in ("gcs_server", "raylet"):
        return "gcs" if program == "gcs_server" else "raylet"
    script = next((x for x in argv[1:3] if x.endswith(".py")), "")
    if "/dashboard/" in script:
        return "dashboard"
    return "agents" if script else "other"


class CpuSampler(threading.Thread):
    """CPU seconds (user + system) of `root` and all its descendants, by role, sampled every second (a
    process that exits between samples loses at most its last second)."""

    def __init__(self, root: int, driver: str):
        super().__init__(daemon=True)
        self.root, self.driver, self.cpu, self.roles = root, driver, {}, {}
        self.stopped = threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")

    def _sample(self) -> None:
        parent = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    parent[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / self.tick)
                except (OSError, IndexError, ValueError):
                    continue
        tree, grew = {self.root}, True
        while grew:
            more = {p for p, (pp, _) in parent.items() if pp in tree} - tree
            tree |= more
            grew = bool(more)
        for pid in tree & parent.keys():
            self.cpu[pid] = parent[pid][1]
            if pid == self.root:
                self.roles[pid] = self.driver
            else:
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
                except OSError:
                    continue
                role = _role([x for x in argv if x])
                if role == "other":
                    if pid in self.roles:   # an exiting process (empty command line) keeps its role
                        continue
                    # a helper (the dashboard's forkserver) counts for the process that started it
                    up = self.roles.get(parent[pid][0])
                    role = up if up not in (None, self.driver) else role
                self.roles[pid] = role

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            self._sample()

    def stop(self) -> dict[str, float]:
        self.stopped.set()
        self.join()
        out: dict[str, float] = {}
        for pid, s in self.cpu.items():
            role = self.roles.get(pid, "other")
            out[role] = out.get(role, 0.0) + s
        return out


# --- the Optuna side -------------------------------------------------------------------------------

def optuna_worker(a) -> None:
    """One of the Optuna processes: 8 trials of the shared study; writes its trial records as JSON."""
    import optuna
    import torch

    from gatetune.tuning import config as C
    from gatetune.tuning.search import space as S
    from gatetune.tuning.data import load
    from gatetune.tuning.train.loop import fit

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = C.load(str(SEARCH), a.overrides)
    plan = S.prepare(cfg)
    suggest = S.define_by_run(plan.params, plan.base)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed + a.worker)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    for attempt in range(20):   # both processes create the SQLite schema at once: one may lose the race
        try:
            study = optuna.create_study(storage=a.storage, study_name="vs_optuna", direction="maximize",
                                        sampler=sampler, pruner=pruner, load_if_exists=True)
            break
        except Exception:   # noqa: BLE001  (sqlalchemy's OperationalError/IntegrityError; retried)
            if attempt == 19:
                raise
            time.sleep(0.25)
    device = torch.device("cuda" if cfg.train.device == "cuda" else "cpu")
    data = load(cfg.data, device, seed=cfg.seed)
    records = []

    def objective(trial) -> float:
        rec = {"start": time.time(), "epochs": 0, "top1": None, "state": "complete"}
        records.append(rec)
        tcfg = C.with_params(plan.base, suggest(trial))

        def on_epoch(metrics: dict, state: dict | None) -> None:
            rec["top1"], rec["end"] = metrics["top1"], time.time()
            if state is None:   # diverged: fit returns after this call
                return
            rec["epochs"] = int(metrics["epoch"])
            trial.report(metrics["top1"], rec["epochs"])
            if trial.should_prune():
                rec["state"] = "pruned"
                raise optuna.TrialPruned()

        try:
            return fit(tcfg, on_epoch, data=data, device=device)["top1"]
        finally:
            rec["end"] = time.time()

    study.optimize(objective, n_trials=a.n_trials)
    Path(a.out).write_text(json.dumps(records))


def run_optuna(tmp: Path, tag: str, n_trials: int, overrides: list[str]) -> dict:
    db = tmp / f"optuna-{tag}.db"
    outs = [tmp / f"optuna-{tag}-{w}.json" for w in range(WORKERS)]
    split = [n_trials // WORKERS + (w < n_trials % WORKERS) for w in range(WORKERS)]
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, __file__, "--optuna-worker", str(w), "--storage", f"sqlite:///{db}",
                               "--n-trials", str(split[w]), "--out", str(outs[w]), "--", *overrides])
             for w in range(WORKERS)]
    samplers = [CpuSampler(p.pid, "optuna processes") for p in procs]
    for s in samplers:
        s.start()
    codes = [p.wait() for p in procs]
    wall = time.time() - t0
    cpu: dict[str, float] = {}
    for s in samplers:
        for k, v in s.stop().items():
            cpu[k] = cpu.get(k, 0.0) + v
    if any(codes):
        raise SystemExit(f"bench vs_optuna: an Optuna process failed (exit codes {codes})")
    recs = [r for o in outs for r in json.loads(o.read_text())]
    first, last = min(r["start"] for r in recs) - t0, max(r["end"] for r in recs) - t0
    busy = sum(r["end"] - r["start"] for r in recs)
    return {"wall": wall, "trials": len(recs), "epochs": sum(r["epochs"] for r in recs),
            "best": max(r["top1"] for r in recs if r["top1"] is not None),
            "completed": sum(r["state"] == "complete" for r in recs), "start": first, "span": last - first,
            "end": wall - last, "busy": busy, "cpu": cpu}


# --- the gatetune side -----------------------------------------------------------------------------

def run_gatetune(tmp: Path, tag: str, overrides: list[str]) -> dict:
    from gatetune import results
    exe = Path(sys.executable).with_name("gatetune")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gatetune.tuning.cli"]
    cmd += ["search", str(SEARCH), *overrides, "--storage", str(tmp), "--name", f"vs_optuna-{tag}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    sampler = CpuSampler(p.pid, "driver")
    sampler.start()
    marks, lines, results_at = {}, [], []
    for line in p.stdout:
        t = time.time() - t0
        lines.append(line.rstrip())
        if line.startswith("ray: ") and "banner" not in marks:
            marks["banner"] = t
        elif m := RESULT.match(line):
            results_at.append((t, m.group(1)))
        elif line.startswith("search finished") or line.startswith("search interrupted"):
            marks["finished"] = t
    code = p.wait()
    wall = time.time() - t0
    cpu = sampler.stop()
    run_dir = tmp / f"vs_optuna-{tag}"
    if code != 0 or not results_at:
        raise SystemExit(f"bench vs_optuna: `{' '.join(cmd)}` failed (exit {code}):\n" + "\n".join(lines[-30:]))
    df = results.table(run_dir)
    _, history = results.collect(run_dir)
    # the first trial started training when its first result arrived, minus that epoch's own time
    first = history[(history["trial_id"] == results_at[0][1]) & (history["training_iteration"] == 1)]
    start = results_at[0][0] - (float(first["time_this_iter_s"].iloc[0]) if len(first) else 0.0)
    last = results_at[-1][0]
    busy = float(history.groupby("trial_id")["time_total_s"].max().sum())
    return {"wall": wall, "trials": len(df), "epochs": int(df["epochs"].sum()), "best": float(df["top1"].max()),
            "completed": int((df["status"] == "completed").sum()), "start": start, "span": last - start,
            "end": wall - last, "busy": busy, "cpu": cpu, "banner": marks.get("banner", float("nan")),
            "finish": marks.get("finished", wall) - last, "run_dir": run_dir,
            "epoch_s": float(history["time_this_iter_s"].mean())}


def end_steps(run_dir: Path) -> dict:
    """The end-of-search steps, re-run on a finished run folder in this process (Ray not running); `front`:
    the front trials, `in_trial`: those whose latency_ratio their trial reported."""
    from gatetune import results
    from gatetune.tuning.train.evaluate import pareto_latency
    df = results.table(str(run_dir))
    front = df[df["pareto"] | df["pareto_density"] | df["pareto_seeds"]]
    in_trial = int(front["latency_ratio"].notna().sum()) if "latency_ratio" in front else 0
    t = time.perf_counter()
    n = pareto_latency(str(run_dir))
    lat = time.perf_counter() - t
    t = time.perf_counter()
    results.write_report(str(run_dir))
    return {"latency": lat, "measured": n, "front": len(front), "in_trial": in_trial,
            "report": time.perf_counter() - t}


def ray_probe(mode: str) -> dict:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"bench vs_optuna: the Ray start probe failed:\n{p.stderr[-2000:]}")
    return {**json.loads(p.stdout.strip().splitlines()[-1]), "mode": mode, "process": time.perf_counter() - t}


def _line(name: str, r: dict, slots: int) -> str:
    idle = slots * r["span"] - r["busy"]
    cpu = " ".join(f"{k} {v:.0f}" for k, v in sorted(r["cpu"].items(), key=lambda kv: -kv[1]))
    extra = (f" [banner (config, Ray start beside the imports, checks) at {r['banner']:.1f} s]" if "banner" in r else "")
    end = (f" (teardown + latency left + report {r['finish']:.1f} s, then printing + Ray shutdown "
           f"{r['end'] - r['finish']:.1f} s)" if "finish" in r else "")
    return (f"  {name:<8} {r['wall']:6.1f} s wall | {r['trials']} trials, {r['completed']} completed, "
            f"{r['epochs']} trial-epochs, best top-1 {r['best']:.2f}\n"
            f"           start {r['start']:5.1f} s{extra}\n"
            f"           trials {r['span']:5.1f} s: busy {r['busy']:.1f} s = {r['busy'] / r['epochs']:.2f} s per trial-epoch; "
            f"idle {idle:.1f} slot-s = {idle / r['trials']:.2f} s per trial\n"
            f"           end {r['end']:5.1f} s{end}\n"
            f"           cpu {sum(r['cpu'].values()):.0f} s ({cpu})")


def main() -> None:
    ap = benchlib.parser("vs_optuna", __doc__, quick="smoke run: 4 trials x 2 epochs, 1 round unless --rounds",
                         device_help="cuda: both sides train on the GPU, the two concurrent trials sharing it")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds (each runs both sides once); default 2, 1 with --quick")
    ap.add_argument("--optuna-worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--storage", help=argparse.SUPPRESS)
    ap.add_argument("--n-trials", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.optuna_worker is not None:
        a.worker = a.optuna_worker
        return optuna_worker(a)
    overrides = (QUICK if a.quick else []) + \
        (["train.device=cuda", f"search.resources.gpu={1 / WORKERS:g}"] if a.device == "cuda" else [])
    rounds = a.rounds or (1 if a.quick else 2)
    from gatetune.tuning import config as C
    cfg = C.load(str(SEARCH), overrides)
    n = cfg.search.num_samples
    print(f"{n} trials x {cfg.train.epochs} epochs of {cfg.model.name} on {cfg.data.dataset} "
          f"({SEARCH.relative_to(ROOT)}{' ' + ' '.join(overrides) if overrides else ''}), {WORKERS} at a time; "
          f"{rounds} interleaved round(s); 2-core machine shared with other jobs: compare within a round", flush=True)
    runs = {"optuna": [], "gatetune": []}
    with tempfile.TemporaryDirectory(prefix="gatetune-bench-") as tmp:
        for i in range(rounds):
            order = ("optuna", "gatetune") if i % 2 == 0 else ("gatetune", "optuna")
            for side in order:
                load = os.getloadavg()[0]   # other jobs on the machine: shown beside each run
                r = run_optuna(Path(tmp), str(i), n, overrides) if side == "optuna" else \
                    run_gatetune(Path(tmp), str(i), overrides)
                r["load"] = (load, os.getloadavg()[0])
                runs[side].append(r)
                print(f"round {i + 1} {side:<8} {r['wall']:6.1f} s, {r['epochs']} trial-epochs, best top-1 "
                      f"{r['best']:.2f} (load average {r['load'][0]:.1f} before, {r['load'][1]:.1f} after)", flush=True)
        steps = end_steps(runs["gatetune"][-1]["run_dir"])
        probes = [ray_probe(m) for m in ("on", "off", "beside") * (1 if a.quick else 2)]

    print("where the time goes (per round):")
    for i in range(rounds):
        for side in ("optuna", "gatetune"):
            print(_line(side, runs[side][i], WORKERS))
    on, off, beside = ([p for p in probes if p["mode"] == m] for m in ("on", "off", "beside"))
    ray_on, ray_off = statistics.median(p["init"] for p in on), statistics.median(p["init"] for p in off)
    down_on, down_off = statistics.median(p["shutdown"] for p in on), statistics.median(p["shutdown"] for p in off)
    imports = statistics.median(p["imports"] for p in on + off)
    both = statistics.median(p["init"] for p in beside)
    print(f"ray start alone (fresh process, median of {len(on)}): imports of `gatetune search` {imports:.1f} s; "
          f"ray.init {ray_on:.1f} s with the dashboard ({'started' if on[0]['dashboard'] else 'not installed'}), "
          f"{ray_off:.1f} s without; shutdown {down_on:.1f} s / {down_off:.1f} s; Ray's start beside the imports "
          f"(as `gatetune search` starts) {both:.1f} s for both, against {imports + ray_on:.1f} one after the other")
    print(f"end-of-search steps re-run on round {rounds}'s folder: pareto_latency {steps['latency']:.1f} s "
          f"({steps['measured']} measured; {steps['in_trial']} of {steps['front']} front trial(s) measured by "
          f"their own trial), write_report {steps['report']:.1f} s")

    mean = lambda side, k: statistics.mean(r[k] for r in runs[side])   # noqa: E731
    g, o = sum(r["wall"] for r in runs["gatetune"]), sum(r["wall"] for r in runs["optuna"])
    ratio = g / o
    best_g = statistics.median(r["best"] for r in runs["gatetune"])
    best_o = statistics.median(r["best"] for r in runs["optuna"])
    gap_top1 = best_o - best_g
    epoch_g, epoch_o = mean("gatetune", "busy") / mean("gatetune", "epochs"), mean("optuna", "busy") / mean("optuna", "epochs")
    extra_epochs = mean("gatetune", "epochs") - mean("optuna", "epochs")
    idle_g = (WORKERS * mean("gatetune", "span") - mean("gatetune", "busy")) / mean("gatetune", "trials")
    idle_o = (WORKERS * mean("optuna", "span") - mean("optuna", "busy")) / mean("optuna", "trials")
    ray_cpu = statistics.mean(sum(v for k, v in r["cpu"].items() if k not in ("workers", "driver"))
                              for r in runs["gatetune"])
    print(f"gap {mean('gatetune', 'wall') - mean('optuna', 'wall'):+.1f} s per round (means) = start "
          f"{mean('gatetune', 'start') - mean('optuna', 'start'):+.1f} + trials "
          f"{mean('gatetune', 'span') - mean('optuna', 'span'):+.1f} + end {mean('gatetune', 'end') - mean('optuna', 'end'):+.1f}")
    print(f"  trials: {extra_epochs:+.1f} trial-epochs (~{extra_epochs * epoch_g / WORKERS:+.1f} s on {WORKERS} slots); "
          f"{epoch_g:.2f} vs {epoch_o:.2f} s per trial-epoch (~{mean('optuna', 'epochs') * (epoch_g - epoch_o) / WORKERS:+.1f} s); "
          f"idle {idle_g:.2f} vs {idle_o:.2f} s per trial (~{n * (idle_g - idle_o) / WORKERS:+.1f} s); "
          f"Ray's own processes (gcs, raylet, dashboard, agents) used {ray_cpu:.0f} CPU-s")
    met = ratio <= GOAL and gap_top1 <= TOP1_SLACK
    walls = lambda side: ",".join(f"{r['wall']:.1f}" for r in runs[side])   # noqa: E731
    benchlib.final_line(
        "vs_optuna", f"{ratio:.2f}", GOAL, met, wall_s_gatetune=walls("gatetune"), wall_s_optuna=walls("optuna"),
        best_top1_gatetune=f"{best_g:.2f}", best_top1_optuna=f"{best_o:.2f}",
        epochs_gatetune=",".join(str(r["epochs"]) for r in runs["gatetune"]),
        epochs_optuna=",".join(str(r["epochs"]) for r in runs["optuna"]),
        start_s_gatetune=f"{mean('gatetune', 'start'):.1f}", start_s_optuna=f"{mean('optuna', 'start'):.1f}",
        end_s_gatetune=f"{mean('gatetune', 'end'):.1f}", end_s_optuna=f"{mean('optuna', 'end'):.1f}",
        epoch_s_gatetune=f"{epoch_g:.2f}", epoch_s_optuna=f"{epoch_o:.2f}", idle_s_per_trial_gatetune=f"{idle_g:.2f}",
        idle_s_per_trial_optuna=f"{idle_o:.2f}", ray_start_s=f"{ray_on:.1f}", ray_start_nodash_s=f"{ray_off:.1f}",
        start_beside_imports_s=f"{both:.1f}", shutdown_s=f"{down_on:.1f}",
        latency_step_s=f"{steps['latency']:.1f}", front_latency_in_trial=f"{steps['in_trial']}/{steps['front']}",
        report_s=f"{steps['report']:.1f}", ray_cpu_s=f"{ray_cpu:.0f}",
        load_max=f"{max(max(r['load']) for side in runs.values() for r in side):.1f}", trials=n, rounds=rounds,
        device="cuda" if a.device == "cuda" else None)


if __name__ == "__main__":
    main()
