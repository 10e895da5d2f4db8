"""Turn raw datasets into webdataset tar shards (``png``/``jpg`` image + ``cls`` label per sample).

Each output folder also gets ``dataset.json`` with the shard brace patterns, counts and class names, so a
config can point ``data.train_shards`` / ``data.test_shards`` at it. The work is spread over every core this
process may use (``--workers``), in order, so the shards are the same for any worker count. ``--max-size N``
re-encodes images whose shorter side is above N pixels to exactly N (FFCV's idea): the shards shrink and stage 0
decodes faster, at the cost of the detail above N pixels (see docs/data.md).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

log = logging.getLogger("bimdist.data")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp"}


class PrepareError(RuntimeError):
    """Input data missing or malformed; the message says which file and what to do."""


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: big-endian header, magic 0x0801 (labels) or 0x0803 (images)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise PrepareError(f"cannot read {path}: {e}") from None
    if len(data) < 8:
        raise PrepareError(f"{path} is too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise PrepareError(f"{path} is not an unsigned-byte IDX file (header {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise PrepareError(f"{path} holds {body.size} bytes but its header promises shape {dims}")
    return body.reshape(dims)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ordered_map(fn: Callable, items: Iterable, *, workers: int, chunksize: int = 64) -> Iterator:
    """``map(fn, items)`` over ``workers`` processes, results in input order (1: in this process)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(fn, items, chunksize=chunksize)


def shrink(data: bytes, max_size: int | None, *, quality: int = 90) -> tuple[bytes, bool]:
    """Re-encode an image whose shorter side is above ``max_size`` to exactly that (same format; JPEGs at
    ``quality``). Images at or below it, and files PIL cannot read, come back unchanged: (bytes, changed)."""
    if max_size is None:
        return data, False
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = im.format, im.size
            if min(w, h) <= max_size or fmt not in ("JPEG", "PNG", "WEBP"):
                return data, False
            scale = max_size / min(w, h)
            size = (max(max_size, round(w * scale)), max(max_size, round(h * scale)))
            if fmt == "JPEG":
                im.draft(im.mode, size)  # DCT scaling while decoding, when it can stay at or above the target
            out = io.BytesIO()
            im.convert(im.mode if im.mode in ("L", "RGB", "RGBA") else "RGB").resize(
                size, Image.BICUBIC, reducing_gap=3.0).save(out, format=fmt, quality=quality)
            return out.getvalue(), True
    except Exception:  # noqa: BLE001 - undecodable: left for the reader to skip and count
        return data, False


def _load(job: tuple[Path, int | None, int]) -> tuple[bytes, bool]:
    path, max_size, quality = job
    return shrink(path.read_bytes(), max_size, quality=quality)


def _write_shards(samples: Iterator[dict], out: Path, split: str, shard_size: int) -> tuple[str, int]:
    """Write samples to ``out/{split}-NNNNNN.tar``; returns the brace pattern and the sample count.

    Whole-second member times: with a float mtime every member gets a pax header, which costs readers ~2x."""
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0,
                         mtime=int(time.time())) as sink:
        for sample in samples:
            sink.write(sample)
            count += 1
        shards = sink.shard
    if count == 0:
        raise PrepareError(f"no samples were written for split {split!r}")
    return f"{split}-{{000000..{shards - 1:06d}}}.tar", count


def _write_manifest(out: Path, info: dict) -> None:
    tmp = out / "dataset.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out / "dataset.json")


def prepare_fashion_mnist(out: Path, *, src: Path | None = None, shard_size: int = 5000,
                          limit: int | None = None, workers: int | None = None) -> dict:
    """Fashion-MNIST IDX files (Debian package ``dataset-fashion-mnist`` by default) -> train/test shards."""
    src = Path(src or FASHION_MNIST_DIR)
    missing = [n for pair in FASHION_MNIST_FILES.values() for n in pair if not (src / n).is_file()]
    if missing:
        raise PrepareError(
            f"Fashion-MNIST files missing in {src}: {', '.join(missing)}; install the Debian package "
            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass --src DIR"
        )
    info: dict = {"name": "fashion-mnist", "classes": FASHION_MNIST_CLASSES, "img_size": 28, "channels": 1}
    for split, (img_name, lbl_name) in FASHION_MNIST_FILES.items():
        images, labels = read_idx(src / img_name), read_idx(src / lbl_name)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise PrepareError(f"{img_name} {images.shape} and {lbl_name} {labels.shape} do not match")
        n = len(images) if limit is None else min(limit, len(images))
        if split == "train":
            pixels = images[:n].astype(np.float64) / 255.0
            info["mean"], info["std"] = [round(float(pixels.mean()), 4)], [round(float(pixels.std()), 4)]
        pngs = ordered_map(_png, (images[i] for i in range(n)), workers=workers or default_workers(), chunksize=500)
        samples = ({"__key__": f"{split}{i:06d}", "png": png, "cls": str(int(labels[i])).encode()}
                   for i, png in enumerate(pngs))
        info[split], info[f"num_{split}"] = _write_shards(samples, out, split, shard_size)
        log.info("wrote %d %s samples to %s/%s", info[f"num_{split}"], split, out, info[split])
    _write_manifest(out, info)
    return info


def _class_tree(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(file, class index) pairs; the class indices come from the train split so every split agrees."""
    unknown = sorted({d.name for d in root.iterdir() if d.is_dir()} - set(classes))
    if unknown:
        raise PrepareError(f"{root} has class folders not in the train split: {unknown[:5]}")
    files = []
    for idx, name in enumerate(classes):
        if not (root / name).is_dir():
            continue
        for f in sorted((root / name).rglob("*")):
            if f.suffix.lower() in IMAGE_EXTS and f.is_file():
                files.append((f, idx))
    return files


def _folder_samples(split: str, files: list[tuple[Path, int]], loaded: Iterator[tuple[bytes, bool]],
                    counts: dict[str, int]) -> Iterator[dict]:
    for i, ((f, idx), (data, changed)) in enumerate(zip(files, loaded)):
        counts["resized"] += changed
        yield {"__key__": f"{split}{i:08d}", IMAGE_EXTS[f.suffix.lower()]: data, "cls": str(idx).encode()}


def prepare_folder(src: Path, out: Path, *, shard_size: int = 1000, max_size: int | None = None,
                   quality: int = 90, workers: int | None = None) -> dict:
    """An ImageNet-style tree (``SRC/train/<class>/*``, ``SRC/val/<class>/*``, or ``SRC/<class>/*``) -> shards.

    Image bytes are copied unchanged, or re-encoded when the shorter side is above ``max_size``; undecodable files
    are left for the reader to skip and count.
    """
    if max_size is not None and max_size < 1:
        raise PrepareError(f"--max-size {max_size} must be a positive number of pixels")
    src = Path(src)
    if not src.is_dir():
        raise PrepareError(f"source folder {src} does not exist")
    splits = {s: src / s for s in ("train", "val", "test") if (src / s).is_dir()} or {"train": src}
    if "train" not in splits:
        raise PrepareError(f"{src} has {sorted(splits)} but no train/ folder")
    classes = sorted(d.name for d in splits["train"].iterdir() if d.is_dir())
    if not classes:
        raise PrepareError(f"{splits['train']} has no class folders (expected {splits['train']}/<class>/<image>)")
    info: dict = {"name": src.name, "classes": classes, "max_size": max_size}
    workers = workers or default_workers()
    for split, root in splits.items():
        files = _class_tree(root, classes)
        if not files:
            raise PrepareError(f"{root} holds no images with extensions {sorted(IMAGE_EXTS)}")
        loaded = ordered_map(_load, ((f, max_size, quality) for f, _ in files), workers=workers)
        counts = {"resized": 0}
        samples = _folder_samples(split, files, loaded, counts)
        info[split], info[f"num_{split}"] = _write_shards(samples, out, split, shard_size)
        info[f"resized_{split}"] = counts["resized"]
        log.info("wrote %d %s samples to %s/%s (%d re-encoded to a shorter side of %s px; %d processes)",
                 info[f"num_{split}"], split, out, info[split], counts["resized"], max_size, workers)
    _write_manifest(out, info)
    return info
