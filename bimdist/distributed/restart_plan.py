"""Whether a dead stage can restart alone under a config, from where, and what the replay log needs for it.

Pure arithmetic on the config: the start-up line, ``bimdist doctor`` and the docs say the same thing. A stage
restarted alone resumes from its newest checkpoint (or the run's start) and needs every message its upstream sent
since then, which the upstream keeps in its replay log: memory up to ``pipeline.replay_memory_mb``, then disk up
to ``pipeline.replay_disk_mb``. Between two checkpoints the log holds one checkpoint interval of messages plus the
few steps that are in flight between the stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from bimdist.config import Config, visible_counts
from bimdist.distributed.topology import blocks_of_stage

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int16": 2, "int32": 4, "uint8": 1}


def message_shapes(cfg: Config, stage: int) -> list[tuple[tuple[int, ...], str]]:
    """What stage ``stage`` sends per step: visible tokens (fp32 or the wire dtype), the masking order, the pixels."""
    m = cfg.model
    local = cfg.data.batch_size // cfg.replica_counts[stage]  # the sender's rows: the most one route carries
    blocks = blocks_of_stage(m.blocks, cfg.pipeline.stages, stage)
    drops = cfg.masking.extra_drop or [0.0] * m.blocks
    nxt = visible_counts(m.num_patches, cfg.masking.mask_ratio, drops)[blocks[-1] + 1]
    wire = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.pipeline.wire_dtype, "float32")
    ids = "int16" if m.num_patches < 2**15 else "int32"
    return [((local, 1 + nxt, m.embed_dim), wire), ((local, m.num_patches), ids),
            ((local, m.in_chans, m.img_size, m.img_size), "uint8")]


def message_bytes(cfg: Config, stage: int) -> int:
    """Bytes of one message from ``stage`` to the next (header and alignment aside)."""
    total = 0
    for shape, dtype in message_shapes(cfg, stage):
        n = DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        total += n
    return total


def lag_steps(cfg: Config) -> int:
    """Steps a replay log holds beyond a checkpoint interval: what is queued and prefetched between the stage, its
    downstream and the one after that (whose need bounds the downstream's restart point)."""
    p = cfg.pipeline
    return 2 * (p.max_in_flight + p.prefetch) + 4


@dataclass(frozen=True)
class RestartPlan:
    alone: bool  # a dead stage is restarted alone at all (supervisor, restarts left, torch engine)
    line: str  # one sentence for the start-up log and the doctor
    log_steps: int = 0  # steps of the largest message that memory + disk caps hold
    needed_steps: int = 0  # steps one checkpoint interval needs (0: every step of the run)
    fits: bool = True


def restart_plan(cfg: Config, *, supervised: bool, launcher: str = "bimdist") -> RestartPlan:
    """What happens to a dead stage under ``cfg``. ``supervised``: something restarts single ranks (bimdist's own
    launcher, the per-task Slurm script); ``launcher`` names what started the job, for the line."""
    p, c = cfg.pipeline, cfg.checkpoint
    resume = (f"a whole-job restart (torchrun --max-restarts, Slurm --requeue, or the same command again) resumes "
              f"from the newest checkpoint every stage completed ({_cadence(cfg)})")
    if cfg.world_size == 1:
        return RestartPlan(False, f"one process: {resume}")
    if not supervised:
        return RestartPlan(False, f"no per-stage restart under {launcher} (it restarts whole jobs): a dead stage ends "
                                  f"the job (exit 3); {resume}")
    if p.engine != "torch":
        return RestartPlan(False, "no per-stage restart with the DeepSpeed engine (it needs its world group): a dead "
                                  f"stage ends the job (exit 3); {resume}")
    if p.stage_restarts == 0:
        return RestartPlan(False, f"pipeline.stage_restarts=0: a dead stage ends the job (exit 3); {resume}")
    start = f"a dead stage restarts alone (up to {p.stage_restarts} times) from its newest checkpoint " \
            f"({_cadence(cfg)}) or the run's start"
    if p.stages == 1:
        return RestartPlan(True, f"{start}, and a restarted replica rejoins its replicas")
    if not p.replay:
        return RestartPlan(True, f"{start}; pipeline.replay=false: the steps it missed are skipped, so the run is "
                                 "no longer exact")
    biggest = max(message_bytes(cfg, s) for s in range(p.stages - 1))
    held = ((p.replay_memory_mb + p.replay_disk_mb) << 20) // max(1, biggest)
    every = c.every or cfg.run.steps
    needed = min(every, cfg.run.steps) + lag_steps(cfg)
    caps = (f"each stage's replay log holds about {held:,} steps of this config's {_mib(biggest)} messages "
            f"(pipeline.replay_memory_mb={p.replay_memory_mb} + replay_disk_mb={p.replay_disk_mb})")
    if held >= needed:
        return RestartPlan(True, f"{start}; {caps}, enough for a checkpoint interval ({needed:,} steps)",
                           held, needed, True)
    fix_every = held - lag_steps(cfg)
    fix_disk = -(-needed * biggest // 2**20) - p.replay_memory_mb
    fixes = ([f"checkpoint.every <= {fix_every}"] if fix_every >= 10 else []) + [
        f"pipeline.replay_disk_mb >= {fix_disk}"] + (["pipeline.wire_dtype=bf16"] if p.wire_dtype in ("auto", "fp32")
                                                     else [])
    return RestartPlan(True, f"{start} only while the replay log holds its steps: {caps}, but a checkpoint interval "
                             f"needs {needed:,}; once a log passes its cap, a dead stage ends the job (exit 3) and a "
                             "whole-job restart resumes from the newest common checkpoint. To restart alone always: "
                             + " or ".join(fixes), held, needed, False)


def _cadence(cfg: Config) -> str:
    every = cfg.checkpoint.every
    if every == 0:
        return "checkpoint.every=0: only at the end"
    if every >= cfg.run.steps:
        return f"checkpoint.every={every} >= run.steps={cfg.run.steps}: only at the end"
    return f"every {every} steps"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB" if n < 100 << 20 else f"{n / 2**20:,.0f} MiB"
