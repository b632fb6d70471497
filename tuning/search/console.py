"""What a search prints: on a terminal the live view, else one line per trial result (the notebook's style);
and the summary at the end."""
from __future__ import annotations

__all__ = ["Console", "summary", "progress_line", "label", "settings", "close_all", "terminal", "ended_line"]

import os
import sys
import time

from ray.tune import Callback

from gatetune.core import trials as T
from gatetune.tuning.search.schedulers import nearest_bucket, rungs


_SHOWN = (("gating.density", "d", "{:.2f}"), ("gating.gate", "gate", "{}"), ("gating.weight", "w", "{:.1e}"),
          ("train.optimizer.lr", "lr", "{:.3g}"), ("seed", "seed", "{}"))


def label(trial_id: str, config: dict) -> str:
    """`trial 9aa2fbe5 d=0.50 gate=all`: the trial id and its key sampled settings."""
    return " ".join(filter(None, [f"trial {trial_id}", settings(config)]))


def settings(config: dict) -> str:
    """`d=0.50 gate=all w=1.0e-06 lr=0.107`: a trial's key sampled settings (at most four)."""
    def text(fmt, v):
        v = ",".join(map(str, v)) if isinstance(v, list) else v
        try:
            return fmt.format(v)
        except (ValueError, TypeError):
            return str(v)
    return " ".join([f"{short}={text(fmt, config[key])}" for key, short, fmt in _SHOWN if key in config][:4])


def progress_line(trial_id: str, result: dict, epochs: int) -> str:
    """`<trial> epoch:  2.00/8 | gate.loss: .. | gate: 50.00% | top1: ..% | top5: ..% | .. img/s`."""
    tag = " DIVERGED" if result.get("diverged") else ""
    return (f"{trial_id} epoch: {result.get('epoch', 0):5.2f}/{epochs} | gate.loss: {result.get('gate_loss', 0):.4g} | "
            f"gate: {100 * result.get('density', 1):6.2f}% | top1: {result.get('top1', 0):6.2f}% | "
            f"top5: {result.get('top5', 0):6.2f}% | {result.get('images_per_s', 0):6.0f} img/s{tag}")


class Console(Callback):
    """What the driver prints while a search runs. Not on a terminal (a file, CI, `ray job submit` logs): one
    line per trial result, `<trial> epoch:  2.00/8 | gate.loss: .. | gate: 50.00% | top1: ..% | ..`. On a
    terminal: the live view (tuning/search/view.py) redrawn in place a few times a second, and one line above it
    per ended trial. The mode is chosen in setup(), in the process that runs the search (Tune pickles this
    callback into tuner.pkl; `gatetune resume` decides again)."""

    # class-level defaults: a Console pickled by an older gatetune lacks these
    run, base, expected, buckets, concurrency, interactive = "", None, 0, (), 1, None
    _live = _board = _view = _poll = None
    _progress: dict = {}
    _drawn = _asked = 0.0

    def __init__(self, epochs: int, *, run: str = "", base: dict | None = None, expected: int = 0, buckets=(),
                 concurrency: int = 1, interactive: bool | None = None):
        self.epochs, self.run, self.base, self.expected = epochs, run, base, expected
        self.buckets, self.concurrency, self.interactive = tuple(buckets), concurrency, interactive

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_live", "_board", "_view", "_poll", "_progress")}

    def setup(self, **info):
        live = terminal() if self.interactive is None else self.interactive
        if not live or self.base is None:
            return
        from rich.console import Console as RichConsole
        from rich.live import Live

        from gatetune.tuning.search import live as L
        from gatetune.tuning.search.view import View
        self._board, self._progress = L.start_board(self.run), {}
        self._view = View(self.run, self.base, self.expected, self.buckets, self.concurrency)
        self._live = Live(console=RichConsole(), auto_refresh=False, transient=True, redirect_stdout=True,
                          redirect_stderr=True)
        self._live.start()
        _OPEN.add(self)

    def on_step_begin(self, iteration, trials, **info):
        if self._live is None:
            return
        import ray
        now = time.monotonic()
        if self._poll is not None and ray.wait([self._poll], timeout=0)[0]:
            try:
                self._progress = ray.get(self._poll)
            except Exception:   # noqa: BLE001  (the view must never end the search)
                pass
            self._poll = None
        if self._poll is None and now - self._asked >= 0.25:
            self._poll, self._asked = self._board.snapshot.remote(), now
        if now - self._drawn >= 0.25:
            self._drawn = now
            self._live.update(self._view.render(trials, self._progress), refresh=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self._live is not None:   # the table shows it
            return
        origin, pretrain = T.origin_of(trial.config), T.is_pretrain(trial.config)
        role = f" (seed {trial.config.get('seed')} of {origin})" if origin else " (dense pretraining)" if pretrain else ""
        epochs = trial.config.get("train.epochs", self.epochs) if pretrain else self.epochs
        print(progress_line(f"{trial.trial_id}{role}", result, epochs), flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self._live is None:
            return
        trials = self._view.trials
        status = trials.status(trial, ray_status="TERMINATED")
        self._live.console.print(ended_line(trial.trial_id, trial.config, status.value, trial.last_result or {},
                                            trials.budget(trial)), highlight=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        line = f"{trial.trial_id} ERROR (see error.txt in its trial folder)"
        if self._live is not None:
            self._live.console.print(line, highlight=False)
        else:
            print(line, flush=True)

    def on_experiment_end(self, trials, **info):
        self.close()

    def close(self) -> None:
        """Stops the live view (its table vanishes; the lines above it stay)."""
        if self._live is not None:
            self._live.stop()
            self._live = None
        _OPEN.discard(self)


_OPEN: set = set()


def close_all() -> None:
    """Stops every live view this process draws (a search that ends by an exception)."""
    for c in list(_OPEN):
        c.close()


def terminal() -> bool:
    """The live view's test: stdout is a terminal that can redraw (not TERM=dumb)."""
    return sys.stdout.isatty() and os.environ.get("TERM", "") not in ("", "dumb")


def ended_line(trial_id: str, config: dict, status: str, last: dict, epochs) -> str:
    """`9aa2fbe5 completed d=0.50 gate=all: top-1 98.61% at epoch 8/8, density 50.2%`."""
    keys = settings(config)
    if "top1" not in last:
        return f"{trial_id} {status} {keys}: no epoch finished"
    return (f"{trial_id} {status} {keys}: top-1 {last['top1']:.2f}% at epoch {last.get('epoch', 0):g}/"
            f"{f'{epochs:g}' if epochs else '?'}, density {100 * last.get('density', 1):.1f}%")


def summary(df, plan, elapsed: float, run_dir: str) -> list[str]:
    """The lines printed when a search returns: finished or interrupted, and how far trials got per
    ASHA rung (per density bucket when stratified). df: the report table; plan: space.SearchPlan."""
    import pandas as pd

    from gatetune import results
    pretrain = df[T.PRETRAIN].astype(bool) if T.PRETRAIN in df else pd.Series(False, index=df.index)
    if plan.cfg.search.pretrain is not None and pretrain.any():
        row = df[pretrain].iloc[0]
        if row["status"] in ("error", "diverged", "stopped"):
            return [f"\nsearch ended after {elapsed:.0f} s: the dense pretraining (trial {row['trial_id']}) "
                    f"{row['status']}, so no search trial ran; see its folder in {run_dir}, fix the config and "
                    "search again"]
    search = df[results.search_rows(df)]
    expected = plan.trials
    unfinished = int(df["status"].isin(["running", "pending"]).sum()) + max(0, expected - len(search))
    confirm = plan.cfg.search.confirm
    if confirm is not None and not unfinished:   # every confirmed trial has its seeds - 1 replicas
        want = {t: confirm.seeds - 1 for t in results.front_trials(search, confirm.front,
                                                                    baseline=plan.cfg.search.pretrain is None)}
        have = df[T.CONFIRMS].value_counts().to_dict()
        unfinished = sum(max(0, n - have.get(t, 0)) for t, n in want.items())
        expected += sum(want.values())
    if unfinished:
        return [f"\nsearch interrupted after {elapsed:.0f} s: {unfinished} of {expected} trials unfinished; "
                f"continue with `gatetune resume {run_dir}`"]
    lines = [f"\nsearch finished in {elapsed:.0f} s: {len(df)} trials, {int((df['status'] == 'error').sum())} "
             f"errors, {int((df['status'] == 'diverged').sum())} diverged"]
    if confirm is not None:
        n = int(df["n_seeds"].notna().sum())
        lines.append(f"confirmed {n} front config(s) over {confirm.seeds} seeds: {int((~results.search_rows(df) & ~pretrain).sum())} "
                     f"replica trials; the front over seeds below and in report.md")
    df = search
    s = plan.cfg.search.scheduler
    if s.name == "fifo":
        return lines
    marks, top = rungs(s.grace_period, s.reduction_factor, plan.max_epochs), plan.max_epochs
    buckets = plan.density_buckets if s.name == "asha_by_density" else [None]
    for b in buckets:
        mine = df if b is None else df[[nearest_bucket(buckets, float(d)) == b for d in df["target_density"]]]
        epochs = [float(e) for e in mine["epochs"].fillna(0)]
        if not epochs:
            continue
        reached = ", ".join(f"{sum(e >= r for e in epochs)} reached epoch {r:g}" for r in marks)
        label = "ASHA" if b is None else f"ASHA density {b:g}"
        lines.append(f"{label}: {reached}; {sum(e < top for e in epochs)} of {len(epochs)} stopped early")
    return lines
