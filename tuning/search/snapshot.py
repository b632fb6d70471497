"""A copy of a search's last complete state, for run folders on a disk that can fill up.

Ray Tune snapshots a search into its run folder (experiment_state-*.json, search_gen_state-*.json,
searcher-state-*.pkl, callback-states-*.pkl) by copying the new files over the old ones in place. When the
disk fills during that copy, the search's only state is cut short; `Tuner.restore` then logs the error and
starts the search afresh: finished trials forgotten, new ones sampled, the run folder mixed.

    KeepState(run_dir)   a Tune callback: each time the snapshot files are complete and have changed, copies
                         them, gzipped (a seventh of their size), into <run>/.state/ (a new folder renamed into
                         place, so a failed copy leaves the previous one), taking at most a twentieth of the
                         driver's time
    recover(run_dir)     before a resume: if the newest snapshot is cut short, sets the newest files aside
                         (renamed *.cut-short) and puts the copy back; a UserError if there is no copy
    leave_out(store, left_out(store))
                         before a resume: finds the trials a driver that died started after its last snapshot
                         (left_out: the snapshot does not name their folders; the restored search never runs
                         them, its searcher, restored too, samples others instead) and records them in
                         decisions.jsonl, which the report reads to leave them out
    clear_staging(...)   once connected, before the restore: removes those trials from the lost driver's staging
                         folder on this node, which the resumed driver would otherwise upload

Only folders on a filesystem need this: object stores (s3://, gs://) write a whole object or nothing.
"""
from __future__ import annotations

__all__ = ["KeepState", "clear_staging", "leave_out", "left_out", "recover", "STATE_PATTERNS"]

import fnmatch
import gzip
import json
import os
import pickle
import shutil
import time

from ray.tune import Callback

from gatetune.core import layout
from gatetune.core.errors import UserError
from gatetune.core.storage import RunStore

STATE_PATTERNS = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl",
                  "callback-states-*.pkl")
COPY_SHARE = 0.05   # of the driver's time spent copying, at most


def _newest(run_dir: str) -> list[str]:
    """The newest file of each snapshot kind (Ray names them by session time, which sorts as text)."""
    names = os.listdir(run_dir)
    return [max(found) for p in STATE_PATTERNS if (found := fnmatch.filter(names, p))]


def _session(name: str) -> str:
    """The session time in a snapshot file's name (`experiment_state-2026-11-25_17-37-38.json`)."""
    for p in STATE_PATTERNS:
        head, tail = p.split("*")
        if name.startswith(head) and name.endswith(tail):
            return name[len(head):-len(tail)]
    return ""


def _ends_whole(path: str) -> bool:
    """Cheap: a JSON snapshot ends with `}`, a pickle (search_gen_state-*.json is one too) with its STOP opcode."""
    try:
        with open(path, "rb") as f:
            head = f.read(1)
            f.seek(max(0, os.path.getsize(path) - 64))
            tail = f.read().rstrip()
    except OSError:
        return False
    return tail.endswith(b"." if head == b"\x80" else b"}")


def _loads(path: str) -> bool:
    """Thorough, for a resume: the file (or its gzipped copy, *.gz) parses, as a pickle or as JSON."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
        pickle.loads(data) if data[:1] == b"\x80" else json.loads(data)
        return True
    except (ModuleNotFoundError, AttributeError):
        raise   # whole, but naming classes this gatetune does not have: the caller says so
    except Exception:   # noqa: BLE001  (any failure to read or parse means: cut short)
        return False


def _stamps(files: list[str]) -> tuple:
    """(path, size, mtime) of each file: a file Ray rewrote since has another stamp."""
    return tuple((f, st.st_size, st.st_mtime_ns) for f in files for st in [os.stat(f)])


class KeepState(Callback):
    """Copies the newest complete snapshot into <run>/.state/ as the search runs (see the module)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self._copied: tuple = ()
        self._next = 0.0

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() < self._next:
            return
        started = time.monotonic()
        self._try_copy()
        self._next = started + max(1.0, (time.monotonic() - started) / COPY_SHARE)

    def on_experiment_end(self, trials, **info):
        self._try_copy()

    def _try_copy(self) -> None:
        try:
            self._copy()
        except OSError:
            pass   # a full disk: the previous copy stays, and the next try copies again

    def _copy(self) -> None:
        files = [os.path.join(self.run_dir, n) for n in _newest(self.run_dir)]
        stats = _stamps(files)
        if not files or stats == self._copied or not all(_ends_whole(f) for f in files):
            return
        new, keep, old = (os.path.join(self.run_dir, n) for n in (".state.new", layout.STATE_COPY, ".state.old"))
        shutil.rmtree(new, ignore_errors=True)
        os.mkdir(new)
        try:
            for f in files:
                with open(f, "rb") as src, gzip.open(os.path.join(new, os.path.basename(f) + ".gz"), "wb", 1) as dst:
                    shutil.copyfileobj(src, dst)
            if _stamps(files) != stats or not all(_ends_whole(f) for f in files):
                return   # Ray was rewriting them: the next step copies the finished ones
            if os.path.isdir(keep):
                os.rename(keep, old)
            os.rename(new, keep)
            shutil.rmtree(old, ignore_errors=True)
            self._copied = stats
        finally:
            shutil.rmtree(new, ignore_errors=True)


def recover(run_dir: str) -> str | None:
    """Before a resume of a folder on a filesystem: puts the kept copy back if the newest snapshot is cut
    short; returns a line saying so, or None when the snapshot is whole."""
    if all(_loads(os.path.join(run_dir, n)) for n in _newest(run_dir)):
        return None
    copy = next((d for d in (os.path.join(run_dir, layout.STATE_COPY), os.path.join(run_dir, ".state.old"))
                 if os.path.isdir(d) and os.listdir(d)), None)
    if copy is None or not all(_loads(os.path.join(copy, n)) for n in os.listdir(copy)):
        raise UserError("the search's state was cut short (a full disk?) before a complete copy of it was kept; "
                        "start the search again with `gatetune search CONFIG --name NEW`", file=run_dir)
    kept = [n.removesuffix(".gz") for n in os.listdir(copy)]
    first = min(_session(n) for n in kept)   # the copy's session: files of later sessions are set aside too
    for name in os.listdir(run_dir):
        if _session(name) and (name in kept or _session(name) > first):
            os.replace(os.path.join(run_dir, name), os.path.join(run_dir, name + ".cut-short"))
    for name in kept:
        with gzip.open(os.path.join(copy, name + ".gz"), "rb") as src, open(os.path.join(run_dir, name), "wb") as dst:
            shutil.copyfileobj(src, dst)
    return (f"{run_dir}: the search's newest state was cut short (a full disk?); resuming from the copy kept at "
            f"{time.strftime('%H:%M:%S', time.localtime(os.path.getmtime(copy)))} (the cut files renamed *.cut-short)")


def _known(store: RunStore) -> set[str] | None:
    """Trial ids and folder names the newest experiment_state names; None without a readable one."""
    states = sorted(fnmatch.filter(store.listdir(), layout.EXPERIMENT_STATE_GLOB))
    if not states:
        return None
    try:
        entries = json.loads(store.read_text(states[-1]))["trial_data"]
        trials = [json.loads(t) if isinstance(t, str) else t for t, _ in entries]
        return {os.path.basename(t.get("relative_logdir") or "") for t in trials} | {t["trial_id"] for t in trials}
    except (OSError, ValueError, KeyError, TypeError):
        return None   # a snapshot Ray cannot read either: Tuner.restore says so


def left_out(store: RunStore) -> list[str]:
    """Ids of the trials whose folders the newest experiment_state does not name (trial_<id> folders a lost
    driver created after its last snapshot, with results or not yet: its driver staging folder may hold results
    that a resumed driver on the same node would upload later); [] without a readable snapshot."""
    if (known := _known(store)) is None:
        return []
    return [name.removeprefix(layout.TRIAL_PREFIX) for name in store.listdir()
            if name.startswith(layout.TRIAL_PREFIX) and name not in known
            and name.removeprefix(layout.TRIAL_PREFIX) not in known]


def clear_staging(store: RunStore, artifacts_dir: str, lost: list[str]) -> list[str]:
    """Remove the left_out trials' folders from the lost driver's staging folder on this node
    (artifacts_dir/<time>/<search>/driver_artifacts/trial_<id>, artifacts_dir being <ray session>/artifacts:
    results the lost driver had not uploaded yet). A resumed driver on the node of the lost one gets that
    staging folder back (Ray names it by the time the search first started) and uploads what it holds: the
    left-out trials would reappear with results. Returns the folders removed."""
    import glob
    name = store.where.rstrip("/").rsplit("/", 1)[-1]
    gone = []
    for staging in glob.glob(os.path.join(glob.escape(artifacts_dir), "*", glob.escape(name), "driver_artifacts")):
        for t in lost:
            folder = os.path.join(staging, layout.trial_dirname(t))
            if os.path.isdir(folder):
                shutil.rmtree(folder, ignore_errors=True)
                gone.append(folder)
    return gone


def leave_out(store: RunStore, lost: list[str]) -> str | None:
    """Record the trials of `lost` (left_out's) not recorded yet in decisions.jsonl (`{"trial_id", "left_out"}`);
    a line saying so, or None when there are none. Their folders stay."""
    known = store.read_text(layout.DECISIONS) if store.exists(layout.DECISIONS) else ""
    if not (lost := [t for t in lost if f'"{t}", "left_out"' not in known]):
        return None
    why = "started after the lost driver's last snapshot"
    store.append(layout.DECISIONS, "".join(json.dumps({"trial_id": t, "left_out": why}) + "\n" for t in lost))
    return (f"{store.where}: {len(lost)} trial(s) started after the lost driver's last snapshot are not part of "
            f"the resumed search (their folders stay; the report leaves them out): {', '.join(lost)}")
