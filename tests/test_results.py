"""results/: a real Ray Tune experiment folder (built once, ~15 s) -> table, markdown, CSV, plot.

Only the module fixture touches Ray; everything after it reads files with pandas, with Ray shut down.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pandas as pd
import pytest
import yaml

from gatetune.results import ReportError, collect, pareto_mask, summary_markdown, table, write_report
from gatetune.results import COLUMNS, read_report

EPOCHS = 4
SMALL, LARGE = 1e-6, 1e-4  # gating.weight grid
# (gating.density, gating.weight) -> top1 per epoch, and what the fake trial does. With one trial at a
# time in grid order (density varies fastest), ASHA (grace 1, rf 2, max_t 4) stops 0.5/0.25 at the
# first rung (below 70 and the median), lets the erroring trial (99) and the sparse one (65, 77) on.
FAKE = {(1.0, SMALL): ([70, 76, 80, 82], "ok"),
        (0.5, SMALL): ([60, 61, 62, 63], "ok"),
        (0.25, SMALL): ([55, 56, 57, 58], "ok"),
        (1.0, LARGE): ([99, 99, 99, 99], "raise"),
        (0.5, LARGE): ([10, 10, 10, 10], "diverge"),
        (0.25, LARGE): ([65, 77, 78, 79], "ok")}
EXPECTED = {(1.0, SMALL): ("completed", ""), (0.5, SMALL): ("stopped", "asha"),
            (0.25, SMALL): ("stopped", "asha"), (1.0, LARGE): ("error", ""),
            (0.5, LARGE): ("diverged", "diverged"), (0.25, LARGE): ("completed", "")}
BASE_CONFIG = {
    "name": "quickstart", "seed": 0,
    "model": {"name": "digitnet", "weights": None},
    "data": {"dataset": "digits", "root": None, "augment": True},
    "gating": {"policy": "fbs", "density": 0.5, "weight": 1e-6, "gate": "all", "trainable": ["conv1", "conv2"],
               "sites": {}},
    "train": {"epochs": EPOCHS, "batch_size": 128, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
    "search": {"num_samples": 1, "metric": "top1", "mode": "max",
               "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2}},
    "space": {"gating.density": {"choice": [0.25, 0.5, 1.0]}, "gating.weight": {"choice": [SMALL, LARGE]}},
}


def _make_trainable():
    """The fake trainable, built inside a function so that Ray pickles it by value: workers cannot
    import this test module."""

    def fake_trainable(config):
        from ray import tune

        d, w = config["gating.density"], config["gating.weight"]
        top1s, behaviour = FAKE[(d, w)]
        for e, top1 in enumerate(top1s):
            if behaviour == "raise" and e == 1:
                raise RuntimeError("simulated worker failure")
            diverged = behaviour == "diverge"
            metrics = {"epoch": float(e + 1), "top1": float(top1), "top5": min(100.0, top1 + 15.0),
                       "loss": 1.0 / (e + 1), "gate_loss": math.nan if diverged else w * 1e3,
                       "density": d * 0.98, "macs": 3e6 * d, "macs_ratio": d + 0.05, "lr": 0.05,
                       "images_per_s": 1000.0, "node": "node-b" if d == 0.25 else "node-a",
                       "diverged": diverged, "density/conv1": d, "density/conv2": d * 0.96}
            if e >= 1:
                metrics["latency_ratio"] = d + 0.1  # a key that first appears late (progress.csv drops it)
            with tempfile.TemporaryDirectory() as tmp:
                open(os.path.join(tmp, "state.txt"), "w").write(str(e))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
            if diverged:
                return

    return fake_trainable


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real search folder: Ray Tune grid + ASHA, then gatetune.yaml beside Ray's files; Ray shut down."""
    ray = pytest.importorskip("ray")
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # no token file; a local ray.init() would leave "token" set
    storage = tmp_path_factory.mktemp("ray_storage")
    # not conftest's ray_local: that one stays up for the whole module, and the reports must run without Ray
    ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False,
             object_store_memory=200 * 1024**2)
    try:
        tuner = tune.Tuner(
            _make_trainable(),
            param_space={"gating.density": tune.grid_search([1.0, 0.5, 0.25]),
                         "gating.weight": tune.grid_search([SMALL, LARGE])},
            tune_config=tune.TuneConfig(
                metric="top1", mode="max", reuse_actors=True, max_concurrent_trials=1, time_budget_s=120,
                scheduler=ASHAScheduler(time_attr="epoch", max_t=EPOCHS, grace_period=1, reduction_factor=2)),
            run_config=tune.RunConfig(name="search", storage_path=str(storage), verbose=0))
        tuner.fit()
    finally:
        ray.shutdown()
        os.environ.pop("RAY_AUTH_MODE") if saved is None else os.environ.__setitem__("RAY_AUTH_MODE", saved)
    path = storage / "search"
    (path / "gatetune.yaml").write_text(yaml.safe_dump(BASE_CONFIG, sort_keys=False))
    return path


@pytest.fixture
def run_copy(run_dir, tmp_path):
    """A private copy of the search folder, for tests that edit files."""
    return shutil.copytree(run_dir, tmp_path / "copy" / run_dir.name)


def _by_key(df):
    return {(row.target_density, row.weight): row for row in df.itertuples()}


def _trial(df, density, weight):
    return df[(df["target_density"] == density) & (df["weight"] == weight)].iloc[0]


def _trial_dir(run_dir, df, density, weight):
    return run_dir / _trial(df, density, weight)["checkpoint"].split("/")[0]


# --- the real folder -----------------------------------------------------------------------------

def test_experiment_state_is_what_the_reader_expects(run_dir):
    """Ray 2.60's (internal) format: trial_data = [[trial_json, metadata_json], ...]."""
    (state_file,) = run_dir.glob("experiment_state-*.json")
    trials = [json.loads(t) for t, _ in json.loads(state_file.read_text())["trial_data"]]
    assert sorted(t["status"] for t in trials) == ["ERROR"] + ["TERMINATED"] * 5
    for t in trials:
        assert (run_dir / t["relative_logdir"] / "params.json").is_file()
        assert set(t["config"]) == {"gating.density", "gating.weight"}


def test_columns_in_design_order_then_searched_parameters(run_dir):
    df = table(run_dir)
    assert list(df.columns) == [*COLUMNS, "latency_ratio", "gating.density", "gating.weight"]
    assert COLUMNS[:3] == ("trial_id", "status", "stopped_by") and COLUMNS[21:25] == (
        "pareto", "pareto_density", "gate_health", "gate_health_detail") and COLUMNS[25:27] == (
        "started_from", "pretrain")
    assert COLUMNS[27:] == ("confirms", "n_seeds", "top1_mean", "top1_std", "density_mean", "macs_ratio_mean",
                            "pareto_seeds")


def test_one_row_per_trial_with_status_and_stopped_by(run_dir):
    df = table(run_dir)
    assert len(df) == len(FAKE) and df["trial_id"].is_unique
    got = {key: (row.status, row.stopped_by) for key, row in _by_key(df).items()}
    assert got == EXPECTED


def test_rows_sorted_by_top1_best_first(run_dir):
    top1 = table(run_dir)["top1"].tolist()
    assert top1 == sorted(top1, reverse=True)


def test_metrics_come_from_the_last_report(run_dir):
    df = table(run_dir)
    dense, sparse = _trial(df, 1.0, SMALL), _trial(df, 0.25, LARGE)
    assert (dense["top1"], dense["epochs"], dense["density"]) == (82.0, 4.0, 0.98)
    assert (sparse["top1"], sparse["macs_ratio"], sparse["node"]) == (79.0, 0.3, "node-b")
    assert sparse["latency_ratio"] == pytest.approx(0.35)
    assert _trial(df, 0.5, SMALL)["epochs"] == 1.0  # stopped at ASHA's first rung
    assert math.isnan(_trial(df, 0.5, LARGE)["gate_loss"])  # the diverged report


def test_config_columns_from_gatetune_yaml_and_params(run_dir):
    row = _trial(table(run_dir), 0.25, SMALL)
    got = (row["model"], row["dataset"], row["policy"], row["seed"], row["lr"])
    assert got == ("digitnet", "digits", "fbs", 0, 0.05)
    assert (row["gated_layers"], row["trainable_layers"]) == ("all", "conv1,conv2")
    assert (row["target_density"], row["gating.density"], row["gating.weight"]) == (0.25, 0.25, SMALL)


def test_checkpoint_is_the_latest_relative_to_run_dir(run_dir):
    df = table(run_dir)
    assert _trial(df, 1.0, SMALL)["checkpoint"].endswith("/checkpoint_000003")
    assert _trial(df, 1.0, LARGE)["checkpoint"].endswith("/checkpoint_000000")  # errored in epoch 2
    assert all((run_dir / c).is_dir() and not os.path.isabs(c) for c in df["checkpoint"])


def test_pareto_fronts_skip_error_and_diverged(run_dir):
    df = table(run_dir)
    front = {key for key, row in _by_key(df).items() if row.pareto}
    # the erroring trial (99 %) and the diverged one would change the front if they counted
    assert front == {(1.0, SMALL), (0.25, LARGE)}
    assert df["pareto_density"].tolist() == df["pareto"].tolist()


def test_collect_history_one_row_per_trial_epoch(run_dir):
    trials, history = collect(run_dir)
    assert len(trials) == len(FAKE)
    assert history.groupby("trial_id").size().sort_values().tolist() == [1, 1, 1, 1, 4, 4]
    assert history.columns[0] == "trial_id" and not any(c.startswith("config") for c in history.columns)
    assert {"epoch", "density/conv1", "latency_ratio"} <= set(history.columns)


def test_report_on_a_copy_with_ray_shut_down(run_dir, tmp_path):
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    moved = shutil.copytree(run_dir, tmp_path / "elsewhere" / "moved")
    hidden = run_dir.rename(run_dir.with_name("hidden"))  # Ray's files still name the old path
    try:
        df = write_report(moved)
    finally:
        hidden.rename(run_dir)
    assert all((moved / c).is_dir() for c in df["checkpoint"])
    text = (moved / "report.md").read_text()
    assert str(run_dir) not in text and "## Summary" in text and "## All trials" in text
    assert "6 trials (2 completed, 2 stopped, 1 diverged, 1 error)" in text and "run folder size " in text
    assert (moved / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_csv_round_trip(run_dir, tmp_path):
    df = write_report(run_dir, csv=tmp_path / "r.csv", markdown=tmp_path / "r.md", plot=tmp_path / "r.png")
    back = read_report(tmp_path / "r.csv")
    assert list(back.columns) == list(df.columns)
    for column in ("trial_id", "status", "pareto", "top1", "density", "epochs", "gating.weight"):
        pd.testing.assert_series_equal(back[column], df[column], check_dtype=False)
    assert "![top-1 against MACs ratio and density](r.png)" in (tmp_path / "r.md").read_text()


# --- edited copies: a live search, a restart, scheduler decisions ---------------------------------

def test_duplicate_training_iterations_keep_the_last(run_copy):
    result = _trial_dir(run_copy, table(run_copy), 1.0, SMALL) / "result.json"
    lines = result.read_text().splitlines()
    redo = json.loads(lines[-1]) | {"top1": 12.5}  # a restart without checkpoint reports epoch 4 again
    result.write_text("\n".join([*lines, json.dumps(redo)]) + "\n")
    trials, history = collect(run_copy)
    assert (history["trial_id"] == redo["trial_id"]).sum() == EPOCHS
    assert trials.set_index("trial_id").loc[redo["trial_id"], "top1"] == 12.5


def test_decisions_jsonl_names_who_stopped_a_trial(run_copy):
    tid = _trial(table(run_copy), 0.5, SMALL)["trial_id"]
    decision = {"trial_id": tid, "stopped_by": "off_target", "epoch": 1.0}
    (run_copy / "decisions.jsonl").write_text(json.dumps(decision) + "\n")
    df = table(run_copy)
    assert _trial(df, 0.5, SMALL)["stopped_by"] == "off_target"
    assert _trial(df, 0.25, SMALL)["stopped_by"] == "asha"


def test_latency_json_of_the_latest_checkpoint_fills_latency_ratio(run_copy):
    """<trial>/latency.json (written for the Pareto trials at the end of a search) wins over a reported
    latency_ratio, but only while it names the trial's latest checkpoint."""
    df = table(run_copy)
    dense, sparse = _trial(df, 1.0, SMALL), _trial(df, 0.25, LARGE)
    for row, ratio, checkpoint in ((dense, 0.42, dense["checkpoint"].split("/")[1]),
                                   (sparse, 0.11, "checkpoint_000000")):   # an older one: stale
        (run_copy / row["checkpoint"].split("/")[0] / "latency.json").write_text(json.dumps(
            {"latency_ratio": ratio, "latency_ms": 1.0, "dense_latency_ms": 2.4, "checkpoint": checkpoint}))
    broken = _trial(df, 0.5, SMALL)
    (run_copy / broken["checkpoint"].split("/")[0] / "latency.json").write_text('{"latency_ra')
    df = table(run_copy)
    assert _trial(df, 1.0, SMALL)["latency_ratio"] == pytest.approx(0.42)
    assert _trial(df, 0.25, LARGE)["latency_ratio"] == pytest.approx(0.35)   # the reported metric stays
    assert math.isnan(_trial(df, 0.5, SMALL)["latency_ratio"])   # half-written file ignored (stopped at epoch 1)
    write_report(run_copy)
    assert "`latency_ratio`: batch-1 CPU latency" in (run_copy / "report.md").read_text()


def test_live_search_state_lags_and_is_half_written(run_copy):
    (state_file,) = run_copy.glob("experiment_state-*.json")
    state = json.loads(state_file.read_text())
    dense = _trial(table(run_copy), 1.0, SMALL)
    for entry in state["trial_data"]:
        trial = json.loads(entry[0])
        if trial["trial_id"] == dense["trial_id"]:
            entry[0] = json.dumps(trial | {"status": "RUNNING"})
            pending = trial | {"trial_id": "fffff_00009", "status": "PENDING", "relative_logdir": "not_started_yet",
                               "config": {"gating.density": 0.75, "gating.weight": 1e-5}}
    state["trial_data"].append([json.dumps(pending), "{}"])
    state_file.write_text(json.dumps(state))
    newer = run_copy / "experiment_state-2999-01-01_00-00-00.json"
    newer.write_text('{"trial_data": [["{\\"trial_id')  # being rewritten: unreadable, the older one is used
    result = run_copy / dense["checkpoint"].split("/")[0] / "result.json"
    lines = result.read_text().splitlines()
    result.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])  # two reports and a half-written line
    df = table(run_copy)
    assert (_trial(df, 1.0, SMALL)["status"], _trial(df, 1.0, SMALL)["epochs"]) == ("running", 2.0)
    row = df.set_index("trial_id").loc["fffff_00009"]
    assert (row["status"], row["target_density"], row["checkpoint"]) == ("pending", 0.75, "")
    assert not row["pareto"] and math.isnan(row["top1"])
    assert _trial(df, 1.0, LARGE)["status"] == "error"


def test_no_experiment_state_yet_status_from_result_files(run_copy):
    for file in run_copy.glob("experiment_state-*.json"):
        file.unlink()
    new = run_copy / "fake_trainable_abcde_00009_9_gating.density=0.5_2026-01-01_00-00-00"
    new.mkdir()
    (new / "params.json").write_text(json.dumps({"gating.density": 0.5, "gating.weight": 1e-5}))
    df = table(run_copy).set_index("trial_id")
    assert df.loc["abcde_00009", "status"] == "pending"
    # the errored trial looks live without experiment_state: its last report is not `done`
    counts = {"completed": 2, "stopped": 2, "diverged": 1, "running": 1, "pending": 1}
    assert df["status"].value_counts().to_dict() == counts


def test_not_a_search_folder_is_a_one_line_error(run_dir, tmp_path):
    with pytest.raises(ReportError) as err:
        table(tmp_path)
    assert str(err.value) == (f"{tmp_path}: not a gatetune search folder (no gatetune.yaml, no "
                              "experiment_state-*.json); run `gatetune search CONFIG` first")
    with pytest.raises(ReportError, match=r"run folders inside it: search$"):
        table(run_dir.parent)  # the storage path instead of storage_path/name
    with pytest.raises(ReportError, match=r"no such folder"):
        table(tmp_path / "missing")
    plain_ray = shutil.copytree(run_dir, tmp_path / "plain")
    (plain_ray / "gatetune.yaml").unlink()
    with pytest.raises(ValueError, match=r"\(no gatetune.yaml\); run `gatetune search CONFIG` first$"):
        write_report(plain_ray)


# --- pure pandas ---------------------------------------------------------------------------------

def test_pareto_mask_on_a_hand_made_table():
    df = pd.DataFrame({"top1": [80, 75, 75, 70, 90, np.nan, 76, 80],
                       "macs_ratio": [0.5, 0.4, 0.4, 0.6, np.nan, 0.1, 0.3, 0.5]}, index=list("abcdefgh"))
    mask = pareto_mask(df)
    # g dominates b and c; a dominates d; a and h are equal and both stay; rows with a NaN never count
    assert mask[mask].index.tolist() == ["a", "g", "h"]
    both_max = pareto_mask(df, (("top1", "max"), ("macs_ratio", "max")))
    assert both_max[both_max].index.tolist() == ["a", "d", "h"]
    assert pareto_mask(df.iloc[:0]).tolist() == []
    with pytest.raises(ValueError, match=r"mode must be 'max' or 'min', but got \('top1', 'best'\)"):
        pareto_mask(df, (("top1", "best"),))


def test_summary_markdown_is_the_notebook_table():
    df = pd.DataFrame({"model": ["squeeze", "squeeze", "mobile", "mobile", "mobile"],
                       "status": ["completed", "stopped", "completed", "pending", "error"],
                       "density": [0.9571, 0.9807, 0.983, np.nan, 0.99], "top1": [55.72, 56.51, 68.754, np.nan, 99.0],
                       "macs_ratio": [0.93, 0.97, 0.96, np.nan, 0.99], "epochs": [12, 3, 12, np.nan, 1],
                       "top5": [78.88, 79.39, 88.34, np.nan, 99.0],
                       "checkpoint": ["t1/checkpoint_000012", "t0/checkpoint_000003", "", "", "t4/checkpoint_000000"],
                       "node": ["sigyn", "sigyn", "heimdall", "heimdall", "sigyn"]})
    # no results (pending) and failed runs (error) are left out; finished first, densest first within a status
    assert summary_markdown(df) == (
        "| network | status             | density | macs_ratio |  top1 |  top5 | checkpoint           | node     |\n"
        "|:--------|:-------------------|--------:|-----------:|------:|------:|:---------------------|:---------|\n"
        "| mobile  | completed          |  98.30% |     96.00% | 68.75 | 88.34 |                      | heimdall |\n"
        "| squeeze | completed          |  95.71% |     93.00% | 55.72 | 78.88 | t1/checkpoint_000012 | sigyn    |\n"
        "| squeeze | stopped at epoch 3 |  98.07% |     97.00% | 56.51 | 79.39 | t0/checkpoint_000003 | sigyn    |\n")


def test_import_needs_neither_ray_nor_torch():
    code = ("import sys, gatetune.results; "
            "print([m for m in ('ray', 'torch', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_searched_phase_length_sets_the_trials_epochs(run_copy):
    """A trial that searches train.phases.0.epochs below the base sum and trains to its own end is completed,
    not stopped: its epochs come from its own config (core.dotted.trial_config, as the trial itself)."""
    base = {**BASE_CONFIG, "train": {**BASE_CONFIG["train"], "epochs": 6,
                                     "phases": [{"epochs": 3}, {"epochs": 3}]}}
    (run_copy / "gatetune.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    df = table(run_copy)
    folder = _trial_dir(run_copy, df, 1.0, SMALL)   # reached epoch 4 of the base's 6
    assert _trial(df, 1.0, SMALL)["status"] == "stopped"
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "train.phases.0.epochs": 1}))   # 1 + 3 = 4
    row = _trial(table(run_copy), 1.0, SMALL)
    assert (row["status"], row["stopped_by"], row["epochs"]) == ("completed", "", 4.0)


def test_stopped_trials_are_never_on_a_front(run_copy, tmp_path):
    """A trial ASHA stopped after one epoch with a (fake) brilliant top-1 at a tiny MACs ratio stays in the
    table as stopped, off both fronts; the plot draws it hollow."""
    folder = _trial_dir(run_copy, table(run_copy), 0.5, SMALL)
    lines = (folder / "result.json").read_text().splitlines()
    last = json.loads(lines[-1])
    lines[-1] = json.dumps({**last, "top1": 99.9, "macs_ratio": 0.01, "density": 0.1})
    (folder / "result.json").write_text("\n".join(lines) + "\n")
    df = write_report(run_copy)
    row = _trial(df, 0.5, SMALL)
    assert (row["status"], row["top1"], row["pareto"], row["pareto_density"]) == ("stopped", 99.9, False, False)
    assert {key for key, r in _by_key(df).items() if r.pareto} == {(1.0, SMALL), (0.25, LARGE)}
    assert "| stopped at epoch 1 |" in summary_markdown(df)
    assert (run_copy / "pareto.png").stat().st_size > 10_000


def test_front_trials_follow_the_confirm_rule():
    from gatetune.results import front_trials
    df = pd.DataFrame({"trial_id": list("abcdef"), "status": ["completed"] * 4 + ["stopped", "completed"],
                       "top1": [90, 95, 80, 85, 99, 97], "macs_ratio": [0.2, 0.5, 0.1, 0.3, 0.01, 0.6],
                       "density": [0.5, 0.8, 0.25, 0.5, 0.1, 0.9], "confirms": ["", "", "", "", "", "b"]})
    assert front_trials(df, "pareto") == ["b", "a", "c"]           # d is dominated; e stopped; f is a replica
    assert front_trials(df, "pareto_density") == ["b", "a", "c"]
    assert front_trials(df, "top 2") == ["b", "a"]
    # the best dense trial joins as the baseline of the comparison (b is dense and selected already)
    df["target_density"], df["gated_layers"] = [0.5, 1.0, 0.25, 1.0, 0.1, 1.0], ["all"] * 6
    assert front_trials(df, "top 1") == ["b"]
    df.loc[df.trial_id == "b", "gated_layers"] = "all"
    df.loc[df.trial_id == "b", "target_density"] = 0.8
    assert front_trials(df, "top 1") == ["b", "d"]


def test_read_report_keeps_trial_ids_that_look_like_numbers(tmp_path):
    """Ray's 8-hex-digit ids: pandas alone reads 2512e764 as inf and 12345678 as an integer."""
    pd.DataFrame({"trial_id": ["2512e764", "12345678", "0abc1234"], "confirms": ["", "2512e764", ""],
                  "gated_layers": ["none", "all", "conv[2-6]"], "top1": [90.0, 91.0, None]}).to_csv(tmp_path / "r.csv", index=False)
    assert pd.read_csv(tmp_path / "r.csv")["confirms"][1] == float("inf")   # the trap (a column of such ids)
    df = read_report(tmp_path / "r.csv")
    assert df["trial_id"].tolist() == ["2512e764", "12345678", "0abc1234"]
    assert df["confirms"].isna().tolist() == [True, False, True] and df["confirms"][1] == "2512e764"
    assert df["gated_layers"][0] == "none" and math.isnan(df["top1"][2])


# --- gatetune report --latex, and the figure of the real folder ----------------------------------

def _latex_cells(line: str) -> list[str]:
    """A tabular row's cells: split at & not escaped as \\&, the trailing \\\\ removed."""
    import re
    assert line.endswith(r" \\"), line
    return re.split(r"(?<!\\)&", line[:-3])


def test_report_latex_writes_the_density_accuracy_tabular(run_copy, tmp_path, capsys):
    from gatetune.tuning.cli import main
    out = tmp_path / "paper" / "table.tex"    # its folder created
    assert main(["report", str(run_copy), "--latex", str(out)]) == 0
    assert f"LaTeX table: {out}" in capsys.readouterr().out
    lines = out.read_text().strip().splitlines()
    assert lines[0].startswith(r"\begin{tabular}{") and lines[-1] == r"\end{tabular}"
    assert [lines[1], lines[3], lines[-2]] == [r"\toprule", r"\midrule", r"\bottomrule"]
    columns = len(lines[0][len(r"\begin{tabular}{"):-1])
    header = _latex_cells(lines[2])
    assert len(header) == columns == 7 and r"Top-1 (\%)" in [c.strip() for c in header]
    rows = [_latex_cells(line) for line in lines[4:-2]]
    assert rows and all(len(r) == columns for r in rows)
    df = table(run_copy)
    dense, sparse = _trial(df, 1.0, SMALL), _trial(df, 0.25, LARGE)   # the two completed trials
    ids = [r[-1].strip() for r in rows]
    assert ids == [t.replace("_", r"\_") for t in (dense["trial_id"], sparse["trial_id"])]
    assert "_" in dense["trial_id"] and r"\_" in ids[0]   # Ray's grid ids: <5 hex>_<5 digits>, escaped
    assert rows[0][0].strip() == "1.00 (baseline)" and rows[0][4].strip() == f"{dense['top1']:.2f}"
    assert rows[1][0].strip() == "0.25" and rows[1][3].strip() == f"{sparse['macs_ratio']:.3f}"
    assert not [p for p in out.parent.iterdir() if p.name != "table.tex"]   # no temporary file left
    assert (run_copy / "report.md").is_file()


def test_report_latex_to_a_path_that_cannot_be_written_is_one_line(run_copy, tmp_path, capsys):
    from gatetune.tuning.cli import main
    where = tmp_path / "out"
    where.mkdir()
    blocker = where / "a-file"
    blocker.write_text("")
    for bad in (blocker / "table.tex", where):   # under a file; a folder
        assert main(["report", str(run_copy), "--latex", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"gatetune report: error: {bad}: cannot write it (")
        assert err.rstrip().endswith("give a file path whose folder exists or can be created, and that you can "
                                     "write to")
    assert not (run_copy / "report.md").exists()   # nothing written before the mistake was found
    assert sorted(p.name for p in where.iterdir()) == ["a-file"]   # no temporary file left


def test_the_figure_of_a_real_folder(run_dir):
    """Main views scaled to the two completed trials (82% and 79%), the stopped (epoch-1 60% and 55%) and the
    diverged (10%) trials in the strip below, the completed dense trial as the baseline line."""
    from gatetune.results import pareto_figure
    df = table(run_dir)
    fig = pareto_figure(df, "search")
    axes = {ax.get_gid(): ax for ax in fig.axes}
    for x in ("macs_ratio", "density"):
        bottom, top = axes[f"main-{x}"].get_ylim()
        assert 75 < bottom < 79 and 82 < top < 86
        main = {tuple(p) for c in axes[f"main-{x}"].collections for p in c.get_offsets().tolist()}
        strip = {tuple(p) for c in axes[f"others-{x}"].collections for p in c.get_offsets().tolist()}
        for _, row in df[df["top1"].notna()].iterrows():
            assert ((row[x], row["top1"]) in main) == (row["status"] == "completed"), row["trial_id"]
            assert ((row[x], row["top1"]) in strip) == (row["status"] != "completed"), row["trial_id"]
        (line,) = [line for line in axes[f"main-{x}"].lines if line.get_gid() == "dense-baseline"]
        assert line.get_ydata()[0] == _trial(df, 1.0, SMALL)["top1"] == 82.0
