"""Dense weights into a plain network, before gating surgery (so predictors start fresh and the gate's
beta / saliency bias come from the loaded BN); or a gated network's own checkpoint into a gated network
gated at the same sites with the same policy (load_gated: a lower density continues from a higher one,
predictors and all; only the number of channels each gate keeps changes).

Sources: a file holding the plain network's state_dict (torchvision format for torchvision models), or a
dict with that state_dict under "model" (or "state_dict"); or "torchvision", the DEFAULT ImageNet weights
of torchvision's weights API, fetched through torch.hub's cache ($TORCH_HOME/hub/checkpoints/).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from gatetune.models.errors import ModelError, nearest
from gatetune.models.registry import ModelEntry, list_models, entry

__all__ = ["load_dense", "load_state", "load_gated", "read_state_file", "is_gated"]


def load_dense(net: nn.Module, e: ModelEntry, weights: str) -> None:
    """Load `weights` into `net` (the plain `e.name` network) in place. Only a classifier whose shape
    differs (another num_classes) is skipped, with a warning; any other mismatch is a ModelError."""
    if weights == "torchvision":
        state, source = _torchvision_state(e), f"torchvision weights {e.torchvision_weights}.DEFAULT"
    else:
        state, source = read_state_file(weights), f"weights file {weights!r}"
    load_state(net, state, source, e)


def _oneline(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def read_state_file(path: str) -> dict[str, torch.Tensor]:
    """A dense state dict from a file (tensors only: loading must not run code); ModelError if not."""
    if not os.path.isfile(path):
        raise ModelError(f"weights file {path!r} does not exist; pass the path of a saved state_dict, "
                         "or weights='torchvision'")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and unsafe-global errors all mean the same to the user
        # type only: torch's text for this case advises weights_only=False, an unsafe fix to pass on
        raise ModelError(f"cannot read weights file {path!r} ({type(exc).__name__}); "
                         "save it with torch.save(model.state_dict(), path)") from exc
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not (isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                        for k, v in obj.items())):
        raise ModelError(f"weights file {path!r} holds {type(obj).__name__}, not a state dict of tensors; "
                         "save it with torch.save(model.state_dict(), path) or as {'model': state_dict}")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    if all(k.startswith("net.") for k in obj):     # a gatetune checkpoint (GatedNet wraps the plain net)
        obj = {k[len("net."):]: v for k, v in obj.items()}
    return dict(obj)


def is_gated(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict (read_state_file's) is a gated network's: it holds gate predictors."""
    return any(".predictor." in k for k in state)


def load_gated(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """A gated network's state (read_state_file's, `net.` stripped) into GatedNet `net`, every key: the same
    model gated at the same sites with the same policy; ModelError naming the first site that differs."""
    expected = net.net.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        key = (missing or extra)[0]
        where = "missing from the checkpoint" if missing else f"not in this {net.model_name}"
        raise ModelError(f"{source} is a gated checkpoint that does not fit this gating: key {key!r} is {where}; "
                         "start from it with the gating.gate and gating.policy it was trained with")
    wrong = next((k for k in expected if state[k].shape != expected[k].shape), None) if not missing else None
    if wrong is not None:
        raise ModelError(f"{source} does not fit {net.model_name}: key {wrong!r} has shape "
                         f"{tuple(state[wrong].shape)} there but {tuple(expected[wrong].shape)} here; use a "
                         "checkpoint of the same architecture")
    net.net.load_state_dict(state, strict=False)


def _torchvision_state(e: ModelEntry) -> dict[str, torch.Tensor]:
    if e.torchvision_weights is None:
        have = [m for m in list_models() if entry(m).torchvision_weights]
        raise ModelError(f"model {e.name!r} has no torchvision weights (models with them: {', '.join(have)}); "
                         "pass weights=PATH to a dense state_dict file instead")
    import torchvision.models

    w = getattr(torchvision.models, e.torchvision_weights).DEFAULT
    try:
        return w.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # no network, proxy, HTTP error, corrupt cache file
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))
        raise ModelError(f"cannot get torchvision weights {e.torchvision_weights}.DEFAULT from {w.url} "
                         f"({_oneline(exc)}); download that file to {cached} on a machine with network, "
                         "or pass weights=PATH") from exc


def load_state(net: nn.Module, state: dict, source: str, e: ModelEntry) -> None:
    """A dense state dict into the plain network `net` (see load_dense)."""
    if is_gated(state):
        raise ModelError(f"{source} is a checkpoint of a gated network; dense weights come "
                         "from a run with gating.gate=none")
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        key, where = (missing[0], "missing from the weights") if missing else (extra[0], f"not in {e.name}")
        other = list(state) if missing else list(expected)
        raise ModelError(f"{source} does not fit {e.name}: first mismatching key {key!r} is {where} "
                         f"({nearest(key, other)}); use weights saved from {e.name}'s plain network")
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    head = [k for k in wrong if k.startswith(e.classifier + ".")]
    if len(head) < len(wrong):
        k = next(k for k in wrong if k not in head)
        raise ModelError(f"{source} does not fit {e.name}: first mismatching key {k!r} has shape "
                         f"{tuple(state[k].shape)} in the weights but {tuple(expected[k].shape)} in the model; "
                         "check in_channels and use weights saved from the same architecture")
    if head:
        warnings.warn(f"{source}: classifier {e.classifier!r} has another shape "
                      f"({tuple(state[head[0]].shape)} vs {tuple(expected[head[0]].shape)}, another num_classes); "
                      "loaded everything else, the classifier starts fresh", stacklevel=3)
        state = {k: v for k, v in state.items() if k not in head}
    net.load_state_dict(state, strict=False)
