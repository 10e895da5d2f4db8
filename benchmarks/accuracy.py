"""Accuracy on Fashion-MNIST (fmnist-tiny): pretrain BIM and MAE for the same number of epochs, then linear probe
and kNN on the test split at every depth, with a raw-pixel baseline; plus BIM with 4 vs 6 blocks and with
incremental masking on vs off. Sized to fit about an hour on 2 cores (``--epochs``, default 2): the BIM runs use
the 2-stage pipeline (one thread per stage), MAE one process with both threads.

Targets: full-depth BIM linear probe >= MAE - 0.5 point; at a shallow depth (a quarter or half of the layers)
BIM >= truncated MAE + 1 point; full-depth linear probe >= 86%; kNN above raw-pixel kNN.

    python -m benchmarks.accuracy [--epochs 2]
    python -m benchmarks.accuracy --quick      # fmnist-mini shards, a few steps
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, Check, base_parser, md_table, write_results

FMNIST = ROOT / "data" / "fashion-mnist"
MINI = ROOT / "tests" / "assets" / "fmnist-mini"
TRAIN_IMAGES = 60000


def ensure_data() -> None:
    if not (FMNIST / "dataset.json").exists():
        subprocess.run([sys.executable, "-m", "bimdist", "data", "prepare", "fashion-mnist", "--out", str(FMNIST)],
                       check=True, cwd=ROOT, timeout=1800)


def pretrain_and_eval(name: str, overrides: list[str], run_dir: Path, *, train_samples: int, test_samples: int,
                      data: list[str]) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "bimdist", "train", "fmnist-tiny", *data, *overrides, f"--run.dir={run_dir}",
           "--run.recon_png=false", "--checkpoint.keep=1", "--run.log_every=100"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=4 * 3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: {' '.join(cmd)} failed\n{proc.stderr[-3000:]}")
    train_s = time.perf_counter() - t0
    proc = subprocess.run([sys.executable, "-m", "bimdist", "eval", str(run_dir), "--train-samples",
                           str(train_samples), "--test-samples", str(test_samples)], capture_output=True, text=True,
                          cwd=ROOT, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: eval failed\n{proc.stderr[-3000:]}")
    rows = json.loads((run_dir / "eval.json").read_text())["rows"]
    return {"name": name, "overrides": overrides, "train_seconds": train_s,
            "eval_seconds": time.perf_counter() - t0 - train_s, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--blr", type=float, default=1e-3, help="base learning rate for every run")
    parser.add_argument("--eval-train", type=int, default=20000, help="train images for the probes")
    args = parser.parse_args(argv)
    if args.quick:
        data = [f"--data.train_shards={MINI}/train-{{000000..000003}}.tar",
                f"--data.test_shards={MINI}/test-{{000000..000001}}.tar", "--model.depth=4",
                "--model.embed_dim=64", "--model.num_heads=2", "--model.decoder_embed_dim=32"]
        steps, eval_train, eval_test, batch = 4, 256, 128, 32
    else:
        ensure_data()
        data = []
        batch = args.batch
        steps = int(args.epochs * TRAIN_IMAGES / batch)
        eval_train, eval_test = args.eval_train, 10000
    common = [f"--data.batch_size={batch}", f"--run.steps={steps}", f"--optim.blr={args.blr}",
              f"--optim.warmup_steps={max(1, steps // 20)}"]
    depth_blocks = 4
    incremental = "[0.0,0.25,0.5,0.5]"
    runs = {
        "BIM, 4 blocks": [*common, "--pipeline.stages=2"],
        "MAE": [*common, "--method=mae"],
        "BIM, 6 blocks": [*common, "--pipeline.stages=2", "--model.blocks=6"]
        if not args.quick else [*common, "--pipeline.stages=2", "--model.blocks=2"],
        "BIM, 4 blocks + incremental masking": [*common, "--pipeline.stages=2",
                                                f"--masking.extra_drop={incremental}"],
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, over in runs.items():
            results[name] = pretrain_and_eval(name, over, Path(tmp) / name.replace(" ", "_").replace(",", ""),
                                              train_samples=eval_train, test_samples=eval_test, data=data)
    rows = []
    for name, r in results.items():
        for row in r["rows"]:
            rows.append([name, row["name"], row["layers"], row["linear"], row["knn"]])
    table = md_table(["pretraining", "features", "layers", "linear probe %", "kNN %"], rows)
    record = {"epochs": args.epochs, "steps": steps, "batch": batch, "blr": args.blr, "blocks": depth_blocks,
              "runs": results}
    seconds = sum(r["train_seconds"] + r["eval_seconds"] for r in results.values())
    table += (f"\n\n{args.epochs if not args.quick else 'quick'} epochs of pretraining per run "
              f"({steps} steps of {batch}), base lr {args.blr}; probes on {eval_train} train / {eval_test} test "
              f"images; {seconds / 60:.0f} minutes in all.\n" + "\n".join(c.line() for c in checks(record)))
    write_results("accuracy", record, table, args, checks=checks)
    return 0


def checks(record: dict) -> list[Check]:
    """Full-depth BIM: linear probe >= 87% and >= raw pixels + 2, kNN >= raw-pixel kNN, linear >= MAE - 0.5; at the
    shallowest depth BIM >= truncated MAE + 1 (linear)."""
    bim, mae = record["runs"]["BIM, 4 blocks"]["rows"], record["runs"]["MAE"]["rows"]
    raw, full, shallow = bim[0], bim[-1], bim[1]
    return [
        Check("full-depth BIM linear probe %", full["linear"], 87.0),
        Check("full-depth BIM linear probe - raw pixels, points", full["linear"] - raw["linear"], 2.0),
        Check("full-depth BIM kNN - raw-pixel kNN, points", full["knn"] - raw["knn"], 0.0),
        Check("full-depth BIM - MAE linear probe, points", full["linear"] - mae[-1]["linear"], -0.5),
        Check("shallowest BIM - truncated MAE linear probe, points", shallow["linear"] - mae[1]["linear"], 1.0),
    ]


if __name__ == "__main__":
    raise SystemExit(main())
