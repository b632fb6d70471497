"""search.track: a tiny real search logged to a real MLflow tracking server (`mlflow server`, SQLite) and to W&B
offline run files, both read back; `gatetune train` logged to MLflow and W&B; the callbacks in tuner.pkl; and the
one-line errors before any work (a server that does not answer, a package missing, W&B online without a key)."""
import contextlib
import glob
import io
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import free_port
from gatetune import results
from gatetune.core import trials as T
from gatetune.core.errors import UserError
from gatetune.tuning import config as C

ROOT = Path(__file__).resolve().parent.parent
QUICK = str(ROOT / "search_spaces" / "quickstart.yaml")
DIGITS = str(ROOT / "search_spaces" / "digits.yaml")
TINY = ["train.epochs=2", "train.keep_checkpoints=1", "search.num_samples=4", "search.scheduler.grace_period=1",
        "space.gating.gate={choice: [all, [conv5, conv6]]}"]


def readme_track() -> dict:
    """search.track of the YAML block in README.md's Trackers section (the example users copy)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Trackers"):]
    block = re.search(r"```yaml\n(.*?)```", section, flags=re.S).group(1)
    return yaml.safe_load(block)["search"]["track"]


def override(track: dict) -> str:
    return f"search.track={json.dumps(track)}"


# --- a real MLflow tracking server for the module

@pytest.fixture(scope="module")
def mlflow_proc(tmp_path_factory):
    """`mlflow server` on a free port with a SQLite store, started (not yet waited for: it takes 10-20 s here,
    while Ray starts). Its job runner is off (7 more processes on a 2-core machine)."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--default-artifact-root", str(folder / "art"),
           "--workers", "1"]
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    yield SimpleNamespace(proc=proc, url=f"http://127.0.0.1:{port}", folder=folder)
    os.killpg(proc.pid, signal.SIGTERM)   # the server and its uvicorn worker (their own session)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    log.close()


def wait_for(server, timeout: float = 90) -> str:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{server.url}/health", timeout=2).read()
            return server.url
        except OSError:
            if server.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(server.folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def tracked(mlflow_proc, ray_local, tmp_path_factory):
    """ONE tiny search (4 trials, 2 epochs, ASHA) with README's search.track: MLflow at the server, W&B offline
    into the run folder (its default dir)."""
    from gatetune.tuning.search.run import run_search
    url = wait_for(mlflow_proc)
    storage = tmp_path_factory.mktemp("runs")
    track = readme_track()
    track["mlflow"]["tracking_uri"] = url
    cfg = C.load(QUICK, [*TINY, override(track)])
    console, errors = io.StringIO(), io.StringIO()
    started = time.time()
    with contextlib.redirect_stdout(console), contextlib.redirect_stderr(errors):
        run_dir, ok = run_search(cfg, storage=str(storage), name="tracked")
    df = results.read_report(os.path.join(run_dir, "report.csv"))
    return SimpleNamespace(url=url, run_dir=run_dir, ok=ok, out=console.getvalue(), err=errors.getvalue(), df=df, wb=Path(run_dir),
                           seconds=time.time() - started, project=track["wandb"]["project"])


def sampled(run_dir: str, trial_id: str) -> dict:
    """The trial's sampled keys, from its params.json."""
    with open(os.path.join(run_dir, f"trial_{trial_id}", "params.json")) as f:
        return T.config_params(json.load(f))


def test_readme_example_is_mlflow_and_wandb_offline():
    track = readme_track()
    assert set(track) == {"mlflow", "wandb"} and track["wandb"]["mode"] == "offline"
    cfg = C.load_dict({"search": {"track": track}})
    assert cfg.search.track.mlflow.experiment is None and cfg.search.track.wandb.mode == "offline"


@pytest.mark.slow   # ~60 s: Ray, the server and W&B's logging actors (2 per trial) on 2 cores
def test_search_logs_every_trial_as_an_mlflow_run_nested_under_the_search(tracked):
    from mlflow.tracking import MlflowClient
    assert tracked.ok and len(tracked.df) == 4
    assert f"mlflow: experiment 'tracked', run 'tracked' with 4 trial runs: {tracked.url}/#/experiments/" in tracked.out
    assert "search.track" not in tracked.err and "View run" not in tracked.out   # no tracker warning, no MLflow chatter
    client = MlflowClient(tracking_uri=tracked.url)
    exp = client.get_experiment_by_name("tracked")        # default experiment: the search's name
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("gatetune.role") == "search"]
    assert parent.info.run_name == "tracked" and parent.info.status == "FINISHED"
    assert parent.data.tags["run_folder"] == tracked.run_dir
    assert parent.data.metrics["trials"] == 4 and parent.data.metrics["best_top1"] == pytest.approx(
        tracked.df[tracked.df.status == "completed"]["top1"].max())
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"report.csv", "report.md", "pareto.png"}
    children = {r.data.tags["trial_id"]: r for r in runs if r.data.tags.get("gatetune.role") == "trial"}
    assert set(children) == set(tracked.df["trial_id"])
    for row in tracked.df.itertuples():
        run = children[row.trial_id]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.run_name == f"trial_{row.trial_id}" and run.info.status == "FINISHED"
        params = sampled(tracked.run_dir, row.trial_id)
        assert set(params) == {"gating.density", "gating.weight", "gating.gate", "gating.trainable",
                               "train.optimizer.lr"}
        assert run.data.params == {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
        history = client.get_metric_history(run.info.run_id, "top1")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, int(row.epochs) + 1))
        assert max(history, key=lambda m: m.step).value == pytest.approx(row.top1)
        assert len(client.get_metric_history(run.info.run_id, "density")) == row.epochs
        assert {"top5", "loss", "gate_loss", "macs_ratio", "lr", "density/conv1"} <= set(run.data.metrics)
        assert "gate_health" not in run.data.metrics and "node" not in run.data.metrics   # text: not a metric
        tags = run.data.tags
        assert tags["status"] == row.status and tags["gate_health"] == row.gate_health
        assert tags["pareto"] == ("true" if row.pareto else "false")
        assert tags["checkpoint"] == os.path.join(tracked.run_dir, row.checkpoint)
        assert os.path.isdir(tags["checkpoint"])
    assert set(tracked.df["status"]) <= {"completed", "stopped"} and tracked.df["pareto"].any()


def wandb_records(path: str):
    """The records of a W&B .wandb file (its LevelDB-style log of protobuf records; the Python SDK no longer
    ships a reader): blocks of 32 KiB, each record a 7-byte header (crc32, length, type) and its bytes."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, block = Path(path).read_bytes(), 32768
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, path
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):   # the block's padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk   # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def wandb_run(folders: list[str]) -> SimpleNamespace:
    """What the offline run folders of one run id say: run records (config, group), history rows, summary."""
    runs, history, summary = [], [], {}
    for folder in sorted(folders):   # by start time: the trial's run, then the end fields' resume
        for rec in wandb_records(glob.glob(os.path.join(folder, "*.wandb"))[0]):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                runs.append(rec.run)
            elif kind == "history":
                history.append({".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item})
            elif kind == "summary":
                summary.update({".".join(u.nested_key) or u.key: json.loads(u.value_json) for u in rec.summary.update})
    return SimpleNamespace(runs=runs, history=history, summary=summary)


@pytest.mark.slow   # ~60 s: Ray, the server and W&B's logging actors (2 per trial) on 2 cores
def test_search_logs_every_trial_as_a_wandb_offline_run(tracked):
    assert f"wandb: 4 trial runs (offline): `wandb sync {tracked.wb}/wandb/offline-run-*` sends them" in tracked.out
    for row in tracked.df.itertuples():
        folders = glob.glob(str(tracked.wb / "wandb" / f"offline-run-*-{row.trial_id}"))
        assert len(folders) == 2, folders   # the trial's run, then the end fields (resume)
        run = wandb_run(folders)
        first = run.runs[0]
        assert first.run_id == row.trial_id and first.project == tracked.project and first.run_group == "tracked"
        config = {u.key: json.loads(u.value_json) for u in first.config.update}
        for key, value in sampled(tracked.run_dir, row.trial_id).items():
            assert config[key] == value
        assert [h["epoch"] for h in run.history] == [float(e) for e in range(1, int(row.epochs) + 1)]
        assert [h["_step"] for h in run.history] == list(range(1, int(row.epochs) + 1))
        assert run.history[-1]["top1"] == pytest.approx(row.top1)
        assert any(r.resume for r in run.runs[1:])
        assert run.summary["status"] == row.status and run.summary["pareto"] == bool(row.pareto)
        assert run.summary["gate_health"] == row.gate_health
        assert run.summary["checkpoint"] == os.path.join(tracked.run_dir, row.checkpoint)


@pytest.mark.slow   # ~60 s: Ray, the server and W&B's logging actors (2 per trial) on 2 cores
def test_tuner_pkl_holds_the_trackers_as_their_settings(tracked):
    """`gatetune resume` gets the callbacks back from tuner.pkl; they must unpickle without a live client."""
    import ray.cloudpickle
    from gatetune.tuning.search.track_mlflow import MLflowTrials
    from gatetune.tuning.search.track_wandb import WandbTrials
    state = ray.cloudpickle.loads(Path(tracked.run_dir, "tuner.pkl").read_bytes())
    cbs = state["_run_config"].callbacks
    (m,) = [c for c in cbs if isinstance(c, MLflowTrials)]
    (w,) = [c for c in cbs if isinstance(c, WandbTrials)]
    assert (m.tracking_uri, m.experiment_name, m.search, m.run_dir) == (tracked.url, "tracked", "tracked",
                                                                        tracked.run_dir)
    assert (w.project, w.mode, w.group, w.dir) == (tracked.project, "offline", "tracked", str(tracked.wb))
    for cb in (m, w):
        again = pickle.loads(pickle.dumps(cb))   # plain pickle too: no module, client or actor inside
        assert type(again) is type(cb) and again.__reduce__() == cb.__reduce__()


class FakeTrial:
    """What the tracker callbacks read of a Ray Tune Trial (hashable by identity, as Trial is)."""

    def __init__(self, trial_id: str, config: dict):
        self.trial_id, self.config = trial_id, config


def result(epoch: int, top1: float) -> dict:
    return {"epoch": float(epoch), "top1": top1, "density": 0.5, "density/conv5": 0.5, "node": "vm",
            "gate_health": "ok", "diverged": False, "training_iteration": epoch, "time_this_iter_s": 1.0}


def test_mlflow_callback_nests_the_trials_and_a_resumed_search_logs_into_the_same_runs(mlflow_proc, tmp_path, capsys):
    """The callback as Tune drives it (setup, trial start / result / end), against the real server, then pickled
    (tuner.pkl) and set up again as `gatetune resume` does: the same parent run, the same trial runs."""
    import pandas as pd
    from mlflow.tracking import MlflowClient
    from gatetune.tuning.search import track
    url = wait_for(mlflow_proc)
    plan = SimpleNamespace(cfg=C.load(QUICK, ["name=direct", override({"mlflow": {"tracking_uri": url,
                                                                                   "experiment": "direct-exp"}})]))
    run_dir = str(tmp_path / "direct")
    (cb,) = track.callbacks(plan, run_dir)
    params = {"gating.density": 0.5, "gating.gate": ["conv5", "conv6"]}
    cb.setup()
    cb.on_trial_start(0, [], a := FakeTrial("aaaa0001", params))
    cb.on_trial_result(1, [], a, result(1, 50.0))
    cb = pickle.loads(pickle.dumps(cb))   # the driver died; `gatetune resume` unpickles tuner.pkl
    cb.setup()
    cb.on_trial_start(0, [], a := FakeTrial("aaaa0001", params))   # Ray's Trial objects are new too
    cb.on_trial_result(2, [], a, result(2, 60.0))
    cb.on_trial_complete(2, [], a)
    cb.on_trial_start(2, [], b := FakeTrial("bbbb0002", {**T.config_params(params), "seed": 1, T.CONFIRMS: "aaaa0001"}))
    cb.on_trial_error(2, [], b)
    df = pd.DataFrame([{"trial_id": "aaaa0001", "status": "completed", "stopped_by": "", "gate_health": "ok",
                        "pareto": True, "checkpoint": "trial_aaaa0001/checkpoint_000001", "top1": 60.0},
                       {"trial_id": "bbbb0002", "status": "error", "stopped_by": float("nan"), "gate_health": float("nan"),
                        "pareto": False, "checkpoint": "", "top1": float("nan")}])
    track.finish(plan, run_dir, df)
    out, err = capsys.readouterr()
    assert "mlflow: experiment 'direct-exp', run 'direct' with 2 trial runs" in out and not err
    client = MlflowClient(tracking_uri=url)
    runs = client.search_runs([client.get_experiment_by_name("direct-exp").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("gatetune.role") == "search"]
    kids = {r.data.tags["trial_id"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(runs) == 3 and set(kids) == {"aaaa0001", "bbbb0002"} and parent.info.status == "FINISHED"
    a_run, b_run = kids["aaaa0001"], kids["bbbb0002"]
    assert a_run.data.params == {"gating.density": "0.5", "gating.gate": '["conv5", "conv6"]'}
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(a_run.info.run_id, "top1"),
                                              key=lambda m: m.step)] == [(1, 50.0), (2, 60.0)]
    assert set(a_run.data.metrics) == {"epoch", "top1", "density", "density/conv5"}   # numbers, not Ray's keys
    assert a_run.info.status == "FINISHED" and b_run.info.status == "FAILED"
    assert {k: a_run.data.tags[k] for k in ("status", "gate_health", "pareto", "checkpoint", "stopped_by")} == {
        "status": "completed", "gate_health": "ok", "pareto": "true", "stopped_by": "",
        "checkpoint": os.path.join(run_dir, "trial_aaaa0001/checkpoint_000001")}
    assert b_run.data.params["seed"] == "1" and b_run.data.tags[T.CONFIRMS] == "aaaa0001"
    assert (b_run.data.tags["status"], b_run.data.tags["pareto"], b_run.data.tags["checkpoint"]) == ("error", "false", "")
    assert parent.data.metrics["trials"] == 2 and parent.data.metrics["error"] == 1


def test_a_tracker_that_fails_is_a_warning_line_never_an_error(tmp_path, capsys):
    from gatetune.tuning.search import track
    dead = f"http://127.0.0.1:{free_port()}"
    plan = SimpleNamespace(cfg=C.load_dict({"name": "dead", "search": {"track": {"mlflow": {"tracking_uri": dead}}}}))
    (cb,) = track.callbacks(plan, str(tmp_path))
    cb.setup()   # the server went away after the check before the search
    cb.on_trial_start(0, [], a := FakeTrial("aaaa0001", {"gating.density": 0.5}))
    cb.on_trial_result(1, [], a, result(1, 50.0))
    cb.on_trial_complete(1, [], a)
    import pandas as pd
    track.finish(plan, str(tmp_path), pd.DataFrame([{"trial_id": "aaaa0001", "status": "completed"}]))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 2 and not out, lines
    assert lines[0].startswith("warning: search.track.mlflow: setting up the experiment failed (")
    assert lines[0].endswith("; not logging to it for the rest of this search") and cb.off
    assert lines[1].startswith("warning: search.track.mlflow: the trials' end fields (status, gate_health, pareto, "
                               "checkpoint) were not written (") and lines[1].endswith("the report is complete")


def test_train_logs_one_run_to_mlflow_and_wandb_and_continues_it(tmp_path, one_thread):
    from mlflow.tracking import MlflowClient
    from gatetune.tuning.train.run import train_run
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    track = {"mlflow": {"tracking_uri": uri, "experiment": "digits-runs"}, "wandb": {"project": "p", "mode": "offline"}}
    out = tmp_path / "run"
    cfg = C.load(DIGITS, ["train.epochs=2", override(track)])
    train_run(cfg, out, progress=False)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("digits-runs")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "digits" and run.info.status == "FINISHED"
    assert run.data.params["gating.density"] == "0.5" and run.data.params["model.name"] == "digitnet"
    assert not any(k.startswith(("search.", "space")) for k in run.data.params)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "top1")] == [1, 2]
    assert run.data.tags["status"] == "completed" and run.data.tags["gate_health"] in ("ok", "static", "collapsed")
    assert run.data.tags["checkpoint"] == str(out.resolve() / "checkpoints" / "epoch_002.pt")
    (folder,) = glob.glob(str(out / "wandb" / "offline-run-*"))   # W&B's default dir: the run folder
    wb = wandb_run([folder])
    assert [h["epoch"] for h in wb.history] == [1.0, 2.0] and wb.summary["status"] == "completed"
    # the same command with one more epoch: the same MLflow run goes on
    train_run(C.load(DIGITS, ["train.epochs=3", override(track)]), out, progress=False)
    (again,) = client.search_runs([exp.experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "top1")] == [1, 2, 3]
    assert again.data.tags["checkpoint"].endswith("epoch_003.pt")


# --- one-line errors before any work

def load_with(tmp_path, track: dict):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"_import": QUICK, "search": {"track": track}}))
    return C.load(str(path)), str(path)


def one_line_error(tmp_path, track: dict) -> str:
    with pytest.raises(UserError) as e:
        load_with(tmp_path, track)
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(tmp_path / "s.yaml") + ": search.track.")
    return text


def test_an_mlflow_server_that_does_not_answer_is_one_line(tmp_path):
    port = free_port()   # nothing listens there
    started = time.time()
    text = one_line_error(tmp_path, {"mlflow": {"tracking_uri": f"http://127.0.0.1:{port}"}})
    assert time.time() - started < 10
    assert f"search.track.mlflow.tracking_uri: MLflow tracking server http://127.0.0.1:{port} does not answer" in text
    assert "mlflow server" in text
    text = one_line_error(tmp_path, {"mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/nowhere/mlflow.db"}})
    assert "search.track.mlflow.tracking_uri: the folder of the MLflow database" in text


@pytest.mark.parametrize("package, track", [("mlflow", {"mlflow": {"tracking_uri": "sqlite:///mlflow.db"}}),
                                            ("wandb", {"wandb": {"project": "p", "mode": "offline"}})])
def test_a_missing_tracker_package_is_one_line(tmp_path, monkeypatch, package, track):
    monkeypatch.setitem(sys.modules, package, None)   # `import mlflow` fails as when it is not installed
    text = one_line_error(tmp_path, track)
    assert text.endswith(f"search.track.{package}: needs the {package} package: pip install 'gatetune[{package}]'")


def test_wandb_online_without_an_api_key_is_one_line_suggesting_offline(tmp_path, monkeypatch, capsys):
    from gatetune.tuning.cli import main
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))   # no `wandb login` either
    text = one_line_error(tmp_path, {"wandb": {"project": "p"}})   # mode: online is the default
    assert "search.track.wandb.mode: W&B online mode needs an API key" in text and "mode: offline" in text
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    cfg, _ = load_with(tmp_path, {"wandb": {"project": "p"}})   # logged in: fine
    assert cfg.search.track.wandb.mode == "online"
    (tmp_path / "netrc").unlink()
    assert main(["train", str(tmp_path / "s.yaml")]) == 2   # `gatetune train` checks search.track too
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mode: offline" in err


def test_an_unknown_tracker_key_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"search.track.mlflow.tracking_url: unknown key 'tracking_url'; did you mean "
                                        r"'tracking_uri'\?"):
        load_with(tmp_path, {"mlflow": {"tracking_url": "http://x"}})
    with pytest.raises(UserError, match=r"search.track.wandb.mode: 'offlne' is not one of"):
        load_with(tmp_path, {"wandb": {"project": "p", "mode": "offlne"}})
