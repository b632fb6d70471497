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
