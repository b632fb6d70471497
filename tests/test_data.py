"""tuning/data/: every dataset through one contract, determinism, augmentation, error messages.
Real readers on tiny data the tests write themselves (CIFAR pickles, ImageFolder PNGs); no network."""
from __future__ import annotations

import hashlib
import os
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image

from gatetune.core.errors import UserError
from gatetune.tuning.config import DataCfg, load_dict
from gatetune.tuning.data import DATASETS, DataError, Loader, check, load
from gatetune.tuning.data.base import CIFAR_STATS, generator
from gatetune.tuning.data.stream import resized_crop_box
from gatetune.tuning.data.memory import crop_flip, digits_split

CPU = torch.device("cpu")
EXPECT = {  # dataset -> (num_classes, in_channels, input_size, len(train), len(val)) of the data made below
    "digits": (10, 1, 16, 1437, 360),
    "cifar10": (10, 3, 32, 40, 10),
    "cifar100": (100, 3, 32, 40, 10),
    "imagenet": (3, 3, 24, 9, 6),
    "folder": (3, 3, 40, 9, 6),     # held in memory at its native side (40 px)
    "fake": (5, 3, 16, 48, 16),
}


# --- test-made data ----------------------------------------------------------------------------------


def write_cifar(root, name: str, per_file: int = 8, seed: int = 0) -> dict:
    """A tiny dataset in torchvision's exact pickle layout; the class's md5 table must be patched to
    match (see `cifar_spec`). Returns {file: (uint8 (n, 3072) rows, labels)}."""
    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng, k = np.random.default_rng(seed), (10 if name == "cifar10" else 100)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    written = {}
    for f, _ in cls.train_list + cls.test_list:
        n = per_file * (5 if name == "cifar100" and f == "train" else 1) + (2 if "test" in f else 0)
        rows, labels = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, k, n).tolist()
        entry = {"batch_label": f, "data": rows, label_key: labels, "filenames": [f"{i}.png" for i in range(n)]}
        if name == "cifar100":
            entry["coarse_labels"] = [label // 5 for label in labels]
        with open(folder / f, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
        written[f] = (rows, labels)
    meta = {cls.meta["key"]: [f"class{i}" for i in range(k)]}
    with open(folder / cls.meta["filename"], "wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    return written


def patch_md5(monkeypatch, root, name: str) -> None:
    """Point torchvision's md5 table at the files written here; the md5 check itself stays real."""
    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    folder = root / cls.base_folder

    def md5(f):
        return hashlib.md5((folder / f).read_bytes()).hexdigest()
    monkeypatch.setattr(cls, "train_list", [[f, md5(f)] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, md5(f)] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})


def write_imagefolder(root, classes=("ant", "bee", "cat"), per_class=(3, 2), sizes=((40, 30), (28, 36))):
    """root/train/<class>/*.png and root/val/<class>/*.png, each image one flat colour per class."""
    for split, n in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                colour = (80 * c, 255 - 60 * i, 40 * (c + i))
                Image.new("RGB", sizes[i % len(sizes)], colour).save(root / split / name / f"{i}.png")


@pytest.fixture
def spec_for(tmp_path, monkeypatch):
    """dataset name -> a DataCfg whose data exists (written under tmp_path where needed)."""
    def make(name: str, **kw) -> DataCfg:
        if name in ("cifar10", "cifar100"):
            write_cifar(tmp_path, name)
            patch_md5(monkeypatch, tmp_path, name)
            kw.setdefault("root", str(tmp_path))
        elif name == "imagenet":
            write_imagefolder(tmp_path)
            kw = {"root": str(tmp_path), "image_size": 24, "workers": 0, **kw}
        elif name == "folder":
            write_imagefolder(tmp_path)
            monkeypatch.setenv("GATETUNE_CACHE_DIR", str(tmp_path / "cache"))
            kw = {"root": str(tmp_path), **kw}
        elif name == "fake":
            kw = {"fake_train": 48, "fake_val": 16, "fake_classes": 5, "image_size": 16, **kw}
        return DataCfg(dataset=name, **kw)
    return make


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest's: batches here are tiny


def epoch(loader, bs=None, **kw):
    bs = bs or (16 if len(loader) < 100 else 128)
    xs, ys = zip(*loader.batches(bs, **kw))
    return torch.cat(xs), torch.cat(ys)


# --- the contract, once over the registry --------------------------------------------------------------


@pytest.mark.parametrize("name", DATASETS)
def test_contract(name, spec_for):
    spec = spec_for(name)
    check(spec)
    data = load(spec, CPU, seed=0)
    classes, channels, size, n_train, n_val = EXPECT[name]
    assert (data.name, data.num_classes, data.in_channels, data.input_size) == (name, classes, channels, size)
    assert (len(data.train), len(data.val)) == (n_train, n_val)
    for loader in (data.train, data.val):
        assert isinstance(loader, Loader)
        bs = 4 if len(loader) < 100 else 128
        for drop_last in (False, True):
            got = list(loader.batches(bs, shuffle=True, augment=True, drop_last=drop_last))
            assert len(got) == loader.num_batches(bs, drop_last=drop_last)
            assert sum(len(y) for _, y in got) == (len(loader) // bs * bs if drop_last else len(loader))
        x, y = got[0]
        assert x.shape == (bs, channels, size, size) and x.dtype == torch.float32 and x.device == CPU
        assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < classes
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", DATASETS)
def test_epoch_replays_from_seed_and_epoch_only(name, spec_for):
    """Exact resume: a fresh load replays epoch e bit for bit (order and augmentation); the global RNG
    is neither used nor changed."""
    spec = spec_for(name)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = load(spec, CPU, seed=3), load(spec, CPU, seed=3)
    kw = dict(shuffle=True, augment=True)
    first = epoch(a.train, epoch=2, **kw)
    epoch(a.train, epoch=0, **kw)  # b has not seen epoch 0: replay must not depend on history
    replay = epoch(b.train, epoch=2, **kw)
    assert torch.equal(first[0], replay[0]) and torch.equal(first[1], replay[1])
    assert torch.equal(torch.get_rng_state(), before)
    other_epoch = epoch(a.train, epoch=3, **kw)
    other_seed = epoch(load(spec, CPU, seed=4).train, epoch=2, **kw)
    assert not torch.equal(first[0], other_epoch[0]) and not torch.equal(first[0], other_seed[0])


@pytest.mark.parametrize("name", ["digits", "fake"])
def test_order_changes_with_epoch_and_val_is_ordered(name, spec_for):
    data = load(spec_for(name), CPU)
    _, y0 = epoch(data.train, epoch=0, shuffle=True)
    _, y1 = epoch(data.train, epoch=1, shuffle=True)
    _, plain = epoch(data.train)
    assert sorted(y0.tolist()) == sorted(plain.tolist()) and not torch.equal(y0, y1)
    assert torch.equal(epoch(data.val, epoch=5)[1], data.val.labels)


def test_augmentation_does_not_depend_on_batch_size_or_shuffle(spec_for):
    data = load(spec_for("fake"), CPU)
    x7, _ = epoch(data.train, bs=7, epoch=1, augment=True)
    x16, _ = epoch(data.train, bs=16, epoch=1, augment=True)
    assert torch.equal(x7, x16)
    order = torch.randperm(len(data.train), generator=generator(0, 1, "train"))
    xs, _ = epoch(data.train, bs=16, epoch=1, augment=True, shuffle=True)
    assert torch.equal(xs, x16[order])


# --- augmentation --------------------------------------------------------------------------------------


def test_crop_flip_matches_per_sample_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 9, 7), dtype=torch.uint8, generator=g)
    dy, dx = torch.randint(0, 5, (2, 8), generator=g)
    flip = torch.arange(8) % 2 == 0
    out = crop_flip(x, dy, dx, flip, pad=2)
    for b in range(8):
        ref = torch.nn.functional.pad(x[b], (2, 2, 2, 2))[:, dy[b]:dy[b] + 9, dx[b]:dx[b] + 7]
        assert torch.equal(out[b], ref.flip(2) if flip[b] else ref)
    centre, no = torch.full((8,), 2), torch.zeros(8, dtype=torch.bool)
    assert torch.equal(crop_flip(x, centre, centre, no, pad=2), x)


@pytest.mark.parametrize("name", ["digits", "cifar10", "fake"])
def test_augment_changes_pixels_keeps_shapes_train_only(name, spec_for):
    spec = spec_for(name)
    data = load(spec, CPU)
    plain, y = epoch(data.train, epoch=0)
    aug, y_aug = epoch(data.train, epoch=0, augment=True)
    assert aug.shape == plain.shape and torch.equal(y, y_aug)
    changed = (aug != plain).flatten(1).any(1).float().mean()
    assert changed > 0.5  # most images moved (a few draw the zero shift and no flip)
    assert torch.equal(epoch(data.val, augment=True)[0], epoch(data.val)[0])  # val never augments
    off = load(spec.model_copy(update={"augment": False}), CPU)
    assert torch.equal(epoch(off.train, augment=True)[0], plain)  # data.augment: false wins


def test_digits_augment_is_a_shift_of_up_to_2px():
    data = load(DataCfg(dataset="digits"), CPU)
    plain, _ = epoch(data.train, bs=64)
    aug, _ = epoch(data.train, bs=64, augment=True)
    raw = lambda x: (x - data.train.offset) / data.train.scale  # noqa: E731  back to [0, 1]
    pp = torch.nn.functional.pad(raw(plain), (2, 2, 2, 2))  # background is raw 0
    shifted = torch.stack([pp[:, :, i:i + 16, j:j + 16] for i in range(5) for j in range(5)])  # (25, N, 1, 16, 16)
    err = (shifted - raw(aug)).abs().flatten(2).amax(2).amin(0)
    assert err.max() < 1e-5


# --- digits split ----------------------------------------------------------------------------------------


def test_digits_split_is_stratified_fixed_and_disjoint():
    from sklearn.datasets import load_digits
    labels = load_digits().target
    tr, va = digits_split(labels)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == len(labels)
    per_class, in_val = Counter(labels.tolist()), Counter(labels[va].tolist())
    assert all(abs(in_val[c] - 0.2 * per_class[c]) <= 1 for c in per_class)
    a, b = load(DataCfg(dataset="digits"), CPU, seed=0), load(DataCfg(dataset="digits"), CPU, seed=7)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)


def test_digits_normalised_by_train_statistics():
    data = load(DataCfg(dataset="digits"), CPU)
    x, _ = epoch(data.train, bs=2000)
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    raw = data.train.images
    assert raw.dtype == torch.float32 and raw.min() >= 0 and raw.max() <= 1 and raw.shape[1:] == (1, 16, 16)


# --- cifar, fake, imagenet readers ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_pickles_exactly(name, tmp_path, monkeypatch):
    written = write_cifar(tmp_path, name)
    patch_md5(monkeypatch, tmp_path, name)
    data = load(DataCfg(dataset=name, root=str(tmp_path)), CPU)
    train_files = [f for f in written if f not in ("test_batch", "test")]
    rows = np.concatenate([written[f][0] for f in train_files])
    labels = sum((written[f][1] for f in train_files), [])
    assert torch.equal(data.train.images, torch.from_numpy(rows).view(-1, 3, 32, 32))  # R, G, B planes
    assert data.train.labels.tolist() == labels
    test = written["test_batch" if name == "cifar10" else "test"]
    assert torch.equal(data.val.images.flatten(1), torch.from_numpy(test[0]))
    x, _ = next(data.val.batches(4))
    mean, std = CIFAR_STATS[name]
    expect = (torch.from_numpy(test[0][:4]).view(4, 3, 32, 32) / 255 - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(x, expect, atol=1e-5)


def test_cifar_corrupted_file_is_a_data_error(tmp_path, monkeypatch):
    write_cifar(tmp_path, "cifar10")
    patch_md5(monkeypatch, tmp_path, "cifar10")
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "ab") as fh:
        fh.write(b"x")
    spec = DataCfg(dataset="cifar10", root=str(tmp_path))
    check(spec)  # layout is fine; only reading finds the corruption
    with pytest.raises(DataError, match="md5") as e:
        load(spec, CPU)
    assert str(tmp_path / "cifar-10-batches-py") in str(e.value) and "extract" in str(e.value)


def test_fake_is_torchvision_fakedata(spec_for):
    from torchvision.transforms import PILToTensor
    data = load(spec_for("fake"), CPU)
    for split, n, offset in ((data.train, 48, 0), (data.val, 16, 48)):
        ref = tvd.FakeData(n, (3, 16, 16), 5, transform=PILToTensor(), random_offset=offset)
        for i in (0, n - 1):
            img, label = ref[i]
            assert torch.equal(split.images[i], img) and split.labels[i].item() == label


def test_imagenet_reads_folders(spec_for):
    data = load(spec_for("imagenet"), CPU)
    x, y = epoch(data.val, bs=4)
    assert y.tolist() == [0, 0, 1, 1, 2, 2]  # ImageFolder: sorted class folders
    # val = resize + centre crop of a flat colour: every pixel is the class colour
    raw = (x - data.val.offset) / data.val.scale
    assert torch.allclose(raw[2], torch.tensor([80.0, 255, 40]).view(3, 1, 1), atol=0.5)
    xa, _ = epoch(data.train, bs=4, augment=True)
    assert xa.shape == (9, 3, 24, 24)


def test_imagenet_workers_replay_the_same_batches(spec_for, tmp_path):
    spec = spec_for("imagenet")
    for i in range(3):  # per-image colours vary, so crops differ visibly
        Image.effect_noise((50, 40), 60 + 20 * i).convert("RGB").save(tmp_path / "train" / "ant" / f"n{i}.png")
    inline = load(spec, CPU, seed=1)
    pooled = load(spec.model_copy(update={"workers": 2}), CPU, seed=1)
    kw = dict(bs=4, shuffle=True, augment=True)
    ref = epoch(inline.train, epoch=1, **kw)
    epoch(pooled.train, epoch=0, **kw)  # persistent workers carry state across epochs: must not matter
    got = epoch(pooled.train, epoch=1, **kw)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    assert not torch.equal(ref[0], epoch(inline.train, epoch=2, **kw)[0])


def test_resized_crop_box_stays_inside_and_falls_back():
    g = torch.Generator().manual_seed(0)
    for h, w in ((30, 40), (300, 20), (5, 5)):
        for _ in range(20):
            top, left, ch, cw = resized_crop_box(h, w, g)
            assert 0 <= top and 0 <= left and 0 < ch and 0 < cw and top + ch <= h and left + cw <= w


# --- errors: one line, naming the path/dataset, what was expected and the fix ----------------------------------


def raises(spec) -> str:
    with pytest.raises(DataError) as e:
        check(spec)
    with pytest.raises(DataError) as e2:  # load checks first: same message, nothing read
        load(spec, CPU)
    assert str(e.value) == str(e2.value) and "\n" not in str(e.value)
    assert e.value.key in ("data.root", "data.image_size")   # the config key at fault
    return e.value.message


def config_error(data: dict) -> str:
    with pytest.raises(UserError) as e:
        load_dict({"data": data})
    assert "\n" not in str(e.value)
    return str(e.value)


def test_unknown_dataset_suggests_nearest():
    msg = config_error({"dataset": "cifar"})
    assert "'cifar'" in msg and "'digits', 'cifar10'" in msg and "did you mean 'cifar10'" in msg
    assert "did you mean 'cifar100'" in config_error({"dataset": "cifar100 "})


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet"])
def test_root_required_and_must_exist(name, tmp_path):
    assert "data.root is not set" in raises(DataCfg(dataset=name))
    missing = tmp_path / "nope"
    msg = raises(DataCfg(dataset=name, root=str(missing)))
    assert str(missing) in msg and "does not exist" in msg and ("download" in msg or "train/ and val/" in msg)


def test_cifar_layout_errors(tmp_path):
    msg = raises(DataCfg(dataset="cifar10", root=str(tmp_path)))
    assert msg == (f"cifar10: no 'cifar-10-batches-py' under {tmp_path} (data.root); download CIFAR-10 "
                   "(python version, cifar-10-python.tar.gz) and extract it there")
    write_cifar(tmp_path, "cifar10")
    inner = tmp_path / "cifar-10-batches-py"
    msg = raises(DataCfg(dataset="cifar10", root=str(inner)))  # pointed at the extracted folder itself
    assert f"data.root must be the folder that holds it ({tmp_path})" in msg
    os.remove(inner / "data_batch_4")
    msg = raises(DataCfg(dataset="cifar10", root=str(tmp_path)))
    assert str(inner) in msg and "lacks data_batch_4" in msg and "extract" in msg


def test_imagenet_layout_errors(tmp_path):
    (tmp_path / "train").mkdir()
    msg = raises(DataCfg(dataset="imagenet", root=str(tmp_path)))
    assert "no 'val' folder" in msg and str(tmp_path) in msg
    (tmp_path / "val").mkdir()
    assert "has no class subfolders" in raises(DataCfg(dataset="imagenet", root=str(tmp_path)))
    write_imagefolder(tmp_path / "ok")
    root = tmp_path / "ok"
    (root / "train" / "dog").mkdir()
    msg = raises(DataCfg(dataset="imagenet", root=str(root)))
    assert "hold no images (dog)" in msg and str(root / "train") in msg
    (root / "train" / "dog" / "deep").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train" / "dog" / "deep" / "x.JPEG")  # nested + upper case: found
    check(DataCfg(dataset="imagenet", root=str(root)))   # val may lack a class of train
    (root / "val" / "emu").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "emu" / "x.png")
    msg = raises(DataCfg(dataset="imagenet", root=str(root)))
    assert f"{root / 'val'} has class folder(s) that {root / 'train'} lacks (emu)" in msg and "labels come" in msg


def test_size_and_count_errors():
    msg = raises(DataCfg(dataset="cifar10", root="/", image_size=64))
    assert "data.image_size=64, but cifar10 images are 32x32" in msg
    assert "data.fake_train: must be > 0, got 0" in config_error({"dataset": "fake", "fake_train": 0})
    assert "data.workers: must be >= 0, got -1" in config_error({"dataset": "imagenet", "workers": -1})
    check(DataCfg(dataset="digits", image_size=16))  # the native size is allowed


def test_root_is_made_absolute(tmp_path, monkeypatch):
    from gatetune.tuning.data.check import root_of
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert root_of(DataCfg(dataset="cifar10", root="data")) == str(tmp_path / "data")


def test_bad_batch_size():
    data = load(DataCfg(dataset="digits"), CPU)
    with pytest.raises(ValueError, match="batch_size must be >= 1, but got 0"):
        next(data.train.batches(0))
