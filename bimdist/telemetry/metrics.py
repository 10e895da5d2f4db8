"""Prometheus metrics per rank, the Pushgateway outcome of batch jobs, and file_sd target files.

Each rank serves ``/metrics`` on ``metrics.port + LOCAL_RANK`` at ``metrics.bind``. Labels are ``stage``,
``replica`` and ``job`` only. Every series exists (at zero) from the start, so dashboards and alerts never
see a metric appear late.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import socket
import time
from pathlib import Path

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    push_to_gateway,
    start_http_server,
)

from bimdist import __version__
from bimdist.config import Config, ConfigError
from bimdist.telemetry.progress import StepRecord

log = logging.getLogger("bimdist.metrics")

LABELS = ("stage", "replica", "job")
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Metrics:
    """An Observer of the stage loop that keeps a private registry (no module-level state)."""

    def __init__(self, cfg: Config, *, stage: int, replica: int, local_rank: int, device: torch.device,
                 blocks: list[int] | None = None):
        """``blocks``: the units this rank trains (a ``block`` label of the monitor's gauge each)."""
        blocks = blocks or []
        self.cfg, self.device = cfg, device
        disable_created_metrics()  # no *_created series: they double the series count and no panel uses them
        self.labels = {"stage": str(stage), "replica": str(replica), "job": cfg.metrics.job}
        self.registry = CollectorRegistry()
        r = self.registry

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=r).labels(**self.labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=r).labels(**self.labels)

        self.steps = counter("bimdist_steps", "Training steps finished by this rank")
        self.samples = counter("bimdist_samples", "Samples processed by this rank")
        self.loss = gauge("bimdist_loss", "Local reconstruction loss of this stage (mean over its blocks)")
        self.step_duration = Histogram("bimdist_step_duration_seconds", "Wall time per step", LABELS,
                                       buckets=STEP_BUCKETS, registry=r).labels(**self.labels)
        self.compute = counter("bimdist_compute_seconds", "Time spent computing (forward, backward, step)")
        self.busy = counter("bimdist_busy_seconds", "Compute time without the replicas' gradient all-reduce: "
                            "this replica's own work, which a straggler has more of than its stage's others")
        self.replica_count = gauge("bimdist_stage_replicas", "Data-parallel replicas of this rank's stage")
        self.replica_count.set(cfg.replica_counts[stage] if cfg.pipeline.replicas != "auto" else 1)
        self.recv_wait = counter("bimdist_recv_wait_seconds", "Time blocked waiting for input (data or upstream)")
        self.data_wait = counter("bimdist_data_wait_seconds", "Stage 0: time blocked waiting for the next batch "
                                 "from its data path (part of recv_wait)")
        self.send_wait = counter("bimdist_send_wait_seconds", "Time blocked on send backpressure from downstream")
        self.sent = counter("bimdist_sent_bytes", "Bytes sent to the next stage")
        self.received = counter("bimdist_received_bytes", "Bytes received from the previous stage")
        self.in_flight = gauge("bimdist_messages_in_flight", "Messages queued or being sent downstream")
        self.lr = gauge("bimdist_learning_rate", "Current learning rate")
        self.grad_norm = gauge("bimdist_grad_norm", "Largest gradient norm over the stage's blocks, at log steps")
        self.last_step = gauge("bimdist_last_step_timestamp_seconds", "Unix time the last step finished")
        self.step = gauge("bimdist_step", "Index of the next step to run")
        self.target = gauge("bimdist_steps_target", "Steps this run is configured for (run.steps)")
        self.nonfinite = counter("bimdist_nonfinite_losses", "Losses that were NaN or infinite")
        self.skipped = counter("bimdist_skipped_updates", "Optimizer updates dropped for non-finite gradients")
        self.corrupt = counter("bimdist_corrupt_samples", "Training samples skipped as corrupt or undecodable")
        self.restarts = counter("bimdist_stage_restarts", "Times this rank was restarted alone after dying")
        self.replayed = counter("bimdist_replayed_steps", "Messages sent again to a restarted next stage")
        self.replay_bytes = gauge("bimdist_replay_log_bytes", "Messages kept for a restart of the next stage, "
                                  "memory and disk")
        self.next_restartable = gauge("bimdist_next_stage_restartable", "1 while this stage's replay log holds what "
                                      "a restart of the next stage alone needs, 0 once its disk cap dropped some "
                                      "(a dead next stage then ends the job); 1 on the last stage")
        self.next_restartable.set(1)
        knn = Gauge("bimdist_monitor_knn_top1", "Live kNN top-1 (percent) of each block's pooled features on the "
                    "monitor set (eval.monitor_every; NaN until the first monitor step)", [*LABELS, "block"],
                    registry=r)
        self.monitor_knn = {b: knn.labels(**self.labels, block=str(b)) for b in blocks}
        for g in self.monitor_knn.values():
            g.set(math.nan)
        self.peak_memory = gauge("bimdist_peak_memory_bytes", "Peak memory: CUDA allocated, or process RSS on CPU")
        self.step_flop = gauge("bimdist_step_flop_count", "Floating-point operations of one step of this stage")
        self.flop_rate = gauge("bimdist_flop_per_second", "Achieved FLOP/s while computing (excludes waits)")
        self.mfu = gauge("bimdist_mfu_ratio", "Model FLOP utilisation: achieved / device peak") if (
            device.type == "cuda" or cfg.metrics.peak_tflops) else None
        info = Gauge("bimdist_build_info", "Version and config fingerprint of the running bimdist", [*LABELS,
                     "version", "fingerprint"], registry=r)
        info.labels(**self.labels, version=__version__, fingerprint=cfg.fingerprint()).set(1)
        self.target.set(cfg.run.steps)
        self._sent = self._received = self._corrupt = self._replayed = 0
        self.restarts.inc(int(os.environ.get("BIMDIST_INCARNATION", "0") or 0))  # this rank's incarnation
        self.port = 0
        if cfg.metrics.port:
            self.port = cfg.metrics.port + local_rank
            try:
                self._server, _ = start_http_server(self.port, addr=cfg.metrics.bind, registry=r)
            except OSError as e:
                raise ConfigError(
                    f"metrics port {self.port} (metrics.port {cfg.metrics.port} + LOCAL_RANK {local_rank}) on "
                    f"{cfg.metrics.bind} is unavailable: {e.strerror or e}; pick another --metrics.port "
                    "(or 0 to disable)"
                ) from None
            log.info("serving metrics on http://%s:%d/metrics", cfg.metrics.bind, self.port)

    # ---- Observer -----------------------------------------------------------------------------------------
    def on_start(self, start_step: int) -> None:
        self.step.set(start_step)
        self.last_step.set(time.time())  # "last progress": a slow start is not a stall
        self.peak_memory.set(peak_memory_bytes(self.device))

    def on_step(self, rec: StepRecord) -> None:
        self.steps.inc()
        self.samples.inc(rec.samples)
        finite = [x for x in rec.losses if math.isfinite(x)]
        self.nonfinite.inc(len(rec.losses) - len(finite))
        if finite:
            self.loss.set(sum(finite) / len(finite))
        self.step_duration.observe(rec.step_s)
        self.compute.inc(rec.compute_s)
        self.busy.inc(max(0.0, rec.compute_s - rec.allreduce_s))
        self.recv_wait.inc(rec.recv_wait_s)
        self.data_wait.inc(rec.data_wait_s)
        self.send_wait.inc(rec.send_wait_s)
        self.sent.inc(max(0, rec.bytes_sent - self._sent))
        self.received.inc(max(0, rec.bytes_received - self._received))
        self.corrupt.inc(max(0, rec.corrupt - self._corrupt))
        self.replayed.inc(max(0, rec.replayed - self._replayed))
        self.replay_bytes.set(rec.replay_log_bytes)
        for block, top1 in rec.monitor_knn.items():
            if block in self.monitor_knn:
                self.monitor_knn[block].set(top1)
        if rec.next_restartable is not None:
            self.next_restartable.set(int(rec.next_restartable))
        self._sent, self._received, self._corrupt = rec.bytes_sent, rec.bytes_received, rec.corrupt
        self._replayed = rec.replayed
        self.in_flight.set(rec.in_flight)
        self.lr.set(rec.lr)
        if rec.grad_norm is not None:
            self.grad_norm.set(rec.grad_norm)
        self.skipped.inc(rec.skipped)
        if rec.flop and rec.compute_s > 0:
            self.step_flop.set(rec.flop)
            self.flop_rate.set(rec.flop / rec.compute_s)
            if self.mfu is not None and rec.peak_flop_per_s:
                self.mfu.set(rec.flop / rec.compute_s / rec.peak_flop_per_s)
        self.step.set(rec.step + 1)
        self.last_step.set(time.time())
        if rec.step % 10 == 0:
            self.peak_memory.set(peak_memory_bytes(self.device))

    def on_end(self, result: object) -> None:
        self.peak_memory.set(peak_memory_bytes(self.device))
        code = getattr(result, "exit_code", 1)
        self.push_outcome(code, steps=getattr(result, "steps_done", 0), losses=getattr(result, "last_losses", []))

    # ---- batch jobs ---------------------------------------------------------------------------------------
    def push_outcome(self, exit_code: int, *, steps: int, losses: list[float]) -> None:
        """Push the run's outcome to the Pushgateway (metrics.pushgateway), grouped by job, stage and replica."""
        gateway = self.cfg.metrics.pushgateway
        if not gateway:
            return
        reg = CollectorRegistry()
        Gauge("bimdist_last_exit_code", "Exit code of the stage's last run", registry=reg).set(exit_code)
        Gauge("bimdist_last_steps", "Steps completed when the run ended", registry=reg).set(steps)
        if exit_code == 0:
            Gauge("bimdist_last_success_timestamp_seconds", "Unix time of the last successful end",
                  registry=reg).set(time.time())
        final = Gauge("bimdist_last_loss", "Final local loss per block", ["block"], registry=reg)
        for i, loss in enumerate(losses):
            final.labels(block=str(i)).set(loss)
        try:
            push_to_gateway(gateway, job=self.cfg.metrics.job, registry=reg, timeout=10,
                            grouping_key={"stage": self.labels["stage"], "replica": self.labels["replica"]})
            log.info("pushed the outcome (exit %d, %d steps) to the Pushgateway at %s", exit_code, steps, gateway)
        except Exception as e:  # noqa: BLE001 - a monitoring outage must not fail the job
            log.warning("could not push to the Pushgateway at %s: %s", gateway, e)

    def close(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()


class FileSDTarget:
    """Local rank 0 of each node advertises the node's metrics ports to Prometheus file_sd, atomically."""

    def __init__(self, folder: Path, *, job: str, address: str, ports: list[int]):
        """``address``: the host or address Prometheus scrapes this node at (``advertised_address``)."""
        tag = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or str(os.getpid())
        node = address.replace(":", "_")  # one file per node, also where nodes share a host name (namespaces)
        self.path = Path(folder) / f"{job}-{node}-{tag}.json"
        body = [{"targets": [f"{address}:{p}" for p in ports], "labels": {"job": job, "node": address}}]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, self.path)
        log.info("advertised %d metrics targets at %s in %s", len(ports), address, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def advertised_address(cfg: Config, master_addr: str | None) -> str:
    """Where Prometheus should scrape this node: ``metrics.advertise``, else ``metrics.bind``, else (a wildcard
    bind) this node's address on the route to the job's store, which is the cluster network (a host name can
    resolve to loopback: in a container, a namespace, or by /etc/hosts)."""
    m = cfg.metrics
    if m.advertise:
        return m.advertise
    if m.bind not in ("0.0.0.0", "::", ""):
        return m.bind
    if master_addr:
        from bimdist.distributed.env import route_address

        try:
            return route_address(master_addr)
        except OSError:
            pass
    return socket.getfqdn()
