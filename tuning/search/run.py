"""`gatetune search` / `gatetune resume`: a Ray Tune search over a YAML space.

    Tuner(trainable with resources (search.pretrain's own for the dense trial),
          ConfirmSearch (search.confirm: the seed replicas of the front, once the search trials have ended)
            wrapping LadderSearch (search.ladder: densities high to low, each step from the best of the one above)
            wrapping StudySearch (the dense pretraining first; Optuna: define-by-run space, TPE or NSGA-II,
                      seeded, the study in memory and pickled with Ray's snapshot; optuna.db its export),
          ASHA on top1 with time attribute `epoch` (or FIFO, or ASHA per density bucket),
          RunConfig(storage/name, FailureConfig(max_failures), callbacks: PruneCheckpoints (the newest
                    train.keep_checkpoints per trial), KeepState (local run folders), search.track's
                    MLflow / W&B loggers (track.py)))

    run_dir, ok = run_search(load("search_spaces/quickstart.yaml"), storage="/abs/runs", name="q1",
                             callbacks=[MyTuneCallback()], reuse_actors=True)

Everything the user can get wrong is checked before a trial starts (space.prepare, cluster.py, a run
folder that cannot be written). The run folder (a path, or a URI such as s3://bucket/runs/name:
core.storage) holds the files core.layout names; at the end the report (report.csv/md, pareto.png) is
written, with latency.json for the Pareto trials.
"""
from __future__ import annotations

__all__ = ["run_search", "resume_search", "job_metadata", "objectives", "sampler"]

import contextlib
import functools
import os
import re
import sys
import time
from pathlib import Path

import yaml

from gatetune.core import layout
from gatetune.core import trials as T
from gatetune.core.errors import UserError, first_line
from gatetune.core.storage import RunStore
from gatetune.tuning.search import cluster, outage
from gatetune.tuning import config as C
from gatetune.tuning import data
from gatetune.tuning.search import schedulers
from gatetune.tuning.search import space as S
from gatetune.tuning.search import track
from gatetune.tuning.search.console import Console, close_all, summary
from gatetune.tuning.search.keep import KeepResults, PruneCheckpoints
from gatetune.tuning.search.live import TrialCounts
from gatetune.tuning.search.snapshot import KeepState, clear_staging, leave_out, left_out, recover


def _run_dir(storage: str | None, name: str) -> str:
    storage = storage or "runs"
    if "://" in storage:
        return storage.rstrip("/") + "/" + name
    return os.path.join(os.path.abspath(os.path.expanduser(storage)), name)


def _trial_dirname(trial) -> str:   # a module-level function: Ray pickles the Tuner into tuner.pkl
    return layout.trial_dirname(trial.trial_id)


def _trial_resources(config: dict, search: dict, pretrain: dict) -> dict:   # module level: Ray pickles it
    return pretrain if T.is_pretrain(config) else search


def _resources(cfg: C.Config) -> tuple[dict, dict]:
    """(a search trial's Ray resources, the dense pretraining's)."""
    r = cfg.search.resources
    p = cfg.search.pretrain.resources if cfg.search.pretrain and cfg.search.pretrain.resources else r
    return {"cpu": r.cpu, "gpu": r.gpu}, {"cpu": p.cpu, "gpu": p.gpu}


def _trainable(cfg: C.Config, base: dict, run_dir: str):
    from ray import tune
    from gatetune.tuning.search.trainable import trial
    search, pretrain = _resources(cfg)
    resources = functools.partial(_trial_resources, search=search, pretrain=pretrain) if search != pretrain else search
    return tune.with_resources(tune.with_parameters(trial, base=base, run_dir=run_dir), resources)


def _fit(tuner, run_dir: str):
    """tuner.fit(); a run folder that fills up or stops being writable mid-search is one line, not a crash
    (Ray then fails reading back the error files it could not write). A remote run folder that stops answering
    for a while: outage.py."""
    if "://" in run_dir:
        outage.quiet_storage_errors()
    try:
        return tuner.fit()
    except (OSError, EOFError) as e:
        raise UserError(f"the run folder could not be written or read back ({type(e).__name__}: "
                        f"{first_line(e)}); free space or fix the folder, then "
                        f"`gatetune resume {run_dir}`", file=run_dir) from None
    finally:
        close_all()   # the live view, whatever ended the search


def _concurrency(cfg: C.Config) -> int:
    import ray
    if cfg.search.max_concurrent:
        return cfg.search.max_concurrent
    r, have = cfg.search.resources, ray.cluster_resources()
    n = have.get("CPU", 1) // r.cpu
    if r.gpu:
        n = min(n, have.get("GPU", 0) // r.gpu)
    return max(1, int(n))


def objectives(cfg: C.Config) -> tuple:
    """(metric, mode) for OptunaSearch: strings, or lists for a multi-objective search."""
    objs = cfg.search.objectives
    if not objs:
        return cfg.search.metric, cfg.search.mode
    return [k for o in objs for k in o], [v for o in objs for v in o.values()]


def sampler(cfg: C.Config):
    import optuna
    name = cfg.search.sampler or ("nsga2" if cfg.search.objectives else "tpe")
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    from gatetune.tuning.search.study import NSGAIISampler
    # NSGA-II's default population (50) would make a small search all random first generation
    return NSGAIISampler(seed=cfg.seed, population_size=max(4, min(50, cfg.search.num_samples // 4)))


def _num_samples(plan: S.SearchPlan) -> int:
    """Trials Tune may create: the dense pretraining, the search's, plus at most seeds - 1 replicas of each
    confirmed trial (top K: K, and the best dense trial as the baseline; the searcher says when it is done)."""
    confirm = plan.cfg.search.confirm
    n = plan.trials + (plan.pretrain is not None)
    if confirm is None:
        return n
    top = re.fullmatch(r"top (\d+)", confirm.front)
    chosen = int(top.group(1)) + (plan.pretrain is None) if top else plan.trials   # + the best dense trial
    return n + (confirm.seeds - 1) * min(plan.trials, chosen)


def _tuner(plan: S.SearchPlan, run_dir: str, verbose: bool, callbacks, reuse_actors: bool):
    from ray import tune

    from gatetune.tuning.search.confirm import ConfirmSearch
    from gatetune.tuning.search.export import StudyExport
    from gatetune.tuning.search.study import StudySearch
    cfg, srch = plan.cfg, plan.cfg.search
    store = RunStore(run_dir)
    metric, mode = objectives(cfg)
    searcher = StudySearch(plan, metric=metric, mode=mode, sampler=sampler(cfg), study_name=cfg.name,
                           export=StudyExport(store))
    if srch.ladder is not None:
        from gatetune.tuning.search.ladder import LadderSearch
        searcher = LadderSearch(searcher, densities=srch.ladder.densities, trials_per_step=srch.ladder.trials_per_step)
    if srch.confirm is not None:
        searcher = ConfirmSearch(searcher, seeds=srch.confirm.seeds, front=srch.confirm.front,
                                 baseline=plan.pretrain is None)
    multi = isinstance(metric, list)   # TuneConfig takes one metric; the scheduler has top1 itself
    log = schedulers.DecisionLog(store)
    parent, name = run_dir.rstrip("/").rsplit("/", 1)
    concurrency = _concurrency(cfg)
    return tune.Tuner(
        _trainable(cfg, plan.base, run_dir),
        tune_config=tune.TuneConfig(
            metric=None if multi else metric, mode=None if multi else mode, search_alg=searcher,
            scheduler=schedulers.build(plan, log), num_samples=_num_samples(plan),
            max_concurrent_trials=concurrency, reuse_actors=reuse_actors, time_budget_s=srch.time_budget_s,
            trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=name, storage_path=parent, verbose=2 if verbose else 0,
            failure_config=tune.FailureConfig(max_failures=srch.max_failures),
            callbacks=[Console(plan.max_epochs, run=name, base=plan.base, expected=_num_samples(plan),
                               buckets=plan.density_buckets, concurrency=concurrency), TrialCounts(cfg.name, plan.base),
                       PruneCheckpoints(store, cfg.train.keep_checkpoints), KeepResults(store),
                       *([outage.StorageWatch(store, srch.storage_timeout_s)] if store.remote else [KeepState(run_dir)]),
                       *track.callbacks(plan, run_dir), *callbacks]),
    )


def _finish(run_dir: str, results, plan: S.SearchPlan, started: float) -> bool:
    """Print the summary and write the report (into the run folder, local or remote); False when every
    trial errored."""
    from gatetune import results as R
    from gatetune.tuning.train.evaluate import pareto_latency
    try:
        pareto_latency(run_dir)   # <trial>/latency.json for the Pareto trials: the report's latency_ratio
        df = R.write_report(run_dir)
    except OSError as e:   # a full disk or a folder that stopped being writable
        print(f"\nsearch ended after {time.time() - started:.0f} s; the report could not be written into {run_dir} "
              f"({e.strerror or e}): free space or fix the folder, then `gatetune report {run_dir}` or "
              f"`gatetune resume {run_dir}`")
        return False
    for line in summary(df, plan, time.time() - started, run_dir):
        print(line)
    print(R.summary_markdown(df))
    front = R.seeds_markdown(df)
    if front:   # the confirmed front, what the search was for
        print(f"\nfront over {int(df['n_seeds'].max())} seeds; {R.baseline_line(df)}\n{front}")
    print(f"\nreport: {RunStore(run_dir).uri(layout.REPORT_CSV)}, {layout.REPORT_MD}, {layout.PARETO_PNG}")
    track.finish(plan, run_dir, df)   # search.track: each trial's status, gate_health, pareto, checkpoint; never raises
    if len(df) and (df["status"] == "error").all():
        print(f"every trial failed: see error.txt in the trial folders of {run_dir}")
        return False
    return True


def _file(cfg: C.Config) -> str | None:
    """The config file a loaded config came from (its top-level source), if any."""
    src = cfg.source("", default="")
    return src if src and not src.startswith("command line") else None


def job_metadata(cfg: C.Config, *, name: str | None = None, storage: str | None = None,
                 file: str | None = None) -> dict[str, str]:
    """The Ray job metadata run_search gives its job, for `ray job submit --metadata-json`."""
    if name:
        cfg = cfg.model_copy(update={"name": name})
    plan = S.prepare(cfg, file)
    return cluster.job_metadata(cfg.name, _run_dir(storage, cfg.name), file or _file(cfg), plan.trials,
                                cfg.search.confirm)


def run_search(cfg: C.Config, *, address: str | None = None, name: str | None = None, storage: str | None = None,
               dashboard_host: str = "127.0.0.1", verbose: bool = False, file: str | None = None,
               callbacks=(), reuse_actors: bool = True) -> tuple[str, bool]:
    """Run the search; returns (run folder, False if every trial errored).

    callbacks: extra ray.tune.Callback objects (they run in this process, beside the progress lines).
    reuse_actors: one worker process runs trial after trial (Ray Tune's default is False: a new process
    per trial, about 3 s more each on 2 cores)."""
    if name:
        cfg = cfg.model_copy(update={"name": name})
    notices = cfg.notices
    plan = S.prepare(cfg, file, notices)
    for line in notices:
        print(line, file=sys.stderr)
    run_dir = _run_dir(storage, cfg.name)
    store = RunStore(run_dir)
    if store.exists(layout.CONFIG):
        raise UserError(f"already holds a search; continue it with `gatetune resume {run_dir}` "
                        "or pass --name NEW", file=run_dir)
    store.check_writable()   # a read-only folder or a bucket we cannot write to: before Ray starts (or is used)
    cluster.quiet(verbose)
    # While a Ray started by `gatetune search` (cluster.start_local) comes up: the imports of the study's SQLite
    # export (at the first snapshot, while both cores train) and of the report's plot (after the search).
    dashboard = cluster.connect(address, dashboard_host, cluster.job_metadata(
        cfg.name, run_dir, file or _file(cfg), plan.trials, cfg.search.confirm),
        meanwhile=("optuna.storages._rdb.models", "alembic.command", "matplotlib.figure",
                   "matplotlib.backends.backend_agg"))
    for r, key in zip(_resources(cfg), ("search.resources", "search.pretrain.resources")):
        cluster.check_resources(r["cpu"], r["gpu"], key)
    if not store.remote:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        cluster.check_shared_storage(run_dir)
    store.write_text(layout.CONFIG, yaml.safe_dump(plan.base, sort_keys=False))
    data.prepare(cfg.data)   # e.g. an image folder decoded into this machine's cache, once for every trial
    cluster.banner(run_dir, dashboard)
    started = time.time()
    results = _fit(_tuner(plan, run_dir, verbose, callbacks, reuse_actors), run_dir)
    return run_dir, _finish(run_dir, results, plan, started)


def resume_search(run_dir: str, *, address: str | None = None, dashboard_host: str = "127.0.0.1",
                  verbose: bool = False) -> tuple[str, bool]:
    """Continue an interrupted search: finished trials kept, unfinished ones resume from checkpoints."""
    from ray import tune
    store = RunStore(run_dir)
    run_dir, base_file = store.where, store.uri(layout.CONFIG)
    if not store.exists(layout.CONFIG) or not store.exists(layout.TUNER):
        raise UserError(f"not a gatetune search folder (needs {layout.CONFIG} and {layout.TUNER}); give the "
                        "folder `gatetune search` printed as 'run folder'", file=run_dir)
    base = yaml.safe_load(store.read_text(layout.CONFIG))
    cfg = C.load_dict(base, default_file=str(base_file))
    C.check_environment(cfg, file=str(base_file))
    plan = S.prepare(cfg, str(base_file), start=False)
    data.prepare(cfg.data)
    with _same_version(run_dir):
        if not store.remote and (line := recover(run_dir)):
            print(line, file=sys.stderr)
    if line := leave_out(store, lost := left_out(store)):
        print(line, file=sys.stderr)
    cluster.quiet(verbose)
    dashboard = cluster.connect(address, dashboard_host, cluster.job_metadata(
        cfg.name, run_dir, str(base_file), plan.trials, cfg.search.confirm))
    if lost:   # what the lost driver left in its staging folder on this node stays out too
        from ray.train.constants import _get_ray_train_session_dir
        clear_staging(store, _get_ray_train_session_dir(), lost)
    cluster.banner(run_dir, dashboard)
    started = time.time()
    with _same_version(run_dir):
        tuner = tune.Tuner.restore(run_dir, trainable=_trainable(cfg, base, run_dir), resume_unfinished=True,
                                   resume_errored=True)
    return run_dir, _finish(run_dir, _fit(tuner, run_dir), plan, started)


@contextlib.contextmanager
def _same_version(run_dir: str):
    """Ray's snapshot pickles gatetune's searcher and callbacks by module path: a folder written by a gatetune
    whose modules were elsewhere is one line, not a traceback."""
    try:
        yield
    except (ModuleNotFoundError, AttributeError) as e:
        if "gatetune" not in str(e):
            raise
        raise UserError(f"its search state was written by another gatetune version ({first_line(e)}); resume it "
                        f"with the version that started it (`gatetune report {run_dir}` reads it with this one)",
                        file=run_dir) from None
