"""Peak memory per device: (a) end-to-end MAE on one device, (b) sequential BIM on one device, (c) every stage of
the BIM pipeline, for the same ViT and batch. Targets: (b)/(a) <= 0.5; worst stage of (c)/(a) <= 0.30 at S=4.

Each contender is a real ``bimdist train`` run in fresh processes (synthetic data, a few steps). Three measures:
- peak RSS above the post-import baseline (from each rank's ``RUN_DIR/ranks/*.json``; on CUDA,
  ``max_memory_allocated``), which includes parameters, optimizer state, transport buffers and the allocator;
- peak live tensor bytes (``metrics.live_bytes``: every storage the training thread's ops create or touch, from
  then until it dies), the CPU analogue of ``max_memory_allocated``: parameters, gradients, optimizer state,
  activations and temporaries, without the C allocator's retained and fragmented memory;
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
from functools import partial
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import (
    ROOT,
    Check,
    base_parser,
    md_table,
    random_batch,
    train_flops_per_sample,
    verdict,
    write_results,
)
from bimdist.config import Config, load_config
from bimdist.model.chunked import batch_slices
from bimdist.model.unit import build_unit, unit_indices

GIB = 2**30
MEASURES = {"peak": "peak_bytes", "live": "live_bytes", "saved": "saved_bytes"}  # name in the notes -> field


def saved_activation_bytes(cfg: Config, batch: int) -> list[int]:
    """Per unit: the most bytes of distinct non-parameter tensors autograd holds for backward at once.

    That is what the forward saves plus, with ``model.decoder_chunks`` > 1, what the largest slice's
    recomputation saves during backward (the forward's tensors are still alive then)."""
    images, ids = random_batch(cfg, batch)
    largest_slice = max(s.stop - s.start for s in batch_slices(batch, cfg.model.decoder_chunks)) / batch
    tokens, out_bytes = None, []
    for i in unit_indices(cfg):
        unit: nn.Module = build_unit(cfg, i)
        params = {p.untyped_storage().data_ptr() for p in unit.parameters()}
        fwd: dict[int, torch.UntypedStorage] = {}
        bwd: dict[int, torch.UntypedStorage] = {}

        def pack(t: torch.Tensor, seen: dict[int, torch.UntypedStorage], params: set[int] = params) -> torch.Tensor:
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = s  # held, so a freed slice's memory is not reused under the same address
            return t

        with torch.autograd.graph.saved_tensors_hooks(partial(pack, seen=fwd), lambda t: t):
            out = unit(images, ids, tokens)
        with torch.autograd.graph.saved_tensors_hooks(partial(pack, seen=bwd), lambda t: t):
            out.loss.backward()  # records only the chunked decoder's recomputation (all slices)
        out_bytes.append(sum(x.nbytes() for x in fwd.values())
                         + int(sum(x.nbytes() for x in bwd.values()) * largest_slice))
        tokens = out.tokens
        del out
    return out_bytes


def step_flop(cfg: Config, batch: int) -> float:
    """Forward + backward FLOPs of one sequential step over every unit (torch's flop counter)."""
    return sum(train_flops_per_sample(cfg, batch)) * batch


def run_peaks(cfg_name: str, overrides: list[str], run_dir: Path) -> list[dict]:
    """Run ``bimdist train`` and return every rank's summary."""
    cmd = [sys.executable, "-m", "bimdist", "train", cfg_name, f"--run.dir={run_dir}", *overrides,
           "--metrics.live_bytes=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    ranks = sorted((run_dir / "ranks").glob("stage*_r0.json"), key=lambda p: int(p.stem[5:].split("_")[0]))
    return [json.loads(p.read_text()) for p in ranks]


def peak_bytes(summary: dict) -> int:
    return summary["cuda_peak_bytes"] or summary["peak_rss_bytes"] - summary["baseline_rss_bytes"]


def measure_contenders(cfg_name: str, common: list[str], batch: int, stage_counts: list[int], tmp: Path) -> dict:
    """(a) MAE, (b) sequential BIM and (c) every pipeline stage, each in fresh processes, for one setting."""
    mae_cfg = load_config(cfg_name, [*common, "--method=mae"])
    mae = run_peaks(cfg_name, [*common, "--method=mae"], tmp / "mae")[0]
    seq = run_peaks(cfg_name, common, tmp / "bim")[0]
    bim_cfg = load_config(cfg_name, common)
    per_unit = saved_activation_bytes(bim_cfg, batch)
    out: dict = {
        "mae": {"peak_bytes": peak_bytes(mae), "live_bytes": mae["live_peak_bytes"],
                "saved_bytes": saved_activation_bytes(mae_cfg, batch)[0], "step_flop": step_flop(mae_cfg, batch)},
        "bim_sequential": {"peak_bytes": peak_bytes(seq), "live_bytes": seq["live_peak_bytes"],
                           "saved_bytes": max(per_unit),
                           "saved_bytes_per_block": per_unit,
                           "step_flop": step_flop(bim_cfg, batch)},
        "pipelines": {},
    }
    for stages in stage_counts:
        over = [*common, f"--pipeline.stages={stages}", f"--model.blocks={stages}"]
        saved = saved_activation_bytes(load_config(cfg_name, over), batch)
        ranks = run_peaks(cfg_name, over, tmp / f"pipe{stages}")
        out["pipelines"][str(stages)] = [{"stage": r["stage"], "peak_bytes": peak_bytes(r),
                                          "live_bytes": r["live_peak_bytes"], "saved_bytes": saved[r["stage"]]}
                                         for r in ranks]
    return out


def ratios(run: dict, a: dict) -> dict[str, float]:
    """Every contender of ``run`` against the MAE figures ``a``, for each measure."""
    out = {}
    for m, key in MEASURES.items():
        out[f"bim_over_mae_{m}"] = run["bim_sequential"][key] / a[key]
        for s, rows in run["pipelines"].items():
            out[f"worst_stage_S{s}_over_mae_{m}"] = max(r[key] for r in rows) / a[key]
    return out


def measure(shape: str, cfg_name: str, base: list[str], batch: int, stage_counts: list[int], steps: int,
            chunks: int) -> dict:
    """The plain contenders, then the same with every decoder run over ``chunks`` slices of the batch."""
    common = [*base, "--data.source=synthetic", f"--data.batch_size={batch}", f"--run.steps={steps}",
              "--run.recon_png=false", "--checkpoint.keep=1", "--optim.warmup_steps=1", "--masking.extra_drop=null",
              "--pipeline.stages=1"]
    result: dict = {"shape": shape, "config": cfg_name, "overrides": common, "batch": batch, "decoder_chunks": chunks}
    with tempfile.TemporaryDirectory() as tmp:
        result.update(measure_contenders(cfg_name, common, batch, stage_counts, Path(tmp) / "plain"))
        result["chunked"] = measure_contenders(cfg_name, [*common, f"--model.decoder_chunks={chunks}"], batch,
                                               stage_counts, Path(tmp) / "chunked")
    a, c = result["mae"], result["chunked"]
    result["ratios"] = ratios(result, a)
    result["chunked_ratios"] = ratios(c, a)  # against plain MAE (a), the reference
    result["chunked_ratios_vs_chunked_mae"] = ratios(c, c["mae"])  # against MAE given the same slicing
    result["chunked_flop_overhead"] = {"mae": c["mae"]["step_flop"] / a["step_flop"] - 1,
                                       "bim": c["bim_sequential"]["step_flop"] / result["bim_sequential"]["step_flop"]
                                       - 1}
    return result


def contender_rows(shape: str, run: dict, a: dict, slices: int) -> list[list]:
    mark = "'" if slices > 1 else ""
    rows = [[shape, f"(a{mark}) MAE, one device", slices, run["mae"]]]
    rows.append([shape, f"(b{mark}) BIM sequential, one device", slices, run["bim_sequential"]])
    for s, ranks in run["pipelines"].items():
        rows += [[shape, f"(c{mark}) BIM pipeline S={s}, stage {rk['stage']}", slices, rk] for rk in ranks]
    return [[sh, name, k, *[x for key in MEASURES.values() for x in (m[key] / GIB, m[key] / a[key])]]
            for sh, name, k, m in rows]


def targets(q: dict[str, float]) -> str:
    """(b)/(a) <= 0.5 and the worst S=4 stage / (a) <= 0.30, for each measure."""
    s4 = "worst_stage_S4_over_mae_peak" in q
    b = ", ".join(f"{m} {verdict(q[f'bim_over_mae_{m}'], 0.5, at_most=True)}" for m in MEASURES)
    c = ", ".join(f"{m} {verdict(q[f'worst_stage_S4_over_mae_{m}'], 0.30, at_most=True) if s4 else 'n/a'}"
                  for m in MEASURES)
    return f"(b)/(a) {b}; worst stage at S=4: {c}"


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="run only the plans whose name contains this (e.g. ViT-B)")
    args = parser.parse_args(argv)
    if args.quick:
        plans = [("tiny (quick)", str(ROOT / "tests/assets/tiny.yaml"), [], 32, [2], 2, 4)]
    else:
        plans = [("fmnist-tiny, batch 1024", "fmnist-tiny", ["--model.decoder_embed_dim=128"], 1024, [4, 6], 3, 8),
                 ("fmnist-tiny, light decoder (64), batch 1024", "fmnist-tiny", ["--model.decoder_embed_dim=64"],
                  1024, [4, 6], 3, 8),
                 ("ViT-B/16 224px, batch 64", "vit-base-16", ["--run.precision=fp32", "--model.decoder_depth=1"], 64,
                  [4], 2, 8)]
    plans = [p for p in plans if args.only is None or args.only in p[0]]
    results = [measure(*plan) for plan in plans]
    rows = []
    for r in results:
        rows += contender_rows(r["shape"], r, r["mae"], 1)
        rows += contender_rows(r["shape"], r["chunked"], r["mae"], r["decoder_chunks"])
    table = md_table(["model and batch", "contender", "decoder slices", "peak RSS GiB", "RSS / (a)",
                      "live tensors GiB", "live / (a)", "saved activations GiB", "saved / (a)"], rows)
    notes = []
    for r in results:
        k, f = r["decoder_chunks"], r["chunked_flop_overhead"]
        notes += [f"- {r['shape']}, plain: {targets(r['ratios'])}",
                  f"- {r['shape']}, decoders in {k} slices (`--model.decoder_chunks={k}`), against plain (a): "
                  f"{targets(r['chunked_ratios'])}",
                  f"- {r['shape']}, decoders in {k} slices, against MAE with the same slicing (a'): "
                  f"{targets(r['chunked_ratios_vs_chunked_mae'])}; the recomputation costs "
                  f"{f['bim']:+.1%} FLOPs per step for BIM, {f['mae']:+.1%} for MAE"]
    table += ("\n\nPeak RSS = RSS high-water mark above the post-import baseline on CPU (CUDA: "
              "max_memory_allocated); it includes parameters, gradients and AdamW state, and what the C allocator "
              "keeps after frees. Live = the most bytes of tensor storage alive at once (`metrics.live_bytes`; on a "
              "GPU, what max_memory_allocated counts), which does not depend on the allocator. Saved = the most "
              "activation bytes autograd holds for backward at once (with sliced decoders: the forward's plus the "
              "largest slice's recomputation). Primed rows run every decoder over slices of the batch and recompute "
              "it in backward (`model.decoder_chunks`); the gradients are unchanged.\n" + "\n".join(notes))
    write_results("memory", {"results": results}, table, args, checks=checks)
    return 0


def checks(record: dict) -> list[Check]:
    """Headline: live tensor bytes (the allocator-independent measure, what a GPU's max_memory_allocated counts)
    with sliced decoders, against plain MAE (a): (b)/(a) <= 0.5 and the worst S=4 stage <= 0.30. The notes under
    the table give every measure, with and without slicing."""
    out = []
    for r in record["results"]:
        q = r["chunked_ratios"]
        out.append(Check(f"{r['shape']}: BIM sequential / MAE, live bytes", q["bim_over_mae_live"], 0.5, at_most=True))
        if "worst_stage_S4_over_mae_live" in q:
            out.append(Check(f"{r['shape']}: worst S=4 stage / MAE, live bytes", q["worst_stage_S4_over_mae_live"],
                             0.30, at_most=True))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
