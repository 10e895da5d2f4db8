"""A two-rank link probe: the pipeline's own transport and messages shaped like the configured activations.

``bimdist doctor`` runs it between two fresh local processes. Between two nodes, run it on both (rank 0 listens on
the address given, rank 1 connects; each rank's gloo uses the interface on the route to that address)::

    node A$ python -m bimdist.distributed.probe --rank 0 --addr 10.0.0.11 --port 29600
    node B$ python -m bimdist.distributed.probe --rank 1 --addr 10.0.0.11 --port 29600

Both print the rate from A to B; ``bimdist doctor CONFIG --link-gbps RATE`` then predicts a job over that link.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bimdist.distributed.groups import Link
from bimdist.distributed.launch import free_port
from bimdist.distributed.transport import DATA, END, Message, Transport


def _rank(rank: int, port: int, backend: str, device: str, shapes: list[tuple[tuple[int, ...], str]], reps: int,
          staging: bool, out: mp.SimpleQueue) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size=None, is_master=rank == 0, timeout=timedelta(seconds=60),
                          wait_for_workers=False)
    rate = _measure(store, rank, backend=backend, device=device, shapes=shapes, reps=reps, staging=staging,
                    timeout_s=60)
    if rank == 1:
        out.put(rate)


def _measure(store: dist.Store, rank: int, *, backend: str, device: str, shapes: list[tuple[tuple[int, ...], str]],
             reps: int, staging: bool, timeout_s: float) -> float:
    """Rank 0 sends ``reps`` messages (after two warm-up ones) to rank 1; rank 1 returns bytes/s (rank 0: 0)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    store.set(f"inc/{rank}", "0")
    link = Link(store, sender=0, receiver=1, me=rank, peer_label=f"probe rank {1 - rank}", backend=backend,
                timeout_s=timeout_s, device=dev)
    transport = Transport(device=dev, prev=link if rank == 1 else None, next=link if rank == 0 else None,
                          max_in_flight=2, prefetch=2, peer_timeout_s=timeout_s, startup_timeout_s=timeout_s,
                          host_staging=staging)
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
    rate = reps * transport.bytes_received / (reps + 2) / (time.perf_counter() - t0) if rank == 1 else 0.0
    if rank == 0:
        transport.send(Message(END, reps + 2))
        transport.close()
    else:
        transport.recv()  # the END: the receiving thread stops
    return rate


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


def main(argv: list[str] | None = None) -> int:
    from bimdist.distributed.env import use_gloo_interface
    from bimdist.distributed.store import listening_store

    p = argparse.ArgumentParser(prog="python -m bimdist.distributed.probe",
                                description="the rate of the link from rank 0's node to rank 1's, through bimdist's "
                                            "transport (run it on both nodes)")
    p.add_argument("--rank", type=int, choices=(0, 1), required=True, help="0 sends (and listens), 1 receives")
    p.add_argument("--addr", required=True, help="rank 0's address on the link to test; rank 0 listens there only")
    p.add_argument("--port", type=int, default=29600, help="rank 0's store port (default 29600)")
    p.add_argument("--mb", type=float, default=4.0, help="message size in MB (default 4)")
    p.add_argument("--reps", type=int, default=10, help="timed messages, after two warm-up ones (default 10)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl); default cpu")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for the other rank (default 120)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    found = use_gloo_interface(args.addr)
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    torch.set_num_threads(1)
    try:
        if args.rank == 0:
            store, _listener = listening_store(args.addr, args.port, timeout_s=args.timeout)
        else:
            store = dist.TCPStore(args.addr, args.port, None, False, timeout=timedelta(seconds=args.timeout))
    except (OSError, RuntimeError) as e:
        what = "listen on" if args.rank == 0 else "reach rank 0 at"
        print(f"bimdist probe: cannot {what} {args.addr}:{args.port}: {str(e).splitlines()[0]}; check the address, "
              "the port and the firewall (see docs/operations.md)", file=sys.stderr, flush=True)
        return 2
    numel = max(1, int(args.mb * 1e6 / 4))
    try:
        rate = _measure(store, args.rank, backend=backend, device=args.device, shapes=[((numel,), "float32")],
                        reps=args.reps, staging=False, timeout_s=args.timeout)
        if args.rank == 1:
            store.set("probe/result", json.dumps({"bytes_per_s": rate, "from": args.addr,
                                                  "to": found[1] if found else "?"}))
        store.wait(["probe/result"], timedelta(seconds=args.timeout))
        result = json.loads(store.get("probe/result"))
        if args.rank == 0:
            store.set("probe/read", "1")
        else:
            store.wait(["probe/read"], timedelta(seconds=args.timeout))  # rank 0 hosts the store: let it read first
    except Exception as e:  # noqa: BLE001 - a dead or unreachable peer, a timeout
        print(f"bimdist probe: the link test failed: {str(e).splitlines()[0][:300]}", file=sys.stderr, flush=True)
        return 3
    gbps = result["bytes_per_s"] * 8 / 1e9
    result.update(gbps=gbps, message_mb=numel * 4 / 1e6, reps=args.reps, backend=backend)
    print(f"bimdist probe: {result['from']} -> {result['to']}: {gbps:.3f} Gbit/s ({result['bytes_per_s'] / 1e6:.1f} "
          f"MB/s), {args.reps} messages of {numel * 4 / 1e6:.2f} MB over {backend}; predict a job over this link with "
          f"`bimdist doctor CONFIG --link-gbps {gbps:.3g}`", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
