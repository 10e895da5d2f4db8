"""Run configuration: pydantic models, bundled presets, YAML files and dotted command-line overrides.

Every section forbids unknown keys, so a typo is an error that names the key instead of a silent default.
Cross-field rules (layer split, incremental masking, batch split) live in validators here, so a bad
config fails before any process, file or socket is opened.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, already phrased for the user (one line per problem)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    img_size: int = Field(28, gt=0)
    patch_size: int = Field(4, gt=0)
    in_chans: int = Field(1, gt=0)
    embed_dim: int = Field(192, gt=0)
    depth: int = Field(12, gt=0)
    num_heads: int = Field(3, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    blocks: int = Field(4, gt=0, description="S, the number of encoder blocks with a local decoder each")
    layers_per_block: list[int] | None = Field(None, description="explicit split, e.g. [1, 2, 1]; sums to depth")
    decoder_embed_dim: int = Field(128, gt=0)
    decoder_depth: int = Field(1, ge=0)
    decoder_num_heads: int = Field(4, gt=0)
    decoder_chunks: int = Field(
        1, ge=1, description="run each decoder over this many slices of the batch and recompute it in backward: "
        "less activation memory for one extra decoder forward; the gradients do not change",
    )
    norm_pix_loss: bool = True

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by "
                f"decoder_num_heads {self.decoder_num_heads}"
            )
        if self.layers_per_block is None:
            if self.depth % self.blocks:
                raise ValueError(
                    f"depth {self.depth} does not split evenly into blocks={self.blocks}; "
                    "choose a divisor or give layers_per_block explicitly"
                )
        else:
            if len(self.layers_per_block) != self.blocks or any(n < 1 for n in self.layers_per_block):
                raise ValueError(
                    f"layers_per_block {self.layers_per_block} must list {self.blocks} positive counts (one per block)"
                )
            if sum(self.layers_per_block) != self.depth:
                raise ValueError(f"layers_per_block {self.layers_per_block} sums to "
                                 f"{sum(self.layers_per_block)}, not depth {self.depth}")
        return self

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def split(self) -> list[int]:
        """Encoder layers owned by each block."""
        return list(self.layers_per_block or [self.depth // self.blocks] * self.blocks)


class MaskingConfig(Section):
    mask_ratio: float = Field(0.75, ge=0.0, lt=1.0)
    extra_drop: list[float] | None = Field(
        None, description="per-block fraction of the input-visible tokens dropped before that block"
    )

    @field_validator("extra_drop")
    @classmethod
    def _extra_drop(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        for i, f in enumerate(v):
            if not 0.0 <= f < 1.0:
                raise ValueError(f"extra_drop[{i}]={f} must be in [0, 1)")
        if any(b < a for a, b in zip(v, v[1:])):
            raise ValueError(f"extra_drop {v} must be non-decreasing (deeper blocks drop at least as much)")
        return v


class DataConfig(Section):
    source: Literal["shards", "synthetic"] = "shards"
    train_shards: str | None = Field(None, description="brace pattern of training tar shards")
    test_shards: str | None = Field(None, description="brace pattern of test tar shards (eval)")
    batch_size: int = Field(256, gt=0, description="global batch per step, split across replicas")
    shuffle_buffer: int = Field(2000, ge=1)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    mean: list[float] = [0.2860]
    std: list[float] = [0.3530]
    workers: int | Literal["auto"] = Field(
        "auto", description="stage 0's decode processes: a count (0: the rank decodes on a thread of its own), or "
        "auto = the cores this rank may use, less its torch threads")
    jpeg_draft: bool = Field(True, description="decode a JPEG at 1/2, 1/4 or 1/8 scale when its crop allows it")
    decode: Literal["cpu", "cuda"] = Field("cpu", description="cuda: workers read JPEGs, stage 0's GPU decodes and "
                                           "crops whole batches (nvJPEG)")
    timeout_s: float = Field(600.0, gt=0, description="a data worker that produces nothing this long is an error")
    epochs: int | None = Field(None, gt=0, description="stop when the data has been seen this often")
    synthetic_size: int = Field(4096, gt=0, description="samples per epoch of the synthetic source")
    log_corrupt_every: int = Field(100, gt=0, description="log every Nth skipped sample after the first")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if isinstance(self.workers, int) and self.workers < 0:
            raise ValueError(f"workers {self.workers} must be >= 0 or 'auto'")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale {self.crop_scale} must satisfy 0 < low <= high <= 1")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError("mean and std need one entry per channel and std must be positive")
        return self


class OptimConfig(Section):
    blr: float = Field(1.5e-4, gt=0, description="base lr; lr = blr * batch_size / 256")
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(100, ge=0)
    min_lr: float = Field(0.0, ge=0)
    clip_grad: float | None = Field(None, gt=0)


class PipelineConfig(Section):
    stages: int = Field(1, gt=0, description="stage processes per replica; each owns blocks/stages blocks")
    replicas: int | list[int] | Literal["auto"] = Field(
        1, description="data-parallel copies of each stage: one count for every stage, a list with one count per "
        "stage ([3, 2, 2, 1]: world size = the sum), or auto: counts chosen from measured stage costs for "
        "the world size the launcher gives (standalone: pipeline.devices)")
    devices: int | None = Field(None, gt=0, description="with replicas: auto and no launcher, the ranks to lay out")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    wire_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    host_staging: bool | Literal["auto"] = Field(
        "auto", description="send activations through host buffers (auto: when ranks share a GPU and use gloo)")
    max_in_flight: int = Field(2, ge=1, description="sends queued or in progress before a stage blocks")
    prefetch: int = Field(2, ge=1, description="received messages buffered ahead of compute")
    peer_timeout_s: float = Field(120.0, gt=0, le=3600, description="silence after which a peer is dead")
    startup_timeout_s: float = Field(600.0, gt=0, description="wait for the first message / rendezvous")
    threads: int | None = Field(None, gt=0, description="torch threads per process (default: cores / procs)")
    bind_cores: bool = Field(False, description="CPU: pin each local process to its own cores / procs slice")
    stage_restarts: int = Field(3, ge=0, description="restarts of one dead stage process before the job ends (0: "
                                "a dead stage ends the job); needs a supervisor that restarts single ranks")
    replay: bool = Field(True, description="keep sent messages until the next stage's restart point, so a "
                         "restarted stage recomputes exactly (off: it resumes at the current step and skips)")
    replay_memory_mb: int = Field(512, ge=1, description="replay log kept in memory; the rest spills to run.dir")
    replay_disk_mb: int = Field(4096, ge=0, description="replay log spilled to run.dir/replay/ per stage; past it "
                                "the oldest messages go and the next stage can no longer restart alone until its "
                                "next checkpoint (a dead one then ends the job, exit 3)")
    engine: Literal["torch", "deepspeed"] = "torch"
    deepspeed_config: str | dict[str, Any] | None = None


class MetricsConfig(Section):
    port: int = Field(0, ge=0, le=65535, description="base port; rank serves port + LOCAL_RANK; 0 disables")
    bind: str = Field("127.0.0.1", description="address the metrics listeners bind (0.0.0.0: every interface; a "
                      "Prometheus on another node cannot reach a loopback-only listener)")
    advertise: str | None = Field(None, description="host or address the file_sd targets name (default: bind, or for "
                                  "0.0.0.0 this node's address on the route to the job's store)")
    job: str = "bimdist"
    pushgateway: str | None = Field(None, description="host:port of a Prometheus Pushgateway")
    file_sd_dir: str | None = Field(None, description="folder Prometheus watches for file_sd targets")
    trace: bool = Field(False, description="record compute / wait spans for `bimdist trace merge`")
    live_bytes: bool = Field(False, description="record peak live tensor bytes per rank (slow; memory benchmarks)")
    peak_tflops: float | None = Field(None, gt=0, description="device peak for MFU (default: known GPUs' bf16)")


class CheckpointConfig(Section):
    every: int = Field(500, ge=0, description="checkpoint every N steps (0: only at the end). A stage restarted "
                       "alone resumes from its newest checkpoint, and the stage before it keeps every message since "
                       "in its replay log: the interval bounds both the work redone and that log (torchtitan's "
                       "default is 500 too)")
    keep: int = Field(2, ge=1, description="complete checkpoints kept")
    resume: Literal["auto", "never"] = "auto"


class RunConfig(Section):
    steps: int = Field(1000, gt=0)
    seed: int = 0
    dir: str = "runs/default"
    log_every: int = Field(20, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    stop_at: int | None = Field(None, gt=0, description="checkpoint and exit 0 after this step")
    preempt_signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"]] = ["SIGTERM", "SIGUSR1"]
    recon_png: bool = True
    eval_at_end: bool = False


class EvalConfig(Section):
    train_samples: int | None = Field(None, gt=0, description="train images the probes fit on (null: all)")
    test_samples: int | None = Field(None, gt=0, description="test images the probes are scored on (null: all)")
    knn_k: int = Field(20, gt=0, description="neighbours of the kNN vote")
    pool: Literal["avg", "cls"] = Field("avg", description="feature: mean of the patch tokens (timm's pooled "
                                        "output of the export), or the class token")
    batch_size: int = Field(500, gt=0, description="images per forward pass while extracting features")
    probe_c: list[float] = Field([0.001, 0.01, 0.1, 1.0, 10.0], min_length=1,
                                 description="inverse regularisation strengths the linear probe chooses from")
    holdout: float = Field(0.1, gt=0, lt=1, description="share of the train features that chooses C")
    probe_search_samples: int | None = Field(10000, gt=0, description="train features each candidate C is fitted "
                                             "on (null: all but the held-out share)")
    probe_max_iter: int = Field(1000, gt=0, description="L-BFGS iterations per probe fit")
    untrained: bool = Field(False, description="also probe the run's initial weights (its seeded, untrained "
                            "units) at full depth, a row that shows what pretraining added")
    monitor_every: int = Field(0, ge=0, description="train: every N steps each block's kNN top-1 on a small fixed "
                               "labelled set, as a log line and the bimdist_monitor_knn_top1 gauge (0: off)")
    monitor_samples: int = Field(1000, gt=1, description="the monitor's kNN bank (train images); half as many test "
                                 "images are its queries")
    probe_epochs: int | None = Field(None, description="unused since the linear probe is scikit-learn's; "
                                     "accepted so that the config.yaml of older runs still loads")


class FinetuneConfig(Section):
    """``bimdist finetune``: MAE's fine-tuning protocol (main_finetune.py) with timm's pieces. The defaults are MAE's
    ViT-B recipe scaled to a small model; each preset carries its own."""

    init: Literal["pretrained", "scratch"] = Field("pretrained", description="pretrained: the run's blocks (or the "
                                                   "export); scratch: the same network from random init (the control)")
    labels: float = Field(1.0, gt=0, le=1, description="share of the train labels used: a seeded, class-balanced "
                          "subset, the same images for every init and seed")
    labels_seed: int = Field(0, description="seed of that subset (kept apart from finetune.seed on purpose)")
    seed: int = Field(0, description="order, augmentation, head init, mixup and drop path")
    epochs: float = Field(10.0, gt=0, description="passes over the (subset of the) train labels")
    batch_size: int = Field(256, gt=0, description="global batch, split over the data-parallel ranks")
    blr: float = Field(5e-4, gt=0, description="base lr; lr = blr * batch_size / 256")
    layer_decay: float = Field(0.75, gt=0, le=1, description="lr scale layer_decay ** (layers - layer id)")
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr: float = Field(1e-6, ge=0)
    clip_grad: float | None = Field(None, gt=0)
    drop_path: float = Field(0.1, ge=0, lt=1)
    mixup: float = Field(0.8, ge=0, description="mixup alpha (0: off)")
    cutmix: float = Field(1.0, ge=0, description="cutmix alpha (0: off)")
    mixup_prob: float = Field(1.0, ge=0, le=1)
    mixup_switch_prob: float = Field(0.5, ge=0, le=1)
    smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing")
    auto_augment: str | None = Field("rand-m9-mstd0.5-inc1", description="timm RandAugment spec (null: off)")
    reprob: float = Field(0.25, ge=0, le=1, description="random erasing probability")
    remode: Literal["const", "rand", "pixel"] = "pixel"
    recount: int = Field(1, ge=1)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    input_size: int | None = Field(None, gt=0, description="fine-tuning resolution (null: model.img_size); the "
                                   "position embeddings are interpolated")
    eval_crop_pct: float = Field(1.0, gt=0, le=1, description="eval: resize to input_size / crop_pct, centre crop")
    ema: bool = Field(False, description="keep a ModelEmaV3 copy and evaluate it too")
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    eval_every: int = Field(0, ge=0, description="steps between evaluations (0: only at the end)")
    eval_samples: int | None = Field(None, gt=0, description="test images evaluated (null: all)")
    checkpoint_every: int = Field(500, ge=0, description="steps between checkpoints (0: only at the end)")
    log_every: int = Field(20, gt=0)
    replicas: int = Field(1, gt=0, description="data-parallel ranks the standalone launcher starts")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")
    dir: str | None = Field(None, description="output folder (null: RUN_DIR/finetune-depthK, with -scratch, "
                            "-labelsF and -seedS for other settings)")

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale {self.crop_scale} must satisfy 0 < low <= high <= 1")
        if self.batch_size % self.replicas:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by replicas={self.replicas}")
        return self


class Config(Section):
    method: Literal["bim", "mae"] = "bim"
    model: ModelConfig = ModelConfig()
    masking: MaskingConfig = MaskingConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    pipeline: PipelineConfig = PipelineConfig()
    metrics: MetricsConfig = MetricsConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    run: RunConfig = RunConfig()
    eval: EvalConfig = EvalConfig()
    finetune: FinetuneConfig = FinetuneConfig()

    @model_validator(mode="after")
    def _cross(self) -> Config:
        m, k, d, p = self.model, self.masking, self.data, self.pipeline
        if k.extra_drop is not None and len(k.extra_drop) != m.blocks:
            raise ValueError(f"masking.extra_drop has {len(k.extra_drop)} entries; model.blocks is {m.blocks}")
        counts = visible_counts(m.num_patches, k.mask_ratio, k.extra_drop or [0.0] * m.blocks)
        if counts[-1] < 1:
            raise ValueError(f"masking leaves no visible patch at the last block (visible per block: {counts})")
        if len(d.mean) != m.in_chans:
            raise ValueError(f"data.mean/std have {len(d.mean)} entries; model.in_chans is {m.in_chans}")
        if self.method == "mae" and any(k.extra_drop or []):
            raise ValueError("incremental masking (masking.extra_drop) is a BIM feature; set it to null for method mae")
        if self.method == "mae" and p.stages != 1:
            raise ValueError("method 'mae' trains end to end in one stage; set pipeline.stages=1")
        if m.blocks % p.stages:
            raise ValueError(f"model.blocks={m.blocks} does not split over pipeline.stages={p.stages}; "
                             "use a divisor of the block count")
        if p.replicas != "auto":
            counts = self.replica_counts
            if isinstance(p.replicas, list) and len(p.replicas) != p.stages:
                raise ValueError(f"pipeline.replicas {p.replicas} has {len(p.replicas)} counts but pipeline.stages is "
                                 f"{p.stages}; give one count per stage (or one int for every stage)")
            if any(c < 1 for c in counts):
                raise ValueError(f"pipeline.replicas {p.replicas}: every stage needs at least 1 replica")
            bad = [c for c in counts if d.batch_size % c]
            if bad:
                raise ValueError(f"data.batch_size={d.batch_size} does not split over pipeline.replicas {p.replicas} "
                                 f"(not divisible by {bad[0]}); each stage splits the global batch over its replicas")
            if p.engine == "deepspeed" and len(set(counts)) > 1:
                raise ValueError(f"pipeline.engine=deepspeed needs the same replica count on every stage (DeepSpeed "
                                 f"asserts one data-parallel size), got {p.replicas}; use the torch engine")
        elif p.engine == "deepspeed":
            raise ValueError("pipeline.replicas=auto can choose uneven counts, which pipeline.engine=deepspeed cannot "
                             "run; give the counts, or use the torch engine")
        if d.source == "shards" and not d.train_shards:
            raise ValueError("data.source is 'shards' but data.train_shards is empty; "
                             "run `bimdist data prepare` and set data.train_shards, or use data.source=synthetic")
        if self.run.stop_at is not None and self.run.stop_at > self.run.steps:
            raise ValueError(f"run.stop_at={self.run.stop_at} is beyond run.steps={self.run.steps}")
        return self

    @property
    def replica_counts(self) -> tuple[int, ...]:
        """One replica count per stage (``pipeline.replicas`` as given; not for ``auto`` before it is resolved)."""
        r = self.pipeline.replicas
        if r == "auto":
            raise ConfigError("pipeline.replicas=auto is resolved when the job starts (bimdist doctor --devices N "
                              "shows the layout it would choose)")
        return tuple(r) if isinstance(r, list) else (r,) * self.pipeline.stages

    @property
    def world_size(self) -> int:
        return sum(self.replica_counts)

    @property
    def lr(self) -> float:
        return self.optim.blr * self.data.batch_size / 256

    def fingerprint(self) -> str:
        """Hash of everything that shapes the weights; checkpoints from another fingerprint are refused."""
        keep = self.model_dump(include={"method", "model", "masking"})
        keep["optim_betas"] = list(self.optim.betas)
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def visible_counts(num_patches: int, mask_ratio: float, extra_drop: list[float]) -> list[int]:
    """Tokens visible at each block: the input keep count, then minus each block's extra drop."""
    keep = int(num_patches * (1 - mask_ratio))
    return [int(keep * (1 - f)) for f in extra_drop]


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("bimdist.presets").iterdir() if p.name.endswith(".yaml"))


def _read_source(source: str | None) -> dict[str, Any]:
    if source is None:
        return {}
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {source} not found; give a YAML path or one of the presets "
                              f"{', '.join(preset_names())}")
        text = path.read_text()
    elif source in preset_names():
        text = resources.files("bimdist.presets").joinpath(f"{source}.yaml").read_text()
    else:
        raise ConfigError(f"unknown config {source!r}: not a file and not a preset "
                          f"(presets: {', '.join(preset_names())})")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {source} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {source} must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ['--model.blocks=4', '--data.batch_size', '64'] into a nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} has no value; write --{key}=VALUE")
            raw = args[i + 1]
            i += 1
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key} conflicts with another override of {part}")
        node[parts[-1]] = value
        i += 1
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `bimdist train --help` for the sections)"
        got = e.get("input")
        shown = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"config error: {loc}: {msg}{shown}")
    return "\n".join(lines)


def load_config(source: str | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Preset or YAML file, then overrides; raises ConfigError with one line per problem."""
    data = _read_source(source)
    over = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    try:
        return Config.model_validate(_merge(data, over))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
