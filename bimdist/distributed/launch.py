"""Standalone launch: ``bimdist train CONFIG --pipeline.stages=4`` outside any launcher spawns its own ranks.

The parent starts one ``python -m bimdist`` child per rank with the torchrun-style environment, forwards
signals to them, and if one child fails gives the others a bounded grace period to notice (they name the
dead stage themselves) before killing what is left. No child outlives the parent's wait.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

from bimdist.config import Config
from bimdist.distributed.topology import Topology
from bimdist.train.signals import EXIT_OK, EXIT_PEER, EXIT_PREEMPTED

log = logging.getLogger("bimdist.launch")

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_standalone(cfg: Config, argv: list[str]) -> int:
    """``bimdist train`` outside any launcher with stages x replicas > 1: check, prepare the run folder, spawn.

    Imports no model code: the ranks import what they need, and the launcher's own start stays short."""
    from bimdist.telemetry.progress import setup_logging
    from bimdist.train.rundir import prepare_run_dir

    if cfg.pipeline.engine == "deepspeed":
        from bimdist.train.ds_engine import build_ds_config

        build_ds_config(cfg)  # unknown or conflicting keys fail here (ConfigError), before any process starts
    setup_logging("launcher")
    prepare_run_dir(cfg, write=True)
    print(cfg.to_yaml(), flush=True)
    topo = Topology(cfg.pipeline.stages, cfg.pipeline.replicas)
    return spawn_local(argv, topo, grace_s=cfg.pipeline.peer_timeout_s + 30)


def spawn_local(argv: list[str], topo: Topology, *, grace_s: float) -> int:
    """Run every rank on this machine; returns the job's exit code."""
    port = free_port()
    world = topo.world_size
    procs: list[subprocess.Popen] = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), BIMDIST_SPAWNED="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "bimdist", *argv], env=env))
    log.info("spawned %d local ranks (%d stages x %d replicas), pids %s", world, topo.stages, topo.replicas,
             [p.pid for p in procs])

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        return _wait(procs, topo, grace_s=grace_s)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _describe(topo: Topology, rank: int, code: int) -> str:
    c = topo.coord(rank)
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
    return f"rank {rank} (stage {c.stage}, replica {c.replica}) {how}"


def _wait(procs: list[subprocess.Popen], topo: Topology, *, grace_s: float) -> int:
    first_failure: tuple[int, int] | None = None
    deadline: float | None = None
    while True:
        codes = [p.poll() for p in procs]
        for rank, code in enumerate(codes):
            if code not in (None, EXIT_OK, EXIT_PREEMPTED) and first_failure is None:
                first_failure = (rank, code)
                deadline = time.monotonic() + grace_s
                log.error("%s; waiting up to %.0f s for the other ranks to stop", _describe(topo, rank, code), grace_s)
        if all(c is not None for c in codes):
            break
        if deadline is not None and time.monotonic() > deadline:
            for rank, p in enumerate(procs):
                if p.poll() is None:
                    log.error("rank %d did not stop within %.0f s of the failure; killing it", rank, grace_s)
                    p.kill()
            for p in procs:
                p.wait(timeout=30)
            break
        time.sleep(0.2)
    codes = [p.returncode for p in procs]
    if first_failure is not None:
        # A rank that only lost its neighbour exits EXIT_PEER; prefer the rank with the cause (a crash, a
        # full disk, a kill) when both are seen.
        causes = [(r, c) for r, c in enumerate(codes) if c not in (EXIT_OK, EXIT_PREEMPTED, EXIT_PEER)]
        rank, code = first_failure if first_failure[1] != EXIT_PEER or not causes else causes[0]
        log.error("job failed: %s (exit codes by rank: %s)", _describe(topo, rank, code), codes)
        return code if code > 0 else EXIT_PEER
    if any(c == EXIT_PREEMPTED for c in codes):
        return EXIT_PREEMPTED
    return EXIT_OK
