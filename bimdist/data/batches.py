"""Training batches for one stage-0 replica (images, labels, the masking order, the resume position), and the
labelled evaluation images.

Every random choice is seeded from the run seed and a position (step, or the sample's place in the stream),
so a batch does not depend on which process builds it, on how many data workers there are, or on whether the
run was resumed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from bimdist.config import Config
from bimdist.data.decode import CorruptSample, centre_view, image_bytes, label_of
from bimdist.data.loader import BatchAssembler, loader
from bimdist.data.stream import DataError, DataStats, Position, ShardStream, sample_name
from bimdist.data.tarindex import MemberReader
from bimdist.model.masking import seed_for, shuffle_ids

log = logging.getLogger("bimdist.data")


@dataclass
class Batch:
    step: int
    images: torch.Tensor  # uint8 [n, C, H, W], channels-last in memory
    labels: torch.Tensor  # int64 [n]
    ids_shuffle: torch.Tensor  # int64 [n, L]
    position: Position  # stream position after this batch (resume point)


def mask_order(cfg: Config, step: int, rows: slice) -> torch.Tensor:
    """The global batch's masking permutations for ``step``, restricted to this replica's rows: [n, L]."""
    g = torch.Generator().manual_seed(seed_for(cfg.run.seed, 1, step))
    return shuffle_ids(cfg.data.batch_size, cfg.model.num_patches, generator=g)[rows]


def train_batches(cfg: Config, *, replica: int, replicas: int, start_step: int, start: Position,
                  stats: DataStats, workers: int = 0, device: torch.device | None = None) -> Iterator[Batch]:
    """Batches for steps ``start_step, start_step + 1, ...`` until the stream ends (or forever).

    ``workers`` processes decode and augment (0: this thread does). For a CUDA ``device`` the images come in
    pinned memory, or already on the device with ``data.decode: cuda``."""
    m, d = cfg.model, cfg.data
    local = d.batch_size // replicas
    rows = slice(replica * local, (replica + 1) * local)
    cuda = device is not None and device.type == "cuda"
    encoded = d.decode == "cuda"
    if encoded and not cuda:
        raise DataError("data.decode is 'cuda' but this stage runs on the CPU; set data.decode=cpu")
    assembler = BatchAssembler(local=local, size=m.img_size, chans=m.in_chans, stats=stats, pin=cuda,
                               device=device if encoded else None)
    chunks = iter(loader(cfg, replica=replica, replicas=replicas, start=start, workers=workers, stats=DataStats(),
                         encoded=encoded))
    step = start_step
    try:
        while True:
            try:
                chunk = next(chunks, None)
            except RuntimeError as e:  # the DataLoader's own failures: a worker died, or a timeout
                raise DataError(f"stage-0 data loading failed: {str(e).splitlines()[0]}") from None
            if chunk is None:
                return  # the data ended; a partial batch is dropped so every step has the same shape
            for images, labels, position in assembler.feed(chunk):
                ids = mask_order(cfg, step, rows)
                yield Batch(step=step, images=images, labels=labels, ids_shuffle=ids.pin_memory() if cuda else ids,
                            position=position)
                step += 1
    finally:
        shutdown = getattr(chunks, "_shutdown_workers", None)  # stop the workers now, not when GC finds them
        if shutdown is not None:
            shutdown()


def eval_images(cfg: Config, pattern: str, *, limit: int | None, stats: DataStats) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` (None: all) decodable samples of ``pattern`` in shard order, centre-resized: uint8 and
    labels."""
    key = "data.test_shards" if pattern == cfg.data.test_shards else "data.train_shards"
    stream = ShardStream(pattern, seed=cfg.run.seed, replica=0, replicas=1, shuffle_buffer=1, stats=stats, key=key,
                         epochs=1, shuffle_shards=False)
    images, labels = [], []
    reader = MemberReader()
    for _, raw in stream.iterate(Position()):
        try:
            payload = reader.materialize(raw.payload)
            _, data = image_bytes(payload)
            view = centre_view(data, chans=cfg.model.in_chans, size=cfg.model.img_size)
            label = label_of(payload)
        except OSError as e:
            stats.skip(sample_name(raw), f"cannot read it: {e}")
            continue
        except CorruptSample as e:
            stats.skip(sample_name(raw), str(e))
            continue
        images.append(view)
        labels.append(label)
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise DataError(f"no decodable samples in {pattern}")
    return torch.stack(images), torch.tensor(labels)
