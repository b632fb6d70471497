"""mobilenet_v1: MobileNet v1 (Howard et al. 2017, arXiv 1704.04861), width 1.0, written here because
torchvision has none. Same layout as TF-slim's `mobilenet_v1` (569M MACs at 224, 4.2M params):
conv0 is a 3x3 stride-2 conv with 32 channels, then 13 depthwise-separable blocks conv1..conv13, each a 3x3
depthwise conv (groups = C) and a 1x1 pointwise conv, BN + ReLU6 after each; global average pool, Linear.

Sites: `conv0`, `convN.depthwise`, `convN.pointwise`; the alias `convN` selects both.
Module paths: features.conv0.conv, features.convN.depthwise / .pointwise (BNs: *_bn).
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from gatetune.models.nets._common import conv_bn_relu, init_weights
from gatetune.models.registry import ModelEntry, register
from gatetune.models.sites import Site

# c, n, s: n depthwise-separable blocks with c output channels, the first of them with stride s
_BLOCKS = [(64, 1, 1), (128, 2, 2), (256, 2, 2), (512, 6, 2), (1024, 2, 2)]


def _separable(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv_bn_relu("depthwise", c_in, c_in, stride, groups=c_in, relu=nn.ReLU6)
        + [("pointwise", nn.Conv2d(c_in, c_out, 1, bias=False)),
           ("pointwise_bn", nn.BatchNorm2d(c_out)), ("pointwise_relu", nn.ReLU6(inplace=True))]))


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, input_size: int = 224, dropout: float = 0.001):
        super().__init__()
        stem = nn.Sequential(OrderedDict(conv_bn_relu("conv", in_channels, 32, 2, relu=nn.ReLU6)))
        layers, c, i = [("conv0", stem)], 32, 1
        for c_out, n, s in _BLOCKS:
            for j in range(n):
                layers.append((f"conv{i}", _separable(c, c_out, s if j == 0 else 1)))
                c, i = c_out, i + 1
        self.features = nn.Sequential(OrderedDict(layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)  # TF-slim keeps 0.999
        self.fc = nn.Linear(c, num_classes)
        init_weights(self)

    def forward(self, x):
        return self.fc(self.dropout(self.avgpool(self.features(x)).flatten(1)))


def _sites() -> tuple[Site, ...]:
    n_blocks = sum(n for _, n, _ in _BLOCKS)
    return (Site("conv0", "features.conv0.conv", "features.conv0.conv_bn"),) + tuple(
        Site(f"conv{i}.{part}", f"features.conv{i}.{part}", f"features.conv{i}.{part}_bn")
        for i in range(1, n_blocks + 1) for part in ("depthwise", "pointwise"))


register(ModelEntry(name="mobilenet_v1", plain=MobileNetV1, sites=_sites(), default_input=(3, 224), classifier="fc"))
