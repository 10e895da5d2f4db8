"""Stage 0's data path: raw samples -> decoded, augmented chunks in worker processes -> batches, in order.

The rank reads the stream itself (shard order, shuffle buffer: cheap, no decoding) and cuts it into chunks of
consecutive samples: a whole batch each when it fits ``CHUNK_BYTES``, as MAE's loader gives each worker a batch.
torch's DataLoader hands each chunk to a worker process, which decodes and augments it, and returns the chunks in
order. The batches are put together here, one sample after the other. So a batch is the same for any worker
count (0, 1, 2, ...), a corrupt sample is skipped and counted exactly where the single-threaded path would meet
it, the position after each batch is a resume point, and each worker does only its own share of the work.
Workers die with the thread that started them (PR_SET_PDEATHSIG), so a rank killed with -9 leaves none behind.

With ``data.decode: cuda`` the workers read and crop-plan JPEGs but leave them encoded; whole batches are then
decoded and cropped on the GPU (nvJPEG), with the same crop windows as the CPU path.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from bimdist.config import Config
from bimdist.data.decode import (
    CorruptSample,
    CropParams,
    augmented,
    crop_on_device,
    crop_params,
    image_bytes,
    image_size,
    label_of,
    resized_crop,
)
from bimdist.data.stream import DataError, DataStats, Position, RawSample, ShardStream, SyntheticStream, sample_name
from bimdist.data.synthetic import synthetic_image
from bimdist.data.tarindex import MemberReader
from bimdist.model.masking import seed_for

log = logging.getLogger("bimdist.data")

CHUNK_BYTES = 32 << 20  # the most decoded bytes one worker hands back at a time
PR_SET_PDEATHSIG = 1


@dataclass
class RawChunk:
    """Consecutive raw samples of the stream (fewer at its end), as the rank read them."""

    index: int
    samples: list[tuple[Position, RawSample]]
    errors: list[tuple[str, str]]  # shard read errors met while reading them


@dataclass
class Chunk:
    """What a worker made of a raw chunk."""

    index: int
    positions: list[tuple[int, int]]  # stream position after each raw sample
    labels: list[int]
    rows: list[int]  # raw sample -> row of ``images`` (-1: none)
    images: torch.Tensor  # uint8 [k, C, S, S] (channels-last memory), decoded and augmented
    skipped: dict[int, tuple[str, str]] = field(default_factory=dict)  # raw sample -> (name, reason)
    errors: list[tuple[str, str]] = field(default_factory=list)
    encoded: dict[int, tuple[torch.Tensor, CropParams]] = field(default_factory=dict)  # cuda: raw -> (bytes, crop)


def make_stream(cfg: Config, *, stats: DataStats) -> ShardStream | SyntheticStream:
    """The run's one global stream: every stage-0 replica reads it whole (its order, not its pixels)."""
    d = cfg.data
    if d.source == "synthetic":
        return SyntheticStream(size=d.synthetic_size, seed=cfg.run.seed, epochs=d.epochs)
    assert d.train_shards is not None  # enforced by the config validator
    return ShardStream(d.train_shards, seed=cfg.run.seed, replica=0, replicas=1, shuffle_buffer=d.shuffle_buffer,
                       stats=stats, epochs=d.epochs)


class RawChunks:
    """The DataLoader's sampler: this replica's rows ``[lo, hi)`` of every global batch of the global stream, from
    ``start`` (a global batch boundary), cut into chunks, read in the rank.

    Every replica reads the same order and keeps only its rows, so the global batch is the same for any replica
    count, and the position after a batch is the global stream's after the *whole* global batch: the last sample of
    each batch carries that position, a resume point for any layout."""

    def __init__(self, stream: ShardStream | SyntheticStream, *, start: Position, stats: DataStats, size: int,
                 rows: tuple[int, int] | None = None, batch: int | None = None):
        self.stream, self.start, self.stats, self.size = stream, start, stats, size
        self.rows, self.batch = rows, batch

    def _mine(self) -> Iterator[tuple[Position, RawSample]]:
        it = self.stream.iterate(self.start)
        if self.rows is None or self.batch is None:
            yield from it
            return
        lo, hi = self.rows
        while True:
            whole = list(islice(it, self.batch))  # the global batch's raw samples (references, not pixels)
            if len(whole) < self.batch:
                return  # the data ended: the partial global batch is dropped by every replica alike
            mine = whole[lo:hi]
            boundary = whole[-1][0]
            yield from mine[:-1]
            yield boundary, mine[-1][1]

    def __iter__(self) -> Iterator[RawChunk]:
        it = self._mine()
        index = 0
        while True:
            samples = list(islice(it, self.size))
            errors, self.stats.errors = self.stats.errors, []
            if not samples and not errors:
                return
            yield RawChunk(index, samples, errors)
            if len(samples) < self.size:
                return
            index += 1


def chunk_size(local: int, sample_bytes: int) -> int:
    """A whole batch per chunk when it fits ``CHUNK_BYTES``, else the largest divisor of the batch that does."""
    fits = max(1, CHUNK_BYTES // max(1, sample_bytes))
    return max(d for d in range(1, min(local, fits) + 1) if local % d == 0)


class ChunkDecoder(Dataset):
    """Runs in the workers (or in the rank with 0 workers): a raw chunk -> its decoded, augmented chunk."""

    def __init__(self, cfg: Config, *, encoded: bool):
        super().__init__()
        self.cfg, self.encoded = cfg, encoded
        self.reader = MemberReader()

    def __getitem__(self, raw: RawChunk) -> Chunk:  # type: ignore[override]
        m = self.cfg.model
        chunk = Chunk(index=raw.index, positions=[], labels=[], rows=[], images=torch.empty(0, dtype=torch.uint8),
                      errors=raw.errors)
        views: list[torch.Tensor] = []
        for i, (position, sample) in enumerate(raw.samples):
            chunk.positions.append((position.epoch, position.offset))
            seed = seed_for(self.cfg.run.seed, 5, *sample.uid)
            try:
                view, label = self._sample(i, sample, seed, chunk)
            except CorruptSample as e:
                chunk.skipped[i] = (sample_name(sample), str(e))
                view, label = None, -1
            except Exception as e:  # noqa: BLE001 - a bug or a resource error: name the sample it happened on
                raise DataError(f"data worker failed on sample {sample_name(sample)}: {type(e).__name__}: {e}") from e
            if view is not None and view.shape[0] != m.in_chans:
                chunk.skipped[i] = (sample_name(sample), f"{view.shape[0]} channels, model.in_chans is {m.in_chans}")
                view, label = None, -1
            chunk.labels.append(label)
            chunk.rows.append(len(views) if view is not None else -1)
            if view is not None:
                views.append(view)
        if views:
            # channels-last in memory, as the resize leaves them (no layout copy), and straight into shared memory
            # in a worker, so handing the chunk to the rank copies nothing
            c, size = views[0].shape[0], views[0].shape[-1]
            images = torch.empty((len(views), size, size, c), dtype=torch.uint8)  # [k, S, S, C]
            if get_worker_info() is not None:
                images.share_memory_()
            chunk.images = images.permute(0, 3, 1, 2)  # [k, C, S, S] view
            for j, view in enumerate(views):
                chunk.images[j].copy_(view)
        return chunk

    def _sample(self, i: int, raw: RawSample, seed: int, chunk: Chunk) -> tuple[torch.Tensor | None, int]:
        """This sample's augmented view (or, for a JPEG under ``data.decode: cuda``, its bytes and crop: None)."""
        m, d = self.cfg.model, self.cfg.data
        if "synthetic" in raw.payload:
            img, label = synthetic_image(raw.payload["synthetic"], size=m.img_size, chans=m.in_chans,
                                         seed=self.cfg.run.seed)
            params = crop_params(seed, m.img_size, m.img_size, scale=d.crop_scale, hflip=d.hflip)
            arr = img.permute(1, 2, 0).numpy()  # [H, W, C]
            return resized_crop(arr, params, full=(m.img_size, m.img_size), size=m.img_size), label
        try:
            payload = self.reader.materialize(raw.payload)
        except OSError as e:
            raise CorruptSample(f"cannot read it: {e}") from None
        key, data = image_bytes(payload)
        label = label_of(payload)
        if self.encoded and key in ("jpg", "jpeg"):
            full = image_size(data)
            params = crop_params(seed, *full, scale=d.crop_scale, hflip=d.hflip)
            chunk.encoded[i] = (torch.frombuffer(bytearray(data), dtype=torch.uint8), params)
            return None, label
        return augmented(data, seed, chans=m.in_chans, size=m.img_size, scale=d.crop_scale, hflip=d.hflip,
                         draft=d.jpeg_draft), label


def resolve_workers(setting: int | str, *, cores: int, torch_threads: int) -> int:
    """``data.workers``: a count, or ``auto`` = the cores this rank may use, less its torch threads."""
    if setting == "auto":
        return max(0, cores - torch_threads)
    return int(setting)


def _worker_init(_worker: int, *, parent: int) -> None:
    """One torch thread per worker, and die with the rank: PR_SET_PDEATHSIG, then make sure it is still there."""
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the rank died before the signal was armed
        os._exit(1)


def loader(cfg: Config, *, replica: int, replicas: int, start: Position, workers: int, stats: DataStats,
           encoded: bool = False) -> DataLoader:
    """Decoded chunks of one replica's rows of the global stream, in order; the rank reads the stream (``stats``
    counts its shard errors), ``workers`` processes decode."""
    m = cfg.model
    local = cfg.data.batch_size // replicas
    size = chunk_size(local, m.in_chans * m.img_size**2)
    rows = (replica * local, (replica + 1) * local) if replicas > 1 else None
    chunks = RawChunks(make_stream(cfg, stats=stats), start=start, stats=stats, size=size, rows=rows,
                       batch=cfg.data.batch_size)
    decoder = ChunkDecoder(cfg, encoded=encoded)
    if workers == 0:
        return DataLoader(decoder, sampler=chunks, batch_size=None, num_workers=0)
    return DataLoader(decoder, sampler=chunks, batch_size=None, num_workers=workers, prefetch_factor=2,
                      worker_init_fn=functools.partial(_worker_init, parent=os.getpid()),
                      multiprocessing_context="fork" if sys.platform.startswith("linux") else None,
                      timeout=cfg.data.timeout_s)


class BatchAssembler:
    """Chunks in stream order -> batches of ``local`` usable samples, skipping and counting the corrupt ones."""

    def __init__(self, *, local: int, size: int, chans: int, stats: DataStats, pin: bool = False,
                 device: torch.device | None = None):
        self.local, self.size, self.chans, self.stats, self.pin, self.device = local, size, chans, stats, pin, device
        self.parts: list[tuple[Chunk, list[int]]] = []  # (chunk, its raw samples in the batch being built)
        self.count = 0
        self.position = Position()

    def feed(self, chunk: Chunk) -> Iterator[tuple[torch.Tensor, torch.Tensor, Position]]:
        """The batches this chunk completes: (images uint8 [local, C, S, S], labels [local], position after)."""
        for what, reason in chunk.errors:
            self.stats.shard_errors += 1
            self.stats.skip(what, reason)
        taken: list[int] = []
        for i, pos in enumerate(chunk.positions):
            self.position = Position(*pos)
            if i in chunk.skipped:
                self.stats.skip(*chunk.skipped[i])
                continue
            taken.append(i)
            self.count += 1
            if self.count == self.local:
                self.parts.append((chunk, taken))
                yield self._finish()
                taken = []
        if taken:
            self.parts.append((chunk, taken))

    def _finish(self) -> tuple[torch.Tensor, torch.Tensor, Position]:
        samples = [(c, i) for c, idx in self.parts for i in idx]
        labels = torch.tensor([c.labels[i] for c, i in samples])
        whole = self.parts[0][0]
        if any(c.encoded for c, _ in self.parts):
            images = self._on_device(samples)
        elif len(self.parts) == 1 and whole.images.shape[0] == self.local and not self.pin:
            images = whole.images  # the batch is one chunk, nothing skipped: no copy
        else:  # channels-last like the chunks; pinned for a GPU, so that the copy to it can overlap compute
            nhwc = torch.empty((self.local, self.size, self.size, self.chans), dtype=torch.uint8, pin_memory=self.pin)
            k = 0
            for c, idx in self.parts:
                rows = torch.tensor([c.rows[i] for i in idx])
                torch.index_select(c.images.permute(0, 2, 3, 1), 0, rows, out=nhwc[k : k + len(idx)])
                k += len(idx)
            images = nhwc.permute(0, 3, 1, 2)  # [local, C, S, S]
        self.parts, self.count = [], 0
        return images, labels, self.position

    def _on_device(self, samples: list[tuple[Chunk, int]]) -> torch.Tensor:
        """Decode this batch's JPEGs on the GPU in one call and crop them there; the others arrive decoded."""
        assert self.device is not None
        jpegs = [(n, *c.encoded[i]) for n, (c, i) in enumerate(samples) if i in c.encoded]
        decoded = decode_jpegs([data for _, data, _ in jpegs], chans=self.chans, device=self.device)
        crops = crop_on_device(decoded, [p for _, _, p in jpegs], size=self.size)
        out: list[torch.Tensor | None] = [None] * len(samples)
        for (n, _, _), img in zip(jpegs, crops):
            out[n] = img
        for n, (c, i) in enumerate(samples):
            if out[n] is None:
                out[n] = c.images[c.rows[i]].to(self.device, non_blocking=True)
        return torch.stack(out)  # type: ignore[arg-type]  # [local, C, S, S] on the device


def decode_jpegs(data: list[torch.Tensor], *, chans: int, device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes -> uint8 [C, H, W] each, decoded on ``device`` (nvJPEG on a GPU) in one call. TorchCodec where it
    is installed (torchvision's decoders are deprecated since torchvision 0.29), else torchvision."""
    if not data:
        return []
    mode = "GRAY" if chans == 1 else "RGB"
    try:
        from torchcodec.decoders import decode_jpeg

        return decode_jpeg(data, mode=mode, device=device)
    except ImportError:
        import warnings

        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return decode_jpeg(data, mode=ImageReadMode[mode], device=device)
