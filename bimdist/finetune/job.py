"""``bimdist finetune SOURCE [CONFIG] --depth K``: what to fine-tune, with which recipe, where the results go, and
how the ranks are started (standalone launcher, or the rank a launcher started).

SOURCE is a run folder (its config.yaml gives the data and the recipe; CONFIG, a preset or YAML file, may replace
them) or an exported ``.safetensors`` (CONFIG then gives the data and the recipe). The model's shape always comes
from SOURCE, so ``--model.*``, ``--masking.*`` and ``--method`` overrides are refused.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from bimdist.config import Config, ConfigError, load_config

SHAPE_SECTIONS = ("--model.", "--masking.", "--method")


@dataclass
class Plan:
    cfg: Config
    source: Path
    depth: int | None  # None: the export's own depth
    out: Path
    run_dir: Path | None  # the pretraining run, when SOURCE is one

    @property
    def is_export(self) -> bool:
        return self.run_dir is None


def plan(source: Path, *, depth: int | None, config: str | None, overrides: list[str]) -> Plan:
    """Resolve the config and the output folder; ConfigError (exit 2) for what cannot work."""
    bad = [o for o in overrides if o.startswith(SHAPE_SECTIONS)]
    if bad:
        raise ConfigError(f"bimdist finetune: {bad} change the model's shape, which comes from {source}; fine-tune "
                          "another run or export instead")
    if source.suffix == ".safetensors":
        if config is None:
            raise ConfigError(f"bimdist finetune: {source} is an export; give a CONFIG (preset or YAML) for its data "
                              "and recipe, e.g. `bimdist finetune model.safetensors fmnist-tiny`")
        if not source.is_file():
            raise ConfigError(f"bimdist finetune: {source} not found")
        cfg, run_dir = load_config(config, overrides), None
    else:
        if not source.is_dir():
            raise ConfigError(f"bimdist finetune: run folder {source} does not exist; give the run.dir of a "
                              "`bimdist train` run or an exported .safetensors")
        if not (source / "config.yaml").is_file():
            raise ConfigError(f"bimdist finetune: {source} has no config.yaml, so it is not a bimdist run folder")
        if depth is None:
            raise ConfigError("bimdist finetune: --depth K is required for a run folder (the blocks 1..K to keep)")
        run_cfg = load_config(str(source / "config.yaml"))
        if config is not None:  # the recipe and data of CONFIG, the model of the run
            cfg = load_config(config, overrides)
            shape = run_cfg.model_dump(include={"method", "model", "masking"})
            cfg = Config.model_validate({**cfg.model_dump(), **shape})
        else:
            cfg = load_config(str(source / "config.yaml"), overrides)
        blocks = cfg.model.blocks
        if not 1 <= depth <= blocks:
            raise ConfigError(f"bimdist finetune: --depth {depth} is out of range: the run has blocks 1..{blocks}")
        run_dir = source
    if depth is not None and depth < 1:
        raise ConfigError(f"bimdist finetune: --depth {depth} must be at least 1")
    f = cfg.finetune
    if f.mixup > 0 or f.cutmix > 0:
        local = f.batch_size // f.replicas
        if local % 2:
            raise ConfigError(f"finetune.batch_size={f.batch_size} gives {local} samples per rank; mixup / cutmix "
                              "pair samples within a batch, so it must be even")
    return Plan(cfg, source, depth, out_dir(cfg, source, depth), run_dir)


def out_dir(cfg: Config, source: Path, depth: int | None) -> Path:
    f = cfg.finetune
    if f.dir:
        return Path(f.dir)
    name = f"finetune-depth{depth}" if depth is not None else "finetune"
    if f.init == "scratch":
        name += "-scratch"
    if f.labels < 1:
        name += f"-labels{f.labels:g}"
    if f.seed:
        name += f"-seed{f.seed}"
    if source.suffix == ".safetensors":
        return source.with_name(f"{source.stem}-{name}")
    return source / name


def fingerprint(cfg: Config, plan_: Plan, kwargs: dict) -> str:
    """What shapes the fine-tuned weights: the network, its init and the recipe (not logging, eval or layout)."""
    keep = cfg.finetune.model_dump(mode="json", exclude={"eval_every", "eval_samples", "checkpoint_every",
                                                         "log_every", "replicas", "dir", "precision"})
    body = {"finetune": keep, "kwargs": kwargs, "depth": plan_.depth, "source": str(plan_.source),
            "data": cfg.data.model_dump(mode="json", include={"source", "train_shards", "mean", "std", "hflip",
                                                              "synthetic_size", "shuffle_buffer"})}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def main(source: Path, *, depth: int | None, config: str | None, overrides: list[str], argv: list[str],
         fresh: bool = False, local_rank_arg: int | None = None) -> int:
    """The ``finetune`` verb: one rank under a launcher, or the standalone launcher for ``finetune.replicas``."""
    from bimdist.distributed.env import detect
    from bimdist.train.signals import EXIT_CONFIG

    try:
        p = plan(source, depth=depth, config=config, overrides=overrides)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_CONFIG
    env = detect(local_rank_arg=local_rank_arg)
    if env is None and p.cfg.finetune.replicas > 1:
        from bimdist.distributed.launch import spawn_local
        from bimdist.distributed.topology import Topology
        from bimdist.telemetry.progress import setup_logging

        setup_logging("launcher")
        p.out.mkdir(parents=True, exist_ok=True)
        return spawn_local(argv, Topology(1, p.cfg.finetune.replicas), grace_s=p.cfg.pipeline.peer_timeout_s + 30,
                           restarts=0, policy="data-parallel fine-tuning: a dead rank ends the job (exit 3); run the "
                           "same command to resume from the newest checkpoint")
    from bimdist.finetune.trainer import run_rank

    return run_rank(p, env=env, fresh=fresh)
