"""Labelled data for fine-tuning: the pretraining shards (or the synthetic source), timm's transforms in the data
workers, and batches that are the same whatever the number of ranks.

- The label subset (``finetune.labels``) is class-balanced and seeded by ``finetune.labels_seed`` alone, so every
  arm (pretrained, scratch, MAE) and every fine-tuning seed trains on the same images.
- One global stream: every rank reads the same order (shards, shuffle buffer: cheap, nothing decoded), keeps the
  subset, and takes its own rows of every global batch; only those are decoded, in its data workers. So 2 ranks see
  exactly the global batch 1 rank sees, and the stream's position after a step is one global fact that a checkpoint
  stores and any number of ranks resumes from.
- Each sample's augmentation (crop, flip, RandAugment, random erasing) is seeded by its place in the stream, so it
  is the same for any worker count and after a resume.
"""

from __future__ import annotations

import functools
import os
import random
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bimdist.config import Config
from bimdist.data.decode import CorruptSample, decode_sample, image_bytes, label_of
from bimdist.data.loader import CHUNK_BYTES, _worker_init
from bimdist.data.stream import DataError, DataStats, Position, RawSample, ShardStream, SyntheticStream, sample_name
from bimdist.data.synthetic import synthetic_image
from bimdist.data.tarindex import MemberReader, TarIndexError, tar_samples
from bimdist.model.masking import seed_for


def sample_key(raw: RawSample) -> str:
    p = raw.payload
    if "synthetic" in p:
        return str(p["synthetic"])
    return f"{Path(p['__url__']).name}/{p['__key__']}"


@dataclass
class LabelIndex:
    """Every train sample's key and label, in shard order."""

    keys: list[str]
    labels: list[int]

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1

    def counts(self) -> dict[int, int]:
        out: dict[int, int] = defaultdict(int)
        for y in self.labels:
            out[y] += 1
        return dict(sorted(out.items()))


def label_index(cfg: Config, stats: DataStats) -> LabelIndex:
    """Keys and labels of the train split (reads each sample's label member, never its image)."""
    d = cfg.data
    if d.source == "synthetic":
        return LabelIndex([str(i) for i in range(d.synthetic_size)], [i % 10 for i in range(d.synthetic_size)])
    assert d.train_shards
    stream = ShardStream(d.train_shards, seed=0, replica=0, replicas=1, shuffle_buffer=1, stats=stats,
                         shuffle_shards=False, key="data.train_shards")
    reader, keys, labels = MemberReader(), [], []
    for url in stream.urls:
        try:
            for sample in tar_samples(url):
                try:
                    label = label_of(reader.materialize({"cls": sample["cls"]})) if "cls" in sample else -1
                except (OSError, CorruptSample) as e:
                    stats.skip(f"{sample['__key__']} in {url}", str(e))
                    continue
                if label < 0:
                    stats.skip(f"{sample['__key__']} in {url}", "no label (cls member)")
                    continue
                keys.append(f"{Path(url).name}/{sample['__key__']}")
                labels.append(label)
        except (OSError, TarIndexError) as e:
            stats.skip(url, f"unreadable shard: {e}")
    reader.close()
    if not keys:
        raise DataError(f"no labelled samples in data.train_shards={d.train_shards!r}; fine-tuning needs a cls "
                        "label per sample (`bimdist data prepare` writes one)")
    return LabelIndex(keys, labels)


def label_subset(index: LabelIndex, fraction: float, seed: int) -> set[str]:
    """A class-balanced share ``fraction`` of the keys (at least one per class), a function of ``seed`` only."""
    by_class: dict[int, list[str]] = defaultdict(list)
    for key, label in zip(index.keys, index.labels):
        by_class[label].append(key)
    chosen: set[str] = set()
    for label, keys in sorted(by_class.items()):
        n = max(1, round(fraction * len(keys)))
        chosen.update(random.Random(seed_for(seed, 11, label)).sample(sorted(keys), n))
    return chosen


@dataclass
class RankChunk:
    """Consecutive samples of one rank's rows, to decode in a worker."""

    step: int
    part: int  # pieces of one step's batch, when it is larger than CHUNK_BYTES decoded
    samples: list[RawSample]
    boundary: Position | None = None  # the global stream's position after this step (last part only)


@dataclass
class Decoded:
    step: int
    part: int
    images: torch.Tensor  # float [k, C, S, S], normalised and augmented
    labels: torch.Tensor  # int64 [k]
    boundary: Position | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)


class TrainChunks:
    """The DataLoader's sampler: this rank's rows of every global batch, from a global stream position."""

    def __init__(self, cfg: Config, *, keep: set[str] | None, rank: int, world: int, start: Position,
                 start_step: int, stats: DataStats, sample_bytes: int):
        f = cfg.finetune
        self.cfg, self.keep, self.rank, self.world = cfg, keep, rank, world
        self.start, self.start_step, self.stats = start, start_step, stats
        self.batch, self.local = f.batch_size, f.batch_size // world
        self.parts = max(1, -(-self.local * sample_bytes // CHUNK_BYTES))

    def _stream(self) -> ShardStream | SyntheticStream:
        d, seed = self.cfg.data, self.cfg.finetune.seed
        if d.source == "synthetic":
            return SyntheticStream(size=d.synthetic_size, seed=seed)
        assert d.train_shards
        return ShardStream(d.train_shards, seed=seed, replica=0, replicas=1, shuffle_buffer=d.shuffle_buffer,
                           stats=self.stats, key="data.train_shards")

    def __iter__(self) -> Iterator[RankChunk]:
        rows = range(self.rank * self.local, (self.rank + 1) * self.local)
        mine: list[RawSample] = []
        count, step = 0, self.start_step
        for position, raw in self._stream().iterate(self.start):
            if self.keep is not None and sample_key(raw) not in self.keep:
                continue
            if count in rows:
                mine.append(raw)
            count += 1
            if count == self.batch:  # the global batch is complete: hand over this rank's rows of it
                yield from self._split(step, mine, position)
                mine, count, step = [], 0, step + 1

    def _split(self, step: int, samples: list[RawSample], boundary: Position) -> Iterator[RankChunk]:
        size = -(-len(samples) // self.parts)
        for part in range(self.parts):
            last = part == self.parts - 1
            yield RankChunk(step, part, samples[part * size : (part + 1) * size], boundary if last else None)


class EvalChunks:
    """The test split in shard order, this rank's share (sample i goes to rank i % world), in fixed chunks."""

    def __init__(self, cfg: Config, *, rank: int, world: int, limit: int | None, stats: DataStats, size: int):
        self.cfg, self.rank, self.world, self.limit, self.stats, self.size = cfg, rank, world, limit, stats, size

    def __iter__(self) -> Iterator[RankChunk]:
        d = self.cfg.data
        if d.source == "synthetic":
            n = self.limit or d.synthetic_size
            raws = (RawSample((0, i, 0), {"synthetic": 10**6 + i}) for i in range(n))
        else:
            if not d.test_shards:
                raise DataError("data.test_shards is not set; fine-tuning evaluates on labelled test shards")
            stream = ShardStream(d.test_shards, seed=0, replica=0, replicas=1, shuffle_buffer=1, stats=self.stats,
                                 epochs=1, shuffle_shards=False, key="data.test_shards")
            raws = (raw for _, raw in stream.iterate(Position()))
        batch: list[RawSample] = []
        index = 0
        for i, raw in enumerate(raws):
            if self.limit is not None and i >= self.limit:
                break
            if i % self.world == self.rank:
                batch.append(raw)
                if len(batch) == self.size:
                    yield RankChunk(index, 0, batch)
                    batch, index = [], index + 1
        if batch:
            yield RankChunk(index, 0, batch)


def _posterize_keeping_no_bits() -> None:
    """timm's increasing posterize asks for 0 bits at magnitude 10 (RandAugment's noise reaches it); Pillow 12+
    refuses that, where older Pillow (and so MAE) turned the image black. Keep that meaning instead of crashing a
    data worker once in a few hundred samples."""
    import timm.data.auto_augment as aa
    from PIL import Image

    if getattr(aa.posterize, "bimdist", False):
        return

    def posterize(img: Image.Image, bits_to_keep: int, **kwargs: object) -> Image.Image:
        if bits_to_keep < 1:
            return img.point(lambda _: 0)
        return original(img, bits_to_keep, **kwargs)

    original = aa.posterize
    posterize.bimdist = True  # type: ignore[attr-defined]
    for name, op in list(aa.NAME_TO_OP.items()):
        if op is original:
            aa.NAME_TO_OP[name] = posterize
    aa.posterize = posterize


class Transformer(Dataset):
    """Runs in the data workers: raw samples -> timm-transformed tensors and labels (seeded per sample)."""

    def __init__(self, cfg: Config, *, train: bool):
        super().__init__()
        from timm.data import create_transform

        _posterize_keeping_no_bits()

        m, d, f = cfg.model, cfg.data, cfg.finetune
        self.cfg, self.train, self.size = cfg, train, f.input_size or m.img_size
        kwargs = dict(input_size=self.size, interpolation="bicubic", mean=tuple(d.mean), std=tuple(d.std))
        if train:
            self.transform = create_transform(is_training=True, auto_augment=f.auto_augment, re_prob=f.reprob,
                                              re_mode=f.remode, re_count=f.recount, scale=tuple(f.crop_scale),
                                              hflip=0.5 if d.hflip else 0.0, **kwargs)
        else:
            self.transform = create_transform(is_training=False, crop_pct=f.eval_crop_pct, **kwargs)
        self.reader = MemberReader()
        self.mode = "L" if m.in_chans == 1 else "RGB"

    def __getitem__(self, chunk: RankChunk) -> Decoded:  # type: ignore[override]
        from PIL import Image

        images, labels, skipped = [], [], []
        for raw in chunk.samples:
            try:
                img, label = self._image(raw, Image)
            except CorruptSample as e:
                skipped.append((sample_name(raw), str(e)))
                continue
            if self.train:  # crop, flip, RandAugment and erasing draw from python, numpy and torch: seed all three
                seed = seed_for(self.cfg.finetune.seed, 12, *raw.uid)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                torch.manual_seed(seed)
            images.append(self.transform(img))
            labels.append(label)
        c = self.cfg.model.in_chans
        stacked = torch.stack(images) if images else torch.empty(0, c, self.size, self.size)
        return Decoded(chunk.step, chunk.part, stacked, torch.tensor(labels, dtype=torch.int64), chunk.boundary,
                       skipped)

    def _image(self, raw: RawSample, Image: object) -> tuple[object, int]:  # noqa: N803 - the PIL module
        m = self.cfg.model
        if "synthetic" in raw.payload:
            img, label = synthetic_image(raw.payload["synthetic"], size=m.img_size, chans=m.in_chans,
                                         seed=self.cfg.run.seed)
            arr = img.permute(1, 2, 0).numpy()
        else:
            try:
                payload = self.reader.materialize(raw.payload)
            except OSError as e:
                raise CorruptSample(f"cannot read it: {e}") from None
            _, data = image_bytes(payload)
            label = label_of(payload)
            if label < 0:
                raise CorruptSample("no label (cls member)")
            arr = decode_sample(data, chans=m.in_chans)
        if arr.shape[-1] != m.in_chans:
            raise CorruptSample(f"{arr.shape[-1]} channels, model.in_chans is {m.in_chans}")
        return Image.fromarray(arr[..., 0] if m.in_chans == 1 else arr, mode=self.mode), label


def batches(chunks: TrainChunks | EvalChunks, dataset: Transformer, *, workers: int,
            timeout_s: float) -> DataLoader:
    """Decoded chunks in order, decoded by ``workers`` processes (0: this thread)."""
    if workers == 0:
        return DataLoader(dataset, sampler=chunks, batch_size=None, num_workers=0)
    return DataLoader(dataset, sampler=chunks, batch_size=None, num_workers=workers, prefetch_factor=2,
                      worker_init_fn=functools.partial(_worker_init, parent=os.getpid()),
                      multiprocessing_context="fork" if sys.platform.startswith("linux") else None, timeout=timeout_s)


def sample_bytes(cfg: Config) -> int:
    size = cfg.finetune.input_size or cfg.model.img_size
    return cfg.model.in_chans * size * size * 4
