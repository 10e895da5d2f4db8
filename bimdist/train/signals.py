"""Exit codes and the preemption flag set by signal handlers."""

from __future__ import annotations

import logging
import signal
import threading
import time

log = logging.getLogger("bimdist")

EXIT_OK = 0
EXIT_ERROR = 1  # a bug or an unexpected failure: see the traceback in the log
EXIT_CONFIG = 2  # bad config, bad input or incompatible checkpoint: nothing was trained
EXIT_PEER = 3  # another stage died or went silent
EXIT_DATA = 4  # no usable training data
EXIT_CHECKPOINT = 5  # a checkpoint could not be written (disk full, unwritable folder)
EXIT_PREEMPTED = 75  # stopped by a signal after checkpointing; run the same command again to resume
EXIT_RESTART = 76  # another replica of this stage died: restart this rank too (its supervisor does), exact

# Why a stage's input ended (carried by the END message).
END_DONE, END_DATA, END_STOP_AT, END_PREEMPT = 1, 2, 3, 4
END_NAMES = {END_DONE: "step limit", END_DATA: "end of data", END_STOP_AT: "run.stop_at", END_PREEMPT: "signal"}


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (configurable); the training loop checkpoints at an agreed step and exits."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None
        self.since: float | None = None

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, name: str) -> None:
        if not self._event.is_set():
            self.signal_name, self.since = name, time.monotonic()
            self._event.set()

    def install(self, names: list[str]) -> None:
        def handler(signum: int, _frame: object) -> None:
            name = signal.Signals(signum).name
            log.warning("received %s: will checkpoint at the next agreed step and exit %d", name, EXIT_PREEMPTED)
            self.request(name)

        for name in names:
            signal.signal(getattr(signal, name), handler)
