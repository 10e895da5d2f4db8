"""``python -m bimdist.distributed.store --port P``: the job's store, hosted outside every rank (the Slurm batch step
runs it), so that any single rank can die and be restarted while the rest of the job keeps its state. Stops on
SIGTERM or SIGINT, or when its parent (the batch script) is gone."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from datetime import timedelta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bimdist.distributed.store", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default: every interface)")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    import torch.distributed as dist

    try:
        store, _listener = listening_store(args.host, args.port)
    except (OSError, RuntimeError, dist.DistError) as e:
        print(f"bimdist store: cannot listen on {args.host}:{args.port}: {str(e).splitlines()[0]}; choose another "
              "MASTER_PORT", file=sys.stderr)
        return 2
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    parent = os.getppid()
    print(f"bimdist store: serving on {args.host}:{args.port} (pid {os.getpid()})", flush=True)
    while not done.wait(1.0):
        if os.getppid() != parent:
            break
    del store
    return 0


def listening_store(host: str, port: int, *, timeout_s: float = 60) -> tuple[object, socket.socket]:
    """A TCPStore server that listens on ``host`` only (a TCPStore master given a host name still listens on every
    interface): the socket is bound here and handed over. Keep the socket with the store."""
    import torch.distributed as dist

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(1024)
    bound = listener.getsockname()[1]
    client_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    store = dist.TCPStore(client_host, bound, None, True, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False, master_listen_fd=listener.fileno())
    return store, listener


if __name__ == "__main__":
    raise SystemExit(main())
