"""``python -m bimdist.finetune.report RESULT_DIR...``: fine-tuning results side by side, one line (the demo's).

    python -m bimdist.finetune.report runs/x/finetune-depth4-labels0.1 runs/x/finetune-depth4-scratch-labels0.1
    fine-tuned on 10% of the labels (5,999 images, 5 epochs, depth 4): pretrained 77.9% vs scratch 59.6% top-1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def line(results: list[dict]) -> str:
    first = results[0]
    arms = " vs ".join(f"{r['init']} {r['top1']:.1f}%" for r in results)
    gaps = ""
    if len(results) == 2:
        gaps = f" ({results[0]['top1'] - results[1]['top1']:+.1f} points)"
    same = len({r.get("train_labels_sha256") for r in results}) == 1
    epochs = f"{first['epochs']:g} epoch{'' if first['epochs'] == 1 else 's'}"
    return (f"fine-tuned on {100 * first['labels']:g}% of the labels ({first['train_labels']:,} images"
            f"{'' if same else ', NOT the same images'}, {epochs}, depth {first['depth']}): "
            f"{arms} top-1{gaps}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bimdist.finetune.report", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path, help="fine-tuning output folders (each with result.json)")
    args = p.parse_args(argv)
    results = []
    for d in args.dirs:
        path = d / "result.json"
        if not path.is_file():
            print(f"bimdist finetune report: {path} not found; run `bimdist finetune` first", file=sys.stderr)
            return 2
        results.append(json.loads(path.read_text()))
    print(line(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
