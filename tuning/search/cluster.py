"""Connecting a search to Ray and checking the cluster before any trial starts; stopping Ray after it.

What Ray itself would only show later (or never) becomes one UserError line here: an address where
nothing listens (ray.init would wait minutes), a trial's resources no node can hold (Ray leaves such
a trial PENDING forever), and a run folder some node cannot see (node-local storage loses checkpoints
when a node dies).

A local Ray costs a search's fixed time at both ends (bench/vs_optuna.py): `gatetune search` starts it in
a thread (start_for_search) so that it comes up while the search stack imports, and shutdown() stops it
without the second that Ray's own shutdown spends waiting on its autoscaler's monitor.
"""
from __future__ import annotations

__all__ = ["connect", "start_for_search", "start_local", "drop_start", "search_metadata", "check_resources",
           "check_shared_storage", "banner", "job_metadata", "quiet", "shutdown"]

import contextlib
import importlib
import logging
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

from gatetune.core import layout
from gatetune.core.errors import UserError, first_line
from gatetune.core.storage import RunStore


def job_metadata(run_name: str, run_dir: str, config_file: str | None, trials: int, confirm=None) -> dict[str, str]:
    """What the Ray job of a search carries (the dashboard's Jobs page, `ray job list`); job_name is the
    Jobs page's Name column. `gatetune search ... --job-metadata` prints it for `ray job submit`."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        ours = version("gatetune")
    except PackageNotFoundError:
        ours = "unknown"
    return {"job_name": f"gatetune search {run_name}", "gatetune_version": ours, "run_name": run_name,
            "run_folder": run_dir, "config_file": os.path.abspath(config_file) if config_file else "",
            "trials": str(trials),
            **({"confirm": f"{confirm.seeds} seeds of the {confirm.front} front"} if confirm is not None else {})}


def quiet(verbose: bool = False) -> None:
    """No Ray Tune box, "View detailed results" line or TensorBoard hint (which names Ray's driver staging
    folder, not the run folder), no Optuna study-created line; Ray's warnings stay."""
    import optuna
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")   # the legacy reporter: silent at verbose 0
    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        logging.getLogger("ray.tune").setLevel(logging.WARNING)


def search_metadata(cfg, *, name: str | None = None, storage: str | None = None) -> dict[str, str]:
    """The Ray job metadata of `gatetune search` (search.run.job_metadata's, tests/test_search_cli.py checks
    they agree) from the config modules alone, without the search stack (ray.tune, torch): what start_local
    needs before that stack is imported. A space that does not parse raises run_search's own UserError."""
    from gatetune.tuning.search import space as S
    if name:
        cfg = cfg.model_copy(update={"name": name})
    storage = storage or "runs"
    run_dir = storage.rstrip("/") + "/" + cfg.name if "://" in storage else \
        os.path.join(os.path.abspath(os.path.expanduser(storage)), cfg.name)
    source = cfg.source("", default="")
    return job_metadata(cfg.name, run_dir, source if source and not source.startswith("command line") else None,
                        S.prepare(cfg).trials, cfg.search.confirm)


def start_for_search(cfg, *, name: str | None = None, storage: str | None = None,
                     dashboard_host: str = "127.0.0.1") -> bool:
    """start_local for `gatetune search` (its job metadata: search_metadata), unless run_search would refuse
    the search before Ray starts: a space that does not parse raises its error here already; a run folder
    that holds a search or cannot be written is left to run_search to say so, Ray not started. Only for a
    run folder on a path (a bucket's check is a request each time). Whether Ray is starting."""
    metadata = search_metadata(cfg, name=name, storage=storage)
    run_dir = metadata["run_folder"]
    if "://" in run_dir:
        return False
    store = RunStore(run_dir)
    try:
        if store.exists(layout.CONFIG):
            return False
        store.check_writable()
    except UserError:
        return False
    start_local(dashboard_host, metadata)
    return True


def start_local(dashboard_host: str = "127.0.0.1", metadata: dict | None = None) -> None:
    """Begin starting a local Ray in a thread and return at once; the next connect(None, ...) waits for it and
    returns its dashboard URL. Ray's start (3.5 s on 2 cores, most of it waiting on its own processes: the
    GCS, the raylet, the dashboard) then overlaps what the caller does meanwhile: `gatetune search` imports
    the search stack (ray.tune, torch, optuna: 2-4 s). The thread lives as long as the process: Ray starts
    its processes fate-shared with the *thread* that spawns them (prctl PR_SET_PDEATHSIG), they would die
    with it. (ray.init warns that it sets no SIGTERM handler outside the main thread; the one it sets there
    is replaced by its core worker's anyway, which a SIGTERM meets in both cases. It sets os.environ keys
    (PYTHONBREAKPOINT) from that thread; this module sets its own before the thread starts.)"""
    global _STARTING
    import ray  # noqa: F401  (before the thread: one import of Ray, in this thread)
    _environment(local=True)   # here: os.environ is not safe to change while another thread runs
    logging.getLogger("ray._private.worker").addFilter(_NOT_MAIN_THREAD)
    _STARTING = _LocalStart(dashboard_host, metadata)
    _STARTING.start()


def connect(address: str | None, dashboard_host: str = "127.0.0.1", metadata: dict | None = None,
            meanwhile: tuple[str, ...] = ()) -> str | None:
    """Start Ray here (address None) or join the cluster at `address`, with `metadata` on the Ray job;
    returns the dashboard URL ("off" without one; None when the caller had started Ray already). After
    start_local, address None waits for that start (`metadata` is then the one start_local had), importing
    the modules `meanwhile` names one after another until it is done (work the caller would do later
    anyway, done while this thread would only wait)."""
    global _STARTING
    import ray
    from ray.job_config import JobConfig
    _environment(local=not address)
    if _STARTING is not None and not address:
        start, _STARTING = _STARTING, None
        for name in meanwhile:
            if start.ready.is_set():
                break
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        start.ready.wait()
        if start.error is not None:
            raise start.error
        return start.url
    if ray.is_initialized():
        return None
    if address and address != "auto":
        _check_reachable(address)
    job = JobConfig(metadata=metadata or {})   # a `ray job submit` job shows the submission's metadata instead
    if not address:
        return _init_local(dashboard_host, job)
    try:
        context = ray.init(address=address, log_to_driver=False, job_config=job)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        msg = first_line(e, 160) or type(e).__name__
        raise UserError(f"cannot reach a Ray cluster at {address!r} ({msg}); start one with "
                        "`ray start --head` or fix the address", file="command line", key="--address") from None
    return _url(context)


def _environment(local: bool) -> None:
    """The switches Ray and Tune read (an already set variable wins), set before Ray starts; `local`: a Ray
    this process starts."""
    if local:
        # The raylet would start one idle worker per CPU as this driver connects, with an empty runtime_env;
        # Tune's trial actors always carry one (env_vars: ray.tune's class_cache), so none of them could run a
        # trial: each trial slot started a worker of its own anyway, and the idle ones took ~1.5 CPU-s from
        # the start.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Snapshot the experiment (trial list + searcher state) every 2 s, not Ray's 10 s or more: a driver that
    # dies loses the trials started since the last snapshot, and a resumed search would run them again.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Ray keeps a record of every checkpoint of a trial (gatetune prunes the folders itself): the score
    # alone in each, not the whole result (4 KB an epoch in every snapshot)
    os.environ.setdefault("TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE", "1")


def _init_local(dashboard_host: str, job) -> str:
    """ray.init of a local Ray (with its dashboard when its packages are installed); its dashboard URL."""
    import ray
    try:
        context = ray.init(address="local", dashboard_host=dashboard_host, log_to_driver=False,
                           include_dashboard=None, job_config=job)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot start a local Ray ({first_line(e, 160) or type(e).__name__}); fix what it says, "
                        "or join a running cluster with --address", file="command line", key="--address") from None
    return _url(context)


def _url(context) -> str:
    url = getattr(context, "dashboard_url", None)
    if not url:
        return "off"
    return url if "://" in url else f"http://{url}"


class _LocalStart(threading.Thread):
    """start_local's thread: _init_local, then waiting as long as the process lives (Ray's processes die with
    the thread that started them)."""

    def __init__(self, dashboard_host: str, metadata: dict | None):
        from ray.job_config import JobConfig
        super().__init__(name="gatetune-ray-start", daemon=True)
        self.host, self.job = dashboard_host, JobConfig(metadata=metadata or {})
        self.ready, self.url, self.error = threading.Event(), None, None

    def run(self) -> None:
        try:
            self.url = _init_local(self.host, self.job)
        except BaseException as e:   # noqa: BLE001  (raised in the caller's thread by connect)
            self.error = e
        self.ready.set()
        threading.Event().wait()


class _NotMainThread(logging.Filter):
    """Drops ray.init's warning that it sets no SIGTERM handler from a thread (see start_local)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SIGTERM handler is not set")


_NOT_MAIN_THREAD = _NotMainThread()
_STARTING: _LocalStart | None = None


def drop_start() -> None:
    """Shut down the Ray of a start_local that no connect() took (the command failed before it got there):
    wait for its start first (Ray cannot be stopped halfway), so that this process holds no Ray afterwards."""
    global _STARTING
    start, _STARTING = _STARTING, None
    if start is not None:
        start.ready.wait(timeout=300)
        shutdown()


def shutdown() -> None:
    """ray.shutdown(), first killing the autoscaler's monitor of a Ray this process started: Ray stops its
    processes one after another, the GCS before the monitor, and the monitor's SIGTERM handler then waits on
    the dead GCS until Ray kills it a second later (1.0 of the 1.3 s a shutdown took). The monitor holds no
    state a local Ray needs after its driver."""
    import ray
    from ray._private import ray_constants, worker
    if not ray.is_initialized():
        return
    node = getattr(worker, "_global_node", None)   # None when this process joined a running cluster
    for info in (node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node is not None else []):
        if info.process.poll() is None:
            info.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                info.process.wait(timeout=1)
    ray.shutdown()


def _check_reachable(address: str) -> None:
    """A plain TCP connect first: ray.init waits minutes on an address where nothing listens."""
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            return
    except (OSError, ValueError) as e:
        raise UserError(f"cannot reach a Ray cluster at {address!r} ({e}); start one with "
                        "`ray start --head` on that machine or fix the address (HOST:PORT, ray://HOST:10001 "
                        "or auto)", file="command line", key="--address") from None


def _alive() -> list[dict]:
    import ray
    return [n for n in ray.nodes() if n.get("Alive")]


def check_resources(cpu: float, gpu: float, key: str = "search.resources") -> None:
    """UserError unless some node can hold one trial's resources (`key`: the config key that asks for them)."""
    nodes = _alive()
    if not any(n["Resources"].get("CPU", 0) >= cpu and n["Resources"].get("GPU", 0) >= gpu for n in nodes):
        have = ", ".join(f"{n['NodeManagerAddress']}: {n['Resources'].get('CPU', 0):g} CPU "
                         f"{n['Resources'].get('GPU', 0):g} GPU" for n in nodes)
        raise UserError(f"no node can run a trial needing {cpu:g} CPU and {gpu:g} GPU "
                        f"(nodes: {have}); lower {key} or add a node", key=key)


def check_shared_storage(run_dir: str) -> None:
    """Every alive node must see the (local-path) run folder, or a dead node's checkpoints are lost."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    nodes = _alive()
    if len(nodes) < 2 or "://" in run_dir:
        return
    marker = os.path.join(run_dir, layout.STORAGE_MARKER)
    Path(marker).write_text(str(time.time()))

    @ray.remote(num_cpus=0)
    def sees(path):
        return os.path.exists(path)

    checks = {n["NodeManagerAddress"]: sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(marker) for n in nodes}
    blind = [addr for addr, ref in checks.items() if not ray.get(ref, timeout=60)]
    if blind:
        raise UserError(f"nodes {', '.join(blind)} cannot see {run_dir}: node-local storage loses checkpoints "
                        "when a node dies; pass --storage on a shared filesystem (NFS) or s3://bucket/path",
                        key="--storage")


def banner(run_dir: str, dashboard: str | None) -> None:
    """`ray: N node(s), C CPU, G GPU; dashboard: URL`, the run folder, and TensorBoard on it."""
    import ray
    res = ray.cluster_resources()
    where = dashboard or "see the Ray instance this process joined"
    print(f"ray: {len(_alive())} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU; dashboard: {where}"
          + (" (token: `ray get-auth-token`)" if os.environ.get("RAY_AUTH_MODE") == "token" else ""))
    print(f"run folder: {run_dir}  (tensorboard --logdir {run_dir})", flush=True)
