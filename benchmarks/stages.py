"""Measured per-stage throughput and MFU of ViT-B/16 (the vit-base-16 preset's 4 stages, one block each) at batch
256 in bf16 on one GPU: each stage's blocks alone, steady state, the device synchronised at both ends of the timed
steps. ``benchmarks.model`` reads the newest result and predicts from these stage times instead of assuming 40% MFU.

    python -m benchmarks.stages [--batch 256] [--steps 20]
    python -m benchmarks.stages --quick      # the tiny test model on whatever device there is
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import ROOT, base_parser, md_table, write_results
from bimdist.config import load_config, visible_counts
from bimdist.distributed.topology import blocks_of_stage
from bimdist.model.masking import shuffle_ids
from bimdist.train.loop import peak_flop_per_s
from bimdist.train.worker import StageWorker


def measure_stage(cfg, stage: int, *, device: torch.device, batch: int, steps: int) -> dict:  # noqa: ANN001
    m = cfg.model
    blocks = blocks_of_stage(m.blocks, cfg.pipeline.stages, stage)
    worker = StageWorker(cfg, blocks, device=device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, m.in_chans, m.img_size, m.img_size), dtype=torch.uint8, generator=g)
    ids = shuffle_ids(batch, m.num_patches, generator=g)
    drops = cfg.masking.extra_drop or [0.0] * m.blocks
    visible = visible_counts(m.num_patches, cfg.masking.mask_ratio, drops)
    tokens = None if blocks[0] == 0 else torch.randn(batch, 1 + visible[blocks[0] - 1], m.embed_dim, generator=g)
    images, ids = images.to(device), ids.to(device)
    tokens = tokens.to(device) if tokens is not None else None
    with FlopCounterMode(display=False) as fc:
        worker.train_step(step=0, images=images, ids_shuffle=ids, tokens=tokens)
    flop = float(fc.get_total_flops())
    for i in range(1, 4):  # warm-up: allocator, autotuning
        worker.train_step(step=i, images=images, ids_shuffle=ids, tokens=tokens)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        worker.train_step(step=4 + i, images=images, ids_shuffle=ids, tokens=tokens)
    sync(device)
    step_s = (time.perf_counter() - t0) / steps
    peak = peak_flop_per_s(device, None)
    return {"stage": stage, "blocks": blocks, "step_s": step_s, "samples_per_s": batch / step_s,
            "step_flop": flop, "tflop_per_s": flop / step_s / 1e12, "mfu": flop / step_s / peak if peak else None,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    if args.quick:
        cfg = load_config(str(ROOT / "tests/assets/tiny.yaml"), ["--pipeline.stages=2"])
        batch, steps = 16, 3
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks.stages measures GPU stages: no CUDA device is visible (run tests/gpu/run.sh "
                             "on a GPU machine; --quick runs on the CPU)")
        cfg = load_config("vit-base-16", ["--run.precision=bf16", "--pipeline.stages=4"])
        batch, steps = args.batch, args.steps
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    results = []
    for stage in range(cfg.pipeline.stages):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        results.append(measure_stage(cfg, stage, device=device, batch=batch, steps=steps))
    rows = [[r["stage"], r["blocks"], r["step_s"], r["samples_per_s"], r["tflop_per_s"],
             "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"] for r in results]
    table = md_table(["stage", "blocks", "step s", "samples/s", "achieved TFLOP/s", "MFU"], rows)
    slowest = min(r["samples_per_s"] for r in results)
    name = "tiny" if args.quick else "ViT-B/16"
    table += (f"\n\n{name} at batch {batch}, {cfg.run.precision}, on {device.type}; "
              f"each stage's blocks alone, {steps} steps after warm-up. The slowest stage allows {slowest:,.0f} "
              "samples/s per pipeline replica.")
    write_results("stages", {"config": cfg.model_dump(mode="json", include={"model", "run"}), "batch": batch,
                             "device": str(device), "stages": results}, table, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
