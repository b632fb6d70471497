"""Every shipped config loads and validates (ImageNet ones against a tiny ImageFolder made here)."""
import glob
import os

import pytest
from PIL import Image

from gatetune.tuning import config as C
from gatetune.tuning.space import prepare

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


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(f) for f in FILES])
def test_shipped_config_validates(path, imagenet_root):
    overrides = [f"data.root={imagenet_root}"] if "imagenet" in path else []
    cfg = C.load(path, overrides)
    specs = C.site_specs(cfg)
    assert any(s.gate for s in specs.values())
    if cfg.search is not None:
        plan = prepare(cfg, path)
        assert plan.params and plan.base["data"]["root"] in (None, imagenet_root)


def test_notebook_runs_gate_the_notebook_sites(imagenet_root):
    sq = C.site_specs(C.load(os.path.join(ROOT, "search_spaces", "squeezenet_imagenet.yaml"),
                             [f"data.root={imagenet_root}"]))
    assert sorted(s for s, v in sq.items() if v.gate) == sorted(
        f"fire{i}.{e}" for i in range(6, 10) for e in ("expand1", "expand3"))
    mb = C.site_specs(C.load(os.path.join(ROOT, "search_spaces", "mobilenet_imagenet.yaml"),
                             [f"data.root={imagenet_root}"]))
    assert sorted(s for s, v in mb.items() if v.gate) == sorted(f"conv{i}.pointwise" for i in range(9, 14))
    assert mb["conv9.depthwise"].trainable and not mb["conv8.pointwise"].trainable
