"""A live accuracy monitor: every ``eval.monitor_every`` steps, each block's kNN top-1 on a small fixed labelled set.

Stage 0 reads the set once at start-up: ``eval.monitor_samples`` train images (the kNN's memory bank) and half as
many test images (its queries), centre views, every patch visible. On a monitor step the set flows down the
pipeline with that step's message, like a batch: each stage runs its blocks over it (no masking, no gradient),
scores each block's pooled features (the mean of the normed patch tokens, as ``bimdist eval`` and the export pool
them) with the same cosine kNN as ``bimdist eval``, and passes its blocks' output on. The weights are those after
``step`` steps, the same on every stage, and nothing the monitor does touches the training (no randomness drawn,
no state changed): a run with the monitor ends with the weights of one without.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bimdist.config import Config
from bimdist.model.unit import BlockUnit, normalize_images


@dataclass
class MonitorSet:
    images: torch.Tensor  # uint8 [n_bank + n_query, C, H, W]
    labels: torch.Tensor  # int64 [n_bank + n_query]
    n_bank: int


def load_monitor_set(cfg: Config) -> MonitorSet:
    """The bank from the train split, the queries from the test split (or the train images after the bank)."""
    from bimdist.evaluate import labelled_split

    n = cfg.eval.monitor_samples
    queries = max(1, n // 2)
    if cfg.data.source == "shards" and not cfg.data.test_shards:
        images, labels = labelled_split(cfg, "train", n + queries)
        return MonitorSet(images, labels, n)
    bank, yb = labelled_split(cfg, "train", n)
    query, yq = labelled_split(cfg, "test", queries)
    return MonitorSet(torch.cat([bank, query]), torch.cat([yb, yq]), len(bank))


@torch.no_grad()
def run_blocks(units: list[BlockUnit], *, images: torch.Tensor | None, tokens: torch.Tensor | None,
               labels: torch.Tensor, n_bank: int, knn_k: int) -> tuple[torch.Tensor, dict[int, float]]:
    """This stage's blocks over the whole set, every patch visible: (the last block's output tokens for the next
    stage, {block index: kNN top-1 percent})."""
    from bimdist.evaluate import knn

    scores: dict[int, float] = {}
    x = tokens
    for unit in units:
        if unit.embed is not None:
            assert images is not None
            x = unit.embed(normalize_images(images, unit.mean, unit.std), None, 0)  # [N, 1+L, D]
        assert x is not None
        x = unit.encoder(x)  # [N, 1+L, D]
        feats = unit.encoder.norm(x)[:, 1:].mean(1).float().cpu()  # [N, D]
        scores[unit.index] = knn(feats[:n_bank], labels[:n_bank].cpu(), feats[n_bank:], labels[n_bank:].cpu(),
                                 k=knn_k)
    assert x is not None
    return x, scores


def monitor_cost(cfg: Config, *, n: int = 2) -> float:
    """The monitor's compute as a share of training compute, for the costliest stage: forward FLOPs of its blocks
    over the whole set, against ``monitor_every`` training steps (forward and backward) of those blocks, both
    counted by torch's flop counter on ``n`` samples and scaled. 0 when the monitor is off."""
    from torch.utils.flop_counter import FlopCounterMode

    from bimdist.distributed.topology import blocks_of_stage
    from bimdist.model.masking import shuffle_ids
    from bimdist.model.unit import build_unit, unit_indices

    every = cfg.eval.monitor_every
    if not every:
        return 0.0
    m, p = cfg.model, cfg.pipeline
    units = [build_unit(cfg, i) for i in unit_indices(cfg)]
    stages = p.stages if cfg.method == "bim" else 1
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, m.in_chans, m.img_size, m.img_size), dtype=torch.uint8, generator=g)
    ids = shuffle_ids(n, m.num_patches, generator=g)
    train, tokens = [], None
    for unit in units:  # one training step of every unit, on n samples
        with FlopCounterMode(display=False) as fc:
            out = unit(images, ids, tokens)
            out.loss.backward()
        tokens = out.tokens
        train.append(fc.get_total_flops() / n)
    look, x = [], None
    with torch.no_grad():
        for unit in units:  # the monitor's pass: every patch visible, forward only
            with FlopCounterMode(display=False) as fc:
                if unit.embed is not None:
                    x = unit.embed(normalize_images(images, unit.mean, unit.std), None, 0)
                x = unit.encoder(x)
                unit.encoder.norm(x)
            look.append(fc.get_total_flops() / n)
    samples = cfg.eval.monitor_samples + max(1, cfg.eval.monitor_samples // 2)
    ratios = []
    for stage in range(stages):
        local = cfg.data.batch_size // cfg.replica_counts[stage]
        blocks = blocks_of_stage(len(units), stages, stage) if cfg.method == "bim" else [0]
        ratios.append(sum(look[b] for b in blocks) * samples / (every * local * sum(train[b] for b in blocks)))
    return max(ratios)
