"""A full disk and folders that cannot be written: a checkpoint write failing with ENOSPC stops the run
with one line naming the folder, the previous checkpoint stays intact, and the same command resumes once
space is back; a read-only --out or --storage fails before any training. A small tmpfs is used where the
machine allows it (root), else the write is patched to fail."""
import errno
import os
import subprocess
from pathlib import Path
from unittest import mock

import pytest

from gatetune.tuning.cli import main
from gatetune.results import read_report

ROOT = Path(__file__).resolve().parent.parent
DIGITS = str(ROOT / "search_spaces" / "digits.yaml")
QUICK = str(ROOT / "search_spaces" / "quickstart.yaml")
ARGS = ["train.epochs=3", "train.keep_checkpoints=2", "gating.density=0.5"]


def _mount(path: Path, *options: str) -> bool:
    """Mount a tmpfs at path (True), or False where this machine does not allow it."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _train(out: Path, capsys) -> tuple[int, str]:
    rc = main(["train", DIGITS, *ARGS, "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def test_full_disk_stops_with_one_line_and_the_same_command_resumes(tmp_path, capsys, one_thread):
    disk = tmp_path / "disk"
    mounted = _mount(disk, "size=4m")   # one 2.6 MB checkpoint fits, a second one does not
    out = disk / "run"
    try:
        if mounted:
            rc, err = _train(out, capsys)
        else:   # no tmpfs here: the second checkpoint write fails as a full disk makes it fail
            from gatetune.tuning.train import checkpoint
            real, calls = checkpoint.save_atomic, []

            def full(state, path):
                calls.append(path)
                if len(calls) == 2:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(state, path)

            with mock.patch.object(checkpoint, "save_atomic", full):
                rc, err = _train(out, capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1, err   # (nothing on stdout: --quiet)
        assert str(out / "checkpoints") in err and "No space left on device" in err and "epoch 1" in err, err
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_001.pt"]   # intact, no tmp left
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        rc, text = _train(out, capsys)
        assert rc == 0 and f"resuming {out} after epoch 1" in text, text
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_002.pt", "epoch_003.pt"]
    finally:
        if mounted:
            _umount(disk)


@pytest.mark.parametrize("command", ["train", "search"])
def test_read_only_folder_fails_before_any_training(tmp_path, capsys, command):
    ro = tmp_path / "ro"
    mounted = _mount(ro, "size=1m") and subprocess.run(["mount", "-o", "remount,ro", str(ro)]).returncode == 0
    if not mounted:
        ro.chmod(0o555)
        if os.access(ro, os.W_OK):
            pytest.skip("neither a read-only tmpfs nor a read-only folder can be made here")
    try:
        config = DIGITS if command == "train" else QUICK
        flag = "--out" if command == "train" else "--storage"
        with mock.patch("gatetune.tuning.search.cluster.connect", side_effect=AssertionError("Ray started")):
            rc = main([command, config, "train.epochs=1", flag, str(ro / "run")])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert str(ro / "run") in err and "cannot write here" in err, err
    finally:
        if mounted:
            _umount(ro)
        else:
            ro.chmod(0o755)


@pytest.mark.slow
def test_search_on_a_full_disk_stops_its_trials_and_resumes(tmp_path):
    """A search whose run folder (a 6 MB tmpfs) fills up: each trial stops with one line naming the folder in
    its worker log, the driver ends with one line, and `gatetune resume` finishes every trial once the disk
    has room again."""
    import sys

    disk = tmp_path / "disk"
    if not _mount(disk, "size=6m"):
        pytest.skip("a tmpfs cannot be mounted here (needs root)")
    gatetune = [sys.executable, "-m", "gatetune.tuning.cli"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    try:
        r = subprocess.run([*gatetune, "search", QUICK, "train.epochs=3", "search.num_samples=2", "search.max_failures=0",
                            "search.scheduler.name=fifo", "train.keep_checkpoints=1", "--storage", str(disk),
                            "--name", "full"], env=env, capture_output=True, text=True, timeout=400)
        lines = [line for line in r.stderr.splitlines() if line.startswith("gatetune search: error:")]
        errors = list((disk / "full").glob("trial_*/error.txt"))
        assert r.returncode != 0 or errors, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
        assert r.returncode in (1, 2) and (r.returncode == 1 or len(lines) == 1), r.stderr[-2000:]
        subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
        r = subprocess.run([*gatetune, "resume", str(disk / "full")], env=env, capture_output=True, text=True,
                           timeout=400)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        df = read_report(disk / "full" / "report.csv")
        assert len(df) == 2 and df["trial_id"].is_unique and (df["status"] == "completed").all(), df
    finally:
        _umount(disk)
