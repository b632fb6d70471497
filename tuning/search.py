"""`gatetune search` / `gatetune resume`: a Ray Tune search over a YAML space.

    Tuner(trainable with resources, OptunaSearch(define-by-run space, TPE, seeded, SQLite study),
          ASHA on top1 with time attribute `epoch` (or FIFO),
          RunConfig(storage/name, FailureConfig(max_failures), CheckpointConfig(keep best N + latest)))

Everything the user can get wrong is checked before a trial starts: the config and space, the Ray
address, whether any node can hold one trial's resources (Ray would leave it PENDING forever), and,
on a multi-node cluster, whether every node sees the run folder (node-local storage loses
checkpoints when a node dies). The run folder is Ray's experiment folder plus `gatetune.yaml`
(the resolved config), `optuna.db` (the study, for optuna-dashboard), `decisions.jsonl` (why trials
were stopped) and, at the end, report.csv / report.md / pareto.png.
"""
from __future__ import annotations

__all__ = ["run_search", "resume_search", "prepare"]

import copy
import os
import re
import sys
import time
from pathlib import Path

import yaml
from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler

from gatetune.tuning import config as C
from gatetune.tuning import space as S
from gatetune.tuning.errors import ConfigError, nearest
from gatetune.tuning.schedulers import DensityStratifiedASHA, RecordingASHA, nearest_bucket

_BASE_FILE = "gatetune.yaml"
REUSE_ACTORS = True   # one worker process runs trial after trial; bench/overhead.py sets False (Ray's default) to compare


# ---------------------------------------------------------------------------------------------
# validation (no Ray needed)

def prepare(cfg: C.Config, file: str | None = None, notices: list[str] | None = None) -> tuple[dict, list[S.Param]]:
    """Check the search/space sections; returns (base config dict with absolute paths, params)."""
    where = (lambda key: file or cfg.source(key))
    if cfg.search is None:
        raise ConfigError("no `search:` section; add one (see search_spaces/quickstart.yaml) or use "
                          "`gatetune train` for a fixed config", file=where("search"), key="search")
    params = []
    for key, spec in (cfg.space or {}).items():   # one at a time: each key may come from another file
        params += S.parse_space({key: spec}, C.config_keys(), where(f"space.{key}"))
    base = C.to_dict(cfg)
    for key in ("data.root", "model.weights"):   # trials chdir away: make paths absolute here
        v = C.get_dotted(base, key)
        if v and v != "torchvision" and "://" not in v:
            C.set_dotted(base, key, os.path.abspath(v))
    for p in params:   # every value a trial could take must be a valid config value
        _check_values(base, p, where(f"space.{p.key}"))
    if cfg.search.start_from:
        src = cfg.source("search.start_from")
        root = Path(src).parent if not src.startswith(("command line", "config")) else Path.cwd()
        base["search"]["start_from"] = [str((root / f).resolve()) for f in cfg.search.start_from]
        start_points(base, params, where("search.start_from"), notices)   # checked now, before Ray starts
    return base, params


def start_points(base: dict, params: list[S.Param], file: str | None = None,
                 notices: list[str] | None = None) -> list[dict]:
    """search.start_from files -> Optuna points to evaluate first: each file's values of the searched keys
    (the file is read on top of the search config, so it need only set what it changes)."""
    from gatetune import models
    from gatetune.tuning.run import config_diff
    points = []
    base_cfg = C.load_dict(base)
    searched = {p.key for p in params}
    for f in base["search"]["start_from"] or []:
        key = f"search.start_from: {os.path.relpath(f)}"
        if not Path(f).is_file():
            raise ConfigError(f"start_from file not found: {f}; check the path (relative to the search file)",
                              file=file, key="search.start_from")
        try:
            raw = copy.deepcopy({k: v for k, v in base.items() if k not in ("search", "space")})
            C.merge(raw, C.read_file(f, []))
            if raw["model"]["name"] != base_cfg.model.name:
                raise ConfigError(f"is a config of {raw['model']['name']}, but the search trains "
                                  f"{base_cfg.model.name}; give a {base_cfg.model.name} config", file=f, key="model.name")
            start = C.load_dict({**raw, "search": None, "space": None}, default_file=f)
        except ConfigError as e:
            raise ConfigError(f"start_from: {e}", file=file, key="search.start_from") from None
        values = C.to_dict(start)
        point = {}
        for p in params:
            if p.kind == "grid":
                continue
            v = C.get_dotted(values, p.key)
            if p.kind in ("uniform", "loguniform", "int"):
                if not (isinstance(v, (int, float)) and p.args[0] <= v <= p.args[1]):
                    raise ConfigError(f"{p.key} = {v!r} lies outside the space's range {list(p.args)}; widen the "
                                      "range or change the file", file=file, key=key)
                point[p.key] = v
                continue
            match = [a for a in p.args if a == v]
            if not match and v is not None and (p.key in ("gating.gate", "gating.trainable")
                                                or re.fullmatch(r"train\.phases\.\d+\.trainable", p.key)):
                sites = set(models.resolve_sites(start.model.name, v))
                match = [a for a in p.args if set(models.resolve_sites(start.model.name, a)) == sites]
            if not match:
                raise ConfigError(f"{p.key} = {v!r} is not one of the space's choices {list(p.args)}; add it to "
                                  "the choice or change the file", file=file, key=key)
            point[p.key] = match[0]
        ignored = [k for k in config_diff(C.to_dict(base_cfg), values)
                   if k not in searched and k != "name" and not k.startswith(("search", "space"))]
        if ignored and notices is not None:
            notices.append(f"notice: start_from {os.path.relpath(f)} also sets {', '.join(ignored[:4])}, which the "
                           "space does not search: the search config's values are used")
        points.append(S.check_point(point, params, file or "", key))
    return points


def _check_values(base: dict, p: S.Param, file: str) -> None:
    values = p.args
    if p.kind in ("uniform", "loguniform"):   # floats anywhere in between: the midpoint stands for them
        values = (*p.args, (p.args[0] + p.args[1]) / 2)
    for v in values:
        try:
            C.with_params(C.load_dict(base), {p.key: v})
        except ConfigError as e:
            hint = f"; {p.kind} gives floats: use int: [{p.args[0]}, {p.args[1]}]" \
                if p.kind in ("uniform", "loguniform") and "integer" in str(e) else ""
            raise ConfigError(f"value {v!r} is invalid: {str(e).split(': ', 2)[-1]}{hint}",
                              file=file, key=f"space.{p.key}") from None
    for k, vals in p.when.items():
        if k not in C.config_keys() and k not in (base.get("space") or {}):
            raise ConfigError(f"`when` names {k!r}, not a config key; {nearest(k, C.config_keys())}",
                              file=file, key=f"space.{p.key}.when")
        for v in vals:
            try:
                C.with_params(C.load_dict(base), {k: list(v) if isinstance(v, tuple) else v})
            except ConfigError as e:
                raise ConfigError(f"`when` value {v!r} for {k} can never occur: {str(e).split(': ', 2)[-1]}",
                                  file=file, key=f"space.{p.key}.when") from None


def _run_dir(storage: str | None, name: str) -> str:
    storage = storage or "runs"
    if "://" in storage:
        return storage.rstrip("/") + "/" + name
    return os.path.join(os.path.abspath(os.path.expanduser(storage)), name)


# ---------------------------------------------------------------------------------------------
# Ray: connect, check the cluster

def _init_ray(address: str | None, dashboard_host: str) -> None:
    import ray
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return
    if address and address != "auto":
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(address="local", dashboard_host=dashboard_host, log_to_driver=False,
                     include_dashboard=None)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ConfigError(f"cannot reach a Ray cluster at {address!r} ({msg}); start one with "
                          "`ray start --head` or fix the address", file="command line", key="--address") from None


def _check_reachable(address: str) -> None:
    """A plain TCP connect first: ray.init waits minutes on an address where nothing listens."""
    import socket
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            return
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot reach a Ray cluster at {address!r} ({e}); start one with "
                          "`ray start --head` on that machine or fix the address (HOST:PORT, ray://HOST:10001 "
                          "or auto)", file="command line", key="--address") from None


def _check_resources(req: dict) -> None:
    import ray
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if n["Resources"].get("CPU", 0) >= req["cpu"] and n["Resources"].get("GPU", 0) >= req["gpu"]]
    if not fits:
        have = ", ".join(f"{n['NodeManagerAddress']}: {n['Resources'].get('CPU', 0):g} CPU "
                         f"{n['Resources'].get('GPU', 0):g} GPU" for n in nodes)
        raise ConfigError(f"no node can run a trial needing {req['cpu']:g} CPU and {req['gpu']:g} GPU "
                          f"(nodes: {have}); lower search.resources or add a node", key="search.resources")


def _check_shared_storage(run_dir: str) -> None:
    """Every alive node must see the run folder, or a dead node's checkpoints are lost."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2 or "://" in run_dir:
        return
    marker = os.path.join(run_dir, ".gatetune_marker")
    Path(marker).write_text(str(time.time()))

    @ray.remote(num_cpus=0)
    def sees(path):
        return os.path.exists(path)

    checks = {n["NodeManagerAddress"]: sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(marker) for n in nodes}
    blind = [addr for addr, ref in checks.items() if not ray.get(ref, timeout=60)]
    if blind:
        raise ConfigError(f"nodes {', '.join(blind)} cannot see {run_dir}: node-local storage loses checkpoints "
                          "when a node dies; pass --storage on a shared filesystem (NFS) or s3://bucket/path",
                          key="--storage")


# ---------------------------------------------------------------------------------------------
# console output: one line per trial result, in the notebook's style

class _Console(Callback):
    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tag = " DIVERGED" if result.get("diverged") else ""
        print(f"{trial.trial_id} epoch: {result.get('epoch', 0):5.2f}/{self.epochs} | gate.loss: "
              f"{result.get('gate_loss', 0):.4g} | gate: {100 * result.get('density', 1):6.2f}% | "
              f"top1: {result.get('top1', 0):6.2f}% | top5: {result.get('top5', 0):6.2f}% | "
              f"{result.get('images_per_s', 0):6.0f} img/s{tag}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"{trial.trial_id} ERROR (see error.txt in its trial folder)", flush=True)


def _scheduler(cfg: C.Config, run_dir: str, params: list[S.Param], **metric_mode):
    s = cfg.search.scheduler
    if s.name == "fifo":
        return FIFOScheduler()
    log = os.path.join(run_dir, "decisions.jsonl") if "://" not in run_dir else None
    common = dict(time_attr="epoch", max_t=max_epochs(cfg, params), grace_period=s.grace_period,
                  reduction_factor=s.reduction_factor, **metric_mode)
    if s.name == "asha":
        return RecordingASHA(log, **common)
    return DensityStratifiedASHA(_density_buckets(cfg, params), default=cfg.gating.density,
                                 tolerance=s.off_target_tolerance, log=log, **common)


def max_epochs(cfg: C.Config, params: list[S.Param]) -> int:
    """The most epochs any trial can train: train.epochs, or more when the space searches it or a
    phase's epochs (ASHA's max_t; a trial past max_t would be cut)."""
    def top(p: S.Param) -> int:
        return int(max(p.args))
    if any(p.key == "train.epochs" for p in params):
        return max(top(p) for p in params if p.key == "train.epochs")
    phases = cfg.train.phases or []
    searched = {p.key: top(p) for p in params if re.fullmatch(r"train\.phases\.\d+\.epochs", p.key)}
    return sum(max(ph.epochs, searched.get(f"train.phases.{i}.epochs", 0)) for i, ph in enumerate(phases)) \
        or cfg.train.epochs


def _density_buckets(cfg: C.Config, params: list[S.Param]) -> list[float]:
    """The `choice`/`grid` values of gating.density, or the centres of density_bins equal bins of its range."""
    p = next((p for p in params if p.key == "gating.density"), None)
    if p is None:
        return [cfg.gating.density]
    if p.kind in ("choice", "grid"):
        return [float(v) for v in p.args]
    lo, hi, n = p.args[0], p.args[1], cfg.search.scheduler.density_bins
    return [lo + (hi - lo) * (i + 0.5) / n for i in range(n)]


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"   # short: the report's checkpoint column shows it


def _trainable(cfg: C.Config, base: dict):
    from ray import tune
    from gatetune.tuning.trainable import trial
    r = cfg.search.resources
    return tune.with_resources(tune.with_parameters(trial, base=base), {"cpu": r.cpu, "gpu": r.gpu})


def _concurrency(cfg: C.Config) -> int:
    import ray
    if cfg.search.max_concurrent:
        return cfg.search.max_concurrent
    r, have = cfg.search.resources, ray.cluster_resources()
    n = have.get("CPU", 1) // r.cpu
    if r.gpu:
        n = min(n, have.get("GPU", 0) // r.gpu)
    return max(1, int(n))


def _objectives(cfg: C.Config) -> tuple:
    """(metric, mode) for OptunaSearch: strings, or lists for a multi-objective search."""
    objs = cfg.search.objectives
    if not objs:
        return cfg.search.metric, cfg.search.mode
    return [k for o in objs for k in o], [v for o in objs for v in o.values()]


def _sampler(cfg: C.Config):
    import optuna
    name = cfg.search.sampler or ("nsga2" if cfg.search.objectives else "tpe")
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    # NSGA-II's default population (50) would make a small search all random first generation
    return optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=max(4, min(50, cfg.search.num_samples // 4)))


def _tuner(cfg: C.Config, base: dict, params: list[S.Param], run_dir: str, verbose: bool):
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch
    srch = cfg.search
    storage = None
    if "://" not in run_dir:
        storage = optuna.storages.RDBStorage(f"sqlite:///{os.path.join(run_dir, 'optuna.db')}")
    metric, mode = _objectives(cfg)
    points = start_points(base, params) if base["search"].get("start_from") else None
    searcher = OptunaSearch(S.define_by_run(params, base), metric=metric, mode=mode, sampler=_sampler(cfg),
                            storage=storage, study_name=cfg.name, points_to_evaluate=points)
    multi = isinstance(metric, list)   # TuneConfig takes one metric; the scheduler gets top1 itself
    parent, name = run_dir.rstrip("/").rsplit("/", 1)
    return tune.Tuner(
        _trainable(cfg, base),
        tune_config=tune.TuneConfig(
            metric=None if multi else metric, mode=None if multi else mode, search_alg=searcher,
            scheduler=_scheduler(cfg, run_dir, params, **({"metric": srch.metric, "mode": srch.mode} if multi else {})),
            num_samples=_expected(cfg, params), max_concurrent_trials=_concurrency(cfg),
            reuse_actors=REUSE_ACTORS, time_budget_s=srch.time_budget_s,
            trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=name, storage_path=parent, verbose=2 if verbose else 0,
            failure_config=tune.FailureConfig(max_failures=srch.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                                    checkpoint_score_attribute="top1",
                                                    checkpoint_score_order="max"),
            callbacks=[_Console(max_epochs(cfg, params))]),
    )


# ---------------------------------------------------------------------------------------------
# entry points

def _banner(run_dir: str) -> None:
    import ray
    url = ray._private.worker.get_dashboard_url()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    res = ray.cluster_resources()
    print(f"ray: {nodes} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU; "
          f"dashboard: {'http://' + url if url else 'off'}"
          + (" (token: `ray get-auth-token`)" if os.environ.get("RAY_AUTH_MODE") == "token" else ""))
    print(f"run folder: {run_dir}", flush=True)


def _finish(run_dir: str, results, cfg: C.Config, started: float, params: list[S.Param]) -> bool:
    """Print the summary and write the report; False when every trial errored."""
    if "://" in run_dir:
        print(f"\nsearch ended after {time.time() - started:.0f} s; run `gatetune report` on a local copy of {run_dir}")
        return results.num_errors < len(results)
    from gatetune import results as R
    from gatetune.tuning.run import pareto_latency
    pareto_latency(run_dir)   # <trial>/latency.json for the Pareto trials: the report's latency_ratio
    df = R.write_report(run_dir)
    expected = _expected(cfg, params)
    unfinished = int(df["status"].isin(["running", "pending"]).sum()) + max(0, expected - len(df))
    if unfinished:
        print(f"\nsearch interrupted after {time.time() - started:.0f} s: {unfinished} of {expected} trials "
              f"unfinished; continue with `gatetune resume {run_dir}`")
    else:
        print(f"\nsearch finished in {time.time() - started:.0f} s: {len(df)} trials, "
              f"{int((df['status'] == 'error').sum())} errors, {int((df['status'] == 'diverged').sum())} diverged")
        _rung_summary(results, cfg, params)
    print(R.summary_markdown(df))
    print(f"\nreport: {os.path.join(run_dir, 'report.csv')}, report.md, pareto.png")
    if len(df) and (df["status"] == "error").all():
        print(f"every trial failed: see error.txt in the trial folders of {run_dir}")
        return False
    return True


def _rung_summary(results, cfg: C.Config, params: list[S.Param]) -> None:
    """How many trials reached each ASHA rung (grace * rf^k epochs), per density bucket when stratified."""
    s = cfg.search.scheduler
    if s.name == "fifo":
        return
    rungs, m, top = [], s.grace_period, max_epochs(cfg, params)
    while m < top:
        rungs.append(m)
        m *= s.reduction_factor
    rungs.append(top)
    buckets = _density_buckets(cfg, params) if s.name == "asha_by_density" else [None]
    for b in buckets:
        epochs = [r.metrics.get("epoch", 0) for r in results if r.metrics and (b is None or b == nearest_bucket(
            buckets, float(r.config.get("gating.density", cfg.gating.density))))]
        if not epochs:
            continue
        reached = ", ".join(f"{sum(e >= r for e in epochs)} reached epoch {r:g}" for r in rungs)
        early = sum(e < top for e in epochs)
        label = "ASHA" if b is None else f"ASHA density {b:g}"
        print(f"{label}: {reached}; {early} of {len(epochs)} stopped early")


def _expected(cfg: C.Config, params: list[S.Param]) -> int:
    return cfg.search.num_samples * S.grid_size(params)


def run_search(cfg: C.Config, *, address: str | None = None, name: str | None = None, storage: str | None = None,
               dashboard_host: str = "127.0.0.1", verbose: bool = False,
               file: str | None = None) -> tuple[str, bool]:
    """Run the search; returns (run folder, False if every trial errored)."""
    if name:
        cfg = cfg.model_copy(update={"name": name})
    notices = cfg.notices
    base, params = prepare(cfg, file, notices)
    for line in notices:
        print(line, file=sys.stderr)
    run_dir = _run_dir(storage, cfg.name)
    if "://" not in run_dir and (Path(run_dir) / _BASE_FILE).exists():
        raise ConfigError(f"already holds a search; continue it with `gatetune resume {run_dir}` "
                          "or pass --name NEW", file=run_dir)
    _init_ray(address, dashboard_host)
    r = cfg.search.resources
    _check_resources({"cpu": r.cpu, "gpu": r.gpu})
    if "://" not in run_dir:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        _check_shared_storage(run_dir)
        (Path(run_dir) / _BASE_FILE).write_text(yaml.safe_dump(base, sort_keys=False))
    _banner(run_dir)
    started = time.time()
    results = _tuner(cfg, base, params, run_dir, verbose).fit()
    return run_dir, _finish(run_dir, results, cfg, started, params)


def resume_search(run_dir: str, *, address: str | None = None, dashboard_host: str = "127.0.0.1",
                  verbose: bool = False) -> tuple[str, bool]:
    """Continue an interrupted search: finished trials kept, unfinished ones resume from checkpoints."""
    from ray import tune
    run_dir = os.path.abspath(run_dir) if "://" not in run_dir else run_dir
    base_file = Path(run_dir) / _BASE_FILE
    if not base_file.is_file() or not (Path(run_dir) / "tuner.pkl").is_file():
        raise ConfigError("not a gatetune search folder (needs gatetune.yaml and tuner.pkl); give the folder "
                          "`gatetune search` printed as 'run folder'", file=run_dir)
    base = yaml.safe_load(base_file.read_text())
    cfg = C.load_dict(base, default_file=str(base_file))
    _init_ray(address, dashboard_host)
    _banner(run_dir)
    started = time.time()
    tuner = tune.Tuner.restore(run_dir, trainable=_trainable(cfg, base), resume_unfinished=True,
                               resume_errored=True)
    results = tuner.fit()
    _, params = prepare(cfg, str(base_file))
    return run_dir, _finish(run_dir, results, cfg, started, params)
