"""report.csv, report.md and pareto.png (drawn by _plot.py) of a search folder, and its LaTeX table."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pandas as pd

from gatetune.core import layout
from gatetune.core import trials as T
from gatetune.core.errors import first_line
from gatetune.core.storage import RunStore, write_atomic

from ._collect import STATUSES, ReportError, open_run
from ._plot import plot_pareto
from ._seeds import baseline_stats, dense_baseline, density_curve, seed_groups
from ._table import PARETO, cell, is_missing, is_true, markdown_table, summary_markdown, table_of

# Table columns shown as percentages (stored as fractions 0..1) and with 2 decimals (percent).
_FRACTIONS = ("target_density", "density", "macs_ratio", "latency_ratio", "density_mean", "macs_ratio_mean")
_PERCENTS = ("top1", "top5", "top1_mean", "top1_std")


def write_report(run_dir, csv=None, markdown=None, plot=None, latex=None) -> pd.DataFrame:
    """Write the trials table as CSV, a markdown report (summary table, full table, run folder size)
    and the Pareto plot; defaults RUN_DIR/report.csv, RUN_DIR/report.md, RUN_DIR/pareto.png (into a
    remote run folder too, s3://...); with `latex`, also the density/accuracy table as a LaTeX tabular
    (latex_table) into that file. Each file is written whole or not at all; a given path that cannot be
    written is a ReportError naming it. Returns the table."""
    run = open_run(run_dir)
    size = folder_size(run.path)  # before our own files are (re)written; a remote mirror holds no checkpoints
    df = table_of(run)
    store = RunStore(run.where or run.path)

    def put(path, name: str, data: bytes) -> Path:   # each file whole or not at all (core.storage)
        if path is None:
            store.write_bytes(name, data)
            return run.path / name
        try:
            write_atomic(path, lambda f: f.write(data))
        except OSError as exc:
            raise ReportError(f"{path}: cannot write it ({exc.strerror or first_line(exc)}); give a file path "
                              "whose folder exists or can be created, and that you can write to") from None
        return Path(path)

    if latex is not None:   # first: a path that cannot be written stops the report before anything is written
        put(latex, "report.tex", latex_table(df).encode())

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


LATEX_HEADER = ("Target density", "Gated layers", "Density", "MACs ratio", "Top-1 (%)", "Seeds", "Trial")


def latex_table(df: pd.DataFrame) -> str:
    """The density/accuracy curve as a LaTeX tabular for a paper (booktabs rules: \\toprule, \\midrule,
    \\bottomrule; pandas' Styler.to_latex): the dense baseline first, then per target density, densest first,
    the points of the plot's density curve (density_curve: the best confirmed config's mean +- std over its
    seeds, else the best completed trial, one seed). Columns LATEX_HEADER: achieved density and MACs ratio
    as fractions (means over the seeds), top-1 in percent; every cell LaTeX-escaped (% _ & # $ { } ~ ^ \\)."""
    base = dense_baseline(df)
    curve = density_curve(df)
    rows = []
    if base is not None:
        mean, std, n = baseline_stats(base)
        where = "dense pretraining" if is_true(base.get("pretrain")) else f"{float(base['target_density']):.2f}"
        rows.append([f"{where} (baseline)", cell(base.get("gated_layers")), _fraction(_mean_of(base, "density")),
                     _fraction(_mean_of(base, "macs_ratio")), _plus_minus(mean, std, n), f"{n}",
                     cell(base["trial_id"])])
    for _, point in curve.iloc[::-1].iterrows():
        if base is not None and point["trial_id"] == base["trial_id"]:
            continue   # the baseline's own config: its row is above
        config = df[df["trial_id"] == point["trial_id"]].iloc[0]
        rows.append([f"{point['target_density']:.2f}", cell(config.get("gated_layers")), _fraction(point["density"]),
                     _fraction(point["macs_ratio"]), _plus_minus(point["top1"], point["top1_std"], int(point["n_seeds"])),
                     f"{int(point['n_seeds'])}", cell(point["trial_id"])])
    frame = pd.DataFrame(rows, columns=list(LATEX_HEADER)) if rows else pd.DataFrame(columns=list(LATEX_HEADER))
    # escape first, then the formatter turns the ± of the top-1 cells into math (pandas escapes before formatting)
    styler = frame.style.hide(axis="index").format(escape="latex", formatter=lambda v: v.replace("±", r"$\pm$"))
    styler = styler.format_index(escape="latex", axis=1)
    return styler.to_latex(hrules=True, column_format="llrrrrl")


def _mean_of(row, column: str) -> float:
    """A row's `column` as its mean over its seeds when it has them (`<column>_mean`), else its own value."""
    mean = row.get(f"{column}_mean")
    return float(mean) if not is_missing(mean) and pd.notna(mean) else float(row.get(column, float("nan")))


def _fraction(value) -> str:
    return "" if is_missing(value) or pd.isna(value) else f"{float(value):.3f}"


def _plus_minus(mean: float, std: float, n: int) -> str:
    return f"{mean:.2f}" if n == 1 or pd.isna(std) else f"{mean:.2f} ± {std:.2f}"


def baseline_line(df: pd.DataFrame) -> str:
    """Which dense trial the gated ones are compared with (the plot's dashed line), in one sentence, with the
    top-1 the plot draws: the mean +- std over its seeds when it was confirmed, else its one run's."""
    base = dense_baseline(df)
    if base is None:
        return ("No dense baseline: neither a dense pretraining nor a dense trial (target density 1.0 or nothing "
                "gated) trained its full budget; the plot draws no baseline line.")
    how = (f"the dense pretraining every search trial started from, {float(base['epochs']):g} epochs"
           if is_true(base.get("pretrain")) else
           f"the best dense trial that trained its full budget, {float(base['epochs']):g} epochs")
    mean, std, n = baseline_stats(base)
    if n == 1:
        return f"Dense baseline: trial `{base['trial_id']}` ({how}), top-1 {mean:.2f}% (one run)."
    return (f"Dense baseline: trial `{base['trial_id']}` ({how}), top-1 {mean:.2f} ± "
            f"{0 if std != std else std:.2f}% over {n} seeds (this seed {float(base['top1']):.2f}%).")


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
