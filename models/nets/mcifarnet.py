"""mcifarnet: M-CifarNet, the 8-layer CIFAR-10 network of Mayo's FBS experiments (Gao et al., ICLR 2019,
table 1: 174M MACs, 91.37% top-1).

conv0..conv7 are 3x3 conv-BN-ReLU with 64, 64, 128, 128, 128, 192, 192, 192 channels. Layout chosen to
land on the published 174M MACs at 32x32 (it does: 174.3M): conv0 has no padding (32 -> 30), conv2 and
conv5 have stride 2 (30 -> 15 -> 8), the rest are stride 1 'same'. Then global average pool and
Linear(192, num_classes). This is also the layout of the 63days/FBS-practice PyTorch port.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from gatetune.models.nets._common import conv_bn_relu, init_weights
from gatetune.models.registry import ModelEntry, register
from gatetune.models.sites import Site

# c_out, stride, padding
_CFG = [(64, 1, 0), (64, 1, 1), (128, 2, 1), (128, 1, 1), (128, 1, 1), (192, 2, 1), (192, 1, 1), (192, 1, 1)]


def mcifarnet(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Sequential:
    layers, c = [], in_channels
    for i, (c_out, s, p) in enumerate(_CFG):
        layers += conv_bn_relu(f"conv{i}", c, c_out, stride=s, padding=p)
        c = c_out
    layers += [("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(c, num_classes))]
    return init_weights(nn.Sequential(OrderedDict(layers)))


register(ModelEntry(
    name="mcifarnet", plain=mcifarnet, default_input=(3, 32), classifier="fc",
    sites=tuple(Site(f"conv{i}", f"conv{i}", f"conv{i}_bn") for i in range(len(_CFG))),
))
