"""What both pipeline baselines share: arguments, the data stream, timing and the result record."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from bimdist.config import Config, load_config
from bimdist.data.batches import Batch, train_batches
from bimdist.data.stream import DataStats, Position
from bimdist.distributed.env import LaunchError, detect, pick_backend, pick_device, set_cpu_threads


def parse(description: str, argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("config", help="bimdist YAML file or preset (model, data and batch are taken from it)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--split", type=int, default=None,
                   help="index of the first layer of stage 1 (layers: embed, blocks 1..depth, head)")
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="write the result record here (rank 0)")
    args, rest = p.parse_known_args(argv)
    rest = [a for a in rest if not a.startswith("--local_rank")]
    return args, load_config(args.config, rest)


def batches(cfg: Config) -> Iterator[Batch]:
    """The same deterministic batches as bimdist's trainer (one replica)."""
    return train_batches(cfg, replica=0, replicas=1, start_step=0, start=Position(), stats=DataStats())


def default_split(depth: int) -> int:
    """Layers are [embed, block 1..depth, head]: cut in the middle of the encoder."""
    return 1 + depth // 2


def set_threads(cfg: Config) -> None:
    """The trainer's CPU thread and core-binding rules (``pipeline.threads``, ``pipeline.bind_cores``)."""
    found = detect()  # the trainer's launcher detection: torchrun, deepspeed, srun or none
    local_rank, local = (found.local_rank, found.local_world_size) if found else (0, 1)
    set_cpu_threads(local, cfg.pipeline.threads, local_rank=local_rank, bind=cfg.pipeline.bind_cores)


def prepare(cfg: Config) -> tuple[torch.device, str]:
    """The trainer's rules for this rank: its device and backend (``pipeline.device``, ``pipeline.backend``): the
    local rank's GPU and NCCL when CUDA is visible, else the CPU and gloo, and on the CPU its threads and cores. A
    choice this machine cannot meet ends the process with the reason."""
    found = detect()
    try:
        device = pick_device(cfg.pipeline.device, found.local_rank if found else 0)
        backend = pick_backend(cfg.pipeline.backend, device, local_ranks=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    except LaunchError as e:
        raise SystemExit(f"error: {e}") from None
    if device.type == "cpu":  # as the trainer: thread and core limits are for CPU compute
        set_threads(cfg)
    return device, backend


class Timer:
    """Wall-clock step times; on CUDA it waits for the device's queued work at both ends of a step."""

    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        self.times: list[float] = []
        self._t = 0.0
        self._sync = device.type == "cuda"

    def start(self) -> None:
        if self._sync:
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def stop(self) -> None:
        if self._sync:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


def peak_over_ranks(device: torch.device) -> int | None:
    """The largest ``max_memory_allocated`` over all ranks (a collective: every rank calls it); None on the CPU,
    where the memory benchmark measures memory properly."""
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return int(peak) if device.type == "cuda" else None


def report(args: argparse.Namespace, cfg: Config, *, name: str, times: list[float], losses: list[float],
           extra: dict) -> dict:
    # The rate is samples over the timed steps' total time (not batch / median step): a throughput is a mean,
    # and bimdist's own runs are reported the same way.
    mean = statistics.fmean(times)
    record = {"contender": name, "split": args.split, "microbatches": args.microbatches,
              "batch_size": cfg.data.batch_size, "step_s": times, "median_step_s": statistics.median(times),
              "mean_step_s": mean, "samples_per_s": cfg.data.batch_size / mean, "losses": losses, **extra}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k not in ("step_s", "losses")}), flush=True)
    return record
