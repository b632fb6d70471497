"""resnet18: torchvision's `resnet18` (He et al., CVPR 2016), unchanged, so torchvision's ImageNet weights
load. Sites are the module paths: `conv1` (stem), `layerI.J.conv1`, `layerI.J.conv2`; the downsample 1x1
convs and the fc layer are not sites. A BasicBlock's gated conv2 feeds the residual add (gate after BN,
before the add). Works at any input >= 32 (adaptive average pool).
"""
from __future__ import annotations


from gatetune.models.nets._common import replace_stem
from gatetune.models.registry import ModelEntry, register
from gatetune.models.sites import Site


def resnet18(num_classes: int = 1000, in_channels: int = 3, input_size: int = 224):
    from torchvision.models import resnet18 as tv_resnet18
    return replace_stem(tv_resnet18(num_classes=num_classes), "conv1", in_channels)


register(ModelEntry(
    name="resnet18", plain=resnet18, default_input=(3, 224), classifier="fc", torchvision_weights="ResNet18_Weights",
    sites=(Site("conv1", "conv1", "bn1"),) + tuple(
        Site(f"layer{i}.{j}.conv{k}", f"layer{i}.{j}.conv{k}", f"layer{i}.{j}.bn{k}")
        for i in (1, 2, 3, 4) for j in (0, 1) for k in (1, 2)),
))
