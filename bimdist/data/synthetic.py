"""A deterministic synthetic image source for tests and smoke runs: sample i is a pure function of (seed, i).

Images are oriented gratings (orientation set by the class) plus a bright blob, so a masked autoencoder has
structure to learn and a linear probe has classes to find.
"""

from __future__ import annotations

import math

import torch

from bimdist.model.masking import seed_for

NUM_CLASSES = 10


def synthetic_image(index: int, *, size: int, chans: int, seed: int) -> tuple[torch.Tensor, int]:
    """uint8 [C, H, W] image and its label for sample ``index``."""
    g = torch.Generator().manual_seed(seed_for(seed, 7, index))
    label = index % NUM_CLASSES
    r = torch.rand(6, generator=g)
    axis = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")  # [H, W]
    theta = label * math.pi / NUM_CLASSES + 0.15 * (r[0] - 0.5)
    freq = 2.0 + 2.0 * r[1]
    grating = torch.sin(freq * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) + 2 * math.pi * r[2])
    cx, cy = 1.2 * r[3] - 0.6, 1.2 * r[4] - 0.6
    blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.05 + 0.1 * r[5]))
    img = 0.45 + 0.3 * grating + 0.35 * blob  # [H, W]
    tint = torch.linspace(0.8, 1.2, chans).view(chans, 1, 1) if chans > 1 else torch.ones(1, 1, 1)
    img = (img.unsqueeze(0) * tint).clamp(0, 1)  # [C, H, W]
    return (img * 255).round().to(torch.uint8), label
