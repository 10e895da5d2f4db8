"""A small control board on the job's TCPStore (the one torchrun or rank 0 hosts at MASTER_ADDR:MASTER_PORT).

Three things travel here instead of on the activation stream: the first failure in the job (so a rank that
only lost its neighbour can still name the stage that really died), stop requests (so a signal seen by
any rank reaches stage 0, which picks the step every stage checkpoints at), and an abort: a failure that no
waiting can cure (a restarted stage that cannot be fed), after which every rank ends at once instead of
waiting out ``pipeline.peer_timeout_s``. Every call is best effort with a short timeout: the board must never
be the reason a rank hangs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch.distributed as dist

log = logging.getLogger("bimdist.control")


class ControlBoard:
    def __init__(self, store: dist.Store):
        """``store`` is the job's store, already namespaced per restart generation
        (see ``bimdist.distributed.groups.job_store``)."""
        self.store = dist.PrefixStore("control/", store)

    def report_failure(self, who: str, message: str) -> None:
        try:
            n = self.store.add("failures", 1)
            self.store.set(f"failure/{n}", f"{who}: {message}")
        except Exception as e:  # noqa: BLE001 - the store may be gone with rank 0
            log.debug("could not report the failure on the control board: %s", e)

    def first_failure(self) -> str | None:
        try:
            if self.store.add("failures", 0) < 1:
                return None
            return self.store.get("failure/1").decode()
        except Exception:  # noqa: BLE001
            return None

    def request_stop(self, reason: str) -> None:
        try:
            self.store.set("stop", reason)
        except Exception as e:  # noqa: BLE001
            log.warning("could not post the stop request on the control board: %s", e)

    def stop_requested(self) -> bool:
        try:
            return bool(self.store.check(["stop"]))
        except Exception:  # noqa: BLE001
            return False

    def abort(self, message: str) -> None:
        """End the job: every rank's ``AbortWatch`` sees ``message`` within a second and the rank exits."""
        try:
            if self.store.add("aborts", 1) == 1:  # the first reason stands
                self.store.set("abort", message)
        except Exception as e:  # noqa: BLE001
            log.warning("could not post the abort on the control board: %s", e)

    def aborted(self) -> str | None:
        try:
            if not self.store.check(["abort"]):
                return None
            return self.store.get("abort").decode()
        except Exception:  # noqa: BLE001
            return None


class AbortWatch:
    """Polls the board for an abort and hands its message to ``on_abort`` (which ends the process), once."""

    def __init__(self, board: ControlBoard, on_abort: Callable[[str], None], *, interval_s: float = 0.5):
        self.board, self.on_abort, self.interval_s = board, on_abort, interval_s
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name="bimdist-abort-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            message = self.board.aborted()
            if message is not None:
                self.on_abort(message)
                return

    def close(self) -> None:
        self._stop.set()
