"""tuning/search/outage.py without a network: the trial's bounded retry, the driver's watch and its stop,
and Ray's storage tracebacks made one line (tests/test_s3_outage.py takes a real S3 server away)."""
import logging
import pickle

import pytest

from gatetune.core.errors import UserError
from gatetune.tuning.search import outage


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.now += s


def test_retry_waits_out_an_outage_and_says_when_it_starts_and_ends():
    clock, said, calls = Clock(), [], []

    def upload():
        calls.append(clock.now)
        if clock.now < 20:
            raise OSError("Could not connect to server")
        return "stored"

    assert outage.retry("[t1] epoch 2 checkpoint", upload, timeout_s=60, say=said.append, sleep=clock.sleep,
                        clock=clock) == "stored"
    assert calls == [0, 1, 3, 7, 15, 25]                     # 1, 2, 4, 8, then at most MAX_DELAY_S apart
    assert len(said) == 2 and "does not answer (Could not connect to server)" in said[0] and "60 s" in said[0]
    assert said[1] == "[t1] epoch 2 checkpoint: the storage answers again after 25 s"


def test_retry_gives_up_after_its_bound_with_one_line():
    clock, said = Clock(), []

    def upload():
        raise OSError("Could not connect to server")

    with pytest.raises(outage.StorageUnreachable, match="did not answer for 30 s"):
        outage.retry("[t1] epoch 2 checkpoint", upload, timeout_s=30, say=said.append, sleep=clock.sleep, clock=clock)
    assert clock.now == 30 and len(said) == 2 and "previous checkpoint is the last one stored" in said[1]


def test_retry_lets_other_errors_through_at_once():
    def bad():
        raise ValueError("not storage")

    with pytest.raises(ValueError):
        outage.retry("x", bad, timeout_s=30, say=lambda line: None, sleep=lambda s: pytest.fail("slept"))


class Store:
    """A RunStore stand-in whose exists() fails while `down`."""

    def __init__(self):
        self.down = False

    def exists(self, rel=""):
        if self.down:
            raise OSError("AWS Error NETWORK_CONNECTION during HeadObject operation")
        return True

    def __str__(self):
        return "s3://bucket/runs/r"


def test_watch_says_when_the_store_goes_and_comes_back_and_stops_the_search_past_its_bound(monkeypatch):
    clock, said, store = Clock(), [], Store()
    monkeypatch.setattr(outage.time, "monotonic", clock)
    watch = outage.StorageWatch(store, timeout_s=60, every_s=3600, say=said.append)
    watch.probe()
    assert said == [] and not outage.STORE_AWAY.is_set()
    store.down = True
    watch.probe()
    clock.now = 30
    watch.probe()                                            # still away: said once
    assert len(said) == 1 and "does not answer" in said[0] and outage.STORE_AWAY.is_set()
    watch.on_step_begin(0, [])                               # 30 s < 60 s: the search goes on
    store.down = False
    clock.now = 40
    watch.probe()
    assert said[1] == "storage: s3://bucket/runs/r answers again after 40 s" and not outage.STORE_AWAY.is_set()
    store.down = True
    watch.probe()
    clock.now = 101
    with pytest.raises(UserError) as e:
        watch.on_step_begin(1, [])
    assert str(e.value).startswith("s3://bucket/runs/r: the run folder's storage has not answered for 61 s")
    assert "`gatetune resume s3://bucket/runs/r`" in str(e.value) and "\n" not in str(e.value)
    watch.on_experiment_end([])
    assert not outage.STORE_AWAY.is_set()


def test_watch_pickles_without_its_thread():
    watch = outage.StorageWatch(Store(), timeout_s=60, every_s=3600)
    watch.on_step_begin(0, [])
    assert watch._thread is not None
    copy = pickle.loads(pickle.dumps(watch))
    assert copy._thread is None and copy.down_since is None and copy.timeout_s == 60
    watch.on_experiment_end([])


def _record(msg, exc=None):
    exc_info = (type(exc), exc, None) if exc else None
    return logging.LogRecord("ray.tune.execution.experiment_state", logging.ERROR, __file__, 1, msg, (), exc_info)


def test_ray_storage_errors_become_one_line_a_minute_and_none_while_the_watch_said_so(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(outage.time, "monotonic", clock)
    f = outage.QuietStorageErrors(every_s=60)
    assert f.filter(_record("something else"))
    r = _record("Saving experiment state to storage at 's3://b/r' failed with exception: ", OSError("refused\nmore"))
    assert f.filter(r) and r.exc_info is None and r.getMessage().endswith("failed with exception:  refused")
    clock.now = 30
    assert not f.filter(_record("Caught exception when creating directory at x:", OSError("refused")))
    clock.now = 100
    synced = _record("Last sync command failed with the following error:\nTraceback ...\n  File x\nOSError: refused\n")
    assert f.filter(synced) and synced.getMessage() == "Last sync command failed with the following error: OSError: refused"
    clock.now = 200
    outage.STORE_AWAY.set()
    try:
        assert not f.filter(_record("Caught exception when creating directory at x:", OSError("refused")))
    finally:
        outage.STORE_AWAY.clear()
