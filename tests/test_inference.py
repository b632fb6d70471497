"""Channel-skipping inference (models/inference/skip.py): same outputs as the masked GatedNet, the dense baseline,
latency_ratio in `gatetune eval` and in a search report's Pareto trials."""
import json
import os

import pytest
import torch
import yaml

from gatetune import models
from gatetune.models import SiteSpec, SkipNet, dense_net, measure_latency

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "search_spaces", "digits.yaml")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _choices_in_memory(monkeypatch):
    """Variant choices made under test load stay out of this machine's choice file (models/inference/autotune.py)."""
    monkeypatch.setenv("GATETUNE_CHOICE_CACHE", "0")


@torch.no_grad()
def _gated(name: str, policy: str, density: float, gate="all", size=None, seed=0) -> models.GatedNet:
    """`name` gated at `gate` sites, BN statistics from random batches (realistic scales), random betas."""
    torch.manual_seed(seed)
    c_in, default = models.default_input(name)
    size = size or default
    sites = {s: SiteSpec(gate=True, density=density) for s in models.resolve_sites(name, gate)}
    net = models.build(name, num_classes=10, in_channels=c_in, input_size=size, policy=policy, sites=sites)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None
    net.train()
    for _ in range(2):
        net(torch.randn(8, c_in, size, size))
    for g in net.gates.values():
        if g.beta is not None:
            g.beta.uniform_(-0.2, 0.2)
    return net.eval()


def _check_match(net, size, n=3, **skip_kwargs):
    c_in = models.default_input(net.model_name)[0]
    x = torch.randn(n, c_in, size, size)
    with torch.inference_mode():
        # against the masked net at batch 1, as the skipping path runs: in a batch, float rounding differs
        # and a near-tie of two saliencies can keep the other channel (seen on mobilenet_v1)
        ref = torch.cat([net(x[i:i + 1]) for i in range(n)])
        out = SkipNet(net, **skip_kwargs)(x)
    assert torch.isfinite(ref).all()
    scale = ref.abs().max()
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(scale)), float((out - ref).abs().max() / scale)


@pytest.mark.parametrize("name", ["mcifarnet", "resnet20"])
@pytest.mark.parametrize("policy", ["fbs", "mse"])
@pytest.mark.parametrize("density", [0.25, 0.5, 1.0])
def test_skip_matches_masked(name, policy, density):
    _check_match(_gated(name, policy, density), 32)


@pytest.mark.parametrize("name, gate, size", [
    ("mcifarnet", "conv0,conv2,conv3,conv6", 32),      # plain convs between gated ones
    ("resnet20", "layer1,layer3.2.conv1", 32),          # a block with only conv1 gated
    ("digitnet", "all", 16),
    ("squeezenet_v11", "all", 64),                      # no BN; Fire concat of compact halves
    ("squeezenet_v11", "fire3.expand3,fire5", 64),
    ("mobilenet_v1", "all", 64),                        # depthwise gates, ReLU6
    ("mobilenet_v1", "conv{9..13}.pointwise", 64),
])
@pytest.mark.parametrize("policy", ["fbs", "mse"])
def test_skip_matches_masked_other_models_and_partial_gating(name, gate, size, policy):
    _check_match(_gated(name, policy, 0.5, gate=gate, size=size), size, n=2)


VARIANTS = [dict(force="skip-kernel-native"), dict(force="skip-kernel-mkldnn"), dict(force="dense-kernel-native"),
            dict(force="dense-kernel-mkldnn"), dict(kernel=False, force="skip-native"),
            dict(kernel=False, force="dense-mkldnn")]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v["force"] + ("" if v.get("kernel", True) else "-torch"))
@pytest.mark.parametrize("name, policy, density", [("resnet20", "fbs", 0.5), ("mcifarnet", "mse", 0.25),
                                                   ("digitnet", "fbs", 1.0), ("squeezenet_v11", "fbs", 0.5)])
def test_every_variant_matches_masked(name, policy, density, variant):
    size = 64 if name == "squeezenet_v11" else models.default_input(name)[1]
    _check_match(_gated(name, policy, density, size=size), size, n=2, **variant)


@pytest.mark.parametrize("force", ["skip-kernel", "dense-kernel"])
def test_tied_and_zero_saliencies_keep_the_masked_nets_channels(force):
    """The kernel's top-k replicates torch's: equal saliencies (a zero predictor weight, equal biases) and
    exact zeros after the ReLU (negative biases) pick the same channels, so the same betas survive."""
    for bias in ("equal", "half negative"):
        net = _gated("mcifarnet", "fbs", 0.5)
        with torch.no_grad():
            for g in net.gates.values():
                g.predictor.weight.zero_()
                g.predictor.bias.fill_(0.7)
                if bias == "half negative":
                    g.predictor.bias[::2] = -1.0
        _check_match(net, 32, n=2, force=force)


def test_variants_are_chosen_per_gate_and_cached(monkeypatch, tmp_path):
    from gatetune.models.inference import autotune
    monkeypatch.setenv("GATETUNE_CHOICE_CACHE", "1")
    monkeypatch.setenv("GATETUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_MEMORY", {})
    monkeypatch.setattr(autotune, "_LOADED", [])
    net = _gated("digitnet", "fbs", 0.5)
    x = torch.randn(1, 1, 16, 16)
    fast = SkipNet(net)
    with torch.inference_mode():
        ref = fast(x)
    chosen = fast.choices()
    assert len(chosen) == len(net.gates) and all(len(p) == 1 for p in chosen.values())
    names = {v for p in chosen.values() for v in p.values()}
    assert names <= {f"{m}-kernel-{b}" for m in ("skip", "dense") for b in ("native", "mkldnn")}
    record = json.loads(open(autotune.choice_file()).read())
    assert len(record) == len(net.gates) and all(e["measured"] == "in situ" for e in record.values())
    calls = []
    monkeypatch.setattr(autotune, "choose", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(autotune, "_MEMORY", {})   # a new process: the choices come from the file
    monkeypatch.setattr(autotune, "_LOADED", [])
    again = SkipNet(net)
    with torch.inference_mode():
        assert torch.allclose(again(x), ref, rtol=1e-5, atol=1e-6)
    assert not calls and again.choices() == chosen


def test_copies_and_dtype_changes_rebind_the_kernel():
    import copy
    net = _gated("resnet20", "fbs", 0.5)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        ref = torch.cat([net(x)])
        fast = SkipNet(net)
        fast(x)
        assert torch.allclose(copy.deepcopy(fast)(x), ref, rtol=1e-4, atol=1e-5)
        fast64 = fast.double()   # no float64 kernel: the torch-op variants
        assert torch.allclose(fast64(x.double()).float(), ref, rtol=1e-4, atol=1e-5)
        assert all("torch" in v for p in fast64.choices().values() for k, v in p.items() if "float64" not in k)


def test_skip_is_a_snapshot_for_inference_only():
    net = _gated("digitnet", "fbs", 0.5)
    fast = SkipNet(net)
    assert not fast.training
    with pytest.raises(RuntimeError, match="inference only"):
        fast.train()
    # the copy shares the network's tensors (no second copy of the weights)
    assert fast.net.fc.weight.data_ptr() == net.net.fc.weight.data_ptr()
    with pytest.raises(models.ModelError, match="no gated conv"):
        SkipNet(models.build("digitnet", num_classes=10, in_channels=1, input_size=16))


def test_dense_net_is_the_gate_at_density_one_with_a_constant_saliency():
    net = _gated("resnet20", "fbs", 1.0)
    with torch.no_grad():
        for g in net.gates.values():
            g.predictor.weight.zero_()   # s = relu(bias) for every image: what dense_net folds in
    dense = dense_net(net)
    assert not any(isinstance(m, models.GatedConv2d) for m in dense.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ref, out = net(x), dense(x)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_measure_latency_keys():
    net = _gated("digitnet", "fbs", 0.5)
    threads = torch.get_num_threads()
    m = measure_latency(net, torch.randn(2, 1, 16, 16), rounds=1)
    assert set(m) == {"latency_ratio", "skip_ms", "dense_ms", "images", "threads"}
    assert m["latency_ratio"] > 0 and m["skip_ms"] > 0 and m["images"] == 2 and m["threads"] == 1
    assert torch.get_num_threads() == threads   # restored


def _checkpoint(path, overrides=()):
    """A gatetune checkpoint of an untrained digitnet (no training: the eval path is what is tested)."""
    from gatetune.tuning import config as C
    from gatetune.tuning.data import load
    from gatetune.tuning.train.loop import build_model
    cfg = C.load(DIGITS, ["train.epochs=1", *overrides])
    net = build_model(cfg, load(cfg.data, torch.device("cpu"), seed=cfg.seed))
    state = {"model": net.state_dict(), "config": C.to_dict(cfg), "epoch": 1, "history": []}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return cfg


def test_eval_prints_latency_ratio(tmp_path, capsys):
    from gatetune.tuning.cli import main
    _checkpoint(tmp_path / "gated.pt")
    _checkpoint(tmp_path / "dense.pt", ["gating.gate=none"])
    assert main(["eval", str(tmp_path / "gated.pt")]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("latency_ratio: "))
    assert float(line.split()[1]) > 0 and "dense" in line and "batch 1" in line
    assert main(["eval", str(tmp_path / "dense.pt")]) == 0
    assert "latency_ratio: n/a" in capsys.readouterr().out


def test_pareto_latency_writes_latency_json_that_the_report_reads(tmp_path):
    """A hand-made search folder (no Ray): two trials with a checkpoint each, one dominating."""
    from gatetune import results
    from gatetune.tuning.train.evaluate import pareto_latency
    run = tmp_path / "search"
    cfg = _checkpoint(run / "trial_aaaa0001" / "checkpoint_000000" / "state.pt")
    _checkpoint(run / "trial_aaaa0002" / "checkpoint_000000" / "state.pt")
    from gatetune.tuning import config as C
    (run / "gatetune.yaml").write_text(yaml.safe_dump(C.to_dict(cfg), sort_keys=False))
    for tid, top1 in (("aaaa0001", 90.0), ("aaaa0002", 80.0)):
        (run / f"trial_{tid}" / "params.json").write_text("{}")
        (run / f"trial_{tid}" / "result.json").write_text(json.dumps(
            {"trial_id": tid, "epoch": 1.0, "training_iteration": 1, "top1": top1, "top5": 99.0,
             "density": 0.5, "macs_ratio": 0.3, "done": True}) + "\n")
    assert pareto_latency(run, images=2, rounds=1) == 1
    record = json.loads((run / "trial_aaaa0001" / "latency.json").read_text())
    assert record["checkpoint"] == "checkpoint_000000" and record["latency_ratio"] > 0
    assert not (run / "trial_aaaa0002" / "latency.json").exists()   # dominated: not measured
    df = results.table(run).set_index("trial_id")
    assert df.loc["aaaa0001", "latency_ratio"] == pytest.approx(record["latency_ratio"])
    assert df.loc["aaaa0001", "pareto"] and df["latency_ratio"].isna().sum() == 1


def test_pareto_latency_leaves_a_trial_that_reported_its_latency_to_the_report(tmp_path):
    """A search trial that trained its full budget reports latency_ratio with its last epoch
    (tuning/search/trainable.py): pareto_latency measures nothing more, and the report keeps the reported value."""
    from gatetune import results
    from gatetune.tuning import config as C
    from gatetune.tuning.train.evaluate import pareto_latency
    run = tmp_path / "search"
    cfg = _checkpoint(run / "trial_aaaa0001" / "checkpoint_000000" / "state.pt")
    (run / "gatetune.yaml").write_text(yaml.safe_dump(C.to_dict(cfg), sort_keys=False))
    (run / "trial_aaaa0001" / "params.json").write_text("{}")
    (run / "trial_aaaa0001" / "result.json").write_text(json.dumps(
        {"trial_id": "aaaa0001", "epoch": 1.0, "training_iteration": 1, "top1": 90.0, "top5": 99.0,
         "density": 0.5, "macs_ratio": 0.3, "latency_ratio": 0.42, "done": True}) + "\n")
    assert pareto_latency(run, images=2, rounds=1) == 0
    assert not (run / "trial_aaaa0001" / "latency.json").exists()
    assert results.table(run).set_index("trial_id").loc["aaaa0001", "latency_ratio"] == pytest.approx(0.42)


def test_state_latency_of_a_training_state_matches_its_checkpoints(tmp_path):
    """state_latency (a trial's last epoch, in the trial) measures the net the checkpoint of that state holds."""
    from gatetune.tuning.train.evaluate import open_checkpoint, state_latency
    _checkpoint(tmp_path / "gated.pt")
    cfg, net, data = open_checkpoint(tmp_path / "gated.pt")
    m = state_latency(cfg, torch.load(tmp_path / "gated.pt", weights_only=False), data, images=2, rounds=1)
    assert m["latency_ratio"] > 0 and m["latency_ms"] > 0 and m["dense_latency_ms"] > 0


@pytest.mark.parametrize("variant", [dict(force="skip-kernel"), dict(force="dense-kernel"),
                                     dict(kernel=False, force="skip-native")],
                         ids=lambda v: v["force"] + ("" if v.get("kernel", True) else "-torch"))
def test_the_predictor_input_clip_folds_into_the_skipping_path(variant):
    """Gates built from dense weights standardise the pooled input by running statistics and clip it to
    +-Z_CLIP. Half the input channels with a running variance of 1e-6 (an input almost always off in
    training) put most of their z beyond the clip; the skipping path keeps the masked net's channels."""
    from gatetune.models.gate import Z_CLIP
    from gatetune.models.gate_ops import mean_hw, scale_free
    net = _gated("resnet20", "fbs", 0.5)
    clipped = []
    with torch.no_grad():
        for g in net.gates.values():
            g.standardise.fill_(True)
            g.predictor.weight.normal_(0, 0.1)
            g.pool_norm.running_mean.uniform_(0.5, 1.5)
            g.pool_norm.running_var.uniform_(0.05, 0.5)
            g.pool_norm.running_var[::2] = 1e-6
            g.register_forward_pre_hook(lambda m, a: clipped.append(float(
                ((scale_free(mean_hw(a[0])) - m.pool_norm.running_mean).abs()
                 > Z_CLIP * (m.pool_norm.running_var + m.pool_norm.eps).sqrt()).float().mean())))
    _check_match(net, 32, n=2, **variant)
    assert 0.3 < sum(clipped) / len(clipped) < 0.9   # the clip bites on many inputs, not on all
