"""``bimdist train``: find this process's place (launcher, standalone spawner or single process), run its stage
loop, and turn every failure into a logged reason and an exit code. No rank may hang: after a failure the
process exits hard instead of waiting on communication threads or collective teardown."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch.distributed as dist

from bimdist.config import Config, ConfigError
from bimdist.data.stream import DataError
from bimdist.dist.control import ControlBoard
from bimdist.dist.env import LaunchError, RankEnv, detect, pick_backend, pick_device, set_cpu_threads
from bimdist.dist.groups import init_comm
from bimdist.dist.launch import spawn_local
from bimdist.dist.topology import Topology, TopologyError, check_world
from bimdist.dist.transport import PeerError
from bimdist.telemetry.losslog import LossCSV, plot_losses
from bimdist.telemetry.progress import setup_logging
from bimdist.train.checkpoint import CheckpointError, IncompatibleCheckpoint
from bimdist.train.loop import Observer, StageLoop, StageResult
from bimdist.train.signals import (
    EXIT_CHECKPOINT,
    EXIT_CONFIG,
    EXIT_DATA,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PEER,
    StopFlag,
)

log = logging.getLogger("bimdist")


def prepare_run_dir(cfg: Config, *, write: bool) -> Path:
    """Create the run folder and save the resolved config; an unwritable folder is a config error."""
    run_dir = Path(cfg.run.dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if write:
            tmp = run_dir / ".config.yaml.tmp"
            tmp.write_text(cfg.to_yaml())
            os.replace(tmp, run_dir / "config.yaml")
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.dir {run_dir} is not writable ({e.strerror or e}); choose another --run.dir") from None
    return run_dir


def finalize(cfg: Config, run_dir: Path) -> None:
    """After the last stage has checkpointed the final step: pictures of the result."""
    from bimdist.runs import load_units
    from bimdist.visualize import write_recon_png

    plot_losses(run_dir)
    if cfg.run.recon_png:
        units, _ = load_units(cfg, run_dir)
        write_recon_png(cfg, units, run_dir / "recon.png")


def restart_count() -> int:
    """How often torchrun or Slurm restarted this job (0 on the first attempt)."""
    for key in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _fail(code: int, msg: str, *, distributed: bool) -> int:
    log.error("%s", msg)
    if distributed:  # communication threads or collectives may still block: leave now
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def train(cfg: Config, argv: list[str], *, fresh: bool = False, local_rank_arg: int | None = None,
          observers: list[Observer] | None = None) -> int:
    topo = Topology(cfg.pipeline.stages, cfg.pipeline.replicas)
    env = detect(local_rank_arg=local_rank_arg)
    if env is None and topo.world_size > 1:
        setup_logging("launcher")
        prepare_run_dir(cfg, write=True)
        print(cfg.to_yaml(), flush=True)
        return spawn_local(argv, topo, grace_s=cfg.pipeline.peer_timeout_s + 30)
    env = env or RankEnv(0, 1, 0, 1, "127.0.0.1", 0, "none")
    coord = topo.coord(env.rank) if env.rank < topo.world_size else None
    tag = f"rank={env.rank} stage={coord.stage} replica={coord.replica}" if coord and env.world_size > 1 else ""
    setup_logging(tag)
    distributed = env.world_size > 1
    board: ControlBoard | None = None
    if fresh and restart_count() > 0:
        fresh = False  # a restarted job must resume, not set its own checkpoints aside again
    try:
        check_world(env.world_size, topo.stages, topo.replicas)
        device = pick_device(cfg.pipeline.device, env.local_rank)
        if device.type == "cpu":
            threads = set_cpu_threads(env.local_world_size, cfg.pipeline.threads)
            log.info("cpu device: %d torch threads for %d local processes", threads, env.local_world_size)
        run_dir = prepare_run_dir(cfg, write=env.rank == 0)
        if env.rank == 0:
            if env.launcher not in ("bimdist",):
                print(cfg.to_yaml(), flush=True)
            if fresh:
                from bimdist.runs import store_for

                moved = store_for(cfg, run_dir).set_aside()
                if moved:
                    log.warning("--fresh: previous checkpoints moved to %s", moved)
        comm = None
        if distributed:
            p = cfg.pipeline
            comm = init_comm(env, topo, backend=pick_backend(p.backend, device), device=device,
                             startup_timeout_s=p.startup_timeout_s, peer_timeout_s=p.peer_timeout_s)
        stop = StopFlag()
        stop.install(cfg.run.preempt_signals)
        if distributed:
            board = ControlBoard(env.master_addr, env.master_port, generation=restart_count())
        coord = topo.coord(env.rank)
        observers = list(observers or [])
        if coord.replica == 0:
            observers.append(LossCSV(run_dir, stage=coord.stage, replica=coord.replica))
        loop = StageLoop(cfg, run_dir, comm=comm, device=device, stop=stop, board=board, fresh=fresh,
                         observers=observers)
        result: StageResult = loop.run()
        if loop.last and loop.replica == 0 and result.exit_code == EXIT_OK:
            finalize(cfg, run_dir)
        if distributed:
            dist.destroy_process_group()
        return result.exit_code
    except (ConfigError, TopologyError, LaunchError, IncompatibleCheckpoint) as e:
        return _fail(EXIT_CONFIG, f"{type(e).__name__}: {e}", distributed=distributed)
    except PeerError as e:
        msg = f"peer failure: {e}"
        if board is not None:
            board.report_failure(f"rank {env.rank}", str(e))
            first = board.first_failure()
            if first and not first.startswith(f"rank {env.rank}:"):
                msg += f" | first failure in the job: {first}"
        return _fail(EXIT_PEER, msg, distributed=distributed)
    except DataError as e:
        return _fail(EXIT_DATA, f"data error: {e}", distributed=distributed)
    except CheckpointError as e:
        return _fail(EXIT_CHECKPOINT, f"checkpoint error: {e}", distributed=distributed)
    except KeyboardInterrupt:
        return _fail(EXIT_ERROR, "interrupted", distributed=distributed)
    except Exception:
        log.exception("unexpected error")
        return _fail(EXIT_ERROR, "training failed with an unexpected error (traceback above)", distributed=distributed)

