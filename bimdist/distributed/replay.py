"""What a stage sent since its downstream's restart point, so that a restarted downstream can be fed again.

Entries are the packed messages (header and payload, on the host), kept in memory up to a byte cap; the oldest
spill to segment files in the run folder beyond it, up to a disk cap. The stage prunes everything before the step
its downstream would restart from, which that stage publishes as it checkpoints; a segment whose entries are all
gone is deleted. Past the disk cap the oldest entries are dropped even though the downstream's restart point still
needs them: from then on that downstream cannot be restarted alone (``restartable``) until its restart point moves
past what was dropped (its next checkpoint).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class _Segment:
    fd: int
    path: Path
    end: int = 0  # bytes written
    live: int = 0  # entries not yet pruned or dropped


class ReplayLog:
    def __init__(self, *, memory_bytes: int, spill_path: Path, keep: bool = True, disk_bytes: int | None = None,
                 segment_bytes: int | None = None):
        """``keep=False`` (``pipeline.replay: off``): an entry is dropped as soon as it has been sent once.
        ``disk_bytes``: the spill files' cap (None: no cap). ``spill_path``: ``DIR/NAME.log`` names the segments
        ``DIR/NAME.00000.log``, ``DIR/NAME.00001.log``, ..."""
        self.memory_cap, self.path, self.keep = memory_bytes, Path(spill_path), keep
        self.disk_cap = disk_bytes
        default = 64 << 20 if disk_bytes is None else min(64 << 20, max(1 << 20, disk_bytes // 8))
        self.segment_cap = segment_bytes or default
        self._mem: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._disk: OrderedDict[int, tuple[int, int, int, int]] = OrderedDict()  # step -> (segment, offset, h, p)
        self._segments: OrderedDict[int, _Segment] = OrderedDict()
        self._next_segment = 0
        self.memory_bytes = 0
        self.disk_bytes = 0
        self.capped_below: int | None = None  # every step before this was dropped for the disk cap, not pruned
        self._lock = threading.Lock()
        self._added = threading.Condition(self._lock)

    @property
    def bytes(self) -> int:
        """Held in memory and on disk (the segments' live part)."""
        with self._lock:
            return self.memory_bytes + self.disk_bytes

    @property
    def steps(self) -> list[int]:
        with self._lock:
            return [*self._disk, *self._mem]

    def has(self, step: int) -> bool:
        with self._lock:
            return step in self._mem or step in self._disk

    def oldest(self) -> int | None:
        with self._lock:
            return next(iter(self._disk), next(iter(self._mem), None))

    def restartable(self, restart_point: int) -> bool:
        """Whether every step from ``restart_point`` on is still here (none was dropped for the disk cap)."""
        with self._lock:
            return self.capped_below is None or self.capped_below <= restart_point

    def append(self, step: int, header: torch.Tensor, payload: torch.Tensor) -> None:
        with self._lock:
            self._mem[step] = (header, payload)
            self.memory_bytes += header.nbytes + payload.nbytes
            while self.memory_bytes > self.memory_cap and len(self._mem) > 1:
                self._spill_oldest()
            self._added.notify_all()

    def _spill_oldest(self) -> None:
        step, (header, payload) = self._mem.popitem(last=False)
        self.memory_bytes -= header.nbytes + payload.nbytes
        h, p = header.cpu().numpy().tobytes(), payload.cpu().numpy().tobytes()
        size = len(h) + len(p)
        if self.disk_cap is not None and size > self.disk_cap:
            self._cap_drop(step)  # larger than the whole disk allowance: nothing to keep it in
            return
        seg = self._writable(size)
        os.pwrite(seg.fd, h + p, seg.end)
        self._disk[step] = (next(reversed(self._segments)), seg.end, len(h), len(p))
        seg.end += size
        seg.live += 1
        self.disk_bytes += size
        while self.disk_cap is not None and self.disk_bytes > self.disk_cap:
            oldest = next(iter(self._disk))
            self._drop_disk(oldest)
            self._cap_drop(oldest)

    def _cap_drop(self, step: int) -> None:
        self.capped_below = max(step + 1, self.capped_below or 0)

    def _writable(self, size: int) -> _Segment:
        """The segment to append ``size`` bytes to: the newest one while it has room, else a new one."""
        if self._segments:
            seg = next(reversed(self._segments.values()))
            if seg.end + size <= self.segment_cap or seg.end == 0:
                return seg
        index = self._next_segment
        self._next_segment += 1
        path = self.path.with_name(f"{self.path.stem}.{index:05d}{self.path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        seg = _Segment(os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600), path)
        self._segments[index] = seg
        return seg

    def _drop_disk(self, step: int) -> None:
        index, _, h, p = self._disk.pop(step)
        seg = self._segments[index]
        seg.live -= 1
        self.disk_bytes -= h + p
        if seg.live == 0:  # every entry of the segment is gone: so is the file
            os.close(seg.fd)
            seg.path.unlink(missing_ok=True)
            del self._segments[index]

    def get(self, step: int, *, timeout_s: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The entry of ``step`` once it exists (waits up to ``timeout_s``); None when it was pruned."""
        with self._lock:
            if not self._added.wait_for(lambda: step in self._mem or step in self._disk or self._beyond(step),
                                        timeout=timeout_s):
                raise TimeoutError(f"step {step} was not produced within {timeout_s:.0f} s")
            if step in self._mem:
                return self._mem[step]
            if step in self._disk:
                index, offset, h, p = self._disk[step]
                raw = os.pread(self._segments[index].fd, h + p, offset)
                header = torch.frombuffer(bytearray(raw[:h]), dtype=torch.int64)
                return header, torch.frombuffer(bytearray(raw[h:]), dtype=torch.uint8)
            return None

    def _beyond(self, step: int) -> bool:
        """Entries after ``step`` exist but ``step`` does not: it was pruned (or never kept)."""
        newest = max([*self._disk, *self._mem], default=-1)
        return newest > step

    def sent(self, step: int) -> None:
        """Without replay, a sent message is not kept."""
        if not self.keep:
            self.prune(step + 1)

    def prune(self, before: int) -> int:
        """Drop every entry of a step < ``before``; returns how many were dropped."""
        with self._lock:
            old_disk = [s for s in self._disk if s < before]
            for step in old_disk:
                self._drop_disk(step)
            old_mem = [s for s in self._mem if s < before]
            for step in old_mem:
                header, payload = self._mem.pop(step)
                self.memory_bytes -= header.nbytes + payload.nbytes
            return len(old_disk) + len(old_mem)

    @property
    def segment_files(self) -> list[Path]:
        with self._lock:
            return [s.path for s in self._segments.values()]

    def close(self) -> None:
        with self._lock:
            for seg in self._segments.values():
                os.close(seg.fd)
                seg.path.unlink(missing_ok=True)
            self._segments.clear()
            self._disk.clear()
            self.disk_bytes = 0
