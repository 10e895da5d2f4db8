"""``bimdist doctor [CONFIG]``: check a node before a job, in under a minute, and predict the pipeline's rate.

What it does, in order: versions; devices (names, memory, bf16); the device and backend a rank would pick; what a
job needs on this node (the shards, free metrics ports, shared memory for the data workers: a missing one is exit 2
with one line that names it and the fix); then three measurements and what they predict:
- the link: two fresh processes send messages shaped like this config's activations through bimdist's own
  transport, on the backend the job would use;
- stage 0's data path: batches of this config's shards (or synthetic data), with the worker count it would use;
- every stage's step time: its blocks, on this node's device, with the thread count a rank would get.
The prediction is the pipeline model of ``benchmarks.model``: one replica makes a step when its slowest part does
(compute of the slowest stage, a message over the link, or stage 0's data), replicas multiply it.
"""

from __future__ import annotations

import json
import platform
import shutil
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from bimdist import __version__
from bimdist.config import Config, ConfigError, visible_counts
from bimdist.data.loader import CHUNK_BYTES, chunk_size, resolve_workers
from bimdist.data.stream import DataError, DataStats, ShardStream
from bimdist.distributed.env import host_staging, pick_backend, pick_device, usable_cores
from bimdist.distributed.restart_plan import message_bytes, message_shapes, restart_plan
from bimdist.distributed.topology import blocks_of_stage

STEP_BUDGET_S = 2.5  # a stage is timed at the largest batch whose step fits this, then scaled: under a minute


class DoctorError(RuntimeError):
    """Something the job needs is missing on this node; the message names it and the fix (exit 2)."""


@dataclass
class Report:
    rows: list[tuple[str, str]] = field(default_factory=list)
    figures: dict = field(default_factory=dict)

    def add(self, check: str, result: str) -> None:
        self.rows.append((check, result))

    def table(self) -> str:
        width = max(len(c) for c, _ in self.rows)
        lines = [f"{'check':<{width}}  result", f"{'-' * width}  {'-' * 40}"]
        lines += [f"{c:<{width}}  {r}" for c, r in self.rows]
        return "\n".join(lines)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def preflight(cfg: Config, report: Report, *, workers: int) -> None:
    """What the job needs on this node; DoctorError names the first thing missing."""
    d = cfg.data
    if d.source == "shards":
        try:
            stream = ShardStream(d.train_shards or "", seed=0, replica=0, replicas=1,
                                 shuffle_buffer=1, stats=DataStats(), epochs=1)
        except DataError as e:
            raise DoctorError(f"data.train_shards={d.train_shards!r}: {e}") from None
        report.add("training shards", f"{len(stream.urls)} shards match {d.train_shards}")
    else:
        report.add("training data", "synthetic")
    if cfg.metrics.port:
        local = cfg.world_size
        for port in range(cfg.metrics.port, cfg.metrics.port + local):
            with socket.socket() as s:
                try:
                    s.bind((cfg.metrics.bind, port))
                except OSError as e:
                    raise DoctorError(f"metrics port {port} on {cfg.metrics.bind} is taken ({e.strerror}); pick "
                                      "another --metrics.port (each local rank serves metrics.port + LOCAL_RANK)"
                                      ) from None
        report.add("metrics ports", f"{cfg.metrics.port}..{cfg.metrics.port + local - 1} free on {cfg.metrics.bind}")
    if workers:
        m = cfg.model
        sample = m.in_chans * m.img_size**2
        need = workers * 2 * chunk_size(d.batch_size // cfg.replica_counts[0], sample) * sample
        try:
            free = shutil.disk_usage("/dev/shm").free
        except OSError:
            free = 0
        if free < need:
            raise DoctorError(f"/dev/shm has {free / 2**20:.0f} MiB free but {workers} data workers need about "
                              f"{need / 2**20:.0f} MiB; mount a larger /dev/shm (docker run --shm-size=1g) or lower "
                              "data.workers")
        report.add("shared memory", f"{free / 2**20:,.0f} MiB free in /dev/shm; {workers} workers need "
                                    f"~{need / 2**20:.0f} MiB (chunks of up to {CHUNK_BYTES >> 20} MiB)")


def stage_step_s(cfg: Config, stage: int, *, device: torch.device, threads: int) -> tuple[float, int]:
    """Mean step time of one stage's blocks at this config's per-replica batch (timed at a smaller batch on a CPU
    and scaled linearly); also the batch it was timed at."""
    from bimdist.model.masking import shuffle_ids
    from bimdist.train.worker import StageWorker

    torch.set_num_threads(threads)
    m = cfg.model
    local = cfg.data.batch_size // cfg.replica_counts[stage]
    blocks = blocks_of_stage(m.blocks, cfg.pipeline.stages, stage) if cfg.method == "bim" else [0]
    worker = StageWorker(cfg, blocks, device=device)
    drops = cfg.masking.extra_drop or [0.0] * m.blocks
    visible = visible_counts(m.num_patches, cfg.masking.mask_ratio, drops)

    def steps(n: int, count: int) -> float:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, m.in_chans, m.img_size, m.img_size), dtype=torch.uint8, generator=g)
        ids = shuffle_ids(n, m.num_patches, generator=g)
        tokens = None if blocks[0] == 0 else torch.randn(n, 1 + visible[blocks[0] - 1], m.embed_dim, generator=g)
        images, ids = images.to(device), ids.to(device)
        tokens = tokens.to(device) if tokens is not None else None
        times = []
        for i in range(count):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            worker.train_step(step=i, images=images, ids_shuffle=ids, tokens=tokens)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:]) if count > 1 else times[0]

    small = min(local, 16)
    estimate = steps(small, 2) * local / small  # the full batch's step, roughly
    n = local
    while n > small and estimate * n / local > STEP_BUDGET_S:
        n //= 2
    return steps(n, 5) * local / n, n


def data_samples_per_s(cfg: Config, *, workers: int, seconds: float = 8.0) -> float:
    from bimdist.data.batches import train_batches
    from bimdist.data.stream import DataStats, Position

    it = train_batches(cfg, replica=0, replicas=cfg.replica_counts[0], start_step=0, start=Position(),
                       stats=DataStats(), workers=workers)
    try:
        next(it)  # worker start-up
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds or n == 0:
            batch = next(it, None)
            if batch is None:
                break
            n += len(batch.images)
        return n / (time.perf_counter() - t0)
    finally:
        it.close()


def diagnose(cfg: Config, *, devices: int | None = None, link_gbps: float | None = None) -> Report:
    """The whole check; DoctorError for what the job cannot do without."""
    from bimdist.distributed.probe import link_bytes_per_s

    report = Report()
    p = cfg.pipeline
    report.add("versions", f"bimdist {__version__}, python {platform.python_version()}, torch {torch.__version__} "
                           f"(CUDA {torch.version.cuda or 'none'}), timm {_version('timm')}, "
                           f"webdataset {_version('webdataset')}, deepspeed {_version('deepspeed')}")
    cores = usable_cores()
    gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    report.add("cpu", f"{platform.processor() or platform.machine()}, {len(cores)} usable cores")
    for i, g in enumerate(gpus):
        report.add(f"gpu {i}", f"{g.name}, {g.total_memory / 2**30:.0f} GiB, bf16 "
                               f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    if not gpus:
        report.add("gpus", "none visible")
    local = cfg.world_size  # the doctor plans for every rank on this node
    device = pick_device(p.device, 0)
    backend = pick_backend(p.backend, device, local_ranks=local)
    staging = host_staging(p.host_staging, device, backend)
    report.add("rank device and backend", f"{device.type}, {backend}" + (", host-staged activations" if staging
                                                                          else "") + f" ({local} local ranks)")
    share = max(1, len(cores) // local)
    threads = (p.threads or share) if device.type == "cpu" else 1
    workers = resolve_workers(cfg.data.workers, cores=share, torch_threads=threads)
    preflight(cfg, report, workers=workers)
    f = report.figures
    if p.stages > 1:
        if device.type == "cpu":
            pair = ("cpu", "cpu")
        else:  # two GPUs when the job has one per rank; ranks that share a GPU share it here too
            pair = ("cuda:0", "cuda:1") if backend == "nccl" and len(gpus) > 1 else ("cuda:0", "cuda:0")
        shapes = message_shapes(cfg, 0)
        f["message_bytes"] = message_bytes(cfg, 0)
        if link_gbps is not None:  # the link between nodes, as the user measured it (bimdist.distributed.probe)
            f["link_bytes_per_s"] = link_gbps * 1e9 / 8
            report.add("link (given, --link-gbps)", f"{link_gbps:g} Gbit/s = {f['link_bytes_per_s'] / 1e6:,.1f} MB/s "
                                                    f"for messages of {f['message_bytes'] / 1e6:.2f} MB: "
                                                    f"{f['message_bytes'] / f['link_bytes_per_s']:.3f} s each")
        else:
            f["link_bytes_per_s"] = link_bytes_per_s(backend=backend, devices=pair, shapes=shapes, staging=staging)
            report.add("link (2 ranks, bimdist transport)", f"{f['link_bytes_per_s'] / 1e9:.2f} GB/s for messages "
                                                            f"of {f['message_bytes'] / 1e6:.2f} MB ({backend})")
    f["data_samples_per_s"] = data_samples_per_s(cfg, workers=workers)
    report.add("stage 0 data", f"{f['data_samples_per_s']:,.0f} samples/s with {workers} data workers")
    f["stage_step_s"], timed = [], []
    counts = cfg.replica_counts
    for stage in range(p.stages if cfg.method == "bim" else 1):
        step, n = stage_step_s(cfg, stage, device=device, threads=threads)
        f["stage_step_s"].append(step)
        timed.append(n)
    locals_ = [cfg.data.batch_size // c for c in counts]
    report.add("stage step times", ", ".join(f"{t:.3f}" for t in f["stage_step_s"]) + " s at batch "
               + ", ".join(map(str, locals_[: len(f["stage_step_s"])]))
               + (f" (timed at {timed}, scaled)" if timed != locals_[: len(timed)] else "") + f", {threads} torch "
               "threads")
    predict(cfg, f, workers=workers)
    shape = f"{p.stages} stages x {counts[0]} replicas" if len(set(counts)) == 1 else f"replicas {list(counts)}"
    slowest = f" (stage {f['slowest_stage']})" if f["slowest_stage"] is not None else ""
    report.add("predicted pipeline rate", f"{f['samples_per_s']:,.0f} samples/s ({shape}), limited by "
                                          f"{f['limited_by']}{slowest}")
    if f["limited_by"] == "link":
        report.add("link-bound", link_advice(cfg, f))
    if devices is not None:
        layouts(cfg, report, devices=devices, workers=workers)
    plan = restart_plan(cfg, supervised=True)
    f["restart_alone"] = {"alone": plan.alone, "fits": plan.fits, "log_steps": plan.log_steps,
                          "needed_steps": plan.needed_steps}
    report.add("a dead stage (bimdist launcher, per-task Slurm)", plan.line)
    return report


def predict(cfg: Config, f: dict, *, workers: int) -> None:
    """Per-sample times of each part, the slowest one, and the rate it allows. A stage with R replicas does the
    global batch R times as fast; the link between two stages carries min(R_s, R_s+1) messages side by side."""
    counts = cfg.replica_counts
    batch = cfg.data.batch_size
    compute = [t / (batch // counts[s]) for s, t in enumerate(f["stage_step_s"])]  # one replica, per sample
    data = 1 / f["data_samples_per_s"]
    if workers == 0:  # stage 0 builds its batches on its own cores, next to its compute
        compute[0] += data
    f["stage_cost_s"] = compute  # per sample on one device: what the placement balances
    rates = {f"compute of stage {s}": counts[s] / c for s, c in enumerate(compute)}
    if workers:
        rates["data"] = counts[0] / data
    if "link_bytes_per_s" in f:
        per_sample = f["message_bytes"] / (batch // counts[0])
        rates["link"] = min(counts[0], counts[1] if len(counts) > 1 else counts[0]) * f["link_bytes_per_s"] / per_sample
    f["rates"] = rates
    f["per_sample_s"] = {k: 1 / v for k, v in rates.items()}
    limited = min(rates, key=rates.get)
    f["limited_by"] = "compute" if limited.startswith("compute") else limited
    f["slowest_stage"] = int(limited.rsplit(" ", 1)[1]) if limited.startswith("compute") else None
    f["samples_per_s"] = rates[limited]


def link_advice(cfg: Config, f: dict) -> str:
    """What a link-bound job can do: the link rate that would not hold it back, and the wire dtype that halves the
    tokens."""
    others = [v for k, v in f["rates"].items() if k != "link"]
    line = f"the link carries {f['rates']['link']:,.0f} samples/s"
    if others:
        free = min(others)
        need = f["link_bytes_per_s"] * free / f["rates"]["link"] * 8 / 1e9
        line += f", the rest of the pipeline would do {free:,.0f}: a link of {need:.3g} Gbit/s would not hold it back"
    if cfg.pipeline.wire_dtype in ("auto", "fp32"):  # auto sends fp32
        half = cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(update={"wire_dtype": "bf16"})})
        bf16 = message_bytes(half, 0)
        line += (f"; pipeline.wire_dtype=bf16 sends {bf16 / 1e6:.2f} MB a step instead of "
                 f"{f['message_bytes'] / 1e6:.2f} ({f['message_bytes'] / bf16:.2f}x the rate while link-bound)")
    return line


def layouts(cfg: Config, report: Report, *, devices: int, workers: int) -> None:
    """The best replica counts for ``devices`` ranks from the measured stage costs, against equal counts."""
    from bimdist.distributed.placement import choose_counts, rate

    f = report.figures
    costs = f["stage_cost_s"]
    best = choose_counts(costs, devices, cfg.data.batch_size)
    f["layout"] = {"devices": devices, "counts": list(best.counts), "samples_per_s": best.samples_per_s,
                   "slowest_stage": best.slowest}
    report.add(f"layout for {devices} devices", best.line())
    stages = len(costs)
    if devices % stages == 0 and cfg.data.batch_size % (devices // stages) == 0:
        even = (devices // stages,) * stages
        r, slow = rate(costs, even)
        f["layout"]["uniform"] = {"counts": list(even), "samples_per_s": r}
        report.add("  equal counts", f"replicas {list(even)}: {r:,.0f} samples/s predicted, limited by stage {slow} "
                                     f"(chosen / equal: {best.samples_per_s / r:.2f}x)")


def doctor(cfg: Config, *, json_path: Path | None = None, devices: int | None = None,
           link_gbps: float | None = None) -> int:
    t0 = time.perf_counter()
    try:
        if cfg.pipeline.replicas == "auto":  # plan for the devices asked for (or, failing that, one per stage)
            from bimdist.distributed.placement import with_counts

            cfg = with_counts(cfg, 1)
            devices = devices or cfg.pipeline.devices or cfg.pipeline.stages
        if link_gbps is not None and link_gbps <= 0:
            raise ConfigError(f"--link-gbps={link_gbps:g}: give the link's rate in Gbit/s, above 0")
        report = diagnose(cfg, devices=devices, link_gbps=link_gbps)
    except (DoctorError, ConfigError, TimeoutError) as e:
        print(f"bimdist doctor: {e}", file=sys.stderr, flush=True)
        return 2
    report.add("doctor took", f"{time.perf_counter() - t0:.0f} s")
    print(report.table(), flush=True)
    if json_path is not None:
        json_path.write_text(json.dumps({"rows": report.rows, "figures": report.figures}, indent=1))
    return 0
