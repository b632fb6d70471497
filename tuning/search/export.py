"""<run>/optuna.db: a read-only SQLite copy of a search's Optuna study, for optuna-dashboard.

The study itself lives in the searcher's memory and is pickled with Ray's snapshots (study.py). At each
snapshot, update(study) copies the finished trials not copied yet (each Optuna trial carries its Ray trial
id as the user attribute `trial_id`). A resumed search rebuilds the file from the restored study. (An
SQLite study written live would go ahead of the snapshot it is resumed with: after a driver crash it would
hold trials the restored searcher never heard of.)
"""
from __future__ import annotations

__all__ = ["StudyExport"]

import os
import tempfile
import warnings

import optuna

from gatetune.core import layout
from gatetune.core.storage import RunStore


class StudyExport:
    """The copy in `store` (core.storage.RunStore). Pickles as its store alone: the file it writes and its
    open connection belong to this process."""

    def __init__(self, store: RunStore):
        self.store = store
        self.reset()

    def reset(self) -> None:
        """Forget this process's file: the next update writes a new one with every finished trial."""
        self.exported: set[int] = set()
        self._copy: str | None = None   # this process's SQLite file: in the run folder, or uploaded from /tmp
        self._sink = None               # (study, storage) opened on it

    def __getstate__(self):
        return {"store": self.store}

    def __setstate__(self, state):
        self.store = state["store"]
        self.reset()

    def update(self, study: optuna.Study) -> None:
        """Copy the finished trials not exported yet (all of them, into a new file, the first time in this
        process). Best effort: a snapshot must not fail for want of the copy."""
        done = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        new = [t for t in done if t.number not in self.exported]
        if not new:
            return
        store = self.store
        try:
            if self._copy is None:
                self._copy = str(store.local_path(f".{layout.STUDY}.new")) if not store.remote else \
                    os.path.join(tempfile.mkdtemp(prefix="gatetune-study-"), layout.STUDY)
                if os.path.exists(self._copy):
                    os.remove(self._copy)
            self._open(study).add_trials(new)
            if store.remote:
                store.upload(self._copy, layout.STUDY)
            elif not self.exported:   # the first file of this process replaces the folder's (readers see one or the other)
                self._close()
                os.replace(self._copy, store.local_path(layout.STUDY))
                self._copy = str(store.local_path(layout.STUDY))
            self.exported |= {t.number for t in new}
        except Exception as e:   # noqa: BLE001
            warnings.warn(f"{store.uri(layout.STUDY)}: Optuna study not exported ({type(e).__name__}: {e})")

    def _open(self, study: optuna.Study) -> optuna.Study:
        """The study in the SQLite file, opened once per file: opening one loads and checks every Optuna
        migration script (20-70 ms), which at every snapshot was 40% of the driver's time in 100 trials."""
        if self._sink is None:
            storage = optuna.storages.RDBStorage(f"sqlite:///{self._copy}")
            self._sink = optuna.create_study(storage=storage, study_name=study.study_name,
                                             directions=study.directions, load_if_exists=True), storage
        return self._sink[0]

    def _close(self) -> None:
        """Close the file's connections (before it is renamed: a pooled connection would keep writing the
        renamed file under its old name's journal)."""
        if self._sink is not None:
            self._sink[1].engine.dispose()
            self._sink = None
