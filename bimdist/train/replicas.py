"""Losing one replica of a stage (R > 1) without stopping the job.

The replicas still alive finish the step among themselves, then wait at the next step boundary for the lost one
to come back, hand it their weights and optimizer state, and go on together. The restarted replica catches up
alone from its own newest checkpoint (so that its neighbours in its own pipeline get every message they need),
then joins at that boundary. This is recovery, not exactness: the step the replica was lost in is averaged over
the survivors only, and the catch-up steps use the restarted replica's own gradients.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from bimdist.distributed.groups import ReplicaGroup, StageComm
from bimdist.distributed.transport import PeerError

log = logging.getLogger("bimdist.replicas")


class ReplicaRecovery:
    def __init__(self, comm: StageComm, worker: Any, *, timeout_s: float, client: Any):
        """``client``: a store connection of its own, for the survivors' agreement."""
        self.comm, self.worker, self.timeout_s, self.client = comm, worker, timeout_s, client
        self.stage = comm.coord.stage
        self.full: ReplicaGroup = comm.replicas  # type: ignore[assignment]
        self.current: ReplicaGroup = self.full
        self.rejoin_at: int | None = None  # survivors: the step boundary where the lost replica comes back
        self.join_at: int | None = None  # the restarted replica: the step it joins at

    # ---- the survivors ------------------------------------------------------------------------------------
    def survive(self, step: int) -> ReplicaGroup:
        """The full group failed during ``step``: build a group of the replicas still alive for the rest of it."""
        if self.current is not self.full:
            raise PeerError(f"stage {self.stage}: a second replica was lost during step {step}; giving up")
        key = f"alive/{self.stage}/{step}"
        self.client.set(f"{key}/{self.comm.rank}", "1")
        members = self.full.members
        # Every survivor says it is alive; the lost one cannot. A survivor held up elsewhere (its own pipeline
        # waiting for a neighbour) meets the same failure when it reaches this step's allreduce.
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            alive = [m for m in members if self.client.check([f"{key}/{m}"])]
            if len(alive) == len(members) - 1:
                break
            time.sleep(0.1)
        alive = [m for m in members if self.client.check([f"{key}/{m}"])]
        lost = sorted(set(members) - set(alive))
        log.warning("stage %d lost replica rank(s) %s during step %d: finishing it with ranks %s, then waiting for "
                    "the lost one at step %d", self.stage, lost, step, alive, step + 1)
        self.client.set(f"rejoin/{self.stage}", str(step + 1))
        self.client.set(f"root/{self.stage}/{step + 1}", str(min(alive)))
        group = ReplicaGroup(self.client, members=alive, me=self.comm.rank, name=f"replicas/{self.stage}/alive/{step}",
                             backend=self.full.backend, timeout_s=self.timeout_s, device=self.full.device)
        group.connect(timeout_s=self.timeout_s)
        self.current, self.rejoin_at = group, step + 1
        self._use(group)
        return group

    def after_step(self, step: int) -> None:
        """At the boundary after the lost step: wait for the restarted replica and hand it the state."""
        if self.rejoin_at != step:
            return
        log.warning("stage %d waits at step %d for its lost replica (up to %.0f s)", self.stage, step,
                    self.timeout_s)
        self.full.wait_for_restart(timeout_s=self.timeout_s)
        root = int(self.client.get(f"root/{self.stage}/{step}"))
        self._broadcast_state(root)
        self.current, self.rejoin_at = self.full, None
        self._use(self.full)
        log.warning("stage %d: the lost replica rejoined at step %d", self.stage, step)

    # ---- the restarted replica ----------------------------------------------------------------------------
    def join_step(self) -> int:
        """Where the survivors wait for this restarted replica (they publish it when they lose it)."""
        key = f"rejoin/{self.stage}"
        deadline = time.monotonic() + self.timeout_s
        while not self.client.check([key]):
            if time.monotonic() > deadline:
                raise PeerError(f"stage {self.stage}: the other replicas never said where to rejoin")
            time.sleep(0.1)
        self.join_at = int(self.client.get(key))
        self._use(None)  # catching up alone
        return self.join_at

    def before_step(self, step: int) -> None:
        if self.join_at != step:
            return
        self.full.connect(timeout_s=self.timeout_s)
        self._broadcast_state(int(self.client.get(f"root/{self.stage}/{step}")))
        self.current, self.join_at = self.full, None
        self._use(self.full)
        log.warning("stage %d replica %d rejoined its replicas at step %d", self.stage, self.comm.coord.replica,
                    step)

    # ---- both ---------------------------------------------------------------------------------------------
    def _use(self, group: ReplicaGroup | None) -> None:
        for engine in self.worker.engines:
            engine.replicas = group

    @torch.no_grad()
    def _broadcast_state(self, root: int) -> None:
        """Every unit's parameters, buffers and AdamW state, from the survivor ``root`` to every member."""
        index = self.full.members.index(root)
        for unit, engine in zip(self.worker.units, self.worker.engines):
            for t in [*unit.parameters(), *unit.buffers()]:
                self.full.broadcast(t.data, root=index)
            opt = engine.optimizer
            for group in opt.param_groups:
                for p in group["params"]:
                    state = opt.state[p]
                    if not state:  # a replica that never stepped: AdamW's state, as the fused step makes it
                        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    for name in ("step", "exp_avg", "exp_avg_sq"):
                        self.full.broadcast(state[name], root=index)
