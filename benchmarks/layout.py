"""A replica count per stage, measured on this machine: a stage-0-bound 2-stage pipeline (ImageNet-shaped JPEG shards
decoded on stage 0's own core, ``data.workers=0``), replicas ``[2, 1]`` (3 processes) against ``[1, 1]`` (2
processes), side by side in one run, one torch thread each, on 2 cores.

``[1, 1]`` runs at stage 0's pace: one sample per ``a`` seconds (its decoding and its blocks). ``[2, 1]`` splits
stage 0's rows over two replicas; but three processes share two cores, so the best it can do is the whole work over
two cores, two samples per ``a + b`` seconds (``b``: stage 1's work per sample). The bound for the ratio is then
``2 max(a, b) / (a + b)``, with ``a`` and ``b`` measured in the ``[1, 1]`` runs (stage 0's step time and stage 1's
compute time per sample).

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

MODEL = ["--model.img_size=128", "--model.patch_size=16", "--model.in_chans=3", "--model.embed_dim=64",
         "--model.depth=2", "--model.blocks=2", "--model.num_heads=2", "--model.decoder_embed_dim=32",
         "--model.decoder_num_heads=2", "--masking.extra_drop=null", "--data.mean=[0.5,0.5,0.5]",
         "--data.std=[0.25,0.25,0.25]", "--data.workers=0", "--data.batch_size=32", "--data.shuffle_buffer=64"]
LAYOUTS = {"[1, 1]": "[1,1]", "[2, 1]": "[2,1]"}


def run(pattern: str, counts: str, steps: int) -> dict:
    """One ``bimdist train`` of the layout on the first 2 cores; its rate is the slowest stage's, a stage's rate
    the sum over its replicas (each takes its rows of every batch)."""
    with tempfile.TemporaryDirectory() as tmp:
        cores = cores_for(2)
        cmd = [sys.executable, "-m", "bimdist", "train", "fmnist-tiny", *MODEL, f"--data.train_shards={pattern}",
               "--data.test_shards=null", "--pipeline.stages=2", f"--pipeline.replicas={counts}",
               "--pipeline.threads=1", f"--run.steps={steps}", f"--run.dir={tmp}", "--run.recon_png=false",
               "--checkpoint.every=0", "--run.log_every=20", "--eval.monitor_every=0"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env(), cwd=ROOT,
                              preexec_fn=lambda: os.sched_setaffinity(0, cores))
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        ranks = [json.loads(p.read_text()) for p in Path(tmp, "ranks").glob("stage*_r*.json")]
    stages: dict[int, list[dict]] = {}
    for r in ranks:
        stages.setdefault(r["stage"], []).append(r)
    rates = {s: sum(r["samples_per_s"] for r in rs) for s, rs in stages.items()}
    batch = 32
    return {"samples_per_s": min(rates.values()), "stage_samples_per_s": rates,
            "stage0_step_s": statistics.median(r["median_step_s"] for r in stages[0]),
            "stage1_compute_s": stages[1][0]["median_compute_s"], "batch": batch,
            "replicas": {s: len(rs) for s, rs in stages.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--images", type=int, default=1200, help="ImageNet-shaped JPEGs to make")
    args = parser.parse_args(argv)
    rounds, steps, images = (1, 8, 96) if args.quick else (args.rounds, args.steps, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        tree = make_jpeg_tree(Path(tmp) / "jpeg", images)
        subprocess.run([sys.executable, "-m", "bimdist", "data", "prepare", "folder", str(tree), "--out",
                        str(Path(tmp) / "shards"), "--shard-size", "100"], check=True, cwd=ROOT,
                       capture_output=True, timeout=1800)
        info = json.loads((Path(tmp) / "shards" / "dataset.json").read_text())
        pattern = str(Path(tmp) / "shards" / info["train"])
        results: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
        for _ in range(rounds):  # side by side: each round runs both, so a slow spell hits both alike
            for name, counts in LAYOUTS.items():
                results[name].append(run(pattern, counts, steps))
    med = {name: statistics.median(r["samples_per_s"] for r in rs) for name, rs in results.items()}
    one = results["[1, 1]"]
    a = statistics.median(r["stage0_step_s"] / r["batch"] for r in one)  # stage 0's seconds per sample
    b = statistics.median(r["stage1_compute_s"] / r["batch"] for r in one)  # stage 1's
    bound = 2 * max(a, b) / (a + b)
    ratio = med["[2, 1]"] / med["[1, 1]"]
    record = {"rounds": results, "median_samples_per_s": med, "stage0_s_per_sample": a,
              "stage1_s_per_sample": b, "bound": bound, "ratio": ratio, "steps": steps, "images": images,
              "model": MODEL}
    rows = [[name, LAYOUTS[name].count(",") + 1 + (1 if name == "[2, 1]" else 0), med[name],
             " / ".join(f"{r['samples_per_s']:.0f}" for r in results[name])] for name in LAYOUTS]
    table = md_table(["replicas", "processes", "samples/s (median)", "per round"], rows)
    table += (f"\n\nA 2-stage pipeline bound by stage 0 (128 px crops of {images} ImageNet-shaped JPEGs decoded on its "
              f"own core, data.workers=0; 64 wide x 2 layers), batch 32, {steps} steps, one torch thread per "
              f"process, 2 cores, median of {rounds} rounds. Stage 0 takes {1000 * a:.2f} ms per sample, stage 1 "
              f"{1000 * b:.2f} ms (the [1, 1] runs), so [2, 1]'s three processes on two cores can at best reach "
              f"2 max(a, b) / (a + b) = {bound:.2f}x; measured {ratio:.2f}x ({ratio / bound:.0%} of the bound).\n"
              + "\n".join(c.line() for c in checks(record)))
    write_results("layout", record, table, args, checks=checks)
    return 0


def checks(record: dict) -> list[Check]:
    return [Check("replicas [2, 1] / [1, 1], stage-0-bound, 2 cores", record["ratio"], 1.3),
            Check("... as a share of the two-core bound", record["ratio"] / record["bound"], 0.85)]


if __name__ == "__main__":
    raise SystemExit(main())
