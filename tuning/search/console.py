"""What a search prints: one line per trial result (the notebook's style) and the summary at the end."""
from __future__ import annotations

__all__ = ["Console", "summary", "progress_line"]

from ray.tune import Callback

from gatetune.core import trials as T
from gatetune.tuning.search.schedulers import nearest_bucket, rungs


def progress_line(trial_id: str, result: dict, epochs: int) -> str:
    """`<trial> epoch:  2.00/8 | gate.loss: .. | gate: 50.00% | top1: ..% | top5: ..% | .. img/s`."""
    tag = " DIVERGED" if result.get("diverged") else ""
    return (f"{trial_id} epoch: {result.get('epoch', 0):5.2f}/{epochs} | gate.loss: {result.get('gate_loss', 0):.4g} | "
            f"gate: {100 * result.get('density', 1):6.2f}% | top1: {result.get('top1', 0):6.2f}% | "
            f"top5: {result.get('top5', 0):6.2f}% | {result.get('images_per_s', 0):6.0f} img/s{tag}")


class Console(Callback):
    """`<trial> epoch:  2.00/8 | gate.loss: .. | gate: 50.00% | top1: ..% | top5: ..% | .. img/s` per result."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_trial_result(self, iteration, trials, trial, result, **info):
        origin, pretrain = T.origin_of(trial.config), T.is_pretrain(trial.config)
        role = f" (seed {trial.config.get('seed')} of {origin})" if origin else " (dense pretraining)" if pretrain else ""
        epochs = trial.config.get("train.epochs", self.epochs) if pretrain else self.epochs
        print(progress_line(f"{trial.trial_id}{role}", result, epochs), flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"{trial.trial_id} ERROR (see error.txt in its trial folder)", flush=True)


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
