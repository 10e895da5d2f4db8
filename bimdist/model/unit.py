"""One trainable unit: encoder block k, its decoder and its local loss (BIM), or the whole encoder (MAE).

A unit never sees ranks or sockets. Its input arrives detached, so ``loss.backward()`` touches only this
unit's parameters; the caller decides what happens to the encoder output (``on_encoded``), e.g. send it
to the next stage before this unit's decoder and backward run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bimdist.config import Config, visible_counts
from bimdist.model.chunked import chunked_loss
from bimdist.model.decoder import Decoder, masked_mse, patch_target
from bimdist.model.masking import hidden_mask, restore_ids, seed_for
from bimdist.model.vit import Embedding, EncoderBlock


@dataclass
class UnitOutput:
    loss: torch.Tensor  # scalar, attached to this unit's graph
    tokens: torch.Tensor  # [N, 1+n, D] encoder output (residual stream), detached
    pred: torch.Tensor  # [N, L, p*p*C] decoder prediction


def normalize_images(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float, scaled to [0, 1] and standardised per channel."""
    return (images.float() / 255.0 - mean) / std  # [N, C, H, W]


class BlockUnit(nn.Module):
    def __init__(self, cfg: Config, index: int):
        super().__init__()
        m = cfg.model
        self.index = index
        self.patch = m.patch_size
        self.norm_pix = m.norm_pix_loss
        self.decoder_chunks = m.decoder_chunks
        mae = cfg.method == "mae"
        layers = m.depth if mae else m.split[index]
        drops = cfg.masking.extra_drop or [0.0] * m.blocks
        self.visible = visible_counts(m.num_patches, cfg.masking.mask_ratio, drops)[0 if mae else index]
        self.embed = (
            Embedding(img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans, embed_dim=m.embed_dim)
            if index == 0 else None
        )
        self.encoder = EncoderBlock(dim=m.embed_dim, depth=layers, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio)
        self.decoder = Decoder(
            embed_dim=m.embed_dim, dim=m.decoder_embed_dim, depth=m.decoder_depth,
            num_heads=m.decoder_num_heads, mlp_ratio=m.mlp_ratio, grid=m.img_size // m.patch_size,
            patch_pixels=m.patch_size**2 * m.in_chans,
        )
        self.register_buffer("mean", torch.tensor(cfg.data.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.data.std).view(1, -1, 1, 1), persistent=False)

    def forward(
        self,
        images: torch.Tensor,  # uint8 [N, C, H, W]
        ids_shuffle: torch.Tensor,  # int64 [N, L]
        tokens: torch.Tensor | None = None,  # [N, 1+n_prev, D] from the previous block, detached
        *,
        on_encoded: Callable[[torch.Tensor], None] | None = None,
    ) -> UnitOutput:
        imgs = normalize_images(images, self.mean, self.std)  # [N, C, H, W]
        ids_restore = restore_ids(ids_shuffle)  # [N, L]
        if self.embed is not None:
            x = self.embed(imgs, ids_shuffle, self.visible)  # [N, 1+n, D]
        else:
            if tokens is None:
                raise ValueError(f"block {self.index} needs the previous block's tokens")
            x = tokens[:, : 1 + self.visible]  # [N, 1+n, D] incremental masking drops the tail
        out = self.encoder(x)  # [N, 1+n, D]
        if on_encoded is not None:
            on_encoded(out.detach())
        h = self.encoder.norm(out)  # [N, 1+n, D]
        target = patch_target(imgs, self.patch, norm_pix=self.norm_pix)  # [N, L, p*p*C]
        mask = hidden_mask(ids_restore, self.visible)  # [N, L]
        if self.decoder_chunks == 1:
            pred = self.decoder(h, ids_restore)  # [N, L, p*p*C]
            loss = masked_mse(pred, target, mask)
        else:
            count = mask.sum()

            def slice_loss(h_rows: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
                pred = self.decoder(h_rows, ids_restore[rows])  # [n_rows, L, p*p*C]
                return masked_mse(pred, target[rows], mask[rows], count=count), pred

            loss, pred = chunked_loss(slice_loss, h, list(self.decoder.parameters()), chunks=self.decoder_chunks)
        return UnitOutput(loss=loss, tokens=out.detach(), pred=pred)


def unit_indices(cfg: Config) -> list[int]:
    """Indices of the trainable units: one per block for BIM, a single one for MAE."""
    return [0] if cfg.method == "mae" else list(range(cfg.model.blocks))


def build_unit(cfg: Config, index: int) -> BlockUnit:
    """Initialise unit ``index`` from its own seed, so every process builds identical weights for it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_for(cfg.run.seed, 1000 + index))
        return BlockUnit(cfg, index)
