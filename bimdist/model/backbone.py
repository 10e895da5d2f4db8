"""The trained encoder without its decoders: features at every block boundary, and timm export.

Truncating after block k gives a backbone of ``sum(split[:k])`` layers whose final norm is block k's own
norm (BIM). For an MAE run, the single final norm is applied at every cut, so both methods are probed at
the same depths.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any

import torch
from torch import nn

from bimdist.config import Config
from bimdist.model.unit import BlockUnit, normalize_images


class Backbone(nn.Module):
    def __init__(self, cfg: Config, units: list[BlockUnit]):
        super().__init__()
        self.cfg = cfg
        first = units[0]
        assert first.embed is not None, "the first unit owns the embedding"
        self.embed = first.embed
        self.mean, self.std = first.mean, first.std
        self.layers = nn.ModuleList(blk for u in units for blk in u.encoder.blocks)
        self.cuts = list(accumulate(cfg.model.split))  # layers after each block
        self.norms = nn.ModuleList(
            [units[0].encoder.norm] * len(self.cuts) if cfg.method == "mae" else [u.encoder.norm for u in units]
        )

    @torch.no_grad()
    def features(self, images: torch.Tensor, *, depths: int | None = None) -> list[torch.Tensor]:
        """Normalised tokens [N, 1+L, D] after each of the first ``depths`` blocks (all blocks by default)."""
        depths = len(self.cuts) if depths is None else depths
        x = self.embed(normalize_images(images, self.mean, self.std), None, 0)  # [N, 1+L, D]
        out, layer = [], 0
        for k in range(depths):
            while layer < self.cuts[k]:
                x = self.layers[layer](x)
                layer += 1
            out.append(self.norms[k](x))  # [N, 1+L, D]
        return out

    def timm_kwargs(self, depth: int) -> dict[str, Any]:
        """Arguments for ``timm.models.vision_transformer.VisionTransformer`` of the first ``depth`` blocks."""
        m = self.cfg.model
        return dict(
            img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans, embed_dim=m.embed_dim,
            depth=self.cuts[depth - 1], num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, qkv_bias=True,
            num_classes=0, global_pool="avg", fc_norm=False, class_token=True,
        )

    def timm_state_dict(self, depth: int) -> dict[str, torch.Tensor]:
        if not 1 <= depth <= len(self.cuts):
            raise ValueError(f"depth {depth} is out of range: this run has blocks 1..{len(self.cuts)}")
        sd: dict[str, torch.Tensor] = {}
        for k, v in self.embed.state_dict().items():
            sd[k] = v
        for i in range(self.cuts[depth - 1]):
            for k, v in self.layers[i].state_dict().items():
                sd[f"blocks.{i}.{k}"] = v
        for k, v in self.norms[depth - 1].state_dict().items():
            sd[f"norm.{k}"] = v
        return {k: v.detach().clone().contiguous() for k, v in sd.items()}
