"""How one rank reaches the others, rebuilt per generation from the job's store, so that a restarted stage rejoins
without the rest of the job restarting.

- The job's store: hosted by the launcher or the Slurm batch step when they can (``BIMDIST_STORE_EXTERNAL=1``: it
  outlives every rank), else by rank 0 (then stage 0 cannot be restarted alone), and by torchrun's agent under
  torchrun. Namespaced by whole-job restart generation.
- An incarnation per rank (``BIMDIST_INCARNATION``: how often its supervisor restarted it), published in the store.
- A ``Link`` per pipeline neighbour: a two-rank process group named after both ends' incarnations. After its peer
  died, a rank waits for the peer's next incarnation and builds the link again; only the restarted rank's own
  links are rebuilt.
- A ``ReplicaGroup`` per stage (R > 1): the stage's replicas, rebuilt the same way when one of them comes back.

No collective includes the whole world after start-up: the start-up agreement on the resume step goes through the
store as well. DeepSpeed's engine needs torch.distributed's world group, so with it the job also joins the world
(and a dead stage then ends the job, as before).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from bimdist.distributed.env import RankEnv
from bimdist.distributed.topology import Coord, Topology, check_world
from bimdist.distributed.transport import PeerError, Route

log = logging.getLogger("bimdist.comm")

TRY_S = 15.0  # one rendezvous try; a member that is there joins within it, one that is not costs a new epoch
STORE_OP_S = 30.0  # the most one store operation may take (its own waits, like rendezvous, pass their own)



def peer_name(topo: Topology, rank: int) -> str:
    c = topo.coord(rank)
    if max(topo.counts) > 1:
        return f"stage {c.stage} replica {c.replica} (rank {rank})"
    return f"stage {c.stage} (rank {rank})"


def incarnation() -> int:
    """How often this rank's supervisor restarted it (0: first start)."""
    value = os.environ.get("BIMDIST_INCARNATION", "0")
    return int(value) if value.isdigit() else 0


def _make_group(store: dist.Store, *, backend: str, rank: int, size: int, timeout: timedelta) -> Any:
    """A process group object of ``size`` ranks that rendezvous in ``store`` (not registered with the world)."""
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, opts)
    return dist.ProcessGroupGloo(store, rank, size, timeout)


class _Rebuildable:
    """A group of ranks rebuilt from the store whenever a member's incarnation changes."""

    def __init__(self, store: dist.Store, *, members: list[int], me: int, name: str, backend: str,
                 timeout_s: float, device: torch.device | str = "cpu"):
        self.store, self.members, self.me, self.name, self.device = store, members, me, name, device
        self.backend, self.timeout_s = backend, timeout_s
        self.group: Any = None
        self.incarnations: list[int] = []

    def _current(self, *, deadline: float) -> list[int]:
        keys = [f"inc/{r}" for r in self.members]
        try:
            self.store.wait(keys, timedelta(seconds=max(1.0, deadline - time.monotonic())))
        except Exception:  # noqa: BLE001
            raise PeerError(f"{self.name}: not every member published its incarnation in time") from None
        return [int(self.store.get(k)) for k in keys]

    def connect(self, *, timeout_s: float, give_up: Callable[[], bool] | None = None) -> bool:
        """Build the group, retrying until ``timeout_s`` passes (a member may be starting or restarting); False when
        ``give_up()`` turned true between two tries (the member will not come: it has finished).

        Each try rendezvous under a fresh prefix, ``NAME/epoch/E``, so that no try reads the addresses a failed
        one left behind. The lowest member leads: it reads every member's incarnation, opens epoch E for exactly
        those, tries it, and opens another one if that fails. The others join the newest epoch opened for the
        incarnations they see now (never one opened before a member came back). A round trip ends each try:
        building can succeed on one side and fail on the other. Tries are short; the finished group gets the
        full timeout for its operations."""
        deadline = time.monotonic() + timeout_s
        epoch_key = f"{self.name}/epoch"
        leader = self.me == min(self.members)
        last: Exception | None = None
        tried = 0
        while time.monotonic() < deadline:
            if give_up is not None and give_up():
                return False
            incs = ".".join(map(str, self._current(deadline=deadline)))
            if leader:
                epoch = self.store.add(epoch_key, 1)
                self.store.set(f"{epoch_key}/{epoch}", incs)
            else:
                epoch = self.store.add(epoch_key, 0)
                opened_for = f"{epoch_key}/{epoch}"
                if epoch <= tried or not self.store.check([opened_for]) or self.store.get(opened_for).decode() != incs:
                    time.sleep(0.1)  # nothing new opened for the members as they are now: wait for the leader
                    continue
            tried = epoch
            attempt = timedelta(seconds=max(1.0, min(TRY_S, deadline - time.monotonic())))
            log.debug("%s: %s tries epoch %d (incarnations %s)", self.name, "leader" if leader else "follower",
                      epoch, incs)
            try:
                group = _make_group(dist.PrefixStore(f"{self.name}/epoch/{epoch}/", self.store), backend=self.backend,
                                    rank=self.members.index(self.me), size=len(self.members), timeout=attempt)
                check = torch.zeros(1, device=self.device if self.backend == "nccl" else "cpu")
                group.allreduce([check]).wait(attempt)
            except Exception as e:  # noqa: BLE001 - a member not there yet, or gone again
                log.debug("%s: epoch %d failed: %s", self.name, epoch, _short(e))
                last = e
                continue
            set_timeout = getattr(group, "_set_default_timeout", None)
            if set_timeout is not None:  # tries are short, operations are not
                set_timeout(timedelta(seconds=self.timeout_s))
            self.group = group
            self.incarnations = [int(i) for i in incs.split(".")]
            self._name_node()
            return True
        raise PeerError(f"{self.name}: could not connect within {timeout_s:.0f} s ({_short(last)})")

    def _name_node(self) -> None:
        """A link to another node says which one in its messages (``addr/RANK``, each rank's own address)."""

    def wait_for_restart(self, *, timeout_s: float) -> None:
        """After a failure: wait until some other member's incarnation moves past the one this group was built
        with (its supervisor restarted it), then build the group again."""
        deadline = time.monotonic() + timeout_s
        while True:
            incs = self._current(deadline=deadline)
            if any(new > old for new, old in zip(incs, self.incarnations)):
                break
            if time.monotonic() > deadline:
                raise PeerError(f"{self.name}: no member came back within {timeout_s:.0f} s "
                                "(pipeline.peer_timeout_s)")
            time.sleep(0.2)
        self.connect(timeout_s=max(1.0, deadline - time.monotonic()))


class Link(_Rebuildable):
    """One pipeline link, ``sender`` -> ``receiver``: this rank is one end of it."""

    def __init__(self, store: dist.Store, *, sender: int, receiver: int, me: int, peer_label: str, backend: str,
                 timeout_s: float, device: torch.device | str = "cpu"):
        super().__init__(store, members=[sender, receiver], me=me, name=f"link/{sender}-{receiver}",
                         backend=backend, timeout_s=timeout_s, device=device)
        self.peer = receiver if me == sender else sender
        self.base_label = self.peer_label = peer_label  # "stage k (rank r)", for messages
        self.peer_index = self.members.index(self.peer)

    def _name_node(self) -> None:
        try:
            keys = [f"addr/{self.peer}", f"addr/{self.me}"]
            if self.store.check(keys):
                theirs, mine = (self.store.get(k).decode() for k in keys)
                self.peer_label = self.base_label + (f" on {theirs}" if theirs != mine else "")
        except Exception:  # noqa: BLE001 - a name for messages only
            pass


class ReplicaGroup(_Rebuildable):
    """The replicas of one stage: gradient averaging and the stage-0 replicas' agreements."""

    def allreduce(self, tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> None:
        opts = dist.AllreduceOptions()
        opts.reduceOp = op
        self.group.allreduce([tensor], opts).wait(timedelta(seconds=self.timeout_s))

    def broadcast(self, tensor: torch.Tensor, *, root: int) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        self.group.broadcast([tensor], opts).wait(timedelta(seconds=self.timeout_s))

    @property
    def size(self) -> int:
        return len(self.members)


@dataclass
class StageComm:
    topo: Topology
    rank: int
    coord: Coord
    device: torch.device
    store: Any  # the job's store (control board, incarnations, restart points)
    backend: str
    incarnation: int = 0
    recoverable: bool = False  # a dead neighbour is waited for (its supervisor restarts it), not fatal
    prev: list[Route] = field(default_factory=list)  # a link from each previous-stage replica holding our rows
    next: list[Route] = field(default_factory=list)  # a link to each next-stage replica taking some of them
    replicas: ReplicaGroup | None = None  # None with a single replica
    dp_group: Any = None  # registered world subgroups, for DeepSpeed's engine only
    mp_group: Any = None
    client: Any = None  # () -> a store connection of its own

    @property
    def distributed(self) -> bool:
        return self.topo.world_size > 1


def init_comm(env: RankEnv, topo: Topology, *, backend: str, device: torch.device, startup_timeout_s: float,
              peer_timeout_s: float, generation: int = 0, engine_groups: bool = False,
              recoverable: bool = False, batch: int = 1, store: dist.Store | None = None) -> StageComm:
    """Connect this rank's links (and its stage's replica group) through the job's store.

    ``engine_groups``: also join the world and build DeepSpeed's groups (a replica group per stage, a one-rank
    group per rank), which DeepSpeed asks for through its ``mpu``."""
    check_world(env.world_size, topo.stages, topo.counts)
    op = min(peer_timeout_s, STORE_OP_S)
    store = store or job_store(env, timeout_s=startup_timeout_s, generation=generation, op_timeout_s=op)

    def client() -> dist.Store:
        """A connection of its own: a TCPStore client serves one request at a time, and a group's rendezvous
        blocks in the store for as long as it waits for its peer."""
        return job_store(env, timeout_s=startup_timeout_s, generation=generation, client=True, op_timeout_s=op)

    inc = incarnation()
    try:  # this rank's address on the route to the store: messages about a link to another node name the node
        from bimdist.distributed.env import route_address

        store.set(f"addr/{env.rank}", route_address(env.master_addr))
    except OSError:
        pass
    store.set(f"inc/{env.rank}", str(inc))
    comm = StageComm(topo=topo, rank=env.rank, coord=topo.coord(env.rank), device=device, store=store,
                     backend=backend, incarnation=inc, recoverable=recoverable, client=client)
    if engine_groups:
        _world_groups(comm, env, store, backend=backend, startup_timeout_s=startup_timeout_s,
                      peer_timeout_s=peer_timeout_s)
    lo, _ = topo.rows(comm.coord.stage, comm.coord.replica, batch)
    for piece in topo.upstream(env.rank, batch):  # rows relative to this rank's own
        rows = None if topo.uniform else (piece.start - lo, piece.stop - lo)
        comm.prev.append(Route(Link(client(), sender=piece.peer, receiver=env.rank, me=env.rank,
                                    peer_label=peer_name(topo, piece.peer), backend=backend, timeout_s=peer_timeout_s,
                                    device=device), rows))
    for piece in topo.downstream(env.rank, batch):
        rows = None if topo.uniform else (piece.start - lo, piece.stop - lo)
        comm.next.append(Route(Link(client(), sender=env.rank, receiver=piece.peer, me=env.rank,
                                    peer_label=peer_name(topo, piece.peer), backend=backend, timeout_s=peer_timeout_s,
                                    device=device), rows))
    if topo.counts[comm.coord.stage] > 1 and not engine_groups:
        comm.replicas = ReplicaGroup(client(), members=topo.stage_group(comm.coord.stage), me=env.rank,
                                     name=f"replicas/{comm.coord.stage}", backend=backend, timeout_s=peer_timeout_s,
                                     device=device)
        if inc == 0:  # a restarted replica connects while it agrees with the others where to restart (loop)
            comm.replicas.connect(timeout_s=startup_timeout_s)
    return comm


def _world_groups(comm: StageComm, env: RankEnv, store: dist.Store, *, backend: str, startup_timeout_s: float,
                  peer_timeout_s: float) -> None:
    try:
        dist.init_process_group(backend=backend, store=dist.PrefixStore("world/", store), rank=env.rank,
                                world_size=env.world_size, timeout=timedelta(seconds=startup_timeout_s))
    except dist.DistError as e:
        raise PeerError(f"could not join the job at {env.master_addr}:{env.master_port} as rank {env.rank} of "
                        f"{env.world_size} within {startup_timeout_s:.0f} s ({str(e).splitlines()[0][:200]}); "
                        "check MASTER_ADDR/MASTER_PORT and that every rank was started") from None
    peer = timedelta(seconds=peer_timeout_s)
    topo = comm.topo
    for s in range(topo.stages):
        g = dist.new_group(topo.stage_group(s), timeout=peer, backend=backend)
        if env.rank in topo.stage_group(s):
            comm.dp_group = g
    for r in range(topo.world_size):
        g = dist.new_group([r], timeout=peer, backend=backend)
        if r == env.rank:
            comm.mp_group = g


def job_store(env: RankEnv, *, timeout_s: float, generation: int, client: bool = False,
              op_timeout_s: float | None = None) -> dist.Store:
    """The job's TCPStore, namespaced by whole-job restart generation.

    torchrun keeps one store across restarts: without the prefix, a restarted rank can read the dead
    generation's addresses and wait on a peer that no longer exists. Under torchrun every rank is a client of the
    agent's store; with ``BIMDIST_STORE_EXTERNAL=1`` (bimdist's launcher, the per-task Slurm script) every rank is
    a client of the supervisor's; otherwise rank 0 hosts it at MASTER_ADDR:MASTER_PORT. ``client``: one more
    connection to the store (never the host). ``timeout_s`` bounds reaching the store at start-up;
    ``op_timeout_s`` then bounds each operation, so that a store out of reach (its node cut off) is an error within
    that time, not a rank hung for the start-up timeout.
    """
    external = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or os.environ.get(
        "BIMDIST_STORE_EXTERNAL") == "1"
    try:
        store = dist.TCPStore(env.master_addr, env.master_port, world_size=None if external else env.world_size,
                              is_master=env.rank == 0 and not external and not client,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    except (dist.DistError, RuntimeError) as e:
        raise PeerError(f"could not reach the job's store at {env.master_addr}:{env.master_port} within "
                        f"{timeout_s:.0f} s ({str(e).splitlines()[0][:200]}); check MASTER_ADDR/MASTER_PORT") from None
    if op_timeout_s is not None:
        store.set_timeout(timedelta(seconds=op_timeout_s))
    return dist.PrefixStore(f"bimdist/gen{generation}/", store)


def agree_min(store: dist.Store, *, key: str, value: int, rank: int, world: int, timeout_s: float) -> int:
    """The minimum of every rank's ``value`` through the store (a start-up agreement, not a collective)."""
    store.set(f"{key}/{rank}", str(value))
    keys = [f"{key}/{r}" for r in range(world)]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception:  # noqa: BLE001
        missing = [k for k in keys if not store.check([k])]
        raise PeerError(f"ranks {[int(k.rsplit('/', 1)[1]) for k in missing]} did not report {key} within "
                        f"{timeout_s:.0f} s") from None
    return min(int(store.get(k)) for k in keys)


def _short(e: BaseException | None) -> str:
    if e is None:
        return "no attempt finished"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
