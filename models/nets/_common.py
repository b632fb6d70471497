"""Small helpers shared by the network files."""
from __future__ import annotations

from torch import nn


def conv_bn_relu(prefix: str, c_in: int, c_out: int, stride: int = 1, padding: int = 1,
                 groups: int = 1, relu: type[nn.Module] = nn.ReLU) -> list[tuple[str, nn.Module]]:
    """[(prefix, 3x3 conv), (prefix_bn, BN), (prefix_relu, act)] for an OrderedDict Sequential."""
    return [(prefix, nn.Conv2d(c_in, c_out, 3, stride, padding, groups=groups, bias=False)),
            (f"{prefix}_bn", nn.BatchNorm2d(c_out)),
            (f"{prefix}_relu", relu(inplace=True))]


def init_weights(net: nn.Module) -> nn.Module:
    """He init for convs (fan_out, as torchvision), BN gamma 1 / beta 0, small normal for linears."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return net


def replace_stem(net: nn.Module, path: str, in_channels: int) -> nn.Module:
    """Swap the first conv at `path` for one reading `in_channels` (same kernel, stride, padding, bias)."""
    old: nn.Conv2d = net.get_submodule(path)
    if old.in_channels == in_channels:
        return net
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    bias=old.bias is not None)
    parent, _, leaf = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, new)
    return net
