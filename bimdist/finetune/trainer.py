"""One fine-tuning rank: data-parallel training of MAE's recipe, evaluation, checkpoints, preemption, metrics.

Ranks average gradients with DDP (a gloo or NCCL process group built on the job's store, as the pipeline's are).
Every random draw is seeded by its place: each sample's augmentation by its place in the stream, each step's mixup
and drop path by (seed, step, rank). So a run preempted and resumed from a checkpoint ends with the weights of one
that never stopped, and two ranks train on exactly the global batch one rank does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from bimdist.config import ConfigError
from bimdist.data.loader import resolve_workers
from bimdist.data.stream import DataError, DataStats, Position
from bimdist.distributed.env import (
    RankEnv,
    pick_backend,
    pick_device,
    set_cpu_threads,
    usable_cores,
    use_gloo_interface,
)
from bimdist.distributed.transport import PeerError
from bimdist.finetune import data as fdata
from bimdist.finetune import recipe
from bimdist.finetune.job import Plan, fingerprint
from bimdist.finetune.metrics import FinetuneMetrics
from bimdist.finetune.model import FinetuneError, Pretrained, build, from_export, from_run
from bimdist.model.masking import seed_for
from bimdist.telemetry.progress import setup_logging
from bimdist.train.checkpoint import CheckpointError, CheckpointStore, IncompatibleCheckpoint, atomic_write
from bimdist.train.signals import (
    EXIT_CHECKPOINT,
    EXIT_CONFIG,
    EXIT_DATA,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PEER,
    EXIT_PREEMPTED,
    StopFlag,
)

log = logging.getLogger("bimdist.finetune")


def run_rank(plan: Plan, *, env: RankEnv | None, fresh: bool = False) -> int:
    """Run this rank; every failure becomes a logged reason and an exit code."""
    env = env or RankEnv(0, 1, 0, 1, "127.0.0.1", 0, "none")
    setup_logging(f"finetune rank={env.rank}" if env.world_size > 1 else "finetune")
    trainer = Trainer(plan, env)
    try:
        return trainer.run(fresh=fresh)
    except (ConfigError, FinetuneError, IncompatibleCheckpoint) as e:
        return trainer.fail(EXIT_CONFIG, f"{type(e).__name__}: {e}")
    except DataError as e:
        return trainer.fail(EXIT_DATA, f"data error: {e}")
    except CheckpointError as e:
        return trainer.fail(EXIT_CHECKPOINT, f"checkpoint error: {e}")
    except (PeerError, dist.DistError) as e:
        return trainer.fail(EXIT_PEER, f"peer failure: {str(e).splitlines()[0][:300]}")
    except RuntimeError as e:
        if "Connection closed by peer" in str(e) or "Connection reset" in str(e) or "Timed out" in str(e):
            return trainer.fail(EXIT_PEER, f"peer failure (another rank died or hung): {str(e).splitlines()[0][:300]}")
        log.exception("unexpected error")
        return trainer.fail(EXIT_ERROR, "fine-tuning failed with an unexpected error (traceback above)")
    except KeyboardInterrupt:
        return trainer.fail(EXIT_ERROR, "interrupted")
    except Exception:
        log.exception("unexpected error")
        return trainer.fail(EXIT_ERROR, "fine-tuning failed with an unexpected error (traceback above)")


class Trainer:
    def __init__(self, plan: Plan, env: RankEnv):
        self.plan, self.env, self.cfg, self.f = plan, env, plan.cfg, plan.cfg.finetune
        self.rank, self.world = env.rank, env.world_size
        self.metrics: FinetuneMetrics | None = None
        self.file_sd: Any = None
        self.stats = DataStats(log_every=self.cfg.data.log_corrupt_every)

    # ---- set-up ------------------------------------------------------------------------------------------
    def _devices(self) -> None:
        p = self.cfg.pipeline
        self.device = pick_device(p.device, self.env.local_rank)
        if self.device.type == "cpu":
            threads, cores = set_cpu_threads(self.env.local_world_size, p.threads, local_rank=self.env.local_rank,
                                             bind=p.bind_cores)
            share = len(cores) if p.bind_cores else len(cores) // max(1, self.env.local_world_size)
        else:
            threads, share = 1, len(usable_cores()) // max(1, self.env.local_world_size)
        self.workers = resolve_workers(self.cfg.data.workers, cores=share, torch_threads=threads)
        bf16 = self.f.precision == "bf16" or (self.f.precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)
        log.info("finetune rank %d of %d: %s, %d torch threads, %d data workers, %s", self.rank, self.world,
                 self.device, threads, self.workers, "bf16" if bf16 else "fp32")

    def _group(self) -> None:
        if self.world == 1:
            return
        from bimdist.distributed.groups import job_store
        from bimdist.train.run import restart_count

        p = self.cfg.pipeline
        backend = pick_backend(p.backend, self.device, local_ranks=self.env.local_world_size)
        if backend == "gloo":
            use_gloo_interface(self.env.master_addr)
        store = job_store(self.env, timeout_s=p.startup_timeout_s, generation=restart_count())
        dist.init_process_group(backend=backend, store=dist.PrefixStore("finetune/", store), rank=self.rank,
                                world_size=self.world, timeout=timedelta(seconds=p.peer_timeout_s))

    def _pretrained(self) -> Pretrained:
        weights = self.f.init == "pretrained"
        if self.plan.is_export:
            return from_export(self.plan.source, self.plan.depth, weights=weights)
        assert self.plan.depth is not None
        run_cfg = self.cfg if self.plan.run_dir is None else _run_config(self.plan.run_dir)
        return from_run(run_cfg, self.plan.run_dir, self.plan.depth, weights=weights)

    # ---- the run -----------------------------------------------------------------------------------------
    def run(self, *, fresh: bool) -> int:
        f, out = self.f, self.plan.out
        self._devices()
        self._group()
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(self.cfg.to_yaml())
        pre = self._pretrained()
        index = fdata.label_index(self.cfg, self.stats)
        keep = fdata.label_subset(index, f.labels, f.labels_seed) if f.labels < 1 else None
        n_train = len(keep) if keep is not None else len(index.keys)
        chosen = sorted(keep) if keep is not None else sorted(index.keys)
        self.labels_sha256 = hashlib.sha256("\n".join(chosen).encode()).hexdigest()
        if self.rank == 0:  # which train images this run may learn from, one key a line: the same for every arm
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "train-labels.txt", ("\n".join(chosen) + "\n").encode())
        self.num_classes = index.num_classes
        steps_per_epoch = n_train // f.batch_size
        if steps_per_epoch == 0:
            raise ConfigError(f"finetune.batch_size={f.batch_size} is larger than the {n_train} train labels in use "
                              f"(finetune.labels={f.labels:g}); lower the batch size")
        self.steps = max(1, math.ceil(f.epochs * steps_per_epoch))
        self.steps_per_epoch = steps_per_epoch
        torch.manual_seed(seed_for(f.seed, 15))  # the head (and, from scratch, every weight) from the run's seed
        model = build(pre, num_classes=self.num_classes, drop_path=f.drop_path, input_size=f.input_size)
        model.to(self.device)
        self.model = model
        self.ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=None if self.device.type == "cpu"
                                                               else [self.device.index])
                    if self.world > 1 else model)
        self.opt = recipe.optimizer(model, f)
        self.sched = recipe.scheduler(self.opt, f, steps=self.steps, steps_per_epoch=steps_per_epoch)
        self.objective = recipe.objective(f, num_classes=self.num_classes)
        self.ema = recipe.ema(model, f)
        self.fp = fingerprint(self.cfg, self.plan, pre.kwargs)
        self.store = CheckpointStore(out / "checkpoints", fingerprint=self.fp, blocks=[0], replicas=1, keep=2)
        self.metrics = FinetuneMetrics(self.cfg, rank=self.rank, local_rank=self.env.local_rank, depth=pre.depth,
                                       fingerprint=self.fp)
        self.metrics.target.set(self.steps)
        m = self.cfg.metrics
        if m.file_sd_dir and m.port and self.env.local_rank == 0:  # the same Prometheus discovery as pretraining
            from bimdist.telemetry.metrics import FileSDTarget, advertised_address

            address = advertised_address(self.cfg, self.env.master_addr if self.world > 1 else None)
            self.file_sd = FileSDTarget(Path(m.file_sd_dir), job=m.job, address=address,
                                        ports=[m.port + i for i in range(self.env.local_world_size)])
        if self.rank == 0:
            log.info("fine-tuning %s: %s, depth %d (%d layers), %d classes, %d train labels (finetune.labels=%g), "
                     "%d steps of %d (%.3g epochs), lr %.3g, layer decay %g; output in %s", f.init, pre.source,
                     pre.depth, pre.kwargs["depth"], self.num_classes, n_train, f.labels, self.steps, f.batch_size,
                     self.steps / steps_per_epoch, recipe.base_lr(f), f.layer_decay, out)
        start, position, history = self._resume(fresh)
        stop = StopFlag()
        stop.install(self.cfg.run.preempt_signals)
        from bimdist.distributed.launch import watch_parent

        watch = watch_parent(stop) if self.world > 1 else None
        t0 = time.perf_counter()
        step, reason = self._train(start, position, keep, stop, history)
        if watch is not None:
            watch.say_why()
        if reason == "signal":
            self._finish()
            return EXIT_PREEMPTED
        final = self._evaluate(step, history)
        if self.rank == 0:
            self._write_result(pre, n_train, final, history, minutes=(time.perf_counter() - t0) / 60, step=step)
        self._finish()
        return EXIT_OK

    def _resume(self, fresh: bool) -> tuple[int, Position, list[dict]]:
        if fresh and self.rank == 0:
            moved = self.store.set_aside()
            if moved:
                log.warning("--fresh: previous fine-tuning checkpoints moved to %s", moved)
        if self.world > 1:
            dist.barrier()
        step = self.store.latest() if not fresh else None
        if step is None:
            return 0, Position(), []
        state = self.store.load_block(step, 0, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])
        log.info("resumed fine-tuning from %s (step %d)", self.store.step_dir(step), step)
        return step, self.store.load_position(step), list(state.get("history", []))

    def _train(self, start: int, position: Position, keep: set[str] | None, stop: StopFlag,
               history: list[dict]) -> tuple[int, str]:
        f = self.f
        chunks = fdata.TrainChunks(self.cfg, keep=keep, rank=self.rank, world=self.world, start=position,
                                   start_step=start, stats=self.stats, sample_bytes=fdata.sample_bytes(self.cfg))
        loader = fdata.batches(chunks, fdata.Transformer(self.cfg, train=True), workers=self.workers,
                               timeout_s=self.cfg.data.timeout_s)
        it = iter(loader)
        step, window, t_window = start, [], time.perf_counter()
        self.metrics.step.set(step)
        try:
            while step < self.steps:
                if self._agree(stop.requested):
                    log.warning("stopping at step %d (%s): checkpointing, exit %d", step, stop.signal_name,
                                EXIT_PREEMPTED)
                    self._checkpoint(step, position, history)
                    return step, "signal"
                images, labels, position = self._next_batch(it, step)
                loss = self._step(step, images, labels)
                window.append(loss)
                step += 1
                self.metrics.steps.inc()
                self.metrics.samples.inc(len(labels))
                self.metrics.step.set(step)
                self.metrics.last_step.set(time.time())
                if step % f.log_every == 0 or step == self.steps:
                    now = time.perf_counter()
                    mean = float(torch.stack(window).mean())
                    lr = max(g["lr"] for g in self.opt.param_groups)
                    self.metrics.loss.set(mean)
                    self.metrics.lr.set(lr)
                    if self.rank == 0:
                        log.info("finetune step=%d/%d epoch=%.2f loss=%.4f lr=%.3e samples_per_s=%.1f", step,
                                 self.steps, step / self.steps_per_epoch, mean, lr,
                                 len(window) * f.batch_size / max(1e-9, now - t_window))
                    window, t_window = [], now
                if f.eval_every and step % f.eval_every == 0 and step < self.steps:
                    self._evaluate(step, history)
                if f.checkpoint_every and step % f.checkpoint_every == 0 and step < self.steps:
                    self._checkpoint(step, position, history)
        finally:
            del it  # stops the data workers
        self._checkpoint(step, position, history)
        return step, "done"

    def _agree(self, flag: bool) -> bool:
        """Any rank's signal stops every rank at the same step."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _next_batch(self, it: Any, step: int) -> tuple[torch.Tensor, torch.Tensor, Position]:
        parts = []
        while True:
            try:
                d: fdata.Decoded = next(it)
            except StopIteration:
                raise DataError(f"the train stream ended at step {step}") from None
            except RuntimeError as e:
                raise DataError(f"fine-tuning data loading failed: {str(e).splitlines()[0]}") from None
            for what, why in d.skipped:
                self.stats.skip(what, why)
            parts.append(d)
            if d.boundary is not None:
                break
        assert all(p.step == step for p in parts), (step, [p.step for p in parts])
        images = torch.cat([p.images for p in parts]).to(self.device, non_blocking=True)
        labels = torch.cat([p.labels for p in parts]).to(self.device, non_blocking=True)
        return images, labels, parts[-1].boundary

    def _step(self, step: int, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        f = self.f
        self.sched.step_update(step)  # MAE: the lr of this iteration's place in the schedule, lr_scale applied
        np.random.seed(seed_for(f.seed, 13, step, self.rank) % 2**32)  # mixup / cutmix draw from numpy
        torch.manual_seed(seed_for(f.seed, 14, step, self.rank))  # drop path draws from torch
        target = labels
        if self.objective.mixup is not None:
            images, target = self.objective.mixup(images, labels)
        self.ddp.train()
        with self.autocast:
            logits = self.ddp(images)
        loss = self.objective(logits.float(), target)
        if not torch.isfinite(loss):
            raise ConfigError(f"the fine-tuning loss is {loss.item()} at step {step}; lower finetune.blr or set "
                              "finetune.clip_grad")
        loss.backward()
        if f.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), f.clip_grad)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=step)
        return loss.detach()

    # ---- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def _accuracy(self, model: torch.nn.Module) -> tuple[float, float, int]:
        f = self.f
        size = max(1, min(256, fdata.CHUNK_BYTES // fdata.sample_bytes(self.cfg)))
        chunks = fdata.EvalChunks(self.cfg, rank=self.rank, world=self.world, limit=f.eval_samples, stats=self.stats,
                                  size=size)
        loader = fdata.batches(chunks, fdata.Transformer(self.cfg, train=False), workers=self.workers,
                               timeout_s=self.cfg.data.timeout_s)
        model.eval()
        counts = torch.zeros(3, dtype=torch.float64)
        k = min(5, self.num_classes)
        for d in loader:
            if not len(d.labels):
                continue
            with self.autocast:
                logits = model(d.images.to(self.device)).float()
            top = logits.topk(k, dim=1).indices.cpu()  # [n, k]
            hit = top == d.labels.unsqueeze(1)
            counts += torch.tensor([float(hit[:, 0].sum()), float(hit.any(1).sum()), float(len(d.labels))],
                                   dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(counts)
        if counts[2] == 0:
            raise DataError("no test sample could be evaluated")
        return 100 * float(counts[0] / counts[2]), 100 * float(counts[1] / counts[2]), int(counts[2])

    def _evaluate(self, step: int, history: list[dict]) -> dict:
        t0 = time.perf_counter()
        top1, top5, n = self._accuracy(self.model)
        row = {"step": step, "epoch": step / self.steps_per_epoch, "top1": top1, "top5": top5, "images": n}
        if self.ema is not None:
            row["ema_top1"], row["ema_top5"], _ = self._accuracy(self.ema.module)
        history.append(row)
        self.metrics.top1.set(top1)
        self.metrics.top5.set(top5)
        if self.rank == 0:
            log.info("finetune eval step=%d top1=%.2f top5=%.2f images=%d%s (%.0f s)", step, top1, top5, n,
                     f" ema_top1={row['ema_top1']:.2f}" if self.ema is not None else "", time.perf_counter() - t0)
        return row

    # ---- checkpoints and results -------------------------------------------------------------------------
    def _checkpoint(self, step: int, position: Position, history: list[dict]) -> None:
        if step == 0 and not history:
            return
        if self.rank == 0 and self.store.verify(step) is not None:
            state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": step,
                     "history": history}
            if self.ema is not None:
                state["ema"] = self.ema.module.state_dict()
            self.store.save_block(step, 0, state)
            self.store.save_position(step, position)
            self.store.finish(step)
            log.info("finetune checkpoint step=%d dir=%s", step, self.store.step_dir(step))
        if self.world > 1:
            dist.barrier()

    def _write_result(self, pre: Pretrained, n_train: int, final: dict, history: list[dict], *, minutes: float,
                      step: int) -> None:
        f = self.f
        body = {"top1": final["top1"], "top5": final["top5"], "ema_top1": final.get("ema_top1"),
                "init": f.init, "depth": pre.depth, "layers": pre.kwargs["depth"], "source": pre.source,
                "pretrain_step": pre.step, "labels": f.labels, "labels_seed": f.labels_seed, "seed": f.seed,
                "train_labels": n_train, "train_labels_sha256": self.labels_sha256, "test_images": final["images"],
                "steps": step,
                "epochs": step / self.steps_per_epoch, "batch_size": f.batch_size, "ranks": self.world,
                "minutes_this_process": minutes, "recipe": f.model_dump(mode="json"), "history": history,
                "fingerprint": self.fp}
        path = self.plan.out / "result.json"
        atomic_write(path, json.dumps(body, indent=1).encode())
        log.info("finetune result: top1=%.2f top5=%.2f (%s, depth %d, %g%% of the labels, seed %d) -> %s",
                 final["top1"], final["top5"], f.init, pre.depth, 100 * f.labels, f.seed, path)

    def _finish(self) -> None:
        if self.file_sd is not None:
            self.file_sd.remove()
        if self.metrics is not None:
            self.metrics.close()
        if dist.is_initialized():
            dist.destroy_process_group()

    def fail(self, code: int, msg: str) -> int:
        log.error("%s", msg)
        if self.file_sd is not None:
            self.file_sd.remove()
        if self.metrics is not None:
            self.metrics.close()
        if self.world > 1:  # collectives may still block: leave now
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code


def _run_config(run_dir: Path) -> Any:
    from bimdist.runs import run_config

    return run_config(run_dir)
