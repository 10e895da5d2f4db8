"""A per-rank summary written at the end of a run (``RUN_DIR/ranks/stage{k}_r{r}.json``): memory, timings,
waits and FLOPs, for people comparing runs and for the benchmarks, which read these instead of guessing."""

from __future__ import annotations

import contextlib
import json
import statistics
from collections.abc import Iterator
from pathlib import Path

import torch

from bimdist.telemetry.livebytes import LiveTensorBytes
from bimdist.telemetry.progress import StepRecord


def proc_status_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc (0 where /proc is not available)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RankSummary:
    def __init__(self, run_dir: Path, *, stage: int, replica: int, device: torch.device):
        self.path = Path(run_dir) / "ranks" / f"stage{stage}_r{replica}.json"
        self.stage, self.replica, self.device = stage, replica, device
        self.baseline_rss = proc_status_bytes("VmRSS")  # after imports, before the model and data exist
        self.records: list[StepRecord] = []
        self.start_step = 0
        self.live: LiveTensorBytes | None = None

    @contextlib.contextmanager
    def tracking(self, enabled: bool) -> Iterator[None]:
        """Count live tensor bytes inside the block (``metrics.live_bytes``); ``on_end`` reports the peak."""
        if not enabled:
            yield
            return
        self.live = LiveTensorBytes()
        with self.live:
            yield

    def on_start(self, start_step: int) -> None:
        self.start_step = start_step

    def on_step(self, rec: StepRecord) -> None:
        self.records.append(rec)

    def on_end(self, result: object) -> None:
        recs = self.records[1:] or self.records  # the first step also counts FLOPs: leave it out of timings
        step_s = [r.step_s for r in recs]
        total = sum(step_s) or 1e-9
        body = {
            "stage": self.stage, "replica": self.replica, "blocks": recs[0].blocks if recs else [],
            "start_step": self.start_step, "steps": len(self.records),
            "exit_code": getattr(result, "exit_code", None),
            "baseline_rss_bytes": self.baseline_rss, "peak_rss_bytes": proc_status_bytes("VmHWM"),
            "cuda_peak_bytes": int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else 0,
            "live_peak_bytes": self.live.peak if self.live is not None else None,
            "median_step_s": statistics.median(step_s) if step_s else None,
            "median_compute_s": statistics.median(r.compute_s for r in recs) if recs else None,
            "recv_wait_fraction": sum(r.recv_wait_s for r in recs) / total,
            "send_wait_fraction": sum(r.send_wait_s for r in recs) / total,
            "data_wait_fraction": sum(r.data_wait_s for r in recs) / total,
            "corrupt_samples": self.records[-1].corrupt if self.records else 0,
            "samples_per_s": (sum(r.samples for r in recs) / total) if recs else None,
            "cpu_s_per_sample": ((self.records[-1].cpu_s - self.records[0].cpu_s) / sum(r.samples for r in recs)
                                 if len(self.records) > 1 else None),  # every thread's: data, compute, transport
            "step_flop": recs[-1].flop if recs else 0.0,
            "bytes_sent": recs[-1].bytes_sent if recs else 0,
            "step_s": step_s,
        }
        body["idle_fraction"] = body["recv_wait_fraction"] + body["send_wait_fraction"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(body, indent=1))
