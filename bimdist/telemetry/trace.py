"""Pipeline timeline: each rank records back-to-back phase spans; ``bimdist trace merge`` builds one Chrome /
Perfetto trace with a track per stage, so the pipeline's bubbles (receive-wait, send-wait) can be seen.

A rank's main thread is always in exactly one phase, and ``switch`` closes the current span as it opens the
next, so spans within a track never overlap by construction. Phases: ``recv-wait`` (waiting for data or for the
previous stage), ``compute`` (encoder forward), ``send-wait`` (handing the activations to the transport,
blocked only by backpressure), ``decoder`` (decoder, loss, backward, optimizer step), ``checkpoint``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("bimdist")


class Timeline:
    def __init__(self, path: Path | None, *, stage: int, replica: int, flush_every: int = 200):
        self.path = path
        self.stage, self.replica = stage, replica
        self._phase: str | None = None
        self._start = 0
        self._step = -1
        self._buffer: list[str] = []
        self._flush_every = flush_every
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def switch(self, phase: str | None, *, step: int | None = None) -> None:
        """End the current span now and start ``phase`` (None: idle, nothing recorded)."""
        if self.path is None:
            return
        now = time.time_ns() // 1000  # microseconds since the epoch: comparable across processes
        if self._phase is not None and now > self._start:
            self._buffer.append(json.dumps({"name": self._phase, "ts": self._start, "dur": now - self._start,
                                            "step": self._step}))
        self._phase, self._start = phase, now
        if step is not None:
            self._step = step
        if len(self._buffer) >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        if self.path is not None and self._buffer:
            with open(self.path, "a") as f:
                f.write("\n".join(self._buffer) + "\n")
            self._buffer.clear()

    def close(self) -> None:
        self.switch(None)
        self.flush()


def merge_traces(run_dir: Path, out: Path | None = None) -> Path:
    """``RUN_DIR/trace/stage{k}_r{r}.jsonl`` -> one Chrome trace JSON (pid: replica, tid: stage)."""
    folder = Path(run_dir) / "trace"
    files = sorted(folder.glob("stage*_r*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no timeline files in {folder}; train with --metrics.trace=true first")
    events: list[dict] = []
    for path in files:
        stage, replica = (int(x) for x in path.stem.removeprefix("stage").split("_r"))
        events.append({"ph": "M", "name": "process_name", "pid": replica, "tid": 0,
                       "args": {"name": f"replica {replica}"}})
        events.append({"ph": "M", "name": "thread_name", "pid": replica, "tid": stage,
                       "args": {"name": f"stage {stage}"}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": replica, "tid": stage,
                       "args": {"sort_index": stage}})
        for line in path.read_text().splitlines():
            if line.strip():
                span = json.loads(line)
                events.append({"ph": "X", "cat": "bimdist", "name": span["name"], "ts": span["ts"],
                               "dur": span["dur"], "pid": replica, "tid": stage, "args": {"step": span["step"]}})
    out = out or Path(run_dir) / "trace.json"
    out.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    log.info("merged %d timelines into %s (open in https://ui.perfetto.dev or chrome://tracing)", len(files), out)
    return out
