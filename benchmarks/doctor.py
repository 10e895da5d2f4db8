"""``bimdist doctor``'s prediction beside a measured pipeline on this machine: the doctor for fmnist-tiny as a
2-stage pipeline, then that pipeline trained for real, one run after the other. Target: the prediction within 25%
of the measured rate (the slowest stage's samples over the time of its steps, as the throughput benchmark counts).

    python -m benchmarks.doctor [--steps 60]
    python -m benchmarks.doctor --quick
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.accuracy import ensure_data
from benchmarks.common import ROOT, Check, base_parser, md_table, write_results

QUICK = [f"--data.train_shards={ROOT}/tests/assets/fmnist-mini/train-{{000000..000003}}.tar",
         f"--data.test_shards={ROOT}/tests/assets/fmnist-mini/test-{{000000..000001}}.tar", "--model.depth=4",
         "--model.embed_dim=64", "--model.num_heads=2", "--model.decoder_embed_dim=32", "--data.batch_size=32"]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "bimdist", *cmd], capture_output=True, text=True, cwd=ROOT,
                          timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"bimdist {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="steps of the measured pipeline run")
    args = parser.parse_args(argv)
    over = QUICK if args.quick else []
    if not args.quick:
        ensure_data()
    steps = 6 if args.quick else args.steps
    config = ["fmnist-tiny", *over, "--pipeline.stages=2"]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run(["doctor", *config, "--json", f"{tmp}/doctor.json"])
        doctor_s = time.perf_counter() - t0
        report = json.loads(Path(tmp, "doctor.json").read_text())
        run(["train", *config, f"--run.steps={steps}", f"--run.dir={tmp}/run", "--run.recon_png=false",
             "--checkpoint.keep=1"])
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp, "run", "ranks").glob("stage*_r0.json"))]
    figures = report["figures"]
    measured = min(r["samples_per_s"] for r in ranks)
    predicted = figures["samples_per_s"]
    record = {"config": config, "steps": steps, "doctor": report, "doctor_seconds": doctor_s,
              "measured_samples_per_s": measured, "predicted_samples_per_s": predicted,
              "stage_samples_per_s": {r["stage"]: r["samples_per_s"] for r in ranks}, "error": measured / predicted - 1}
    rows = [[check, result] for check, result in report["rows"]]
    table = md_table(["doctor's check", "result"], rows)
    table += (f"\n\nThe doctor ({doctor_s:.0f} s) predicted {predicted:.1f} samples/s, limited by "
              f"{figures['limited_by']}; the same config trained for {steps} steps right after it measured "
              f"{measured:.1f} ({100 * record['error']:+.1f}%).\n" + "\n".join(c.line() for c in checks(record)))
    write_results("doctor", record, table, args, checks=checks)
    return 0


def checks(record: dict) -> list[Check]:
    return [Check("doctor's predicted rate vs a measured 2-stage run, absolute error", abs(record["error"]), 0.25,
                  at_most=True)]


if __name__ == "__main__":
    raise SystemExit(main())
