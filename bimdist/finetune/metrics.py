"""Prometheus series of a fine-tuning rank: ``bimdist_finetune_*`` with ``job``, ``rank``, ``depth`` and ``init``
labels, on ``metrics.port + LOCAL_RANK`` like the pretraining ranks, so the same file_sd targets and dashboard see
them. Every series exists from the start; the eval gauges are NaN until the first evaluation."""

from __future__ import annotations

import logging
import math

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, start_http_server

from bimdist import __version__
from bimdist.config import Config, ConfigError

log = logging.getLogger("bimdist.metrics")

LABELS = ("job", "rank", "depth", "init")


class FinetuneMetrics:
    def __init__(self, cfg: Config, *, rank: int, local_rank: int, depth: int, fingerprint: str):
        disable_created_metrics()
        self.registry = r = CollectorRegistry()
        labels = {"job": cfg.metrics.job, "rank": str(rank), "depth": str(depth), "init": cfg.finetune.init}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=r).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=r).labels(**labels)

        self.steps = counter("bimdist_finetune_steps", "Fine-tuning steps finished by this rank")
        self.samples = counter("bimdist_finetune_samples", "Training samples this rank processed")
        self.loss = gauge("bimdist_finetune_loss", "Training loss of the last logged step (mixed targets)")
        self.lr = gauge("bimdist_finetune_learning_rate", "Learning rate of the head (layer decay scales the rest)")
        self.step = gauge("bimdist_finetune_step", "Index of the next step")
        self.target = gauge("bimdist_finetune_steps_target", "Steps this fine-tuning run is configured for")
        self.top1 = gauge("bimdist_finetune_eval_top1", "Top-1 accuracy (percent) of the last evaluation")
        self.top5 = gauge("bimdist_finetune_eval_top5", "Top-5 accuracy (percent) of the last evaluation")
        self.last_step = gauge("bimdist_finetune_last_step_timestamp_seconds", "Unix time the last step finished")
        info = Gauge("bimdist_build_info", "Version and config fingerprint of the running bimdist",
                     [*LABELS, "version", "fingerprint"], registry=r)
        info.labels(**labels, version=__version__, fingerprint=fingerprint).set(1)  # the dashboard's job list
        self.top1.set(math.nan)
        self.top5.set(math.nan)
        self._server = None
        if cfg.metrics.port:
            port = cfg.metrics.port + local_rank
            try:
                self._server, _ = start_http_server(port, addr=cfg.metrics.bind, registry=r)
            except OSError as e:
                raise ConfigError(f"metrics port {port} (metrics.port {cfg.metrics.port} + LOCAL_RANK {local_rank}) "
                                  f"on {cfg.metrics.bind} is unavailable: {e.strerror or e}; pick another "
                                  "--metrics.port (or 0 to disable)") from None
            log.info("serving metrics on http://%s:%d/metrics", cfg.metrics.bind, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
