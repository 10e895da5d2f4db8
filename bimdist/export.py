"""``bimdist export``: the first K blocks as a timm VisionTransformer state dict (safetensors) + its kwargs JSON."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors.torch import save

from bimdist.model.backbone import Backbone
from bimdist.runs import load_units, run_config

log = logging.getLogger("bimdist")


def export(run_dir: Path, depth: int, out: Path) -> tuple[Path, Path]:
    cfg = run_config(run_dir)
    units, step = load_units(cfg, run_dir)
    backbone = Backbone(cfg, units)
    state = backbone.timm_state_dict(depth)
    kwargs = backbone.timm_kwargs(depth)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out} should end in .safetensors (the kwargs go to the same name with .json)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # safetensors' save_file creates the file 0600; written here it gets the mode the umask gives, as any tool's
    # output does, so the other users of a shared cluster can read the model
    out.write_bytes(save(state, metadata={"bimdist_step": str(step), "depth_blocks": str(depth)}))
    side = out.with_suffix(".json")
    side.write_text(json.dumps(kwargs, indent=1) + "\n")
    log.info("exported blocks 1..%d (%d layers, step %d) to %s and %s", depth, kwargs["depth"], step, out, side)
    return out, side
