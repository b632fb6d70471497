"""The model table: name -> plain-network builder + site table. Everything that takes a model name
resolves it here, so a typo fails the same way everywhere."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gatetune.models.errors import ModelError, nearest
from gatetune.models.macs import conv_macs
from gatetune.models.sites import Site, SiteIndex

__all__ = ["ModelEntry", "register", "entry", "list_models", "site_names", "resolve_sites",
           "default_input", "layers_table"]


@dataclass(frozen=True)
class ModelEntry:
    """One registered network."""

    name: str
    plain: Callable[[int, int, int], nn.Module]  # (num_classes, in_channels, input_size) -> dense network
    sites: tuple[Site, ...]                      # gateable convs, forward order
    default_input: tuple[int, int]               # (in_channels, input_size) it was designed for
    classifier: str                              # module path of the final classifier (never a site)
    torchvision_weights: str | None = None       # torchvision.models weights enum, e.g. "ResNet18_Weights"
    signed_inputs: tuple[str, ...] | None = None  # sites whose input can be < 0; None: just the first (the stem
    #                                               reads the image, every later site a ReLU output; tested)


_REGISTRY: dict[str, ModelEntry] = {}
_INDEX: dict[str, SiteIndex] = {}


def register(e: ModelEntry) -> ModelEntry:
    """Add a model; a second model with the same name is refused (it would silently shadow the first)."""
    if e.name in _REGISTRY:
        raise ValueError(f"model name {e.name!r} is already registered; pick another name")
    _INDEX[e.name] = SiteIndex(e.name, e.sites)
    _REGISTRY[e.name] = e
    return e


def entry(model: str) -> ModelEntry:
    if model not in _REGISTRY:
        raise ModelError(f"unknown model {model!r}; {nearest(str(model), _REGISTRY)} "
                         f"(models: {', '.join(_REGISTRY)})")
    return _REGISTRY[model]


def index(model: str) -> SiteIndex:
    entry(model)
    return _INDEX[model]


def list_models() -> list[str]:
    return list(_REGISTRY)


def site_names(model: str) -> list[str]:
    """Canonical site names of `model`, in forward order."""
    return index(model).names


def resolve_sites(model: str, patterns: str | list[str]) -> list[str]:
    """Names, aliases, globs, brace ranges, `all`, `none` -> canonical site names (forward order, unique)."""
    return index(model).resolve(patterns)


def default_input(model: str) -> tuple[int, int]:
    """(in_channels, input_size) the model was designed for: digitnet (1, 16), resnet20 (3, 32), ..."""
    return entry(model).default_input


def layers_table(model: str, num_classes: int = 1000, in_channels: int | None = None,
                 input_size: int | None = None) -> list[dict]:
    """One row per site: site, aliases, c_in, c_out, dense_macs (per image, at `input_size`).

    Shapes come from one forward pass on the meta device: nothing is allocated or computed, so this is
    instant even for vgg16_bn at 224. in_channels / input_size default to `default_input(model)`.
    """
    e, idx = entry(model), index(model)
    c_in, size = e.default_input
    c_in, size = in_channels or c_in, input_size or size
    with torch.device("meta"):
        net = e.plain(num_classes, c_in, size).eval()
        macs: dict[str, int] = {}
        hooks = [net.get_submodule(s.conv).register_forward_hook(_record_macs(macs, s.name)) for s in e.sites]
        try:
            net(torch.empty(1, c_in, size, size))
        except RuntimeError as exc:
            raise ModelError(f"input_size={size} is too small for {model} ({str(exc).splitlines()[0]}); "
                             f"use a larger input_size (default {e.default_input[1]})") from exc
    for h in hooks:
        h.remove()
    rows = []
    for s in e.sites:
        conv = net.get_submodule(s.conv)
        rows.append({"site": s.name, "aliases": ", ".join(idx.aliases_of(s.name)),
                     "c_in": conv.in_channels, "c_out": conv.out_channels, "dense_macs": macs[s.name]})
    return rows


def _record_macs(store: dict, name: str):
    def hook(module, inputs, out):
        store[name] = conv_macs(module, out)
    return hook
