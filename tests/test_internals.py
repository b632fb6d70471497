"""Ray and torch internals gatetune still relies on. pyproject pins Ray to the minor version these pass
with; when an upgrade changes one of them, its test fails with a message naming it and where it is used."""
import inspect
import json
import os

import pytest


def test_ray_is_the_pinned_minor_version():
    import ray
    assert ray.__version__.startswith("2.60."), (
        f"Ray {ray.__version__}: gatetune is tested with 2.60 (pyproject pins ray==2.60.*); re-run "
        "tests/test_internals.py and the slow suite before widening the pin")


def test_experiment_state_json_format(tmp_path, ray_local):
    """results/_collect.py reads trial status from <run>/experiment_state-*.json (Ray's internal format):
    {"trial_data": [[trial_json, run_metadata_json], ...]}, the trial JSON with trial_id, status,
    relative_logdir, config."""
    from ray import tune

    def trainable(config):
        tune.report({"epoch": 1.0, "top1": config["x"]})

    tune.Tuner(trainable, param_space={"x": tune.grid_search([1.0, 2.0])},
               run_config=tune.RunConfig(name="s", storage_path=str(tmp_path), verbose=0)).fit()
    (state,) = (tmp_path / "s").glob("experiment_state-*.json")
    data = json.loads(state.read_text())
    msg = "Ray's experiment_state-*.json changed: update results/_collect.py (read_state)"
    assert isinstance(data.get("trial_data"), list) and len(data["trial_data"]) == 2, msg
    for entry in data["trial_data"]:
        trial = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
        assert {"trial_id", "status", "relative_logdir", "config"} <= set(trial), msg
        assert trial["status"] == "TERMINATED" and set(trial["config"]) == {"x"}, msg


def test_asha_public_methods_the_schedulers_delegate_to():
    """tuning/search/schedulers.py subclasses ASHAScheduler and FIFOScheduler through their public methods."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    for cls, names in ((ASHAScheduler, ("on_trial_add", "on_trial_result", "on_trial_complete", "on_trial_remove",
                                        "set_search_properties", "debug_string")),
                       (FIFOScheduler, ("choose_trial_to_run", "on_trial_error"))):
        missing = [n for n in names if not callable(getattr(cls, n, None))]
        assert not missing, f"{cls.__name__} lost {missing}: update tuning/search/schedulers.py"
    params = inspect.signature(ASHAScheduler.__init__).parameters
    assert {"time_attr", "metric", "mode", "max_t", "grace_period", "reduction_factor"} <= set(params), \
        "ASHAScheduler's constructor changed: update tuning/search/schedulers.py"


def test_ddp_remove_autograd_hooks():
    """tuning/train/ddp.py (_Replica) rebuilds DistributedDataParallel when a phase changes which parameters
    train, and first detaches the old wrapper with DDP._remove_autograd_hooks (private in torch)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    assert callable(getattr(DDP, "_remove_autograd_hooks", None)), (
        "torch's DistributedDataParallel._remove_autograd_hooks is gone: tuning/train/ddp.py (_Replica) needs another "
        "way to drop the old wrapper's hooks")


def test_function_trainable_mixins_and_repr():
    """tuning/search/trainable.py names each trial's actor through Ray's `__mixins__` hook of wrap_function and the
    `_name` that ImplicitFunc.__repr__ returns (the dashboard's Repr column)."""
    from ray.tune.trainable.function_trainable import wrap_function

    class Mixin:
        pass

    def fn(config):
        pass

    fn.__mixins__ = (Mixin,)
    cls = wrap_function(fn)
    assert issubclass(cls, Mixin), "Ray's wrap_function no longer honours __mixins__: update tuning/search/trainable.py"
    obj = cls.__new__(cls)
    obj._name = "trial x"
    assert repr(obj) == "trial x", "ImplicitFunc.__repr__ no longer returns _name: update tuning/search/trainable.py"


def test_actor_name_log_prefix():
    """tuning/search/trainable.py (TrialLabel.reset_config) prints `:actor_name:<label>` so Ray's log monitor
    prefixes the reused worker's next lines with the new trial's name."""
    from ray._private import ray_constants
    assert ray_constants.LOG_PREFIX_ACTOR_NAME == ":actor_name:", (
        "Ray's actor-name log prefix changed: update tuning/search/trainable.py (TrialLabel)")


_LOCAL_RAY = r"""
import json, subprocess, time
from ray._private import ray_constants, worker
from gatetune.tuning.search import cluster
cluster.start_local("127.0.0.1", {})
url = cluster.connect(None)
time.sleep(2)
node = worker._global_node
raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
children = subprocess.run(["ps", "-o", "args=", "--ppid", str(raylet)], capture_output=True, text=True).stdout
monitor = node.all_processes[ray_constants.PROCESS_TYPE_MONITOR][0].process
cluster.shutdown()
print(json.dumps({"url": url, "idle_workers": children.count("default_worker.py") + children.count("ray::IDLE"),
                  "monitor_killed": monitor.poll() is not None}))
"""


def test_local_ray_processes_cluster_py_reaches():
    """tuning/search/cluster.py, for a Ray it starts (start_local, in a thread): RAY_prestart_worker_first_driver=0
    (a switch the raylet reads: no idle worker, which no Tune trial could use, starts as the driver connects);
    shutdown() kills the autoscaler's monitor through ray._private.worker._global_node.all_processes["monitor"]
    (Popen handles) before ray.shutdown(), which would otherwise wait 1 s on it."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _LOCAL_RAY], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SIGTERM handler is not set" not in r.stderr   # start_local's filter
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["url"].startswith("http://"), out
    assert out["idle_workers"] == 0, "RAY_prestart_worker_first_driver is no longer read: update tuning/search/cluster.py"
    assert out["monitor_killed"], "Ray's process table changed: update tuning/search/cluster.py (shutdown)"


def test_snapshot_file_names():
    """tuning/search/snapshot.py (KeepState, recover) copies and restores Ray's snapshot files by name, and
    results/_collect.py reads experiment_state-*.json."""
    from ray.tune.callback import CallbackList
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.search import SearchGenerator, Searcher

    from gatetune.core import layout
    from gatetune.tuning.search.snapshot import STATE_PATTERNS
    names = [c.CKPT_FILE_TMPL.format("*") for c in (TuneController, SearchGenerator, Searcher, CallbackList)]
    assert tuple(names) == STATE_PATTERNS, f"Ray's snapshot files are now {names}: update tuning/search/snapshot.py"
    assert names[0] == layout.EXPERIMENT_STATE_GLOB


@pytest.mark.parametrize("name", ["TUNE_GLOBAL_CHECKPOINT_S", "TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE",
                                  "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "RAY_AIR_NEW_OUTPUT",
                                  "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "RAY_DEDUP_LOGS", "RAY_AUTH_MODE"])
def test_environment_switches_are_still_read(name):
    """tuning/search/cluster.py, tests/conftest.py and bench/benchlib.py set these; Ray must still read them
    (a renamed switch is silently ignored: snapshots every 10 s again, the Tune box back in the console)."""
    from pathlib import Path

    import ray
    root = Path(ray.__file__).parent
    readers = [p for sub in ("tune", "train", "air", "_private") for p in (root / sub).rglob("*.py")
               if "examples" not in p.parts and "tests" not in p.parts and name in p.read_text(errors="ignore")]
    assert readers, f"Ray {ray.__version__} no longer reads ${name}: find its new name and update tuning/search/cluster.py"


def test_wrapping_searcher_protocol():
    """tuning/search/confirm.py (ConfirmSearch wraps StudySearch): Ray's SearchGenerator saves each object with
    a `searcher` attribute through get_state() and the innermost through save_to_dir(), and restores them with
    set_state() / restore_from_dir()."""
    from ray.tune.search import SearchGenerator
    save, restore = inspect.getsource(SearchGenerator.save_to_dir), inspect.getsource(SearchGenerator.restore_from_dir)
    assert 'hasattr(searcher, "searcher")' in save and "get_state()" in save and ".save_to_dir(" in save, (
        "SearchGenerator.save_to_dir no longer walks wrapped searchers: update tuning/search/confirm.py")
    assert "set_state(" in restore and ".restore_from_dir(" in restore, (
        "SearchGenerator.restore_from_dir changed: update tuning/search/confirm.py")


def test_torch_module_internals():
    """models/inference/skip_gate.py overrides nn.Module._apply(fn, recurse) (rebuilds the kernel's view after
    .to()), models/inference/skip.py reads `_modules` to rebuild a Sequential, and skip_gate.py forces oneDNN
    with torch.mkldnn_convolution(x, w, b, padding, stride, dilation, groups)."""
    import torch
    from torch import nn
    assert list(inspect.signature(nn.Module._apply).parameters) == ["self", "fn", "recurse"], (
        "nn.Module._apply's signature changed: update models/inference/skip_gate.py (SkipGate._apply)")
    seq = nn.Sequential(nn.ReLU())
    assert isinstance(seq._modules, dict) and list(seq._modules) == ["0"]
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    out = torch.mkldnn_convolution(x, w, torch.zeros(3), (1, 1), (1, 1), (1, 1), 1)
    assert torch.allclose(out, torch.nn.functional.conv2d(x, w, padding=1), atol=1e-5), (
        "torch.mkldnn_convolution's arguments changed: update models/inference/skip_gate.py")


def test_checkpoint_index_reset_makes_a_report_retry_write_the_same_folder(tmp_path, ray_local):
    """tuning/search/outage.py report_retrying: Ray counts get_session().storage.current_checkpoint_index up
    before it uploads a reported checkpoint; setting it back before a retried tune.report makes the retry
    write the same checkpoint_<index> folder. tuning/search/trainable.py (_next_checkpoint_index) sets it to
    the highest folder number a restarted trial has, so its next checkpoint is numbered above them."""
    from ray import tune
    from ray.train._internal.session import get_session

    def trainable(config):
        storage = get_session().storage
        index = storage.current_checkpoint_index
        for value in (1.0, 2.0):
            storage.current_checkpoint_index = index
            d = tmp_path / f"c{value:g}"
            d.mkdir()
            (d / "x.txt").write_text(f"{value:g}")
            tune.report({"epoch": 1.0, "top1": value}, checkpoint=tune.Checkpoint.from_directory(str(d)))
        storage.current_checkpoint_index = 5
        tune.report({"epoch": 2.0, "top1": 3.0}, checkpoint=tune.Checkpoint.from_directory(str(tmp_path / "c2")))

    tune.Tuner(trainable, run_config=tune.RunConfig(name="ix", storage_path=str(tmp_path / "runs"), verbose=0)).fit()
    (trial,) = [d for d in (tmp_path / "runs" / "ix").iterdir() if d.is_dir()]
    folders = sorted(p.name for p in trial.glob("checkpoint_*"))
    msg = ("Ray's checkpoint index moved: update tuning/search/outage.py (report_retrying) and "
           "tuning/search/trainable.py (_next_checkpoint_index)")
    assert folders == ["checkpoint_000000", "checkpoint_000006"], msg
    assert (trial / "checkpoint_000000" / "x.txt").read_text() == "2", msg
