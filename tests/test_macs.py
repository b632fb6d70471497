"""Measured MACs: effective = dense * active input fraction * active output fraction (docs/design.md)."""
from __future__ import annotations

import pytest
import torch

import gatetune.models as M

DIGITNET_DENSE = 9_510_912 + 128 * 10  # six convs + fc, per 16x16 image


def _digitnet(density, policy="fbs"):
    torch.manual_seed(0)
    sites = {s: M.SiteSpec(gate=True, density=density) for s in M.site_names("digitnet")}
    return M.build("digitnet", num_classes=10, in_channels=1, input_size=16, policy=policy, sites=sites)


def _count(net, *batches):
    with torch.no_grad(), net.count_macs() as m:
        for x in batches:
            net(x)
    return m


@pytest.mark.parametrize("policy", ["fbs", "mse"])
def test_digitnet_density_one_costs_dense_plus_predictors(policy):
    net = _digitnet(1.0, policy).train()  # batch statistics: |BN output| stays a few units
    with torch.no_grad():  # shift every channel up so that no ReLU output channel is entirely zero
        for g in net.gates.values():
            (g.beta if policy == "fbs" else g.bn.bias).fill_(10.0)
    m = _count(net, torch.randn(4, 1, 16, 16), torch.randn(6, 1, 16, 16))
    predictors = sum(g.predictor.in_features * g.predictor.out_features for g in net.gates.values())
    assert m.dense_macs == DIGITNET_DENSE
    assert m.macs == pytest.approx(DIGITNET_DENSE + predictors)
    assert 1.0 <= m.ratio <= 1.02


def test_relu_dead_channels_are_measured_too():
    m = _count(_digitnet(1.0).train(), torch.randn(8, 1, 16, 16))
    assert 0.8 < m.ratio <= 1.02


@pytest.mark.parametrize("policy", ["fbs", "mse"])
def test_digitnet_half_density_saves_quadratically(policy):
    m = _count(_digitnet(0.5, policy).eval(), torch.randn(8, 1, 16, 16))
    assert m.ratio <= 0.30
    assert m.macs_per_site["conv1"] == pytest.approx(0.5 * 73_728)        # image input: output side only
    assert m.macs_per_site["conv2"] <= 0.25 * 2_359_296 + 1e-6             # both sides


def test_depthwise_counts_channels_active_on_both_sides():
    sites = {"conv1.depthwise": M.SiteSpec(gate=True, density=0.5)}
    net = M.build("mobilenet_v1", num_classes=10, in_channels=3, input_size=32, sites=sites).eval()
    with torch.no_grad():
        net.gates["conv1.depthwise"].beta.fill_(5.0)
        net.net.features.conv0.conv_bn.bias.fill_(5.0)  # no dead channels upstream
    m = _count(net, torch.randn(2, 3, 32, 32))
    dense = {r["site"]: r["dense_macs"] for r in M.layers_table("mobilenet_v1", input_size=32)}
    assert m.macs_per_site["conv1.depthwise"] == pytest.approx(0.5 * dense["conv1.depthwise"])
    assert m.macs_per_site["conv1.pointwise"] == pytest.approx(0.5 * dense["conv1.pointwise"])  # input side


def test_hooks_are_removed_and_gated_sites_cost_less():
    net = _digitnet(0.5)
    _count(net, torch.randn(2, 1, 16, 16))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    sites = {s: M.SiteSpec(gate=True, density=0.5) for s in M.resolve_sites("squeezenet_v11", "fire9")}
    net = M.build("squeezenet_v11", num_classes=10, in_channels=3, input_size=32, sites=sites)
    m = _count(net, torch.randn(2, 3, 32, 32))
    assert 0.0 < m.ratio < 1.0
