"""Connecting a search to Ray and checking the cluster before any trial starts.

What Ray itself would only show later (or never) becomes one UserError line here: an address where
nothing listens (ray.init would wait minutes), a trial's resources no node can hold (Ray leaves such
a trial PENDING forever), and a run folder some node cannot see (node-local storage loses checkpoints
when a node dies).
"""
from __future__ import annotations

__all__ = ["connect", "check_resources", "check_shared_storage", "banner", "job_metadata", "quiet"]

import os
import socket
import time
from pathlib import Path

from gatetune.core import layout
from gatetune.core.errors import UserError, first_line


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
    import logging

    import optuna
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")   # the legacy reporter: silent at verbose 0
    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        logging.getLogger("ray.tune").setLevel(logging.WARNING)


def connect(address: str | None, dashboard_host: str = "127.0.0.1", metadata: dict | None = None) -> str | None:
    """Start Ray here (address None) or join the cluster at `address`, with `metadata` on the Ray job;
    returns the dashboard URL ("off" without one; None when the caller had started Ray already)."""
    import ray
    from ray.job_config import JobConfig
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Snapshot the experiment (trial list + searcher state) every 2 s, not Ray's 10 s or more: a driver that
    # dies loses the trials started since the last snapshot, and a resumed search would run them again.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Ray keeps a record of every checkpoint of a trial (gatetune prunes the folders itself): the score
    # alone in each, not the whole result (4 KB an epoch in every snapshot)
    os.environ.setdefault("TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE", "1")
    if ray.is_initialized():
        return None
    if address and address != "auto":
        _check_reachable(address)
    job = JobConfig(metadata=metadata or {})   # a `ray job submit` job shows the submission's metadata instead
    try:
        if address:
            context = ray.init(address=address, log_to_driver=False, job_config=job)
        else:
            context = ray.init(address="local", dashboard_host=dashboard_host, log_to_driver=False,
                               include_dashboard=None, job_config=job)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        msg = first_line(e, 160) or type(e).__name__
        raise UserError(f"cannot reach a Ray cluster at {address!r} ({msg}); start one with "
                        "`ray start --head` or fix the address", file="command line", key="--address") from None
    url = getattr(context, "dashboard_url", None)
    if not url:
        return "off"
    return url if "://" in url else f"http://{url}"


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
