"""pareto.png, read from the matplotlib Figure (results._plot.pareto_figure), not from pixels: what each view
is scaled to, which artists are drawn where, where the legend sits, and the text sizes at the README's width.

Hand-made tables, pure pandas and matplotlib (no Ray): tests/test_results.py draws the figure of a real folder.
"""

import numpy as np
import pandas as pd
import pytest

from gatetune.results import PARETO, baseline_line, pareto_mask
from gatetune.results._plot import DPI, WIDTH_IN, pareto_figure, plot_pareto
from gatetune.results._report import latex_table
from gatetune.results._seeds import add_seed_stats, density_curve, front_candidates

README_PX = 800   # README.md shows the PNGs this wide


def _row(tid, status, target, top1, *, macs=None, epochs=16.0, confirms="", pretrain=False, gated="conv[2-6]",
         started_from=""):
    return {"trial_id": tid, "status": status, "target_density": target, "density": target * 0.99,
            "macs_ratio": target ** 2 if macs is None else macs, "top1": top1, "epochs": epochs, "confirms": confirms,
            "pretrain": pretrain, "gated_layers": gated, "started_from": started_from, "seed": 0, "gate_health": "ok"}


def _table(rows) -> pd.DataFrame:
    """What results.table builds from a run folder, for the columns the figure reads."""
    df = add_seed_stats(pd.DataFrame(rows), "pareto")
    on_front = front_candidates(df)
    for name, objectives in PARETO.items():
        df[name] = pareto_mask(df[on_front], objectives).reindex(df.index, fill_value=False).astype(bool)
    return df


# completed trials between 97.0 and 99.5; stopped ones far below (epoch-1 accuracies), one of them dense and
# better than every completed dense trial would be, had it trained on
SEARCH = [_row("dense001", "completed", 1.0, 99.5, gated="none"),
          _row("d075a", "completed", 0.75, 99.1), _row("d075b", "completed", 0.75, 98.6),
          _row("d050a", "completed", 0.5, 98.4), _row("d025a", "completed", 0.25, 97.0),
          _row("stop1", "stopped", 0.25, 21.0, epochs=1.0), _row("stop2", "stopped", 0.5, 35.5, epochs=2.0),
          _row("stop3", "stopped", 1.0, 99.9, epochs=1.0), _row("div1", "diverged", 0.5, 10.0, epochs=3.0)]
REPLICAS = [_row("r075a1", "completed", 0.75, 98.7, confirms="d075a"), _row("r075a2", "completed", 0.75, 98.9, confirms="d075a"),
            _row("r025a1", "completed", 0.25, 96.0, confirms="d025a"), _row("r025a2", "completed", 0.25, 96.6, confirms="d025a"),
            _row("rdense1", "completed", 1.0, 99.3, confirms="dense001", gated="none"),
            _row("rdense2", "completed", 1.0, 99.1, confirms="dense001", gated="none")]


def _axes(fig) -> dict:
    return {ax.get_gid(): ax for ax in fig.axes}


def _offsets(ax) -> set:
    """(x, y) of every scatter point and error-bar marker drawn in ax."""
    points = set()
    for collection in ax.collections:
        points |= {(round(float(x), 6), round(float(y), 6)) for x, y in np.asarray(collection.get_offsets())}
    for line in ax.lines:
        points |= {(round(float(x), 6), round(float(y), 6)) for x, y in line.get_xydata()}
    return points


def _baseline_lines(ax) -> list:
    return [line for line in ax.lines if line.get_gid() == "dense-baseline"]


def _notes(ax) -> list[str]:
    return [t.get_text() for t in ax.texts if t.get_gid() == "no-dense-baseline"]


def test_main_views_are_scaled_to_the_completed_trials():
    df = _table(SEARCH + REPLICAS)
    axes = _axes(pareto_figure(df, "t"))
    done = df[df["status"] == "completed"]
    confirmed = df[df["n_seeds"].notna()]
    low = min(done["top1"].min(), (confirmed["top1_mean"] - confirmed["top1_std"]).min())
    high = max(done["top1"].max(), (confirmed["top1_mean"] + confirmed["top1_std"]).max())
    for gid in ("main-macs_ratio", "main-density"):
        bottom, top = axes[gid].get_ylim()
        assert bottom < low and top > high                               # every completed point and error bar inside
        assert (top - bottom) < 1.5 * (high - low)                       # and not squeezed by the 10-36% stopped ones
        assert bottom > 90


def test_stopped_and_failed_trials_sit_in_their_own_strip_not_in_the_main_view():
    df = _table(SEARCH + REPLICAS)
    axes = _axes(pareto_figure(df, "t"))
    for x in ("macs_ratio", "density"):
        main, strip = _offsets(axes[f"main-{x}"]), _offsets(axes[f"others-{x}"])
        for _, row in df[df["status"].isin(("stopped", "diverged"))].iterrows():
            point = (round(row[x], 6), round(row["top1"], 6))
            assert point not in main and point in strip, row["trial_id"]
        for _, row in df[(df["status"] == "completed") & (df["confirms"] == "")].iterrows():
            assert (round(row[x], 6), round(row["top1"], 6)) in main
        assert axes[f"others-{x}"].get_ylim()[0] < 10 < 99.9 < axes[f"others-{x}"].get_ylim()[1]


def test_the_baseline_is_the_completed_dense_trial_with_its_seeds_band():
    df = _table(SEARCH + REPLICAS)
    fig = pareto_figure(df, "t")
    mean, std = np.mean([99.5, 99.3, 99.1]), np.std([99.5, 99.3, 99.1], ddof=1)
    for ax in fig.axes[:2] + [_axes(fig)["density-curve"]]:
        (line,) = _baseline_lines(ax)                       # not the stopped dense trial's 99.9
        assert line.get_ydata()[0] == pytest.approx(mean)
        (band,) = [p for p in ax.patches if p.get_gid() == "dense-baseline-band"]
        extents = band.get_path().get_extents(band.get_patch_transform() + band.get_data_transform()
                                              - ax.transData)
        assert (extents.y0, extents.y1) == (pytest.approx(mean - std), pytest.approx(mean + std))
        assert not _notes(ax)
    assert baseline_line(df) == (f"Dense baseline: trial `dense001` (the best dense trial that trained its full budget, "
                                 f"16 epochs), top-1 {mean:.2f} ± {std:.2f}% over 3 seeds (this seed 99.50%).")


def test_the_dense_pretraining_is_the_baseline_one_run_no_band():
    rows = [_row("pre", "completed", 1.0, 68.0, gated="none", pretrain=True, epochs=10.0),
            *[{**r, "started_from": "pre"} for r in SEARCH if r["trial_id"] != "dense001"]]
    df = _table(rows)
    fig = pareto_figure(df, "t")
    for ax in fig.axes[:2]:
        (line,) = _baseline_lines(ax)
        assert line.get_ydata()[0] == 68.0 and "one run" in line.get_label()
        assert not [p for p in ax.patches if p.get_gid() == "dense-baseline-band"]
        assert not [line for line in ax.lines if line.get_gid() == "lineage"]   # the pretraining's children: unlinked
    curve = _axes(fig)["density-curve"]
    (dense,) = [c for c in curve.collections if c.get_gid() == "pretrain"]   # the curve's point at 100%
    assert dense.get_offsets().tolist() == [[1.0, 68.0]] and 1.0 in curve.get_xticks()
    assert baseline_line(df).startswith("Dense baseline: trial `pre` (the dense pretraining every search trial "
                                        "started from, 10 epochs), top-1 68.00% (one run)")


def test_no_completed_dense_trial_no_baseline_line_but_a_note():
    """The only dense trials were stopped (one at a brilliant epoch-1 99.9%) or are still running: no line."""
    rows = [r for r in SEARCH if r["trial_id"] != "dense001"] + [_row("run1", "running", 1.0, 99.0, epochs=5.0)]
    df = _table(rows)
    fig = pareto_figure(df, "t")
    axes = _axes(fig)
    for gid in ("main-macs_ratio", "main-density", "density-curve"):
        assert not _baseline_lines(axes[gid]) and _notes(axes[gid]) == ["no dense baseline: no dense trial\n"
                                                                       "trained its full budget"]
    assert baseline_line(df).startswith("No dense baseline: neither a dense pretraining nor a dense trial")


def test_the_density_curve_draws_the_best_confirmed_mean_per_target_density():
    df = _table(SEARCH + REPLICAS)
    curve = density_curve(df)
    assert curve["target_density"].tolist() == [0.25, 0.75, 1.0]     # 0.5 was never confirmed
    assert curve["trial_id"].tolist() == ["d025a", "d075a", "dense001"] and curve["confirmed"].all()
    assert curve["top1"].tolist() == pytest.approx([np.mean([97.0, 96.0, 96.6]), np.mean([99.1, 98.7, 98.9]),
                                                    np.mean([99.5, 99.3, 99.1])])
    ax = _axes(pareto_figure(df, "t"))["density-curve"]
    (bars,) = ax.containers    # the error bar container: its data line, its bars
    assert bars.lines[0].get_xdata().tolist() == [0.25, 0.75, 1.0]
    assert bars.get_label() == "best confirmed config: mean ± std over 3 seeds"
    notes = [t.get_text() for t in ax.texts if t.get_gid() == "curve-macs"]
    assert notes[0] == f"MACs {100 * 0.25 ** 2:.1f}%\n{curve['top1'][0] - curve['top1'][2]:+.2f} vs dense"
    assert len(notes) == 3 and all(n.startswith("MACs ") for n in notes)


def test_without_confirmed_configs_the_curve_is_the_best_completed_trial_and_says_so():
    df = _table(SEARCH)
    curve = density_curve(df)
    assert curve["trial_id"].tolist() == ["d025a", "d050a", "d075a", "dense001"] and not curve["confirmed"].any()
    ax = _axes(pareto_figure(df, "t"))["density-curve"]
    (bars,) = ax.containers
    assert bars.get_label() == "best completed trial (one seed: no config confirmed)"
    assert bars.lines[0].get_xdata().tolist() == [0.25, 0.5, 0.75, 1.0]


def test_legend_outside_every_axes_and_text_readable_at_the_readme_width(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = pareto_figure(_table(SEARCH + REPLICAS), "pareto-20261203: top-1 accuracy against cost, 15 trials")
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    axes = _axes(fig)
    legend = axes["legend"].get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[0].startswith("completed") and any(label.startswith("stopped early (3;") for label in labels)
    box = legend.get_window_extent(renderer)
    for gid, ax in axes.items():
        if gid != "legend":
            assert not box.overlaps(ax.get_window_extent(renderer)), gid
    assert fig.get_figwidth() == WIDTH_IN
    scale = README_PX / (WIDTH_IN * 72)    # screen px per pt when the PNG is shown 800 px wide
    texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text"))
             if t.get_text() and t.get_visible()]
    assert texts and min(t.get_fontsize() for t in texts) * scale >= 10
    plot_pareto(_table(SEARCH + REPLICAS), tmp_path / "p.png", "t")
    from PIL import Image
    assert Image.open(tmp_path / "p.png").size[0] == WIDTH_IN * DPI


def test_a_ladder_links_each_trial_to_its_parent():
    rows = [_row("a", "completed", 0.75, 99.0), _row("b", "completed", 0.5, 98.5, started_from="a"),
            _row("c", "completed", 0.35, 97.0, started_from="b"), _row("d", "stopped", 0.35, 50.0, epochs=1.0,
                                                                      started_from="b")]
    ax = _axes(pareto_figure(_table(rows), "t"))["main-macs_ratio"]
    links = [line for line in ax.lines if line.get_gid() == "lineage"]
    assert sorted(tuple(line.get_ydata()) for line in links) == [(98.5, 97.0), (99.0, 98.5)]   # not to stopped d


def test_no_results_yet():
    df = _table([_row("p", "pending", 0.5, np.nan, epochs=np.nan)])
    axes = _axes(pareto_figure(df, "t"))
    assert "no completed trial yet" in [t.get_text() for t in axes["main-macs_ratio"].texts]
    assert axes["legend"].get_legend() is None


def test_latex_table_of_the_curve():
    text = latex_table(_table(SEARCH + REPLICAS))
    lines = text.strip().splitlines()
    assert lines[0] == r"\begin{tabular}{llrrrrl}" and lines[-1] == r"\end{tabular}"
    assert lines[1] == r"\toprule" and lines[3] == r"\midrule" and lines[-2] == r"\bottomrule"
    assert lines[2] == r"Target density & Gated layers & Density & MACs ratio & Top-1 (\%) & Seeds & Trial \\"
    assert lines[4].startswith(r"1.00 (baseline) & none & 0.990 & 1.000 & 99.30 $\pm$ 0.20 & 3 & dense001 \\")
    assert [line.split(" & ")[0] for line in lines[5:-2]] == ["0.75", "0.25"]
