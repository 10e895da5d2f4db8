"""The end-to-end MAE model as a flat list of pipeline layers built from bimdist's own modules.

Each layer takes and returns a tuple ``(tokens, ids_shuffle)`` (the first takes ``(images, ids_shuffle)``; the
last returns predictions). Labels travel as one tensor: the norm-pix target with the loss mask appended as a
last channel, so both pipeline libraries can hand them to the loss function.
"""

from __future__ import annotations

import torch
from torch import nn

from bimdist.config import Config
from bimdist.data.batches import Batch
from bimdist.model.decoder import Decoder, masked_mse, patch_target
from bimdist.model.masking import hidden_mask, restore_ids
from bimdist.model.unit import build_unit, normalize_images
from bimdist.model.vit import Embedding


def _args(inputs: tuple) -> tuple:
    """DeepSpeed passes one tuple; torch.distributed.pipelining passes the tensors as separate arguments."""
    return inputs[0] if len(inputs) == 1 and isinstance(inputs[0], tuple) else inputs


class EmbedLayer(nn.Module):
    def __init__(self, embed: Embedding, visible: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.embed, self.visible = embed, visible
        self.register_buffer("mean", mean.clone(), persistent=False)
        self.register_buffer("std", std.clone(), persistent=False)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, ids = _args(inputs)
        return self.embed(normalize_images(images, self.mean, self.std), ids, self.visible), ids  # [N, 1+n, D]


class BlockLayer(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, ids = _args(inputs)
        return self.block(x), ids


class HeadLayer(nn.Module):
    def __init__(self, norm: nn.Module, decoder: Decoder):
        super().__init__()
        self.norm, self.decoder = norm, decoder

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        x, ids = _args(inputs)
        return self.decoder(self.norm(x), restore_ids(ids))  # [N, L, p*p*C]


class Chain(nn.Module):
    """Layers applied in order, tuples splatted (one pipeline stage for torch.distributed.pipelining)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, *inputs: torch.Tensor):
        out: object = inputs
        for layer in self.layers:
            out = layer(*out) if isinstance(out, tuple) else layer(out)
        return out


def mae_layers(cfg: Config) -> list[nn.Module]:
    """[embed, block 1..depth, norm + decoder] of the MAE baseline, initialised exactly as ``method: mae``."""
    mae = cfg.model_copy(update={"method": "mae", "masking": cfg.masking.model_copy(update={"extra_drop": None})})
    unit = build_unit(mae, 0)
    assert unit.embed is not None
    return [EmbedLayer(unit.embed, unit.visible, unit.mean, unit.std),
            *[BlockLayer(b) for b in unit.encoder.blocks], HeadLayer(unit.encoder.norm, unit.decoder)]


def mae_labels(cfg: Config, batch: Batch, visible: int) -> torch.Tensor:
    """[N, L, p*p*C + 1]: the per-patch target and, as the last channel, 1 where the patch was hidden."""
    unit_mean = torch.tensor(cfg.data.mean).view(1, -1, 1, 1)
    unit_std = torch.tensor(cfg.data.std).view(1, -1, 1, 1)
    imgs = normalize_images(batch.images, unit_mean, unit_std)
    target = patch_target(imgs, cfg.model.patch_size, norm_pix=cfg.model.norm_pix_loss)  # [N, L, p*p*C]
    mask = hidden_mask(restore_ids(batch.ids_shuffle), visible)  # [N, L]
    return torch.cat([target, mask.unsqueeze(-1)], dim=-1)


def mae_loss(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return masked_mse(pred, labels[..., :-1], labels[..., -1])
