"""vgg16_bn: torchvision's `vgg16_bn` (Simonyan & Zisserman 2015, with BN), unchanged, so torchvision's
ImageNet weights load. Sites `conv1_1`..`conv5_3` (block_index); aliases: torchvision's paths `features.I`
and `convB` for all convs of block B. The three classifier Linears are not sites. Works at input 32
(the adaptive pool repeats the 1x1 map to 7x7).
"""
from __future__ import annotations


from gatetune.models.nets._common import replace_stem
from gatetune.models.registry import ModelEntry, register
from gatetune.models.sites import Site

_BLOCKS = [2, 2, 3, 3, 3]  # convs per block; each conv is (conv, BN, ReLU) and each block ends in a max pool


def vgg16_bn(num_classes: int = 1000, in_channels: int = 3, input_size: int = 224):
    from torchvision.models import vgg16_bn as tv_vgg16_bn
    return replace_stem(tv_vgg16_bn(num_classes=num_classes), "features.0", in_channels)


def _sites() -> tuple[Site, ...]:
    sites, i = [], 0
    for b, n in enumerate(_BLOCKS, start=1):
        for j in range(1, n + 1):
            sites.append(Site(f"conv{b}_{j}", f"features.{i}", f"features.{i + 1}", groups=(f"conv{b}",)))
            i += 3
        i += 1  # max pool
    return tuple(sites)


register(ModelEntry(name="vgg16_bn", plain=vgg16_bn, sites=_sites(), default_input=(3, 224),
                    classifier="classifier.6", torchvision_weights="VGG16_BN_Weights"))
