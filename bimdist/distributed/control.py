"""A small control board on the job's TCPStore (the one torchrun or rank 0 hosts at MASTER_ADDR:MASTER_PORT).

Three things travel here instead of on the activation stream: the first failure in the job (so a rank that
only lost its neighbour can still name the stage that really died), stop requests (so a signal seen by
any rank reaches stage 0, which picks the step every stage checkpoints at), and an abort: a failure that no
waiting can cure (a restarted stage that cannot be fed), after which every rank ends at once instead of
waiting out ``pipeline.peer_timeout_s``.

The board must never be the reason a rank hangs. A TCPStore client's check, get and add wait for the server's
reply without a bound when the link to it is cut (only set returns at once), so every such call here runs on a
helper thread and is given up after ``timeout_s`` (``bounded``); after one is given up the board stops asking. The
stop and abort keys are polled by a thread of their own (``watch``), so the training loop reads a flag, not the
store.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

log = logging.getLogger("bimdist.control")
T = TypeVar("T")


class StoreUnreachable(RuntimeError):
    """A store call did not return in time: the store's node or supervisor is out of reach."""


def bounded(fn: Callable[[], T], *, timeout_s: float, what: str) -> T:
    """``fn()`` on a helper thread, given up after ``timeout_s`` (the thread is left to its blocked call)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, name="bimdist-store-call", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise StoreUnreachable(f"{what}: no answer from the job's store within {timeout_s:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class ControlBoard:
    def __init__(self, store: dist.Store, *, timeout_s: float = 5.0):
        """``store`` is the job's store, already namespaced per restart generation
        (see ``bimdist.distributed.groups.job_store``); ``timeout_s`` bounds each call."""
        self.store = dist.PrefixStore("control/", store)
        self.timeout_s = timeout_s
        self.dead = False
        self._stop = threading.Event()
        self._closed = threading.Event()

    def _call(self, fn: Callable[[], T], what: str, default: T) -> T:
        if self.dead:
            return default
        try:
            return bounded(fn, timeout_s=self.timeout_s, what=what)
        except Exception as e:  # noqa: BLE001 - best effort: the store may be gone with its host
            self.dead = isinstance(e, StoreUnreachable) or self.dead
            log.debug("control board: %s failed: %s", what, e)
            return default

    def report_failure(self, who: str, message: str) -> None:
        def post() -> None:
            n = self.store.add("failures", 1)
            self.store.set(f"failure/{n}", f"{who}: {message}")

        self._call(post, "reporting the failure", None)

    def first_failure(self) -> str | None:
        def read() -> str | None:
            if self.store.add("failures", 0) < 1:
                return None
            return self.store.get("failure/1").decode()

        return self._call(read, "reading the first failure", None)

    def request_stop(self, reason: str) -> None:
        self._call(lambda: self.store.set("stop", reason), "posting the stop request", None)

    def stop_requested(self) -> bool:
        """Some rank asked to stop (read by ``watch``'s thread; this reads a flag)."""
        return self._stop.is_set()

    def abort(self, message: str) -> None:
        """End the job: every rank's ``watch`` sees ``message`` within a second and the rank exits."""
        def post() -> None:
            if self.store.add("aborts", 1) == 1:  # the first reason stands
                self.store.set("abort", message)

        self._call(post, "posting the abort", None)

    def _read_abort(self) -> str | None:
        """The abort's message, or None (an unbounded store read: call it through ``_call``)."""
        return self.store.get("abort").decode() if self.store.check(["abort"]) else None

    def aborted(self) -> str | None:
        return self._call(self._read_abort, "reading the abort", None)

    def watch(self, on_abort: Callable[[str], None] | None = None, *, interval_s: float = 0.5) -> None:
        """Poll the stop and abort keys on a thread of this board's own: ``stop_requested`` then reads a flag, and
        ``on_abort`` gets the abort's message (once) and is expected to end the process."""
        def read() -> tuple[bool, str | None]:  # one bounded call a poll: stop, then abort
            stop = self._stop.is_set() or self.store.check(["stop"])
            return stop, self._read_abort() if on_abort is not None else None

        def poll() -> None:
            while not self._closed.wait(interval_s) and not self.dead:
                stop, message = self._call(read, "reading the stop and abort keys", (False, None))
                if stop:
                    self._stop.set()
                if message is not None and on_abort is not None:
                    on_abort(message)
                    return

        self._poller = threading.Thread(target=poll, name="bimdist-control-board", daemon=True)
        self._poller.start()

    def close(self) -> None:
        """Stop polling and wait (bounded) for a call in flight: a process that exits during a store call can die
        in the store's C++ code (SIGABRT) instead of exiting with its code."""
        self._closed.set()
        poller = getattr(self, "_poller", None)
        if poller is not None and poller is not threading.current_thread():
            poller.join(self.timeout_s + 1.0)
