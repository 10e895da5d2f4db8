"""``bimdist train``: find this process's place (launcher, standalone spawner or single process), run its stage
loop, and turn every failure into a logged reason and an exit code. No rank may hang: after a failure the
process exits hard instead of waiting on communication threads or collective teardown."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from bimdist.config import Config, ConfigError
from bimdist.data.loader import resolve_workers
from bimdist.data.stream import DataError
from bimdist.distributed.control import ControlBoard
from bimdist.distributed.env import (
    LaunchError,
    RankEnv,
    detect,
    pick_backend,
    pick_device,
    set_cpu_threads,
    usable_cores,
    use_gloo_interface,
)
from bimdist.distributed.groups import init_comm
from bimdist.distributed.launch import launch_standalone, watch_parent
from bimdist.distributed.restart_plan import restart_plan
from bimdist.distributed.topology import Topology, TopologyError, blocks_of_stage, check_world
from bimdist.distributed.transport import PeerError, ReplicaLost
from bimdist.model.unit import unit_indices
from bimdist.runs import store_for
from bimdist.telemetry.losslog import LossCSV, plot_losses
from bimdist.telemetry.metrics import FileSDTarget, Metrics, advertised_address
from bimdist.telemetry.progress import setup_logging
from bimdist.telemetry.summary import RankSummary
from bimdist.telemetry.trace import Timeline
from bimdist.train.checkpoint import CheckpointError, IncompatibleCheckpoint
from bimdist.train.loop import Observer, StageLoop, StageResult
from bimdist.train.rundir import prepare_run_dir
from bimdist.train.signals import (
    EXIT_CHECKPOINT,
    EXIT_CONFIG,
    EXIT_DATA,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PEER,
    EXIT_RESTART,
    StopFlag,
)

log = logging.getLogger("bimdist")


def finalize(cfg: Config, run_dir: Path, step: int) -> None:
    """Pictures of the result, once every stage has checkpointed the final step (bounded wait)."""
    from bimdist.runs import load_units
    from bimdist.visualize import write_recon_png

    store = store_for(cfg, run_dir)
    deadline = time.monotonic() + cfg.pipeline.peer_timeout_s
    while not store.is_complete(step):
        if time.monotonic() > deadline:
            log.warning("step %d is not complete on disk after %.0f s; skipping the pictures", step,
                        cfg.pipeline.peer_timeout_s)
            return
        time.sleep(0.2)
    plot_losses(run_dir)
    if cfg.run.recon_png:
        units, _ = load_units(cfg, run_dir, step=step)
        write_recon_png(cfg, units, run_dir / "recon.png")


def restart_count() -> int:
    """How often torchrun or Slurm restarted this job (0 on the first attempt)."""
    for key in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def train(cfg: Config, argv: list[str], *, fresh: bool = False, local_rank_arg: int | None = None,
          observers: list[Observer] | None = None) -> int:
    env = detect(local_rank_arg=local_rank_arg)
    store = None
    if cfg.pipeline.replicas == "auto" and env is not None:  # rank 0 measures and chooses; the others read it
        from bimdist.distributed.groups import job_store
        from bimdist.distributed.placement import resolve_auto

        setup_logging(f"rank={env.rank}")
        store = job_store(env, timeout_s=cfg.pipeline.startup_timeout_s, generation=restart_count())
        cfg = resolve_auto(cfg, devices=env.world_size, store=store, rank=env.rank,
                           timeout_s=cfg.pipeline.startup_timeout_s)
    topo = Topology(cfg.pipeline.stages, list(cfg.replica_counts))
    if cfg.pipeline.engine == "deepspeed":
        from bimdist.train.ds_engine import build_ds_config

        try:
            build_ds_config(cfg)  # unknown or conflicting keys fail here, before any process or model
        except ConfigError as e:
            print(str(e), file=sys.stderr)
            return EXIT_CONFIG
    if env is None and topo.world_size > 1:
        return launch_standalone(cfg, argv)
    env = env or RankEnv(0, 1, 0, 1, "127.0.0.1", 0, "none")
    coord = topo.coord(env.rank) if env.rank < topo.world_size else None
    tag = f"rank={env.rank} stage={coord.stage} replica={coord.replica}" if coord and env.world_size > 1 else ""
    setup_logging(tag)
    if fresh and restart_count() > 0:
        fresh = False  # a restarted job must resume, not set its own checkpoints aside again
    job = RankJob(cfg, env, topo, store=store)
    try:
        return job.run(fresh=fresh, observers=observers or [])
    except (ConfigError, TopologyError, LaunchError, IncompatibleCheckpoint) as e:
        return job.fail(EXIT_CONFIG, f"{type(e).__name__}: {e}")
    except ReplicaLost as e:
        return job.fail(EXIT_RESTART, f"a replica of this stage was lost: {e}; this replica restarts too, so that "
                                      "the whole stage resumes from one checkpoint (exact)")
    except PeerError as e:
        msg = f"peer failure: {e}"
        if job.board is not None:
            job.board.report_failure(f"rank {env.rank}", str(e))
            first = job.board.first_failure()
            aborted = job.board.aborted()
            if aborted:
                msg += f" | job ended: {aborted}"
            elif first and not first.startswith(f"rank {env.rank}:"):
                msg += f" | first failure in the job: {first}"
        return job.fail(EXIT_PEER, msg)
    except DataError as e:
        return job.fail(EXIT_DATA, f"data error: {e}")
    except CheckpointError as e:
        return job.fail(EXIT_CHECKPOINT, f"checkpoint error: {e}")
    except KeyboardInterrupt:
        return job.fail(EXIT_ERROR, "interrupted")
    except Exception:
        log.exception("unexpected error")
        return job.fail(EXIT_ERROR, "training failed with an unexpected error (traceback above)")


class RankJob:
    """One rank's life: devices, groups, telemetry, the stage loop, and cleanup on every way out."""

    def __init__(self, cfg: Config, env: RankEnv, topo: Topology, *, store: Any = None):
        """``store``: the job's store when it is already open (``pipeline.replicas: auto`` used it)."""
        self.cfg, self.env, self.topo, self.store = cfg, env, topo, store
        self.distributed = env.world_size > 1
        self.board: ControlBoard | None = None
        self.metrics: Metrics | None = None
        self.file_sd: FileSDTarget | None = None
        self.loop: StageLoop | None = None
        self._failing = threading.Lock()

    def run(self, *, fresh: bool, observers: list[Observer]) -> int:
        cfg, env, topo = self.cfg, self.env, self.topo
        check_world(env.world_size, topo.stages, topo.counts)
        coord = topo.coord(env.rank)
        device = pick_device(cfg.pipeline.device, env.local_rank)
        if device.type == "cpu":
            threads, cores = set_cpu_threads(env.local_world_size, cfg.pipeline.threads,
                                             local_rank=env.local_rank, bind=cfg.pipeline.bind_cores)
            log.info("cpu device: %d torch threads for %d local processes, %s cores %s", threads,
                     env.local_world_size, "bound to" if cfg.pipeline.bind_cores else "may use", cores)
            share = len(cores) if cfg.pipeline.bind_cores else len(cores) // max(1, env.local_world_size)
        else:  # a GPU rank's own host thread drives the device; the rest of its share of the cores can decode
            threads, share = 1, len(usable_cores()) // max(1, env.local_world_size)
        data_workers = 0
        if coord.stage == 0:
            data_workers = resolve_workers(cfg.data.workers, cores=share, torch_threads=threads)
            log.info("stage 0 data: %d worker processes (data.workers=%s; %d cores for this rank, %d torch threads), "
                     "decode on %s", data_workers, cfg.data.workers, share, threads, cfg.data.decode)
        run_dir = prepare_run_dir(cfg, write=env.rank == 0)
        if env.rank == 0:
            if env.launcher != "bimdist":  # the spawner already printed it
                print(cfg.to_yaml(), flush=True)
            if fresh:
                moved = store_for(cfg, run_dir).set_aside()
                if moved:
                    log.warning("--fresh: previous checkpoints moved to %s", moved)
        summary = RankSummary(run_dir, stage=coord.stage, replica=coord.replica, device=device)
        units = unit_indices(cfg)
        blocks = blocks_of_stage(len(units), topo.stages, coord.stage) if cfg.method == "bim" else units
        self.metrics = Metrics(cfg, stage=coord.stage, replica=coord.replica, local_rank=env.local_rank,
                               device=device, blocks=blocks)
        observers = [*observers, self.metrics, summary]
        if coord.replica == 0:
            observers.append(LossCSV(run_dir, stage=coord.stage, replica=coord.replica))
        if cfg.metrics.file_sd_dir and cfg.metrics.port and env.local_rank == 0:
            ports = [cfg.metrics.port + i for i in range(env.local_world_size)]
            address = advertised_address(cfg, env.master_addr if self.distributed else None)
            self.file_sd = FileSDTarget(Path(cfg.metrics.file_sd_dir), job=cfg.metrics.job, address=address,
                                        ports=ports)
        comm = None
        if self.distributed:
            p = cfg.pipeline
            backend = pick_backend(p.backend, device, local_ranks=env.local_world_size)
            if backend == "gloo":
                use_gloo_interface(env.master_addr)
            if device.type == "cuda" and env.local_rank == 0 and backend == "gloo":
                import torch

                log.warning("single-GPU mode: %d local ranks share %d GPU(s); gloo with host-staged activations "
                            "(for tests and small demos: give each rank its own GPU for speed)", env.local_world_size,
                            torch.cuda.device_count())
            # a dead neighbour is worth waiting for only if a supervisor restarts single ranks (bimdist's launcher,
            # the per-task Slurm script); torchrun restarts the whole worker group, DeepSpeed needs its world
            recoverable = (p.stage_restarts > 0 and p.engine == "torch"
                           and os.environ.get("BIMDIST_SUPERVISED") == "1")
            if env.rank == 0 and env.launcher != "bimdist":  # the spawner says it in its own start-up lines
                log.info("rank layout (rank=stage/replica[rows of the global batch]): %s",
                         topo.layout(cfg.data.batch_size))
                log.info("a dead stage: %s", restart_plan(cfg, supervised=recoverable, launcher=env.launcher).line)
            comm = init_comm(env, topo, backend=backend, device=device,
                             startup_timeout_s=p.startup_timeout_s, peer_timeout_s=p.peer_timeout_s,
                             generation=restart_count(), engine_groups=p.engine == "deepspeed",
                             recoverable=recoverable, batch=cfg.data.batch_size, store=self.store)
            # the board's own connection, polled by its own thread: every call is bounded, so a failing rank never
            # hangs in a store call when the store's node is out of reach (a cut link)
            self.board = ControlBoard(comm.client())
            self.board.watch(lambda message: self.fail(EXIT_PEER, f"job ended: {message}"))
        stop = StopFlag()
        stop.install(cfg.run.preempt_signals)
        watch = watch_parent(stop) if self.distributed else None
        timeline = Timeline(run_dir / "trace" / f"stage{coord.stage}_r{coord.replica}.jsonl" if cfg.metrics.trace
                            else None, stage=coord.stage, replica=coord.replica)
        with summary.tracking(cfg.metrics.live_bytes):  # from before the model exists, so its params count
            self.loop = StageLoop(cfg, run_dir, comm=comm, device=device, stop=stop, board=self.board,
                                  fresh=fresh, observers=observers, timeline=timeline, data_workers=data_workers)
            result: StageResult = self.loop.run()
        if watch is not None:
            watch.say_why()  # a SIGTERM can end the run before the watch thread notices its parent is gone
        if self.loop.last and self.loop.replica == 0 and result.exit_code == EXIT_OK:
            finalize(cfg, run_dir, self.loop.final_step)
        if self.board is not None:  # no store call in flight from here on
            self.board.close()
        if dist.is_initialized():  # DeepSpeed's world group
            dist.destroy_process_group()
        self._cleanup()
        return result.exit_code

    def _cleanup(self) -> None:
        if self.board is not None:
            self.board.close()
        if self.file_sd is not None:
            self.file_sd.remove()
        if self.metrics is not None:
            self.metrics.close()

    def fail(self, code: int, msg: str) -> int:
        """Say why, clean up and (distributed) leave at once; called from the main thread or the abort watch, and
        only the first caller speaks."""
        if not self._failing.acquire(blocking=False):
            if self.distributed:
                time.sleep(60)  # the first caller is on its way out (os._exit)
            return code
        log.error("%s", msg)
        if self.metrics is not None:
            steps = self.loop.saved_step if self.loop is not None else 0
            self.metrics.push_outcome(code, steps=max(0, steps), losses=[])
        self._cleanup()
        if self.distributed:  # communication threads or collectives may still block: leave now
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
