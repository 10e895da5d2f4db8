"""Fine-tuning accuracy on Fashion-MNIST, MAE's protocol: BIM pretrained by the pipeline, end-to-end MAE pretrained
for the same steps, and the same network from scratch, each fine-tuned with one recipe (the fmnist-tiny preset's
``finetune`` section) at full depth and at the shallowest depth (MAE truncated there), on all the labels and on a
10% class-balanced subset (the same images for every arm and seed), with several fine-tuning seeds.

The model is the demo's, 128 wide x 4 layers in 4 blocks: pretrained for 1013 steps of 256, which is the accuracy
benchmark's pretraining compute (two epochs of the 192 x 12 preset) in BIM's FLOPs. MAE gets the same steps (fewer
FLOPs: one decoder instead of four). Each arm's figure is the mean and standard deviation over the seeds; a gap
smaller than twice the pooled standard deviation is reported as noise.

Targets: BIM full depth >= MAE full depth - 0.3 points (all labels and 10%); BIM full depth >= from scratch + 2.0
points (all labels) and + 10 (10%); BIM full depth on all labels >= 90.0% top-1; BIM shallowest >= MAE truncated to
the same depth (all labels).

    python -m benchmarks.finetune [--seeds 3] [--jobs 1]
    python -m benchmarks.finetune --seeds 2 --first-seed 1 --merge benchmarks/results/finetune_....json
    python -m benchmarks.finetune --quick

``--merge`` adds seeds to an earlier result: it pretrains again, reruns the earlier file's cheapest BIM and MAE runs,
and merges only if both give the recorded top-1 and top-5 exactly (the pretraining and fine-tuning are deterministic
on one machine, so the merged runs share their pretrained weights); otherwise it writes this run's seeds alone and
exits 1.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from pathlib import Path

from benchmarks.accuracy import ensure_data
from benchmarks.common import ROOT, Check, base_parser, md_table, train_flops_per_sample, write_results
from bimdist.config import load_config

MODEL = ["--model.embed_dim=128", "--model.num_heads=2", "--model.depth=4"]
STEPS = 1013  # 2 epochs of the 192 x 12 preset (468 steps) in BIM's FLOPs at 128 x 4 (benchmarks.common)
MINI = ROOT / "tests" / "assets" / "fmnist-mini"
QUICK = [f"--data.train_shards={MINI}/train-{{000000..000003}}.tar",
         f"--data.test_shards={MINI}/test-{{000000..000001}}.tar", "--model.embed_dim=32", "--model.num_heads=2",
         "--model.depth=4", "--model.decoder_embed_dim=16", "--data.batch_size=32"]
ARMS = {"BIM": "bim", "MAE": "mae", "from scratch": "bim"}  # arm -> the pretraining run it uses


def run(cmd: list[str], *, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "bimdist", *cmd], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"bimdist {' '.join(cmd)} failed\n{proc.stderr[-3000:]}")
    return proc


def pretrain(method: str, run_dir: Path, base: list[str], steps: int) -> float:
    t0 = time.perf_counter()
    extra = ["--pipeline.stages=2", "--pipeline.threads=1"] if method == "bim" else [
        "--method=mae", "--masking.extra_drop=null"]
    run(["train", "fmnist-tiny", *base, *extra, f"--run.steps={steps}", f"--run.dir={run_dir}",
         "--run.recon_png=false", "--checkpoint.keep=1", "--run.log_every=100"], timeout=4 * 3600)
    return time.perf_counter() - t0


def finetune(arm: str, run_dir: Path, out: Path, *, depth: int, labels: float, seed: int, epochs: float,
             extra: list[str]) -> dict:
    t0 = time.perf_counter()
    run(["finetune", str(run_dir), "--depth", str(depth), f"--finetune.labels={labels}", f"--finetune.seed={seed}",
         f"--finetune.epochs={epochs}", f"--finetune.init={'scratch' if arm == 'from scratch' else 'pretrained'}",
         f"--finetune.dir={out}", *extra], timeout=6 * 3600)
    result = json.loads((out / "result.json").read_text())
    return {"arm": arm, "depth": depth, "labels": labels, "seed": seed, "top1": result["top1"],
            "top5": result["top5"], "epochs": result["epochs"], "steps": result["steps"],
            "train_labels": result["train_labels"], "train_labels_sha256": result["train_labels_sha256"],
            "seconds": time.perf_counter() - t0, "history": result["history"]}


def row(run: dict) -> tuple[str, int, float]:
    """The table row a run belongs to: (arm, depth, labels)."""
    return run["arm"], run["depth"], run["labels"]


def summary(runs: list[dict], arm: str, depth: int, labels: float) -> tuple[float, float, list[float]]:
    values = [r["top1"] for r in runs if row(r) == (arm, depth, labels)]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, values


def gap(record: dict, a: tuple[str, int, float], b: tuple[str, int, float]) -> tuple[float, float]:
    """Mean of ``a`` minus mean of ``b``, and the pooled standard deviation of the two (of the one with several
    seeds where the other has one: its spread stands for both); the spread is NaN when both have one seed."""
    ma, sa, va = summary(record["runs"], *a)
    mb, sb, vb = summary(record["runs"], *b)
    sds = [sd for sd, values in ((sa, va), (sb, vb)) if len(values) > 1]
    return ma - mb, (sum(sd * sd for sd in sds) / len(sds)) ** 0.5 if sds else math.nan


def spread(sd: float) -> str:
    return "one seed each: spread unknown" if math.isnan(sd) else f"pooled sd {sd:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per arm")
    parser.add_argument("--jobs", type=int, default=1, help="fine-tuning runs at once (1: each has the machine)")
    parser.add_argument("--steps", type=int, default=STEPS, help="pretraining steps of both methods")
    parser.add_argument("--first-seed", type=int, default=0, help="the first fine-tuning seed")
    parser.add_argument("--merge", type=Path, help="an earlier result JSON of this script to add these seeds to")
    parser.add_argument("--rows", help="only these rows, ARM/DEPTH/LABELS comma-separated (e.g. BIM/4/1,MAE/4/0.1)")
    parser.add_argument("--pretrained", type=Path, help="with --merge: reuse the pretraining runs DIR/bim and DIR/mae "
                        "(the reproduced runs check that they are the merged file's)")
    parser.add_argument("--render", type=Path, help="rewrite the table, README block and checks from a result JSON")
    args = parser.parse_args(argv)
    if args.render:
        record = json.loads(args.render.read_text())
        record.pop("checks", None)
        write_results("finetune", record, table(record), args, checks=checks)
        return 0
    if args.quick:
        base, steps, depths, fractions = QUICK, 6, (4, 1), (1.0, 0.5)
        seeds = range(args.first_seed, args.first_seed + 1)
        tune = {1.0: 1.0, 0.5: 1.0}
        extra = ["--finetune.batch_size=32", "--finetune.eval_samples=64"]
    else:
        ensure_data()
        base, steps, depths, fractions = MODEL, args.steps, (4, 1), (1.0, 0.1)
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        preset = load_config("fmnist-tiny", MODEL)
        tune = {1.0: preset.finetune.epochs, 0.1: preset.finetune.epochs * 4}
        extra = ["--pipeline.threads=1"] if args.jobs > 1 else []  # side by side: a core each
    cfg = load_config("fmnist-tiny", [*base, "--pipeline.stages=2"])
    flops = {"bim": sum(train_flops_per_sample(cfg)),
             "mae": sum(train_flops_per_sample(load_config("fmnist-tiny", [*base, "--method=mae",
                                                                          "--masking.extra_drop=null"])))}
    t_start = time.perf_counter()
    record = {"pretrain_steps": steps, "batch": cfg.data.batch_size, "pretrain_flops_per_sample": flops,
              "model": "128 wide x 4 layers, 4 blocks" if not args.quick else "32 wide x 4 layers (quick)",
              "epochs": tune, "recipe": load_config("fmnist-tiny", base).finetune.model_dump(mode="json"),
              "depths": list(depths), "fractions": list(fractions)}
    if args.pretrained and not args.merge:
        raise SystemExit("error: --pretrained needs --merge (the merge's rerun checks that the runs are its own)")
    rows = set(product(ARMS, depths, fractions))
    if args.rows:
        rows = {(a, int(d), float(f)) for a, d, f in (r.split("/") for r in args.rows.split(","))}
        unknown = rows - set(product(ARMS, depths, fractions))
        if unknown:
            raise SystemExit(f"error: --rows {sorted(unknown)} not among {sorted(product(ARMS, depths, fractions))}")
    earlier = merge_source(args.merge, record, seeds, rows) if args.merge else None
    again = [min((r for r in earlier["runs"] if r["arm"] == arm), key=lambda r: r["seconds"]) for arm in
             ("BIM", "MAE")] if earlier else []
    with tempfile.TemporaryDirectory() as tmp:
        if args.pretrained:
            runs_dir = {m: args.pretrained / m for m in ("bim", "mae")}
            seconds = earlier["pretrain_seconds"]
        else:
            runs_dir = {m: Path(tmp) / m for m in ("bim", "mae")}
            seconds = {m: pretrain(m, runs_dir[m], base, steps) for m in ("bim", "mae")}
        jobs = [(*row(r), r["seed"]) for r in again]
        jobs += [(arm, depth, labels, seed) for arm, depth, labels, seed in product(ARMS, depths, fractions, seeds)
                 if (arm, depth, labels) in rows]
        cost = {job: tune[job[2]] * job[2] * (job[1] + 1) for job in jobs[len(again):]}  # longest first: 2 at a time
        jobs[len(again):] = sorted(jobs[len(again):], key=lambda job: -cost[job])

        def one(job: tuple[str, int, float, int]) -> dict:
            arm, depth, labels, seed = job
            out = Path(tmp) / "ft" / f"{arm.replace(' ', '-')}-d{depth}-l{labels:g}-s{seed}-{jobs.index(job)}"
            return finetune(arm, runs_dir[ARMS[arm]], out, depth=depth, labels=labels, seed=seed,
                            epochs=tune[labels], extra=extra)

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(one, jobs))
    reruns, results = results[:len(again)], results[len(again):]
    record.update({"pretrain_seconds": seconds, "jobs": args.jobs, "runs": results,
                   "minutes": (time.perf_counter() - t_start) / 60})
    if earlier:
        same = [(r["top1"], r["top5"]) == (e["top1"], e["top5"]) for r, e in zip(reruns, again)]
        merge = {"file": str(args.merge), "git": earlier.get("git"), "date": earlier.get("date"),
                 "command": earlier.get("command"),
                 "reproduced": [{"arm": e["arm"], "depth": e["depth"], "labels": e["labels"], "seed": e["seed"],
                                 "recorded": [e["top1"], e["top5"]], "rerun": [r["top1"], r["top5"]]}
                                for r, e in zip(reruns, again)]}
        record["merges"] = merges(earlier) + [merge]  # every pass's provenance, oldest first
        if not all(same):
            merge["refused"] = True
            args.no_readme = True
            write_results("finetune-unmerged", record, "merge refused: the earlier runs did not reproduce\n", args)
            print(f"error: --merge {args.merge}: rerunning its runs gave other figures "
                  f"({merge['reproduced']}); this run's seeds are written alone, unmerged", file=sys.stderr)
            return 1
        record["runs"] = earlier["runs"] + results
        record["minutes"] += earlier["minutes"]
        record["jobs"] = passes(earlier) + [args.jobs]
    record["seeds"] = len({r["seed"] for r in record["runs"]})
    write_results("finetune", record, table(record), args, checks=checks)
    return 0


def merges(record: dict) -> list[dict]:
    """The merges a result file went through (files of before 2026-12-03 kept only the last one, as ``merge``)."""
    return record.get("merges", [record["merge"]] if "merge" in record else [])


def passes(record: dict) -> list[int]:
    """Runs at a time in each pass that made ``record`` (a number: one pass; older merged files: a sentence)."""
    jobs = record["jobs"]
    return jobs if isinstance(jobs, list) else [int(n) for n in re.findall(r"\d+", str(jobs))]


def jobs_text(record: dict) -> str:
    counts = passes(record)
    return str(counts[0]) if len(set(counts)) == 1 else f"{', '.join(map(str, counts))} (by pass)"


def table(record: dict) -> str:
    """The markdown table and its lines, from a record (as built, or as read back from its JSON file)."""
    results, depths, fractions = record["runs"], record["depths"], record["fractions"]
    tune = {float(k): v for k, v in record["epochs"].items()}
    seconds, flops, steps = record["pretrain_seconds"], record["pretrain_flops_per_sample"], record["pretrain_steps"]
    rows = []
    for arm, depth, labels in product(ARMS, depths, fractions):
        mean, std, values = summary(results, arm, depth, labels)
        minutes = statistics.mean(r["seconds"] for r in results if row(r) ==
                                  (arm, depth, labels)) / 60
        rows.append([arm, depth, f"{100 * labels:g}%", f"{mean:.2f} ± {std:.2f}", " / ".join(f"{v:.2f}" for v in
                                                                                               values),
                     f"{minutes:.1f}"])
    out = md_table(["pretraining", "blocks kept", "labels", "top-1 % (mean ± sd)", "per seed", "min per run"], rows)
    shas = {r["train_labels_sha256"] for r in results if r["labels"] == fractions[-1]}
    subset = "one subset for every run" if len(shas) == 1 else "THE SUBSETS DIFFER"
    full = max(depths)
    return out + (f"\n\n{record['model']}; pretraining {steps} steps of {record['batch']} "
                  f"(BIM {seconds['bim'] / 60:.0f} min as the 2-stage pipeline, {flops['bim'] / 1e6:.0f} MFLOP per "
                  f"sample; MAE {seconds['mae'] / 60:.0f} min in one process, {flops['mae'] / 1e6:.0f} MFLOP). "
                  f"Fine-tuning: the fmnist-tiny recipe, {tune[fractions[0]]:g} epochs on all labels and "
                  f"{tune[fractions[-1]]:g} on {100 * fractions[-1]:g}% ({subset}), "
                  f"{seed_text(results)}, {jobs_text(record)} run(s) at a time on {cfg_cores()} cores; "
                  f"{record['minutes']:.0f} minutes in all. Gaps: "
                  + "; ".join(gap_line(record, a, b) for a, b in comparisons(full, min(depths), fractions)) + ".\n"
                  + "\n".join(c.line() for c in checks(record)))


def merge_source(path: Path, record: dict, seeds: range, rows: set[tuple[str, int, float]]) -> dict:
    """The earlier result to add ``seeds`` of ``rows`` to, if it was made with the same settings and has none of
    those runs (else an error naming the difference)."""
    earlier = json.loads(path.read_text())
    now = json.loads(json.dumps(record))  # the keys as the JSON file has them
    for key in ("pretrain_steps", "batch", "model", "epochs", "recipe", "depths", "fractions"):
        if earlier.get(key) != now[key]:
            raise SystemExit(f"error: --merge {path}: its {key} is {earlier.get(key)!r}, this run's {now[key]!r}; "
                             "merge only results made with the same settings")
    clash = sorted({(*row(r), r["seed"]) for r in earlier["runs"] if row(r) in rows and r["seed"] in seeds})
    if clash:
        raise SystemExit(f"error: --merge {path} already has run(s) {clash} (arm, depth, labels, seed): pass "
                         "--first-seed past them or --rows without them")
    return earlier


def seed_text(runs: list[dict]) -> str:
    groups: dict[int, list[str]] = {}
    for (a, d, f), n in Counter(row(r) for r in runs).items():
        groups.setdefault(n, []).append(f"{a} {blocks(d)} {100 * f:g}%")
    if len(groups) == 1:
        return f"{next(iter(groups))} seed(s) per row"
    return "; ".join(f"{n} seed(s) for {', '.join(rows)}" for n, rows in sorted(groups.items(), reverse=True))


def cfg_cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def comparisons(full: int, shallow: int, fractions: list[float] | tuple[float, ...]) -> list[tuple[tuple, tuple]]:
    out = []
    for labels in fractions:
        out += [(("BIM", full, labels), ("MAE", full, labels)), (("BIM", full, labels), ("from scratch", full, labels))]
    out += [(("BIM", shallow, labels), ("MAE", shallow, labels)) for labels in fractions]
    return out


def blocks(n: int) -> str:
    return f"{n} block" + ("s" if n != 1 else "")


def gap_line(record: dict, a: tuple, b: tuple) -> str:
    g, sd = gap(record, a, b)
    noise = " (within 2 sd: noise)" if abs(g) < 2 * sd else ""
    return f"{a[0]} - {b[0]} at {blocks(a[1])}, {100 * a[2]:g}% labels: {g:+.2f} points, {spread(sd)}{noise}"


def checks(record: dict) -> list[Check]:
    depths, fractions = record["depths"], record["fractions"]
    full, shallow, few = max(depths), min(depths), fractions[-1]
    bim_all, _, _ = summary(record["runs"], "BIM", full, fractions[0])
    out = []
    for labels, scratch_gap in ((fractions[0], 2.0), (few, 10.0)):
        share = f"{100 * labels:g}%"
        g, sd = gap(record, ("BIM", full, labels), ("MAE", full, labels))
        out.append(Check(f"full depth, {share}: BIM - MAE, points", g, -0.3, note=f"({spread(sd)})"))
        g, sd = gap(record, ("BIM", full, labels), ("from scratch", full, labels))
        out.append(Check(f"full depth, {share}: BIM - from scratch, points", g, scratch_gap,
                         note=f"({spread(sd)})"))
    out.append(Check("full depth, all labels: BIM top-1 %", bim_all, 90.0))
    for labels in fractions:
        g, sd = gap(record, ("BIM", shallow, labels), ("MAE", shallow, labels))
        out.append(Check(f"{blocks(shallow)}, {100 * labels:g}%: BIM - truncated MAE, points", g, 0.0,
                         note=f"({spread(sd)})"))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
