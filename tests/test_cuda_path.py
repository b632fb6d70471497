"""The CUDA code path on a machine without CUDA: torch.cuda's answers monkeypatched, what gatetune then decides
(the device, each rank's placement, the device a rank sets) and the notices for device settings that would do
nothing. What only a GPU can show (NCCL, bf16 autocast, channels-last speed, a driver honouring
CUDA_VISIBLE_DEVICES) is `make bench-gpu`'s; Ray's placement of trials on GPU ids is tests/test_placement.py's."""
from __future__ import annotations

import multiprocessing
import os

import pytest
import torch
import torch.distributed as dist

from gatetune.tuning import config as C
from gatetune.tuning.cli import main
from gatetune.tuning.search.trainable import as_result, gpu_words
from gatetune.tuning.train import ddp
from gatetune.tuning.train import distributed as D
from gatetune.tuning.train.loop import pick_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "search_spaces", "digits.yaml")
QUICK = os.path.join(ROOT, "search_spaces", "quickstart.yaml")
AMP_CPU = "has no effect on CPU"
UNUSED = "trials hold GPUs they do not use"


@pytest.fixture
def cuda(monkeypatch):
    """torch.cuda says 4 GPUs are there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def test_pick_device_follows_the_grant_and_train_device(cuda):
    auto, cpu, want_cuda = (C.load(DIGITS, [f"train.device={d}"]) for d in ("auto", "cpu", "cuda"))
    assert pick_device(auto) == torch.device("cuda")                       # gatetune train on a GPU machine
    assert pick_device(auto, gpu_granted=True) == torch.device("cuda")     # a trial granted a GPU
    assert pick_device(auto, gpu_granted=False) == torch.device("cpu")     # a trial without one (Ray shows it all GPUs)
    assert pick_device(cpu, gpu_granted=True) == torch.device("cpu")       # train.device=cpu wins over the grant
    assert pick_device(want_cuda, gpu_granted=True) == torch.device("cuda")


def test_pick_device_without_cuda_trains_on_cpu_whatever_ray_granted(monkeypatch):
    """The loopback cluster's case (tests/test_placement.py): Ray grants GPU ids that no driver backs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto = C.load(DIGITS)
    assert pick_device(auto, gpu_granted=True) == pick_device(auto) == torch.device("cpu")
    assert D.world(auto, gpus_granted=2) == (1, "gloo")


@pytest.mark.parametrize("visible, backend, want", [
    ("3,1", "nccl", [("cuda:0", "3"), ("cuda:1", "1")]),    # Ray's ids for the trial: cuda:r is the r-th
    ("3,1", "gloo", [("cpu", "3"), ("cpu", "1")]),          # a CPU rank records the id cuda:r would name
    (" 2, 5 ", "nccl", [("cuda:0", "2"), ("cuda:1", "5")]),
    (None, "nccl", [("cuda:0", "0"), ("cuda:1", "1")]),     # unset: every GPU visible, cuda:r is GPU r
    (None, "gloo", [("cpu", None), ("cpu", None)]),
    ("", "gloo", [("cpu", None), ("cpu", None)]),           # set empty: no GPU visible
    ("6", "nccl", [("cuda:0", "6"), ("cuda:1", None)]),     # more ranks than ids (world() refuses that earlier)
])
def test_rank_placement(monkeypatch, visible, backend, want):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    got = [ddp.rank_placement(r, backend) for r in (0, 1)]
    assert got == [{"rank": r, "device": d, "gpu_id": g} for r, (d, g) in enumerate(want)]


class _Stop(Exception):
    pass


def test_an_nccl_rank_sends_its_placement_first_and_sets_that_device(monkeypatch):
    """ddp.worker as rank 1 of an nccl run (in a forked child, so that its die-with-parent hook stays there):
    its first message is rank_placement's record, and the device it makes current is that record's."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", seen.append)

    def init_process_group(backend, **kw):
        raise _Stop(f"{backend} set_device({seen[0]})")

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=ddp.worker, args=(1, 2, "nccl", "unused", None, None, None, False, False, os.getpid(), q))
    p.start()
    try:
        first, second = q.get(timeout=60), q.get(timeout=60)
    finally:
        p.join(30)
    assert first == ("placement", 1, {"rank": 1, "device": "cuda:1", "gpu_id": "6"})
    kind, rank, (exc, _) = second
    assert (kind, rank) == ("error", 1) and str(exc) == "nccl set_device(cuda:1)"


def test_fit_any_tells_one_process_its_placement(cuda, monkeypatch, one_thread):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    monkeypatch.setattr(D, "load_cached", lambda *a, **kw: None)
    monkeypatch.setattr(D, "fit", lambda cfg, on_epoch, **kw: {"device": kw["device"]})
    cfg = C.load(DIGITS)
    told = []
    assert D.fit_any(cfg, None, gpus=1, threads=1, cached=True, on_placement=told.append) == {"device": torch.device("cuda")}
    assert told == [[{"rank": 0, "device": "cuda:0", "gpu_id": "7"}]]
    told.clear()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")   # a trial without GPUs, CUDA_VISIBLE_DEVICES unset
    assert D.fit_any(cfg, None, gpus=0, threads=1, cached=True, on_placement=told.append) == {"device": torch.device("cpu")}
    assert told == [[{"rank": 0, "device": "cpu", "gpu_id": None}]]


def test_fit_any_hands_on_placement_to_the_ranks_supervisor(cuda, monkeypatch):
    got = {}
    monkeypatch.setattr(D, "fit_distributed", lambda cfg, on_epoch, n, backend, **kw: got.update(kw, n=n, backend=backend))
    on_placement = [].append
    D.fit_any(C.load(DIGITS), None, gpus=2, threads=2, on_placement=on_placement)
    assert got["n"] == 2 and got["backend"] == "nccl" and got["on_placement"] is on_placement


def test_start_line_and_result_field_of_a_placement():
    where = {"node": "n1", "node_id": "abc", "gpu_ids": ["2", "3"], "accelerator_ids": ["2", "3"],
             "cuda_visible_devices": "2,3", "ranks": [{"rank": 0, "device": "cuda:0", "gpu_id": "2"}]}
    assert gpu_words(where) == ", GPU ids 2,3 (CUDA_VISIBLE_DEVICES=2,3)"
    assert gpu_words({**where, "gpu_ids": [], "cuda_visible_devices": ""}) == ""
    field = as_result(where)   # no list for Ray's TBX logger to try a histogram of
    assert not any(isinstance(v, list) for v in field.values()) and field["ranks"][0]["gpu_id"] == "2"
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in field.items()} == where
    from gatetune.tuning.train.track import numeric_metrics   # what MLflow and W&B are given of a result
    assert numeric_metrics({"top1": 50.0, "epoch": 1.0, "placement": field}) == {"top1": 50.0, "epoch": 1.0}


# ---------------------------------------------------------------------------------------------
# notices: device settings that do nothing

def _notices(path, overrides):
    return [n for n in C.load(path, overrides).notices if AMP_CPU in n or UNUSED in n]


def test_amp_set_for_a_cpu_run_is_a_notice(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _notices(DIGITS, []) == []                                     # the default: nothing to say
    assert _notices(DIGITS, ["train.amp=false", "train.device=cpu"]) == []
    [line] = _notices(DIGITS, ["train.amp=true"])
    assert "this machine has no CUDA GPU" in line and "'train.amp=true'" in line and line.startswith("notice: ")
    [line] = _notices(DIGITS, ["train.amp=true", "train.device=cpu"])
    assert "train.device is cpu" in line
    f = tmp_path / "amp.yaml"
    f.write_text(f"_import: {DIGITS}\ntrain: {{amp: true, device: cpu}}\n")
    [line] = _notices(f, [])
    assert str(f) in line                                                 # names the file that set it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _notices(DIGITS, ["train.amp=true"]) == []                     # gatetune train on a GPU: it works


def test_amp_in_a_search_whose_trials_get_no_gpu_is_a_notice():
    [line] = _notices(QUICK, ["train.amp=true"])                          # quickstart: search.resources.gpu 0
    assert "trials get no GPU (search.resources.gpu is 0)" in line
    assert _notices(QUICK, ["train.amp=true", "search.resources.gpu=0.5"]) == []
    assert _notices(QUICK, ["train.amp=true", "search.pretrain={epochs: 1, resources: {cpu: 1, gpu: 1}}"]) == []


def test_gpus_granted_to_trials_that_train_on_cpu_is_a_notice():
    [line] = _notices(QUICK, ["train.device=cpu", "search.resources.gpu=2"])
    assert "search.resources.gpu is 2" in line and "train.device=auto" in line
    [line] = _notices(QUICK, ["train.device=cpu", "search.pretrain={epochs: 1, resources: {cpu: 1, gpu: 1}}"])
    assert "search.pretrain.resources.gpu is 1" in line and "search.resources.gpu" not in line
    assert _notices(QUICK, ["search.resources.gpu=2"]) == []             # auto: trials train on what they hold
    assert _notices(QUICK, ["train.device=cpu"]) == []


def test_gatetune_train_prints_the_notice_then_trains(monkeypatch, tmp_path, capsys):
    import gatetune.tuning.train.run as run_mod
    metrics = {"top1": 1.0, "top5": 2.0, "density": 0.5, "macs_ratio": 0.5, "epoch": 1.0, "diverged": False}
    monkeypatch.setattr(run_mod, "train_run", lambda cfg, out, progress: (out, metrics))
    assert main(["train", DIGITS, "train.amp=true", "train.device=cpu", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and AMP_CPU in err[0], err


def test_cuda_refusals_stay_one_line_beside_the_notices(monkeypatch, tmp_path, capsys):
    """train.device=cuda without a GPU (gatetune train), and with search.resources.gpu 0: each still one
    line and exit 2, the amp notice never printed before it (tests/bad_inputs/ has both cases too)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["train", DIGITS, "train.device=cuda", "train.amp=true", "--out", str(tmp_path / "t")],
                 ["search", QUICK, "train.device=cuda", "train.amp=true", "--storage", str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"gatetune {argv[0]}: error: ") and "train.device" in err[0], err
    assert not os.listdir(tmp_path)
