"""A replica count per stage, measured on this machine: a stage-0-bound 2-stage pipeline (photo-sized JPEG shards
decoded in full on stage 0, ``data.workers=0``), replicas ``[2, 1]`` (3 processes) against ``[1, 1]`` (2 processes),
side by side in one run, one torch thread each, on 2 cores.

The case is the one a GPU cluster has when stage 0 reads JPEGs on its host: decoding costs far more than the
stage's compute. Here the compute is CPU too, so the model is small (32 wide, 64 px crops) and the JPEGs are
photo-sized (twice ImageNet's sides, about 0.55 megapixels, decoded at full size: ``data.jpeg_draft=false``).

Stage 0 decodes on its data thread while its main thread computes, so ``[1, 1]`` runs at the pace of that one
decoding thread and leaves part of the two cores idle. ``[2, 1]`` gives stage 0 a second replica, which decodes the
other half of each batch. It can at best use both cores fully: the whole CPU work of a sample (``W``, every thread
of every process, measured in the ``[1, 1]`` runs as ``cpu_s_per_sample`` in the ranks' summaries) over two cores.
The bound for the ratio is then ``(2 / W) / rate[1, 1]``.

Targets: [2, 1] / [1, 1] >= 1.3, and >= 0.85 of the bound.

    python -m benchmarks.layout [--rounds 3] [--steps 60]
    python -m benchmarks.layout --quick
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, Check, base_parser, md_table, write_results
from benchmarks.data import make_jpeg_tree
from benchmarks.throughput import cores_for, env

BATCH = 128
MODEL = ["--model.img_size=64", "--model.patch_size=16", "--model.in_chans=3", "--model.embed_dim=32",
         "--model.depth=2", "--model.blocks=2", "--model.num_heads=1", "--model.decoder_embed_dim=16",
         "--model.decoder_num_heads=1", "--masking.extra_drop=null", "--data.mean=[0.5,0.5,0.5]",
         "--data.std=[0.25,0.25,0.25]", "--data.workers=0", "--data.jpeg_draft=false", f"--data.batch_size={BATCH}",
         "--data.shuffle_buffer=64"]
SIZE = 2.0  # the JPEGs' sides, times ImageNet's
LAYOUTS = {"[1, 1]": "[1,1]", "[2, 1]": "[2,1]"}


def bimdist(command: str, pattern: str) -> list[str]:
    """``bimdist COMMAND`` on this case: the model, the shards, 2 stages, one torch thread each."""
    return [sys.executable, "-m", "bimdist", command, "fmnist-tiny", *MODEL, f"--data.train_shards={pattern}",
            "--data.test_shards=null", "--pipeline.stages=2", "--pipeline.threads=1"]


def run(pattern: str, counts: str, steps: int) -> dict:
    """One ``bimdist train`` of the layout on the first 2 cores; its rate is the slowest stage's, a stage's rate
    the sum over its replicas (each takes its rows of every batch)."""
    with tempfile.TemporaryDirectory() as tmp:
        cores = cores_for(2)
        cmd = [*bimdist("train", pattern), f"--pipeline.replicas={counts}", f"--run.steps={steps}",
               f"--run.dir={tmp}", "--run.recon_png=false", "--checkpoint.every=0", "--run.log_every=20",
               "--eval.monitor_every=0"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env(), cwd=ROOT,
                              preexec_fn=lambda: os.sched_setaffinity(0, cores))
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        ranks = [json.loads(p.read_text()) for p in Path(tmp, "ranks").glob("stage*_r*.json")]
    stages: dict[int, list[dict]] = {}
    for r in ranks:
        stages.setdefault(r["stage"], []).append(r)
    rates = {s: sum(r["samples_per_s"] for r in rs) for s, rs in stages.items()}
    return {"samples_per_s": min(rates.values()), "stage_samples_per_s": rates,
            "stage_cpu_s_per_sample": {s: statistics.mean(r["cpu_s_per_sample"] for r in rs)
                                       for s, rs in stages.items()},
            "stage0_step_s": statistics.median(r["median_step_s"] for r in stages[0]),
            "stage1_compute_s": stages[1][0]["median_compute_s"], "batch": BATCH,
            "replicas": {s: len(rs) for s, rs in stages.items()}}


def doctor_layout(pattern: str, out: Path) -> dict:
    """What ``bimdist doctor --devices 3`` (the same measurement as ``pipeline.replicas=auto``) chooses here."""
    cmd = [*bimdist("doctor", pattern), "--devices", "3", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env(), cwd=ROOT,
                          preexec_fn=lambda: os.sched_setaffinity(0, cores_for(2)))
    if not out.exists():
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads(out.read_text())["figures"]["layout"]


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--images", type=int, default=1200, help="ImageNet-shaped JPEGs to make")
    args = parser.parse_args(argv)
    rounds, steps, images = (1, 8, 96) if args.quick else (args.rounds, args.steps, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        tree = make_jpeg_tree(Path(tmp) / "jpeg", images, size=SIZE)
        subprocess.run([sys.executable, "-m", "bimdist", "data", "prepare", "folder", str(tree), "--out",
                        str(Path(tmp) / "shards"), "--shard-size", "100"], check=True, cwd=ROOT,
                       capture_output=True, timeout=1800)
        info = json.loads((Path(tmp) / "shards" / "dataset.json").read_text())
        pattern = str(Path(tmp) / "shards" / info["train"])
        chosen = doctor_layout(pattern, Path(tmp) / "doctor.json")
        results: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
        for _ in range(rounds):  # side by side: each round runs both, so a slow spell hits both alike
            for name, counts in LAYOUTS.items():
                results[name].append(run(pattern, counts, steps))
    med = {name: statistics.median(r["samples_per_s"] for r in rs) for name, rs in results.items()}
    one = results["[1, 1]"]
    a = statistics.median(r["stage_cpu_s_per_sample"][0] for r in one)  # stage 0's CPU seconds per sample
    b = statistics.median(r["stage_cpu_s_per_sample"][1] for r in one)  # stage 1's
    cores = len(cores_for(2))
    bound = cores / (a + b) / med["[1, 1]"]
    ratio = med["[2, 1]"] / med["[1, 1]"]
    record = {"rounds": results, "median_samples_per_s": med, "stage0_cpu_s_per_sample": a,
              "stage1_cpu_s_per_sample": b, "cores": cores, "bound": bound, "ratio": ratio, "steps": steps,
              "images": images, "jpeg_size": SIZE, "model": MODEL, "doctor_layout": chosen}
    rows = [[name, LAYOUTS[name].count(",") + 1 + (1 if name == "[2, 1]" else 0), med[name],
             " / ".join(f"{r['samples_per_s']:.0f}" for r in results[name])] for name in LAYOUTS]
    table = md_table(["replicas", "processes", "samples/s (median)", "per round"], rows)
    table += (f"\n\nA 2-stage pipeline bound by stage 0: 64 px crops of {images} photo-sized JPEGs (about 0.55 MP) "
              f"decoded in full on stage 0's data thread (data.workers=0, data.jpeg_draft=false); 32 wide x 2 layers, "
              f"batch {BATCH}, {steps} steps, one torch thread per process, {cores} cores, median of {rounds} rounds. "
              f"The [1, 1] runs used {1000 * a:.2f} ms of CPU per sample on stage 0 (decoding, compute, transport) "
              f"and {1000 * b:.2f} ms on stage 1: {cores} cores could run {cores / (a + b):.0f} samples/s, "
              f"{bound:.2f}x the [1, 1] rate (the bound); [2, 1] measured {ratio:.2f}x ({ratio / bound:.0%} of "
              f"the bound). `bimdist doctor --devices 3` on this case chose replicas {chosen['counts']} "
              f"(predicting {chosen['samples_per_s']:.0f} samples/s, limited by stage {chosen['slowest_stage']}).\n"
              + "\n".join(c.line() for c in checks(record)))
    write_results("layout", record, table, args, checks=checks)
    return 0


def checks(record: dict) -> list[Check]:
    return [Check("replicas [2, 1] / [1, 1], stage-0-bound, 2 cores", record["ratio"], 1.3),
            Check("... as a share of the two-core bound", record["ratio"] / record["bound"], 0.85)]


if __name__ == "__main__":
    raise SystemExit(main())
