"""Pure rank <-> (stage, replica) math and the rows each rank owns. No processes, no torch.distributed.

Each stage has its own replica count (``pipeline.replicas``: one int for every stage, or a list, one per stage);
the world size is their sum. Ranks are laid out replica-major as far as the counts go: replica 0 of every stage,
then replica 1 of every stage that has one, and so on. With equal counts that is ``rank = replica * stages +
stage``: one replica's whole pipeline sits on consecutive ranks, so with ``stages <= GPUs per node`` the
activation stream stays inside a node and only the per-stage gradient all-reduce crosses nodes.

Each step's global batch is split over a stage's replicas in contiguous rows: replica ``r`` of ``R`` owns rows
``[r * B / R, (r + 1) * B / R)``. Between stages with different counts each replica sends every replica of the next
stage the rows both own (``downstream``), and receives its own rows in pieces from the previous stage
(``upstream``); with equal counts that is one peer, all rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class TopologyError(ValueError):
    pass


@dataclass(frozen=True)
class Coord:
    stage: int
    replica: int


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of the global batch that ``peer`` sends to, or receives from, this rank."""

    peer: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Topology:
    stages: int
    replicas: int | tuple[int, ...] | list[int] = 1
    counts: tuple[int, ...] = field(init=False)
    _ranks: dict[tuple[int, int], int] = field(init=False, repr=False, compare=False)
    _coords: tuple[Coord, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        counts = tuple(self.replicas) if isinstance(self.replicas, (list, tuple)) else (self.replicas,) * self.stages
        if self.stages < 1 or len(counts) != self.stages or any(c < 1 for c in counts):
            raise TopologyError(f"pipeline.replicas {list(counts)} must give {self.stages} counts of at least 1 "
                                f"(one per stage), or one count for every stage")
        coords, ranks = [], {}
        for replica in range(max(counts)):
            for stage in range(self.stages):
                if replica < counts[stage]:
                    ranks[(stage, replica)] = len(coords)
                    coords.append(Coord(stage, replica))
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "_ranks", ranks)
        object.__setattr__(self, "_coords", tuple(coords))

    @property
    def world_size(self) -> int:
        return sum(self.counts)

    @property
    def uniform(self) -> bool:
        return len(set(self.counts)) == 1

    def replicas_of(self, stage: int) -> int:
        return self.counts[stage]

    def coord(self, rank: int) -> Coord:
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank {rank} is outside a world of {self.world_size}")
        return self._coords[rank]

    def rank(self, stage: int, replica: int) -> int:
        if (stage, replica) not in self._ranks:
            raise TopologyError(f"(stage {stage}, replica {replica}) is outside replicas {list(self.counts)}")
        return self._ranks[(stage, replica)]

    def stage_group(self, stage: int) -> list[int]:
        """Ranks holding the replicas of one stage: they average gradients together."""
        return [self.rank(stage, r) for r in range(self.counts[stage])]

    def rows(self, stage: int, replica: int, batch: int) -> tuple[int, int]:
        """The global batch's rows this replica of this stage owns."""
        per = batch // self.counts[stage]
        return replica * per, (replica + 1) * per

    def downstream(self, rank: int, batch: int) -> list[Piece]:
        """Where this rank's rows go: each replica of the next stage whose rows overlap them, in row order."""
        c = self.coord(rank)
        return [] if c.stage == self.stages - 1 else self._overlaps(c, c.stage + 1, batch)

    def upstream(self, rank: int, batch: int) -> list[Piece]:
        """Where this rank's rows come from: each replica of the previous stage that holds some, in row order."""
        c = self.coord(rank)
        return [] if c.stage == 0 else self._overlaps(c, c.stage - 1, batch)

    def _overlaps(self, c: Coord, other: int, batch: int) -> list[Piece]:
        lo, hi = self.rows(c.stage, c.replica, batch)
        out = []
        for r in range(self.counts[other]):
            a, b = self.rows(other, r, batch)
            if max(a, lo) < min(b, hi):
                out.append(Piece(self.rank(other, r), max(a, lo), min(b, hi)))
        return out

    def links(self, batch: int) -> list[tuple[int, int]]:
        """(sender, receiver) rank pairs of the activation stream, in a fixed order every rank agrees on."""
        return [(rank, p.peer) for rank in range(self.world_size) for p in self.downstream(rank, batch)]

    def layout(self, batch: int) -> str:
        """One line a person can check: every rank's stage, replica and rows."""
        parts = []
        for rank in range(self.world_size):
            c = self.coord(rank)
            lo, hi = self.rows(c.stage, c.replica, batch)
            parts.append(f"{rank}=s{c.stage}r{c.replica}[{lo}:{hi}]")
        return " ".join(parts)


def parse_counts(replicas: int | list[int], stages: int) -> tuple[int, ...]:
    """``pipeline.replicas`` as one count per stage."""
    return tuple(replicas) if isinstance(replicas, list) else (replicas,) * stages


def blocks_of_stage(blocks: int, stages: int, stage: int) -> list[int]:
    """The contiguous block indices a stage owns (blocks split evenly)."""
    if blocks % stages:
        raise TopologyError(f"{blocks} blocks do not split evenly over {stages} stages")
    per = blocks // stages
    return list(range(stage * per, (stage + 1) * per))


def check_world(world_size: int, stages: int, replicas: int | list[int] | tuple[int, ...]) -> None:
    counts = tuple(replicas) if isinstance(replicas, (list, tuple)) else (replicas,) * stages
    need = sum(counts)
    if world_size != need:
        how = (f"pipeline.stages x pipeline.replicas = {stages} x {counts[0]} = {need}" if len(set(counts)) == 1
               else f"the sum of pipeline.replicas {list(counts)} = {need}")
        raise TopologyError(
            f"the launcher started {world_size} processes but {how}; start {need} processes "
            f"(e.g. torchrun --nproc_per_node={need}) or change pipeline.stages/replicas"
        )
