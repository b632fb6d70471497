"""Several processes per run (tuning/train/distributed.py): batch sharding, process planning, and (slow) a
digits run on two gloo CPU processes: shards, synchronised weights, checkpoints, exact resume."""
from __future__ import annotations

import math
import os

import pytest
import torch
import yaml

from gatetune.tuning.train import checkpoint as ckpt
from gatetune.tuning import config as C
from gatetune.tuning.config import DataCfg
from gatetune.tuning.data import load
from gatetune.tuning.train.ddp import FirstBatch, ShardedLoader
from gatetune.tuning.train.distributed import fit_distributed, world
from gatetune.core.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "search_spaces", "digits.yaml")
CPU = torch.device("cpu")


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_loader_gives_each_rank_its_batch_of_every_step(world):
    train = load(DataCfg(dataset="fake", fake_train=100, fake_val=8, image_size=8), CPU, seed=3).train
    bs, kw = 8, dict(epoch=1, shuffle=True, augment=True)
    single = list(train.batches(bs, drop_last=True, **kw))
    big = list(train.batches(bs * world, drop_last=True, **kw))     # one process, batch world x bs
    steps = 100 // (bs * world)
    shards = [ShardedLoader(train, r, world) for r in range(world)]
    got = [list(s.batches(bs, **kw)) for s in shards]
    for r, s in enumerate(shards):
        assert s.num_batches(bs) == len(got[r]) == steps         # every rank makes the same number of steps
        for step, (x, y) in enumerate(got[r]):
            assert torch.equal(x, single[step * world + r][0]) and torch.equal(y, single[step * world + r][1])
    for step in range(steps):   # a step trains on the images of one batch of world x bs, in its order
        assert torch.equal(torch.cat([got[r][step][0] for r in range(world)]), big[step][0])
        assert torch.equal(torch.cat([got[r][step][1] for r in range(world)]), big[step][1])


def test_first_batch_only():
    val = load(DataCfg(dataset="fake", fake_train=8, fake_val=20), CPU, seed=0).val
    one = FirstBatch(val)
    assert one.num_batches(8) == 1 and len(list(one.batches(8))) == 1


def test_plan_processes_and_backend(monkeypatch):
    cfg = C.load(DIGITS)
    assert world(cfg) == (1, "gloo") and world(cfg, gpus_granted=0) == (1, "gloo")
    two = C.load(DIGITS, ["train.processes=2"])
    assert world(two) == (2, "gloo") and world(two, gpus_granted=0) == (2, "gloo")
    assert world(C.load(DIGITS, ["train.device=cpu", "train.processes=2"]), gpus_granted=2) == (2, "gloo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert world(cfg, gpus_granted=2) == (2, "nccl")      # a trial uses every GPU it was granted
    assert world(cfg, gpus_granted=1) == (1, "nccl")      # (a fraction of a GPU is one id: one process)
    assert world(cfg, gpus_granted=0) == (1, "gloo")      # a trial without a GPU on a GPU node: the CPU
    assert world(two, gpus_granted=4) == (2, "nccl")      # train.processes below the grant: that many
    assert world(C.load(DIGITS, ["train.device=cpu"]), gpus_granted=2) == (1, "gloo")
    assert world(cfg) == (1, "nccl")                      # gatetune train: one GPU unless asked
    assert world(two) == (2, "nccl")
    with pytest.raises(UserError, match="2 processes need one GPU each"):
        world(two, gpus_granted=1)
    with pytest.raises(UserError, match="8 processes"):
        world(C.load(DIGITS, ["train.processes=8"]))
    with pytest.raises(UserError, match="processes"):
        C.load(DIGITS, ["train.processes=0"])


def test_ddp_forward_returns_the_gate_loss_and_reaches_the_mse_predictors(tmp_path):
    """The training forward through DDP (one gloo process, in this process): model(x, with_gate_loss=True)
    is the net's own (logits, gate loss), and the gate loss's gradient reaches the mse predictors (which
    only it reaches); with every weight 0 the rebuilt DDP tolerates the unused predictors."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from gatetune import models
    from gatetune.tuning.train.ddp import DistContext
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        sites = {s: models.SiteSpec(gate=True, density=0.5, weight=1.0) for s in models.site_names("digitnet")}
        net = models.build("digitnet", num_classes=10, in_channels=1, input_size=16, policy="mse", sites=sites)
        model = DistContext(0, 1, CPU).wrap(net)
        x, y = torch.rand(4, 1, 16, 16), torch.arange(4)
        logits, gate_loss = model(x, with_gate_loss=True)
        ref_logits, ref_loss = net(x, with_gate_loss=True)
        assert torch.equal(logits, ref_logits) and torch.equal(gate_loss, ref_loss) and gate_loss > 0
        (F.cross_entropy(logits, y) + gate_loss).backward()
        assert all(g.predictor.weight.grad.abs().sum() > 0 for g in net.gates.values())
        net.zero_grad(set_to_none=True)
        net.set_gate_weights({n: 0.0 for n in net.gates})
        logits, gate_loss = model(x, with_gate_loss=True)
        assert gate_loss.item() == 0.0
        (F.cross_entropy(logits, y) + gate_loss).backward()
        assert all(g.predictor.weight.grad is None for g in net.gates.values())
        assert torch.equal(model(x), net(x))   # without the flag: logits only
    finally:
        dist.destroy_process_group()


def _fingerprints(train, epoch: int, bs: int) -> list[tuple]:
    return [(float(x.double().sum()), int(y.sum()), len(y))
            for x, y in train.batches(bs, epoch=epoch, shuffle=True, augment=True, drop_last=True)]


@pytest.mark.slow
def test_two_gloo_processes_train_digits(tmp_path, monkeypatch):
    """2 epochs of gated digitnet on 2 CPU processes (gloo), batch 32 per process; then resume epoch 2
    from the epoch-1 checkpoint through `gatetune train`'s path and get the same weights."""
    monkeypatch.setenv("GATETUNE_PROGRESS_S", "0.05")   # the ranks inherit it
    cfg = C.load(DIGITS, ["train.epochs=2", "train.batch_size=32", "train.processes=2", "train.threads=1"])
    got, probe, ticks, placed = [], [], [], []

    def on_epoch(m, s):
        assert placed, "on_placement before the first epoch"
        got.append((m, s))

    with monkeypatch.context() as m:   # the ranks only (this process may meet CUDA later): as Ray sets it for a
        m.setenv("CUDA_VISIBLE_DEVICES", "5,7")   # trial granted GPUs 5 and 7
        last = fit_distributed(cfg, on_epoch, 2, "gloo", probe=probe, on_progress=ticks.append,
                               on_placement=placed.append)

    # each rank said where it trains, once, read from its own environment
    assert placed == [[{"rank": 0, "device": "cpu", "gpu_id": "5"}, {"rank": 1, "device": "cpu", "gpu_id": "7"}]]

    # rank 0's progress inside an epoch reached this process, between the epochs
    assert ticks and all(t["epoch"] != int(t["epoch"]) and t["images_per_s"] > 0 for t in ticks), ticks

    # every epoch reached on_epoch in this process, with metrics and a full state
    assert [m["epoch"] for m, _ in got] == [1.0, 2.0] and last["epoch"] == 2.0 and not last["diverged"]
    assert got[1][0]["loss"] < got[0][0]["loss"] and last["top1"] > 30       # it learns (chance: 10%)
    assert abs(last["density"] - 0.5) < 1e-6 and all(math.isfinite(m["gate_loss"]) for m, _ in got)

    # the ranks trained on disjoint halves of each step: batches 2s and 2s+1 of the single-process order
    data = load(cfg.data, CPU, seed=cfg.seed)
    steps = len(data.train) // 64
    for epoch in (0, 1):
        ref = _fingerprints(data.train, epoch, 32)
        seen = [p["batches"][epoch] for p in sorted(probe, key=lambda p: p["rank"])]
        for r in (0, 1):
            assert len(seen[r]) == steps
            assert all(a[1:] == b[1:] and a[0] == pytest.approx(b[0], rel=1e-9)
                       for a, b in zip(seen[r], ref[r::2]))
        assert not {f[:2] for f in seen[0]} & {f[:2] for f in seen[1]}

    # DDP kept the weights identical, and the checkpoint is rank 0's unwrapped network
    p0, p1 = (p["params"] for p in sorted(probe, key=lambda p: p["rank"]))
    assert p0.keys() == p1.keys() and all(torch.equal(p0[k], p1[k]) for k in p0)
    state = got[1][1]
    fresh = load(cfg.data, CPU, seed=cfg.seed)
    from gatetune.tuning.train.loop import build_model
    assert list(state["model"]) == list(build_model(cfg, fresh).state_dict())   # no "module." prefixes
    assert all(torch.equal(state["model"][k], p0[k]) for k in p0)

    # resume after epoch 1 through train_run (the CLI path): the same epoch-2 weights, bit for bit
    from gatetune.tuning.train.run import train_run
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(C.to_dict(cfg), sort_keys=False))
    ckpt.RunFolder(out, cfg.train.keep_checkpoints).save(got[0][1], got[0][1]["history"])
    _, m = train_run(cfg, out, progress=False)
    assert m["epoch"] == 2.0
    resumed = ckpt.read(out / "checkpoints" / "epoch_002.pt")["model"]
    assert resumed.keys() == state["model"].keys()
    assert all(torch.equal(resumed[k], state["model"][k]) for k in resumed)


@pytest.mark.slow
def test_divergence_stops_every_rank(tmp_path):
    """A gate loss over train.max_gate_loss on the ranks: all stop at the same step (none waits in a
    collective) and the run folder records the diverged step, as for one process."""
    from gatetune.tuning.train.run import train_run
    cfg = C.load(DIGITS, ["train.epochs=2", "train.processes=2", "train.threads=1", "gating.weight=1.0e+6",
                          "train.max_gate_loss=100"])
    out, m = train_run(cfg, tmp_path / "d", progress=False)
    assert m["diverged"] is True and m["epoch"] <= 1.0
    assert (out / "metrics.csv").read_text().count("\n") == 2 and not (out / "checkpoints").exists()
