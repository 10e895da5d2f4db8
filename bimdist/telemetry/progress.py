"""Log setup and the per-stage progress line (plus a tqdm bar when stdout is a terminal)."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

from tqdm import tqdm

log = logging.getLogger("bimdist")


def setup_logging(tag: str = "") -> None:
    """One line per record, ``key=value`` fields, a rank tag so interleaved stage logs stay greppable."""
    level = os.environ.get("BIMDIST_LOG_LEVEL", "INFO").upper()
    fmt = "%(asctime)s %(levelname)s " + (f"[{tag}] " if tag else "") + "%(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger("bimdist")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


@dataclass
class StepRecord:
    """What one stage did in one step; the progress line, metrics and traces all read this."""

    stage: int
    replica: int
    step: int  # 0-based index of the step just finished
    blocks: list[int]
    losses: list[float]
    samples: int  # samples this replica processed in the step
    step_s: float  # wall time since the previous step ended
    compute_s: float  # forward + backward + optimizer
    recv_wait_s: float  # blocked waiting for the previous stage (or the data)
    send_wait_s: float  # blocked on backpressure from the next stage
    lr: float
    skipped: int  # units whose update was dropped for non-finite gradients
    data_wait_s: float = 0.0  # part of recv_wait_s: stage 0 waiting for its next batch (its data path is slow)
    allreduce_s: float = 0.0  # part of compute_s: the replicas' gradient all-reduce (waiting for the slowest one)
    bytes_sent: int = 0  # cumulative, from the transport
    bytes_received: int = 0  # cumulative
    in_flight: int = 0  # messages queued or being sent downstream
    corrupt: int = 0  # cumulative skipped training samples (stage 0)
    replayed: int = 0  # cumulative messages sent again to a restarted next stage
    replay_log_bytes: int = 0  # what this stage keeps for a restart of the next one (memory and disk)
    next_restartable: bool | None = None  # whether that log still holds what a restart of the next stage needs
    grad_norm: float | None = None  # largest gradient norm over the stage's units, on log steps (or with clipping)
    flop: float = 0.0  # floating-point operations of one step of this stage (counted once, on the first step)
    peak_flop_per_s: float | None = None  # the device's peak, when known (for MFU)
    monitor_knn: dict[int, float] = field(default_factory=dict)  # block -> live kNN top-1, on monitor steps
    cpu_s: float = 0.0  # this process's CPU time (every thread) when the step ended, cumulative


class Progress:
    """Every ``every`` steps, one log line averaged over the window since the last one."""

    def __init__(self, *, steps: int, every: int, stage: int, replica: int, enabled: bool, start: int = 0):
        self.steps, self.every, self.enabled = steps, every, enabled
        self.stage, self.replica = stage, replica
        self._window: list[StepRecord] = []
        self._bar = tqdm(total=steps, initial=start, desc=f"stage {stage}", unit="step", dynamic_ncols=True,
                         position=stage) if enabled and sys.stdout.isatty() else None

    def update(self, rec: StepRecord) -> None:
        self._window.append(rec)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{rec.losses[-1]:.4f}")
        if not self.enabled or ((rec.step + 1) % self.every and rec.step + 1 != self.steps):
            return
        w, self._window = self._window, []
        elapsed = sum(r.step_s for r in w) or 1e-9
        losses = " ".join(f"loss_b{b}={sum(r.losses[i] for r in w) / len(w):.4f}" for i, b in enumerate(rec.blocks))
        compute = sum(r.compute_s for r in w) / len(w)
        flops = rec.flop / compute if compute > 0 else 0.0
        mfu = f" mfu={flops / rec.peak_flop_per_s:.3f}" if rec.peak_flop_per_s else ""
        log.info(
            "progress stage=%d replica=%d step=%d/%d %s samples_per_s=%.1f recv_wait_s=%.3f data_wait_s=%.3f "
            "send_wait_s=%.3f compute_s=%.3f gflop_per_s=%.1f%s lr=%.3e grad_norm=%s skipped=%d",
            self.stage, self.replica, rec.step + 1, self.steps, losses, sum(r.samples for r in w) / elapsed,
            sum(r.recv_wait_s for r in w) / len(w), sum(r.data_wait_s for r in w) / len(w),
            sum(r.send_wait_s for r in w) / len(w),
            compute, flops / 1e9, mfu, rec.lr, "n/a" if rec.grad_norm is None else f"{rec.grad_norm:.3g}",
            sum(r.skipped for r in w),
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
