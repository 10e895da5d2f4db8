"""Training batches for one stage-0 replica: decode, MAE augmentation, batching and the masking order.

Every random choice is seeded from the run seed and a position (step, or the sample's place in the stream),
so a batch does not depend on which process builds it or on whether the run was resumed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from bimdist.config import Config
from bimdist.data.stream import (
    CorruptSample,
    DataError,
    DataStats,
    Position,
    RawSample,
    ShardStream,
    SyntheticStream,
    decode,
    sample_name,
)
from bimdist.model.masking import seed_for, shuffle_ids

log = logging.getLogger("bimdist.data")


@dataclass
class Batch:
    step: int
    images: torch.Tensor  # uint8 [n, C, H, W]
    labels: torch.Tensor  # int64 [n]
    ids_shuffle: torch.Tensor  # int64 [n, L]
    position: Position  # stream position after this batch (resume point)


class Augment:
    """RandomResizedCrop + horizontal flip on uint8 tensors, reproducible per sample seed."""

    def __init__(self, size: int, *, scale: tuple[float, float], hflip: bool):
        ops = [T.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True)]
        if hflip:
            ops.append(T.RandomHorizontalFlip())
        self.transform = T.Compose(ops)

    def __call__(self, img: torch.Tensor, seed: int) -> torch.Tensor:
        # torchvision draws from the global CPU generator: seed it for this sample and restore it after. Only the
        # CPU generator: ``torch.manual_seed`` would also reseed every GPU's generator (from the data thread, per
        # sample) and costs ~60x more here.
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)
        try:
            return self.transform(img)
        finally:
            torch.set_rng_state(state)


def center_resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation view: shorter side to ``size``, then a centre crop."""
    if img.shape[-2:] == (size, size):
        return img
    img = T.functional.resize(img, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return T.functional.center_crop(img, [size, size])


def make_stream(cfg: Config, *, replica: int, replicas: int, stats: DataStats) -> ShardStream | SyntheticStream:
    d = cfg.data
    if d.source == "synthetic":
        return SyntheticStream(size=d.synthetic_size, seed=cfg.run.seed, epochs=d.epochs)
    assert d.train_shards is not None  # enforced by the config validator
    return ShardStream(d.train_shards, seed=cfg.run.seed, replica=replica, replicas=replicas,
                       shuffle_buffer=d.shuffle_buffer, stats=stats, epochs=d.epochs)


def mask_order(cfg: Config, step: int, rows: slice) -> torch.Tensor:
    """The global batch's masking permutations for ``step``, restricted to this replica's rows: [n, L]."""
    g = torch.Generator().manual_seed(seed_for(cfg.run.seed, 1, step))
    return shuffle_ids(cfg.data.batch_size, cfg.model.num_patches, generator=g)[rows]


def train_batches(cfg: Config, *, replica: int, replicas: int, start_step: int, start: Position,
                  stats: DataStats) -> Iterator[Batch]:
    """Batches for steps ``start_step, start_step + 1, ...`` until the stream ends (or forever)."""
    m, d = cfg.model, cfg.data
    stream = make_stream(cfg, replica=replica, replicas=replicas, stats=stats)
    local = d.batch_size // replicas
    rows = slice(replica * local, (replica + 1) * local)
    take = d.batch_size if stream.global_order else local  # raw samples consumed per step
    augment = Augment(m.img_size, scale=d.crop_scale, hflip=d.hflip)
    it = stream.iterate(start)
    step, position = start_step, start
    while True:
        images, labels = [], []
        pending: list[RawSample] = []
        for _ in range(take):
            nxt = next(it, None)
            if nxt is None:
                return  # the data ended; a partial batch is dropped so every step has the same shape
            position, raw = nxt
            pending.append(raw)
        mine = pending[rows] if stream.global_order else pending
        queue = list(mine)
        while len(images) < local:
            if not queue:  # refill after skipped corrupt samples, from the stream itself
                nxt = next(it, None)
                if nxt is None:
                    return
                position, raw = nxt
                queue.append(raw)
            raw = queue.pop(0)
            try:
                img, label = decode(raw.payload, chans=m.in_chans, size=m.img_size, seed=cfg.run.seed)
            except CorruptSample as e:
                stats.skip(sample_name(raw), str(e))
                continue
            if img.shape[0] != m.in_chans:
                stats.skip(sample_name(raw), f"{img.shape[0]} channels, model.in_chans is {m.in_chans}")
                continue
            images.append(augment(img, seed_for(cfg.run.seed, 5, *raw.uid)))
            labels.append(label)
        yield Batch(step=step, images=torch.stack(images), labels=torch.tensor(labels),
                    ids_shuffle=mask_order(cfg, step, rows), position=position)
        step += 1


def eval_images(cfg: Config, pattern: str, *, limit: int, stats: DataStats) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` decodable samples of ``pattern`` in shard order, centre-resized: uint8 and labels."""
    stream = ShardStream(pattern, seed=cfg.run.seed, replica=0, replicas=1, shuffle_buffer=1, stats=stats,
                         epochs=1, shuffle_shards=False)
    images, labels = [], []
    for _, raw in stream.iterate(Position()):
        try:
            img, label = decode(raw.payload, chans=cfg.model.in_chans, size=cfg.model.img_size, seed=cfg.run.seed)
        except CorruptSample as e:
            stats.skip(sample_name(raw), str(e))
            continue
        images.append(center_resize(img, cfg.model.img_size))
        labels.append(label)
        if len(images) >= limit:
            break
    if not images:
        raise DataError(f"no decodable samples in {pattern}")
    return torch.stack(images), torch.tensor(labels)
