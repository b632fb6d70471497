"""CIFAR-10 at full size (slow): the 60,000-image JPEG copy beside the checkout (../shared/data/cifar10-jpeg,
unpacked into a temporary folder; read-only where it lies) read as a `folder` dataset, a dense resnet20
trained one epoch on all 50,000 training images, the gated net built from its checkpoint equal to it at
density 1.0, and fine-tuned at density 0.5 with dynamic gates at every site."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from gatetune import models
from gatetune.models import SiteSpec
from gatetune.tuning import config as C
from gatetune.tuning.config import DataCfg
from gatetune.tuning.data import load
from gatetune.tuning.train.loop import evaluate, fit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARBALL = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg", "cifar10-jpeg.tar.gz")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.isfile(TARBALL), reason=f"no CIFAR-10 JPEG copy at {TARBALL}")]


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar10")
    subprocess.run(["tar", "-xzf", TARBALL, "-C", str(folder)], check=True)
    os.environ["GATETUNE_CACHE_DIR"] = str(folder / "cache")
    try:
        yield str(folder), load(DataCfg(dataset="folder", root=str(folder)), torch.device("cpu"))
    finally:
        os.environ.pop("GATETUNE_CACHE_DIR", None)


def _cfg(root: str, **train) -> C.Config:
    gating = train.pop("gating", {"gate": "none"})
    weights = train.pop("weights", None)
    return C.load_dict({"model": {"name": "resnet20", "weights": weights}, "data": {"dataset": "folder", "root": root},
                        "gating": gating, "train": {"epochs": 1, "batch_size": 128, "device": "cpu", "threads": 2,
                                                    "lr_schedule": {"name": "cosine"}, **train}})


def test_full_cifar10_as_a_folder(cifar10):
    _, data = cifar10
    assert (len(data.train), len(data.val), data.num_classes, data.input_size) == (50_000, 10_000, 10, 32)
    assert data.train.labels.bincount().tolist() == [5000] * 10   # test/ serves as the validation split


def test_dense_then_gated_on_full_cifar10(cifar10, tmp_path):
    root, data = cifar10
    states = []
    dense = fit(_cfg(root, optimizer={"lr": 0.05}), lambda m, s: states.append(s), data=data,
                device=torch.device("cpu"))
    assert dense["top1"] > 35   # one dense epoch of the 50,000 reached 41.96% through the old imagenet path
    path = tmp_path / "dense.pt"
    torch.save(states[-1], path)
    net = models.build("resnet20", num_classes=10, in_channels=3, input_size=32, weights=str(path),
                       sites={s: SiteSpec(gate=True, density=1.0) for s in models.site_names("resnet20")})
    assert abs(evaluate(net, data.val, 500)["top1"] - dense["top1"]) <= 0.1
    gated = fit(_cfg(root, optimizer={"lr": 0.02}, weights=str(path), gating={"density": 0.5, "weight": 1e-8}),
                lambda m, s: None, data=data, device=torch.device("cpu"))
    assert not gated["diverged"] and gated["top1"] > dense["top1"] - 10
    sites = json.loads(gated["gate_sites"])
    assert all(v["dynamic"] > 0 for v in sites.values()), sites
