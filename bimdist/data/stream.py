"""Raw sample streams with resumable positions: webdataset shards, or the synthetic source.

A position is (epoch, samples taken in that epoch). Streams are deterministic given the seed, so resuming
means regenerating the epoch's order and skipping ``offset`` samples *before* decoding them. A stream yields one
stage-0 replica's samples only: its own shards, or (synthetic) its rows of every global batch.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import braceexpand
import torch
import webdataset as wds

from bimdist.data.tarindex import tar_samples
from bimdist.model.masking import seed_for

log = logging.getLogger("bimdist.data")

class DataError(RuntimeError):
    """The data cannot be used at all (no shards, too few shards); corrupt single samples are not errors."""


@dataclass(frozen=True)
class Position:
    epoch: int = 0
    offset: int = 0


@dataclass
class DataStats:
    """Counters the trainer exports: skipped corrupt samples and shard read errors."""

    corrupt: int = 0
    shard_errors: int = 0
    log_every: int = 100
    opened: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # shard errors not yet reported (data workers)

    def skip(self, what: str, reason: str) -> None:
        self.corrupt += 1
        if self.corrupt == 1 or self.corrupt % self.log_every == 0:
            log.warning("skipped corrupt sample %s: %s (%d skipped so far)", what, reason, self.corrupt)


@dataclass
class RawSample:
    uid: tuple[int, ...]  # identifies the sample's place in the stream; seeds its augmentation
    payload: dict


def expand_shards(pattern: str) -> list[str]:
    urls = [u for part in pattern.split("::") for u in braceexpand.braceexpand(part)]
    if not urls:
        raise DataError(f"shard pattern {pattern!r} expands to nothing")
    return urls


def check_shards(train: str | None, test: str | None) -> None:
    """Both shard patterns exist before anything trains: a missing test pattern would otherwise fail only at the end
    of the run, while it draws recon.png. Remote URLs are left to the readers."""
    for key, pattern in (("data.train_shards", train), ("data.test_shards", test)):
        if not pattern:
            continue
        urls = expand_shards(pattern)
        missing = [u for u in urls if "://" not in u and not _exists(u)]
        if missing:
            extra = " (or set data.test_shards=null: recon.png then shows training images)" if "test" in key else ""
            raise DataError(f"{key}={pattern!r}: {len(missing)} of {len(urls)} shards are missing, e.g. {missing[0]}; "
                            f"run `bimdist data prepare` or fix {key}{extra}")


class ShardStream:
    """This replica's share of the shards, shuffled per epoch (shard order, then a sample buffer)."""

    def __init__(self, pattern: str, *, seed: int, replica: int, replicas: int, shuffle_buffer: int,
                 stats: DataStats, epochs: int | None = None, shuffle_shards: bool = True,
                 key: str = "data.train_shards"):
        """``key``: the config key the pattern came from, for messages."""
        self.urls = expand_shards(pattern)
        missing = [u for u in self.urls if "://" not in u and not _exists(u)]
        if missing:
            raise DataError(f"{len(missing)} of {len(self.urls)} shards are missing, e.g. {missing[0]}; "
                            f"run `bimdist data prepare` or fix {key}")
        if len(self.urls) < replicas:
            raise DataError(f"{len(self.urls)} shards cannot be split over {replicas} stage-0 replicas; "
                            "write more, smaller shards")
        self.seed, self.replica, self.replicas = seed, replica, replicas
        self.buffer, self.stats, self.epochs = shuffle_buffer, stats, epochs
        self.shuffle_shards = shuffle_shards

    def shards_for_epoch(self, epoch: int) -> list[str]:
        order = list(self.urls)
        if self.shuffle_shards:
            random.Random(seed_for(self.seed, 3, epoch)).shuffle(order)
        return order[self.replica :: self.replicas]

    def _tar_error(self, exn: Exception) -> bool:
        """Recorded, not counted: the reader that owns the place in the stream reports it (see data.loader)."""
        self.stats.errors.append(("in a shard", f"{type(exn).__name__}: {exn}"))
        return True  # keep going with the next sample or shard

    def _open_logged(self, urls: list[str]) -> Iterator[dict]:
        for url in urls:
            self.stats.opened.append(url)
            log.debug("replica %d opens shard %s", self.replica, url)
            yield {"url": url}

    def _indexed(self, urls: list[str]) -> Iterator[dict]:
        """Local shards: samples whose members are ``MemberRef``s (the data workers read the bytes)."""
        for url in urls:
            self.stats.opened.append(url)
            log.debug("replica %d opens shard %s", self.replica, url)
            try:
                yield from tar_samples(url)
            except (OSError, ValueError) as e:  # the rest of this shard is lost; the stream goes on with the next
                self._tar_error(e)

    def iterate(self, start: Position) -> Iterator[tuple[Position, RawSample]]:
        epoch = start.epoch
        while self.epochs is None or epoch < self.epochs:
            urls = self.shards_for_epoch(epoch)
            if any("://" in u for u in urls):  # remote: streamed, bytes and all
                samples = wds.tarfile_to_samples(handler=self._tar_error)(self._open_logged(urls))
            else:
                samples = self._indexed(urls)
            samples = wds.shuffle(self.buffer, initial=self.buffer, seed=seed_for(self.seed, 4, epoch, self.replica))(
                samples
            )
            skip = start.offset if epoch == start.epoch else 0
            count = 0
            for j, sample in enumerate(samples):
                count += 1
                if j < skip:
                    continue
                yield Position(epoch, j + 1), RawSample((epoch, j, self.replica), sample)
            if count == 0:
                raise DataError(f"replica {self.replica} read no samples from {self.shards_for_epoch(epoch)}")
            epoch += 1


class SyntheticStream:
    """The synthetic source in one global order (sample i is a function of the seed and i)."""

    def __init__(self, *, size: int, seed: int, epochs: int | None = None):
        self.size, self.seed, self.epochs = size, seed, epochs

    def iterate(self, start: Position) -> Iterator[tuple[Position, RawSample]]:
        epoch = start.epoch
        while self.epochs is None or epoch < self.epochs:
            g = torch.Generator().manual_seed(seed_for(self.seed, 3, epoch))
            order = torch.randperm(self.size, generator=g).tolist()
            skip = start.offset if epoch == start.epoch else 0
            for j in range(skip, self.size):
                yield Position(epoch, j + 1), RawSample((epoch, j, 0), {"synthetic": order[j]})
            epoch += 1


def _exists(path: str) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def sample_name(raw: RawSample) -> str:
    p = raw.payload
    return f"{p.get('__key__', raw.uid)} in {p.get('__url__', 'synthetic')}"
