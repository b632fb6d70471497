"""The density/accuracy table: one row per trial (docs/design.md lists the columns), the Pareto fronts, markdown."""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np
import pandas as pd

from gatetune.core import trials as T

from ._collect import Run, collect_run, open_run
from ._seeds import PARETO, SEED_COLUMNS, add_seed_stats, front_candidates

# Report column -> key of the trial's effective config (the same word as the YAML key).
_FROM_CONFIG = {"model": "model.name", "dataset": "data.dataset", "policy": "gating.policy",
                "target_density": "gating.density", "weight": "gating.weight", "gated_layers": "gating.gate",
                "trainable_layers": "gating.trainable", "lr": "train.optimizer.lr", "seed": "seed"}
_FROM_METRICS = ("density", "macs_ratio", "macs", "top1", "top5", "gate_loss")
COLUMNS = ("trial_id", "status", "stopped_by", "model", "dataset", "policy", "target_density", "density",
           "macs_ratio", "macs", "top1", "top5", "gate_loss", "epochs", "weight", "gated_layers",
           "trainable_layers", "lr", "seed", "node", "checkpoint", "pareto", "pareto_density", "gate_health",
           "gate_health_detail", "started_from", "pretrain", *SEED_COLUMNS)


def table(run_dir) -> pd.DataFrame:
    """One row per trial with the report's columns (`COLUMNS`), then `latency_ratio` when any trial
    reports it, then every searched parameter under its dotted key; sorted by top1, best first.

    Metrics are the trial's last report; `epochs` is the last epoch reached; lists (site patterns)
    are joined with ",". `pareto` marks trials on the top1-vs-macs_ratio front, `pareto_density` on
    the top1-vs-density front, both among the search's trials that trained their full budget (status
    completed; stopped, diverged, errored and running trials never). `gate_health` is the trial's last
    report's (ok, static, collapsed or dense). Seed replicas (search.confirm) name their origin under
    `confirms`; the origin's row holds the mean over its seeds (SEED_COLUMNS). `started_from` names the
    trial whose weights a trial started from (search.pretrain's dense trial), `pretrain` marks that trial
    (never on a front; the dense baseline, `dense_baseline`).
    """
    return table_of(open_run(run_dir))


def table_of(run: Run) -> pd.DataFrame:
    trials, _, searched = collect_run(run)

    def col(name: str) -> pd.Series:
        return trials[name] if name in trials else pd.Series(np.nan, index=trials.index)

    out = pd.DataFrame(index=trials.index)
    for name in COLUMNS:
        if name in _FROM_CONFIG:
            out[name] = col(f"config/{_FROM_CONFIG[name]}")
        elif name in _FROM_METRICS:
            out[name] = pd.to_numeric(col(name), errors="coerce")
        elif name == "epochs":
            out[name] = pd.to_numeric(col("epoch"), errors="coerce").fillna(col("training_iteration"))
        elif name == "node":
            out[name] = col("node").fillna(col("hostname")).fillna("")
        elif name in PARETO:
            out[name] = False  # filled in below, once the metrics are in place
        elif name == T.CONFIRMS:
            out[name] = col(f"config/{T.CONFIRMS}")
        elif name == "started_from":
            out[name] = col(f"config/{T.STARTED_FROM}").fillna("").astype(str)
        elif name == "pretrain":
            out[name] = col(f"config/{T.PRETRAIN}").map(is_true)
        elif name not in SEED_COLUMNS:
            out[name] = col(name).fillna("")
    for name in ("gated_layers", "trainable_layers"):
        out[name] = out[name].map(_text)
    confirm = (run.config.get("search") or {}).get("confirm") or {}
    out = add_seed_stats(out, confirm.get("front"))
    on_front = front_candidates(out)
    for name, objectives in PARETO.items():
        out[name] = pareto_mask(out[on_front], objectives).reindex(out.index, fill_value=False).astype(bool)
    if "latency_ratio" in trials:
        out["latency_ratio"] = pd.to_numeric(trials["latency_ratio"], errors="coerce")
    for key in searched:
        out[key] = col(f"config/{key}").map(_text, na_action="ignore")
    out = out.sort_values(["top1", "trial_id"], ascending=[False, True], na_position="last", kind="stable")
    return out.reset_index(drop=True)


def is_true(value) -> bool:
    """A report cell that holds true (a bool, numpy's, or the text `True` read back from CSV)."""
    return (isinstance(value, (bool, np.bool_)) and bool(value)) or (isinstance(value, str) and value.lower() == "true")


def _text(value):
    """Lists (site patterns, `gate: [conv4, conv5]`) as one comma-joined string; others unchanged."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "" if value is None else value


def pareto_mask(df: pd.DataFrame, objectives=(("top1", "max"), ("macs_ratio", "min"))) -> pd.Series:
    """Boolean Series over df's index: True for rows no other row dominates (at least as good in
    every objective and better in one). Rows missing an objective are False; equal rows are all kept.
    """
    for column, mode in objectives:
        if mode not in ("max", "min"):
            raise ValueError(f"objective mode must be 'max' or 'min', but got ({column!r}, {mode!r})")
        if column not in df:
            raise ValueError(f"objective column {column!r} is not in the table; "
                             f"columns: {', '.join(map(str, df.columns))}")
    signs = np.array([1.0 if mode == "max" else -1.0 for _, mode in objectives])
    values = df[[c for c, _ in objectives]].apply(pd.to_numeric, errors="coerce").to_numpy(float) * signs
    complete = ~np.isnan(values).any(axis=1)
    mask = np.zeros(len(df), dtype=bool)
    points = values[complete]
    mask[complete] = [not ((points >= p).all(1) & (points > p).any(1)).any() for p in points]
    return pd.Series(mask, index=df.index, name="pareto")


def summary_markdown(df: pd.DataFrame) -> str:
    """The lab notebook's table (network | status | density | macs_ratio | top1 | top5 | checkpoint | node):
    finished trials first, then stopped and running ones, densest first within each; density and macs_ratio
    as percentages, accuracies in percent with 2 decimals. Trials that errored or diverged are left out:
    their checkpoints are not worth picking (the full table lists all). A stopped trial's status says at
    which epoch."""
    usable = df["top1"].notna() & ~df["status"].isin(("error", "diverged"))
    order = {s: i for i, s in enumerate(("completed", "stopped", "running", "pending"))}
    rows = df[usable].assign(_rank=df["status"].map(order)).sort_values(
        ["_rank", "density", "top1"], ascending=[True, False, False], na_position="last", kind="stable")
    cells = [[cell(r["model"]), _status(r), _percent(r["density"]), _percent(r["macs_ratio"]), _number(r["top1"]),
              _number(r["top5"]), cell(r["checkpoint"]), cell(r["node"])] for _, r in rows.iterrows()]
    return markdown_table(["network", "status", "density", "macs_ratio", "top1", "top5", "checkpoint", "node"],
                          cells, "llrrrrll")


def _status(row) -> str:
    if row["status"] == "stopped" and not is_missing(row.get("epochs")):
        return f"stopped at epoch {float(row['epochs']):g}"
    if is_true(row.get("pretrain")):
        return f"{row['status']} (dense pretraining)"
    if cell(row.get(T.CONFIRMS)):   # a seed replica
        return f"{row['status']} (seed {cell(row.get('seed'))} of {row[T.CONFIRMS]})"
    return cell(row["status"])


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> str:
    """A GitHub-flavoured markdown table of text cells (pandas' DataFrame.to_markdown, through tabulate's
    `pipe` format): columns padded to their widest cell or header, align one 'l'/'r' per column, `|` inside
    a cell escaped. Cells are shown as given (already formatted: tabulate parses no numbers)."""
    rows = [[c.replace("|", "\\|") for c in row] for row in rows]
    frame = pd.DataFrame(rows, columns=range(len(header))) if rows else pd.DataFrame(columns=range(len(header)))
    frame.columns = header
    with _no_header_padding():
        text = frame.to_markdown(index=False, tablefmt="pipe", disable_numparse=True, missingval="",
                                 colalign=tuple("right" if a == "r" else "left" for a in align))
    return text + "\n"


_TABULATE = threading.Lock()


@contextlib.contextmanager
def _no_header_padding():
    """tabulate widens every column to its header + 2 (a module-level MIN_PADDING, no argument): 0 while a
    table is built, so a column is as wide as its widest cell or header, as report.md's tables always were."""
    import tabulate
    with _TABULATE:
        saved, tabulate.MIN_PADDING = tabulate.MIN_PADDING, 0
        try:
            yield
        finally:
            tabulate.MIN_PADDING = saved


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def cell(value) -> str:
    return "" if is_missing(value) else str(value).replace("\n", " ")


def _number(value, digits: int = 2) -> str:
    return "" if is_missing(value) else f"{float(value):.{digits}f}"


def _percent(value) -> str:
    return "" if is_missing(value) else f"{100 * float(value):.2f}%"
