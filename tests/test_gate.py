"""GatedConv2d against the formulas of docs/design.md 'Gating semantics', one conv at a time."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gatetune.models.gate import GatedConv2d, active_count
from gatetune.models.gate_ops import bn_scale_shift, mean_abs, mean_hw
from gatetune.models.record import GateRecorder


def _conv_bn(c_in=6, c_out=10, seed=0):
    torch.manual_seed(seed)
    conv, bn = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.weight[::3] *= -1
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return conv, bn


def _x(n=4, c=6, seed=1):
    return torch.randn(n, c, 5, 5, generator=torch.Generator().manual_seed(seed))


def _saliency(gate, x, batch_stats, running=None):
    """docs/design.md's s = relu(W z + b), z = 0.3 * clip(standardise(p / mean_c p), +-3), p = mean_hw |x|, written out;
    running: the (mean, var) the gate held before the forward (eval, or a batch of one)."""
    p = x.abs().mean((2, 3))
    q = p / (p.mean(1, keepdim=True) + 1e-6)
    if not bool(gate.standardise):   # built from scratch: not standardised
        return F.relu(gate.predictor(0.3 * q))
    if batch_stats:
        mu, var = q.mean(0), q.var(0, unbiased=False)
    else:
        mu, var = running
    z = 0.3 * ((q - mu) / torch.sqrt(var + gate.pool_norm.eps)).clamp(-3, 3)
    return F.relu(gate.predictor(z))


def _run(gate, x):
    """(out, mask, loss, n) of one forward, read from the gate's tap."""
    seen = []
    h = gate.tap.register_forward_hook(lambda m, args, out: seen.append(args))
    try:
        out = gate(x)
    finally:
        h.remove()
    assert len(seen) == 1   # one tap call per forward
    return (out, *seen[0])


def test_active_count_is_ceil_and_at_least_one():
    assert [active_count(d, 10) for d in (0.7, 0.5, 0.31, 1.0, 0.01)] == [7, 5, 4, 10, 1]
    assert active_count(0.8, 64) == 52 and active_count(0.8, 1024) == 820


@pytest.mark.parametrize("train", [True, False])
def test_fbs_formula(train):
    conv, bn = _conv_bn()
    gate = GatedConv2d(copy.deepcopy(conv), copy.deepcopy(bn), density=0.5, weight=0.1).train(train)
    x = _x()
    rm, rv = gate.bn.running_mean.clone(), gate.bn.running_var.clone()
    pn = gate.pool_norm.running_mean.clone(), gate.pool_norm.running_var.clone()
    out, mask, loss, n = _run(gate, x)
    s = _saliency(gate, x, train, pn)
    assert n == x.shape[0]
    y = F.batch_norm(gate.conv(x), rm, rv, None, None, train, bn.momentum, bn.eps)
    expected = (mask * s)[:, :, None, None] * y + (mask * gate.beta)[:, :, None, None]
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(gate.bn.running_mean, rm) and torch.allclose(gate.bn.running_var, rv)  # same update
    assert loss.item() == pytest.approx(0.1 * (mask * s).abs().sum(1).mean().item(), rel=1e-5)
    assert not mask.requires_grad and (mask.sum(1) == 5).all()
    assert torch.equal(mask, torch.zeros_like(s).scatter_(1, s.topk(5, 1).indices, 1.0))  # the most salient


def test_fbs_starts_as_the_dense_conv_bn_even_for_negative_gamma():
    conv, bn = _conv_bn()
    x = _x()
    for train in (False, True):
        plain_bn = copy.deepcopy(bn).train(train)
        gate = GatedConv2d(copy.deepcopy(conv), copy.deepcopy(bn), density=1.0, dense_start=True).train(train)
        out, mask, loss, _ = _run(gate, x)
        assert torch.allclose(out, plain_bn(conv(x)), atol=1e-5)
        assert mask is None and loss is None  # k == C_out: no top-k, no mask; weight 0: no loss term


def test_fbs_without_bn_scales_the_conv_output():
    conv = nn.Conv2d(6, 8, 3, padding=1)
    gate = GatedConv2d(copy.deepcopy(conv), None, density=0.25)
    x = _x()
    out, mask, _, _ = _run(gate, x)
    s = _saliency(gate, x, True)
    assert torch.allclose(out, (mask * s)[:, :, None, None] * conv(x), atol=1e-6)
    assert torch.equal(gate.predictor.bias.detach(), torch.ones(8))


def test_mse_policy():
    conv, bn = _conv_bn()
    gate = GatedConv2d(copy.deepcopy(conv), copy.deepcopy(bn), policy="mse", density=0.3, weight=0.5).eval()
    x = _x()
    running = gate.pool_norm.running_mean.clone(), gate.pool_norm.running_var.clone()
    out, mask, loss, _ = _run(gate, x)
    y = bn.eval()(conv(x))
    p = _saliency(gate, x, False, running)
    assert torch.allclose(out, mask[:, :, None, None] * y, atol=1e-6)
    target = y.amax((2, 3)).clamp(min=0)
    assert loss.item() == pytest.approx(0.5 * F.mse_loss(p, target).item(), rel=1e-5)
    assert (mask.sum(1) == active_count(0.3, 10)).all()


def test_ties_cannot_raise_density():
    conv, bn = _conv_bn()
    gate = GatedConv2d(conv, bn, density=0.3)
    with torch.no_grad():
        gate.predictor.weight.zero_()
        gate.predictor.bias.fill_(1.0)  # every saliency equal
    with GateRecorder({"g": gate}) as rec:
        _, mask, _, _ = _run(gate, _x())
    assert (mask.sum(1) == 3).all()
    assert rec.densities() == {"g": pytest.approx(0.3)}


def test_nonneg_input_is_checked_once():
    conv, bn = _conv_bn()
    gate = GatedConv2d(conv, bn, nonneg_input=True)
    with pytest.raises(RuntimeError, match="negative input"):
        gate(_x())
    relu_x = _x().relu()
    gate = GatedConv2d(conv, bn, nonneg_input=True)
    gate(relu_x)
    assert gate._checked


def test_saliency_is_blind_to_the_input_scale_and_starts_at_gamma_from_dense_weights():
    """The saliency multiplies the layer's output: if it grew with its input, it would compound with depth
    (a gated resnet20 on CIFAR-10 reached logits of 1e5 at initialisation and diverged by batch 16)."""
    conv, bn = _conv_bn()
    x = _x(n=8)
    for dense_start in (False, True):
        gate = GatedConv2d(copy.deepcopy(conv), copy.deepcopy(bn), density=0.5, dense_start=dense_start)
        for train in (True, False):
            gate.train(train)
            s1, s2 = gate._predict(x), gate._predict(1e4 * x)
            assert torch.allclose(s1, s2, rtol=1e-4, atol=1e-5)
            if dense_start:   # a zero weight: s = |gamma| for every input
                assert torch.allclose(s1, bn.weight.detach().abs().expand_as(s1))
    assert not GatedConv2d(copy.deepcopy(conv), copy.deepcopy(bn)).predictor.weight.eq(0).all()   # from scratch


@pytest.mark.parametrize("channels_last", [False, True])   # True: the portable (non-CPU-fast) code paths
def test_gate_ops_match_their_expressions(channels_last):
    x = torch.randn(3, 4, 5, 5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(mean_abs, (x,))
    assert torch.autograd.gradcheck(mean_hw, (x,))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for train in (True, False):
        for b_rows in (1, 3):
            bn = nn.BatchNorm2d(4, affine=False, momentum=None).double().train(train)
            bn.running_var.fill_(1.5)
            ref_bn = copy.deepcopy(bn)
            y = (torch.randn(3, 4, 5, 5, dtype=torch.double) * 2 + 1).contiguous(memory_format=fmt).requires_grad_()
            s = torch.rand(3, 4, dtype=torch.double, requires_grad=True)
            b = torch.randn(b_rows, 4, dtype=torch.double, requires_grad=True)
            g = torch.randn(3, 4, 5, 5, dtype=torch.double)
            grads = torch.autograd.grad((bn_scale_shift(y, bn, s, b) * g).sum(), (y, s, b))
            ref = ref_bn(y) * s[:, :, None, None] + b[:, :, None, None]
            ref_grads = torch.autograd.grad((ref * g).sum(), (y, s, b))
            assert all(torch.allclose(a, r, atol=1e-10) for a, r in zip(grads, ref_grads))
            assert torch.allclose(bn.running_mean, ref_bn.running_mean)
            assert torch.allclose(bn.running_var, ref_bn.running_var)


def test_gate_batch_statistics_in_float32_stay_close_to_torch_with_a_large_mean():
    """|mean| / std = 100: the centred two-pass statistics lose ~|mean| / std ulps, not its square."""
    torch.manual_seed(0)
    y = torch.randn(16, 8, 6, 6) + 100.0
    bn, ref = (nn.BatchNorm2d(8, affine=False, momentum=0.3) for _ in range(2))
    s, b = torch.rand(16, 8), torch.randn(1, 8)
    out = bn_scale_shift(y, bn, s, b)
    expected = ref(y) * s[:, :, None, None] + b[:, :, None, None]
    assert torch.allclose(out, expected, atol=1e-3, rtol=1e-3)
    assert torch.allclose(bn.running_mean, ref.running_mean, rtol=1e-6)
    assert torch.allclose(bn.running_var, ref.running_var, rtol=1e-3)


def test_gate_output_takes_an_inplace_relu_and_bf16_autocast():
    conv, bn = _conv_bn()
    gate = GatedConv2d(conv, bn, density=0.5, weight=0.1).train()
    x = _x().requires_grad_()
    out, _, loss, _ = _run(gate, x)
    out = F.relu(out, inplace=True)                # the networks' ReLU(inplace=True) after a gate
    (out.sum() + loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gate(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in gate.parameters() if p.grad is not None)


def _snapshot(module: nn.Module) -> dict:
    """Every submodule's attributes: names, and the identity of each value and of each parameter/buffer."""
    return {name: ({k: id(v) for k, v in vars(m).items()}, {k: id(v) for k, v in m._parameters.items()},
                   {k: id(v) for k, v in m._buffers.items()}, dict(m._forward_hooks))
            for name, m in module.named_modules()}


@pytest.mark.parametrize("policy", ["fbs", "mse"])
def test_a_forward_leaves_no_state_on_the_gate(policy):
    """The mask, loss and counts of a forward reach the tap's observers only: nothing is assigned on the
    module (training or eval, recorded or not); only the BN running statistics change, in place."""
    conv, bn = _conv_bn()
    gate = GatedConv2d(conv, bn, policy=policy, density=0.5, weight=0.1)
    before = _snapshot(gate)
    for train in (True, False):
        gate.train(train)
        gate(_x())
        with GateRecorder({"g": gate}):
            _run(gate, _x(seed=2))
    gate.train(True)
    assert _snapshot(gate) == before
    assert not hasattr(gate, "mask") and not hasattr(gate, "loss")


def test_recorder_counts_match_the_masks():
    """Densities over every recorded forward, selection counts over the eval-mode ones only, both equal to
    sums of the masks the tap saw; a k == C_out gate (no mask) counts every channel."""
    conv, bn = _conv_bn()
    gates = {"half": GatedConv2d(copy.deepcopy(conv), copy.deepcopy(bn), density=0.5),
             "full": GatedConv2d(copy.deepcopy(conv), copy.deepcopy(bn), density=1.0)}
    seen = {n: [] for n in gates}
    with GateRecorder(gates) as rec:
        for i, train in enumerate((True, False, True, False)):
            for n, g in gates.items():
                g.train(train)
                _, mask, _, k = _run(g, _x(n=3 + i, seed=i))
                seen[n].append((train, torch.ones(k, 10) if mask is None else mask))
    for n in gates:   # read after the block: the counts stay, the hooks are gone
        assert not gates[n].tap._forward_hooks
    gates["half"](_x())   # not recorded
    dens, counts = rec.densities(), rec.selection_counts()
    for n in gates:
        masks = [m for _, m in seen[n]]
        assert dens[n] == torch.cat(masks).mean().item()
        evals = torch.cat([m for train, m in seen[n] if not train])
        c, samples = counts[n]
        assert samples == evals.shape[0] == 4 + 6 and c.dtype == torch.float32 and c.device.type == "cpu"
        assert torch.equal(c, evals.sum(0))
    assert dens["full"] == 1.0 and dens["half"] == 0.5
    assert rec.density() == (0.5 * 10 + 1.0 * 10) / 20
    with GateRecorder(gates) as empty:
        pass
    assert all(math.isnan(v) for v in empty.densities().values())
    assert all(s == 0 and c.sum() == 0 for c, s in empty.selection_counts().values())


def test_an_input_almost_always_off_in_training_cannot_pick_the_winners_in_eval():
    """A pooled input channel whose running variance is ~0 (its upstream gate nearly always lost in training)
    is on for one eval input: its standardised value is clipped to 3 deviations, where it would be hundreds
    and decide every winner."""
    conv, bn = _conv_bn()
    gate = GatedConv2d(conv, bn, density=0.5, dense_start=True).eval()
    with torch.no_grad():
        gate.predictor.weight.normal_(0, 0.1)
        gate.pool_norm.running_mean.fill_(1.0)
        gate.pool_norm.running_var.fill_(0.25)
        gate.pool_norm.running_mean[0], gate.pool_norm.running_var[0] = 0.0, 1e-6
    x = _x(n=1).abs()
    x[:, 0] = x[:, 1:].mean()          # channel 0 on, at the others' level
    z = gate.predictor_input(mean_hw(x))
    assert float(z[0, 0]) == pytest.approx(0.3 * 3.0)   # clipped
    q = mean_hw(x) / mean_hw(x).mean(1, keepdim=True)
    assert float(q[0, 0] / math.sqrt(1e-6 + gate.pool_norm.eps)) > 100   # unclipped: hundreds of deviations
