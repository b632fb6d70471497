"""Contracts of gatetune.models, checked once per registered model (timm style), on CPU, small inputs."""
from __future__ import annotations

import math
import os
import urllib.error

import pytest
import torch
from torch import nn

import gatetune.models as M
from gatetune.models.gate import GatedConv2d, active_count
from gatetune.models.registry import ModelEntry, entry, register

MODELS = M.list_models()
SIZE = {m: 16 if m == "digitnet" else 32 for m in MODELS}  # cheap inputs; every model runs at 32x32
DENSITY = 0.3


def _specs(model, **kw):
    return {s: M.SiteSpec(**kw) for s in M.site_names(model)}


def _build(model, policy="fbs", **kw):
    c, _ = M.default_input(model)
    return M.build(model, num_classes=10, in_channels=c, input_size=SIZE[model], policy=policy, **kw)


def _images(model, n=2, seed=0):
    c, _ = M.default_input(model)
    return torch.randn(n, c, SIZE[model], SIZE[model], generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=[(m, p) for m in MODELS for p in M.POLICIES],
                ids=lambda mp: f"{mp[0]}-{mp[1]}")
def gated(request):
    """Every site gated at density 0.3 (ceil matters: 16 channels keep 5), weight 1e-3; every other site frozen."""
    model, policy = request.param
    names = M.site_names(model)
    sites = {s: M.SiteSpec(gate=True, density=DENSITY, weight=1e-3, trainable=i % 2 == 1) for i, s in enumerate(names)}
    torch.manual_seed(0)
    return model, policy, _build(model, policy, sites=sites)


def test_registry_lists_every_model_and_refuses_duplicates():
    assert MODELS == ["digitnet", "resnet20", "mcifarnet", "squeezenet_v11", "mobilenet_v1", "resnet18", "vgg16_bn"]
    with pytest.raises(ValueError, match="already registered"):
        register(ModelEntry("digitnet", entry("digitnet").plain, (), (1, 16), "fc"))


def test_forward_masks_and_densities(gated):
    model, policy, net = gated
    outputs, input_min, taps = {}, {}, {}
    hooks = [g.register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o.clone()))
             for n, g in net.gates.items()]
    hooks += [g.register_forward_pre_hook(lambda m, i, n=n: input_min.__setitem__(n, i[0].min()))
              for n, g in net.gates.items()]
    hooks += [g.tap.register_forward_hook(lambda m, a, o, n=n: taps.__setitem__(n, a)) for n, g in net.gates.items()]
    net.eval()
    with torch.no_grad(), net.record_gates() as rec:
        logits, gate_loss = net(_images(model), with_gate_loss=True)
    for h in hooks:
        h.remove()
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    # GatedConv2d computes mean|x| as mean x after the first site (nonneg_input): those inputs are ReLU outputs
    assert all(input_min[n] >= 0 for n in M.site_names(model)[1:])
    assert torch.isfinite(gate_loss) and gate_loss > 0
    assert gate_loss.item() == pytest.approx(sum(taps[n][1].item() for n in net.gates), rel=1e-6)
    for name, g in net.gates.items():
        k = active_count(DENSITY, g.conv.out_channels)
        mask = taps[name][0]
        assert (mask.sum(1) == k).all(), name                           # exactly k winners per sample
        losers = (mask == 0)[:, :, None, None].expand_as(outputs[name])
        assert (outputs[name][losers] == 0).all(), name                 # suppressed channels exactly zero
    d = rec.densities()
    assert set(d) == set(M.site_names(model))
    expected = {n: active_count(DENSITY, g.conv.out_channels) / g.conv.out_channels for n, g in net.gates.items()}
    assert d == pytest.approx(expected)
    c = [g.conv.out_channels for g in net.gates.values()]
    assert rec.density() == pytest.approx(sum(math.ceil(DENSITY * x) for x in c) / sum(c))
    counts = rec.selection_counts()
    assert all(torch.equal(counts[n][0], taps[n][0].sum(0)) and counts[n][1] == 2 for n in net.gates)
    assert all(not g.tap._forward_hooks for g in net.gates.values())   # every observer unhooked


def test_forward_returns_logits_and_the_gate_loss():
    """net(x) -> logits; net(x, with_gate_loss=True) -> (the same logits, sum of weight * site loss), the
    loss from the forward itself: a zero-weight site adds nothing, no weight at all gives a zero tensor."""
    torch.manual_seed(0)
    net = _build("digitnet", sites={s: M.SiteSpec(gate=True, density=0.5, weight=w)
                                    for s, w in zip(M.site_names("digitnet"), (0.0, 1e-2, 1.0, 0.0, 1e-3, 0.1))})
    x = _images("digitnet", n=4)
    terms = {}
    hooks = [g.tap.register_forward_hook(lambda m, a, o, n=n: terms.__setitem__(n, a[1])) for n, g in net.gates.items()]
    logits, loss = net(x, with_gate_loss=True)
    for h in hooks:
        h.remove()
    assert torch.equal(logits, net(x)) and loss.dim() == 0 and loss.requires_grad
    assert terms["conv1"] is None and terms["conv4"] is None
    assert torch.equal(loss, torch.stack([t for t in terms.values() if t is not None]).sum())
    net.set_gate_weights({n: 0.0 for n in net.gates})
    _, zero = net(_images("digitnet", n=4), with_gate_loss=True)
    assert zero.item() == 0.0 and not zero.requires_grad


def test_training_step_freezes_and_routes_gradients(gated):
    model, policy, net = gated
    net.train()
    net.zero_grad(set_to_none=True)
    first = next(iter(net.gates.values()))
    stats_before = first.bn.running_mean.clone() if first.bn is not None else None
    nn.functional.cross_entropy(net(_images(model, n=4)), torch.arange(4)).backward()
    for i, (name, g) in enumerate(net.gates.items()):
        frozen = i % 2 == 0
        conv_params = [g.conv.weight] + ([g.bn.weight] if g.bn is not None and g.bn.affine else [])
        assert all(p.requires_grad != frozen for p in conv_params), name
        assert all(p.grad is None for p in conv_params if frozen), name
        assert g.predictor.weight.requires_grad and (g.beta is None or g.beta.requires_grad)
        if policy == "mse":  # the predictor sees x.detach() and does not feed the output: no task gradient
            assert g.predictor.weight.grad is None, name
    if policy == "fbs":
        assert any(g.predictor.weight.grad is not None and g.predictor.weight.grad.abs().sum() > 0
                   for g in net.gates.values())
    if stats_before is not None:  # BN statistics keep updating, even for a frozen conv
        assert not torch.equal(first.bn.running_mean, stats_before)


def test_mse_gate_loss_trains_only_the_predictors():
    net = _build("digitnet", "mse", sites=_specs("digitnet", gate=True, density=0.5, weight=1.0))
    _, gate_loss = net(_images("digitnet", n=4), with_gate_loss=True)
    gate_loss.backward()
    for g in net.gates.values():
        assert g.predictor.weight.grad.abs().sum() > 0
        assert g.conv.weight.grad is None and g.bn.weight.grad is None


@pytest.mark.parametrize("model", MODELS)
def test_layers_table(model):
    rows = M.layers_table(model, num_classes=10)
    assert [r["site"] for r in rows] == M.site_names(model)
    for r in rows:
        assert set(r) == {"site", "aliases", "c_in", "c_out", "dense_macs"} and r["dense_macs"] > 0
        assert M.resolve_sites(model, r["site"]) == [r["site"]]
        for alias in filter(None, r["aliases"].split(", ")):
            assert r["site"] in M.resolve_sites(model, alias)


def test_layers_table_known_totals():
    macs = {m: sum(r["dense_macs"] for r in M.layers_table(m)) for m in ("digitnet", "mcifarnet", "mobilenet_v1")}
    assert macs["digitnet"] == 9_510_912                      # 6 convs at 16x16
    assert round(macs["mcifarnet"] / 1e6) == 174              # Mayo's M-CifarNet
    assert round(macs["mobilenet_v1"] / 1e6) == 568           # + 1M in fc = TF-slim's 569M
    assert M.default_input("digitnet") == (1, 16) and M.default_input("squeezenet_v11") == (3, 224)


@pytest.mark.parametrize("model,pattern,expected", [
    ("squeezenet_v11", "fire6", ["fire6.squeeze", "fire6.expand1", "fire6.expand3"]),
    ("squeezenet_v11", "features.3.expand1x1", ["fire2.expand1"]),
    ("squeezenet_v11", "features.3", ["fire2.squeeze", "fire2.expand1", "fire2.expand3"]),
    ("squeezenet_v11", ["fire7.expand3", "fire6", "fire6.squeeze"],
     ["fire6.squeeze", "fire6.expand1", "fire6.expand3", "fire7.expand3"]),
    ("resnet20", "layer1.0", ["layer1.0.conv1", "layer1.0.conv2"]),
    ("resnet20", "conv1, layer3.2.conv2", ["conv1", "layer3.2.conv2"]),
    ("vgg16_bn", "conv1", ["conv1_1", "conv1_2"]),
    ("vgg16_bn", "features.40", ["conv5_3"]),
    ("mobilenet_v1", "conv{12..13}", ["conv12.depthwise", "conv12.pointwise", "conv13.depthwise", "conv13.pointwise"]),
    ("mobilenet_v1", "conv{9..13}.pointwise", [f"conv{i}.pointwise" for i in range(9, 14)]),
    ("mobilenet_v1", "none", []),
])
def test_resolve_sites(model, pattern, expected):
    assert M.resolve_sites(model, pattern) == expected


def test_resolve_sites_globs_and_all():
    assert M.resolve_sites("squeezenet_v11", "fire[6-9]") == [s for s in M.site_names("squeezenet_v11")
                                                               if s[:5] in ("fire6", "fire7", "fire8", "fire9")]
    assert len(M.resolve_sites("squeezenet_v11", "fire[6-9]")) == 12
    assert M.resolve_sites("resnet20", "layer3.*") == [s for s in M.site_names("resnet20") if s.startswith("layer3.")]
    assert M.resolve_sites("mobilenet_v1", "conv*") == M.site_names("mobilenet_v1")
    for m in MODELS:
        assert M.resolve_sites(m, "all") == M.site_names(m)


def test_errors_name_the_value_and_the_nearest_options():
    with pytest.raises(M.ModelError) as e:
        M.resolve_sites("squeezenet_v11", "fire66")
    msg = str(e.value)
    assert "fire66" in msg and "'fire6'" in msg and "gatetune layers squeezenet_v11" in msg and "\n" not in msg
    with pytest.raises(M.ModelError, match="'resnet20'"):
        M.build("resnet2", num_classes=10, in_channels=3, input_size=32)
    with pytest.raises(M.ModelError, match="'fire6.squeeze'.*resolve_sites"):
        M.build("squeezenet_v11", num_classes=10, in_channels=3, input_size=32, sites={"fire6.squeez": M.SiteSpec()})
    with pytest.raises(M.ModelError, match="'fbs'"):
        _build("digitnet", policy="fsb")
    with pytest.raises(M.ModelError, match="mobilenet_v1"):
        M.resolve_sites("mobilenet_v1", "conv{9..14}")
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(M.ModelError, match="0 < density <= 1"):
            M.SiteSpec(density=bad)
    with pytest.raises(M.ModelError, match="weight"):
        M.SiteSpec(weight=float("nan"))


def test_ungated_sites_keep_the_plain_modules():
    net = _build("resnet20", sites={"layer2.0.conv1": M.SiteSpec(gate=True, density=0.5),
                                     "layer2.0.conv2": M.SiteSpec(trainable=False)})
    assert list(net.gates) == ["layer2.0.conv1"]
    block = net.net.layer2[0]
    assert not block.conv2.weight.requires_grad and not block.bn2.weight.requires_grad
    assert block.conv1.conv.weight.requires_grad and net.net.layer3[0].conv2.weight.requires_grad
    assert isinstance(net.net.layer2[0].conv1, GatedConv2d) and isinstance(net.net.layer2[0].bn1, nn.Identity)
    assert isinstance(net.net.layer2[0].conv2, nn.Conv2d) and isinstance(net.net.layer2[0].bn2, nn.BatchNorm2d)
    plain = _build("resnet20")
    with plain.record_gates() as rec:
        _, gate_loss = plain(_images("resnet20"), with_gate_loss=True)
    assert gate_loss.item() == 0.0 and rec.densities() == {} and rec.density() == 1.0


# --- dense weights -------------------------------------------------------------------------------------

def _randomise_bn(net, seed=0):
    """Trained-looking BN: running stats and affine away from their defaults, some negative gammas."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight[::7] *= -1
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return net


@pytest.mark.parametrize("model", [m for m in MODELS if m != "vgg16_bn"])  # vgg16_bn: a 0.5 GB file
def test_dense_weights_reproduce_the_plain_network(model, tmp_path):
    c, _ = M.default_input(model)
    plain = _randomise_bn(entry(model).plain(10, c, SIZE[model])).eval()
    path = tmp_path / "dense.pt"
    torch.save({"model": plain.state_dict()}, path)
    net = _build(model, sites=_specs(model, gate=True, density=1.0), weights=str(path)).eval()
    with torch.no_grad():
        for g in net.gates.values():
            g.predictor.weight.zero_()
        x = _images(model)
        assert torch.allclose(net(x), plain(x), rtol=1e-4, atol=1e-5)


def test_weight_file_errors(tmp_path):
    digit = entry("digitnet").plain(10, 1, 16)
    path = tmp_path / "digitnet.pt"
    torch.save(digit.state_dict(), path)
    with pytest.raises(M.ModelError, match=r"digitnet\.pt.*does not fit resnet20: first mismatching key"):
        M.build("resnet20", num_classes=10, in_channels=3, input_size=32, weights=str(path))
    with pytest.raises(M.ModelError, match=r"'conv1\.weight' has shape \(32, 1, 3, 3\).*\(32, 3, 3, 3\)"):
        M.build("digitnet", num_classes=10, in_channels=3, input_size=16, weights=str(path))
    with pytest.warns(UserWarning, match="classifier 'fc'"):
        net = M.build("digitnet", num_classes=5, in_channels=1, input_size=16, weights=str(path))
    assert torch.equal(net.net.conv2.weight, digit.conv2.weight) and net.net.fc.out_features == 5
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for bad, match in ((tmp_path / "junk.pt", "cannot read weights file"), (tmp_path / "none.pt", "does not exist")):
        with pytest.raises(M.ModelError, match=match):
            M.build("digitnet", num_classes=10, in_channels=1, input_size=16, weights=str(bad))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(M.ModelError, match="not a state dict"):
        M.build("digitnet", num_classes=10, in_channels=1, input_size=16, weights=str(tmp_path / "list.pt"))


def _torchvision_cache(tmp_path, monkeypatch, weights_enum):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder / os.path.basename(weights_enum.DEFAULT.url)


def test_torchvision_weights_offline(tmp_path, monkeypatch):
    """A fake file at torch.hub's cache path, under torchvision's expected name: nothing is downloaded."""
    from torchvision.models import SqueezeNet1_1_Weights, squeezenet1_1

    fake = squeezenet1_1().state_dict()
    torch.save(fake, _torchvision_cache(tmp_path, monkeypatch, SqueezeNet1_1_Weights))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    net = M.build("squeezenet_v11", num_classes=1000, in_channels=3, input_size=32, weights="torchvision")
    assert torch.equal(net.net.features[12].expand3x3.weight, fake["features.12.expand3x3.weight"])
    with pytest.warns(UserWarning, match="another num_classes"):
        net = M.build("squeezenet_v11", num_classes=10, in_channels=3, input_size=32, weights="torchvision")
    assert torch.equal(net.net.features[0].weight, fake["features.0.weight"])


def _no_network(url, *args, **kwargs):
    raise urllib.error.URLError("no network in tests")


def test_torchvision_weights_errors(tmp_path, monkeypatch):
    from torchvision.models import ResNet18_Weights

    cached = _torchvision_cache(tmp_path, monkeypatch, ResNet18_Weights)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    with pytest.raises(M.ModelError, match=f"cannot get torchvision weights.*{cached.name}.*weights=PATH"):
        M.build("resnet18", num_classes=10, in_channels=3, input_size=32, weights="torchvision")
    with pytest.raises(M.ModelError, match="no torchvision weights.*squeezenet_v11, resnet18, vgg16_bn"):
        M.build("resnet20", num_classes=10, in_channels=3, input_size=32, weights="torchvision")
