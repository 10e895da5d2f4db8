"""What a stage sent since its downstream's restart point, so that a restarted downstream can be fed again.

Entries are the packed messages (header and payload, on the host), kept in memory up to a byte cap; the oldest
spill to an append-only file in the run folder beyond it. The stage prunes everything before the step its
downstream would restart from, which that stage publishes as it checkpoints; once every spilled entry is pruned
the file is truncated.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch


class ReplayLog:
    def __init__(self, *, memory_bytes: int, spill_path: Path, keep: bool = True):
        """``keep=False`` (``pipeline.replay: off``): an entry is dropped as soon as it has been sent once."""
        self.memory_cap, self.path, self.keep = memory_bytes, Path(spill_path), keep
        self._mem: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._disk: OrderedDict[int, tuple[int, int, int]] = OrderedDict()  # step -> (offset, header, payload bytes)
        self._file = None
        self._end = 0
        self.memory_bytes = 0
        self._lock = threading.Lock()
        self._added = threading.Condition(self._lock)

    @property
    def bytes(self) -> int:
        """Held in memory and on disk (the spill file's live part)."""
        with self._lock:
            return self.memory_bytes + sum(h + p for _, h, p in self._disk.values())

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

    def append(self, step: int, header: torch.Tensor, payload: torch.Tensor) -> None:
        with self._lock:
            self._mem[step] = (header, payload)
            self.memory_bytes += header.nbytes + payload.nbytes
            while self.memory_bytes > self.memory_cap and len(self._mem) > 1:
                self._spill_oldest()
            self._added.notify_all()

    def _spill_oldest(self) -> None:
        step, (header, payload) = self._mem.popitem(last=False)
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w+b")  # noqa: SIM115 - closed by close()
        h, p = header.cpu().numpy().tobytes(), payload.cpu().numpy().tobytes()
        self._file.seek(self._end)
        self._file.write(h)
        self._file.write(p)
        self._disk[step] = (self._end, len(h), len(p))
        self._end += len(h) + len(p)
        self.memory_bytes -= header.nbytes + payload.nbytes

    def get(self, step: int, *, timeout_s: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The entry of ``step`` once it exists (waits up to ``timeout_s``); None when it was pruned."""
        with self._lock:
            if not self._added.wait_for(lambda: step in self._mem or step in self._disk or self._beyond(step),
                                        timeout=timeout_s):
                raise TimeoutError(f"step {step} was not produced within {timeout_s:.0f} s")
            if step in self._mem:
                return self._mem[step]
            if step in self._disk:
                offset, h, p = self._disk[step]
                self._file.flush()
                raw = os.pread(self._file.fileno(), h + p, offset)
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
            dropped = 0
            for store in (self._disk, self._mem):
                for step in [s for s in store if s < before]:
                    if store is self._mem:
                        header, payload = store[step]
                        self.memory_bytes -= header.nbytes + payload.nbytes
                    del store[step]
                    dropped += 1
            if not self._disk and self._file is not None and self._end:
                self._file.truncate(0)
                self._end = 0
            return dropped

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
                self.path.unlink(missing_ok=True)
