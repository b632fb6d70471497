"""The live view of a search on a terminal (rich): the running trials, the counts, the best so far, the end.

    search quickstart | 3 running, 5 completed, 4 stopped, 0 diverged, 0 failed, 4 pending | expected end 14:02 (in 3m10s)
    best top-1 by density: 0.25 96.1% | 0.5 98.3% | 1.0 99.4%
    trial     settings                        epoch     top-1  density  img/s  left
    9aa2fbe5  d=0.50 gate=all w=1.0e-04 lr=0.1  2.37/8  97.22%   50.1%    431  1m02s

A row's epoch is the trial's fraction of its budget, moved every few seconds by the trial's in-epoch progress
(live.TrialProgress through the search's Board); top-1 and density are its last epoch's; img/s the current
epoch's so far; left its time to the end of its budget at its pace (a scheduler may stop it sooner). The
expected end divides the epochs still to train (running trials' remainders, pending trials' whole budgets) by
the trials that run at once, at the mean epoch time so far: early stops only make it sooner.
"""
from __future__ import annotations

__all__ = ["View", "duration"]

import time
from types import SimpleNamespace

from gatetune.core import trials as T
from gatetune.tuning.search.console import settings
from gatetune.tuning.search.live import Statuses
from gatetune.tuning.search.schedulers import nearest_bucket

_COUNTED = ((T.Status.RUNNING, "running"), (T.Status.COMPLETED, "completed"), (T.Status.STOPPED, "stopped"),
            (T.Status.DIVERGED, "diverged"), (T.Status.ERROR, "failed"), (T.Status.PENDING, "pending"))


def duration(seconds: float) -> str:
    """`45s`, `3m10s`, `2h05m`."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class View:
    """Renders the live view from Tune's trials and the Board's progress snapshot ({trial id: info})."""

    def __init__(self, run: str, base: dict, expected: int, buckets, concurrency: int):
        self.run, self.base, self.expected = run, base, expected
        self.buckets, self.concurrency = list(buckets or []), max(1, concurrency)
        self.trials = Statuses(base)   # each trial's budget, density and status, worked out once

    def render(self, trials, progress: dict, now: float | None = None):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text
        now = time.time() if now is None else now
        statuses = {t.trial_id: self.trials.status(t) for t in trials}
        counts = {s: 0 for s, _ in _COUNTED}
        for s in statuses.values():
            counts[s] = counts.get(s, 0) + 1
        unborn = max(0, self.expected - len(trials))   # trials the searcher has not proposed yet
        counts[T.Status.PENDING] += unborn
        running = [t for t in trials if statuses[t.trial_id] == T.Status.RUNNING]
        epoch_s = self._epoch_seconds(trials, progress)
        lefts = {t.trial_id: self._left(t, progress.get(t.trial_id), epoch_s, now) for t in running}
        head = " | ".join([f"search {self.run}", ", ".join(f"{counts[s]} {name}" for s, name in _COUNTED),
                           self._end(trials, statuses, lefts, unborn, epoch_s, now)])
        table = Table(box=None, pad_edge=False, header_style="bold")
        for name, justify in (("trial", "left"), ("settings", "left"), ("epoch", "right"), ("top-1", "right"),
                              ("density", "right"), ("img/s", "right"), ("left", "right")):
            table.add_column(name, justify=justify, no_wrap=True)
        for t in sorted(running, key=lambda t: t.trial_id):
            table.add_row(*self._row(t, progress.get(t.trial_id), lefts[t.trial_id]))
        if not running:
            table.add_row("-", "no trial running", "", "", "", "", "")
        return Group(Text(head), Text(self._best(trials, statuses)), table)

    # ------------------------------------------------------------------------------------------------

    def _row(self, t, info: dict | None, left: float | None) -> tuple:
        last = t.last_result or {}
        epochs = self.trials.budget(t)
        done = float(last.get("epoch", 0) or 0)
        fresh = _inside(info, done)
        epoch = float(info["epoch"]) if fresh else done
        rate = info.get("images_per_s") if fresh else last.get("images_per_s")
        role = " dense" if T.is_pretrain(t.config) else f" seed of {T.origin_of(t.config)}" if T.origin_of(t.config) else ""
        return (f"{t.trial_id}{role}", settings(t.config),
                f"{epoch:.2f}/{epochs:g}" if epochs else f"{epoch:.2f}",
                f"{last['top1']:.2f}%" if "top1" in last else "-",
                f"{100 * last['density']:.1f}%" if "density" in last else "-",
                f"{rate:.0f}" if rate else "-", duration(left) if left is not None else "-")

    @staticmethod
    def _epoch_seconds(trials, progress: dict) -> float | None:
        """Mean seconds per epoch so far: the trials' last epoch times, else their in-epoch estimates."""
        done = [float(t.last_result["time_this_iter_s"]) for t in trials
                if t.last_result and t.last_result.get("time_this_iter_s")]
        if done:
            return sum(done) / len(done)
        guesses = [float(i["epoch_s"]) for i in progress.values() if i.get("epoch_s")]
        return sum(guesses) / len(guesses) if guesses else None

    def _left(self, t, info: dict | None, epoch_s: float | None, now: float) -> float | None:
        """Seconds to the end of the trial's budget at its pace."""
        last = t.last_result or {}
        epochs = self.trials.budget(t) or 0
        done = float(last.get("epoch", 0) or 0)
        mine = float(last["time_this_iter_s"]) if last.get("time_this_iter_s") else (
            float(info["epoch_s"]) if info and info.get("epoch_s") else epoch_s)
        if mine is None:
            return None
        if _inside(info, done):   # inside an epoch: its rest, then the epochs after it
            rest = max(0.0, float(info["epoch_left_s"]) - (now - float(info.get("at", now))))
            return rest + max(0.0, epochs - int(info["epoch"]) - 1) * mine
        return max(0.0, epochs - done) * mine

    def _end(self, trials, statuses: dict, lefts: dict, unborn: int, epoch_s: float | None, now: float) -> str:
        if epoch_s is None:
            return "expected end: after the first epochs"
        pending = [t for t in trials if statuses[t.trial_id] == T.Status.PENDING]
        work = sum(v for v in lefts.values() if v is not None)
        work += sum((self.trials.budget(t) or 0) * epoch_s for t in pending)
        work += unborn * (self.trials.budget(_UNBORN) or 0) * epoch_s
        left = work / self.concurrency
        return f"expected end {time.strftime('%H:%M', time.localtime(now + left))} (in {duration(left)}; early stops make it sooner)"

    def _best(self, trials, statuses: dict) -> str:
        """The best top-1 per density bucket so far (any trial's last epoch that did not diverge)."""
        best: dict[float, float] = {}
        for t in trials:
            last = t.last_result or {}
            if "top1" not in last or statuses[t.trial_id] in (T.Status.DIVERGED, T.Status.ERROR) or T.is_pretrain(t.config):
                continue
            d = self.trials.density(t)
            b = nearest_bucket(self.buckets, d) if self.buckets else d
            best[b] = max(best.get(b, float("-inf")), float(last["top1"]))
        if not best:
            return "best top-1 by density: none yet"
        return "best top-1 by density: " + " | ".join(f"{b:g} {v:.2f}%" for b, v in sorted(best.items()))


_UNBORN = SimpleNamespace(trial_id="", config={})   # a trial the searcher has not proposed yet: the base's budget


def _inside(info: dict | None, done: float) -> bool:
    """The Board's news of a trial is newer than its last result (it is inside the epoch after it)."""
    return bool(info) and info.get("epoch", -1) >= done
