"""pareto.png: the report's figure of one search (results/_report.py writes it beside report.md)."""
from __future__ import annotations

__all__ = ["plot_pareto", "pareto_figure", "WIDTH_IN", "DPI"]

import pandas as pd

from ._collect import STATUSES
from ._seeds import baseline_stats, dense_baseline, density_curve, origins
from ._table import cell, is_true

# One colour per status (tab10 shades): the eye finds the failures first.
_COLOURS = {"completed": "#1f77b4", "stopped": "#7f7f7f", "running": "#2ca02c", "pending": "#bcbd22",
            "diverged": "#ff7f0e", "error": "#d62728"}
_MARKERS = {"diverged": "^", "error": "X"}  # failures also differ in shape, not only in colour

# The figure: sized for the README's 800 px wide display (10 in at 160 dpi = 1600 px, halved on screen:
# 1 pt = 1.1 px), so no text is set under 9 pt (10 px on screen).
WIDTH_IN, DPI = 10.0, 160
_FONT = {"label": 11.5, "tick": 10.5, "note": 9.5, "small": 9, "title": 12.5, "suptitle": 14}
_BASE_GID, _NO_BASE_GID = "dense-baseline", "no-dense-baseline"
_MAX_NAMES = 40   # points labelled one by one (front trials' ids, stopped trials' epochs) per view, at most


def plot_pareto(df: pd.DataFrame, path, title: str) -> None:
    """pareto_figure(df, title) as a PNG into path (a file name or a binary file object)."""
    pareto_figure(df, title).savefig(path, dpi=DPI, format="png")


def pareto_figure(df: pd.DataFrame, title: str):
    """The report's figure (a matplotlib Figure; no pyplot, no backend), three views of one search:

    - top: top-1 against MACs ratio and against achieved density, scaled to the trials that trained their full
      budget (completed: the only ones a front is drawn from), each a point (the dense pretraining a black square),
      the Pareto front of each view as a black step line with its trials circled and named (at most _MAX_NAMES),
      a density ladder's lineage as thin grey lines,
      confirmed configs as their mean with a +-1 std error bar and the front over seeds dashed;
    - under each, a thin strip with its own top-1 axis: the stopped (hollow, labelled e<N> with their last
      epoch), running, diverged and errored trials, which never sit in (or squeeze) the view above;
    - bottom left: the density curve, the best confirmed mean top-1 per target density with +-1 std (else the
      best completed trial per target density, one seed, as its label says), each point annotated with its MACs
      ratio and its distance to the dense baseline, the dense pretraining (when it is the baseline) at 100%;
    - in every view the dense baseline (dense_baseline) as a dashed line with a +-1 std band when it has seeds;
      without one, a note saying so; bottom right: the legend, outside every axes.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI; Agg renders PNGs

    fig = Figure(figsize=(WIDTH_IN, 9.6), layout="constrained")
    grid = fig.add_gridspec(3, 2, height_ratios=[4.2, 1.25, 3.8])
    macs = fig.add_subplot(grid[0, 0])
    dens = fig.add_subplot(grid[0, 1], sharey=macs)
    strip_macs = fig.add_subplot(grid[1, 0], sharex=macs)
    strip_dens = fig.add_subplot(grid[1, 1], sharex=dens, sharey=strip_macs)
    curve = fig.add_subplot(grid[2, 0])
    key = fig.add_subplot(grid[2, 1])
    macs.set_gid("main-macs_ratio"), dens.set_gid("main-density"), curve.set_gid("density-curve")
    strip_macs.set_gid("others-macs_ratio"), strip_dens.set_gid("others-density"), key.set_gid("legend")

    base = dense_baseline(df)
    stats = baseline_stats(base) if base is not None else None
    shown = df[df["top1"].notna() & (origins(df) == "")]
    completed = shown[shown["status"] == "completed"]
    others = shown[shown["status"] != "completed"]
    for ax, strip, (x, front, label) in ((macs, strip_macs, ("macs_ratio", "pareto", "MACs ratio (effective / dense)")),
                                         (dens, strip_dens, ("density", "pareto_density",
                                                             "achieved density (fraction of channels kept)"))):
        _main_panel(ax, df, completed, x, front, stats)
        _others_strip(strip, others, x)
        strip.set_xlabel(label, fontsize=_FONT["label"])
        for a in (ax, strip):
            a.xaxis.set_major_formatter(_percent_axis())
            a.tick_params(labelsize=_FONT["tick"])
            a.grid(alpha=0.3)
        ax.tick_params(labelbottom=False)
    dens.tick_params(labelleft=False)
    strip_dens.tick_params(labelleft=False)
    macs.set_ylabel("top-1 (%), completed trials", fontsize=_FONT["label"])
    strip_macs.set_ylabel("top-1 (%)\nnot completed", fontsize=_FONT["note"])
    macs.set_title("top-1 against MACs", fontsize=_FONT["title"])
    dens.set_title("top-1 against achieved density", fontsize=_FONT["title"])
    ylim = _completed_range(df, completed, stats)
    if ylim is not None:
        macs.set_ylim(*ylim)
    _curve_panel(curve, df, base, stats)
    _legend(key, (macs, dens, strip_macs, strip_dens, curve))
    fig.suptitle(title, fontsize=_FONT["suptitle"])
    return fig


def _percent_axis():
    from matplotlib.ticker import FuncFormatter
    return FuncFormatter(lambda v, _: f"{100 * v:.4g}%")   # 0.5 -> 50%, 0.375 -> 37.5%


def _completed_range(df: pd.DataFrame, completed: pd.DataFrame, stats) -> tuple[float, float] | None:
    """The main views' top-1 range: the completed trials', the confirmed means' +-1 std and the baseline's
    (+-1 std), with a margin of 8% (at least 0.25 points); None before any trial completed."""
    if completed.empty:
        return None
    values = [completed["top1"].astype(float)]
    confirmed = df[df["n_seeds"].notna()] if "n_seeds" in df else df.iloc[:0]
    if len(confirmed):
        std = confirmed["top1_std"].fillna(0).astype(float)
        values += [confirmed["top1_mean"] - std, confirmed["top1_mean"] + std]
    if stats is not None:
        mean, std, _ = stats
        values.append(pd.Series([mean - (0 if std != std else std), mean + (0 if std != std else std)]))
    top1 = pd.concat(values)
    low, high = float(top1.min()), float(top1.max())
    margin = max(0.1 * (high - low), 0.25)
    if completed["top1"].max() <= 100.0:   # no room above 100% (an error bar may pass it; a point at 100% keeps a sliver)
        return low - margin, min(high + margin, 100.0 + 0.3 * margin)
    return low - margin, high + margin


def _main_panel(ax, df: pd.DataFrame, completed: pd.DataFrame, x: str, front: str, stats) -> None:
    points = completed[completed[x].notna()]
    if points.empty:
        ax.text(0.5, 0.5, "no completed trial yet", ha="center", va="center", transform=ax.transAxes,
                fontsize=_FONT["label"], color="dimgray")
    else:
        dense = points["pretrain"].map(is_true).astype(bool) if "pretrain" in points else points["top1"].isna()
        searched = points[~dense]
        if len(searched):
            ax.scatter(searched[x], searched["top1"], s=40, color=_COLOURS["completed"], alpha=0.85, zorder=3,
                       label=f"completed: trained its full budget ({len(searched)})")
        if dense.any():   # search.pretrain's trial: the start of every other one, never on a front
            ax.scatter(points.loc[dense, x], points.loc[dense, "top1"], s=55, marker="s", color="black", zorder=3,
                       label="dense pretraining (every trial started from it)", gid="pretrain")
        _lineage(ax, points, x)
    _seed_means(ax, df, x)
    best = points[points[front]].sort_values(x) if len(points) else points
    if len(best):
        ax.plot(best[x], best["top1"], drawstyle="steps-post", color="black", lw=1.3, zorder=2,
                label="Pareto front (one seed)")
        ax.scatter(best[x], best["top1"], s=120, facecolors="none", edgecolors="black", lw=1.2, zorder=4)
        right = points[x].min() + 0.85 * (points[x].max() - points[x].min())
        for _, row in best.iterrows() if len(best) <= _MAX_NAMES else ():  # name them, to find them in the table
            left = len(best) > 1 and row[x] > right   # near the right edge: the name to the point's left
            ax.annotate(str(row["trial_id"]), (row[x], row["top1"]), xytext=(-7 if left else 7, -12),
                        textcoords="offset points", ha="right" if left else "left", fontsize=_FONT["note"],
                        color="dimgray", gid="front-name")
    _baseline(ax, stats)


def _others_strip(ax, others: pd.DataFrame, x: str) -> None:
    """The trials that did not train their full budget, on their own top-1 axis: stopped (hollow, e<N> = the
    epoch it stopped at), running, diverged, errored."""
    points = others[others[x].notna()]
    if points.empty:
        ax.text(0.5, 0.5, "none stopped, running or failed", ha="center", va="center", transform=ax.transAxes,
                fontsize=_FONT["note"], color="dimgray")
        ax.set_yticks([])
        return
    for status in STATUSES:
        group = points[points["status"] == status]
        if not len(group):
            continue
        if status == "stopped":   # hollow: its top-1 is an earlier epoch's, not a result to pick
            named = len(group) <= _MAX_NAMES   # more labels than that would be unreadable (and slow to draw)
            ax.scatter(group[x], group["top1"], s=34, facecolors="none", edgecolors=_COLOURS[status], zorder=3,
                       label=f"stopped early ({len(group)}" + ("; e<N>: the epoch it stopped at)" if named else ")"))
            low, high = ax.get_xlim()   # shared with the view above: its data count too
            for (px, py), text in _epoch_labels(group, x, points) if named else ():
                left = px > low + 0.88 * (high - low)   # near the right edge: on the point's left
                ax.annotate(text, (px, py), xytext=(-5 if left else 4, 2), textcoords="offset points",
                            ha="right" if left else "left", fontsize=_FONT["small"], color="#555555",
                            gid="stopped-epoch")
            continue
        ax.scatter(group[x], group["top1"], s=34, color=_COLOURS[status], marker=_MARKERS.get(status, "o"),
                   alpha=0.85, label=f"{status} ({len(group)})", zorder=3)
    ax.margins(y=0.25)
    ax.locator_params(axis="y", nbins=3)


def _epoch_labels(group: pd.DataFrame, x: str, points: pd.DataFrame) -> list[tuple[tuple[float, float], str]]:
    """One label per cluster of stopped trials that would overlap in the strip (within 1/20 of its width and 1/4
    of its height): `e1`, `3× e1`, `e1, 2× e2` (the epochs they stopped at), placed at the cluster's top point."""
    width = max(float(points[x].max() - points[x].min()), 0.05) / 20
    height = max(float(points["top1"].max() - points["top1"].min()), 1.0) / 4
    cells = group.assign(_cx=(group[x] / width).round(), _cy=(group["top1"] / height).round())
    labels = []
    for _, cluster in cells.groupby(["_cx", "_cy"], sort=False):
        counts = cluster["epochs"].value_counts().sort_index()
        text = ", ".join(f"{n}× e{e:g}" if n > 1 else f"e{e:g}" for e, n in counts.items())
        top = cluster.loc[cluster["top1"].idxmax()]
        labels.append(((top[x], top["top1"]), text))
    return labels


def _baseline(ax, stats) -> None:
    """The dense baseline as a dashed line (and a +-1 std band when it has seeds), or a note that there is none."""
    if stats is None:
        ax.text(0.02, 0.97, "no dense baseline: no dense trial\ntrained its full budget", transform=ax.transAxes,
                ha="left", va="top", fontsize=_FONT["note"], color="dimgray", style="italic", gid=_NO_BASE_GID)
        return
    mean, std, n = stats
    what = f"{mean:.2f}% (one run)" if n == 1 else f"{mean:.2f} ± {0 if std != std else std:.2f}% over {n} seeds"
    ax.axhline(mean, color="black", ls="--", lw=1, alpha=0.75, zorder=1, label=f"dense baseline: {what}", gid=_BASE_GID)
    if std == std and std > 0:
        ax.axhspan(mean - std, mean + std, color="black", alpha=0.08, lw=0, zorder=0,
                   label="dense baseline ± 1 std", gid=f"{_BASE_GID}-band")


def _curve_panel(ax, df: pd.DataFrame, base, stats) -> None:
    """Best (confirmed) mean top-1 per target density, +-1 std, each point's MACs ratio and gap to dense; the
    dense pretraining (when it is the baseline) as the curve's point at 100%."""
    curve = density_curve(df)
    ax.set_title("density curve: best per target density", fontsize=_FONT["title"])
    ax.set_xlabel("target density (gating.density)", fontsize=_FONT["label"])
    ax.set_ylabel("top-1 (%)", fontsize=_FONT["label"])
    ax.xaxis.set_major_formatter(_percent_axis())
    ax.tick_params(labelsize=_FONT["tick"])
    ax.grid(alpha=0.3)
    _baseline(ax, stats)
    if curve.empty:
        ax.text(0.5, 0.5, "no completed trial yet", ha="center", va="center", transform=ax.transAxes,
                fontsize=_FONT["label"], color="dimgray")
        return
    confirmed = bool(curve["confirmed"].all())
    n = int(curve["n_seeds"].max())
    label = (f"best confirmed config: mean ± std over {n} seeds" if confirmed
             else "best completed trial (one seed: no config confirmed)")
    ax.errorbar(curve["target_density"], curve["top1"], yerr=curve["top1_std"].fillna(0), fmt="o-", ms=6, lw=1.4,
                color="#9467bd", ecolor="#9467bd", capsize=4, zorder=4, label=label, gid="curve")
    densities = curve["target_density"].tolist()
    if base is not None and is_true(base.get("pretrain")) and base["trial_id"] not in set(curve["trial_id"]):
        ax.scatter([1.0], [stats[0]], s=55, marker="s", color="black", zorder=5,
                   label="dense pretraining (every trial started from it)", gid="pretrain")
        densities.append(1.0)
    right = max(densities)
    for _, row in curve.iterrows():   # beside the point, clear of its error bar; at the right edge, on its left
        text = f"MACs {100 * row['macs_ratio']:.1f}%" if pd.notna(row["macs_ratio"]) else "MACs ?"
        if base is not None and row["trial_id"] == base["trial_id"]:
            text += "\nthe dense baseline"
        elif stats is not None:
            text += f"\n{row['top1'] - stats[0]:+.2f} vs dense"
        left = row["target_density"] >= right and len(densities) > 1
        ax.annotate(text, (row["target_density"], row["top1"]), xytext=(-6, -12) if left else (9, -2),
                    textcoords="offset points", ha="right" if left else "left", va="top", fontsize=_FONT["note"],
                    color="#4b2c6f", gid="curve-macs")
    low, high = min(densities), max(densities)
    pad = max(0.04, 0.08 * (high - low))
    ax.set_xlim(low - pad, high + pad)
    if len(densities) <= 12:   # ticks at the densities searched (a grid's values; a ladder's steps)
        ax.set_xticks(densities)
    values = [curve["top1"] - curve["top1_std"].fillna(0), curve["top1"] + curve["top1_std"].fillna(0)]
    if stats is not None:
        std = 0 if stats[1] != stats[1] else stats[1]
        values.append(pd.Series([stats[0] - std, stats[0] + std]))
    top1 = pd.concat(values)
    span = max(float(top1.max() - top1.min()), 0.5)
    ax.set_ylim(float(top1.min()) - 0.3 * span, float(top1.max()) + 0.12 * span)   # room for the annotations


def _legend(key, axes) -> None:
    """One legend for all views, in its own cell of the grid (an axes with nothing else drawn), so it covers
    no point; entries with the same label once."""
    handles, labels = {}, []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    order = ("completed", "dense pretraining", "Pareto front", "started from", "mean ±", "front over", "best ",
             "dense baseline",
             "stopped", "running", "diverged", "error")
    labels.sort(key=lambda label: next((i for i, p in enumerate(order) if label.startswith(p)), len(order)))
    key.axis("off")
    if labels:   # nothing to explain before the first results
        key.legend([handles[label] for label in labels], labels, loc="center", fontsize=_FONT["note"] + 0.5,
                   frameon=False, borderaxespad=0)


def _lineage(ax, points: pd.DataFrame, x: str) -> None:
    """A density ladder's steps: a thin line from each completed trial to the trial of the step above it started
    from (the dense pretraining's children are left unlinked: it would link every trial to one point)."""
    at = points.set_index("trial_id")
    dense = set(points.loc[points["pretrain"].fillna(False).astype(bool), "trial_id"]) if "pretrain" in points else set()
    links = [(at.loc[p], row) for _, row in points[points["status"] == "completed"].iterrows()
             if (p := row.get("started_from")) and isinstance(p, str) and p in at.index and p not in dense]
    for i, (parent, child) in enumerate(links):
        ax.plot([parent[x], child[x]], [parent["top1"], child["top1"]], color="gray", lw=0.7, alpha=0.6, zorder=1,
                label="started from (ladder step above)" if i == 0 else None, gid="lineage")


def _seed_means(ax, df: pd.DataFrame, x: str) -> None:
    """Confirmed configs: mean top-1 +- 1 std over their seeds, and the front over seeds (dashed)."""
    confirmed = df[df["n_seeds"].notna()] if "n_seeds" in df else df.iloc[:0]
    confirmed = confirmed[confirmed[f"{x}_mean"].notna()]
    if confirmed.empty:
        return
    n = int(confirmed["n_seeds"].max())
    ax.errorbar(confirmed[f"{x}_mean"], confirmed["top1_mean"], yerr=confirmed["top1_std"].fillna(0), fmt="D",
                ms=5, color="#9467bd", ecolor="#9467bd", capsize=3, zorder=5, label=f"mean ± std over {n} seeds")
    best = confirmed[confirmed["pareto_seeds"]].sort_values(f"{x}_mean")
    if len(best) > 1:
        ax.plot(best[f"{x}_mean"], best["top1_mean"], drawstyle="steps-post", color="#9467bd", ls="--", lw=1.3,
                zorder=2, label=f"front over {n} seeds")
