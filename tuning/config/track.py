"""`search.track`: the experiment trackers a search (and `gatetune train` of the same file) logs to, and their
checks before any work starts.

    search:
      track:
        mlflow: {tracking_uri: http://127.0.0.1:5000}          # experiment: default the search's name
        wandb: {project: gates, mode: offline}                 # entity, dir

What each tracker receives is tuning/search/track.py's (a search) and tuning/train/track.py's (one run). The
checks here are cheap and local: the package is installed, an MLflow server answers within 3 s, a database's
folder exists, and W&B's online mode has an API key; anything else shows up as a warning line while logging.
"""
from __future__ import annotations

__all__ = ["TrackCfg", "MlflowTrackCfg", "WandbTrackCfg", "check_trackers", "installed", "SERVER_TIMEOUT_S"]

import importlib.util
import netrc
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

SERVER_TIMEOUT_S = 3.0   # an MLflow server that does not answer /health within this is refused


class _Strict(BaseModel):
    # as schema.py's: unknown keys are errors, no str->number coercion
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, allow_inf_nan=False)


class MlflowTrackCfg(_Strict):
    """MLflow: the search is one run, each trial a run nested under it (gatetune train: one run)."""
    tracking_uri: str = Field(min_length=1)
    """Tracking server (http://host:5000) or database (sqlite:///mlflow.db); a server is checked before any trial."""
    experiment: str | None = Field(None, min_length=1)
    """MLflow experiment to log into (default: the config's `name`); created when missing."""


class WandbTrackCfg(_Strict):
    """Weights & Biases: each trial is one W&B run (its id: the trial id), grouped under the search's name."""
    project: str = Field(min_length=1)
    """W&B project."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """online needs WANDB_API_KEY (or `wandb login`); offline writes run folders for `wandb sync`."""
    entity: str | None = None
    """W&B team or user (default: the API key's own)."""
    dir: str | None = None
    """Folder that gets wandb/ (default: the run folder; a relative path is from the current folder)."""


class TrackCfg(_Strict):
    """Experiment trackers: each trial's params (its sampled keys) and per-epoch metrics and, after the search,
    its status, gate_health, pareto and checkpoint."""
    mlflow: MlflowTrackCfg | None = None
    """e.g. {tracking_uri: http://127.0.0.1:5000}; needs the mlflow package (pip install 'gatetune[mlflow]')."""
    wandb: WandbTrackCfg | None = None
    """e.g. {project: gates, mode: offline}; needs the wandb package (pip install 'gatetune[wandb]')."""


def installed(package: str) -> bool:
    """Whether `package` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):   # ValueError: a module set to None in sys.modules (tests)
        return False


def check_trackers(track: TrackCfg | None, fail: Callable[[str, str], None]) -> None:
    """fail(key, message) for the first tracker that cannot work from here: its package missing, an MLflow
    server that does not answer (or a database folder that does not exist), W&B online without an API key."""
    if track is None:
        return
    for name, cfg in (("mlflow", track.mlflow), ("wandb", track.wandb)):
        if cfg is not None and not installed(name):
            fail(f"search.track.{name}", f"needs the {name} package: pip install 'gatetune[{name}]'")
    if track.mlflow is not None:
        problem = _mlflow_problem(track.mlflow.tracking_uri)
        if problem:
            fail("search.track.mlflow.tracking_uri", problem)
    if track.wandb is not None and track.wandb.mode == "online" and not _wandb_key():
        fail("search.track.wandb.mode", "W&B online mode needs an API key: set WANDB_API_KEY (or run `wandb login`), "
                                        "or use mode: offline (then `wandb sync`) or disabled")


def _mlflow_problem(uri: str) -> str | None:
    """Why an MLflow tracking URI cannot be used from here ("" or None when it can, as far as a quick look says)."""
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=SERVER_TIMEOUT_S):
                return None
        except urllib.error.HTTPError:   # it answered (an auth proxy, a server without /health): reachable
            return None
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            return (f"MLflow tracking server {uri} does not answer ({reason}); start it (`mlflow server --host "
                    "127.0.0.1 --port 5000`) or fix the address")
    if scheme == "sqlite":
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
        folder = Path(path).expanduser().parent if path and path != ":memory:" else None
        if folder is not None and not folder.is_dir():
            return f"the folder of the MLflow database {uri} does not exist ({folder}); create it or fix the URI"
    return None


def _wandb_key() -> bool:
    """An API key in WANDB_API_KEY, or `wandb login`'s entry for the W&B host in the netrc file."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return bool(host and netrc.netrc(path).authenticators(host))
    except (OSError, netrc.NetrcParseError):
        return False
