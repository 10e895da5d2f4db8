"""``python -m bimdist.distributed.store --port P``: the job's store, hosted outside every rank (the Slurm batch step
runs it), so that any single rank can die and be restarted while the rest of the job keeps its state. Stops on
SIGTERM or SIGINT, or when its parent (the batch script) is gone."""

from __future__ import annotations

import argparse
import os
import signal
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
        store = dist.TCPStore(args.host, args.port, None, True, timeout=timedelta(seconds=60),
                              wait_for_workers=False)
    except (RuntimeError, dist.DistError) as e:
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


if __name__ == "__main__":
    raise SystemExit(main())
