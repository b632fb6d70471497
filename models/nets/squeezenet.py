"""squeezenet_v11: torchvision's `squeezenet1_1` (Iandola et al. 2016, SqueezeNet v1.1), unchanged, so
torchvision's ImageNet weights load. No BN anywhere: the fbs gate uses its no-BN form (s * conv x).

Sites: `conv1` (features.0), and `fireN.squeeze`, `fireN.expand1`, `fireN.expand3` for fire2..fire9 (the
notebook's names); `fireN` and torchvision's `features.I` select a fire module's three convs, and
torchvision's conv paths (`features.3.expand1x1`) are aliases too. The final 1x1 classifier conv is not a site.
"""
from __future__ import annotations


from gatetune.models.nets._common import replace_stem
from gatetune.models.registry import ModelEntry, register
from gatetune.models.sites import Site

_FIRES = {2: 3, 3: 4, 4: 6, 5: 7, 6: 9, 7: 10, 8: 11, 9: 12}  # fire number -> index in `features`
_CONVS = {"squeeze": "squeeze", "expand1": "expand1x1", "expand3": "expand3x3"}  # notebook -> torchvision


def squeezenet_v11(num_classes: int = 1000, in_channels: int = 3, input_size: int = 224):
    from torchvision.models import squeezenet1_1
    return replace_stem(squeezenet1_1(num_classes=num_classes), "features.0", in_channels)


register(ModelEntry(
    name="squeezenet_v11", plain=squeezenet_v11, default_input=(3, 224), classifier="classifier.1",
    torchvision_weights="SqueezeNet1_1_Weights",
    sites=(Site("conv1", "features.0"),) + tuple(
        Site(f"fire{n}.{ours}", f"features.{i}.{theirs}", groups=(f"features.{i}",))
        for n, i in _FIRES.items() for ours, theirs in _CONVS.items()),
))
