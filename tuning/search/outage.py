"""A remote run folder (s3://, gs://) that stops answering for a while: what the trials and the driver do.

Ray alone turns a minute without the object store into errored trials: a trial's epoch checkpoint upload
fails, Tune restarts the trial, its restore fails the same way, and search.max_failures is used up in
seconds (with a traceback on the console each time). Here:

- a trial retries its epoch report (the checkpoint upload inside tune.report) 1, 2, 4 ... 10 s apart for
  up to search.storage_timeout_s + TRIAL_GRACE_S (the driver decides first), saying in its worker log when
  the wait starts and ends (retry());
- the driver probes the run folder every few seconds while the search runs (StorageWatch, a Tune callback):
  it prints one line when the store stops answering and one when it is back, and once it has been
  unreachable for longer than search.storage_timeout_s it stops the search with one line: `gatetune
  resume URI` goes on from the last experiment state that reached the store (epochs trained since then
  are trained again: at most the outage's length of work);
- Ray's own per-attempt tracebacks (the experiment snapshot upload every few seconds, a new trial's folder)
  are left out while the watch has said the store is away, and are one line a minute otherwise
  (QuietStorageErrors).
"""
from __future__ import annotations

__all__ = ["retry", "report_retrying", "StorageUnreachable", "StorageWatch", "QuietStorageErrors", "quiet_storage_errors"]

import logging
import sys
import threading
import time

from ray.tune import Callback

from gatetune.core import layout
from gatetune.core.errors import UserError, first_line
from gatetune.core.storage import RunStore

PROBE_S = 5.0          # how often the driver looks at the run folder
MAX_DELAY_S = 10.0     # the longest pause between a trial's retries
TRIAL_GRACE_S = 30.0   # a trial waits this much longer than the driver: the driver's stop is the one line
STORE_AWAY = threading.Event()   # set while a StorageWatch of this process finds its store unreachable


class StorageUnreachable(RuntimeError):
    """A trial waited search.storage_timeout_s for the run folder's storage; its previous checkpoint is the
    last one that reached the store."""


def retry(what: str, fn, *, timeout_s: float, say=None, sleep=time.sleep, clock=time.monotonic):
    """fn() until it does not raise OSError, for up to timeout_s seconds, 1, 2, 4 ... MAX_DELAY_S s apart;
    `what` names the operation in the lines said (default: to stderr, the worker log) when the wait starts
    and when it ends. StorageUnreachable past timeout_s."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    start, delay = None, 1.0
    while True:
        try:
            out = fn()
        except OSError as e:
            now = clock()
            if start is None:
                start = now
                say(f"{what}: the run folder's storage does not answer ({first_line(e, 160)}); retrying for up "
                    f"to {timeout_s:g} s (search.storage_timeout_s)")
            if now - start >= timeout_s:
                line = (f"{what}: the run folder's storage did not answer for {now - start:.0f} s "
                        f"({first_line(e, 160)}); the previous checkpoint is the last one stored")
                say(line)
                raise StorageUnreachable(line) from None
            sleep(min(delay, max(0.0, timeout_s - (now - start))))
            delay = min(2 * delay, MAX_DELAY_S)
            continue
        if start is not None:
            say(f"{what}: the storage answers again after {clock() - start:.0f} s")
        return out


def report_retrying(trial_id: str, epoch: float, metrics: dict, checkpoint, timeout_s: float) -> None:
    """tune.report(metrics, checkpoint=checkpoint) under retry(); each attempt writes the same
    checkpoint_<index> folder (Ray counts the index up before its upload, a failed one included)."""
    from ray import tune
    from ray.train._internal.session import get_session
    storage = get_session().storage
    index = storage.current_checkpoint_index

    def attempt():
        storage.current_checkpoint_index = index
        tune.report(metrics, checkpoint=checkpoint)

    retry(f"[{trial_id}] epoch {epoch:g} checkpoint", attempt, timeout_s=timeout_s + TRIAL_GRACE_S)


class StorageWatch(Callback):
    """Probes a remote run folder from a thread of the driver; stops the search (a UserError out of
    tuner.fit()) once it has not answered for timeout_s."""

    def __init__(self, store: RunStore, timeout_s: float, every_s: float = PROBE_S, say=None):
        self.store, self.timeout_s, self.every_s, self.say = store, timeout_s, every_s, say
        self._reset()

    def _reset(self) -> None:
        self.down_since: float | None = None
        self.error = ""
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def __getstate__(self):   # Tune pickles its callbacks with the experiment: the thread stays here
        return {"store": self.store, "timeout_s": self.timeout_s, "every_s": self.every_s, "say": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def _print(self, line: str) -> None:
        (self.say or (lambda text: print(text, flush=True)))(line)

    def probe(self) -> None:
        """One look at the run folder: note when it stops answering and when it is back."""
        try:
            self.store.exists(layout.CONFIG)
        except (OSError, UserError) as e:
            if self.down_since is None:
                self.down_since, self.error = time.monotonic(), first_line(e, 160)
                STORE_AWAY.set()
                self._print(f"storage: {self.store} does not answer ({self.error}); trials wait for it, the "
                            f"search stops if it stays away {self.timeout_s:g} s (search.storage_timeout_s)")
            return
        if self.down_since is not None:
            self._print(f"storage: {self.store} answers again after {time.monotonic() - self.down_since:.0f} s")
            self.down_since = None
            STORE_AWAY.clear()

    def _loop(self) -> None:
        while not self._halt.wait(self.every_s):
            self.probe()

    def on_step_begin(self, iteration, trials, **info):
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gatetune-storage-watch", daemon=True)
            self._thread.start()
        down = self.down_since
        if down is not None and time.monotonic() - down > self.timeout_s:
            self._halt.set()
            raise UserError(f"the run folder's storage has not answered for {time.monotonic() - down:.0f} s "
                            f"({self.error}); the search stopped, its trials' checkpoints are in the store: "
                            f"`gatetune resume {self.store}` once it answers (or raise search.storage_timeout_s)",
                            file=str(self.store))

    def on_experiment_end(self, trials, **info):
        self._halt.set()
        STORE_AWAY.clear()


class QuietStorageErrors(logging.Filter):
    """Ray's ERROR records of failed uploads to the run folder, with their tracebacks: none while STORE_AWAY
    (the watch said so), else one line a minute."""

    MESSAGES = ("Saving experiment state to storage", "Caught exception when creating directory",
                "Last sync command failed")
    LOGGERS = ("ray.tune.execution.experiment_state", "ray.train._internal.storage", "ray.train._internal.syncer")

    def __init__(self, every_s: float = 60.0):
        super().__init__()
        self.every_s, self.last = every_s, -float("inf")

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.MESSAGES):
            return True
        if STORE_AWAY.is_set():
            return False
        now = time.monotonic()
        if now - self.last < self.every_s:
            return False
        self.last = now
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text = f"{text} {first_line(record.exc_info[1], 200)}"
        elif "\n" in text:   # the syncer writes the traceback into its message: its first and last lines
            lines = [line for line in text.splitlines() if line.strip()]
            text = f"{lines[0]} {lines[-1][:200]}"
        record.msg, record.args, record.exc_info, record.exc_text = text, (), None, None
        return True


def quiet_storage_errors() -> None:
    """Install QuietStorageErrors on the loggers Ray writes those records to (once per process)."""
    for name in QuietStorageErrors.LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, QuietStorageErrors) for f in logger.filters):
            logger.addFilter(QuietStorageErrors())
