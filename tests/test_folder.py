"""`data.dataset: folder`: image folders held in memory (small pictures, decoded once and cached) or streamed
(large ones), refused in one line when they cannot load, with unreadable files left out by name."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from gatetune.tuning.config import DataCfg
from gatetune.tuning.data import DataError, check, load
from gatetune.tuning.data.memory import TensorLoader
from gatetune.tuning.data.scan import IMAGE_EXTENSIONS
from gatetune.tuning.data.stream import StreamLoader

CPU = torch.device("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSET = os.path.join(ROOT, "data", "cifar10-subset")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Each test decodes into a cache folder of its own."""
    monkeypatch.setenv("GATETUNE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write(root, classes=("ant", "bee"), per_class=(4, 2), size=(12, 12), val="val", seed=0):
    """Random RGB PNGs: root/train/<class>/<i>.png and root/<val>/<class>/<i>.png."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", val), per_class):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def pixels(root, split="train"):
    """Every image of a split as uint8 (N, 3, H, W), in the loader's order (sorted class, then path)."""
    files = sorted((c, f) for c in os.listdir(root / split) for f in os.listdir(root / split / c))
    return torch.stack([torch.from_numpy(np.array(Image.open(root / split / c / f).convert("RGB"))).permute(2, 0, 1)
                        for c, f in sorted(files)])


def test_extensions_are_torchvisions():
    from torchvision.datasets.folder import IMG_EXTENSIONS
    assert IMAGE_EXTENSIONS == IMG_EXTENSIONS


def test_small_images_are_held_in_memory_with_cifar_augmentation_and_their_own_statistics(tmp_path):
    root = write(tmp_path / "d")
    data = load(DataCfg(dataset="folder", root=str(root)), CPU)
    assert isinstance(data.train, TensorLoader) and (data.num_classes, data.input_size) == (2, 12)
    assert torch.equal(data.train.images, pixels(root)) and data.train.labels.tolist() == [0] * 4 + [1] * 4
    assert data.train.pad == 1 and data.train.flip   # pad-crop by side / 8, flips
    raw = pixels(root).double() / 255
    mean, std = raw.mean((0, 2, 3)), raw.std((0, 2, 3), unbiased=False)
    x, _ = next(data.train.batches(8))   # normalised by the train split's own mean and std
    assert torch.allclose(x.double().mean((0, 2, 3)), torch.zeros(3, dtype=torch.double), atol=1e-5)
    assert torch.allclose(data.train.scale.view(-1).double(), 1 / (255 * std), rtol=1e-4)
    assert torch.allclose(data.train.offset.view(-1).double(), -mean / std, rtol=1e-4)
    given = load(DataCfg(dataset="folder", root=str(root), mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]), CPU)
    assert torch.allclose(given.train.offset.view(-1), torch.full((3,), -2.0))


def test_the_cache_is_reused_and_notices_a_changed_folder(tmp_path, cache, capsys):
    root = write(tmp_path / "d")
    cfg = DataCfg(dataset="folder", root=str(root))
    load(cfg, CPU)
    assert "decoded 8 images" in capsys.readouterr().err
    files = sorted(os.listdir(cache / "datasets"))
    assert len(files) == 2   # train and val
    load(cfg, CPU)
    assert "decoded" not in capsys.readouterr().err   # from the cache
    time.sleep(0.01)
    Image.new("RGB", (12, 12), (1, 2, 3)).save(root / "train" / "bee" / "0.png")   # rewritten in place
    data = load(cfg, CPU)
    assert "decoded 8 images" in capsys.readouterr().err
    assert data.train.images[4, :, 0, 0].tolist() == [1, 2, 3]
    assert len(os.listdir(cache / "datasets")) == 2 and sorted(os.listdir(cache / "datasets")) != files  # replaced
    Image.new("RGB", (12, 12)).save(root / "train" / "bee" / "9.png")   # a new file
    assert len(load(cfg, CPU).train) == 9


def test_large_images_stream_with_imagenet_augmentation(tmp_path):
    root = write(tmp_path / "d", size=(80, 70))
    data = load(DataCfg(dataset="folder", root=str(root), image_size=32, workers=0), CPU)
    assert isinstance(data.train, StreamLoader) and data.input_size == 32
    x, y = next(data.train.batches(8, augment=True))
    assert x.shape == (8, 3, 32, 32) and sorted(y.tolist()) == [0] * 4 + [1] * 4
    small = load(DataCfg(dataset="folder", root=str(root), image_size=32, in_memory=True), CPU)
    assert isinstance(small.train, TensorLoader) and small.train.images.shape == (8, 3, 32, 32)   # resized once
    forced = load(DataCfg(dataset="folder", root=str(write(tmp_path / "s")), in_memory=False, image_size=16,
                          workers=0), CPU)
    assert isinstance(forced.train, StreamLoader)


def test_test_folder_serves_as_val_and_val_may_lack_a_class(tmp_path):
    root = write(tmp_path / "d", val="test")
    (root / "test" / "bee").rename(tmp_path / "gone")
    data = load(DataCfg(dataset="folder", root=str(root)), CPU)
    assert len(data.val) == 2 and data.val.labels.tolist() == [0, 0] and data.num_classes == 2


def refused(cfg) -> str:
    with pytest.raises(DataError) as e:
        check(cfg)
    assert "\n" not in str(e.value) and e.value.key.startswith("data.")
    return e.value.message


def test_layouts_that_cannot_load_are_refused_in_one_line(tmp_path):
    assert "no 'train' folder under" in refused(DataCfg(dataset="folder", root=str(tmp_path)))
    (tmp_path / "train").mkdir()
    assert "no 'val' folder" in refused(DataCfg(dataset="folder", root=str(tmp_path)))
    (tmp_path / "val").mkdir()
    assert "has no class subfolders" in refused(DataCfg(dataset="folder", root=str(tmp_path)))
    root = write(tmp_path / "d")
    (root / "val" / "cat").mkdir()
    Image.new("RGB", (12, 12)).save(root / "val" / "cat" / "0.png")
    msg = refused(DataCfg(dataset="folder", root=str(root)))
    assert f"{root / 'val'} has class folder(s) that {root / 'train'} lacks (cat)" in msg
    (root / "train" / "cat").mkdir()
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    msg = refused(DataCfg(dataset="folder", root=str(root)))
    assert "1 class folder(s) under" in msg and "hold no images (cat)" in msg and "add images" in msg
    empty = write(tmp_path / "e")
    for name in ("ant", "bee"):
        for f in os.listdir(empty / "val" / name):
            os.remove(empty / "val" / name / f)
    assert "hold no images (ant, bee)" in refused(DataCfg(dataset="folder", root=str(empty)))


def test_bad_statistics_and_keys_are_refused(tmp_path):
    root = write(tmp_path / "d")
    assert "three, one per channel" in refused(DataCfg(dataset="folder", root=str(root), mean=[0.5]))
    assert "must be > 0" in refused(DataCfg(dataset="folder", root=str(root), std=[0.2, 0.0, 0.2]))
    assert "folder datasets only" in refused(DataCfg(dataset="digits", in_memory=True))


@pytest.mark.parametrize("in_memory", [True, False])
def test_zero_byte_and_unreadable_images_are_left_out_by_name(tmp_path, capsys, in_memory):
    root = write(tmp_path / "d")
    (root / "train" / "ant" / "empty.png").write_bytes(b"")
    (root / "train" / "bee" / "broken.png").write_bytes(b"\x89PNG not really")
    cfg = DataCfg(dataset="folder", root=str(root), in_memory=in_memory, image_size=12, workers=0)
    notices = check(cfg)
    assert len(notices) == 1 and "left out 1 empty (zero-byte) image file(s)" in notices[0]
    assert os.path.join("train", "ant", "empty.png") in notices[0]
    data = load(cfg, CPU)
    ys = torch.cat([y for _, y in data.train.batches(4, augment=True)])
    assert len(ys) == 8 and ys.tolist().count(1) == 4   # the broken file is not served
    err = capsys.readouterr().err
    assert "broken.png" in err and ("cannot be decoded" in err or "cannot decode" in err)


def test_a_search_config_names_the_folder_error(tmp_path):
    """Through the config layer: the file and key, one line, before any work."""
    from gatetune.core.errors import UserError
    from gatetune.tuning.config import load as load_config
    f = tmp_path / "c.yaml"
    f.write_text(f"data: {{dataset: folder, root: {tmp_path / 'missing'}}}\n")
    with pytest.raises(UserError) as e:
        load_config(f)
    assert str(e.value).startswith(f"{f}: data.root: folder: data.root {tmp_path / 'missing'} does not exist")
    assert "\n" not in str(e.value) and "train/ and val/" in str(e.value)


def test_the_bundled_cifar10_subset():
    train, val = (sum(len(os.listdir(os.path.join(SUBSET, s, c))) for c in os.listdir(os.path.join(SUBSET, s)))
                  for s in ("train", "val"))
    assert (train, val) == (10_000, 2_000)
    data = load(DataCfg(dataset="folder", root=SUBSET), CPU)
    assert (data.num_classes, data.in_channels, data.input_size) == (10, 3, 32)
    assert data.train.labels.bincount().tolist() == [1000] * 10 and data.val.labels.bincount().tolist() == [200] * 10
