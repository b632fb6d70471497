"""One image file -> uint8 (3, h, w): a box of it, resized; what the streaming loader's workers do per file
(tuning/data/stream.py says which box: RandomResizedCrop's, or the val transform's whole picture).

    crop = read_box(path, lambda height, width: ((top, left, h, w), (224, 224)))

The header is read first (PIL, no pixels decoded), so the box is known before decoding. Then, per file:
- full size (the usual case: no ImageNet-sized crop is shrunk 4x): RGB and greyscale JPEGs are decoded by
  libjpeg-turbo straight into a tensor (torchvision.io.decode_jpeg), anything else by PIL (CMYK JPEGs,
  PNG, ...; and whatever decode_jpeg refuses, so a broken file fails with PIL's error); the box is a view,
  resized once by torch's antialiased bilinear filter on uint8 channels-last, which reproduces PIL's
  bilinear resize (the one torchvision's transforms apply to PIL images) to 0.002 uint8 levels on average
  and one level at most, 3-4x faster;
- a box at least 4x the output on both sides (photos over ~900 px a side): the JPEG is decoded at 1/s of
  its size (s = 2, 4 or 8, the largest that leaves the box at least twice the output; libjpeg's
  DCT-domain scaling through PIL's `draft`) and PIL resizes the exact box, scaled, from there. This
  prefilters differently from a full decode: measured on pictures made of 32-px CIFAR tiles (hard edges:
  a harsh case), 1.0 level mean absolute difference with the box 2-3x the output once scaled, 0.5 at
  3-5x, but 3.7 at 1-1.5x and 1.7 at 1.5-2x (hence the factor two); ~0.1 on upscaled CIFAR pictures.
  tests/test_stream.py measures both paths against torchvision's crop + resize.
Measured per image on ImageNet-sized JPEGs (bench/folder_pipeline.py's, ~415x347) on one core: decode
0.47 ms (PIL) -> 0.33 ms, crop + resize 0.64 ms (PIL) -> 0.17 ms.
"""
from __future__ import annotations

__all__ = ["read_box", "resize", "dct_scale", "UNREADABLE"]

import io
import os
from typing import Callable

import torch
from torch import Tensor

UNREADABLE = (OSError, ValueError, SyntaxError)   # what PIL raises for a truncated or garbage file

Box = tuple[int, int, int, int]          # top, left, height, width (pixels of the full picture)
Plan = Callable[[int, int], tuple[Box, tuple[int, int]]]   # (height, width) -> (box, output (h, w))


def _jpeg_decoder():
    """torchvision.io.decode_jpeg to RGB, or None where this torchvision has none (it is deprecated from
    0.29 in favour of TorchCodec): PIL decodes everything then."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    return lambda data: decode_jpeg(data, mode=ImageReadMode.RGB)


_UNSET = object()
_DECODE_JPEG = _UNSET   # imported at the first JPEG (torchvision's import is 1.5 s that a driver need not pay)


def dct_scale(box_h: int, box_w: int, out_h: int, out_w: int) -> int:
    """The JPEG decoding scale 1/s for a box: the largest s in 8, 4, 2 that leaves the box at least twice the
    output size on both sides once the picture is s times smaller, else 1 (full size)."""
    for s in (8, 4, 2):
        if box_h >= 2 * s * out_h and box_w >= 2 * s * out_w:
            return s
    return 1


def read_box(path: str, plan: Plan) -> Tensor:
    """uint8 (3, out_h, out_w): the box `plan(height, width)` names of the picture at `path`, resized
    (antialiased bilinear), in channels-last memory (a permute(1, 2, 0) away from contiguous HWC). Raises
    one of UNREADABLE for a file PIL cannot read."""
    from PIL import Image
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        del data[f.readinto(data):]   # a file that shrank meanwhile
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        (top, left, h, w), (out_h, out_w) = plan(height, width)
        s = dct_scale(h, w, out_h, out_w) if img.format == "JPEG" else 1
        if s > 1:
            img.draft("RGB", (width // s, height // s))
            if img.size == (-(-width // s), -(-height // s)):   # decoded 1/s (else draft declined: full size)
                small = img.convert("RGB").resize((out_w, out_h), Image.BILINEAR,
                                                  box=(left / s, top / s, (left + w) / s, (top + h) / s))
                return _tensor(small)
        pixels = None
        global _DECODE_JPEG
        if _DECODE_JPEG is _UNSET:
            _DECODE_JPEG = _jpeg_decoder()
        if img.format == "JPEG" and img.mode in ("RGB", "L") and _DECODE_JPEG is not None:
            try:
                pixels = _DECODE_JPEG(torch.frombuffer(data, dtype=torch.uint8))   # (3, H, W), HWC in memory
            except RuntimeError:
                pixels = None    # PIL decodes it, or raises its own error
        if pixels is None:
            pixels = _tensor(img.convert("RGB"))
    return resize(pixels[:, top:top + h, left:left + w], out_h, out_w)


def _tensor(rgb) -> Tensor:
    """A PIL RGB image as uint8 (3, H, W), HWC in memory (a writable copy of its bytes)."""
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return pixels.view(rgb.height, rgb.width, 3).permute(2, 0, 1)


def resize(pixels: Tensor, out_h: int, out_w: int) -> Tensor:
    """uint8 (3, h, w) -> uint8 (3, out_h, out_w): antialiased bilinear (PIL's filter), on the channels-last
    layout that torch's uint8 kernel runs fastest on (the result stays in it)."""
    if tuple(pixels.shape[1:]) == (out_h, out_w):
        return pixels
    x = pixels.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return torch.nn.functional.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True,
                                           align_corners=False)[0]
