"""Encoder pieces built from timm: the patch embedding (with masking) and one encoder block.

Parameter names match ``timm.models.vision_transformer.VisionTransformer`` (``patch_embed``, ``cls_token``,
``pos_embed``, ``blocks.i``, ``norm``), which is what makes a truncated encoder exportable as a timm model.
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm, PatchEmbed, build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from bimdist.model.masking import gather_tokens


def layer_norm(dim: int) -> nn.LayerNorm:
    """timm's LayerNorm (eps 1e-6, as in timm's ViT and MAE), so exported weights mean the same thing."""
    return LayerNorm(dim)


def sincos_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding with a zero row for the class token: [1, 1 + grid*grid, dim]."""
    pe = build_sincos2d_pos_embed([grid, grid], dim)  # [L, D]
    return torch.cat([torch.zeros(1, dim), pe], dim=0).unsqueeze(0)  # [1, 1+L, D]


def vit_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.ModuleList:
    """``depth`` timm transformer blocks, configured exactly as timm's VisionTransformer builds them."""
    return nn.ModuleList(
        Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth)
    )


def init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears, unit LayerNorms, patch projection as a linear."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            w = m.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))


class Embedding(nn.Module):
    """Patchify, add position embeddings, keep the visible patches (in shuffle order), prepend the class token."""

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(img_size // patch_size, embed_dim))
        init_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, imgs: torch.Tensor, ids_shuffle: torch.Tensor | None, visible: int) -> torch.Tensor:
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # [N, L, D]
        if ids_shuffle is not None:
            x = gather_tokens(x, ids_shuffle[:, :visible])  # [N, visible, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # [N, 1, D]
        return torch.cat([cls, x], dim=1)  # [N, 1+visible, D]


class EncoderBlock(nn.Module):
    """A run of transformer layers plus the norm that feeds this block's decoder and its truncated backbone.

    The next block receives the un-normalised residual stream, as in a plain ViT.
    """

    def __init__(self, *, dim: int, depth: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.blocks = vit_blocks(dim, depth, num_heads, mlp_ratio)
        self.norm = layer_norm(dim)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)  # [N, 1+n, D]
        return x
