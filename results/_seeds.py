"""Confirmation over seeds (search.confirm): which finished trials a search confirms, and per confirmed
config the mean and spread over its seeds, with the front recomputed on the means.

A seed replica is a trial whose config names, under `confirms`, the trial it repeats with another seed;
its origin and its replicas together are that config's seeds."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from gatetune.core import trials as T

SEED_COLUMNS = (T.CONFIRMS, "n_seeds", "top1_mean", "top1_std", "density_mean", "macs_ratio_mean", "pareto_seeds")
# The fronts, by name (report columns and `search.confirm.front` values): accuracy against compute, and
# against achieved density.
PARETO = {"pareto": (("top1", "max"), ("macs_ratio", "min")),
          "pareto_density": (("top1", "max"), ("density", "min"))}


def origins(df: pd.DataFrame) -> pd.Series:
    """Per row, the trial a seed replica repeats ("" for every other trial)."""
    return df[T.CONFIRMS].fillna("").astype(str) if T.CONFIRMS in df else pd.Series("", index=df.index)


def seed_groups(df: pd.DataFrame) -> pd.Series:
    """Per row, the config it trains: the trial a replica repeats, else the trial itself."""
    origin = origins(df)
    return origin.where(origin != "", df["trial_id"])


def search_rows(df: pd.DataFrame) -> pd.Series:
    """Boolean Series over df's index: the search's own trials (not a seed replica, not the dense pretraining)."""
    out = origins(df) == ""
    if T.PRETRAIN in df:
        from ._table import is_true
        out &= ~df[T.PRETRAIN].map(is_true).astype(bool)
    return out


def front_candidates(df: pd.DataFrame) -> pd.Series:
    """The rows a front is drawn from: search trials that trained their full budget with a top-1 (a stopped
    trial's top-1 is an earlier epoch's; replicas count through their origin's mean)."""
    return (df["status"] == T.Status.COMPLETED.value) & df["top1"].notna() & search_rows(df)


def front_trials(df: pd.DataFrame, rule: str, baseline: bool = True) -> list[str]:
    """Trial ids `search.confirm.front` selects among the finished trials of the search (replicas and
    trials that were stopped, diverged or errored never count), best top1 first, then the best dense
    trial (target density 1.0 or nothing gated) when it is not among them and `baseline`: the baseline the
    front is compared with needs its mean over seeds too (not so when the dense pretraining is the
    baseline). df needs trial_id, status, top1, macs_ratio, density, and confirms when replicas exist,
    target_density and gated_layers for the baseline."""
    from ._table import pareto_mask
    done = df[front_candidates(df)]
    top = re.fullmatch(r"top (\d+)", rule)
    chosen = done if top else done[pareto_mask(done, PARETO[rule])]
    chosen = chosen.sort_values(["top1", "trial_id"], ascending=[False, True], kind="stable")
    ids = list(chosen["trial_id"][: int(top.group(1))] if top else chosen["trial_id"])
    best = dense_baseline(done) if baseline else None
    if best is not None and best["trial_id"] not in ids:
        ids.append(best["trial_id"])
    return ids


def dense_baseline(df: pd.DataFrame):
    """The row the gated trials are compared with, or None when there is none: the dense pretraining
    (search.pretrain, `pretrain` true) when it completed, else the best completed search trial with target
    density 1.0 or nothing gated. Only a trial that trained its full budget counts (status completed:
    core.trials.classify says so only when its last epoch reached its config's train.epochs); never a stopped,
    running or failed one (a stopped trial's top-1 is an earlier epoch's), never a seed replica. df needs
    trial_id, status, top1, and where present pretrain, confirms, target_density, gated_layers."""
    done = df[(df["status"] == T.Status.COMPLETED.value) & pd.to_numeric(df["top1"], errors="coerce").notna()]
    if T.PRETRAIN in done:
        from ._table import is_true
        pretrain = done[T.PRETRAIN].map(is_true).astype(bool)
        if pretrain.any():
            return done[pretrain].iloc[0]
    done = done[search_rows(done)]
    if "target_density" not in done:
        return None
    dense = pd.to_numeric(done["target_density"], errors="coerce").ge(1.0)
    if "gated_layers" in done:
        dense |= done["gated_layers"].astype(str).str.lower().eq("none")
    best = done[dense].sort_values(["top1", "trial_id"], ascending=[False, True], kind="stable")
    return best.iloc[0] if len(best) else None


def baseline_stats(base) -> tuple[float, float, int]:
    """(top-1, std, seeds) of the dense baseline row: its mean and sample std over its seeds when it was
    confirmed (search.confirm trains the best dense trial again), else its own top-1, std NaN, 1 seed."""
    n, mean = pd.to_numeric(base.get("n_seeds"), errors="coerce"), pd.to_numeric(base.get("top1_mean"), errors="coerce")
    if pd.notna(n) and pd.notna(mean):
        std = pd.to_numeric(base.get("top1_std"), errors="coerce")
        return float(mean), float(std) if pd.notna(std) else float("nan"), int(n)
    return float(base["top1"]), float("nan"), 1


CURVE_COLUMNS = ("target_density", "trial_id", "top1", "top1_std", "n_seeds", "density", "macs_ratio", "confirmed")


def density_curve(df: pd.DataFrame) -> pd.DataFrame:
    """The density/accuracy curve, one row per target density (ascending): the best confirmed config's mean
    top-1 over its seeds (with its std, seeds, mean achieved density and mean macs_ratio; confirmed True), or,
    when the search confirmed no config, the best completed search trial's (one seed, std NaN, confirmed
    False). Seed replicas and the dense pretraining are never points; trials without a target density are
    left out. Columns CURVE_COLUMNS; empty when nothing qualifies."""
    if "target_density" not in df or df.empty:
        return pd.DataFrame(columns=list(CURVE_COLUMNS))
    rows = df[search_rows(df) & pd.to_numeric(df["target_density"], errors="coerce").notna()]
    confirmed = rows[rows["n_seeds"].notna()] if "n_seeds" in rows else rows.iloc[:0]
    if len(confirmed):
        curve = pd.DataFrame({"target_density": confirmed["target_density"], "trial_id": confirmed["trial_id"],
                              "top1": confirmed["top1_mean"], "top1_std": confirmed["top1_std"],
                              "n_seeds": confirmed["n_seeds"], "density": confirmed["density_mean"],
                              "macs_ratio": confirmed["macs_ratio_mean"], "confirmed": True})
    else:
        done = rows[front_candidates(rows)]
        curve = pd.DataFrame({"target_density": done["target_density"], "trial_id": done["trial_id"],
                              "top1": done["top1"], "top1_std": np.nan, "n_seeds": 1.0, "density": done["density"],
                              "macs_ratio": done["macs_ratio"], "confirmed": False})
    curve = curve.astype({"target_density": float, "top1": float, "top1_std": float, "n_seeds": float,
                          "density": float, "macs_ratio": float})
    curve = curve.sort_values(["target_density", "top1", "trial_id"], ascending=[True, False, True], kind="stable")
    return curve.drop_duplicates("target_density").reset_index(drop=True)[list(CURVE_COLUMNS)]


def add_seed_stats(out: pd.DataFrame, rule: str | None) -> pd.DataFrame:
    """Fill SEED_COLUMNS: on each confirmed config's origin row its seeds' n_seeds, top1_mean, top1_std
    (sample std), density_mean, macs_ratio_mean, and pareto_seeds (on the front of the means); replica rows
    carry `confirms` only."""
    from ._table import pareto_mask
    out[T.CONFIRMS] = origin = origins(out)
    for name in SEED_COLUMNS[1:]:
        out[name] = False if name == "pareto_seeds" else np.nan
    repeated = set(origin[origin != ""]) & set(out["trial_id"])   # configs with replicas (few)
    group = seed_groups(out)
    done = out[(out["status"] == "completed") & group.isin(repeated)]
    for origin, seeds in done.groupby(group[done.index]):
        if origin in repeated:
            row = out.index[out["trial_id"] == origin][0]
            out.loc[row, ["n_seeds", "top1_mean", "top1_std", "density_mean", "macs_ratio_mean"]] = [
                len(seeds), seeds["top1"].mean(), seeds["top1"].std(ddof=1) if len(seeds) > 1 else np.nan,
                seeds["density"].mean(), seeds["macs_ratio"].mean()]
    confirmed = out[out["n_seeds"].notna()]
    if len(confirmed):
        objectives = tuple((f"{c}_mean", m) for c, m in PARETO.get(rule or "pareto", PARETO["pareto"]))
        mask = pareto_mask(confirmed, objectives)
        out.loc[mask[mask].index, "pareto_seeds"] = True
    out["pareto_seeds"] = out["pareto_seeds"].astype(bool)
    return out
