"""``pipeline.engine: deepspeed``: each unit wrapped by ``deepspeed.initialize`` with its stage's replica group.

The DeepSpeed JSON config (a path, or inline under ``pipeline.deepspeed_config``) controls precision (bf16/fp16),
ZeRO stage 0-2 across the stage's replicas, gradient clipping and, optionally, the optimizer and scheduler.
bimdist fills in what it owns (batch sizes, the default AdamW + warmup/cosine schedule) and refuses keys that
are unknown to DeepSpeed or that contradict the bimdist config, before any training starts.

Engine checkpoints go through ``engine.save_checkpoint`` with one tag per step (``step_00000100``) shared by
every stage, under ``RUN_DIR/checkpoints/deepspeed/block_KK/``. They are read back with ``weights_only=True``
and an explicit allowlist of the few DeepSpeed types that ZeRO optimizer states contain.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import ValidationError
from timm.optim import param_groups_weight_decay
from torch import nn

from bimdist.config import Config, ConfigError
from bimdist.train.engine import StepStats, build_scheduler

log = logging.getLogger("bimdist.deepspeed")

# Top-level keys of a DeepSpeed config (DeepSpeed itself ignores unknown top-level keys silently).
KNOWN_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "fp16", "bf16", "amp", "torch_autocast", "zero_optimization", "gradient_clipping", "prescale_gradients",
    "gradient_predivide_factor", "communication_data_type", "seq_parallel_communication_data_type",
    "steps_per_print", "wall_clock_breakdown", "dump_state", "memory_breakdown", "flops_profiler", "tensorboard",
    "wandb", "csv_monitor", "comet", "activation_checkpointing", "sparse_gradients", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "checkpoint", "data_types", "timers", "compile", "aio", "elasticity",
    "data_efficiency", "curriculum_learning", "compression_training", "autotuning", "disable_allgather",
    "eigenvalue", "progressive_layer_drop", "use_node_local_storage", "load_universal_checkpoint",
    "graph_harvesting", "weight_quantization", "hybrid_engine", "nebula", "sparse_attention", "pipeline",
    "mics_shard_size", "mics_hierarchical_params_gather", "zero_quantized_weights", "zero_quantized_gradients",
    "zero_hpz_partition_size", "quantize_training",
}
# Keys bimdist owns: the activation pipeline is bimdist's, and so are the batch sizes.
OWNED = {"pipeline": "bimdist runs its own stage pipeline (pipeline.stages); remove the 'pipeline' section"}


def _load_user_config(source: str | dict[str, Any] | None) -> dict[str, Any]:
    if source is None:
        return {}
    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"pipeline.deepspeed_config: {path} not found") from None
    except ValueError as e:
        raise ConfigError(f"pipeline.deepspeed_config: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"pipeline.deepspeed_config: {path} must hold a JSON object")
    return data


def build_ds_config(cfg: Config) -> dict[str, Any]:
    """The user's DeepSpeed config merged with what bimdist owns; raises ConfigError naming any bad key."""
    user = _load_user_config(cfg.pipeline.deepspeed_config)
    problems = []
    for key in user:
        if key in OWNED:
            problems.append(f"deepspeed config: '{key}': {OWNED[key]}")
        elif key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"deepspeed config: '{key}' is not a DeepSpeed config key{hint}")
    global_batch, replicas = cfg.data.batch_size, cfg.replica_counts[0]  # equal counts (config check)
    wanted = {"train_batch_size": global_batch, "train_micro_batch_size_per_gpu": global_batch // replicas,
              "gradient_accumulation_steps": 1}
    for key, value in wanted.items():
        if key in user and user[key] != value:
            problems.append(f"deepspeed config: '{key}' is {user[key]} but bimdist runs {value} "
                            f"(data.batch_size={global_batch}, pipeline.replicas={replicas}); remove it")
    if user.get("fp16", {}).get("enabled") and user.get("bf16", {}).get("enabled"):
        problems.append("deepspeed config: 'fp16' and 'bf16' are both enabled; choose one")
    if cfg.run.precision != "fp32":
        problems.append("run.precision: with pipeline.engine=deepspeed the precision comes from the DeepSpeed "
                        "config ('bf16': {'enabled': true}); leave run.precision at fp32")
    clip = cfg.optim.clip_grad
    if "gradient_clipping" in user and clip is not None and user["gradient_clipping"] != clip:
        problems.append(f"deepspeed config: 'gradient_clipping' {user['gradient_clipping']} contradicts "
                        f"optim.clip_grad={cfg.optim.clip_grad}; set only one")
    stage = user.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        problems.append(f"deepspeed config: zero_optimization.stage {stage} is not supported per stage; use 0, 1 or 2")
    if problems:
        raise ConfigError("\n".join(problems))
    merged = {**user, **wanted}
    if cfg.optim.clip_grad is not None:
        merged["gradient_clipping"] = cfg.optim.clip_grad
    merged.setdefault("steps_per_print", 10**9)  # bimdist logs progress itself
    return merged


class StageMPU:
    """The ``mpu`` DeepSpeed asks for: data parallelism over this stage's replicas, no model parallelism."""

    def __init__(self, dp_group: Any, mp_group: Any):
        self.dp_group, self.mp_group = dp_group, mp_group

    def get_data_parallel_group(self) -> Any:
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.dp_group)

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.dp_group)

    def get_model_parallel_group(self) -> Any:
        return self.mp_group

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1


def _safe_globals() -> list[Any]:
    """DeepSpeed types that appear inside its checkpoints; everything else stays forbidden."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _safe_checkpoint_engine() -> Any:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals(_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine()


class DeepSpeedEngine:
    def __init__(self, unit: nn.Module, cfg: Config, *, index: int, ds_config: dict[str, Any], dp_group: Any,
                 mp_group: Any, checkpoint_root: Path):
        import deepspeed

        self.index = index
        self.ckpt_dir = Path(checkpoint_root) / "deepspeed" / f"block_{index:02d}"
        optimizer = None
        if "optimizer" not in ds_config:
            groups = param_groups_weight_decay(unit, cfg.optim.weight_decay)
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.optim.betas)
        try:
            engine, _, _, ds_scheduler = deepspeed.initialize(
                model=unit, optimizer=optimizer, config=ds_config, mpu=StageMPU(dp_group, mp_group),
                model_parameters=None if optimizer is not None else unit.parameters(), dist_init_required=False,
            )
        except ValidationError as e:  # DeepSpeed's own section models forbid unknown keys
            lines = [f"deepspeed config: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
            raise ConfigError("\n".join(lines)) from None
        engine.checkpoint_engine = _safe_checkpoint_engine()
        self.module = engine
        self.scheduler = None if ds_scheduler is not None else build_scheduler(engine.optimizer, cfg)
        self.tag: str | None = None

    def backward_step(self, loss: torch.Tensor, step: int, *, log: bool = False) -> StepStats:
        """DeepSpeed's engine reads its norm and overflow flag on the host itself; bimdist adds no further sync."""
        if self.scheduler is not None:
            self.scheduler.step_update(step + 1)
        self.module.backward(loss)
        self.module.step()
        norm = self.module.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        return StepStats(lr=float(self.module.get_lr()[0]), grad_norm=torch.tensor(norm),
                         skipped=torch.tensor(float(not self.module.was_step_applied())))

    def save(self, step: int) -> None:
        """Collective over the whole job (DeepSpeed barriers): every stage saves the same step and tag."""
        self.tag = f"step_{step:08d}"
        self.module.save_checkpoint(str(self.ckpt_dir), tag=self.tag, save_latest=False)

    def state_dict(self) -> dict[str, Any]:
        return {"deepspeed_tag": self.tag}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tag = state.get("deepspeed_tag")
        if not tag:
            raise ConfigError("this checkpoint was written by pipeline.engine=torch; resume with that engine")
        path, _ = self.module.load_checkpoint(str(self.ckpt_dir), tag=tag, load_module_strict=True)
        if path is None:
            raise ConfigError(f"DeepSpeed checkpoint {self.ckpt_dir / tag} is missing or incomplete")
        self.tag = tag
