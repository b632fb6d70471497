"""Callbacks that keep a search's run folder right while trials come and go: PruneCheckpoints (each trial's
newest checkpoints, none that a lagging snapshot still names) and KeepResults (a failed trial's result.json
uploaded before Ray restarts it)."""
from __future__ import annotations

__all__ = ["PruneCheckpoints", "KeepResults"]

import warnings
from pathlib import Path

from ray.tune import Callback

from gatetune.core import layout
from gatetune.core.errors import first_line
from gatetune.core.storage import RunStore


class PruneCheckpoints(Callback):
    """Keeps each trial's newest `keep` checkpoint folders in the run folder (RunStore.prune), deleting older
    ones as new ones arrive, but none that the run folder's experiment snapshot may still name. Ray's snapshot
    names each trial's newest checkpoint when it was taken, a resumed search restores the trial from that one,
    and the snapshot in the run folder lags the driver: Ray uploads it in the background, and a driver lost
    mid-upload leaves the one before. So a checkpoint is deleted only once it is older than the one the
    snapshot taken LAG snapshots ago named (get_state runs at each snapshot; Ray waits for one upload before it
    starts the next), and at the end of the search down to `keep`, once the run folder holds Ray's last snapshot
    (Ray logs a failed upload of it and goes on: on a full disk the run folder keeps an older one, and the
    checkpoints it names are then kept for `gatetune resume`).
    (Ray's CheckpointConfig(num_to_keep) deletes at once instead, and forces a snapshot of the whole experiment
    after every checkpoint of a trial with a short epoch: 37 MB of JSON per checkpoint at 1,000 trials.)"""

    LAG = 2

    def __init__(self, store: RunStore, keep: int):
        self.store, self.keep = store, keep
        self._newest: dict[str, int] = {}   # trial id -> number of its newest checkpoint
        self._named: list[dict[str, int]] = []   # self._newest as of each of the last LAG snapshots
        self._pruned: dict[str, int] = {}   # trial id -> the `below` it was last pruned with

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if (n := layout.checkpoint_number(checkpoint.path)) is not None:
            self._newest[trial.trial_id] = n

    def get_state(self):
        """Called by Ray at each experiment snapshot (CallbackList.save_to_dir); no state of its own to save."""
        if len(self._named) >= self.LAG:
            self._prune(self._named.pop(0))
        self._named.append(dict(self._newest))
        return None

    def on_experiment_end(self, trials, **info):
        if trials and not self._last_snapshot_landed(trials[0]):
            warnings.warn("the run folder lacks Ray's last experiment snapshot (its upload failed); old checkpoints "
                          "are kept so that `gatetune resume` finds the ones the older snapshot names")
            return
        self._prune({tid: n + 1 for tid, n in self._newest.items()})

    def _last_snapshot_landed(self, trial) -> bool:
        """Whether the run folder's newest experiment_state file is the driver's: Ray writes each snapshot to
        the driver's staging folder and uploads it from there."""
        try:
            staged = sorted(Path(trial.storage.experiment_driver_staging_path).glob("experiment_state-*.json"))
            return bool(staged) and self.store.read_bytes(staged[-1].name) == staged[-1].read_bytes()
        except Exception:   # noqa: BLE001  (a missing or unreadable copy: not landed)
            return False

    def _prune(self, below: dict[str, int]) -> None:
        for tid, n in below.items():
            if self._pruned.get(tid) == n:
                continue
            try:
                self.store.prune(layout.trial_dirname(tid), layout.CHECKPOINT_DIR, self.keep, below=n,
                                 newest=self._newest.get(tid))
                self._pruned[tid] = n
            except Exception as e:   # noqa: BLE001  (a callback that raises would end the search)
                warnings.warn(f"trial {tid}: old checkpoints not pruned ({type(e).__name__}: {e})")


class KeepResults(Callback):
    """When Ray restarts a failed trial, its JSON logger copies the trial's result.json from the run folder over
    the driver's copy; the run folder's lags by up to one snapshot (Ray uploads the driver's trial folders with
    each), so the epochs reported in between would be lost from it. On the failure, before the restart, the
    driver's copy is uploaded."""

    def __init__(self, store: RunStore):
        self.store = store

    def on_trial_recover(self, iteration, trials, trial, **info):
        local = Path(trial.local_path, layout.RESULT)
        if not local.is_file():
            return
        try:
            self.store.upload(local, f"{layout.trial_dirname(trial.trial_id)}/{layout.RESULT}")
        except Exception as e:   # noqa: BLE001  (a callback that raises would end the search)
            warnings.warn(f"trial {trial.trial_id}: result.json not saved before its restart ({type(e).__name__}: "
                          f"{first_line(e)}); the epochs since the last snapshot may be missing from it")
