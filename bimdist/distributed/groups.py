"""Process groups for one rank: the world, its stage's data-parallel group, and its two activation links."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from bimdist.distributed.env import RankEnv
from bimdist.distributed.topology import Coord, Topology, check_world
from bimdist.distributed.transport import PeerError


@dataclass
class StageComm:
    topo: Topology
    rank: int
    coord: Coord
    device: torch.device
    dp_group: Any  # None when the stage has a single replica
    prev: tuple[int, Any, str] | None  # (rank, link group, "stage k (rank r)")
    next: tuple[int, Any, str] | None
    store: Any = None  # the job's key-value store (control board, failure reports)
    backend: str = "gloo"
    mp_group: Any = None  # a group of just this rank (DeepSpeed's "model parallel" group), when asked for

    @property
    def distributed(self) -> bool:
        return self.topo.world_size > 1


def peer_name(topo: Topology, rank: int) -> str:
    c = topo.coord(rank)
    if topo.replicas > 1:
        return f"stage {c.stage} replica {c.replica} (rank {rank})"
    return f"stage {c.stage} (rank {rank})"


def init_comm(env: RankEnv, topo: Topology, *, backend: str, device: torch.device, startup_timeout_s: float,
              peer_timeout_s: float, generation: int = 0, engine_groups: bool = False) -> StageComm:
    """Join the world and build every group in the same order on every rank (new_group is collective).

    ``engine_groups``: also build a replica group for every stage even with one replica, and a one-rank
    group per rank (DeepSpeed asks for both through its ``mpu``)."""
    check_world(env.world_size, topo.stages, topo.replicas)
    try:
        store = job_store(env, timeout_s=startup_timeout_s, generation=generation)
        dist.init_process_group(backend=backend, store=store, rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=startup_timeout_s))
    except dist.DistError as e:
        raise PeerError(f"could not join the job at {env.master_addr}:{env.master_port} as rank {env.rank} of "
                        f"{env.world_size} within {startup_timeout_s:.0f} s ({str(e).splitlines()[0][:200]}); "
                        "check MASTER_ADDR/MASTER_PORT and that every rank was started") from None
    peer = timedelta(seconds=peer_timeout_s)
    dp_group = mp_group = None
    if topo.replicas > 1 or engine_groups:
        for s in range(topo.stages):
            g = dist.new_group(topo.stage_group(s), timeout=peer, backend=backend)
            if env.rank in topo.stage_group(s):
                dp_group = g
    if engine_groups:
        for r in range(topo.world_size):
            g = dist.new_group([r], timeout=peer, backend=backend)
            if r == env.rank:
                mp_group = g
    prev = nxt = None
    for a, b in topo.links():
        g = dist.new_group([a, b], timeout=peer, backend=backend)
        if env.rank == b:
            prev = (a, g, peer_name(topo, a))
        if env.rank == a:
            nxt = (b, g, peer_name(topo, b))
    return StageComm(topo=topo, rank=env.rank, coord=topo.coord(env.rank), device=device, dp_group=dp_group,
                     prev=prev, next=nxt, store=store, mp_group=mp_group, backend=backend)


def job_store(env: RankEnv, *, timeout_s: float, generation: int) -> dist.Store:
    """The job's TCPStore, namespaced by restart generation.

    torchrun keeps one store across restarts: without the prefix, a restarted rank can read the dead
    generation's gloo addresses and wait on a peer that no longer exists. Under torchrun every rank is a
    client of the agent's store; otherwise rank 0 hosts it at MASTER_ADDR:MASTER_PORT.
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(env.master_addr, env.master_port, world_size=None if agent else env.world_size,
                          is_master=env.rank == 0 and not agent, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    return dist.PrefixStore(f"bimdist/gen{generation}/", store)


def all_min(value: int, group: Any = None, *, device: torch.device) -> int:
    """The minimum of ``value`` over ``group`` (the world by default)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())


def all_max(values: list[int], group: Any, *, device: torch.device) -> list[int]:
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [int(v) for v in t.tolist()]
