"""The units one stage owns and one training step over them.

Units run in order; each one's encoder output is detached before the next unit sees it, and each unit's
backward and optimizer step finish before the next unit starts, so at most one unit's graph is alive.
The last unit hands its encoder output to ``emit`` *before* its decoder and backward run: in a pipeline,
that is the send that lets the next stage start while this one is still busy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bimdist.config import Config
from bimdist.model.unit import BlockUnit, build_unit
from bimdist.train.engine import Engine, StepStats, TorchEngine


@dataclass
class StepResult:
    losses: list[torch.Tensor]  # one 0-d tensor per unit, in unit order, still on the device
    stats: list[StepStats]

    @property
    def lr(self) -> float:
        return self.stats[0].lr

    def device_values(self) -> list[torch.Tensor]:
        """Losses, then each unit's skipped flag: what the loop reads, for a whole log window at once."""
        return [*self.losses, *(s.skipped for s in self.stats)]


EngineFactory = Callable[[BlockUnit], Engine]


class StageWorker:
    def __init__(self, cfg: Config, indices: list[int], *, device: torch.device,
                 engine_factory: EngineFactory | None = None):
        self.cfg = cfg
        self.indices = indices
        self.device = device
        self.units = [build_unit(cfg, i).to(device) for i in indices]
        make = engine_factory or (lambda unit: TorchEngine(unit, cfg))
        self.engines = [make(u) for u in self.units]
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if cfg.run.precision == "bf16" else contextlib.nullcontext()
        )

    def train_step(
        self,
        *,
        step: int,
        images: torch.Tensor,  # uint8 [n, C, H, W]
        ids_shuffle: torch.Tensor,  # int64 [n, L]
        tokens: torch.Tensor | None,  # [n, 1+v, D] from the previous stage, or None at stage 0
        emit: Callable[[torch.Tensor], None] | None = None,
        phase: Callable[[str], None] = lambda name: None,
        log: bool = False,
    ) -> StepResult:
        """``phase`` is told when the step moves between compute / send-wait / decoder (the timeline); ``log``
        marks a step whose gradient norms are wanted. Nothing here waits on the device."""
        losses, stats = [], []
        last = len(self.units) - 1

        def encoded(out: torch.Tensor, *, handoff: bool) -> None:
            if handoff and emit is not None:
                phase("send-wait")
                emit(out)
            phase("decoder")

        for i, engine in enumerate(self.engines):
            phase("compute")
            with self.autocast:
                out = engine.module(images, ids_shuffle, tokens,
                                    on_encoded=lambda t, handoff=(i == last): encoded(t, handoff=handoff))
            stats.append(engine.backward_step(out.loss, step, log=log))
            losses.append(out.loss.detach())
            tokens = out.tokens.float()
            del out  # frees this unit's graph before the next unit runs
        return StepResult(losses=losses, stats=stats)

    def save_engines(self, step: int) -> None:
        for engine in self.engines:
            engine.save(step)

    def state_dicts(self) -> list[dict]:
        return [{"model": u.state_dict(), "engine": e.state_dict()} for u, e in zip(self.units, self.engines)]

    def load_state_dicts(self, states: list[dict]) -> None:
        for unit, engine, state in zip(self.units, self.engines, states):
            unit.load_state_dict(state["model"])
            engine.load_state_dict(state["engine"])
