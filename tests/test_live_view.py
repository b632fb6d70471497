"""Watching a search: progress inside an epoch (train.fit's on_progress, a trial's TrialProgress), the live
view drawn in place on a pseudo-terminal, and today's plain lines when the output is not a terminal."""
import fcntl
import io
import os
import pickle
import pty
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from gatetune.tuning import config as C
from gatetune.tuning.search import live
from gatetune.tuning.search.console import Console, ended_line
from gatetune.tuning.search.view import View, duration
from gatetune.tuning.train.loop import fit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "search_spaces", "quickstart.yaml")
DIGITS = os.path.join(ROOT, "search_spaces", "digits.yaml")
GATETUNE = os.path.join(ROOT, ".venv", "bin", "gatetune")


def test_fit_tells_its_progress_inside_an_epoch_without_changing_its_epochs(monkeypatch, one_thread):
    monkeypatch.setenv("GATETUNE_PROGRESS_S", "0.05")
    cfg = C.load(DIGITS, ["train.epochs=2", "train.batch_size=16", "gating.density=0.5"])
    ticks, epochs = [], []
    fit(cfg, lambda m, s: epochs.append(m), on_progress=ticks.append)
    assert [m["epoch"] for m in epochs] == [1.0, 2.0]   # one result per epoch, as without on_progress
    assert len(ticks) >= 4, ticks
    inside = [t for t in ticks if t["epoch"] < 1]
    assert len(inside) >= 2 and all(0 < t["epoch"] < 1 and t["epoch"] != int(t["epoch"]) for t in inside)
    assert [t["epoch"] for t in ticks] == sorted(t["epoch"] for t in ticks)   # moves forward only
    assert all(t["images_per_s"] > 0 and t["epoch_s"] > t["epoch_left_s"] >= 0 for t in ticks)
    lefts = [t["epoch_left_s"] for t in inside]
    assert lefts[-1] < lefts[0]


class _Board:
    def __init__(self):
        self.got = []
        self.update = SimpleNamespace(remote=lambda trial_id, info: self.got.append((trial_id, info)))


class _Gauges:
    def __init__(self):
        self.got = []

    def progress(self, info):
        self.got.append(info)


def test_trial_progress_feeds_board_and_gauges_each_time_and_the_log_every_few_seconds():
    board, gauges, log = _Board(), _Gauges(), io.StringIO()
    p = live.TrialProgress("9aa2fbe5", 8, gauges, board, log_s=60, stream=log)
    for e in (2.1, 2.2, 2.3):
        p({"epoch": e, "images_per_s": 431.4, "epoch_left_s": 12.2, "epoch_s": 20})
    assert [i["epoch"] for i in gauges.got] == [2.1, 2.2, 2.3] and [t for t, _ in board.got] == ["9aa2fbe5"] * 3
    assert log.getvalue() == "[9aa2fbe5] epoch:  2.10/8 | 431 img/s | epoch ends in 12 s\n"   # once per log_s


def test_trial_gauges_take_the_fractional_epoch_and_live_rate_and_keep_the_rest(ray_local):
    g = live.TrialGauges("live-test", "t1")
    try:
        g.set({"epoch": 2.0, "top1": 97.5, "images_per_s": 400.0, "node": "vm"})
        g.progress({"epoch": 2.37, "images_per_s": 431.0, "epoch_left_s": 9.0})
        assert g.last == {"epoch": 2.37, "top1": 97.5, "images_per_s": 431.0}
    finally:
        g.stop()


def test_a_trial_finds_its_search_board_only_where_the_driver_draws_one_and_logs_no_failed_lookup(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def trial(run):
        board = live.find_board(run)
        if board is None:
            return None
        ray.get(board.update.remote("t1", {"epoch": 1.5}))
        return "found"

    assert ray.get(trial.remote("no-view")) is None
    board = live.start_board("with-view")
    assert ray.get(trial.remote("with-view")) == "found"
    assert ray.get(board.snapshot.remote())["t1"]["epoch"] == 1.5
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    noisy = [p.name for p in logs.glob("python-core-worker-*.log")
             if "Failed to look up actor" in p.read_text("utf-8", "replace")]
    assert not noisy, noisy


def _trial(tid, status, config, last=None):
    return SimpleNamespace(trial_id=tid, status=status, config=config, last_result=last)


def _render(view, trials, progress, now):
    from rich.console import Console as RichConsole
    out = RichConsole(record=True, width=160, file=io.StringIO())
    out.print(view.render(trials, progress, now=now))
    return out.export_text()


def test_view_shows_running_trials_counts_best_per_bucket_and_the_expected_end():
    base = C.to_dict(C.load(QUICK, ["train.epochs=8"]))
    done = {"epoch": 8.0, "top1": 98.5, "density": 0.5, "time_this_iter_s": 10.0}
    trials = [_trial("aaaa0001", "RUNNING", {"gating.density": 0.5, "gating.gate": "all"},
                     {"epoch": 2.0, "top1": 97.2, "density": 0.51, "images_per_s": 400.0, "time_this_iter_s": 10.0}),
              _trial("aaaa0002", "TERMINATED", {"gating.density": 0.5}, done),
              _trial("aaaa0003", "TERMINATED", {"gating.density": 0.25}, {**done, "epoch": 2.0, "top1": 90.0}),
              _trial("aaaa0004", "ERROR", {"gating.density": 1.0}, None),
              _trial("aaaa0005", "PENDING", {"gating.density": 1.0})]
    view = View("q", base, expected=8, buckets=[0.25, 0.5, 0.75, 1.0], concurrency=2)
    now = 1000.0
    text = _render(view, trials, {"aaaa0001": {"epoch": 2.37, "images_per_s": 431.0, "epoch_left_s": 6.0,
                                               "epoch_s": 10.0, "at": now - 1}}, now)
    assert "1 running, 1 completed, 1 stopped, 0 diverged, 1 failed, 4 pending" in text   # 1 + 3 not proposed yet
    assert "best top-1 by density: 0.25 90.00% | 0.5 98.50%" in text
    row = next(line for line in text.splitlines() if line.startswith("aaaa0001"))
    assert re.search(r"d=0\.50 gate=all\s+2\.37/8\s+97\.20%\s+51\.0%\s+431\s+55s", row), row   # 5 s + 5 epochs
    # (55 s left + 4 trials x 8 epochs x 10 s) / 2 at once
    assert f"(in {duration((55 + 4 * 80) / 2)};" in text
    # between two results without news from the trial: its last epoch, its last rate
    text = _render(view, trials, {}, now)
    assert re.search(r"aaaa0001 .*2\.00/8 .*400 .*1m00s", text), text


def test_console_pickles_without_its_live_objects_and_an_old_one_loads():
    c = Console(8, run="q", base={}, expected=3, buckets=(0.5,), concurrency=2, interactive=False)
    c.setup()
    c._live = object()   # what a terminal's setup holds: never pickled
    back = pickle.loads(pickle.dumps(c))
    assert back._live is None and back.run == "q" and back.expected == 3
    old = Console.__new__(Console)
    old.__dict__.update(epochs=8)   # a Console pickled before the live view
    assert old.base is None and old.interactive is None and old._live is None


def test_ended_line_names_the_status_settings_and_last_epoch():
    assert ended_line("9aa2fbe5", {"gating.density": 0.5, "gating.gate": "all"}, "stopped",
                      {"epoch": 2.0, "top1": 97.25, "density": 0.502}, 8.0) == \
        "9aa2fbe5 stopped d=0.50 gate=all: top-1 97.25% at epoch 2/8, density 50.2%"


def _run_on_a_terminal(cmd, env, timeout=300) -> tuple[int, str]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    p = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out, deadline = b"", time.time() + timeout
    try:
        while time.time() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:   # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif p.poll() is not None:
                break
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        os.close(master)
    return p.returncode, out.decode("utf-8", "replace")


def test_live_view_redraws_in_place_and_moves_inside_an_epoch_on_a_terminal(tmp_path):
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "GATETUNE_PROGRESS_S": "0.2"}
    rc, out = _run_on_a_terminal([GATETUNE, "search", QUICK, "train.epochs=2", "search.num_samples=3",
                                  "--storage", str(tmp_path), "--name", "live"], env)
    assert rc == 0, out[-3000:]
    assert "\x1b[1A\x1b[2K" in out   # the table is redrawn in place: cursor up, erase line
    assert re.search(r"search live \| \d running, \d completed", out)
    rows = re.findall(r"\n([0-9a-f]{8}) +d=\S+ .*? (\d+\.\d\d)/2 ", out.replace("\r", ""))
    within = {}
    for tid, e in rows:   # the fraction of the first epoch, between the trial's start and its first result
        if 0 < float(e) < 1:
            within.setdefault(tid, set()).add(e)
    assert any(len(v) >= 2 for v in within.values()), rows
    ended = re.findall(r"([0-9a-f]{8}) (completed|stopped|diverged) d=", out)
    assert len({t for t, _ in ended}) == 3, ended                              # one line per ended trial
    assert "epoch:  1.00/2 | gate.loss:" not in out                           # no per-result lines on a terminal
    tail = out[out.index("search finished"):]
    assert "| network " in tail and "\x1b[2K" not in tail                     # the end-of-search table as before
