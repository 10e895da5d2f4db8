"""Pictures of a run: original / masked input / every decoder's reconstruction, as one PNG grid."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from bimdist.config import Config
from bimdist.data.batches import eval_images
from bimdist.data.stream import DataStats
from bimdist.data.synthetic import synthetic_image
from bimdist.model.decoder import patchify, unpatchify
from bimdist.model.masking import hidden_mask, restore_ids, seed_for, shuffle_ids
from bimdist.model.unit import BlockUnit, normalize_images
from bimdist.runs import reconstruct

log = logging.getLogger("bimdist")


def sample_images(cfg: Config, n: int) -> torch.Tensor:
    """A few images, held out when there are test shards (else the first training images, or the synthetic
    source): uint8 [n, C, H, W]."""
    if cfg.data.source == "shards":
        pattern = cfg.data.test_shards or cfg.data.train_shards
        assert pattern is not None
        return eval_images(cfg, pattern, limit=n, stats=DataStats())[0]
    m = cfg.model
    return torch.stack([synthetic_image(10**6 + i, size=m.img_size, chans=m.in_chans, seed=cfg.run.seed)[0]
                        for i in range(n)])


def recon_grid(cfg: Config, units: list[BlockUnit], images: torch.Tensor) -> torch.Tensor:
    """Rows are samples; columns: original, masked input, then each block's reconstruction (visible patches
    pasted back, as in MAE's figures). Returns a float image grid in [0, 1]."""
    m = cfg.model
    g = torch.Generator().manual_seed(seed_for(cfg.run.seed, 9))
    ids = shuffle_ids(images.shape[0], m.num_patches, generator=g)  # [N, L]
    ids_restore = restore_ids(ids)
    mean, std = units[0].mean, units[0].std
    imgs = normalize_images(images, mean, std)  # [N, C, H, W]
    target = patchify(imgs, m.patch_size)  # [N, L, p*p*C]
    mu, sigma = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6) ** 0.5

    def show(x: torch.Tensor) -> torch.Tensor:  # normalised image -> displayable [0, 1]
        return (x * std + mean).clamp(0, 1)

    def paste(pred: torch.Tensor, visible: int) -> torch.Tensor:
        hidden = hidden_mask(ids_restore, visible).unsqueeze(-1)  # [N, L, 1]
        pred = pred * sigma + mu if m.norm_pix_loss else pred
        return unpatchify(target * (1 - hidden) + pred * hidden, m.patch_size, m.in_chans)

    masked = unpatchify(target * (1 - hidden_mask(ids_restore, units[0].visible).unsqueeze(-1)), m.patch_size,
                        m.in_chans)
    columns = [show(imgs), show(masked)]
    for unit, pred in zip(units, reconstruct(units, images, ids)):
        columns.append(show(paste(pred, unit.visible)))
    tiles = torch.stack(columns, dim=1).flatten(0, 1)  # [N*(2+K), C, H, W] row-major
    if tiles.shape[1] == 1:
        tiles = tiles.expand(-1, 3, -1, -1)
    scale = max(1, 112 // m.img_size)
    tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest")
    return make_grid(tiles, nrow=len(columns), padding=2, pad_value=1.0)


def write_recon_png(cfg: Config, units: list[BlockUnit], path: Path, *, samples: int = 8) -> Path:
    grid = recon_grid(cfg, units, sample_images(cfg, samples))
    save_image(grid, str(path))
    log.info("wrote reconstructions (columns: original, masked, block 1..%d) to %s", len(units), path)
    return path
