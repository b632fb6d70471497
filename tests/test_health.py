"""Gating health (tuning/train/health.py) from the eval-mode selection counts of a GatedNet's GateRecorder."""
import json

import pytest
import torch

from gatetune import models
from gatetune.tuning.train.health import health_metrics, site_health


def _net(density: float, gate="all"):
    torch.manual_seed(0)
    sites = {s: models.SiteSpec(gate=gate == "all" or s in gate, density=density) for s in models.site_names("digitnet")}
    return models.build("digitnet", num_classes=10, in_channels=1, input_size=16, sites=sites).eval()


def _dynamic(net):
    """Gates that vary with the input: the pooled input standardised (as when built from dense weights), its
    running statistics settled by training-mode forwards on noise."""
    for g in net.gates.values():
        g.standardise.fill_(True)
    net.train()
    with torch.no_grad():
        for i in range(30):
            net(torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(100 + i)))
    return net.eval()


def _evaluate(net, n=128):
    with torch.no_grad(), net.record_gates() as rec:
        net(torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    return health_metrics(net, rec.selection_counts())


def test_constant_saliency_is_static():
    net = _net(0.5)
    for g in net.gates.values():          # zero predictor weights: every input gets the same saliency
        torch.nn.init.zeros_(g.predictor.weight)
    m = _evaluate(net)
    assert m["gate_health"] == "static" and m["dynamic"] == 0
    sites = json.loads(m["gate_sites"])
    assert set(sites) == set(net.gates)
    assert all(h == {"dynamic": 0.0, "dead": 0.5, "always": 0.5} for h in sites.values()), sites
    assert m["gate_health_detail"].startswith("100% of gated channels static")


def test_input_dependent_gates_are_dynamic_and_counted_in_eval_only():
    net = _dynamic(_net(0.5, gate=["conv4", "conv5", "conv6"]))
    net.train()
    with torch.no_grad(), net.record_gates() as rec:
        net(torch.rand(32, 1, 16, 16))
    assert all(n == 0 for _, n in rec.selection_counts().values())   # training forwards do not count
    assert health_metrics(net, rec.selection_counts())["gate_health"] == "dense"   # nothing counted: no site
    net.eval()
    m = _evaluate(net)
    assert m["gate_health"] == "ok" and m["dynamic"] > 0.2, m
    with torch.no_grad(), net.record_gates() as rec:
        net(torch.rand(40, 1, 16, 16))
    for name, (counts, samples) in rec.selection_counts().items():
        assert samples == 40 and counts.sum() == pytest.approx(net.gates[name].k * 40)


def test_one_frozen_site_in_a_dynamic_net_is_collapsed():
    net = _dynamic(_net(0.5, gate=["conv4", "conv5", "conv6"]))
    torch.nn.init.zeros_(net.gates["conv6"].predictor.weight)
    m = _evaluate(net)
    assert m["gate_health"] == "collapsed" and m["gate_health_detail"].startswith("conv6: no dynamic channel")


def test_density_one_is_dense():
    m = _evaluate(_net(1.0))
    net = _net(1.0)
    with torch.no_grad(), net.record_gates() as rec:
        net(torch.rand(4, 1, 16, 16))
    assert m["gate_health"] == "dense" and m["dynamic"] == 0 and not site_health(net, rec.selection_counts())
