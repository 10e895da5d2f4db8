"""Scaling on paper: predict BIM pipeline throughput for ViT-B/L/H on P GPUs with a given link bandwidth, from
per-stage costs and message sizes, and say where communication becomes the bottleneck. The same model, fed the
CPU's measured per-stage step times and the measured gloo loopback bandwidth, is checked against the measured
CPU pipeline throughput from ``benchmarks.throughput``.

The model: stages run concurrently and sends overlap compute (a stage never waits on its own send unless the
link is slower than the stage), so one replica processes ``1 / max(max_k t_k, max_k m_k / B)`` samples/s, where
``t_k`` is stage k's compute time per sample (its FLOPs over peak x MFU) and ``m_k`` the bytes it sends per
sample (visible tokens at the wire dtype, the int16 masking order, uint8 pixels). R replicas multiply that, minus
each stage's gradient all-reduce (ring: 2 (R-1)/R x gradient bytes per step over the data-parallel link).

    python -m benchmarks.model [--mfu 0.4] [--peak-tflops 989]
    python -m benchmarks.model --quick
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import RESULTS, Check, base_parser, md_table, newest_result, write_results
from bimdist.config import Config, load_config, visible_counts
from bimdist.distributed.launch import free_port
from bimdist.model.unit import BlockUnit

MODELS = {
    "ViT-B/16": ("vit-base-16", []),
    "ViT-L/16": ("vit-large-16", []),
    "ViT-H/14": ("vit-large-16", ["--model.patch_size=14", "--model.embed_dim=1280", "--model.depth=32",
                                  "--model.num_heads=16"]),
}
LINKS_GBPS = {"NVLink (H100, 450 GB/s)": 450.0, "PCIe 5 x16 (50 GB/s)": 50.0, "InfiniBand 200 Gb/s (25 GB/s)": 25.0,
              "Ethernet 25 Gb/s (3.1 GB/s)": 3.125}
WIRE_BYTES = {"bf16": 2, "fp32": 4}


def stage_costs(cfg: Config, *, wire: str = "bf16") -> list[dict]:
    """Per block (= stage): training FLOPs per sample (meta device, no compute), sent bytes, parameters."""
    m = cfg.model
    drops = cfg.masking.extra_drop or [0.0] * m.blocks
    visible = visible_counts(m.num_patches, cfg.masking.mask_ratio, drops)
    out, n = [], 2
    with torch.device("meta"):
        images = torch.zeros(n, m.in_chans, m.img_size, m.img_size, dtype=torch.uint8)
        ids = torch.argsort(torch.rand(n, m.num_patches), 1)
        tokens = None
        for k in range(m.blocks):
            unit = BlockUnit(cfg, k)
            with FlopCounterMode(display=False) as fc:
                res = unit(images, ids, tokens)
                res.loss.backward()
            tokens = res.tokens
            nxt = visible[k + 1] if k + 1 < m.blocks else 0
            sent = 0 if k + 1 == m.blocks else ((1 + nxt) * m.embed_dim * WIRE_BYTES[wire] + m.num_patches * 2
                                               + m.in_chans * m.img_size**2)
            out.append({"flop": fc.get_total_flops() / n, "bytes_sent": sent,
                        "params": sum(p.numel() for p in unit.parameters())})
    return out


def predict(costs: list[dict], *, flop_per_s: float, link_bytes_per_s: float, replicas: int = 1,
            dp_bytes_per_s: float | None = None, batch_per_replica: int = 256, grad_bytes: int = 2,
            data_samples_per_s: float | None = None, stage_s_per_sample: list[float] | None = None) -> dict:
    """``data_samples_per_s``: how fast one replica's stage 0 builds batches (None: the data path is free);
    ``stage_s_per_sample``: measured compute time per sample of each stage, instead of FLOPs / (peak x MFU)."""
    t_compute = stage_s_per_sample or [c["flop"] / flop_per_s for c in costs]
    t_comm = [c["bytes_sent"] / link_bytes_per_s for c in costs]
    t_data = 1 / data_samples_per_s if data_samples_per_s else 0.0
    t_dp = [0.0] * len(costs)
    if replicas > 1:
        bw = dp_bytes_per_s or link_bytes_per_s
        t_dp = [2 * (replicas - 1) / replicas * c["params"] * grad_bytes / bw / batch_per_replica for c in costs]
    per_stage = [tc + td for tc, td in zip(t_compute, t_dp)]
    bottleneck = max(max(per_stage), max(t_comm), t_data)
    slow = max(range(len(costs)), key=lambda i: per_stage[i])
    if t_data > max(max(per_stage), max(t_comm)):
        limit = "data"
    elif max(t_comm) > max(per_stage):
        limit = "activation link"
    elif t_dp[slow] > t_compute[slow]:
        limit = "gradient all-reduce"
    else:
        limit = "compute"
    # the bandwidth below which sending a stage's activations takes longer than computing them
    needed = max(c["bytes_sent"] / t for c, t in zip(costs, t_compute) if t > 0)
    return {"samples_per_s": replicas / bottleneck, "limited_by": limit, "link_needed_bytes_per_s": needed}


def measured_rows(costs: list[dict], batch: int) -> tuple[str, list[dict]]:
    """ViT-B/16 again, from the per-stage step times ``benchmarks.stages`` measured on a GPU (bf16, batch 256)
    instead of the MFU assumption."""
    found = newest_result("stages")
    if found is None or not found[1].get("device", "").startswith("cuda"):
        return ("\n\nNo GPU has run `benchmarks.stages` yet: the predictions above assume the MFU; tests/gpu/run.sh "
                "measures the stage times on the first GPU it gets."), []
    _, stages = found
    card, per_sample = stages["machine"].get("gpu", "GPU"), [s["step_s"] / stages["batch"] for s in stages["stages"]]
    points, rows = [], []
    for link, gbps in LINKS_GBPS.items():
        for replicas in (1, 2, 8):
            p = predict(costs, flop_per_s=1.0, link_bytes_per_s=gbps * 1e9, replicas=replicas,
                        dp_bytes_per_s=gbps * 1e9, batch_per_replica=batch, stage_s_per_sample=per_sample)
            points.append({"link": link, "replicas": replicas, **p})
            rows.append([f"4 x {replicas} = {4 * replicas}", link, p["samples_per_s"], p["limited_by"]])
    mfu = ", ".join(f"{100 * s['mfu']:.0f}%" for s in stages["stages"] if s.get("mfu"))
    note = (f"\n\nFrom measured stage times: ViT-B/16 stages timed on {card} ({stages['date'][:10]}, bf16, batch "
            f"{stages['batch']}; MFU per stage {mfu or 'n/a'}), in place of the MFU assumption.\n\n")
    return note + md_table(["GPUs (stages x replicas)", "link", "predicted samples/s", "limited by"], rows), points


# CPU cores per GPU of common 8-GPU nodes (physical cores, as the data benchmark counts them)
NODES = {"DGX H100: 2 x 56 cores, 8 GPUs": 14, "AWS p5.48xlarge: 96 cores, 8 GPUs": 12}


def data_rows(costs: list[dict], flop_per_s: float, batch: int) -> tuple[str, list[dict]]:
    """ViT-B/16 on 4 stages over NVLink again, now with stage 0's data path measured by ``benchmarks.data``: its
    samples per CPU-second times the cores a stage-0 rank gets on common nodes, or the measured GPU decode rate."""
    found = newest_result("data")
    if found is None:
        return "\n\nNo `benchmarks.data` result yet: the data path is left out.", []
    _, data = found
    per_core, med = data["samples_per_cpu_s"], data["median_samples_per_s"]
    link = LINKS_GBPS["NVLink (H100, 450 GB/s)"] * 1e9
    points, rows = [], []
    for node, cores in NODES.items():
        for path, label in (("w2", "CPU decode, plain shards"), ("w0-max256", "CPU decode, --max-size 256 shards")):
            for owner, n in ((f"its GPU's {cores} cores", cores - 1), (f"4 GPUs' {4 * cores} cores", 4 * cores - 4)):
                rate = per_core[path] * n  # one core left to the rank itself (and to each other stage)
                p = predict(costs, flop_per_s=flop_per_s, link_bytes_per_s=link, batch_per_replica=batch,
                            data_samples_per_s=rate)
                points.append({"node": node, "path": path, "stage0_cores": n, "data_samples_per_s": rate, **p})
                rows.append([node, f"{label}; stage 0 uses {owner}", rate, p["samples_per_s"], p["limited_by"]])
    if "gpu" in med:
        p = predict(costs, flop_per_s=flop_per_s, link_bytes_per_s=link, batch_per_replica=batch,
                    data_samples_per_s=med["gpu"])
        points.append({"node": "measured card", "path": "gpu", "data_samples_per_s": med["gpu"], **p})
        rows.append([data["machine"].get("gpu", "GPU"), "GPU decode (nvJPEG), measured", med["gpu"],
                     p["samples_per_s"], p["limited_by"]])
    else:
        rows.append(["any", "GPU decode (nvJPEG): not measured yet (no GPU has run benchmarks.data)", "n/a", "n/a",
                     "n/a"])
    table = md_table(["node", "stage 0's data path", "data samples/s", "predicted samples/s", "limited by"], rows)
    note = (f"\n\nWith the data path: ViT-B/16, 4 stages x 1 replica, NVLink, same compute assumptions. Data rates are "
            f"`benchmarks.data`'s samples per CPU-second ({data['machine'].get('cpu', '?')}, {data['date'][:10]}: "
            f"{per_core['w2']:.0f} on plain shards with 2 workers, {per_core['w0-max256']:.0f} on --max-size 256 "
            "shards) times the cores a stage-0 rank gets: one GPU's share of the node, or the share of all four "
            "stages' GPUs (the other stages need about one core each). Cores per GPU as the vendors list them.\n\n")
    return note + table, points


def layout_rows(gpu_rate: float, *, batch: int = 4096) -> tuple[str, list[dict]]:
    """Equal replica counts against the counts ``bimdist.distributed.placement`` chooses, for ViT-B/16 and ViT-L/16 on
    8, 16 and 64 GPUs (4 stages), with stage 0 decoding on its GPU's share of a DGX H100's cores at the rate
    ``benchmarks.data`` measured per core, and with incremental masking (cheaper deeper stages). A stage with R
    replicas does the global batch in t B / R plus its gradient all-reduce (NVLink inside a node, InfiniBand
    across nodes)."""
    from bimdist.distributed.placement import best_counts

    found = newest_result("data")
    per_core = found[1]["samples_per_cpu_s"]["w2"] if found else None
    cores = NODES["DGX H100: 2 x 56 cores, 8 GPUs"] - 1  # one core left to the rank itself
    variants = {"preset, CPU decode": [], "incremental masking [0, 0.25, 0.5, 0.75], CPU decode":
                ["--masking.extra_drop=[0,0.25,0.5,0.75]"]}
    rows, points = [], []
    for name in ("ViT-B/16", "ViT-L/16"):
        preset, over = MODELS[name]
        for variant, extra in variants.items():
            costs = stage_costs(load_config(preset, [*over, *extra, "--run.precision=fp32"]))
            t = [c["flop"] / gpu_rate for c in costs]
            data = 1 / (per_core * cores) if per_core else 0.0
            for gpus in (8, 16, 64):
                bw = (LINKS_GBPS["NVLink (H100, 450 GB/s)"] if gpus <= 8 else
                      LINKS_GBPS["InfiniBand 200 Gb/s (25 GB/s)"]) * 1e9

                def stage_rate(k: int, r: int, t=t, costs=costs, bw=bw, data=data) -> float:
                    step = max(t[k], data if k == 0 else 0.0) * batch / r
                    step += 2 * (r - 1) / r * costs[k]["params"] * 2 / bw  # bf16 gradients, ring all-reduce
                    return batch / step

                equal = (gpus // 4,) * 4
                chosen = best_counts(4, gpus, batch, stage_rate)
                r_eq = min(stage_rate(k, r) for k, r in enumerate(equal))
                r_ch = min(stage_rate(k, r) for k, r in enumerate(chosen))
                slow = min(range(4), key=lambda k: stage_rate(k, chosen[k]))
                points.append({"model": name, "variant": variant, "gpus": gpus, "equal": list(equal),
                               "equal_samples_per_s": r_eq, "chosen": list(chosen), "chosen_samples_per_s": r_ch,
                               "slowest_stage": slow})
                rows.append([name, variant, gpus, f"{list(equal)}: {r_eq:,.0f}", f"{list(chosen)}: {r_ch:,.0f}",
                             f"{r_ch / r_eq:.2f}x"])
    table = md_table(["model", "variant", "GPUs", "equal counts: samples/s", "chosen counts: samples/s", "gain"],
                     rows)
    note = ("\n\nA replica count per stage (`pipeline.replicas` as a list, chosen by `pipeline.replicas=auto` or "
            "`bimdist doctor --devices N` from measured costs; here from FLOPs at the MFU above): global batch "
            f"{batch}, 4 stages, each count a divisor of the batch; stage 0 decodes on its GPU's share of a DGX "
            "H100's cores at "
            + (f"{per_core:.0f} samples per CPU-second (`benchmarks.data`, plain shards)" if per_core else
               "no measured rate (no `benchmarks.data` result)") + ".\n\n")
    return note + table, points


def _bandwidth_worker(rank: int, port: int, nbytes: int, reps: int, out: mp.SimpleQueue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    for i in range(reps + 2):
        if i == 2:
            t0 = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
        else:
            dist.recv(buf, 0)
    if rank == 1:
        out.put(reps * nbytes / (time.perf_counter() - t0))
    dist.destroy_process_group()


def gloo_bandwidth(nbytes: int, reps: int = 20) -> float:
    """Bytes/s of gloo point-to-point between two local processes, at the pipeline's message size."""
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_bandwidth_worker, args=(r, port, nbytes, reps, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    return q.get()


def latest_throughput(variant: str = "preset") -> dict | None:
    files = sorted(RESULTS.glob(f"throughput-{variant}_*[0-9].json"))
    return json.loads(files[-1].read_text()) if files else None


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation on the GPU")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak (H100: 989)")
    parser.add_argument("--batch", type=int, default=256, help="samples per replica per step")
    args = parser.parse_args(argv)
    models = {"ViT-B/16": MODELS["ViT-B/16"]} if args.quick else MODELS
    gpu_rate = args.peak_tflops * 1e12 * args.mfu
    rows, record = [], {"mfu": args.mfu, "peak_tflops": args.peak_tflops, "predictions": {}}
    for name, (preset, over) in models.items():
        cfg = load_config(preset, [*over, "--run.precision=fp32"])
        costs = stage_costs(cfg)
        record["predictions"][name] = {"stage_costs": costs, "points": []}
        for link, gbps in LINKS_GBPS.items():
            for replicas in (1, 2, 8):
                p = predict(costs, flop_per_s=gpu_rate, link_bytes_per_s=gbps * 1e9, replicas=replicas,
                            dp_bytes_per_s=gbps * 1e9, batch_per_replica=args.batch)
                record["predictions"][name]["points"].append({"link": link, "replicas": replicas, **p})
                rows.append([name, f"{cfg.model.blocks} x {replicas} = {cfg.model.blocks * replicas}", link,
                             p["samples_per_s"], p["limited_by"], p["link_needed_bytes_per_s"] / 1e9])
    table = md_table(["model", "GPUs (stages x replicas)", "link", "predicted samples/s", "limited by",
                      "link needed to stay compute-bound, GB/s"], rows)
    table += (f"\n\nAssumes {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s per GPU, bf16 activations on the "
              f"wire, batch {args.batch} per replica, gradient all-reduce over the same link.")
    vit_b = stage_costs(load_config("vit-base-16", ["--run.precision=fp32"]))
    data_table, record["data_path"] = data_rows(vit_b, gpu_rate, args.batch)
    table += data_table
    measured_table, record["measured_stages"] = measured_rows(vit_b, args.batch)
    table += measured_table
    if not args.quick:
        layout_table, record["layouts"] = layout_rows(gpu_rate)
        table += layout_table
    measured = latest_throughput()
    if measured is not None and not args.quick:
        # per-stage costs under the same machine load as the pipeline (both stages stepping at once), when recorded
        steps = measured.get("isolated_together_stage_step_s") or measured["isolated_stage_step_s"]
        msg = max(measured["message_bytes_per_step"].values())
        bw = gloo_bandwidth(int(msg))
        predicted = measured["batch"] / max(max(steps), msg / bw)
        actual = measured["median_samples_per_s"][measured["best"]["(c)"]]
        record["cpu_check"] = {"isolated_stage_step_s": steps, "message_bytes_per_step": msg,
                               "gloo_bytes_per_s": bw, "predicted_samples_per_s": predicted,
                               "measured_samples_per_s": actual, "error": actual / predicted - 1}
        table += (f"\n\nCheck on this CPU: measured per-stage step times {[round(s, 3) for s in steps]} s (both "
                  "stages stepping at once, no communication), "
                  f"{msg / 1e6:.2f} MB per message at {bw / 1e9:.2f} GB/s (gloo, loopback) -> predicted "
                  f"{predicted:.1f} samples/s; measured {actual:.1f} ({100 * (actual / predicted - 1):+.1f}%).")
    elif args.quick:
        tiny = load_config("fmnist-tiny")
        costs = stage_costs(tiny, wire="fp32")
        bw = gloo_bandwidth(max(c["bytes_sent"] for c in costs) * 16, reps=5)
        record["cpu_check"] = {"gloo_bytes_per_s": bw, "stage_flop": [c["flop"] for c in costs]}
        table += f"\n\nQuick: gloo loopback {bw / 1e9:.2f} GB/s."
    write_results("model", record, table, args, checks=checks)
    return 0


def checks(record: dict) -> list[Check]:
    """The model's own CPU check: its prediction within 25% of the measured 2-stage pipeline."""
    check = record.get("cpu_check", {})
    if "error" not in check:
        return []
    return [Check("scaling model vs measured CPU pipeline, absolute error", abs(check["error"]), 0.25, at_most=True)]


if __name__ == "__main__":
    raise SystemExit(main())
