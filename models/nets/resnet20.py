"""resnet20: the CIFAR ResNet-20 of He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
section 4.2: a 3x3 stem with 16 channels, then 3 stages of 3 BasicBlocks (16, 32, 64 channels, stride 1, 2, 2),
global average pool, Linear(64, num_classes). Shortcuts: identity, or 1x1 conv + BN when the shape changes
(option B; the shortcut conv is not a gate site). About 41M MACs per 32x32 image.

Module names follow torchvision's ResNet (conv1/bn1, layerI.J.conv1/bn1/conv2/bn2, downsample), so the
site names are the module paths.
"""
from __future__ import annotations

from torch import nn

from gatetune.models.nets._common import init_weights
from gatetune.models.registry import ModelEntry, register
from gatetune.models.sites import Site

# c, n, s
_STAGES = [(16, 3, 1), (32, 3, 2), (64, 3, 2)]


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32):
        from torchvision.models.resnet import BasicBlock   # here: importing torchvision costs 0.8 s a process
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        c = 16
        for i, (c_out, n, s) in enumerate(_STAGES, start=1):
            blocks = []
            for j in range(n):
                stride = s if j == 0 else 1
                down = None
                if stride != 1 or c != c_out:
                    down = nn.Sequential(nn.Conv2d(c, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                blocks.append(BasicBlock(c, c_out, stride, down))
                c = c_out
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _sites() -> tuple[Site, ...]:
    sites = [Site("conv1", "conv1", "bn1")]
    for i, (_, n, _) in enumerate(_STAGES, start=1):
        for j in range(n):
            sites += [Site(f"layer{i}.{j}.conv{k}", f"layer{i}.{j}.conv{k}", f"layer{i}.{j}.bn{k}") for k in (1, 2)]
    return tuple(sites)


register(ModelEntry(name="resnet20", plain=ResNet20, sites=_sites(), default_input=(3, 32), classifier="fc"))
