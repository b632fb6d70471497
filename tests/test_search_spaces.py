"""Every shipped config loads and validates (ImageNet ones against a tiny ImageFolder made here, the
CIFAR-10 GPU recipes against an empty cifar-10-batches-py layout)."""
import glob
import os

import pytest
import yaml
from PIL import Image

from gatetune.tuning import config as C
from gatetune.tuning.search.space import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(ROOT, "search_spaces", "*.yaml")))


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    for split in ("train", "val"):
        for cls in ("n01440764", "n01443537"):
            d = root / split / cls
            d.mkdir(parents=True)
            Image.new("RGB", (40, 40), (120, 30, 200)).save(d / "a.JPEG")
    return str(root)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    import torchvision.datasets as tvd
    root = tmp_path_factory.mktemp("cifar")
    (root / tvd.CIFAR10.base_folder).mkdir()
    for f in [f for f, _ in tvd.CIFAR10.train_list + tvd.CIFAR10.test_list] + [tvd.CIFAR10.meta["filename"]]:
        (root / tvd.CIFAR10.base_folder / f).write_bytes(b"")   # the check reads names, not contents
    return str(root)


def _root_for(path, imagenet_root, cifar_root):
    if "imagenet" in path:
        return [f"data.root={imagenet_root}"]
    with open(path) as f:
        data = (yaml.safe_load(f) or {}).get("data") or {}
    return [f"data.root={cifar_root}"] if data.get("dataset") == "cifar10" else []


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(f) for f in FILES])
def test_shipped_config_validates(path, imagenet_root, cifar_root):
    overrides = _root_for(path, imagenet_root, cifar_root)
    cfg = C.load(path, overrides)
    specs = C.site_specs(cfg)
    assert any(s.gate for s in specs.values())
    if cfg.search is not None:
        plan = prepare(cfg, path)
        shipped = os.path.join(ROOT, "data", "cifar10-subset")
        assert plan.params and plan.base["data"]["root"] in (None, imagenet_root, cifar_root, shipped)


def test_notebook_runs_gate_the_notebook_sites(imagenet_root):
    sq = C.site_specs(C.load(os.path.join(ROOT, "search_spaces", "squeezenet_imagenet.yaml"),
                             [f"data.root={imagenet_root}"]))
    assert sorted(s for s, v in sq.items() if v.gate) == sorted(
        f"fire{i}.{e}" for i in range(6, 10) for e in ("expand1", "expand3"))
    mb = C.site_specs(C.load(os.path.join(ROOT, "search_spaces", "mobilenet_imagenet.yaml"),
                             [f"data.root={imagenet_root}"]))
    assert sorted(s for s, v in mb.items() if v.gate) == sorted(f"conv{i}.pointwise" for i in range(9, 14))
    assert mb["conv9.depthwise"].trainable and not mb["conv8.pointwise"].trainable
