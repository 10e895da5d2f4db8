"""The network to fine-tune: timm's ``VisionTransformer`` of the first K blocks with MAE's classification head.

MAE's head (models_vit.py with ``global_pool``): the mean of the patch tokens, a new ``fc_norm`` in place of the
encoder's final norm, and a linear head whose weights start trunc-normal with std 2e-5. The pretrained weights come
from a run folder (``Backbone.timm_state_dict``, the same as ``bimdist export``) or from an exported
``.safetensors`` with its kwargs JSON. timm's non-strict loading would hide a mismatch, so the keys are checked
exactly: only the new ``head`` and ``fc_norm`` may be missing, and only the encoder's final ``norm`` (which MAE
drops for ``fc_norm``) may be left over. Position embeddings are resampled when the fine-tuning grid differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from bimdist.config import Config

NEW_KEYS = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}  # MAE's head: trained from scratch
DROPPED_KEYS = {"norm.weight", "norm.bias"}  # the encoder's final norm: fc_norm after pooling takes its place


class FinetuneError(ValueError):
    """The pretrained weights or the request do not fit; the message names what and the fix (exit 2)."""


@dataclass
class Pretrained:
    kwargs: dict[str, Any]  # timm VisionTransformer arguments of the backbone (num_classes=0)
    state: dict[str, torch.Tensor] | None  # None: init=scratch
    source: str  # for the log and result.json
    depth: int  # blocks kept
    step: int | None = None  # the pretraining step, when known


def from_run(cfg: Config, run_dir: Path, depth: int, *, weights: bool) -> Pretrained:
    """The first ``depth`` blocks of a run's newest complete checkpoint (``weights=False``: only the shapes)."""
    from bimdist.model.backbone import Backbone
    from bimdist.runs import initial_units, load_units

    blocks = cfg.model.blocks if cfg.method == "bim" else len(cfg.model.split)
    if not 1 <= depth <= blocks:
        raise FinetuneError(f"--depth {depth} is out of range: the run has blocks 1..{blocks}")
    if weights:
        units, step = load_units(cfg, run_dir)
    else:
        units, step = initial_units(cfg), None
    backbone = Backbone(cfg, units)
    return Pretrained(backbone.timm_kwargs(depth), backbone.timm_state_dict(depth) if weights else None,
                      f"{run_dir} (step {step}, blocks 1..{depth})" if weights else f"{run_dir} (shapes only)",
                      depth, step)


def from_export(path: Path, depth: int | None, *, weights: bool) -> Pretrained:
    """An exported backbone: ``PATH.safetensors`` and ``PATH.json`` (its timm kwargs)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    side = path.with_suffix(".json")
    if not path.is_file():
        raise FinetuneError(f"{path} not found; give a run folder or a `bimdist export` .safetensors file")
    if not side.is_file():
        raise FinetuneError(f"{side} not found: `bimdist export` writes the model's kwargs next to the weights")
    kwargs = json.loads(side.read_text())
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    blocks = int(meta.get("depth_blocks", 0)) or None
    if depth is not None and blocks is not None and depth != blocks:
        raise FinetuneError(f"--depth {depth} but {path} holds blocks 1..{blocks}; export that depth, or drop --depth")
    step = int(meta["bimdist_step"]) if "bimdist_step" in meta else None
    return Pretrained(kwargs, load_file(str(path)) if weights else None, str(path), blocks or depth or 0, step)


def build(pre: Pretrained, *, num_classes: int, drop_path: float, input_size: int | None) -> VisionTransformer:
    """MAE's fine-tuning network of ``pre``'s shape, with ``pre``'s weights when it carries them."""
    kwargs = dict(pre.kwargs, num_classes=num_classes, global_pool="avg", fc_norm=None, drop_path_rate=drop_path)
    if input_size is not None:
        kwargs["img_size"] = input_size
    model = VisionTransformer(**kwargs)
    if pre.state is not None:
        load_checked(model, pre.state, source=pre.source)
    trunc_normal_(model.head.weight, std=2e-5)  # MAE: a head that starts near zero
    torch.nn.init.zeros_(model.head.bias)
    return model


def load_checked(model: VisionTransformer, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` non-strictly, then accept exactly MAE's differences: anything else names the keys."""
    state = dict(state)
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:  # another resolution: resample the grid
        state["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size),
                                                    num_prefix_tokens=model.num_prefix_tokens)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(shapes[k])}" for k, v in state.items() if k in shapes and
             v.shape != shapes[k]]
    if wrong:
        raise FinetuneError(f"{source}: tensors of another shape than the model's: {', '.join(wrong[:5])}")
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = set(result.missing_keys) - NEW_KEYS, set(result.unexpected_keys) - DROPPED_KEYS
    problems = []
    if missing:
        problems.append(f"missing {sorted(missing)[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected {sorted(unexpected)[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if problems:
        raise FinetuneError(f"{source} does not fit a timm ViT of its kwargs: {'; '.join(problems)}. Only the new "
                            f"head and fc_norm may be missing and only the final norm left over; export the "
                            "backbone with `bimdist export` (no decoder keys) at the depth you fine-tune")
