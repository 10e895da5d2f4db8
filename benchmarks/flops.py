"""Compute: FLOPs per training sample (forward + backward, torch's flop counter) for BIM with and without
incremental masking and for end-to-end MAE, and the compute to obtain backbones of every depth 1..S once with
BIM versus training S separate MAE models of those depths. Target: >= 70% saving on the latter.

    python -m benchmarks.flops            # fmnist-tiny preset and a light-decoder variant
    python -m benchmarks.flops --quick
"""

from __future__ import annotations

from itertools import accumulate

from benchmarks.common import Check, base_parser, md_table, train_flops_per_sample, write_results
from bimdist.config import load_config

INCREMENTAL = [0.0, 0.25, 0.5, 0.5]


def analyse(name: str, base: list[str]) -> dict:
    bim = load_config("fmnist-tiny", base)
    blocks = bim.model.blocks
    drops = (INCREMENTAL + [INCREMENTAL[-1]] * blocks)[:blocks]
    inc = load_config("fmnist-tiny", [*base, f"--masking.extra_drop={drops}"])
    mae = load_config("fmnist-tiny", [*base, "--method=mae"])
    f_bim, f_inc, f_mae = (train_flops_per_sample(c) for c in (bim, inc, mae))
    depths = list(accumulate(bim.model.split))
    separate = []
    for d in depths:  # an MAE model truncated to this depth, with the same decoder, trained on its own
        cfg_d = load_config("fmnist-tiny", [*base, "--method=mae", f"--model.depth={d}", "--model.blocks=1"])
        separate.append(sum(train_flops_per_sample(cfg_d)))
    total_sep = sum(separate)
    return {
        "variant": name, "overrides": base, "blocks": blocks, "depths": depths, "incremental_extra_drop": drops,
        "bim_per_block": f_bim, "bim_incremental_per_block": f_inc, "mae": f_mae[0],
        "bim": sum(f_bim), "bim_incremental": sum(f_inc), "separate_mae_per_depth": separate,
        "separate_mae_total": total_sep,
        "once_for_all_saving": 1 - sum(f_bim) / total_sep,
        "once_for_all_saving_incremental": 1 - sum(f_inc) / total_sep,
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    variants = {"fmnist-tiny preset (decoder 128x1)": []}
    if not args.quick:
        variants["light decoder (64x1)"] = ["--model.decoder_embed_dim=64"]
        variants["6 blocks, light decoder"] = ["--model.decoder_embed_dim=64", "--model.blocks=6"]
    else:
        variants = {"quick (depth 4)": ["--model.depth=4", "--model.embed_dim=64", "--model.num_heads=2"]}
    results = [analyse(name, over) for name, over in variants.items()]
    rows = []
    for r in results:
        rows.append([r["variant"], r["mae"] / 1e6, r["bim"] / 1e6, r["bim_incremental"] / 1e6,
                     r["bim"] / r["mae"], r["separate_mae_total"] / 1e6,
                     f"{100 * r['once_for_all_saving']:.1f}%", f"{100 * r['once_for_all_saving_incremental']:.1f}%"])
    table = md_table(["model", "MAE MFLOP/sample", "BIM MFLOP/sample", "BIM + incremental", "BIM / MAE",
                      "S separate MAEs (depths 1..S)", "once-for-all saving", "saving with incremental"], rows)
    record = {"variants": results}
    table += (f"\n\nIncremental masking drops {results[0]['incremental_extra_drop']} of the visible tokens per "
              "block.\n" + "\n".join(c.line() for c in checks(record)))
    write_results("flops", record, table, args, checks=checks)
    return 0


def checks(record: dict) -> list[Check]:
    """Once-for-all saving >= 70%: the preset, and the best variant (with or without incremental masking)."""
    variants = record["variants"]
    best = max(variants, key=lambda r: max(r["once_for_all_saving"], r["once_for_all_saving_incremental"]))
    saving = max(best["once_for_all_saving"], best["once_for_all_saving_incremental"])
    return [Check("once-for-all saving, preset", variants[0]["once_for_all_saving"], 0.70),
            Check("once-for-all saving, best variant", saving, 0.70, note=f"({best['variant']})")]


if __name__ == "__main__":
    raise SystemExit(main())
