"""One training sample's pixels: decode, then MAE's RandomResizedCrop + horizontal flip, on uint8 tensors.

Every data path calls the same three pieces, so they draw the same crop for the same sample:
- ``crop_params``: the crop window and the flip, a pure function of the sample's seed and the image size
  (torchvision's RandomResizedCrop sampling, driven by ``random.Random(seed)``);
- ``decode_sample``: encoded bytes -> uint8 [H, W, C]. JPEGs go through libjpeg-turbo (simplejpeg), which can
  decode at 1/2, 1/4 or 1/8 scale (draft mode) when the crop that will be taken is at least that many times the
  output size; other formats through PIL;
- ``resized_crop``: the window, resized with an antialiased filter (torch's uint8 kernels), flipped.

``crop_on_device`` does the last step for a batch decoded on a GPU (``data.decode: cuda``).
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
JPEG_MAGIC = b"\xff\xd8\xff"
RATIO = (3 / 4, 4 / 3)


class CorruptSample(ValueError):
    """This sample cannot be used (undecodable, no image, bad label); the stream skips and counts it."""


@dataclass(frozen=True)
class CropParams:
    top: int
    left: int
    height: int
    width: int
    flip: bool


def crop_params(seed: int, height: int, width: int, *, scale: tuple[float, float], hflip: bool,
                ratio: tuple[float, float] = RATIO) -> CropParams:
    """RandomResizedCrop's window (10 tries at a random area and aspect ratio, else a centre crop) and the flip."""
    rng = random.Random(seed)
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            break
    else:  # centre crop at the nearest allowed aspect ratio
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            w, h = int(round(height * ratio[1])), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return CropParams(top, left, h, w, flip=hflip and rng.random() < 0.5)


def draft_factor(params: CropParams, size: int) -> int:
    """The largest of 8, 4, 2 (else 1) by which the image can shrink while the crop stays >= ``size`` pixels."""
    room = min(params.height, params.width) / size
    return next((f for f in (8, 4, 2) if room >= f), 1)


def image_bytes(payload: dict) -> tuple[str, bytes]:
    key = next((k for k in IMAGE_KEYS if k in payload), None)
    if key is None:
        raise CorruptSample(f"no image field (has {sorted(k for k in payload if not k.startswith('__'))})")
    return key, payload[key]


def label_of(payload: dict) -> int:
    try:
        return int(payload["cls"]) if "cls" in payload else -1
    except ValueError:
        raise CorruptSample(f"label {payload['cls'][:20]!r} is not an integer") from None


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the header alone."""
    try:
        if data.startswith(JPEG_MAGIC):
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            return h, w
        with Image.open(io.BytesIO(data)) as im:
            return im.height, im.width
    except Exception as e:  # noqa: BLE001 - decoders raise many types for broken files
        raise CorruptSample(f"unreadable image header: {type(e).__name__}: {e}") from None


def decode_sample(data: bytes, *, chans: int, factor: int = 1) -> np.ndarray:
    """uint8 [H, W, C] (C = ``chans``); JPEGs shrink by ``factor`` (1, 2, 4, 8) while decoding."""
    try:
        if data.startswith(JPEG_MAGIC):
            try:
                mins = {}
                if factor > 1:  # the smallest libjpeg-turbo scale (n/8) that keeps 1/factor of each side
                    h, w, _, _ = simplejpeg.decode_jpeg_header(data)
                    mins = dict(min_height=-(-h // factor), min_width=-(-w // factor), min_factor=factor)
                arr = simplejpeg.decode_jpeg(data, colorspace="GRAY" if chans == 1 else "RGB", **mins)
                return arr if arr.ndim == 3 else arr[..., None]
            except ValueError:
                pass  # a JPEG libjpeg-turbo refuses (CMYK, say): PIL below decides whether it is corrupt
        with Image.open(io.BytesIO(data)) as im:
            if factor > 1:
                im.draft("L" if chans == 1 else "RGB", (im.width // factor, im.height // factor))
            im.load()
            arr = np.array(im.convert("L" if chans == 1 else "RGB"))  # a copy: writable, as torch wants
    except Exception as e:  # noqa: BLE001
        raise CorruptSample(f"undecodable image: {type(e).__name__}: {e}") from None
    return arr if arr.ndim == 3 else arr[..., None]


def resized_crop(arr: np.ndarray, params: CropParams, *, full: tuple[int, int], size: int) -> torch.Tensor:
    """The crop window of ``arr`` [h, w, C] (decoded from an image of ``full`` = (H, W) pixels, possibly smaller),
    resized to ``size`` x ``size`` with an antialiased bilinear filter and flipped: uint8 [C, size, size]."""
    h, w = arr.shape[:2]
    fy, fx = h / full[0], w / full[1]
    top, left = round(params.top * fy), round(params.left * fx)
    bottom = max(top + 1, round((params.top + params.height) * fy))
    right = max(left + 1, round((params.left + params.width) * fx))
    # channels-last and contiguous: torch's uint8 antialiased kernel is vectorised for that layout
    x = torch.from_numpy(arr[top:bottom, left:right]).permute(2, 0, 1).unsqueeze(0)  # [1, C, h', w']
    x = x.contiguous(memory_format=torch.channels_last)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = x[0]  # [C, size, size]
    return x.flip(-1) if params.flip else x  # channels-last strides: the caller's stack makes it contiguous


def augmented(data: bytes, seed: int, *, chans: int, size: int, scale: tuple[float, float], hflip: bool,
              draft: bool) -> torch.Tensor:
    """Encoded image -> its augmented view, uint8 [C, size, size]."""
    full = image_size(data)
    params = crop_params(seed, *full, scale=scale, hflip=hflip)
    factor = draft_factor(params, size) if draft else 1
    return resized_crop(decode_sample(data, chans=chans, factor=factor), params, full=full, size=size)


def centre_view(data: bytes, *, chans: int, size: int) -> torch.Tensor:
    """Evaluation view: shorter side to ``size``, then the centre square; uint8 [C, size, size]."""
    arr = decode_sample(data, chans=chans)
    h, w = arr.shape[:2]
    side = min(h, w)
    params = CropParams((h - side) // 2, (w - side) // 2, side, side, flip=False)
    return resized_crop(arr, params, full=(h, w), size=size)


def crop_on_device(images: list[torch.Tensor], params: list[CropParams], *, size: int) -> torch.Tensor:
    """The same crops for images already decoded on a device (uint8 [C, H, W] each, full size): [N, C, size,
    size] uint8. Float arithmetic: within a grey level or two of ``resized_crop`` on the CPU."""
    out = []
    for img, p in zip(images, params):
        x = img[:, p.top : p.top + p.height, p.left : p.left + p.width].unsqueeze(0).float()  # [1, C, h, w]
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x[0].round_().clamp_(0, 255).to(torch.uint8)  # [C, size, size]
        out.append(x.flip(-1) if p.flip else x)
    return torch.stack(out)
