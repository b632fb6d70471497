"""Ray and torch internals gatetune still relies on. pyproject pins Ray to the minor version these pass
with; when an upgrade changes one of them, its test fails with a message naming it and where it is used."""
import inspect
import json

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
