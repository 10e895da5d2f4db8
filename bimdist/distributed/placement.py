"""Where the devices go: a replica count per stage, from each stage's measured cost.

No gradient crosses a stage boundary, so each stage's data-parallel width is free: a stage with R replicas
processes the global batch R times as fast (each replica takes B / R rows). The pipeline runs at the rate of its
slowest part, so the best counts for N devices maximise ``min_s R_s / cost_s`` (``cost_s``: seconds per sample of
stage s on one device, stage 0's data decoding included where it runs on the rank), subject to ``sum R_s = N`` and
each R_s dividing the batch; a small dynamic programme finds them exactly.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bimdist.config import Config, ConfigError

log = logging.getLogger("bimdist.placement")

@dataclass(frozen=True)
class Layout:
    counts: tuple[int, ...]
    samples_per_s: float  # predicted
    slowest: int  # the stage that sets the rate

    def line(self) -> str:
        return (f"replicas {list(self.counts)}: {self.samples_per_s:,.0f} samples/s predicted, limited by stage "
                f"{self.slowest}")


def rate(costs: list[float], counts: tuple[int, ...] | list[int]) -> tuple[float, int]:
    """Samples/s of the pipeline and its slowest stage, for per-sample ``costs`` (one device) and ``counts``."""
    rates = [r / c for r, c in zip(counts, costs)]
    slowest = min(range(len(rates)), key=rates.__getitem__)
    return rates[slowest], slowest


def choose_counts(costs: list[float], devices: int, batch: int) -> Layout:
    """The counts (one per stage, each dividing ``batch``, summing to ``devices``) with the best predicted rate."""
    counts = best_counts(len(costs), devices, batch, lambda s, r: r / costs[s])
    r, slow = rate(costs, counts)
    return Layout(counts, r, slow)


def best_counts(stages: int, devices: int, batch: int, stage_rate: Callable[[int, int], float]) -> tuple[int, ...]:
    """Counts that maximise the slowest stage's ``stage_rate(stage, replicas)``, each a divisor of ``batch``,
    summing to ``devices``: exact, by dynamic programming over the stages and the devices used so far (the rate of
    a layout is the minimum over stages, which this decomposes). Ties go to the layout found first."""
    if devices < stages:
        raise ConfigError(f"{devices} devices cannot hold {stages} stages (each stage needs at least one replica)")
    options = [d for d in range(1, devices + 1) if batch % d == 0]
    # best[s][n]: (the best slowest rate of stages s.., the counts) using exactly n devices for them
    best: list[dict[int, tuple[float, tuple[int, ...]]]] = [{} for _ in range(stages + 1)]
    best[stages][0] = (float("inf"), ())
    for s in range(stages - 1, -1, -1):
        for n in range(1, devices + 1):
            for d in options:
                rest = best[s + 1].get(n - d)
                if d > n or rest is None:
                    continue
                value = min(stage_rate(s, d), rest[0])
                if n not in best[s] or value > best[s][n][0]:
                    best[s][n] = (value, (d, *rest[1]))
    if devices not in best[0]:
        raise ConfigError(f"no replica counts for {devices} devices divide data.batch_size={batch} on every stage; "
                          "choose a batch with more divisors, or another number of devices")
    return best[0][devices][1]


def stage_costs(cfg: Config, *, device: Any, threads: int, workers: int) -> list[float]:
    """Seconds per sample of each stage on one device (the doctor's timing), stage 0's data decoding added where
    it runs on the rank (``workers=0``)."""
    from bimdist.doctor import data_samples_per_s, stage_step_s

    one = with_counts(cfg, 1)
    costs = []
    for stage in range(cfg.pipeline.stages if cfg.method == "bim" else 1):
        step, _ = stage_step_s(one, stage, device=device, threads=threads)
        costs.append(step / cfg.data.batch_size)
    if workers == 0:
        costs[0] += 1 / data_samples_per_s(one, workers=0, seconds=4.0)
    return costs


def resolve_auto(cfg: Config, *, devices: int, store: Any = None, rank: int = 0, timeout_s: float = 600) -> Config:
    """``pipeline.replicas: auto`` made concrete for ``devices`` ranks: measured and chosen once (here, or on rank 0
    of a launched job, which publishes the counts in the job's store for the others)."""
    if store is not None and rank != 0:
        store.wait(["placement/counts"], timedelta(seconds=timeout_s))
        counts = json.loads(store.get("placement/counts"))
    else:
        import torch

        from bimdist.data.loader import resolve_workers
        from bimdist.distributed.env import pick_device, usable_cores

        t0 = time.perf_counter()
        device = pick_device(cfg.pipeline.device, 0)
        threads = cfg.pipeline.threads or 1
        workers = resolve_workers(cfg.data.workers, cores=max(1, len(usable_cores()) // devices),
                                  torch_threads=threads)
        costs = stage_costs(cfg, device=device, threads=threads, workers=workers)
        torch.set_num_threads(threads)
        layout = choose_counts(costs, devices, cfg.data.batch_size)
        counts = list(layout.counts)
        log.info("pipeline.replicas=auto for %d devices: %s (stage costs %s ms/sample, measured in %.0f s)", devices,
                 layout.line(), ", ".join(f"{1000 * c:.3f}" for c in costs), time.perf_counter() - t0)
        if store is not None:
            store.set("placement/counts", json.dumps(counts))
    return with_counts(cfg, counts)


def with_counts(cfg: Config, counts: int | list[int]) -> Config:
    """``cfg`` with ``pipeline.replicas`` set (validated again: the counts must divide the batch)."""
    body = cfg.model_dump()
    body["pipeline"]["replicas"] = counts
    return Config.model_validate(body)
