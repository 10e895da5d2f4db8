"""MAE's fine-tuning recipe, from timm's parts: layer-wise lr decay, warm-up then cosine per update, mixup / cutmix
with soft targets, label smoothing, and an optional EMA of the weights.

timm's scheduler is the one that applies each parameter group's ``lr_scale`` (what layer decay sets); a plain torch
scheduler would silently train every layer at the head's lr.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from bimdist.config import FinetuneConfig


def base_lr(f: FinetuneConfig) -> float:
    return f.blr * f.batch_size / 256


def optimizer(model: nn.Module, f: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW over timm's layer-decay groups (no weight decay on norms, biases, position embedding, class token)."""
    return create_optimizer_v2(model, opt="adamw", lr=base_lr(f), weight_decay=f.weight_decay,
                               layer_decay=f.layer_decay, betas=(0.9, 0.999))


def scheduler(opt: torch.optim.Optimizer, f: FinetuneConfig, *, steps: int, steps_per_epoch: int) -> CosineLRScheduler:
    """Linear warm-up for ``warmup_epochs`` then a half cosine to ``min_lr``, updated every step (MAE's
    ``adjust_learning_rate`` per iteration)."""
    warmup = min(round(f.warmup_epochs * steps_per_epoch), max(0, steps - 1))
    return CosineLRScheduler(opt, t_initial=max(1, steps - warmup), lr_min=f.min_lr, warmup_t=warmup,
                             warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


@dataclass
class Objective:
    mixup: Mixup | None
    loss: nn.Module

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, target)


def objective(f: FinetuneConfig, *, num_classes: int) -> Objective:
    """Mixup / cutmix with soft targets (smoothing folded in), else smoothed or plain cross-entropy."""
    if f.mixup > 0 or f.cutmix > 0:
        mix = Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, prob=f.mixup_prob, switch_prob=f.mixup_switch_prob,
                    mode="batch", label_smoothing=f.smoothing, num_classes=num_classes)
        return Objective(mix, SoftTargetCrossEntropy())
    if f.smoothing > 0:
        return Objective(None, LabelSmoothingCrossEntropy(smoothing=f.smoothing))
    return Objective(None, nn.CrossEntropyLoss())


def ema(model: nn.Module, f: FinetuneConfig) -> Any:
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=f.ema_decay) if f.ema else None


def layer_scales(depth: int, decay: float) -> list[float]:
    """MAE's ``param_groups_lrd`` scales: layer 0 is the patch embedding, position embedding and class token,
    layer i + 1 is block i, and the last (depth + 1) the norm and head."""
    layers = depth + 1
    return [decay ** (layers - i) for i in range(layers + 1)]
