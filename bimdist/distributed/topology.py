"""Pure rank <-> (stage, replica) math. No processes, no torch.distributed.

Ranks are laid out replica-major: ``rank = replica * stages + stage``. One replica's whole pipeline sits on
consecutive ranks, so with ``stages <= GPUs per node`` the activation stream stays inside a node and only
the per-stage gradient all-reduce crosses nodes.
"""

from __future__ import annotations

from dataclasses import dataclass


class TopologyError(ValueError):
    pass


@dataclass(frozen=True)
class Coord:
    stage: int
    replica: int


@dataclass(frozen=True)
class Topology:
    stages: int
    replicas: int

    def __post_init__(self) -> None:
        if self.stages < 1 or self.replicas < 1:
            raise TopologyError(f"stages ({self.stages}) and replicas ({self.replicas}) must be at least 1")

    @property
    def world_size(self) -> int:
        return self.stages * self.replicas

    def coord(self, rank: int) -> Coord:
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank {rank} is outside a world of {self.world_size}")
        return Coord(stage=rank % self.stages, replica=rank // self.stages)

    def rank(self, stage: int, replica: int) -> int:
        if not (0 <= stage < self.stages and 0 <= replica < self.replicas):
            raise TopologyError(f"(stage {stage}, replica {replica}) is outside {self.stages}x{self.replicas}")
        return replica * self.stages + stage

    def stage_group(self, stage: int) -> list[int]:
        """Ranks holding the replicas of one stage: they average gradients together."""
        return [self.rank(stage, r) for r in range(self.replicas)]

    def links(self) -> list[tuple[int, int]]:
        """(sender, receiver) rank pairs of the activation stream, in a fixed order every rank agrees on."""
        return [(self.rank(s, r), self.rank(s + 1, r)) for r in range(self.replicas) for s in range(self.stages - 1)]

    def prev_rank(self, rank: int) -> int | None:
        c = self.coord(rank)
        return None if c.stage == 0 else self.rank(c.stage - 1, c.replica)

    def next_rank(self, rank: int) -> int | None:
        c = self.coord(rank)
        return None if c.stage == self.stages - 1 else self.rank(c.stage + 1, c.replica)


def blocks_of_stage(blocks: int, stages: int, stage: int) -> list[int]:
    """The contiguous block indices a stage owns (blocks split evenly)."""
    if blocks % stages:
        raise TopologyError(f"{blocks} blocks do not split evenly over {stages} stages")
    per = blocks // stages
    return list(range(stage * per, (stage + 1) * per))


def check_world(world_size: int, stages: int, replicas: int) -> None:
    if world_size != stages * replicas:
        raise TopologyError(
            f"the launcher started {world_size} processes but pipeline.stages x pipeline.replicas = "
            f"{stages} x {replicas} = {stages * replicas}; start {stages * replicas} processes "
            f"(e.g. torchrun --nproc_per_node={stages * replicas}) or change pipeline.stages/replicas"
        )
