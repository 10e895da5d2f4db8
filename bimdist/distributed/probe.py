"""A two-rank link probe for ``bimdist doctor``: the pipeline's own transport, the backend the job would pick, and
messages shaped like the configured activations, between two fresh local processes."""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bimdist.distributed.groups import Link
from bimdist.distributed.launch import free_port
from bimdist.distributed.transport import DATA, Message, Transport


def _rank(rank: int, port: int, backend: str, device: str, shapes: list[tuple[tuple[int, ...], str]], reps: int,
          staging: bool, out: mp.SimpleQueue) -> None:
    torch.set_num_threads(1)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    store = dist.TCPStore("127.0.0.1", port, world_size=None, is_master=rank == 0, timeout=timedelta(seconds=60),
                          wait_for_workers=False)
    store.set(f"inc/{rank}", "0")
    link = Link(store, sender=0, receiver=1, me=rank, peer_label=f"probe rank {1 - rank}", backend=backend,
                timeout_s=60, device=dev)
    transport = Transport(device=dev, prev=link if rank == 1 else None, next=link if rank == 0 else None,
                          max_in_flight=2, prefetch=2, peer_timeout_s=60, startup_timeout_s=60, host_staging=staging)
    if rank == 0:
        transport.start_sending()
        transport.next_stage_needs()
    else:
        transport.start_receiving(0)
    tensors = [torch.zeros(shape, dtype=getattr(torch, dtype), device=dev) for shape, dtype in shapes]
    t0 = 0.0
    for i in range(reps + 2):  # two warm-up messages
        if i == 2:
            t0 = time.perf_counter()
        if rank == 0:
            transport.send(Message(DATA, i, tensors))
        else:
            transport.recv()
    if rank == 0:
        transport.close()
    else:
        out.put(reps * transport.bytes_received / (reps + 2) / (time.perf_counter() - t0))


def link_bytes_per_s(*, backend: str, devices: tuple[str, str], shapes: list[tuple[tuple[int, ...], str]],
                     reps: int = 10, staging: bool = False, timeout_s: float = 120) -> float:
    """Bytes per second from one rank to the next through ``Transport``, for messages of ``shapes`` (shape,
    torch dtype name). Raises TimeoutError if the probe does not finish in ``timeout_s``."""
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, backend, devices[r], shapes, reps, staging, out), daemon=True)
             for r in (0, 1)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    if any(p.is_alive() for p in procs) or out.empty():
        for p in procs:
            p.kill()
        raise TimeoutError(f"the {backend} link probe did not finish within {timeout_s:.0f} s")
    return out.get()
