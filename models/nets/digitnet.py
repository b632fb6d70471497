"""digitnet: a small CNN for scikit-learn's 8x8 digits upscaled to 1x16x16 (the offline default data).

conv1..conv6 are 3x3 conv-BN-ReLU with 32, 32, 64, 64, 128, 128 channels; 2x2 max pool after conv2 and
conv4 (16 -> 8 -> 4), global average pool, Linear(128, num_classes). About 9.5M dense MACs per 16x16 image.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from gatetune.models.nets._common import conv_bn_relu, init_weights
from gatetune.models.registry import ModelEntry, register
from gatetune.models.sites import Site

# c_out, pool after
_CFG = [(32, False), (32, True), (64, False), (64, True), (128, False), (128, False)]


def digitnet(num_classes: int = 10, in_channels: int = 1, input_size: int = 16) -> nn.Sequential:
    layers, c = [], in_channels
    for i, (c_out, pool) in enumerate(_CFG, start=1):
        layers += conv_bn_relu(f"conv{i}", c, c_out)
        if pool:
            layers.append((f"pool{i}", nn.MaxPool2d(2)))
        c = c_out
    layers += [("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(c, num_classes))]
    return init_weights(nn.Sequential(OrderedDict(layers)))


register(ModelEntry(
    name="digitnet", plain=digitnet, default_input=(1, 16), classifier="fc",
    sites=tuple(Site(f"conv{i}", f"conv{i}", f"conv{i}_bn") for i in range(1, len(_CFG) + 1)),
))
