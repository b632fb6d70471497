"""Live metrics of a search through Ray's metrics API (ray.util.metrics), for Prometheus and Grafana.

Each trial sets gauges (exported as `ray_gatetune_<name>`, tagged `run` and `trial_id`) at every epoch
on the node it runs on, and every few seconds inside an epoch (TrialProgress: `epoch` fractional,
`images_per_s` of the epoch so far); the driver sets `ray_gatetune_trials` (tagged `run` and `status`) on
the head. The same in-epoch progress goes to the trial's worker log (a line every few seconds) and, when
the driver draws the live view on a terminal, to its Board (a named actor the trials find by run name).
Ray exports a gauge every metrics_report_interval_ms (10 s by default) and drops it two intervals after
its last set, so a thread sets the last values again every few seconds while the trial runs.
`deploy/grafana_gatetune.json` is a Grafana dashboard of these series.
"""
from __future__ import annotations

__all__ = ["TRIAL_GAUGES", "TrialGauges", "TrialCounts", "TrialProgress", "Board", "board_name", "find_board",
           "Statuses"]

import sys
import threading
import time

from ray.tune import Callback

from gatetune.core import trials as T
from gatetune.core.dotted import trial_config

# metric reported every epoch -> gauge (exported as ray_gatetune_<name>)
TRIAL_GAUGES = {"top1": "top-1 accuracy (%) of the trial's last epoch", "top5": "top-5 accuracy (%)",
                "density": "achieved density (fraction of channels kept)", "macs_ratio": "effective / dense MACs",
                "gate_loss": "gate loss (mean over the epoch)", "epoch": "epochs trained",
                "images_per_s": "training throughput (images per second)"}
_REFRESH_S = 5.0
_gauges: dict = {}


def _gauge(name: str, description: str, tags: tuple):
    if name not in _gauges:   # one per process: Ray refuses two metrics of one name
        from ray.util.metrics import Gauge
        _gauges[name] = Gauge(f"gatetune_{name}", description=description, tag_keys=tags)
    return _gauges[name]


class TrialGauges:
    """The gauges of one trial: set(metrics) at each epoch; kept alive by a thread until stop()."""

    def __init__(self, run: str, trial_id: str):
        self.tags = {"run": run, "trial_id": trial_id}
        self.last: dict[str, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._refresh, daemon=True, name=f"gatetune-gauges-{trial_id}")
        self._thread.start()

    def set(self, metrics: dict) -> None:
        self.last = {k: float(metrics[k]) for k in TRIAL_GAUGES
                     if isinstance(metrics.get(k), (int, float)) and metrics[k] == metrics[k]}
        self._push()

    def progress(self, info: dict) -> None:
        """Inside an epoch: `epoch` fractional and `images_per_s` of the epoch so far; the rest stays the
        last epoch's."""
        self.last = {**self.last, **{k: float(info[k]) for k in ("epoch", "images_per_s") if k in info}}
        self._push()

    def _push(self) -> None:
        for name, value in self.last.items():
            _gauge(name, TRIAL_GAUGES[name], ("run", "trial_id")).set(value, tags=self.tags)

    def _refresh(self) -> None:
        while not self._done.wait(_REFRESH_S):
            self._push()

    def stop(self) -> None:
        self._done.set()


class Statuses:
    """What the driver needs of each live Tune trial, worked out once: its budget (train.epochs) and target
    density from its config over the search's base (a config does not change), and its report status
    (core.trials.classify on Ray's status and its last result; an ended trial's no longer changes)."""

    def __init__(self, base: dict):
        self.base = base
        self._facts: dict[str, tuple] = {}       # trial id -> (budget, target density)
        self._ended: dict[str, T.Status] = {}    # trial id -> status of an ended trial

    def _of(self, t) -> tuple:
        if t.trial_id not in self._facts:
            config = trial_config(self.base, T.config_params(t.config))
            self._facts[t.trial_id] = (T.epochs_of(config), float((config.get("gating") or {}).get("density", 1.0)))
        return self._facts[t.trial_id]

    def budget(self, t) -> float | None:
        return self._of(t)[0]

    def density(self, t) -> float:
        return self._of(t)[1]

    def status(self, t, ray_status: str | None = None) -> T.Status:
        """Its status now; ray_status: what Ray's will be (on_trial_complete runs before Ray marks it)."""
        if (known := self._ended.get(t.trial_id)) is not None:
            return known
        status = T.classify(ray_status or str(t.status), t.last_result or None, self.budget(t))
        if status.ended:
            self._ended[t.trial_id] = status
        return status


class TrialCounts(Callback):
    """Driver side: `gatetune_trials{run, status}`, the trials per gatetune status (pending, running,
    completed, stopped, diverged, error), set every couple of seconds while the search runs."""

    def __init__(self, run: str, base: dict):
        self.run, self.base, self._last = run, base, 0.0
        self._statuses = Statuses(base)

    @property
    def statuses(self) -> Statuses:   # a TrialCounts pickled by an older gatetune has none
        if "_statuses" not in self.__dict__:
            self._statuses = Statuses(self.base)
        return self._statuses

    def on_step_begin(self, iteration, trials, **info):
        if time.monotonic() - self._last < 2.0:
            return
        self._last = time.monotonic()
        counts = dict.fromkeys(T.STATUSES, 0)
        for t in trials:   # every couple of seconds over every trial: an ended one is worked out once
            counts[self.statuses.status(t).value] += 1
        gauge = _gauge("trials", "trials of the search by status", ("run", "status"))
        for status, n in counts.items():
            gauge.set(n, tags={"run": self.run, "status": status})

    def status(self, t) -> T.Status:
        """The report's status of a live trial (core.trials.classify on Ray's status and last result), not
        remembered (on_step_begin remembers through self.statuses)."""
        budget = T.epochs_of(trial_config(self.base, T.config_params(t.config)))
        return T.classify(str(t.status), t.last_result or None, budget)


def board_name(run: str) -> str:
    return f"gatetune-progress:{run}"


class Board:
    """The driver's live view's mailbox (a Ray actor, num_cpus=0, named board_name(run)): trials put their
    in-epoch progress, the driver takes a snapshot a few times a second."""

    def __init__(self):
        self.progress: dict[str, dict] = {}

    def update(self, trial_id: str, info: dict) -> None:
        self.progress[trial_id] = {**info, "at": time.time()}

    def snapshot(self) -> dict[str, dict]:
        return dict(self.progress)


def start_board(run: str):
    """The Board actor of this search (the driver's; it ends with the driver)."""
    import ray
    return ray.remote(num_cpus=0)(Board).options(name=board_name(run), get_if_exists=True).remote()


def find_board(run: str):
    """A trial's handle on its search's Board; None when the driver draws no live view. The names are listed
    first: a failed ray.get_actor logs "Failed to look up actor" in the worker's log, once per trial."""
    import ray
    name = board_name(run)
    if name not in ray.util.list_named_actors():
        return None
    try:
        return ray.get_actor(name)
    except ValueError:   # the driver ended between the two calls
        return None


class TrialProgress:
    """A trial's on_progress (train.fit): every few seconds inside an epoch, to its gauges, its search's Board
    (when there is one) and, every log_s, one line in its worker log:
    `[9aa2fbe5] epoch: 2.37/8 | 431 img/s | epoch ends in 12 s`."""

    def __init__(self, trial_id: str, epochs: int, gauges: TrialGauges | None, board=None, log_s: float = 5.0,
                 stream=None):
        self.trial_id, self.epochs, self.gauges, self.board = trial_id, epochs, gauges, board
        self.log_s, self.stream, self._logged = log_s, stream, 0.0

    def __call__(self, info: dict) -> None:
        if self.gauges is not None:
            self.gauges.progress(info)
        if self.board is not None:
            self.board.update.remote(self.trial_id, info)   # fire and forget: never waits on the driver
        if time.monotonic() - self._logged >= self.log_s:
            self._logged = time.monotonic()
            print(progress_text(self.trial_id, info, self.epochs), file=self.stream or sys.stderr, flush=True)


def progress_text(trial_id: str, info: dict, epochs: int) -> str:
    return (f"[{trial_id}] epoch: {info['epoch']:5.2f}/{epochs} | {info['images_per_s']:.0f} img/s | "
            f"epoch ends in {info['epoch_left_s']:.0f} s")
