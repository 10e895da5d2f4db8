"""The light MAE-style decoder each BIM block owns, and the pixel reconstruction loss."""

from __future__ import annotations

import torch
from torch import nn

from bimdist.model.masking import gather_tokens
from bimdist.model.vit import init_weights, layer_norm, sincos_pos_embed, vit_blocks


def patchify(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p*p*C] in MAE's (row, col, p, q, c) order."""
    n, c, h, w = imgs.shape
    gh, gw = h // patch, w // patch
    x = imgs.reshape(n, c, gh, patch, gw, patch)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, patch * patch * c)  # [N, L, p*p*C]


def unpatchify(x: torch.Tensor, patch: int, chans: int) -> torch.Tensor:
    """[N, L, p*p*C] -> [N, C, H, W]; the inverse of :func:`patchify` for square images."""
    n, length, _ = x.shape
    g = int(length**0.5)
    x = x.reshape(n, g, g, patch, patch, chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, chans, g * patch, g * patch)  # [N, C, H, W]


def patch_target(imgs: torch.Tensor, patch: int, *, norm_pix: bool) -> torch.Tensor:
    """Regression target per patch, normalised by the patch's own mean and variance when ``norm_pix``."""
    target = patchify(imgs, patch)  # [N, L, p*p*C]
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)  # [N, L, 1]
        var = target.var(dim=-1, keepdim=True)  # [N, L, 1]
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
               count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the patches where ``mask`` is 1; ``count`` overrides the divisor (a slice of
    the batch divides by the whole batch's masked count, so the slices' losses sum to the batch's)."""
    loss = ((pred - target) ** 2).mean(dim=-1)  # [N, L]
    return (loss * mask).sum() / (mask.sum() if count is None else count)


class Decoder(nn.Module):
    """Linear to decoder width, mask tokens, un-shuffle, position embeddings, transformer layers, pixel head."""

    def __init__(self, *, embed_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 grid: int, patch_pixels: int):
        super().__init__()
        self.decoder_embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(grid, dim))
        self.decoder_blocks = vit_blocks(dim, depth, num_heads, mlp_ratio)
        self.decoder_norm = layer_norm(dim)
        self.decoder_pred = nn.Linear(dim, patch_pixels)
        init_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """x: [N, 1+n, D] visible tokens in shuffle order -> predictions for every patch [N, L, p*p*C]."""
        x = self.decoder_embed(x)  # [N, 1+n, Dd]
        n, length = ids_restore.shape
        masked = self.mask_token.expand(n, length + 1 - x.shape[1], -1)  # [N, L-n, Dd]
        patches = torch.cat([x[:, 1:], masked], dim=1)  # [N, L, Dd] shuffle order
        patches = gather_tokens(patches, ids_restore)  # [N, L, Dd] image order
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed  # [N, 1+L, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))  # [N, 1+L, p*p*C]
        return x[:, 1:]  # [N, L, p*p*C]
