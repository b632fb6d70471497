"""report.csv, report.md and pareto.png of a search folder."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pandas as pd

from gatetune.core import layout
from gatetune.core import trials as T
from gatetune.core.storage import RunStore, write_atomic

from ._collect import STATUSES, open_run
from ._seeds import dense_baseline, origins, seed_groups
from ._table import PARETO, cell, is_missing, is_true, markdown_table, summary_markdown, table_of

# One colour per status (tab10 shades): the eye finds the failures first.
_COLOURS = {"completed": "#1f77b4", "stopped": "#7f7f7f", "running": "#2ca02c", "pending": "#bcbd22",
            "diverged": "#ff7f0e", "error": "#d62728"}
_MARKERS = {"diverged": "^", "error": "X"}  # failures also differ in shape, not only in colour
# Table columns shown as percentages (stored as fractions 0..1) and with 2 decimals (percent).
_FRACTIONS = ("target_density", "density", "macs_ratio", "latency_ratio", "density_mean", "macs_ratio_mean")
_PERCENTS = ("top1", "top5", "top1_mean", "top1_std")


def write_report(run_dir, csv=None, markdown=None, plot=None) -> pd.DataFrame:
    """Write the trials table as CSV, a markdown report (summary table, full table, run folder size)
    and the Pareto plot; defaults RUN_DIR/report.csv, RUN_DIR/report.md, RUN_DIR/pareto.png (into a
    remote run folder too, s3://...). Returns the table."""
    run = open_run(run_dir)
    size = folder_size(run.path)  # before our own files are (re)written; a remote mirror holds no checkpoints
    df = table_of(run)
    store = RunStore(run.where or run.path)

    def put(path, name: str, data: bytes) -> Path:   # each file whole or not at all (core.storage)
        if path is None:
            store.write_bytes(name, data)
            return run.path / name
        write_atomic(path, lambda f: f.write(data))
        return Path(path)

    png = io.BytesIO()
    plot_pareto(df, png, title=f"{run.name}: top-1 accuracy against cost, {len(df)} trials")
    put(csv, layout.REPORT_CSV, df.to_csv(index=False).encode())
    plot = put(plot, layout.PARETO_PNG, png.getvalue())
    md_path = Path(markdown) if markdown is not None else run.path / layout.REPORT_MD
    image = Path(os.path.relpath(plot, md_path.parent)).as_posix()
    put(markdown, layout.REPORT_MD, _report_text(run.name, Path(run.where or run.path), df, size, image,
                                                 "" if not run.where else " (without checkpoints)").encode())
    return df


def read_report(source) -> pd.DataFrame:
    """report.csv (a path or a file object) read back as written: the id columns stay text. (pandas reads an
    8-hex-digit trial id such as 2512e764 as the number inf and 12345678 as an integer: a few percent of
    Ray's ids.) Empty cells are NaN; strings such as `none` stay strings."""
    return pd.read_csv(source, dtype={c: str for c in _TEXT_COLUMNS}, keep_default_na=False, na_values=[""])


_TEXT_COLUMNS = ("trial_id", T.CONFIRMS, T.STARTED_FROM, "checkpoint", "node", "stopped_by", "gated_layers",
                 "trainable_layers")


def folder_size(path: Path) -> int:
    """Bytes of all files below path; links are neither followed nor counted."""
    return sum(os.lstat(os.path.join(top, f)).st_size for top, _, files in os.walk(path)
               for f in files if not os.path.islink(os.path.join(top, f)))


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _report_text(name: str, path: Path, df: pd.DataFrame, size: int, image: str, what: str = "") -> str:
    counts = df["status"].value_counts()
    statuses = ", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts)
    return "\n".join([
        f"# {name}: gatetune search report", "",
        f"Run folder `{path.name}`: {len(df)} trials ({statuses or 'none'}); "
        f"run folder size{what} {human_bytes(size)} ({size:,} bytes).", "",
        "Metrics are each trial's last report; `density` is the achieved fraction of channels kept, "
        "`target_density` the configured one. `pareto`: not dominated in top1 (max) and macs_ratio (min); "
        "`pareto_density`: in top1 and density; both among the trials that trained their full budget "
        "(completed): a stopped trial's top-1 is that of an earlier epoch, so it is never on a front."
        + (" `latency_ratio`: batch-1 CPU latency (1 thread) of the channel-skipping inference path over the "
           "dense network with the same weights, measured at the end of the search for the Pareto trials."
           if "latency_ratio" in df else ""), "",
        "## Summary", "", baseline_line(df), "", summary_markdown(df),
        *_seeds_section(df),
        *_health_section(df),
        "## All trials", "", _full_table(df),
        "## Pareto front", "", f"![top-1 against MACs ratio and density]({image})", ""])


def seeds_markdown(df: pd.DataFrame) -> str:
    """The confirmed configs' table (mean and std over their seeds, gate_health over them, the front over the
    means), best mean first; "" when no config was confirmed. report.md and the end of a search show it."""
    confirmed = df[df["n_seeds"].notna()].sort_values("top1_mean", ascending=False, kind="stable")
    if confirmed.empty:
        return ""

    def health(origin) -> str:   # over the config's seeds: "ok", or "ok 2, collapsed 1"
        seeds = df[seed_groups(df) == origin]["gate_health"].astype(str)
        counts = seeds[seeds != ""].value_counts()
        return cell(counts.index[0]) if len(counts) == 1 else ", ".join(f"{h} {n}" for h, n in counts.items())

    rows = [[cell(r["trial_id"]), f"{100 * r['density_mean']:.2f}%", f"{100 * r['macs_ratio_mean']:.2f}%",
             f"{r['top1_mean']:.2f} ± {0 if is_missing(r['top1_std']) else r['top1_std']:.2f}", f"{int(r['n_seeds'])}",
             health(r["trial_id"]), "yes" if r["pareto_seeds"] else ""] for _, r in confirmed.iterrows()]
    return markdown_table(["config (trial)", "density", "macs_ratio", "top1 mean ± std", "seeds", "gate_health",
                           "front"], rows, "lrrrrll")


def baseline_line(df: pd.DataFrame) -> str:
    """Which dense trial the gated ones are compared with (the plot's dashed line), in one sentence."""
    base = dense_baseline(df)
    if base is None:
        return "No dense baseline: no dense trial (target density 1.0 or nothing gated) trained its full budget."
    how = (f"the dense pretraining every search trial started from, {float(base['epochs']):g} epochs"
           if is_true(base.get("pretrain")) else "the best dense trial that trained its full budget")
    return f"Dense baseline: trial `{base['trial_id']}` ({how}), top-1 {float(base['top1']):.2f}%."


def _seeds_section(df: pd.DataFrame) -> list[str]:
    table = seeds_markdown(df)
    if not table:
        return []
    return [f"## Front over {int(df['n_seeds'].max())} seeds", "",
            "Each confirmed config trained again with other seeds (its replicas name it under `confirms`); mean "
            "and sample standard deviation over its seeds; gate_health over its seeds. `front`: not dominated in mean "
            "top1 and mean macs_ratio (or density, with `search.confirm.front: pareto_density`).", "", table]


def _health_section(df: pd.DataFrame) -> list[str]:
    """'Gating health': how many trials have dynamic gates, and the worst site of each that does not."""
    known = df[df["gate_health"].astype(str) != ""]
    if known.empty:
        return []
    counts = known["gate_health"].value_counts()
    bad = known[~known["gate_health"].isin(("ok", "dense"))]
    rows = [[cell(r["trial_id"]), cell(r["status"]), _format("density", r["density"]), cell(r["gate_health"]),
             cell(r["gate_health_detail"])] for _, r in bad.iterrows()]
    return ["## Gating health", "",
            "Per trial, on the validation split at its last epoch: a channel is dynamic when inputs keep it "
            "between 1% and 99% of the time. `static`: over 90% of the gated channels are never or always kept "
            "(static pruning in disguise); `collapsed`: density off target, or a site with no dynamic channel "
            "and dead ones; `dense`: no site drops channels. "
            + ", ".join(f"{counts[h]} {h}" for h in ("ok", "static", "collapsed", "dense") if h in counts) + ".", "",
            *([markdown_table(["trial", "status", "density", "gate_health", "worst site"], rows, "llrll")]
              if rows else [])]


def _full_table(df: pd.DataFrame) -> str:
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and df[c].dtype != bool]
    rows = [[_format(c, v) for c, v in row.items()] for _, row in df.iterrows()]
    return markdown_table(list(df.columns), rows, "".join("r" if c in numeric else "l" for c in df.columns))


def _format(column: str, value) -> str:
    if is_missing(value):
        return ""
    if column in PARETO or column == "pareto_seeds":
        return "yes" if value else ""
    if column in _FRACTIONS:
        return f"{100 * float(value):.2f}%"
    if column in _PERCENTS:
        return f"{float(value):.2f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return cell(value)


def plot_pareto(df: pd.DataFrame, path, title: str) -> None:
    """Two panels, top-1 against MACs ratio and against achieved density: every search trial a point
    coloured by status (stopped trials hollow, labelled with their last epoch: never on a front), the
    Pareto front of the completed trials as a step line, a density ladder's lineage as thin grey lines,
    confirmed configs as their mean with a +-1 std
    error bar and the front over seeds dashed, the dense baseline as a dashed line."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI; Agg renders PNGs
    from matplotlib.ticker import PercentFormatter

    fig = Figure(figsize=(12, 5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    panels = (("macs_ratio", "pareto", "MACs ratio (effective / dense MACs per image)"),
              ("density", "pareto_density", "achieved density (fraction of channels kept)"))
    baseline = dense_baseline(df)
    for ax, (x, front, label) in zip(axes, panels):
        _panel(ax, df, x, front, baseline)
        ax.set_xlabel(label)
        ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (%)")
    if axes[0].get_legend_handles_labels()[0]:  # nothing to explain before the first results
        axes[0].legend(loc="best", fontsize="small")
    fig.suptitle(title)
    fig.savefig(path, dpi=110, format="png")


def _panel(ax, df: pd.DataFrame, x: str, front: str, baseline) -> None:
    points = df[df["top1"].notna() & df[x].notna() & (origins(df) == "")]
    if points.empty:
        ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes)
        return
    for status in STATUSES:
        group = points[points["status"] == status]
        if not len(group):
            continue
        if status == "stopped":   # hollow: its top-1 is an earlier epoch's, not a result to pick
            ax.scatter(group[x], group["top1"], s=36, facecolors="none", edgecolors=_COLOURS[status], zorder=3,
                       label=f"stopped early ({len(group)}; e<N> = last epoch)")
            for _, row in group.iterrows():
                ax.annotate(f"e{row['epochs']:g}", (row[x], row["top1"]), xytext=(4, 3), textcoords="offset points",
                            fontsize="xx-small", color=_COLOURS[status])
            continue
        ax.scatter(group[x], group["top1"], s=36, color=_COLOURS[status], marker=_MARKERS.get(status, "o"),
                   alpha=0.85, label=f"{status} ({len(group)})", zorder=3)
    _lineage(ax, points, x)
    _seed_means(ax, df, x)
    best = points[points[front]].sort_values(x)
    if len(best):
        ax.plot(best[x], best["top1"], drawstyle="steps-post", color="black", lw=1.2, zorder=2,
                label="Pareto front")
        ax.scatter(best[x], best["top1"], s=110, facecolors="none", edgecolors="black", lw=1.2, zorder=4)
        for _, row in best.iterrows():  # name the front's trials, to find them in the table
            ax.annotate(str(row["trial_id"]), (row[x], row["top1"]), xytext=(6, -10),
                        textcoords="offset points", fontsize="x-small", color="dimgray")
    if baseline is not None:
        ax.axhline(baseline["top1"], color="black", ls="--", lw=1, alpha=0.7,
                   label=f"dense baseline ({baseline['top1']:.2f}%)")


def _lineage(ax, points: pd.DataFrame, x: str) -> None:
    """A density ladder's steps: a thin line from each completed trial to the trial of the step above it started
    from (the dense pretraining's children are left unlinked: it would link every trial to one point)."""
    at = points.set_index("trial_id")
    dense = set(points.loc[points["pretrain"].fillna(False).astype(bool), "trial_id"]) if "pretrain" in points else set()
    links = [(at.loc[p], row) for _, row in points[points["status"] == "completed"].iterrows()
             if (p := row.get("started_from")) and isinstance(p, str) and p in at.index and p not in dense]
    for i, (parent, child) in enumerate(links):
        ax.plot([parent[x], child[x]], [parent["top1"], child["top1"]], color="gray", lw=0.6, alpha=0.5, zorder=1,
                label="started from (ladder step above)" if i == 0 else None)


def _seed_means(ax, df: pd.DataFrame, x: str) -> None:
    """Confirmed configs: mean top-1 +- 1 std over their seeds, and the front over seeds (dashed)."""
    confirmed = df[df["n_seeds"].notna()]
    if confirmed.empty:
        return
    n = int(confirmed["n_seeds"].max())
    ax.errorbar(confirmed[f"{x}_mean"], confirmed["top1_mean"], yerr=confirmed["top1_std"].fillna(0), fmt="D",
                ms=5, color="#9467bd", ecolor="#9467bd", capsize=3, zorder=5, label=f"mean ± std over {n} seeds")
    best = confirmed[confirmed["pareto_seeds"]].sort_values(f"{x}_mean")
    if len(best) > 1:
        ax.plot(best[f"{x}_mean"], best["top1_mean"], drawstyle="steps-post", color="#9467bd", ls="--", lw=1.2,
                zorder=2, label=f"front over {n} seeds")



