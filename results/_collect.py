"""Read a gatetune search folder (Ray Tune's on-disk experiment layout) with json and pandas only.

Ray need not be running or even importable: a report runs on a laptop next to a copied run folder,
or beside a live search. File names are core.layout's. What is read, and why:
- `gatetune.yaml`: the resolved base config; each trial's `params.json` holds only its sampled
  dotted keys (`gating.density`), so a trial's config = base with those keys set (core.dotted.trial_config,
  the same function the trials use).
- `<trial>/result.json`, not progress.csv (whose header is fixed by the first report, so late keys
  such as `latency_ratio` are lost). A restart without a checkpoint repeats `training_iteration`
  values: the last line per iteration wins. A live search may leave a half-written last line.
- Status from the newest readable `experiment_state-*.json` (Ray's internal format, checked by
  tests/test_internals.py), never from `error.txt` (written also for trials that failed once and
  recovered). Without one (a search that has not snapshotted yet), the status is inferred from the
  result files.
- `decisions.jsonl` (written by gatetune's schedulers): why a trial was stopped early; and (written by
  `gatetune resume`) the trials a lost driver started after its last snapshot, which the report leaves out.
- `<trial>/latency.json` (written at the end of a search for the Pareto trials): `latency_ratio`
  measured on one checkpoint; used only while that checkpoint is still the trial's latest.
Paths inside Ray's files are absolute and go stale when a folder is copied, so everything is
resolved relative to RUN_DIR.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from gatetune.core import layout
from gatetune.core import trials as T
from gatetune.core.dotted import flatten, trial_config
from gatetune.core.errors import UserError
from gatetune.core.storage import RunStore, is_remote

CONFIG_FILE, DECISIONS_FILE, LATENCY_FILE, RESULT_FILE = layout.CONFIG, layout.DECISIONS, layout.LATENCY, layout.RESULT
STATE_GLOB = layout.EXPERIMENT_STATE_GLOB
STATUSES = T.STATUSES   # every value of the `status` column, in the order reports list them

# Trial ids inside Ray's trial folder names: `<5 hex>_<5 digits>` (grid/random), `<8 hex>` (searchers);
# gatetune's searches name trial folders `trial_<id>`.
_TRIAL_ID = re.compile(r"(?:^trial_|_)([0-9a-f]{5}_\d{5}|[0-9a-f]{8})(?:_\d+_|$)")


class ReportError(UserError):
    """A folder that cannot be reported. The message is one line: the path, what is wrong, the fix."""


@dataclass
class Run:
    path: Path    # a local folder: the run folder, or a local mirror of a remote one
    config: dict  # gatetune.yaml, nested as written
    ray: dict[str, dict]  # trial_id -> {"status", "dir", "config"} from the newest experiment_state
    decisions: dict[str, str]  # trial_id -> stopped_by, from decisions.jsonl
    where: str = ""  # the run folder as the user named it (a path or s3://...); "" = path
    left_out: frozenset[str] = frozenset()  # trials a lost driver started after its last snapshot (resume says)

    @property
    def name(self) -> str:
        return str(self.config.get("name") or Path(self.where or self.path).name)


def collect(run_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (trials, history) of a search folder.

    trials: one row per trial: `trial_id, status, stopped_by, ray_status, trial_dir, checkpoint`, the
    effective config flattened to `config/<dotted key>`, then every metric of the trial's last
    report. history: one row per trial and report (`trial_id` first, then the metrics), in order.
    """
    trials, history, _ = collect_run(open_run(run_dir))
    return trials, history


def open_run(run_dir) -> Run:
    """The run folder `run_dir`; a remote one (s3://...) is mirrored into a local folder first (its files but
    the checkpoints' contents: core.storage.RunStore.mirror)."""
    if is_remote(run_dir):
        store = RunStore(run_dir)
        if not store.exists(CONFIG_FILE):
            raise ReportError(f"{run_dir}: not a gatetune search folder (no {CONFIG_FILE}); give the run folder "
                              "`gatetune search` printed")
        return dataclasses.replace(open_run(store.mirror()), where=str(run_dir))
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"{path}: no such folder; pass the run folder of a search (storage_path/name, "
                          "e.g. runs/quickstart)")
    states = sorted(path.glob(STATE_GLOB))
    if not (path / CONFIG_FILE).is_file():
        raise ReportError(_not_a_run(path, has_state=bool(states)))
    ray = _read_state(states)
    if ray is None and not _trial_dirs(path):
        raise ReportError(f"{path}: no trials yet (no {STATE_GLOB}, no trial folders); the search writes "
                          "its first snapshot about 10 s after it starts: wait, or check that it runs")
    return Run(path, _read_config(path / CONFIG_FILE), ray or {}, _read_decisions(path / DECISIONS_FILE),
               left_out=_read_left_out(path / DECISIONS_FILE))


def _not_a_run(path: Path, has_state: bool) -> str:
    missing = f"no {CONFIG_FILE}" + ("" if has_state else f", no {STATE_GLOB}")
    inside = sorted(p.parent.name for p in path.glob(f"*/{CONFIG_FILE}"))
    hint = f"; run folders inside it: {', '.join(inside)}" if inside else ""
    return f"{path}: not a gatetune search folder ({missing}); run `gatetune search CONFIG` first{hint}"


def _read_config(file: Path) -> dict:
    try:
        config = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ReportError(f"{file}: cannot read it ({str(exc).splitlines()[0]})") from exc
    if not isinstance(config, dict):
        raise ReportError(f"{file}: must be a mapping of config sections, got {type(config).__name__}")
    return config


def _read_state(files: list[Path]) -> dict[str, dict] | None:
    """Trials of the newest readable experiment_state-<timestamp>.json (timestamps sort as text).

    Format (Ray 2.60, internal): {"trial_data": [[trial_json, run_metadata_json], ...], ...}; the
    trial JSON has trial_id, status (PENDING RUNNING PAUSED TERMINATED ERROR), relative_logdir,
    config. A file being rewritten by a live search may not parse: then the next older one is used.
    """
    for file in reversed(files):
        try:
            entries = json.loads(file.read_text())["trial_data"]
            trials = [json.loads(e[0]) if isinstance(e[0], str) else e[0] for e in entries]
            return {t["trial_id"]: {"status": t.get("status"), "config": t.get("config") or {},
                                    "dir": Path(t.get("relative_logdir") or "").name} for t in trials}
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue
    return None


def _read_decisions(file: Path) -> dict[str, str]:
    decisions = {}
    for record in _json_lines(file):
        if record.get("trial_id") and record.get("stopped_by"):
            decisions[str(record["trial_id"])] = str(record["stopped_by"])
    return decisions


def _read_left_out(file: Path) -> frozenset[str]:
    """Trials `gatetune resume` found a lost driver had started after its last snapshot: not in the search."""
    return frozenset(str(r["trial_id"]) for r in _json_lines(file) if r.get("trial_id") and r.get("left_out"))


def _json_lines(file: Path) -> list[dict]:
    """Parsed lines of a JSON-lines file; a half-written line of a live search is skipped."""
    if not file.is_file():
        return []
    records = []
    for line in file.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _trial_dirs(path: Path) -> list[Path]:
    return [d for d in sorted(path.iterdir())
            if d.is_dir() and ((d / layout.PARAMS).is_file() or (d / RESULT_FILE).is_file())]


def collect_run(run: Run) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(trials, history, searched keys); see `collect`."""
    by_dir = {info["dir"]: tid for tid, info in run.ray.items() if info["dir"]}
    found = {}  # trial_id -> trial folder
    for d in _trial_dirs(run.path):
        if run.ray and d.name not in by_dir and not _json_lines(d / RESULT_FILE):
            continue   # a trial a crashed driver created after its last snapshot: the resumed search never ran it
        tid = by_dir.get(d.name) or _id_from_files(d)
        if tid in run.left_out and tid not in run.ray:
            continue   # the same, with results: `gatetune resume` recorded it in decisions.jsonl
        found.setdefault(tid, d)
    searched = list(run.config.get("space") or {})
    rows, records = [], []
    for tid in sorted(set(found) | set(run.ray)):
        folder = found.get(tid) or _state_folder(run, tid)
        params = _params(folder, run.ray.get(tid))
        searched += [k for k in params if k not in searched and k not in (*T.TRIAL_KEYS, "seed")]
        history = _history(folder, tid)
        rows.append(_trial_row(run, tid, folder, _effective(run.config, params), history[-1] if history else None))
        records += history
    trials = pd.DataFrame(rows, columns=None if rows else ["trial_id", "status"])
    return trials, _frame(records), searched


def _id_from_files(folder: Path) -> str:
    for record in _json_lines(folder / RESULT_FILE)[:1]:
        if record.get("trial_id"):
            return str(record["trial_id"])
    match = _TRIAL_ID.search(folder.name)
    return match.group(1) if match else folder.name


def _state_folder(run: Run, tid: str) -> Path | None:
    """The folder experiment_state names for a trial, if it exists yet (a pending trial has none)."""
    name = run.ray[tid]["dir"]
    return run.path / name if name and (run.path / name).is_dir() else None


def _params(folder: Path | None, ray_trial: dict | None) -> dict:
    """The trial's sampled parameters: params.json, else the config in experiment_state."""
    if folder is not None:
        try:
            params = json.loads((folder / layout.PARAMS).read_text())
            if isinstance(params, dict):
                return params
        except (OSError, ValueError):
            pass
    return dict((ray_trial or {}).get("config") or {})


def _effective(base: dict, params: dict) -> dict:
    """The trial's config, flat (dotted keys): the base config with its parameters set, as the trial ran."""
    try:
        return flatten(trial_config(base, params))
    except UserError:   # a parameter that does not fit the base (a foreign folder): set it beside the rest
        return {**flatten(base), **params}


def _history(folder: Path | None, trial_id: str) -> list[dict]:
    """The trial's reports in order, flat (`a/b` keys), `trial_id` first: plain dicts, one DataFrame for
    all trials is built once at the end (a DataFrame per trial was most of a 1,000-trial report's time)."""
    by_iteration: dict = {}
    for n, record in enumerate(_json_lines(folder / RESULT_FILE) if folder is not None else []):
        record.pop("config", None)  # the trial's config, repeated on every line
        record.pop("trial_id", None)
        iteration = record.get("training_iteration", ("line", n))
        by_iteration.pop(iteration, None)   # the last line per iteration wins, in the place it was written
        by_iteration[iteration] = {"trial_id": trial_id, **flatten(record, sep="/")}
    ordered = by_iteration.values()
    if all(isinstance(i, (int, float)) and not isinstance(i, bool) for i in by_iteration):
        ordered = (by_iteration[i] for i in sorted(by_iteration))
    return list(ordered)


def _trial_row(run: Run, tid: str, folder: Path | None, config: dict, last: dict | None) -> dict:
    ray_status = run.ray[tid]["status"] if tid in run.ray else None
    status, stopped_by = trial_status(ray_status, last, config, run.decisions.get(tid))
    checkpoint = _latest_checkpoint(folder)
    return {"trial_id": tid, "status": status, "stopped_by": stopped_by, "ray_status": ray_status,
            "trial_dir": folder.name if folder is not None else "",
            "checkpoint": checkpoint,
            **{f"config/{k}": v for k, v in config.items()},
            **{k: v for k, v in (last or {}).items() if k != "trial_id"},
            **_latency(folder, checkpoint)}


def _latency(folder: Path | None, checkpoint: str) -> dict:
    """{"latency_ratio": r} from the trial's latency.json when it measured `checkpoint`, else {}."""
    if folder is None or not checkpoint:
        return {}
    try:
        record = json.loads((folder / LATENCY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or record.get("checkpoint") != checkpoint.rsplit("/", 1)[-1]:
        return {}
    ratio = record.get("latency_ratio")
    return {"latency_ratio": float(ratio)} if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) else {}


def trial_status(ray_status: str | None, last: dict | None, config: dict, decision: str | None) -> tuple[str, str]:
    """(status, stopped_by) of one trial: core.trials.classify, the rule the searcher and the gauges use (a
    scheduler's decision means it ended, whatever the lagging experiment state says)."""
    status = T.classify(ray_status, last, config.get("train.epochs"), ended=decision is not None)
    if status == T.Status.DIVERGED:
        return status.value, "diverged"
    if status != T.Status.STOPPED:
        return status.value, ""
    scheduler = config.get("search.scheduler.name")
    return status.value, decision or (str(scheduler) if scheduler else "")


def _latest_checkpoint(folder: Path | None) -> str:
    """`<trial folder>/checkpoint_NNNNNN` of the highest index on disk, relative to RUN_DIR; "" if none."""
    if folder is None:
        return ""
    indexed = [(int(m.group(1)), d.name) for d in folder.iterdir()
               if d.is_dir() and (m := layout.CHECKPOINT_DIR.fullmatch(d.name))]
    return f"{folder.name}/{max(indexed)[1]}" if indexed else ""


def _frame(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(records) if records else pd.DataFrame({"trial_id": []})
