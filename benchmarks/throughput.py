"""Throughput on this machine, one torch thread per process, same model, batch and data (synthetic) for all:
(a) end-to-end MAE in one process, (b) sequential BIM in one process, (c) the BIM pipeline with S=2 processes,
(d) end-to-end MAE over the same 2 processes with torch.distributed.pipelining (1F1B and GPipe), (e) the same
with DeepSpeed's PipelineModule. Targets: pipeline efficiency >= 0.97; (c)/(b) >= 1.9; (c) >= 1.3x best(d, e).

Every process is bound to one core of its own (``pipeline.bind_cores``; the single-process contenders get one
core in all), and whatever builds a contender's batches runs on its own cores and counts in its time: bimdist's
prefetch thread shares stage 0's core, DeepSpeed builds them inside ``train_batch`` and the torch pipelining
baseline's rank 0 inside its timed step. So no contender gets a free core for its data.

Phase 1 sweeps every peer's configuration once (split point, microbatches; BIM's layer split) and reports every
point. Phase 2 runs the best configuration of each contender side by side, alternating, for ``--rounds``
rounds; medians (over rounds) and ratios come from phase 2. Each run's rate is a mean: samples over the total
time of its timed steps, and for the pipeline that of its slowest stage. Efficiency = measured (c) /
slowest-stage bound, where the bound is 1 / the largest per-stage mean step time measured in isolation (each
stage without communication in its own process, stage 0 building its batches). It is reported twice: the
stages timed one after the other, and both at once for the same wall-clock window (the pipeline's two
processes share the machine too). The bound is measured in every phase-2 round, right after that round's
pipeline run; the efficiency is the median of the rounds' efficiencies.

Every contender's achieved TFLOP/s is its samples/s times its model's training FLOPs per sample (torch's flop
counter, forward + backward; BIM's decoders included, so BIM and MAE do different work per sample). With
``--device cuda`` (the default ``auto`` picks it when GPUs are visible) every process drives its own GPU, as
the trainer's ranks do, which takes 2 GPUs; the table then adds each contender's peak ``max_memory_allocated``
on its fuller device, and the header names the card.

    python -m benchmarks.throughput [--variant preset|light] [--rounds 5] [--device auto|cpu|cuda]
    python -m benchmarks.throughput --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, Check, base_parser, md_table, train_flops_per_sample, write_results
from bimdist.baselines.common import Timer
from bimdist.config import Config, load_config, visible_counts
from bimdist.data.batches import train_batches
from bimdist.data.stream import DataStats, Position
from bimdist.distributed.env import LaunchError, pick_device, usable_cores
from bimdist.distributed.topology import blocks_of_stage
from bimdist.train.worker import StageWorker

VARIANTS = {
    "preset": [],
    "light": ["--model.decoder_embed_dim=64", "--masking.extra_drop=[0.0,0.25,0.5,0.5]"],
}


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    e.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    e["OMP_NUM_THREADS"] = "1"
    return e


def cores_for(processes: int) -> list[int]:
    """The first ``processes`` usable cores: one per process, whatever the machine's size."""
    cores = usable_cores()
    if len(cores) < processes:
        raise SystemExit(f"throughput needs {processes} usable cores, this process may use {cores}")
    return cores[:processes]


def sh(cmd: list[str], *, cores: list[int], timeout: float = 1800) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT,
                          preexec_fn=lambda: os.sched_setaffinity(0, cores))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc


def bimdist_run(cfg_args: list[str], extra: list[str], steps: int) -> dict:
    """A real ``bimdist train`` run. Its rate is the slowest stage's: samples over the total time of its steps
    after the first. Not the last stage's median step: that stage starts one step behind and catches up from
    its queue at its own pace, so its median interval can be shorter than the pipeline's real one."""
    stages = 2 if "--pipeline.stages=2" in extra else 1
    with tempfile.TemporaryDirectory() as tmp:
        sh([sys.executable, "-m", "bimdist", "train", *cfg_args, *extra, f"--run.dir={tmp}", f"--run.steps={steps}",
            "--pipeline.threads=1", "--run.recon_png=false", "--checkpoint.keep=1"], cores=cores_for(stages))
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp, "ranks").glob("stage*_r0.json"))]
    ranks.sort(key=lambda r: r["stage"])
    batch = int(next(a.split("=", 1)[1] for a in reversed(cfg_args) if a.startswith("--data.batch_size=")))
    rate = min(r["samples_per_s"] for r in ranks)
    return {"step_s": batch / rate, "samples_per_s": rate,
            "stage_samples_per_s": {r["stage"]: r["samples_per_s"] for r in ranks},
            "idle_fraction": {r["stage"]: r["idle_fraction"] for r in ranks},
            "bytes_sent_per_step": {r["stage"]: r["bytes_sent"] / max(1, r["steps"]) for r in ranks},
            "step_flop": {r["stage"]: r["step_flop"] for r in ranks},
            "peak_device_bytes": max(r["cuda_peak_bytes"] for r in ranks) or None}


def baseline_run(module: str, cfg_args: list[str], extra: list[str], steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        sh([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", module,
            *cfg_args, "--steps", str(steps), "--warmup", "2", "--json", str(out), *extra], cores=cores_for(2))
        rec = json.loads(out.read_text())
    return {"step_s": rec["median_step_s"], "samples_per_s": rec["samples_per_s"],
            "peak_device_bytes": rec.get("peak_device_bytes")}


def isolated_stage_time(cfg: Config, stage: int, stages: int, steps: int, *,
                        window: tuple[float, float] | None = None) -> float:
    """Mean step time (after the first) of one pipeline stage's units alone in this process (one thread), data
    included.

    Stage 0 builds every step's batch inside the timed step, as its prefetch thread does in the pipeline; a later
    stage gets random tokens of the right shape, and its images are built before its timer starts, since in the
    pipeline they arrive with the tokens. With ``window`` (wall-clock start and end) it steps from start to end
    instead of ``steps`` times, so two such processes measure each stage while the other one loads the
    machine."""
    torch.set_num_threads(1)
    blocks = blocks_of_stage(cfg.model.blocks, stages, stage)
    device = pick_device(cfg.pipeline.device, stage)  # on CUDA the stage's own GPU, as in the pipeline
    worker = StageWorker(cfg, blocks, device=device)
    batches = train_batches(cfg, replica=0, replicas=1, start_step=0, start=Position(), stats=DataStats())
    drops = cfg.masking.extra_drop or [0.0] * cfg.model.blocks
    visible = visible_counts(cfg.model.num_patches, cfg.masking.mask_ratio, drops)
    tokens = None
    if blocks[0] > 0:
        tokens = torch.randn(cfg.data.batch_size, 1 + visible[blocks[0] - 1], cfg.model.embed_dim, device=device)
    timer = Timer(device)  # on CUDA it waits for the GPU at both ends of a step
    step = 0
    if window is not None:
        time.sleep(max(0.0, window[0] - time.time()))
    while step <= steps if window is None else (time.time() < window[1] or len(timer.times) < 3):
        if blocks[0] > 0:  # a later stage's images arrive with its tokens, already on its device
            batch = next(batches)
            images, ids = batch.images.to(device), batch.ids_shuffle.to(device)
        timer.start()
        if blocks[0] == 0:
            batch = next(batches)
            images, ids = batch.images.to(device), batch.ids_shuffle.to(device)
        worker.train_step(step=step, images=images, ids_shuffle=ids, tokens=tokens)
        timer.stop()
        step += 1
    return statistics.fmean(timer.times[1:])


def isolated_stage_times(args: argparse.Namespace, over: list[str], *, together: bool) -> list[float]:
    """Both stages' isolated step times, each in a fresh process: one after the other (``together=False``) or
    both at once for the same wall-clock window (the pipeline's two processes share the machine too)."""
    def cmd(stage: int, window: list[float] | None) -> list[str]:
        return [sys.executable, "-m", "benchmarks.throughput", *(["--quick"] if args.quick else []),
                "--variant", args.variant, "--batch", str(args.batch), "--steps", str(args.final_steps),
                "--device", args.device,
                "--isolated", json.dumps([stage, 2, over, window])]

    def parse(stdout: str) -> float:
        return json.loads(stdout.strip().splitlines()[-1])["step_s"]

    if not together:
        return [parse(sh(cmd(stage, None), cores=cores_for(1)).stdout) for stage in (0, 1)]
    start = time.time() + (8.0 if args.quick else 30.0)  # both import torch and build their stage by then
    window = [start, start + args.window_s]
    procs = [subprocess.Popen(cmd(stage, window), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env(), cwd=ROOT, preexec_fn=lambda c=core: os.sched_setaffinity(0, [c]))
             for stage, core in enumerate(cores_for(2))]
    try:
        outs = [p.communicate(timeout=600 + args.window_s) for p in procs]
    finally:
        for p in procs:  # a stage that failed or hung must not outlive the benchmark
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"isolated stage run failed:\n{err[-3000:]}")
    return [parse(out) for out, _ in outs]


def check_device(cfg: Config) -> torch.device:
    """The contenders' device; CUDA needs a GPU for each of the 2-process contenders' ranks."""
    try:
        device = pick_device(cfg.pipeline.device, 0)
    except LaunchError as e:
        raise SystemExit(f"error: {e} (this benchmark's flag: --device cpu)") from None
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit(f"error: on CUDA the 2-process contenders need 2 GPUs, one per rank, and "
                         f"{torch.cuda.device_count()} is visible; run with --device cpu, or on a machine with 2 GPUs")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="preset")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12, help="steps per phase-1 run")
    parser.add_argument("--final-steps", type=int, default=30, help="steps per phase-2 run")
    parser.add_argument("--window-s", type=float, default=30.0, help="seconds both stages run together")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="every contender's pipeline.device (auto: CUDA when visible)")
    parser.add_argument("--isolated", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        cfg_args = [str(ROOT / "tests/assets/tiny.yaml"), "--masking.extra_drop=null", "--data.batch_size=16",
                    "--pipeline.bind_cores=true"]
        args.rounds, args.steps, args.final_steps, args.window_s = 1, 4, 4, 2.0
        bim_splits, ds_splits, micro = [None], [None], [2]
        schedules = ["1f1b"]
    else:
        cfg_args = ["fmnist-tiny", *VARIANTS[args.variant], "--data.source=synthetic",
                    f"--data.batch_size={args.batch}", "--pipeline.bind_cores=true"]
        bim_splits = [None, "[2,3,4,3]", "[2,2,4,4]", "[3,4,3,2]"]  # stage 0 holds 6, 5, 4, 7 of the 12 layers
        ds_splits, micro = [None, "-1", "+1"], [2, 4, 8]
        schedules = ["1f1b", "gpipe"]
    cfg_args.append(f"--pipeline.device={args.device}")
    if args.isolated is not None:  # worker mode: print one stage's isolated step time
        stage, stages, over, window = json.loads(args.isolated)
        cfg = load_config(cfg_args[0], [*cfg_args[1:], *over])
        print(json.dumps({"step_s": isolated_stage_time(cfg, stage, stages, args.steps,
                                                        window=tuple(window) if window else None)}))
        return 0
    cfg = load_config(cfg_args[0], cfg_args[1:])
    device = check_device(cfg)
    depth = cfg.model.depth
    mae_args = [*cfg_args, "--method=mae", "--masking.extra_drop=null"]
    mid = 1 + depth // 2

    def split_arg(s: str | None) -> list[str]:
        return [] if s is None else ["--split", str(mid + int(s))]

    def bim_over(s: str | None) -> list[str]:
        return [] if s is None else [f"--model.layers_per_block={s}"]

    contenders: dict[str, tuple] = {}
    for s in bim_splits:
        contenders[f"(c) BIM pipeline S=2, layers {s or 'even'}"] = ("bimdist", ["--pipeline.stages=2", *bim_over(s)])
    for sched in schedules:
        for s in ds_splits:
            for m in micro:
                contenders[f"(d) torch pipelining {sched}, split {s or 'mid'}, {m} micro"] = (
                    "bimdist.baselines.torch_pipe", ["--schedule", sched, "--microbatches", str(m), *split_arg(s)])
    for s in ds_splits:
        for m in micro:
            contenders[f"(e) DeepSpeed PipelineModule, split {s or 'mid'}, {m} micro"] = (
                "bimdist.baselines.ds_pipe", ["--microbatches", str(m), *split_arg(s)])

    flop_cache: dict[tuple[str, ...], float] = {}

    def flop_per_sample(kind: str, extra: list[str]) -> float:
        """The contender's model: BIM's (its layer split, masking) for bimdist runs, else end-to-end MAE's."""
        over = [a for a in (extra if kind == "bimdist" else mae_args)
                if a.startswith(("--model.", "--masking.", "--method="))]
        if tuple(over) not in flop_cache:
            flop_cache[tuple(over)] = sum(train_flops_per_sample(load_config(cfg_args[0], [*cfg_args[1:], *over])))
        return flop_cache[tuple(over)]

    def run(kind: str, extra: list[str], steps: int) -> dict:
        if kind == "bimdist":
            r = bimdist_run(cfg_args, extra, steps + 1)
        else:
            r = baseline_run(kind, mae_args, extra, steps)
        r["flop_per_sample"] = flop_per_sample(kind, extra)
        r["tflop_per_s"] = r["samples_per_s"] * r["flop_per_sample"] / 1e12
        return r

    # Phase 1: every configuration once (skipped with --quick: one configuration each).
    sweep = {} if args.quick else {name: run(kind, extra, args.steps) for name, (kind, extra) in contenders.items()}
    best = {}
    for prefix in ("(c)", *(f"(d) torch pipelining {s}" for s in schedules), "(e)"):
        names = [n for n in contenders if n.startswith(prefix)]
        best[prefix] = max(names, key=lambda n: sweep[n]["samples_per_s"]) if sweep else names[0]
    # Phase 2: the best of each, plus the single-process contenders, alternating.
    final = {"(a) MAE, 1 process": ("bimdist", ["--method=mae", "--masking.extra_drop=null"]),
             "(b) BIM sequential, 1 process": ("bimdist", []),
             **{best[p]: contenders[best[p]] for p in best}}
    # The slowest-stage bound is measured in every round too, right after the pipeline's run, so each round's
    # efficiency compares a pipeline run with a bound taken a minute or two later, not one taken once at the end
    # (on a shared VM a core's speed drifts by several percent over a benchmark's length).
    c_name = best["(c)"]
    c_extra = contenders[c_name][1]
    over = [a for a in c_extra if a.startswith("--model.")]
    rounds: dict[str, list[dict]] = {n: [] for n in final}
    alone_by_round: list[list[float]] = []
    together_by_round: list[list[float]] = []
    for _ in range(args.rounds):
        for name, (kind, extra) in final.items():
            rounds[name].append(run(kind, extra, args.final_steps))
            if name == c_name:
                alone_by_round.append(isolated_stage_times(args, over, together=False))
                together_by_round.append(isolated_stage_times(args, over, together=True))
    med = {n: statistics.median(r["samples_per_s"] for r in rs) for n, rs in rounds.items()}
    stage_times = [statistics.median(ts) for ts in zip(*alone_by_round)]
    loaded_times = [statistics.median(ts) for ts in zip(*together_by_round)]
    bound = cfg.data.batch_size / max(stage_times)
    loaded_bound = cfg.data.batch_size / max(loaded_times)
    c, b = med[c_name], med["(b) BIM sequential, 1 process"]
    peers = max(med[best[p]] for p in best if not p.startswith("(c)"))
    c_runs = rounds[c_name]

    def per_round(by_round: list[list[float]]) -> list[float]:  # (c) / that round's slowest-stage bound
        return [r["samples_per_s"] * max(ts) / cfg.data.batch_size for r, ts in zip(c_runs, by_round)]

    round_eff, round_loaded_eff = per_round(alone_by_round), per_round(together_by_round)
    efficiency, loaded_efficiency = statistics.median(round_eff), statistics.median(round_loaded_eff)
    idle = {s: statistics.median(r["idle_fraction"][s] for r in c_runs) for s in c_runs[0]["idle_fraction"]}
    record = {"variant": args.variant, "config": cfg_args, "batch": cfg.data.batch_size, "sweep": sweep,
              "best": best, "rounds": rounds, "median_samples_per_s": med, "device": str(device),
              "flop_per_sample": {n: rs[0]["flop_per_sample"] for n, rs in rounds.items()},
              "isolated_stage_step_s": stage_times, "slowest_stage_bound_samples_per_s": bound,
              "efficiency": efficiency, "isolated_together_stage_step_s": loaded_times,
              "slowest_stage_bound_together_samples_per_s": loaded_bound, "efficiency_together": loaded_efficiency,
              "isolated_stage_step_s_by_round": alone_by_round,
              "isolated_together_stage_step_s_by_round": together_by_round,
              "efficiency_by_round": round_eff, "efficiency_together_by_round": round_loaded_eff,
              "steps": {"phase1": args.steps, "phase2": args.final_steps, "together_window_s": args.window_s},
              "c_over_b": c / b, "c_over_best_peer": c / peers, "idle_fraction": idle,
              "message_bytes_per_step": c_runs[0]["bytes_sent_per_step"], "step_flop": c_runs[0]["step_flop"]}

    def memory(rs: list[dict]) -> list[float]:  # GiB on the fuller device (CUDA only)
        return [max(r["peak_device_bytes"] for r in rs) / 2**30] if device.type == "cuda" else []

    rows = [[n, r["samples_per_s"], r["step_s"], r["tflop_per_s"], *memory([r]), "phase 1"] for n, r in sweep.items()]
    rows += [[n, med[n], statistics.median(x["step_s"] for x in rs), statistics.median(x["tflop_per_s"] for x in rs),
              *memory(rs), f"phase 2 median of {len(rs)}"] for n, rs in rounds.items()]
    table = md_table(["contender", "samples/s", "step s", "achieved TFLOP/s",
                      *(["peak GiB, fuller device"] if device.type == "cuda" else []), "measured in"], rows)
    table += (f"\n\nOn {device.type}. Batch {cfg.data.batch_size}, one torch thread and one core per process "
              f"(its data work included); phase-1 runs {args.steps} steps, phase-2 runs {args.final_steps}. A run's "
              "rate is its samples over the total time of its timed steps (the pipeline's: its slowest stage's); its "
              "TFLOP/s is that rate times its model's training FLOPs per sample (torch's flop counter: "
              f"{ {n: f'{f / 1e9:.3g} GFLOP' for n, f in record['flop_per_sample'].items()} }). Isolated "
              "stage mean step times (batch building included; measured in every round after (c), medians over "
              "rounds shown; the efficiency is the median of the rounds' (c)/bound), each stage alone: "
              f"{[round(t, 3) for t in stage_times]} s -> "
              f"slowest-stage bound {bound:.1f} samples/s; both stages at once for {args.window_s:.0f} s without "
              f"communicating, each on its own core: {[round(t, 3) for t in loaded_times]} s -> "
              f"{loaded_bound:.1f} samples/s. "
              f"Stage idle fractions in (c): { {s: round(v, 3) for s, v in idle.items()} }.\n"
              + "\n".join(c.line() for c in checks(record)))
    write_results(f"throughput-{args.variant}", record, table, args, checks=checks)
    return 0


def checks(record: dict) -> list[Check]:
    """The targets: pipeline efficiency >= 0.97 (bound measured alone and together), (c)/(b) >= 1.9, (c) >= 1.3x
    the best peer."""
    med, best = record["median_samples_per_s"], record["best"]
    peer = max((best[p] for p in best if not p.startswith("(c)")), key=med.get)
    rounds = {k: [round(e, 3) for e in record.get(f"{k}_by_round", [])] for k in ("efficiency", "efficiency_together")}
    return [
        Check("pipeline efficiency (c)/bound, stages timed alone", record["efficiency"], 0.97,
              note=f"; rounds {rounds['efficiency']}"),
        Check("pipeline efficiency (c)/bound, stages timed together", record["efficiency_together"], 0.97,
              note=f"; rounds {rounds['efficiency_together']}"),
        Check("(c) BIM pipeline / (b) BIM sequential", record["c_over_b"], 1.9),
        Check("(c) BIM pipeline / best end-to-end peer", record["c_over_best_peer"], 1.3, note=f"[{peer}]"),
    ]


if __name__ == "__main__":
    raise SystemExit(main())
