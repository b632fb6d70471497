"""The chaos soak (slow): bench/chaos.py's `chaos` and `driver` scenarios on one loopback cluster (a `ray start`
head and two worker nodes): 100 trials with ASHA while a random worker node is SIGKILLed every 15-30 s and
started again, then the same with the driver SIGKILLed once and `gatetune resume`. Every invariant the
script checks must hold (chaos.check: each trial ends once, no epoch lost, at most one repeated per failure,
the Optuna study's states equal the report's statuses, every checkpoint readable)."""
import pytest

import chaos
from loopback import LoopbackCluster

TRIALS = 100
# tiny trials (16x16 fake images, 16 steps an epoch) so the two scenarios fit CI's time, yet last the two kills
# (15-30 s apart) the test asks for on a fast machine (8 steps: 61 s, 2 kills); 4 epochs give ASHA rungs at 1, 2
# and 4. `python bench/chaos.py` runs the quickstart's digits.
TINY = ("data={dataset: fake, image_size: 16, fake_train: 512, fake_val: 64, augment: false}", "train.batch_size=32")


@pytest.fixture(scope="module")
def cluster():
    c = LoopbackCluster(workers=2)
    yield c
    c.stop()


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["chaos", "driver"])
@pytest.mark.timeout(900)
def test_search_under_chaos_ends_every_trial_once_with_nothing_lost(cluster, tmp_path, scenario):
    r = chaos.run(cluster, tmp_path, scenario, TRIALS, epochs=4, overrides=TINY)
    print(chaos.line(r))
    assert not r["problems"], "\n".join(r["problems"][:20]) + f"\n(see {r['log']})"
    assert r["trials"] == TRIALS, chaos.line(r)
    assert r["kills"] >= max(2, r["wall_s"] // 30), "the chaos loop fell behind its 15-30 s: " + chaos.line(r)
    assert r["stopped"] >= 10, "ASHA stopped too few trials to be part of the test: " + chaos.line(r)
    assert r["retries"] >= 1, "no kill hit a running trial: " + chaos.line(r)
    assert r["driver_kills"] == (scenario == "driver")


def test_check_finds_a_lost_epoch_a_repeat_too_many_and_an_unreadable_checkpoint(tmp_path):
    """chaos.check on a made-up run folder: it must be able to fail."""
    import json
    run = tmp_path / "r"
    (run / "trial_a" / "checkpoint_000001").mkdir(parents=True)
    (run / "trial_a" / "checkpoint_000001" / "state.pt").write_bytes(b"not a checkpoint")
    (run / "trial_a" / "result.json").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1.0, 1.0, 3.0)))
    (run / "report.csv").write_text("trial_id,status,epochs\na,completed,3\n")
    (run / "experiment_state-2026.json").write_text(json.dumps(
        {"trial_data": [[json.dumps({"trial_id": "a"}), json.dumps({"num_failures": 0})]]}))
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="r", storage=f"sqlite:///{run / 'optuna.db'}")
    t = study.ask()
    t.set_user_attr("trial_id", "a")
    study.tell(t, state=optuna.trial.TrialState.PRUNED)
    figures, problems = chaos.check(run, trials=1)
    text = "\n".join(problems)
    assert "epochs [1.0, 3.0] in result.json, the report says 3" in text
    assert "1 epochs repeated after 0 failures" in text
    assert "checkpoint_000001 unreadable" in text
    assert "Optuna states differ from the report: a: PRUNED for completed" in text
    assert figures["repeated"] == 1 and figures["retries"] == 0
