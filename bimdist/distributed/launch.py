"""Standalone launch: ``bimdist train CONFIG --pipeline.stages=4`` outside any launcher spawns its own ranks and
supervises them.

The parent hosts the job's store (so that it outlives any rank), starts one ``python -m bimdist`` child per rank
with the torchrun-style environment, and forwards signals to them. A rank that dies (a signal, a crash) is started
again alone, as the next incarnation of that rank, up to ``pipeline.stage_restarts`` times; its neighbours wait
for it and the job goes on. Beyond that, or for a failure a restart cannot cure (bad config, no data, full disk),
the others get a bounded grace period to notice (they name the dead stage themselves) before what is left is
killed. Children get SIGTERM if the launcher dies (PR_SET_PDEATHSIG) and every rank watches its parent, so no rank
outlives its supervisor: it checkpoints, exits and says why.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from bimdist.config import Config
from bimdist.distributed.restart_plan import restart_plan
from bimdist.distributed.topology import Topology
from bimdist.train.signals import EXIT_ERROR, EXIT_OK, EXIT_PEER, EXIT_PREEMPTED, EXIT_RESTART

log = logging.getLogger("bimdist.launch")

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
PR_SET_PDEATHSIG = 1


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
    topo = Topology(cfg.pipeline.stages, list(cfg.replica_counts))
    restarts = cfg.pipeline.stage_restarts if cfg.pipeline.engine == "torch" else 0
    plan = restart_plan(cfg, supervised=True)
    log.info("rank layout (rank=stage/replica[rows of the global batch]): %s", topo.layout(cfg.data.batch_size))
    return spawn_local(argv, topo, grace_s=cfg.pipeline.peer_timeout_s + 30, restarts=restarts, policy=plan.line,
                       batch=cfg.data.batch_size)


def spawn_local(argv: list[str], topo: Topology, *, grace_s: float, restarts: int = 0, policy: str = "",
                batch: int = 1) -> int:
    """Run and supervise every rank on this machine; returns the job's exit code. ``policy``: what happens to a
    dead stage, for the start-up line."""

    import torch.distributed as dist  # the store: the launcher's only torch import

    from bimdist.distributed.control import ControlBoard
    from bimdist.distributed.store import listening_store

    # the ranks are local: the store listens on loopback only, out of reach of any other node
    store, listener = listening_store("127.0.0.1", 0)
    log.info("job store on 127.0.0.1:%d (loopback only)", store.port)
    job = dist.PrefixStore("bimdist/gen0/", store)  # the ranks' namespace (bimdist.distributed.groups.job_store)
    supervisor = Supervisor(argv, topo, port=store.port, restarts=restarts, grace_s=grace_s, job_store=job,
                            board=ControlBoard(job), policy=policy, batch=batch)
    previous = {s: signal.signal(s, supervisor.forward) for s in FORWARDED}
    try:
        return supervisor.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        del store
        listener.close()


ABORT_GRACE_S = 10.0  # after an abort every rank ends by itself within a second; this is the backstop


class Supervisor:
    def __init__(self, argv: list[str], topo: Topology, *, port: int, restarts: int, grace_s: float,
                 job_store: Any = None, board: Any = None, policy: str = "", batch: int = 1):
        """``job_store``: the ranks' store namespace, where a stage says whether its next stage can still restart
        alone (``alone/RANK``); ``board``: the control board on it, where a job-ending abort is posted."""
        self.argv, self.topo, self.port, self.restarts, self.grace_s = argv, topo, port, restarts, grace_s
        self.job_store, self.board, self.policy, self.batch = job_store, board, policy, batch
        self.procs: list[subprocess.Popen] = []
        self.incarnations = [0] * topo.world_size
        self.deaths: list[list[int]] = [[] for _ in range(topo.world_size)]  # exit codes of dead incarnations
        self.unrestartable_said: set[int] = set()
        self._next_poll = 0.0

    def start(self, rank: int, *, died_at: float | None = None) -> subprocess.Popen:
        world = self.topo.world_size
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.port),
                   BIMDIST_SPAWNED="1", BIMDIST_STORE_EXTERNAL="1", BIMDIST_INCARNATION=str(self.incarnations[rank]),
                   BIMDIST_SUPERVISED="1" if self.restarts else "0")
        if died_at is not None:
            env["BIMDIST_DIED_AT"] = f"{died_at:.3f}"
        return subprocess.Popen([sys.executable, "-m", "bimdist", *self.argv], env=env, preexec_fn=_sigterm_with_parent)

    def forward(self, signum: int, _frame: object) -> None:
        self.stopping = True
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def run(self) -> int:
        self.stopping = False
        self.procs = [self.start(rank) for rank in range(self.topo.world_size)]
        policy = self.policy or (f"a dead stage is restarted alone up to {self.restarts} times" if self.restarts
                                 else "no per-stage restart (pipeline.stage_restarts=0, or the DeepSpeed engine): a "
                                 "dead stage ends the job")
        shape = (f"{self.topo.stages} stages x {self.topo.counts[0]} replicas" if self.topo.uniform else
                 f"{self.topo.stages} stages, replicas {list(self.topo.counts)}")
        log.info("spawned %d local ranks (%s), pids %s; %s", self.topo.world_size, shape,
                 [p.pid for p in self.procs], policy)
        first_failure: tuple[int, int] | None = None
        deadline: float | None = None
        while True:
            self._watch_restartable()
            for rank, p in enumerate(self.procs):
                code = p.poll()
                if code in (None, EXIT_OK, EXIT_PREEMPTED) or first_failure is not None:
                    continue
                if self._restart(rank, code):
                    continue
                first_failure = (rank, code)
                aborted = self._aborted()
                grace = min(self.grace_s, ABORT_GRACE_S) if aborted else self.grace_s
                deadline = time.monotonic() + grace
                log.error("%s; waiting up to %.0f s for the other ranks to stop", self.describe(rank, code), grace)
                if aborted:
                    log.error("job ended: %s", aborted)
                if self.deaths[rank] and len(self.deaths[rank]) > self.restarts:
                    self._end_others()
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                for rank, p in enumerate(self.procs):
                    if p.poll() is None:
                        log.error("rank %d did not stop within %.0f s of the failure; killing it", rank, self.grace_s)
                        p.kill()
                for p in self.procs:
                    p.wait(timeout=30)
                break
            time.sleep(0.2)
        return self.outcome(first_failure)

    def _restart(self, rank: int, code: int) -> bool:
        """Start a dead rank again if its failure is one a restart can cure and it has restarts left."""
        # killed, crashed, or restarting with its stage's lost replica; not bad input, missing data or a full disk
        curable = code < 0 or code in (EXIT_ERROR, EXIT_RESTART)
        if not curable or self.stopping or not self.restarts:
            return False  # without per-stage restart the neighbours see the failure and stop by themselves
        unfed = self._unrestartable(rank)
        if unfed is not None:  # its restart could not be fed: end the job now instead of waiting for it to fail
            if self.board is not None:
                self.board.abort(f"{self.describe(rank, code)} and cannot restart alone: {unfed}")
            return False
        self.deaths[rank].append(code)
        if len(self.deaths[rank]) > self.restarts:
            c = self.topo.coord(rank)
            log.error("stage %d (replica %d, rank %d) died %d times (exit codes %s), more than "
                      "pipeline.stage_restarts=%d: ending the job", c.stage, c.replica, rank, len(self.deaths[rank]),
                      self.deaths[rank], self.restarts)
            return False
        died_at = time.time()
        self.incarnations[rank] += 1
        self.procs[rank] = self.start(rank, died_at=died_at)
        log.warning("%s; restarting it alone (restart %d of %d, pid %d)", self.describe(rank, code),
                    len(self.deaths[rank]), self.restarts, self.procs[rank].pid)
        return True

    def _unrestartable(self, rank: int) -> str | None:
        """Why a restart of ``rank`` alone could not be fed (a replica before it said so), else None."""
        if self.job_store is None:
            return None
        for piece in self.topo.upstream(rank, self.batch):
            key = f"alone/{rank}/{piece.peer}"
            try:
                if not self.job_store.check([key]):
                    continue
                value = self.job_store.get(key).decode().split(maxsplit=3)
            except Exception:  # noqa: BLE001 - the store is this process's own; a hiccup means "no news"
                continue
            if value[0] == "1":
                continue
            up = self.topo.coord(piece.peer)
            who = f"stage {up.stage}" + (f" replica {up.replica}" if max(self.topo.counts) > 1 else "")
            hint = value[3] if len(value) > 3 else "raise pipeline.replay_disk_mb or checkpoint more often"
            return (f"it would resume at step {value[1]} (its newest checkpoint that can feed the next stage, or the "
                    f"run's start), but {who} keeps steps from {value[2]} on in its replay log (its disk cap was "
                    f"reached); {hint}")
        return None

    def _watch_restartable(self) -> None:
        """Say once per rank, when it first happens, that a stage can no longer be restarted alone."""
        if self.job_store is None or not self.restarts or time.monotonic() < self._next_poll:
            return
        self._next_poll = time.monotonic() + 1.0
        for rank in range(self.topo.world_size):
            if rank in self.unrestartable_said or self.topo.coord(rank).stage == 0:
                continue
            why = self._unrestartable(rank)
            if why is not None:
                self.unrestartable_said.add(rank)
                c = self.topo.coord(rank)
                log.warning("stage %d (replica %d, rank %d) can no longer be restarted alone until its next "
                            "checkpoint: %s; if it dies now, the job ends (exit 3)", c.stage, c.replica, rank, why)

    def _aborted(self) -> str | None:
        return self.board.aborted() if self.board is not None else None

    def _end_others(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()

    def describe(self, rank: int, code: int) -> str:
        c = self.topo.coord(rank)
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        return f"rank {rank} (stage {c.stage}, replica {c.replica}) {how}"

    def outcome(self, first_failure: tuple[int, int] | None) -> int:
        codes = [p.returncode for p in self.procs]
        if first_failure is not None:
            aborted = self._aborted()
            if aborted:
                log.error("job failed: %s (exit codes by rank: %s)", aborted, codes)
                return EXIT_PEER
            rank, code = first_failure
            if self.deaths[rank] and len(self.deaths[rank]) > self.restarts:
                log.error("job failed: stage %d died more than pipeline.stage_restarts=%d times (exit codes %s; "
                          "last exit codes by rank: %s)", self.topo.coord(rank).stage, self.restarts,
                          self.deaths[rank], codes)
                return EXIT_PEER
            # A rank that only lost its neighbour exits EXIT_PEER; prefer the rank with the cause (a crash, a
            # full disk, a kill) when both are seen.
            causes = [(r, c) for r, c in enumerate(codes) if c not in (EXIT_OK, EXIT_PREEMPTED, EXIT_PEER)]
            rank, code = first_failure if first_failure[1] != EXIT_PEER or not causes else causes[0]
            log.error("job failed: %s (exit codes by rank: %s)", self.describe(rank, code), codes)
            return code if code > 0 else EXIT_PEER
        if any(c == EXIT_PREEMPTED for c in codes):
            return EXIT_PREEMPTED
        return EXIT_OK


def _sigterm_with_parent() -> None:
    """In the child before exec: SIGTERM when the launcher dies, so the rank checkpoints and stops."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class ParentWatch:
    """A rank whose supervisor died (its parent changed: a killed launcher, a killed torchrun agent) stops by
    itself: it checkpoints through the usual preemption path, exits 75 and says why, once."""

    def __init__(self, stop: Any, *, interval_s: float = 0.5):
        self.parent, self.stop, self._said = os.getppid(), stop, threading.Event()
        threading.Thread(target=self._watch, args=(interval_s,), name="bimdist-parent-watch", daemon=True).start()

    def gone(self) -> bool:
        return os.getppid() != self.parent

    def say_why(self) -> None:
        if self.gone() and not self._said.is_set():
            self._said.set()
            log.error("the process that started this rank (pid %d) is gone: checkpointing and stopping; exit code "
                      "%d (run the same command to resume)", self.parent, EXIT_PREEMPTED)

    def _watch(self, interval_s: float) -> None:
        while True:  # also after a SIGTERM from PR_SET_PDEATHSIG: this line says why it came
            if self.gone():
                self.say_why()
                self.stop.request("supervisor lost")
                return
            time.sleep(interval_s)


def watch_parent(stop: Any) -> ParentWatch:
    return ParentWatch(stop)
