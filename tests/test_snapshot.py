"""The copy of Ray Tune's last complete snapshot, and its return when a full disk cut the newest one short."""
import json
import os
import pickle

import pytest

from gatetune.core.errors import UserError
from gatetune.tuning.search.snapshot import KeepState, recover

S1, S2 = "2026-11-25_10-00-00", "2026-11-25_11-30-00"


def _write(run, session, n, cut=False):
    state = json.dumps({"trial_data": [[json.dumps({"trial_id": f"t{i}"}), "{}"] for i in range(n)]}).encode()
    searcher = pickle.dumps({"n": n})
    for name, data in ((f"experiment_state-{session}.json", state), (f"searcher-state-{session}.pkl", searcher),
                       (f"search_gen_state-{session}.json", searcher)):   # Ray's .json there is a pickle
        (run / name).write_bytes(data[: len(data) // 2] if cut else data)


def _trials(run, session):
    return len(json.loads((run / f"experiment_state-{session}.json").read_text())["trial_data"])


def test_a_complete_snapshot_is_kept_and_a_cut_one_is_not(tmp_path):
    keep = KeepState(str(tmp_path))
    _write(tmp_path, S1, 3)
    keep.on_step_end(0, [])
    assert sorted(os.listdir(tmp_path / ".state")) == [f"experiment_state-{S1}.json.gz", f"search_gen_state-{S1}.json.gz",
                                                       f"searcher-state-{S1}.pkl.gz"]
    _write(tmp_path, S1, 4, cut=True)                    # the disk filled while Ray rewrote them
    keep.on_experiment_end([])
    assert recover(str(tmp_path)) is not None
    assert _trials(tmp_path, S1) == 3 and pickle.loads((tmp_path / f"searcher-state-{S1}.pkl").read_bytes()) == {"n": 3}
    assert (tmp_path / f"experiment_state-{S1}.json.cut-short").exists()   # nothing written is lost
    assert recover(str(tmp_path)) is None                 # whole now: a second resume changes nothing


def test_a_later_session_cut_short_is_set_aside_whole(tmp_path):
    keep = KeepState(str(tmp_path))
    _write(tmp_path, S1, 3)
    keep.on_experiment_end([])
    _write(tmp_path, S2, 5)                               # a resumed session: its searcher state is whole,
    (tmp_path / f"experiment_state-{S2}.json").write_bytes(b'{"trial_data": [[')   # its experiment state is not
    recover(str(tmp_path))
    assert not (tmp_path / f"searcher-state-{S2}.pkl").exists() and (tmp_path / f"searcher-state-{S2}.pkl.cut-short").exists()
    assert _trials(tmp_path, S1) == 3


def test_the_copy_is_throttled_and_renewed_when_the_snapshot_changes(tmp_path):
    keep = KeepState(str(tmp_path))
    _write(tmp_path, S1, 3)
    keep.on_step_end(0, [])
    _write(tmp_path, S1, 6)
    keep.on_step_end(1, [])                               # within a second of the last copy: not yet
    os.remove(tmp_path / f"experiment_state-{S1}.json")
    assert recover(str(tmp_path)) is None                 # no snapshot at all is Ray's to handle
    _write(tmp_path, S1, 6)
    keep.on_experiment_end([])
    _write(tmp_path, S1, 7, cut=True)
    recover(str(tmp_path))
    assert _trials(tmp_path, S1) == 6


def test_no_copy_is_one_user_error(tmp_path):
    _write(tmp_path, S1, 3, cut=True)
    with pytest.raises(UserError, match="cut short .* --name NEW"):
        recover(str(tmp_path))


def test_resume_of_a_folder_from_another_gatetune_version_is_one_line(tmp_path):
    """Ray pickles gatetune's searcher by module path: a folder whose snapshot names a module this gatetune
    does not have (written before a module moved) is refused in one line, before Ray starts, not called
    cut short."""
    import yaml

    from gatetune.core import layout
    from gatetune.tuning import config as C
    from gatetune.tuning.search import space
    from gatetune.tuning.search.run import resume_search
    quick = os.path.join(os.path.dirname(os.path.dirname(__file__)), "search_spaces", "quickstart.yaml")
    run = tmp_path / "old"
    run.mkdir()
    (run / layout.CONFIG).write_text(yaml.safe_dump(space.prepare(C.load(quick)).base, sort_keys=False))
    (run / layout.TUNER).write_bytes(b"")
    (run / f"experiment_state-{S1}.json").write_text(json.dumps({"trial_data": []}))
    (run / f"searcher-state-{S1}.pkl").write_bytes(b"\x80\x02cgatetune.tuning.searcher\nStudySearch\n.")
    with pytest.raises(UserError, match="written by another gatetune version .*gatetune.tuning.searcher") as e:
        resume_search(str(run))
    assert "\n" not in str(e.value) and (run / f"searcher-state-{S1}.pkl").is_file()


def test_trials_a_lost_driver_started_after_its_snapshot_are_found_and_left_out_of_the_report(tmp_path):
    """A driver SIGKILLed seconds after its last snapshot leaves trial folders with results that the snapshot
    does not name: the resumed search never runs them (its searcher samples others), so the report must not
    count them, and their folders stay."""
    from gatetune.core.storage import RunStore
    from gatetune.results import collect
    from gatetune.tuning.search.snapshot import leave_out, left_out
    (tmp_path / "gatetune.yaml").write_text("name: r\n")
    (tmp_path / f"experiment_state-{S1}.json").write_text(json.dumps({"trial_data": [
        [json.dumps({"trial_id": t, "status": "TERMINATED", "relative_logdir": f"trial_{t}", "config": {}}), "{}"]
        for t in ("aaaa0001", "aaaa0002")]}))
    for t, epochs in (("aaaa0001", 2), ("aaaa0002", 2), ("bbbb0009", 1), ("bbbb0008", 0)):
        (tmp_path / f"trial_{t}").mkdir()
        (tmp_path / f"trial_{t}" / "result.json").write_text(
            "".join(json.dumps({"trial_id": t, "epoch": float(e), "top1": 50.0}) + "\n" for e in range(1, epochs + 1)))
    assert sorted(left_out(RunStore(tmp_path))) == ["bbbb0008", "bbbb0009"]   # results yet or not (staging may hold them)
    assert sorted(collect(tmp_path)[0]["trial_id"]) == ["aaaa0001", "aaaa0002", "bbbb0009"]   # before the resume
    store = RunStore(tmp_path)
    assert "2 trial(s) started after the lost driver's last snapshot" in leave_out(store, left_out(store))
    assert sorted(collect(tmp_path)[0]["trial_id"]) == ["aaaa0001", "aaaa0002"]
    assert (tmp_path / "trial_bbbb0009" / "result.json").is_file()
    assert leave_out(store, left_out(store)) is None          # a second resume records nothing new
    assert (tmp_path / "decisions.jsonl").read_text().count("bbbb0009") == 1
    (tmp_path / "trial_bbbb0008" / "result.json").write_text(json.dumps({"trial_id": "bbbb0008", "epoch": 1.0}) + "\n")
    assert sorted(collect(tmp_path)[0]["trial_id"]) == ["aaaa0001", "aaaa0002"]   # results arriving later stay out


def test_the_lost_drivers_staging_folder_loses_the_left_out_trials_only(tmp_path):
    """A resumed driver on the lost one's node reuses its staging folder (Ray names it by the search's first
    start) and would upload the results the lost driver had not: clear_staging removes the left-out trials'
    folders there, and nothing else."""
    from gatetune.core.storage import RunStore
    from gatetune.tuning.search.snapshot import clear_staging
    run = tmp_path / "runs" / "q1"
    run.mkdir(parents=True)
    artifacts = tmp_path / "session" / "artifacts"
    for search in ("q1", "other"):
        for t in ("aaaa0001", "bbbb0009"):
            (artifacts / "2026-11-25_10-00-00" / search / "driver_artifacts" / f"trial_{t}").mkdir(parents=True)
    gone = clear_staging(RunStore(run), str(artifacts), ["bbbb0009"])
    assert [os.path.relpath(g, artifacts) for g in gone] == ["2026-11-25_10-00-00/q1/driver_artifacts/trial_bbbb0009"]
    assert (artifacts / "2026-11-25_10-00-00" / "q1" / "driver_artifacts" / "trial_aaaa0001").is_dir()
    assert (artifacts / "2026-11-25_10-00-00" / "other" / "driver_artifacts" / "trial_bbbb0009").is_dir()


def test_old_checkpoints_go_only_once_no_snapshot_the_run_folder_may_hold_names_them(tmp_path):
    """The run folder's experiment snapshot lags the driver (uploaded in the background, or the one before
    when the driver is lost mid-upload) and a resume restores each trial from the checkpoint it names: a
    checkpoint is deleted only once the snapshot PruneCheckpoints.LAG snapshots back named a newer one, and at
    the end down to train.keep_checkpoints."""
    from types import SimpleNamespace

    from gatetune.core.storage import RunStore
    from gatetune.tuning.search.keep import PruneCheckpoints
    prune, trial = PruneCheckpoints(RunStore(tmp_path), keep=1), SimpleNamespace(trial_id="aaaa0001")
    folder = tmp_path / "trial_aaaa0001"

    def checkpoint(n):
        (folder / f"checkpoint_{n:06d}").mkdir(parents=True)
        prune.on_checkpoint(0, [], trial, SimpleNamespace(path=str(folder / f"checkpoint_{n:06d}")))

    def left():
        return sorted(int(p.name.split("_")[1]) for p in folder.iterdir())

    checkpoint(0)
    checkpoint(1)
    assert prune.get_state() is None and left() == [0, 1]   # snapshot A names 1
    checkpoint(2)
    checkpoint(3)
    prune.get_state()                                       # snapshot B names 3; A may be all the folder has
    assert left() == [0, 1, 2, 3]
    checkpoint(4)
    prune.get_state()                                       # snapshot C: A is uploaded, below its 1 goes
    assert left() == [1, 2, 3, 4]
    prune.get_state()                                       # D: B is uploaded, below its 3 goes
    assert left() == [3, 4]
    (folder / "checkpoint_000005").mkdir()                  # an upload cut short (a full disk): never recorded
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "experiment_state-2026-01-01_00-00-00.json").write_text('{"names": 4}')
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text('{"names": 3}')
    ended = SimpleNamespace(storage=SimpleNamespace(experiment_driver_staging_path=str(staging)))
    with pytest.warns(UserWarning, match="lacks Ray's last experiment snapshot"):
        prune.on_experiment_end([ended])                    # its upload failed (a full disk): 3 is still named
    assert left() == [3, 4, 5]
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text('{"names": 4}')
    prune.on_experiment_end([ended])                        # Ray's last snapshot is in the run folder: down to keep,
    assert left() == [4, 5]                                 # counting recorded checkpoints only


def test_a_failed_trials_results_reach_the_run_folder_before_ray_restarts_it(tmp_path):
    """Ray's JSON logger restarts a trial's result.json from the run folder's copy, which lags the driver's
    by up to a snapshot: KeepResults uploads the driver's copy when the trial fails, so no epoch goes."""
    from types import SimpleNamespace

    from gatetune.core.storage import RunStore
    from gatetune.tuning.search.keep import KeepResults
    staging, run = tmp_path / "staging" / "trial_aaaa0001", tmp_path / "run"
    staging.mkdir(parents=True)
    (run / "trial_aaaa0001").mkdir(parents=True)
    lines = "".join(f'{{"epoch": {e}}}\n' for e in (1, 2, 3))
    (staging / "result.json").write_text(lines)
    (run / "trial_aaaa0001" / "result.json").write_text('{"epoch": 1}\n')   # the last snapshot's
    trial = SimpleNamespace(trial_id="aaaa0001", local_path=str(staging))
    KeepResults(RunStore(run)).on_trial_recover(0, [], trial)
    assert (run / "trial_aaaa0001" / "result.json").read_text() == lines
    KeepResults(RunStore(run)).on_trial_recover(0, [], SimpleNamespace(trial_id="b", local_path=str(tmp_path / "none")))
