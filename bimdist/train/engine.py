"""The swappable optimisation part of a unit: optimizer, LR schedule and data-parallel gradient averaging.

``TorchEngine`` is AdamW + warmup/cosine (timm helpers), with gradients averaged over the stage's replicas. A
DeepSpeed engine implements the same four methods, so the stage loop does not care which one it drives.

The step never waits on the device: the gradient norm is computed only when clipping needs it or the step is
logged, a step with non-finite gradients is skipped on the device (the fused AdamW's ``found_inf``, as
torch.amp.GradScaler does it), and what the step reports stays on the device until the loop reads a whole log
window at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from bimdist.config import Config
from bimdist.distributed.transport import PeerError, ReplicaLost


@dataclass
class StepStats:
    lr: float
    grad_norm: torch.Tensor | None  # 0-d, on the device; None when neither clipping nor logging needed it
    skipped: torch.Tensor  # 0-d float on the device: 1 when non-finite gradients dropped the update
    allreduce_s: float = 0.0  # host time in the replicas' gradient all-reduce (waiting for the slowest replica)


class Engine(Protocol):
    module: nn.Module  # what the stage loop calls forward on (may be a DDP / DeepSpeed wrapper)

    def backward_step(self, loss: torch.Tensor, step: int, *, log: bool = False) -> StepStats: ...

    def save(self, step: int) -> None:
        """Called on every replica before replica 0 writes the block files (engines with sharded state)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> CosineLRScheduler:
    """Linear warmup for ``warmup_steps`` then cosine to ``min_lr`` at ``run.steps``, updated per iteration."""
    warmup = min(cfg.optim.warmup_steps, cfg.run.steps - 1)
    return CosineLRScheduler(
        optimizer, t_initial=max(1, cfg.run.steps - warmup), lr_min=cfg.optim.min_lr, warmup_t=warmup,
        warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False,
    )


BUCKET_BYTES = 25 << 20  # gradients averaged per allreduce, as DDP's default bucket


def average_gradients(grads: list[torch.Tensor], replicas: Any) -> None:
    """Average ``grads`` over the stage's replicas in place, a flat bucket per allreduce.

    After the backward, not overlapped with it as DDP's hooks are: a failed allreduce then leaves every gradient
    as this replica computed it, which is what lets a replica group be rebuilt and the step redone. (DDP also
    needs a process group registered with the world, which a group rebuilt per generation is not.)"""
    buckets: list[list[torch.Tensor]] = [[]]
    size = 0
    for g in grads:
        if size >= BUCKET_BYTES:
            buckets.append([])
            size = 0
        buckets[-1].append(g)
        size += g.nbytes
    averaged = []
    for bucket in buckets:  # every bucket first, then write back: a failure leaves the gradients untouched
        flat = torch._utils._flatten_dense_tensors(bucket)
        replicas.allreduce(flat)
        averaged.append(flat.div_(replicas.size))
    for bucket, flat in zip(buckets, averaged):
        for dst, src in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
            dst.copy_(src)


class TorchEngine:
    def __init__(self, unit: nn.Module, cfg: Config, *, replicas: Any = None):
        """``replicas``: the stage's replica group (None: one replica), whose members average gradients."""
        self.unit = unit
        self.module: nn.Module = unit
        self.replicas = replicas
        self.recoverable = False  # a lost replica restarts its whole stage (its supervisor restarts single ranks)
        groups = param_groups_weight_decay(unit, cfg.optim.weight_decay)
        # fused: one kernel per step, and it can skip a non-finite step on the device (found_inf)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.optim.betas, fused=True)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.clip = cfg.optim.clip_grad
        self.params = [p for p in unit.parameters() if p.requires_grad]

    def backward_step(self, loss: torch.Tensor, step: int, *, log: bool = False) -> StepStats:
        """Backward and AdamW step with no host sync: ``log`` asks for the gradient norm even without clipping."""
        self.scheduler.step_update(step + 1)  # step + 1: the first step already trains
        loss.backward()  # gradients start from None: every call ends by freeing them
        grads = [p.grad for p in self.params if p.grad is not None]
        t0 = time.perf_counter()
        if self.replicas is not None:
            try:
                average_gradients(grads, self.replicas)
            except Exception as e:  # noqa: BLE001 - a replica died: the stage restarts together, or the job ends
                if self.recoverable:
                    raise ReplicaLost(f"averaging step {step}'s gradients over the replicas of this stage failed "
                                      f"({str(e).splitlines()[0][:200]})") from None
                raise PeerError(f"averaging gradients over the replicas of this stage failed: {e}") from None
        allreduce_s = time.perf_counter() - t0
        norm = None
        if self.clip is not None:  # foreach clipping scales by min(1, clip / norm) on the device
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        elif log:
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        # identical on every replica: the gradients are already averaged
        if norm is not None:
            finite = norm.isfinite()
        else:  # one norm per gradient tensor, all on the device
            finite = torch.stack(torch._foreach_norm(grads)).isfinite().all() if grads else torch.tensor(True)
        self.optimizer.found_inf = (~finite).float()  # read by the fused step: skip, and do not count the step
        self.optimizer.step()
        # Free the gradients now, not at the next backward: otherwise they sit through the next forward, on top of
        # its activations. Block-wise, only the unit being stepped then holds gradients at all.
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(lr=self.optimizer.param_groups[0]["lr"], grad_norm=norm, skipped=self.optimizer.found_inf,
                         allreduce_s=allreduce_s)

    def save(self, step: int) -> None:
        pass  # replicas hold identical optimizer states: replica 0's block file carries it

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
