"""Reading a run folder back: its saved config and the units of its newest complete checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from bimdist.config import Config, ConfigError, load_config
from bimdist.model.unit import BlockUnit, build_unit, unit_indices
from bimdist.train.checkpoint import CheckpointError, CheckpointStore


def run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    """The config a run was trained with, from its ``config.yaml``, plus optional ``--section.key=value``."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} not found: {run_dir} is not a bimdist run folder (train writes config.yaml there)")
    return load_config(str(path), overrides)


def store_for(cfg: Config, run_dir: Path) -> CheckpointStore:
    return CheckpointStore(Path(run_dir) / "checkpoints", fingerprint=cfg.fingerprint(), blocks=unit_indices(cfg),
                           replicas=cfg.replica_counts[0], keep=cfg.checkpoint.keep)


def load_units(cfg: Config, run_dir: Path, *, step: int | None = None) -> tuple[list[BlockUnit], int]:
    """Every unit of the run with the weights of ``step`` (default: the newest complete checkpoint)."""
    store = store_for(cfg, run_dir)
    if step is None:
        step = store.latest()
        if step is None:
            raise CheckpointError(f"no complete checkpoint under {store.root}; train first (or wait for it to finish)")
    units = initial_units(cfg)
    for i, unit in zip(unit_indices(cfg), units):
        unit.load_state_dict(store.load_block(step, i)["model"])
    return units, step


def initial_units(cfg: Config) -> list[BlockUnit]:
    """Every unit of the run as its first step finds it (seeded, untrained), in eval mode."""
    return [build_unit(cfg, i).eval() for i in unit_indices(cfg)]


@torch.no_grad()
def reconstruct(units: list[BlockUnit], images: torch.Tensor, ids_shuffle: torch.Tensor) -> list[torch.Tensor]:
    """Every unit's prediction [N, L, p*p*C] for one batch, running the blocks in order."""
    preds, tokens = [], None
    for unit in units:
        out = unit(images, ids_shuffle, tokens)
        preds.append(out.pred)
        tokens = out.tokens
    return preds
