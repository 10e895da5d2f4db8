"""A small control board on the job's TCPStore (the one torchrun or rank 0 hosts at MASTER_ADDR:MASTER_PORT).

Two things travel here instead of on the activation stream: the first failure in the job (so a rank that
only lost its neighbour can still name the stage that really died) and stop requests (so a signal seen by
any rank reaches stage 0, which picks the step every stage checkpoints at). Every call is best effort with
a short timeout: the board must never be the reason a rank hangs.
"""

from __future__ import annotations

import logging

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
