"""A throttled link between two nodes: samples/s of a 2-stage pipeline against the link-bound prediction, fp32 and
bf16 on the wire. Root only (network namespaces).

Two network namespaces joined through a bridge are the nodes (``tests/integration/netns.py``); ``launch/torchrun/
multi_node.sh`` starts stage 0 on node 0 and stage 1 on node 1 (one rank each, one torch thread), with c10d
rendezvous at node 0's address. A ``tc tbf`` rate on node 0's interface limits what stage 0 sends. First
``python -m bimdist.distributed.probe`` measures that link between the two nodes; then, for each wire dtype,
``bimdist doctor --link-gbps RATE`` (the tbf rate) predicts the rate and what limits it, and the pipeline trains
across the link. Measured: stage 1's samples over the time of its steps, leaving out the first quarter (the
queues and the token bucket's burst fill there). The prediction is the doctor's: a step's message bytes over the
link rate; TCP/IP framing (about 4% of each 1500-byte frame) is not in it.

The model is 384 wide (tokens dominate a message: 13 tokens x 384 values a sample against 784 pixel bytes), two
layers in two blocks, so one stage's compute is a fraction of a message's time on the link.

Targets: measured within 20% of the prediction (each dtype); bf16 at least 1.8x fp32 (both link-bound).

    python -m benchmarks.network [--rate-mbit 12] [--steps 40]
    python -m benchmarks.network --quick       # 12 Mbit/s, 8 steps, the mini shards: what the test suite runs
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.accuracy import ensure_data
from benchmarks.common import ROOT, Check, base_parser, md_table, write_results

MODEL = ["--model.embed_dim=384", "--model.num_heads=6", "--model.depth=2", "--model.blocks=2",
         "--model.decoder_embed_dim=32", "--pipeline.stages=2", "--pipeline.threads=1", "--data.batch_size=128",
         "--run.recon_png=false", "--checkpoint.every=0", "--checkpoint.keep=1", "--eval.monitor_every=0"]
MINI = ROOT / "tests" / "assets" / "fmnist-mini"
QUICK = [f"--data.train_shards={MINI}/train-{{000000..000003}}.tar",
         f"--data.test_shards={MINI}/test-{{000000..000001}}.tar"]


def env_for(extra: dict[str, str]) -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", **extra}


def probe(nodes, port: int, *, mb: float, reps: int) -> dict:
    """``bimdist.distributed.probe`` from node 0 to node 1."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen(nodes.cmd(r, [sys.executable, "-m", "bimdist.distributed.probe", "--rank", str(r),
                                                "--addr", nodes.addresses[0], "--port", str(port), "--mb", str(mb),
                                                "--reps", str(reps), "--json", f"{tmp}/probe{r}.json"]),
                                  cwd=ROOT, env=env_for({}), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for r in (0, 1)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError("the link probe failed:\n" + "\n".join(outs))
        return json.loads(Path(tmp, "probe1.json").read_text())


def doctor(config: list[str], gbps: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "bimdist", "doctor", *config, f"--link-gbps={gbps}", "--json",
                               f"{tmp}/doctor.json"], capture_output=True, text=True, cwd=ROOT, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"bimdist doctor failed:\n{proc.stderr[-3000:]}")
        return json.loads(Path(tmp, "doctor.json").read_text())


def train(nodes, config: list[str], run_dir: Path, port: int) -> dict:
    """The pipeline across the link: stage 0 on node 0, stage 1 on node 1."""
    procs = []
    for i in (0, 1):
        env = env_for({"NNODES": "2", "NPROC_PER_NODE": "1", "RDZV_ENDPOINT": f"{nodes.addresses[0]}:{port}",
                       "RDZV_ID": f"net{port}", "NODE_RANK": str(i), "LOCAL_ADDR": nodes.addresses[i],
                       "MAX_RESTARTS": "0", **({"RDZV_CONF": "is_host=1"} if i == 0 else {})})
        procs.append(nodes.popen(i, ["bash", str(ROOT / "launch" / "torchrun" / "multi_node.sh"), *config,
                                     f"--run.dir={run_dir}"], log=run_dir.parent / f"{run_dir.name}-node{i}.log",
                                 env=env, cwd=ROOT))
    deadline = time.monotonic() + 1800
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(timeout=30)
    if codes != [0, 0]:
        logs = "".join(run_dir.parent.joinpath(f"{run_dir.name}-node{i}.log").read_text()[-2000:] for i in (0, 1))
        raise RuntimeError(f"the two-node run exited {codes}:\n{logs}")
    ranks = {s: json.loads((run_dir / "ranks" / f"stage{s}_r0.json").read_text()) for s in (0, 1)}
    steps = ranks[1]["step_s"]
    steady = steps[len(steps) // 4:]
    batch = int(next(a for a in config if a.startswith("--data.batch_size=")).split("=")[1])
    return {"samples_per_s": batch * len(steady) / sum(steady), "steps_timed": len(steady),
            "median_step_s": sorted(steady)[len(steady) // 2], "stage0_compute_s": ranks[0]["median_compute_s"],
            "stage0_send_wait_fraction": ranks[0]["send_wait_fraction"],
            "stage1_recv_wait_fraction": ranks[1]["recv_wait_fraction"], "bytes_sent": ranks[0]["bytes_sent"]}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rate-mbit", type=float, default=12.0, help="tbf rate of node 0's link, Mbit/s")
    parser.add_argument("--steps", type=int, default=40, help="steps of each run")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests.integration.netns import Nodes, available

    why = available()
    if why is not None:
        print(f"benchmarks.network: {why}", file=sys.stderr)
        return 2
    if not args.quick:
        ensure_data()
    steps = 8 if args.quick else args.steps
    # --quick: fewer steps; the same slow link, so both dtypes stay link-bound on a busy machine (at 32 Mbit/s
    # bf16 measured compute-bound with the suite and a benchmark sharing 2 cores)
    rate = 12.0 if args.quick else args.rate_mbit
    base = ["fmnist-tiny", *MODEL, *(QUICK if args.quick else []), f"--run.steps={steps}", "--run.log_every=4"]
    from bimdist.distributed.launch import free_port

    nodes = Nodes(2).up()
    runs = {}
    try:
        nodes.shape(0, rate_mbit=rate)
        link = probe(nodes, free_port(), mb=1.0 if args.quick else 2.0, reps=4 if args.quick else 8)
        with tempfile.TemporaryDirectory() as tmp:
            for wire in ("fp32", "bf16"):
                config = [*base, f"--pipeline.wire_dtype={wire}"]
                report = doctor(config, rate / 1000)
                measured = train(nodes, config, Path(tmp) / wire, free_port())
                f = report["figures"]
                runs[wire] = {**measured, "predicted_samples_per_s": f["samples_per_s"], "limited_by": f["limited_by"],
                              "message_bytes": f["message_bytes"], "doctor_rates": f["rates"],
                              "error": measured["samples_per_s"] / f["samples_per_s"] - 1,
                              "doctor_link_bound": dict(report["rows"]).get("link-bound")}
    finally:
        nodes.down()
    left = nodes.leftovers()
    if left:
        raise RuntimeError(f"namespaces or links left behind: {left}")
    record = {"rate_mbit": rate, "probe": link, "steps": steps, "config": base, "runs": runs,
              "ratio_bf16_fp32": runs["bf16"]["samples_per_s"] / runs["fp32"]["samples_per_s"]}
    rows = [[wire, f"{r['message_bytes'] / 1e6:.2f}", f"{r['predicted_samples_per_s']:.1f}", r["limited_by"],
             f"{r['samples_per_s']:.1f}", f"{100 * r['error']:+.1f}%", f"{100 * r['stage1_recv_wait_fraction']:.0f}%"]
            for wire, r in runs.items()]
    table = md_table(["wire dtype", "MB a step", "doctor's prediction, samples/s", "doctor says limited by",
                      "measured samples/s", "measured vs predicted", "stage 1 waiting on the link"], rows)
    table += (f"\n\nTwo namespaced nodes, stage 0 on one and stage 1 on the other, node 0's link limited to "
              f"{rate:g} Mbit/s by tc tbf; `python -m bimdist.distributed.probe` measured "
              f"{1000 * link['gbps']:.1f} Mbit/s through it ({link['message_mb']:.0f} MB messages). bf16 / fp32 "
              f"measured: {record['ratio_bf16_fp32']:.2f}x. {steps} steps each, stage 1's rate over the last "
              f"{runs['fp32']['steps_timed']}.\n" + "\n".join(c.line() for c in checks(record)))
    write_results("network", record, table, args, checks=checks)
    return 0


def checks(record: dict) -> list[Check]:
    out = [Check(f"{wire}: measured vs the link-bound prediction, absolute error", abs(r["error"]), 0.20, at_most=True,
                 note=f"(doctor: limited by {r['limited_by']})") for wire, r in record["runs"].items()]
    out.append(Check("bf16 / fp32 samples/s on the throttled link", record["ratio_bf16_fp32"], 1.8))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
