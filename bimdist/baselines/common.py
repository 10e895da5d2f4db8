"""What both pipeline baselines share: arguments, the data stream, timing and the result record."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

from bimdist.config import Config, load_config
from bimdist.data.batches import Batch, train_batches
from bimdist.data.stream import DataStats, Position
from bimdist.dist.env import detect, set_cpu_threads


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


class Timer:
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def start(self) -> None:
        self._t = time.perf_counter()

    def stop(self) -> None:
        self.times.append(time.perf_counter() - self._t)


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
