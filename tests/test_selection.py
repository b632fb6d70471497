"""Per-channel selection counts of a GateRecorder (GatedNet.record_gates; the gating health report)."""
import pytest
import torch

from gatetune import models
from gatetune.models import SiteSpec
from gatetune.models.gate import active_count


def _net(name="digitnet", density=0.5, policy="fbs", sites="all", seed=0):
    torch.manual_seed(seed)
    c_in, size = models.default_input(name)
    specs = {s: SiteSpec(gate=True, density=density) for s in models.resolve_sites(name, sites)}
    return models.build(name, num_classes=10, in_channels=c_in, input_size=size, policy=policy, sites=specs)


def _x(name="digitnet", n=8, seed=1):
    c_in, size = models.default_input(name)
    return torch.randn(n, c_in, size, size, generator=torch.Generator().manual_seed(seed))


def test_constant_saliency_keeps_each_channel_always_or_never():
    net = _net()
    with torch.no_grad():
        for g in net.gates.values():
            g.predictor.weight.zero_()   # s = relu(bias): the same for every sample
    net.eval()
    with torch.inference_mode(), net.record_gates() as rec:
        net(_x(n=6))
        net(_x(n=4, seed=2))
    counts = rec.selection_counts()
    assert set(counts) == set(net.gates)
    for name, (c, samples) in counts.items():
        assert samples == 10 and c.dtype == torch.float32 and c.device.type == "cpu"
        assert c.shape == (net.c_out[name],)
        assert bool(((c == 0) | (c == samples)).all()), name
        assert c.sum().item() == net.gates[name].k * samples


def test_random_predictors_select_dynamically_and_counts_sum_to_k_per_sample():
    for policy in ("fbs", "mse"):
        net = _net(policy=policy).eval()
        with torch.inference_mode(), net.record_gates() as rec:
            net(_x(n=16))
        counts = rec.selection_counts()
        dynamic = 0
        for name, (c, samples) in counts.items():
            assert samples == 16
            assert c.sum().item() == active_count(0.5, net.c_out[name]) * samples
            assert bool(((c >= 0) & (c <= samples)).all())
            dynamic += int(((c > 0) & (c < samples)).sum())
        assert dynamic > 0, policy   # some channels are kept by some samples only


def test_training_forwards_are_not_counted():
    net = _net().train()
    with net.record_gates() as rec:
        net(_x(n=8))
        assert all(s == 0 and c.sum().item() == 0 for c, s in rec.selection_counts().values())
        net.eval()
        with torch.no_grad():
            net(_x(n=3))
        net.train()
        net(_x(n=8))   # does not add to the eval counts
    assert all(s == 3 for _, s in rec.selection_counts().values())
    assert all(d == pytest.approx(active_count(0.5, net.c_out[n]) / net.c_out[n])   # densities count all 19
               for n, d in rec.densities().items())


def test_full_density_sites_count_every_channel_and_a_new_recorder_starts_from_zero():
    # conv1, conv2 at density 1.0 (no mask built), the rest gated at 0.25
    torch.manual_seed(0)
    specs = {s: SiteSpec(gate=True, density=1.0 if s in ("conv1", "conv2") else 0.25)
             for s in models.site_names("digitnet")}
    net = models.build("digitnet", num_classes=10, in_channels=1, input_size=16, sites=specs).eval()
    with torch.inference_mode(), net.record_gates() as rec:
        net(_x(n=5))
    counts = rec.selection_counts()
    for name in ("conv1", "conv2"):
        c, s = counts[name]
        assert s == 5 and torch.equal(c, torch.full((net.c_out[name],), 5.0))
    assert counts["conv3"][0].sum().item() == active_count(0.25, 64) * 5
    # reading does not reset: the same counts again, and the densities beside them
    again = rec.selection_counts()
    assert all(torch.equal(again[n][0], counts[n][0]) and again[n][1] == counts[n][1] for n in counts)
    assert rec.densities()["conv3"] == pytest.approx(active_count(0.25, 64) / 64)
    assert rec.densities()["conv1"] == 1.0
    with torch.inference_mode():
        net(_x(n=2))   # after the block: not recorded
    assert rec.selection_counts()["conv3"][1] == 5
    with net.record_gates() as fresh:
        pass
    assert all(s == 0 and c.sum().item() == 0 for c, s in fresh.selection_counts().values())


def test_counts_are_exact_under_bf16_autocast():
    net = _net().eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), net.record_gates() as rec:
        net(_x(n=7))
    for name, (c, s) in rec.selection_counts().items():
        assert s == 7 and c.sum().item() == net.gates[name].k * 7
