"""Image folders scanned without decoding: `root/train/<class>/...` and `root/val/<class>/...` (or `test/`
when there is no `val/`), the layout of torchvision's ImageFolder (files found recursively, classes the
sorted subfolder names of train/, labels their index in that list).

    train, val, notices = scan(root, "folder")     # DataError (one line) for a layout that cannot load
    train.fingerprint()                            # changes when a file is added, removed or rewritten
    native_size(train)                             # the images' side in pixels, from a sample of headers

Zero-byte files are left out with a notice naming the first of them and their count; a val/ class that
train/ lacks, a class folder without images, or no class folders at all are refused before any work.
"""
from __future__ import annotations

__all__ = ["IMAGE_EXTENSIONS", "Split", "scan", "native_size", "VAL_FOLDERS"]

import collections
import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from gatetune.tuning.data.base import DataError

# torchvision.datasets.folder.IMG_EXTENSIONS (tests check they agree; importing torchvision costs 0.8 s)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VAL_FOLDERS = ("val", "test")   # the validation split: val/, else test/ (CIFAR-10's JPEG copies use test/)
_SAMPLE = 64                    # headers read to find the native size


@dataclass(frozen=True)
class Split:
    """One split folder: its images (paths relative to `folder`, as bytes), labels, sizes and times."""

    folder: str
    classes: tuple[str, ...]     # train/'s classes: label i is classes[i]
    paths: np.ndarray            # (N,) bytes
    targets: np.ndarray          # (N,) int64
    stats: np.ndarray = field(repr=False)   # (N, 2) int64: file size, mtime_ns

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        return os.path.join(self.folder, os.fsdecode(self.paths[i]))

    def fingerprint(self) -> str:
        """A hash of every file's relative path, size and modification time, and the class list."""
        h = hashlib.blake2b(digest_size=12)
        h.update("\0".join(self.classes).encode())
        h.update(str(self.paths.dtype).encode())
        h.update(self.paths.tobytes())
        h.update(np.ascontiguousarray(self.stats).tobytes())
        h.update(self.targets.tobytes())
        return h.hexdigest()


def _files(folder: str) -> list[tuple[str, int, int]]:
    """(path relative to `folder`, size, mtime_ns) of every image file under it, sorted (recursive)."""
    out, stack = [], [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(folder, rel)) as it:
            for e in it:
                if e.is_dir():
                    stack.append(os.path.join(rel, e.name))
                elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                    st = e.stat()
                    out.append((os.path.join(rel, e.name), st.st_size, st.st_mtime_ns))
    return sorted(out)


def _class_folders(folder: str) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir())


def _split(folder: str, classes: list[str], name: str, label: str, skipped: list[str]) -> Split:
    paths, targets, stats, empty = [], [], [], []
    for c in _class_folders(folder):
        files = _files(os.path.join(folder, c))
        good = [f for f in files if f[1] > 0]
        skipped += [os.path.join(label, c, f[0]) for f in files if f[1] == 0]
        if not good:
            empty.append(c)
            continue
        y = classes.index(c)
        for rel, size, mtime in good:
            paths.append(os.fsencode(os.path.join(c, rel)))
            targets.append(y)
            stats.append((size, mtime))
    if empty:
        raise DataError(f"{name}: {len(empty)} class folder(s) under {folder} hold no images "
                        f"({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''}); add images "
                        f"({'/'.join(IMAGE_EXTENSIONS[:3])}/...) or remove those folders", key="data.root")
    return Split(folder, tuple(classes), np.array(paths, dtype="S") if paths else np.empty(0, dtype="S1"),
                 np.array(targets, dtype=np.int64), np.array(stats, dtype=np.int64).reshape(-1, 2))


def _val_folder(root: str, name: str) -> tuple[str, str]:
    for v in VAL_FOLDERS:
        if os.path.isdir(os.path.join(root, v)):
            return os.path.join(root, v), v
    raise DataError(f"{name}: no 'val' folder under {root} (data.root); expected {root}/train and {root}/val "
                    "(or test/), one subfolder of images per class in each", key="data.root")


def scan(root: str, name: str) -> tuple[Split, Split, list[str]]:
    """(train, val, notices) of the image folders under `root`; DataError for a layout that cannot load.
    Scanned afresh on every call (about a second for 60,000 files): a file rewritten in place changes only
    its own time, which no cheaper check sees."""
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise DataError(f"{name}: no 'train' folder under {root} (data.root); expected {root}/train and "
                        f"{root}/val, one subfolder of images per class in each", key="data.root")
    val_dir, val_label = _val_folder(root, name)
    classes = _class_folders(train_dir)
    if not classes:
        raise DataError(f"{name}: {train_dir} has no class subfolders; expected one subfolder of images per "
                        "class (ImageFolder layout)", key="data.root")
    extra = [c for c in _class_folders(val_dir) if c not in classes]
    if extra:
        raise DataError(f"{name}: {val_dir} has class folder(s) that {train_dir} lacks ({', '.join(extra[:3])}"
                        f"{', ...' if len(extra) > 3 else ''}); labels come from train/'s classes: add them to "
                        "train/ or remove them from the validation folder", key="data.root")
    skipped: list[str] = []
    train = _split(train_dir, classes, name, "train", skipped)
    val = _split(val_dir, classes, name, val_label, skipped)
    if not len(val):
        raise DataError(f"{name}: {val_dir} has no class subfolders with images; put the validation images "
                        "there, one subfolder per class", key="data.root")
    notices = []
    if skipped:
        notices.append(f"notice: {name}: left out {len(skipped)} empty (zero-byte) image file(s) under {root}, "
                       f"e.g. {skipped[0]}; delete or replace them")
    return train, val, notices


def native_size(split: Split) -> int:
    """The most common longer side, in pixels, of up to 64 images spread over the split (headers only)."""
    from PIL import Image
    n = len(split)
    picks = sorted(set(np.linspace(0, n - 1, min(n, _SAMPLE)).round().astype(int).tolist()))
    sides = collections.Counter()
    for i in picks:
        try:
            with Image.open(split.path(i)) as img:
                sides[max(img.size)] += 1
        except (OSError, ValueError, SyntaxError):
            continue   # an unreadable file: the decoder names it (folder.py)
    if not sides:
        raise DataError(f"folder: none of {len(picks)} images sampled under {split.folder} could be read as an "
                        "image; check the files (JPEG, PNG, ...)", key="data.root")
    return sides.most_common(1)[0][0]
