"""Chaos soak: many short trials on a Ray cluster that keeps losing worker nodes, and its driver once.

A loopback cluster (bench/loopback.py: `ray start` head and two worker nodes on 127.0.0.1, one CPU each)
runs the quickstart search with ASHA into a run folder all nodes share, while a chaos thread SIGKILLs a
random worker node's raylet and everything under it every 15-30 s and starts the node again 3 s later.
Scenarios, one after another on the same cluster:

    clean    no chaos (the wall time the others are measured against)
    chaos    the chaos loop for the whole search
    driver   the chaos loop, and the driver SIGKILLed in a recovery (a third of the trials started, and a
             node killed and started again 4 s before), then `gatetune resume RUN --address ...` while
             the chaos goes on

After each, the run folder must show what a night on a lab cluster must not break:
- every trial ends exactly once: completed, stopped by its scheduler, diverged, or error with its
  failures in error.txt (Ray's record: a traceback, or "The actor died unexpectedly" for a lost node) after
  search.max_failures retries;
- no trial's epoch is lost (result.json holds epochs 1..E for the E the report gives) and a kill repeats at
  most one epoch of a trial (trained twice: repeats <= the trial's failures, plus one after the driver
  kill). A trial that continues from a checkpoint newer than the lost driver's last snapshot reports the
  epochs after the snapshot again from it (`replayed` in result.json, counted apart: not trained again);
- the Optuna study (optuna.db) holds each trial once, in the state its report status maps to;
- every checkpoint folder left in the run folder reads back.

    python bench/chaos.py                           # 100 trials x 3 scenarios, ~15 min on 2 cores
    python bench/chaos.py --scenarios chaos,driver --trials 40
    python bench/chaos.py --long                    # 1,000 trials of 8 epochs: hours
    python bench/chaos.py --set "data={dataset: fake, image_size: 16}"   # tiny trials (as the slow test)

Ends with `bench chaos: ratio=<wall with chaos / without> goal=invariants met=yes|no trials=N kills=K ...`
(met: every invariant held in every scenario). tests/test_chaos.py runs the chaos and driver scenarios.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import benchlib
from loopback import GATETUNE, LoopbackCluster, env

ROOT = Path(__file__).resolve().parent.parent
QUICK = ROOT / "search_spaces" / "quickstart.yaml"
SCENARIOS = ("clean", "chaos", "driver")
OPTUNA_STATE = {"completed": "COMPLETE", "stopped": "PRUNED", "diverged": "PRUNED", "error": "FAIL"}


class Chaos(threading.Thread):
    """SIGKILL a random worker node (one running a trial, where one does) every `every` (low, high) seconds and
    start it again `down_s` later, until stop() or the time `until`; self.kills: (time, node index, processes
    killed)."""

    def __init__(self, cluster: LoopbackCluster, every=(15.0, 30.0), down_s: float = 3.0,
                 until: float = float("inf"), seed: int = 0):
        super().__init__(name="chaos", daemon=True)
        self.cluster, self.every, self.down_s, self.until = cluster, every, down_s, until
        self.rng, self.halt = random.Random(seed), threading.Event()
        self.kills: list[tuple[float, int, int]] = []
        self.failed_starts = 0

    def run(self) -> None:
        while not self.halt.wait(self.rng.uniform(*self.every)) and time.time() < self.until:
            up = [i for i, port in enumerate(self.cluster.manager_ports) if port is not None]
            if not up:
                continue
            # a node running a trial where there is one: a kill of an idle node (between a trial's end and the
            # next one's start, or while a driver restarts) costs nothing and tests nothing
            busy = [i for i in up if self.cluster.busy(i)]
            i = self.rng.choice(busy or up)
            self.kills.append((time.time(), i, self.cluster.kill_worker(i)))
            self.halt.wait(self.down_s)
            self._start(i)

    def _start(self, i: int) -> None:
        for _ in range(3):
            try:
                self.cluster.start_worker(i)
                return
            except RuntimeError as e:
                self.failed_starts += 1
                print(f"chaos: worker node {i} did not start ({str(e).splitlines()[0]}); again in 5 s", flush=True)
                time.sleep(5)

    def stop(self) -> None:
        """End the chaos; every worker node is up again afterwards."""
        self.halt.set()
        if self.is_alive():
            self.join()
        for i, port in enumerate(self.cluster.manager_ports):
            if port is None:
                self._start(i)


def run(cluster: LoopbackCluster, storage: Path, scenario: str, trials: int, epochs: int, *,
        every=(15.0, 30.0), chaos_s: float = float("inf"), seed: int = 0, overrides: tuple[str, ...] = ()) -> dict:
    """One scenario's search (the quickstart with `overrides`, KEY=VALUE each); its figures and problems."""
    name = f"chaos-{scenario}-{int(time.time())}"
    run_dir = storage / name
    cmd = [*GATETUNE, "search", str(QUICK), f"search.num_samples={trials}", f"train.epochs={epochs}",
           "search.max_concurrent=3", f"seed={seed}", *overrides,
           "--address", cluster.address, "--storage", str(storage), "--name", name]
    chaos = Chaos(cluster, every, until=time.time() + chaos_s, seed=seed) if scenario != "clean" else None
    storage.mkdir(parents=True, exist_ok=True)
    log = storage / f"{name}.log"
    start, driver_kills = time.time(), 0
    with open(log, "w") as out:
        if chaos:
            chaos.start()
        p = subprocess.Popen(cmd, env=env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if scenario == "driver":
            # mid-recovery: a third of the trials started, and a node lost and started again
            # (its trials retried), with two of Ray's 2-s snapshots taken after it; on a fast machine the
            # third is reached before the first node kill, and a driver killed then would meet no recovery
            while p.poll() is None and not _recovering(run_dir, trials, chaos):
                time.sleep(0.5)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                driver_kills = 1
                out.write(f"\n--- {time.time() - start:.0f} s: driver SIGKILLed; gatetune resume ---\n")
                out.flush()
                p = subprocess.Popen([*GATETUNE, "resume", str(run_dir), "--address", cluster.address], env=env(),
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        code = p.wait()
    wall = time.time() - start
    if chaos:
        chaos.stop()
    kills = len(chaos.kills) if chaos else 0
    figures, problems = check(run_dir, trials, driver_kills)
    if code != 0:
        problems.insert(0, f"the search exited with {code} (see {log})")
    return {"scenario": scenario, "run_dir": str(run_dir), "log": str(log), "wall_s": wall, "kills": kills,
            "driver_kills": driver_kills, "failed_starts": chaos.failed_starts if chaos else 0, **figures,
            "problems": problems}


def _recovering(run_dir: Path, trials: int, chaos: Chaos) -> bool:
    """A third of the trials have started and the last node kill is chaos.down_s + 4 s old."""
    return (len(list(run_dir.glob("trial_*"))) >= trials // 3 and bool(chaos.kills)
            and time.time() - chaos.kills[-1][0] >= chaos.down_s + 4)


def check(run_dir: Path, trials: int, driver_kills: int = 0) -> tuple[dict, list[str]]:
    """({trials, completed, stopped, diverged, error, retries, repeated, replayed}, problems) of a finished search.
    An epoch counts as repeated when result.json has it twice from training; one reported again from a
    checkpoint Ray's record lacked (`replayed`) was not trained again and counts apart."""
    from gatetune.results import read_report
    from gatetune.tuning.train import checkpoint as ckpt
    problems: list[str] = []
    try:
        report = read_report(run_dir / "report.csv")
    except Exception as e:   # noqa: BLE001  (a missing or broken report is the finding)
        return {"trials": 0}, [f"no readable report.csv in {run_dir} ({e})"]
    statuses = report["status"].astype(str)
    figures = {"trials": len(report), **{s: int((statuses == s).sum()) for s in OPTUNA_STATE}}
    if len(report) != trials or not report["trial_id"].is_unique:
        problems.append(f"{len(report)} report rows for {trials} trials ({report['trial_id'].nunique()} distinct)")
    if not statuses.isin(list(OPTUNA_STATE)).all():
        problems.append(f"trials that did not end: {sorted(set(statuses) - set(OPTUNA_STATE))}")
    failures = _failures(run_dir)
    figures["retries"] = sum(failures.values())
    figures["repeated"] = figures["replayed"] = 0
    for tid, status, epochs in zip(report["trial_id"], statuses, report["epochs"]):
        folder = run_dir / f"trial_{tid}"
        lines = _results(folder)
        seen = [r["epoch"] for r in lines]
        trained = [r["epoch"] for r in lines if not r.get("replayed")]
        repeats = len(trained) - len(set(trained))
        figures["repeated"] += repeats
        figures["replayed"] += len(seen) - len(trained)
        want = list(range(1, int(epochs) + 1)) if epochs == epochs else []   # NaN: no epoch reported
        if sorted(e for e in set(seen) if e == int(e)) != want:   # (a diverged trial ends inside an epoch)
            problems.append(f"trial {tid}: epochs {sorted(set(seen))} in result.json, the report says {epochs}")
        if repeats > failures.get(tid, 0) + driver_kills:
            problems.append(f"trial {tid}: {repeats} epochs repeated after {failures.get(tid, 0)} failures")
        if status == "error" and not _text(folder / "error.txt").startswith("Failure #"):
            problems.append(f"trial {tid} errored without its failures in error.txt")
        for d in sorted(folder.glob("checkpoint_*")):
            try:
                ckpt.read(d)
            except ckpt.CheckpointError as e:
                problems.append(f"trial {tid}: {d.name} unreadable ({e.message})")
    problems += _study_problems(run_dir, dict(zip(report["trial_id"], statuses)))
    return figures, problems


def _results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in _text(folder / "result.json").splitlines() if line.strip()]


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def _failures(run_dir: Path) -> dict[str, int]:
    """{trial id: failures} from Ray's newest experiment snapshot."""
    state = json.loads(sorted(run_dir.glob("experiment_state-*.json"))[-1].read_text())
    out = {}
    for trial, meta in state["trial_data"]:
        trial = json.loads(trial) if isinstance(trial, str) else trial
        meta = json.loads(meta) if isinstance(meta, str) else meta
        out[trial["trial_id"]] = int(meta.get("num_failures", 0))
    return out


def _study_problems(run_dir: Path, statuses: dict[str, str]) -> list[str]:
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{run_dir / 'optuna.db'}")
    ids = [t.user_attrs.get("trial_id") for t in study.trials]
    problems = [] if sorted(ids) == sorted(statuses) else \
        [f"the Optuna study holds {len(ids)} trials ({len(set(ids))} distinct) for {len(statuses)} in the report"]
    wrong = [f"{t.user_attrs.get('trial_id')}: {t.state.name} for {statuses.get(t.user_attrs.get('trial_id'))}"
             for t in study.trials if OPTUNA_STATE.get(statuses.get(t.user_attrs.get("trial_id"))) != t.state.name]
    if wrong:
        problems.append(f"Optuna states differ from the report: {', '.join(wrong[:5])}")
    return problems


def line(r: dict) -> str:
    counts = ", ".join(f"{r.get(s, 0)} {s}" for s in OPTUNA_STATE)
    verdict = "ok" if not r["problems"] else "; ".join(r["problems"][:5])
    return (f"chaos: {r['scenario']:6s} {r['wall_s']:6.0f} s  {r.get('trials', 0)} trials ({counts})  kills {r['kills']}"
            f"  driver kills {r['driver_kills']}  retries {r.get('retries', 0)}  repeated epochs {r.get('repeated', 0)}"
            f"  replayed {r.get('replayed', 0)}  -> {verdict}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, of: " + ", ".join(SCENARIOS))
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--every", default="15,30", help="seconds between kills: LOW,HIGH (uniform)")
    ap.add_argument("--chaos-minutes", type=float, default=float("inf"), help="end the chaos after this long")
    ap.add_argument("--storage", default=str(ROOT / "runs"), help="where the run folders go")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--long", action="store_true", help="1,000 trials of 8 epochs (hours)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every trial (repeatable), e.g. --set train.batch_size=32")
    a = ap.parse_args()
    scenarios = [s for s in a.scenarios.split(",") if s]
    if bad := [s for s in scenarios if s not in SCENARIOS]:
        ap.error(f"--scenarios: unknown {', '.join(bad)}; choose from {', '.join(SCENARIOS)}")
    try:
        low, high = (float(x) for x in a.every.split(","))
    except ValueError:
        ap.error(f"--every: give LOW,HIGH seconds, e.g. 15,30 (got {a.every!r})")
    trials, epochs = (1000, 8) if a.long else (a.trials, a.epochs)
    benchlib.ray_environment()
    print(f"chaos: {trials} trials of {epochs} epochs on a head and two worker nodes; a kill every {low:g}-{high:g} s",
          flush=True)
    cluster = LoopbackCluster(workers=2)
    results = []
    try:
        for s in scenarios:
            results.append(run(cluster, Path(a.storage), s, trials, epochs, every=(low, high),
                               chaos_s=a.chaos_minutes * 60, seed=a.seed, overrides=tuple(a.set)))
            print(line(results[-1]), flush=True)
    finally:
        cluster.stop()
    walls = {r["scenario"]: r["wall_s"] for r in results}
    ratio = f"{walls['chaos'] / walls['clean']:.2f}" if {"clean", "chaos"} <= set(walls) else "none"
    benchlib.final_line("chaos", ratio, "invariants", not any(r["problems"] for r in results), trials=trials,
                        kills=sum(r["kills"] for r in results), retries=sum(r.get("retries", 0) for r in results),
                        repeated=sum(r.get("repeated", 0) for r in results),
                        replayed=sum(r.get("replayed", 0) for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
