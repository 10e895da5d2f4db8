"""One stage's training loop: input (data or the previous stage) -> units -> output (the next stage).

The single-process trainer is this loop with one stage holding every block and no transport; a pipeline
runs one loop per rank. Stage 0 decides when the stream ends (step limit, end of data, ``run.stop_at`` or a
signal) and sends an END message that every later stage processes after its last step, so all stages
checkpoint at the same step. A stage never waits on anything downstream except send backpressure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from bimdist.config import Config, ConfigError, visible_counts
from bimdist.data.batches import Batch, train_batches
from bimdist.data.stream import DataError, DataStats, Position
from bimdist.distributed.control import ControlBoard, bounded
from bimdist.distributed.env import host_staging
from bimdist.distributed.groups import StageComm, agree_min, peer_name
from bimdist.distributed.replay import ReplayLog
from bimdist.distributed.topology import blocks_of_stage
from bimdist.distributed.transport import DATA, END, Message, PeerError, ReplicaLost, Transport
from bimdist.model.unit import unit_indices
from bimdist.telemetry.progress import Progress, StepRecord
from bimdist.telemetry.trace import Timeline
from bimdist.train.checkpoint import CheckpointStore
from bimdist.train.engine import TorchEngine
from bimdist.train.monitor import load_monitor_set, run_blocks
from bimdist.train.signals import (
    END_DATA,
    END_DONE,
    END_NAMES,
    END_PREEMPT,
    END_STOP_AT,
    EXIT_OK,
    EXIT_PREEMPTED,
    StopFlag,
)
from bimdist.train.worker import StageWorker, StepResult

log = logging.getLogger("bimdist.train")

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STORE_CALL_S = 30.0  # a store call that waits for the store's answer longer than this: the store is out of reach


def restart_point(own_steps: list[int], need: int | None) -> int:
    """Where a stage restarted alone resumes: its newest own checkpoint at or before ``need`` (the next stage's
    next step; None for the last stage), else the run's start. ``own_steps``: newest first."""
    return next((s for s in own_steps if need is None or s <= need), 0)


@dataclass
class StageResult:
    exit_code: int
    steps_done: int
    reason: str
    last_losses: list[float] = field(default_factory=list)


class Observer:
    """Telemetry hooks; every method is optional and must never raise into training."""

    def on_start(self, start_step: int) -> None: ...

    def on_step(self, rec: StepRecord) -> None: ...

    def on_end(self, result: StageResult) -> None: ...


# Dense bf16 peak TFLOP/s by CUDA device name (substring match); metrics.peak_tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def peak_flop_per_s(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((t * 1e12 for key, t in PEAK_TFLOPS.items() if key in name), None)


class Prefetcher:
    """Build batches on a background thread so decoding overlaps compute; the order is unchanged.

    ``close`` stops and joins the thread: a thread left inside a torch op at interpreter exit aborts the process.
    """

    def __init__(self, it: Iterator[Batch], depth: int = 2, timeout_s: float = 600.0):
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = object()
        self._timeout = timeout_s
        self._thread = threading.Thread(target=self._work, args=(it,), name="bimdist-data", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, it: Iterator[Batch]) -> None:
        try:
            for b in it:
                if not self._put(b):
                    return
            self._put(self._done)
        except BaseException as e:  # noqa: BLE001 - re-raised on the consumer side
            self._put(e)
        finally:
            close = getattr(it, "close", None)  # a generator's cleanup (data workers) runs on its own thread
            if close is not None:
                close()

    def __iter__(self) -> Iterator[Batch]:
        while True:
            try:
                item = self._q.get(timeout=self._timeout)
            except queue.Empty:
                raise DataError(f"no batch produced within {self._timeout:.0f} s (data loading stalled)") from None
            if item is self._done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout_s)


class StageLoop:
    def __init__(self, cfg: Config, run_dir: Path, *, comm: StageComm | None, device: torch.device,
                 stop: StopFlag, board: ControlBoard | None = None, fresh: bool = False,
                 observers: list[Observer] | None = None, engine_factory: Callable[..., Any] | None = None,
                 timeline: Timeline | None = None, data_workers: int = 0):
        self.cfg, self.run_dir, self.comm, self.device, self.stop = cfg, run_dir, comm, device, stop
        self.data_workers = data_workers
        self.board = board
        self._stop_posted = False
        self.observers = observers or []
        p = cfg.pipeline
        self.stage = comm.coord.stage if comm else 0
        self.replica = comm.coord.replica if comm else 0
        self.stages = p.stages if comm else 1
        self.first, self.last = self.stage == 0, self.stage == self.stages - 1
        all_units = unit_indices(cfg)
        self.blocks = blocks_of_stage(len(all_units), self.stages, self.stage) if cfg.method == "bim" else all_units
        make = engine_factory or self._engine_factory()
        self.worker = StageWorker(cfg, self.blocks, device=device, engine_factory=make)
        self.store = CheckpointStore(run_dir / "checkpoints", fingerprint=cfg.fingerprint(), blocks=all_units,
                                     replicas=cfg.replica_counts[0], keep=cfg.checkpoint.keep)
        self.data_stats = DataStats(log_every=cfg.data.log_corrupt_every)
        self.transport: Transport | None = None
        if comm and (comm.prev or comm.next):
            tag = f"stage{self.stage}_r{self.replica}"

            def replay(peer: int) -> ReplayLog:  # one per next-stage peer; each has its own restart point
                to = "" if len(comm.next) == 1 else f".to{peer}"
                name = f"{tag}{to}.i{comm.incarnation}.log"
                return ReplayLog(memory_bytes=(p.replay_memory_mb << 20) // max(1, len(comm.next)), keep=p.replay,
                                 disk_bytes=(p.replay_disk_mb << 20) // max(1, len(comm.next)),
                                 spill_path=run_dir / "replay" / name)

            hint = (f"raise pipeline.replay_disk_mb (now {p.replay_disk_mb}) or checkpoint more often (checkpoint.every"
                    f"={cfg.checkpoint.every}); a whole-job restart resumes from the newest common checkpoint")
            self.transport = Transport(device=device, prev=comm.prev, next=comm.next, max_in_flight=p.max_in_flight,
                                       prefetch=p.prefetch, peer_timeout_s=p.peer_timeout_s,
                                       startup_timeout_s=p.startup_timeout_s,
                                       host_staging=host_staging(p.host_staging, device, comm.backend),
                                       recoverable=comm.recoverable, replay=replay, store=comm.store, rank=comm.rank,
                                       label=peer_name(comm.topo, comm.rank), on_fatal=self._abort, replay_hint=hint)
        if comm is not None and comm.replicas is not None and comm.recoverable:
            for engine in self.worker.engines:  # a lost replica restarts the whole stage from a common checkpoint
                engine.recoverable = True
        self._own_steps: list[int] = []  # this stage's checkpoints on disk, newest first
        self._restart_point = -1  # published: where this stage would resume if restarted alone
        self._own_point = -1  # this replica's own choice, which its siblings read
        self._store_lost = False  # a store call failed: stop asking (see _store_failed)
        drops = cfg.masking.extra_drop or [0.0] * cfg.model.blocks
        counts = visible_counts(cfg.model.num_patches, cfg.masking.mask_ratio, drops)
        self.next_visible = counts[self.blocks[-1] + 1] if not self.last else 0
        self.wire_dtype = WIRE_DTYPES.get(p.wire_dtype, torch.float32)
        self.ids_dtype = torch.int16 if cfg.model.num_patches < 2**15 else torch.int32
        self.fresh = fresh
        self.saved_step = -1
        self.final_step = -1
        self.step_flop: float | None = None
        self.peak_flop_per_s = peak_flop_per_s(device, cfg.metrics.peak_tflops)
        self.timeline = timeline or Timeline(None, stage=self.stage, replica=self.replica)
        self._window: list[tuple[StepRecord, StepResult]] = []  # steps run but not yet read from the device
        # the live accuracy monitor: replica 0's pipeline only; stage 0 reads the set, the others receive it
        self.monitor_every = cfg.eval.monitor_every if self.replica == 0 else 0
        self.monitor_set = load_monitor_set(cfg) if self.monitor_every and self.first else None
        self.skipped_steps = 0  # steps a restarted neighbour could not feed (pipeline.replay: off)

    def _engine_factory(self) -> Callable[[Any], Any]:
        cfg, comm = self.cfg, self.comm
        if cfg.pipeline.engine == "torch":
            replicas = comm.replicas if comm else None
            return lambda unit: TorchEngine(unit, cfg, replicas=replicas)
        from bimdist.train.ds_engine import DeepSpeedEngine, build_ds_config

        if comm is None or comm.mp_group is None:
            raise ConfigError("pipeline.engine=deepspeed needs torch.distributed: launch with torchrun, deepspeed "
                              "or bimdist's own spawner (pipeline.stages x replicas > 1)")
        ds_config = build_ds_config(cfg)
        return lambda unit: DeepSpeedEngine(unit, cfg, index=unit.index, ds_config=ds_config,
                                            dp_group=comm.dp_group, mp_group=comm.mp_group,
                                            checkpoint_root=self.run_dir / "checkpoints")

    # ---- where to start ---------------------------------------------------------------------------------
    def _start(self) -> tuple[int, Position]:
        """Connect the transport and load this stage's state: at the step every rank agrees on when the job starts,
        or, for a stage restarted alone, at its newest own checkpoint at or before the step the next stage needs."""
        t = self.transport
        if t is not None:
            t.start_sending()
        if self.comm is None or self.comm.incarnation == 0:
            start, position = self._resume()
        else:
            need = t.next_stage_needs() if t is not None else None
            start, position = self._restart(need)
        if t is not None:
            t.start_receiving(start)
        self._own_steps = self.store.own_steps(self.blocks, self.replica, first=self.first) if self.comm else []
        self._publish_restart_point()
        return start, position

    def _resume(self) -> tuple[int, Position]:
        """Agree on a start step across all ranks (through the job's store) and load this stage's state for it."""
        mine = -1
        if self.cfg.checkpoint.resume == "auto" and not self.fresh:
            latest = self.store.latest()
            mine = -1 if latest is None else latest
        step = mine
        if self.comm and self.comm.distributed:
            step = agree_min(self.comm.store, key="resume", value=mine, rank=self.comm.rank,
                             world=self.comm.topo.world_size, timeout_s=self.cfg.pipeline.startup_timeout_s)
        if step < 0:
            if mine >= 0:
                log.warning("another rank sees no usable checkpoint; every rank starts from step 0")
            return 0, Position()
        if self.store.verify(step) is not None:  # another rank chose an older step than ours: check it too
            raise PeerError(f"ranks disagree on the checkpoint to resume and step {step} is unusable here")
        position = self._load(step)
        log.info("resumed stage %d from %s (step %d)", self.stage, self.store.step_dir(step), step)
        return step, position

    def _restart(self, need: int | None) -> tuple[int, Position]:
        """This stage alone was restarted: its newest own checkpoint that can still feed the next stage exactly
        (at or before the step it needs), else the start of training. With several replicas the whole stage
        restarts (a lost replica's step cannot be averaged without it): they agree on the earliest of their choices,
        which every replica holds and the previous stage still logs from (their published restart points are the
        stage's earliest too)."""
        own = self.store.own_steps(self.blocks, self.replica, first=self.first)
        step = restart_point(own, need)
        if self.comm is not None and self.comm.replicas is not None:
            group = self.comm.replicas
            group.connect(timeout_s=self.cfg.pipeline.startup_timeout_s)
            agreed = torch.tensor([step], dtype=torch.int64)
            group.allreduce(agreed, dist.ReduceOp.MIN)
            if int(agreed.item()) != step:
                log.info("stage %d replica %d: its replicas restart from step %d (this one could from %d)", self.stage,
                         self.replica, int(agreed.item()), step)
            step = int(agreed.item())
        usable = [s for s in own if s <= step]
        if step == 0 and 0 not in own:  # restart_point() said so, and the previous stage kept its messages from there
            log.warning("stage %d restarted with no checkpoint of its own at or before step %s: from step 0",
                        self.stage, need)
            return 0, Position()
        assert usable and usable[0] == step, (usable, step)
        position = self._load(step)
        log.info("restarted stage %d alone (incarnation %d) from %s (step %d); the next stage needs step %s",
                 self.stage, self.comm.incarnation, self.store.step_dir(step), step, need)
        return step, position

    def _load(self, step: int) -> Position:
        states = [self.store.load_block(step, b, map_location=self.device) for b in self.blocks]
        self.worker.load_state_dicts(states)
        if states and "rng" in states[0]:
            torch.set_rng_state(states[0]["rng"].cpu())
        self.saved_step = step
        return self.store.load_position(step, self.replica) if self.first else Position()

    def _publish_restart_point(self) -> None:
        """Where this stage would resume if it were restarted alone (``_restart``): its newest own checkpoint at or
        before the next stage's next step, else the run's start. The previous stage keeps every message from there
        on (its replay log)."""
        if self.comm is None or not self.comm.distributed:
            return
        need = self.transport.delivered + 1 if self.transport is not None and self.comm.next else None
        own = restart_point(self._own_steps, need)
        store, siblings = self.comm.store, self.comm.topo.stage_group(self.stage)
        try:
            if len(siblings) > 1:  # the stage restarts together, from the earliest replica's point: publish that
                if own != self._own_point:
                    store.set(f"rpc/{self.comm.rank}", str(own))
                    self._own_point = own
                if own > self._restart_point:  # a sibling's may still lag: read them until it does not
                    keys = [f"rpc/{r}" for r in siblings]
                    points = bounded(lambda: [int(store.get(k)) for k in keys if store.check([k])],
                                     timeout_s=STORE_CALL_S, what="reading the siblings' restart points")
                    own = min([own, *points]) if len(points) == len(siblings) else min(own, self._restart_point)
            if own != self._restart_point and own >= 0:
                self._restart_point = own
                store.set(f"rp/{self.comm.rank}", str(own))
        except Exception as e:  # noqa: BLE001 - the store is gone (its supervisor, or its node's link)
            self._store_failed("publishing this stage's restart point", e)

    def _store_failed(self, what: str, e: BaseException) -> None:
        """A store call failed or got no answer: say so once and stop asking (a call given up leaves a thread
        blocked). Not fatal here: a supervisor that is gone stops this rank through the checkpoint path
        (``ParentWatch``), and a link that is cut ends it through the transport's peer timeout, naming the peer."""
        if not self._store_lost:
            log.warning("the job's store is out of reach (%s: %s): its node or supervisor is gone; going on without "
                        "it", what, str(e).splitlines()[0][:160])
        self._store_lost = True

    def _abort(self, message: str) -> None:
        """A failure no waiting can cure (a restart that cannot be fed): every rank ends now (``ControlBoard.watch``
        ends them)."""
        if self.board is not None:
            self.board.abort(message)

    def _say_done(self, step: int, reason: int) -> None:
        """This stage has checkpointed the end of its stream: the stage before it may stop waiting for it."""
        if self.comm is not None and self.comm.distributed:
            try:
                self.comm.store.set(f"done/{self.comm.rank}", f"{step} {reason}")
            except Exception as e:  # noqa: BLE001 - the store may be gone with the supervisor
                log.debug("could not say this stage is done: %s", e)

    def _log_recovery(self, start: int) -> None:
        """One line per recovery: which stage, from which step, and how long after the death its first step ran."""
        died = os.environ.get("BIMDIST_DIED_AT")
        after = f"{time.time() - float(died):.1f}" if died else "unknown"
        log.warning("recovery stage=%d replica=%d incarnation=%d resumed_at_step=%d first_step_s_after_death=%s",
                    self.stage, self.replica, self.comm.incarnation, start, after)

    def _protected_steps(self) -> frozenset[int] | None:
        """Every stage's published restart point: checkpoints that old-checkpoint cleanup must keep (None: not
        known, the store is out of reach)."""
        if self.comm is None or not self.comm.distributed:
            return frozenset()
        keys = [f"rp/{r}" for r in range(self.comm.topo.world_size)]
        store = self.comm.store
        if self._store_lost:
            return None
        try:
            return bounded(lambda: frozenset(int(store.get(k)) for k in keys if store.check([k])),
                           timeout_s=STORE_CALL_S, what="reading the restart points")
        except Exception as e:  # noqa: BLE001 - not knowing what to keep, the caller deletes nothing
            self._store_failed("reading the restart points", e)
            return None

    # ---- checkpoint ---------------------------------------------------------------------------------------
    def checkpoint(self, step: int, position: Position | None) -> None:
        if step == self.saved_step:
            return
        self.timeline.switch("checkpoint")
        self.worker.save_engines(step)
        if self.replica == 0:
            rng = torch.get_rng_state()
            for block, state in zip(self.blocks, self.worker.state_dicts()):
                self.store.save_block(step, block, dict(state, rng=rng))
        if self.first and self.replica == 0 and position is not None:
            self.store.save_position(step, position)  # global: the same for every stage-0 replica
        protect = self._protected_steps()
        if protect is None:  # which old checkpoints some stage would restart from is unknown: delete none
            log.warning("keeping every old checkpoint at step %d: the restart points are unknown", step)
        self.store.finish(step, protect=protect or frozenset(), prune=protect is not None)
        self.saved_step = step
        if self.comm is not None:
            self._own_steps = self.store.own_steps(self.blocks, self.replica, first=self.first)
            self._publish_restart_point()
        log.info("checkpoint stage=%d replica=%d step=%d dir=%s", self.stage, self.replica, step,
                 self.store.step_dir(step))

    # ---- reading the device's numbers, a log window at a time ----------------------------------------------
    def _log_step(self, step: int) -> bool:
        return (step + 1) % self.cfg.run.log_every == 0 or step + 1 == self.cfg.run.steps

    def _flush(self, progress: Progress) -> list[float]:
        """Read the window's losses, skip flags and gradient norms from the device in one transfer (the only
        host read of the step's numbers), then hand the finished records to the observers in order."""
        if not self._window:
            return []
        device = self._window[0][1].losses[0].device
        norms = [s.grad_norm for s in self._window[-1][1].stats if s.grad_norm is not None]
        flat = [v.to(device, torch.float32) for _, r in self._window for v in r.device_values()]
        values = torch.stack(flat + [n.to(device, torch.float32) for n in norms]).tolist()
        i = 0
        for rec, r in self._window:
            n, k = len(r.losses), len(r.stats)
            rec.losses, rec.skipped = values[i : i + n], int(sum(values[i + n : i + n + k]))
            i += n + k
        self._window[-1][0].grad_norm = max(values[i:]) if norms else None
        for rec, _ in self._window:
            progress.update(rec)
            for o in self.observers:
                o.on_step(rec)
        last = self._window[-1][0].losses
        self._window.clear()
        return last

    # ---- the loop -----------------------------------------------------------------------------------------
    def _end_reason_stage0(self, step: int, batch: Batch | None) -> int | None:
        run = self.cfg.run
        if step >= run.steps:
            return END_DONE
        if run.stop_at is not None and step >= run.stop_at:
            return END_STOP_AT
        stop = self.stop.requested or (self.board is not None and self.board.stop_requested())
        flags = [int(batch is None), int(stop)]
        group = self.comm.replicas if self.comm else None
        if group is not None:
            agreed = torch.tensor(flags, dtype=torch.int64, device=self.device)  # stage-0 replicas agree on both
            try:
                group.allreduce(agreed, dist.ReduceOp.MAX)
            except Exception as e:  # noqa: BLE001
                if self.comm is not None and self.comm.recoverable:
                    raise ReplicaLost(f"the stage-0 replicas could not agree on step {step} "
                                      f"({str(e).splitlines()[0][:200]})") from None
                raise PeerError(f"the stage-0 replicas could not agree on step {step}: {e}") from None
            flags = agreed.tolist()
        if flags[1]:
            return END_PREEMPT
        if flags[0]:
            return END_DATA
        return None

    def _emit(self, step: int, ids_shuffle: torch.Tensor, images: torch.Tensor,
              extra: list[torch.Tensor]) -> Callable[[torch.Tensor], None]:
        assert self.transport is not None

        def send(tokens: torch.Tensor) -> None:  # [n, 1+v, D] -> the next stage, before our own backward
            wire = tokens[:, : 1 + self.next_visible].to(self.wire_dtype)
            self.transport.send(Message(DATA, step, [wire, ids_shuffle.to(self.ids_dtype), images, *extra]))

        return send

    def _monitor(self, step: int, received: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[int, float]]:
        """On a monitor step: this stage's blocks over the monitor set (from the data, or from the previous stage's
        message), their kNN top-1, and what to pass on: [tokens, labels, bank size]."""
        if self.first:
            if not (self.monitor_every and step % self.monitor_every == 0) or self.monitor_set is None:
                return [], {}
            ms = self.monitor_set
            images, labels, n_bank = ms.images.to(self.device), ms.labels, ms.n_bank
            tokens = None
        elif len(received) == 6:
            images, tokens = None, received[3].float()
            labels, n_bank = received[4].cpu(), int(received[5].item())
        else:
            return [], {}
        self.timeline.switch("monitor", step=step)
        t0 = time.perf_counter()
        with self.worker.autocast:
            out, scores = run_blocks(self.worker.units, images=images, tokens=tokens, labels=labels, n_bank=n_bank,
                                     knn_k=self.cfg.eval.knn_k)
        log.info("monitor stage=%d step=%d %s (%d bank / %d query images, %.2f s)", self.stage, step,
                 " ".join(f"knn_top1_b{b}={v:.2f}" for b, v in scores.items()), n_bank, len(labels) - n_bank,
                 time.perf_counter() - t0)
        if self.last:
            return [], scores
        return [out.to(self.wire_dtype), labels.to(self.device), torch.tensor([n_bank], device=self.device)], scores

    def run(self) -> StageResult:
        start, position = self._start()
        for o in self.observers:
            o.on_start(start)
        progress = Progress(steps=self.cfg.run.steps, every=self.cfg.run.log_every, stage=self.stage,
                            replica=self.replica, enabled=self.replica == 0, start=start)
        batches: Iterator[Batch] | None = None
        prefetcher: Prefetcher | None = None
        if self.first:
            replicas = self.comm.topo.counts[0] if self.comm else 1
            prefetcher = Prefetcher(train_batches(self.cfg, replica=self.replica, replicas=replicas,
                                                  start_step=start, start=position, stats=self.data_stats,
                                                  workers=self.data_workers, device=self.device),
                                    timeout_s=self.cfg.data.timeout_s)
            batches = iter(prefetcher)
        step, reason, losses = start, END_DONE, []
        every = self.cfg.checkpoint.every
        last_end = time.perf_counter()
        try:
            while True:
                recv0 = self.transport.recv_wait_s if self.transport else 0.0
                send0 = self.transport.send_wait_s if self.transport else 0.0
                t_wait = time.perf_counter()
                self.timeline.switch("recv-wait", step=step)
                if self.first:
                    assert batches is not None
                    batch = next(batches, None) if step < self.cfg.run.steps else None
                    end = self._end_reason_stage0(step, batch)
                    if end is not None:
                        reason = end
                        break
                    assert batch is not None
                    position = batch.position
                    images = batch.images.to(self.device, non_blocking=True)
                    ids = batch.ids_shuffle.to(self.device, non_blocking=True)
                    tokens = None
                else:
                    assert self.transport is not None
                    msg = self.transport.recv()
                    if msg.kind == END:
                        reason = msg.reason
                        if msg.step != step:
                            raise PeerError(f"previous stage ended at step {msg.step}, this stage is at {step}")
                        break
                    if msg.step > step and not self.cfg.pipeline.replay:
                        log.warning("pipeline.replay is off: skipping steps %d..%d, which the previous stage no "
                                    "longer has (%d steps)", step, msg.step - 1, msg.step - step)
                        self.skipped_steps += msg.step - step
                        step = msg.step
                    if msg.step != step:
                        raise PeerError(f"expected step {step} from the previous stage, got {msg.step}")
                    tokens = msg.tensors[0].float()
                    ids, images = msg.tensors[1].long(), msg.tensors[2]
                data_wait = time.perf_counter() - t_wait if self.first else 0.0
                extra, monitored = self._monitor(step, [] if self.first else msg.tensors)
                emit = self._emit(step, ids, images, extra) if not self.last else None
                t0 = time.perf_counter()
                logged = self._log_step(step)
                with FlopCounterMode(display=False) if self.step_flop is None else contextlib.nullcontext() as fc:
                    result = self.worker.train_step(step=step, images=images, ids_shuffle=ids, tokens=tokens,
                                                    emit=emit, phase=self.timeline.switch, log=logged)
                if fc is not None:  # counted once: every step of a stage has the same shapes
                    self.step_flop = float(fc.get_total_flops())
                    log.info("stage %d: %.3f GFLOP per step (forward + backward, torch flop counter)", self.stage,
                             self.step_flop / 1e9)
                now = time.perf_counter()
                rec = StepRecord(  # losses, skips and the gradient norm are read when the window is flushed
                    stage=self.stage, replica=self.replica, step=step, blocks=self.blocks, losses=[],
                    samples=images.shape[0], step_s=now - last_end, compute_s=now - t0,
                    recv_wait_s=(self.transport.recv_wait_s - recv0 if self.transport else 0.0) + data_wait,
                    data_wait_s=data_wait,
                    send_wait_s=self.transport.send_wait_s - send0 if self.transport else 0.0,
                    lr=result.lr, skipped=0, corrupt=self.data_stats.corrupt,
                    allreduce_s=sum(st.allreduce_s for st in result.stats),
                    bytes_sent=self.transport.bytes_sent if self.transport else 0,
                    bytes_received=self.transport.bytes_received if self.transport else 0,
                    in_flight=self.transport.in_flight if self.transport else 0,
                    replayed=self.transport.replayed if self.transport else 0,
                    replay_log_bytes=self.transport.replay_bytes if self.transport else 0,
                    next_restartable=self.transport.next_restartable if self.transport else None,
                    flop=self.step_flop or 0.0, peak_flop_per_s=self.peak_flop_per_s, monitor_knn=monitored,
                    cpu_s=time.process_time(),
                )
                last_end = now
                if step == start and self.comm is not None and self.comm.incarnation > 0:
                    self._log_recovery(start)
                self._window.append((rec, result))
                if logged:
                    losses = self._flush(progress)
                step += 1
                if self.stop.requested and self.board is not None and not self._stop_posted:
                    self.board.request_stop(self.stop.signal_name or "signal")  # reaches stage 0 wherever it came
                    self._stop_posted = True
                if every and step % every == 0:
                    self.checkpoint(step, position if self.first else None)
                self._publish_restart_point()
                if not self.first and self.stop.requested and self.stop.since is not None:
                    if time.monotonic() - self.stop.since > self.cfg.pipeline.peer_timeout_s:
                        log.error("got %s but stage 0 never ended the stream; checkpointing here at step %d",
                                  self.stop.signal_name, step)
                        reason = END_PREEMPT
                        break
            losses = self._flush(progress) or losses
            if step == start and self.comm is not None and self.comm.incarnation > 0:
                self._log_recovery(start)  # restarted after the stream had ended: nothing left to train
            # Drain: pass the END on first (an engine's checkpoint may be a job-wide barrier that the next
            # stage can only join once it has the END), then checkpoint at the step where the stream ended.
            if self.transport is not None and not self.last:
                self.transport.send(Message(END, step, reason=reason))
            self.checkpoint(step, position if self.first else None)
            self._say_done(step, reason)
            if self.transport is not None:
                self.transport.close()
        finally:
            progress.close()
            self.timeline.close()
            if prefetcher is not None:
                prefetcher.close()
        log.info("stage %d replica %d finished at step %d (%s)", self.stage, self.replica, step, END_NAMES[reason])
        self.final_step = step
        code = EXIT_PREEMPTED if reason == END_PREEMPT else EXIT_OK
        result = StageResult(exit_code=code, steps_done=step, reason=END_NAMES[reason], last_losses=losses)
        for o in self.observers:
            o.on_end(result)
        return result
