"""Peak bytes of live tensor storage: on CPU, what ``torch.cuda.max_memory_allocated`` measures on a GPU.

Peak RSS on CPU also counts memory the C allocator keeps after tensors are freed (fragmentation, arenas), so it
moves by a few percent from run to run and with the allocation order. This counts only tensor storages, from
the moment an op creates or touches one until its last reference dies, so it does not depend on the allocator.

Hand-written because torch's ``MemTracker`` (``torch.distributed._tools``) raises on the second forward of a
module ("multiple iterative calls"), so it cannot watch a training run. A Python hook runs for every op, so
this is opt-in (``metrics.live_bytes``) and meant for memory benchmarks, not for timing. A dispatch mode sees
only the ops of the thread that entered it: a tensor built on another thread (a prefetched batch, a received
message) counts from the first op this thread runs on it.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0  # bytes of the storages alive now
        self.peak = 0  # the most bytes alive at once
        self._refs: dict[int, weakref.ref] = {}  # id(storage) -> weak reference that uncounts it when it dies

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = id(storage)
        ref = self._refs.get(key)
        if ref is not None and ref() is storage:
            return
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)

        def gone(_: weakref.ref, *, key: int = key, nbytes: int = nbytes) -> None:
            self.live -= nbytes
            self._refs.pop(key, None)

        self._refs[key] = weakref.ref(storage, gone)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out
