"""Masking index math: MAE random masking and BIM's incremental (nested) masking.

Tokens always travel in *shuffle order*: position j of a block's input is patch ``ids_shuffle[:, j]``.
Block k sees the first ``visible[k]`` of them, so dropping extra tokens before a deeper block is a slice,
and the visible sets are nested by construction (a prefix of a prefix). Decoder k reconstructs every
patch that block k did not see: the input-masked patches plus those dropped by incremental masking.
"""

from __future__ import annotations

import torch


def shuffle_ids(batch: int, num_patches: int, *, generator: torch.Generator) -> torch.Tensor:
    """MAE's noise-argsort: a uniformly random permutation of the patches per sample."""
    noise = torch.rand(batch, num_patches, generator=generator)  # [N, L]
    return torch.argsort(noise, dim=1)  # [N, L]


def restore_ids(ids_shuffle: torch.Tensor) -> torch.Tensor:
    """Inverse permutation: ``gather(x_shuffled, ids_restore)`` puts patches back in image order."""
    return torch.argsort(ids_shuffle, dim=1)  # [N, L]


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Select tokens ``x[n, ids[n, j]]`` for every sample: [N, L, D] x [N, K] -> [N, K, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def hidden_mask(ids_restore: torch.Tensor, visible: int) -> torch.Tensor:
    """1.0 for every patch not among the first ``visible`` in shuffle order, in image order: [N, L]."""
    n, length = ids_restore.shape
    mask = torch.ones(n, length, device=ids_restore.device)  # [N, L] in shuffle order
    mask[:, :visible] = 0
    return torch.gather(mask, 1, ids_restore)  # [N, L] in image order


def seed_for(seed: int, *parts: int) -> int:
    """A stable 63-bit seed derived from the run seed and integers such as (step,) or (epoch, index)."""
    h = seed & 0xFFFFFFFFFFFF
    for p in parts:
        h = (h * 6364136223846793005 + (p & 0xFFFFFFFFFFFF) + 1442695040888963407) % (1 << 63)
    return h
