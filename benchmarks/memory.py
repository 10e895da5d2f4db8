"""Peak memory per device: (a) end-to-end MAE on one device, (b) sequential BIM on one device, (c) every stage of
the BIM pipeline, for the same ViT and batch. Targets: (b)/(a) <= 0.5; worst stage of (c)/(a) <= 0.30 at S=4.

Each contender is a real ``bimdist train`` run in fresh processes (synthetic data, a few steps). Two measures:
- peak RSS above the post-import baseline (from each rank's ``RUN_DIR/ranks/*.json``; on CUDA,
  ``max_memory_allocated``), which includes parameters, optimizer state, transport buffers and the allocator;
- bytes of activations saved for backward (autograd's saved-tensor hooks, parameters excluded), which do not
  depend on the allocator: MAE keeps one graph for the whole encoder, BIM one block's graph at a time.

    python -m benchmarks.memory   # fmnist-tiny at batch 1024 (S=4, S=6; preset and light decoder), ViT-B/16 at 64
    python -m benchmarks.memory --quick
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import ROOT, base_parser, md_table, random_batch, verdict, write_results
from bimdist.config import Config, load_config
from bimdist.model.unit import build_unit, unit_indices

GIB = 2**30


def saved_activation_bytes(cfg: Config, batch: int) -> list[int]:
    """Per unit: bytes of distinct non-parameter tensors autograd saves during its forward."""
    images, ids = random_batch(cfg, batch)
    tokens, out_bytes = None, []
    for i in unit_indices(cfg):
        unit: nn.Module = build_unit(cfg, i)
        params = {p.untyped_storage().data_ptr() for p in unit.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor, params: set[int] = params, seen: dict[int, int] = seen) -> torch.Tensor:
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = unit(images, ids, tokens)
        out_bytes.append(sum(seen.values()))
        out.loss.backward()
        tokens = out.tokens
        del out
    return out_bytes


def run_peaks(cfg_name: str, overrides: list[str], run_dir: Path) -> list[dict]:
    """Run ``bimdist train`` and return every rank's summary."""
    cmd = [sys.executable, "-m", "bimdist", "train", cfg_name, f"--run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    ranks = sorted((run_dir / "ranks").glob("stage*_r0.json"), key=lambda p: int(p.stem[5:].split("_")[0]))
    return [json.loads(p.read_text()) for p in ranks]


def peak_bytes(summary: dict) -> int:
    return summary["cuda_peak_bytes"] or summary["peak_rss_bytes"] - summary["baseline_rss_bytes"]


def measure(shape: str, cfg_name: str, base: list[str], batch: int, stage_counts: list[int], steps: int) -> dict:
    common = [*base, "--data.source=synthetic", f"--data.batch_size={batch}", f"--run.steps={steps}",
              "--run.recon_png=false", "--checkpoint.keep=1", "--optim.warmup_steps=1", "--masking.extra_drop=null",
              "--pipeline.stages=1"]
    mae_cfg = load_config(cfg_name, [*common, "--method=mae"])
    result: dict = {"shape": shape, "config": cfg_name, "overrides": common, "batch": batch}
    with tempfile.TemporaryDirectory() as tmp:
        mae = run_peaks(cfg_name, [*common, "--method=mae"], Path(tmp) / "mae")[0]
        seq = run_peaks(cfg_name, common, Path(tmp) / "bim")[0]
        result["mae"] = {"peak_bytes": peak_bytes(mae), "saved_bytes": saved_activation_bytes(mae_cfg, batch)[0]}
        bim_cfg = load_config(cfg_name, common)
        per_unit = saved_activation_bytes(bim_cfg, batch)
        result["bim_sequential"] = {"peak_bytes": peak_bytes(seq), "saved_bytes": max(per_unit),
                                    "saved_bytes_per_block": per_unit}
        result["pipelines"] = {}
        for stages in stage_counts:
            over = [*common, f"--pipeline.stages={stages}", f"--model.blocks={stages}"]
            cfg_s = load_config(cfg_name, over)
            saved = saved_activation_bytes(cfg_s, batch)
            ranks = run_peaks(cfg_name, over, Path(tmp) / f"pipe{stages}")
            result["pipelines"][str(stages)] = [{"stage": r["stage"], "peak_bytes": peak_bytes(r),
                                                 "saved_bytes": saved[r["stage"]]} for r in ranks]
    a = result["mae"]
    result["ratios"] = {
        "bim_over_mae_peak": result["bim_sequential"]["peak_bytes"] / a["peak_bytes"],
        "bim_over_mae_saved": result["bim_sequential"]["saved_bytes"] / a["saved_bytes"],
        **{f"worst_stage_S{s}_over_mae_peak": max(r["peak_bytes"] for r in rows) / a["peak_bytes"]
           for s, rows in result["pipelines"].items()},
        **{f"worst_stage_S{s}_over_mae_saved": max(r["saved_bytes"] for r in rows) / a["saved_bytes"]
           for s, rows in result["pipelines"].items()},
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    if args.quick:
        plans = [("tiny (quick)", str(ROOT / "tests/assets/tiny.yaml"), [], 32, [2], 2)]
    else:
        plans = [("fmnist-tiny, batch 1024", "fmnist-tiny", ["--model.decoder_embed_dim=128"], 1024, [4, 6], 3),
                 ("fmnist-tiny, light decoder (64), batch 1024", "fmnist-tiny", ["--model.decoder_embed_dim=64"],
                  1024, [4, 6], 3),
                 ("ViT-B/16 224px, batch 64", "vit-base-16", ["--run.precision=fp32", "--model.decoder_depth=1"], 64,
                  [4], 2)]
    results = [measure(*plan) for plan in plans]
    rows = []
    for r in results:
        a = r["mae"]
        rows.append([r["shape"], "(a) MAE, one device", a["peak_bytes"] / GIB, 1.0, a["saved_bytes"] / GIB, 1.0])
        b = r["bim_sequential"]
        rows.append([r["shape"], "(b) BIM sequential, one device", b["peak_bytes"] / GIB,
                     b["peak_bytes"] / a["peak_bytes"], b["saved_bytes"] / GIB, b["saved_bytes"] / a["saved_bytes"]])
        for s, ranks in r["pipelines"].items():
            for rk in ranks:
                rows.append([r["shape"], f"(c) BIM pipeline S={s}, stage {rk['stage']}", rk["peak_bytes"] / GIB,
                             rk["peak_bytes"] / a["peak_bytes"], rk["saved_bytes"] / GIB,
                             rk["saved_bytes"] / a["saved_bytes"]])
    table = md_table(["model and batch", "contender", "peak GiB", "peak / (a)", "saved activations GiB",
                      "saved / (a)"], rows)
    notes = []
    for r in results:
        q = r["ratios"]
        notes.append(f"- {r['shape']}: (b)/(a) peak {verdict(q['bim_over_mae_peak'], 0.5, at_most=True)}, "
                     f"saved activations {verdict(q['bim_over_mae_saved'], 0.5, at_most=True)}; worst stage at S=4 "
                     f"/ (a): peak {verdict(q['worst_stage_S4_over_mae_peak'], 0.30, at_most=True) if 'worst_stage_S4_over_mae_peak' in q else 'n/a'}, "  # noqa: E501
                     f"saved {verdict(q['worst_stage_S4_over_mae_saved'], 0.30, at_most=True) if 'worst_stage_S4_over_mae_saved' in q else 'n/a'}")  # noqa: E501
    table += ("\n\nPeak = RSS high-water mark above the post-import baseline on CPU (CUDA: max_memory_allocated); "
              "it includes parameters and AdamW state. Saved = activations autograd keeps for backward.\n"
              + "\n".join(notes))
    write_results("memory", {"results": results}, table, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
