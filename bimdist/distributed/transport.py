"""The only point-to-point code: messages to the next stage and from the previous one.

A message is a fixed-size int64 header (kind, step, and dtype + shape of each tensor) followed by one uint8
payload holding every tensor's bytes, so the receiver allocates exactly and nothing is pickled. A sender
thread and a receiver thread drive the requests (gloo requests only complete inside ``wait()``), with bounded
queues on both sides: at most ``max_in_flight`` sends are pending before ``send`` blocks (backpressure), and
up to ``prefetch`` received messages wait for the compute loop. Every wait has a timeout; a dead or silent
peer becomes a ``PeerError`` that names it.

Every message sent is also kept, on the host, in a replay log until the next stage's restart point passes it.
When a neighbour dies and its supervisor restarts it (``recoverable``), the survivor does not exit: it waits
for the neighbour's next incarnation, rebuilds the link, and the two ends agree on the next step the receiver
needs (the receiver says it). The sender then replays from its log; the receiver drops, by step number, what it
already has. The sender keeps training until its send window is full, then waits. A need the log no longer holds
(pruned, or dropped past ``pipeline.replay_disk_mb``) cannot be cured by waiting: it is reported at once
(``on_fatal``) so that the whole job ends instead of stalling.

With recovery, the ends of a link also stay for each other at the end of the stream: after END the sender waits
until its next stage says it finished (``done/RANK`` in the job's store), and the receiver answers a restarted
previous stage until its own stage has checkpointed, so a stage killed in the last steps is fed like any other.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from bimdist.distributed.replay import ReplayLog

log = logging.getLogger("bimdist.transport")

MAGIC = 0x42494D44  # "BIMD"
VERSION = 1
HEADER_LEN = 64
SLOTS_PER_TENSOR = 8  # dtype code, ndim, up to 6 dims
MAX_TENSORS = (HEADER_LEN - 6) // SLOTS_PER_TENSOR
ALIGN = 16

DATA, END = 1, 2
TAG_DATA, TAG_HANDSHAKE = 0, 1
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int16, torch.int32, torch.int64,
          torch.float64]
DTYPE_CODE = {dt: i for i, dt in enumerate(DTYPES)}


class PeerError(RuntimeError):
    """A neighbouring stage died, hung up or stayed silent past the timeout."""


class Unfeedable(PeerError):
    """A restarted stage needs messages that are gone: waiting cannot cure it."""


class ReplicaLost(PeerError):
    """Another replica of this stage died: every replica restarts from the stage's common checkpoint (exact)."""


class _PeerRestarted(RuntimeError):
    """A neighbour came back while this end of the link was idle at the end of the stream."""


def peer_done(store: Any, rank: int, *, strict: bool = False) -> tuple[int, int] | None:
    """(final step, end reason) once ``rank`` has checkpointed the end of its stream, else None. ``strict``: a store
    that cannot be reached (its supervisor is gone) raises instead of meaning "not yet"."""
    try:
        if not store.check([f"done/{rank}"]):
            return None
        step, reason = store.get(f"done/{rank}").decode().split()
        return int(step), int(reason)
    except Exception:  # noqa: BLE001 - the store may be gone with the supervisor
        if strict:
            raise
        return None


def peer_left(store: Any, rank: int) -> bool:
    """``rank``'s sender stopped waiting at the end of the stream (its process is leaving or gone)."""
    try:
        return bool(store.check([f"left/{rank}"]))
    except Exception:  # noqa: BLE001
        return False


def peer_incarnation(store: Any, rank: int) -> int:
    try:
        return int(store.get(f"inc/{rank}"))
    except Exception:  # noqa: BLE001
        return -1


@dataclass
class Message:
    kind: int
    step: int
    tensors: list[torch.Tensor] = field(default_factory=list)
    reason: int = 0  # for END: why the stream ended (the stage loop's codes)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pack(msg: Message, device: torch.device, *, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Message -> (header int64 [HEADER_LEN], payload uint8 [bytes]) on ``device`` (in pinned memory with ``pin``,
    for a host buffer that a GPU copies to or from)."""
    if len(msg.tensors) > MAX_TENSORS:
        raise ValueError(f"a message carries at most {MAX_TENSORS} tensors, got {len(msg.tensors)}")
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[:6] = torch.tensor([MAGIC, VERSION, msg.kind, msg.step, msg.reason, len(msg.tensors)])
    chunks, offset = [], 0
    for i, t in enumerate(msg.tensors):
        if t.ndim > SLOTS_PER_TENSOR - 2:
            raise ValueError(f"tensor {i} has {t.ndim} dims; at most {SLOTS_PER_TENSOR - 2} fit the header")
        base = 6 + i * SLOTS_PER_TENSOR
        header[base] = DTYPE_CODE[t.dtype]
        header[base + 1] = t.ndim
        header[base + 2 : base + 2 + t.ndim] = torch.tensor(t.shape, dtype=torch.int64)
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        pad = _align(raw.numel()) - raw.numel()
        chunks.append(raw)
        if pad:
            chunks.append(torch.zeros(pad, dtype=torch.uint8, device=raw.device))
        offset += raw.numel() + pad
    payload = torch.empty(offset, dtype=torch.uint8, device=device, pin_memory=pin)
    start = 0
    for c in chunks:  # a device -> host copy per tensor when staging
        payload[start : start + c.numel()].copy_(c)
        start += c.numel()
    return header.to(device), payload


def parse_header(header: torch.Tensor) -> tuple[int, int, int, list[tuple[torch.dtype, tuple[int, ...]]], int]:
    """Header -> (kind, step, reason, [(dtype, shape)], payload bytes); raises on a foreign header."""
    h = header.cpu().tolist()
    if h[0] != MAGIC or h[1] != VERSION:
        raise PeerError(f"received a header that is not a bimdist v{VERSION} message (magic {h[0]:#x}, version {h[1]})")
    specs, nbytes = [], 0
    for i in range(h[5]):
        base = 6 + i * SLOTS_PER_TENSOR
        dtype, ndim = DTYPES[h[base]], h[base + 1]
        shape = tuple(h[base + 2 : base + 2 + ndim])
        specs.append((dtype, shape))
        nbytes += _align(torch.Size(shape).numel() * dtype.itemsize)
    return h[2], h[3], h[4], specs, nbytes


def unpack(specs: list[tuple[torch.dtype, tuple[int, ...]]], payload: torch.Tensor) -> list[torch.Tensor]:
    out, offset = [], 0
    for dtype, shape in specs:
        n = torch.Size(shape).numel() * dtype.itemsize
        out.append(payload[offset : offset + n].view(dtype).reshape(shape))
        offset += _align(n)
    return out


@dataclass
class Route:
    """One neighbour: its link and which of this rank's local rows travel on it (None: all of them)."""

    link: Any  # groups.Link
    rows: tuple[int, int] | None = None


ROW_TENSORS = 3  # tokens, masking order, pixels: cut by rows between stages with different replica counts


def _routes(x: Any) -> list[Route]:
    if x is None:
        return []
    if isinstance(x, list):
        return [r if isinstance(r, Route) else Route(r) for r in x]
    return [x if isinstance(x, Route) else Route(x)]


class Transport:
    """This rank's links: one route to each replica of the next stage that takes some of its rows, and one from each
    replica of the previous stage that holds some; with equal replica counts, one of each. ``send`` cuts a message
    by rows for the routes out; ``recv`` puts this rank's rows back together from the routes in."""

    def __init__(
        self,
        *,
        device: torch.device,
        prev: Any = None,  # a groups.Link, or a list of Routes, from the previous stage
        next: Any = None,  # the same, to the next stage
        max_in_flight: int,
        prefetch: int,
        peer_timeout_s: float,
        startup_timeout_s: float,
        host_staging: bool = False,
        recoverable: bool = False,
        replay: ReplayLog | Callable[[int], ReplayLog] | None = None,
        store: Any = None,
        rank: int | None = None,
        label: str = "the stage before it",
        on_fatal: Callable[[str], None] | None = None,
        replay_hint: str = "",
    ):
        """``host_staging``: tensors cross through host buffers (pinned on a GPU), for a backend that cannot send
        device tensors: gloo between ranks that share a GPU. ``recoverable``: a dead neighbour is waited for (its
        supervisor restarts it). ``replay``: the log of sent messages, or a factory of one per next-stage peer rank
        (None: kept only until sent). ``store``: the job's store, where each next-stage rank publishes the restart
        point that prunes its log, and this one whether it can still restart alone (``alone/PEER/RANK``).
        ``rank``: this rank, for the end-of-stream keys; ``label``: this stage, for messages. ``on_fatal``: told,
        once, of a failure no waiting can cure. ``replay_hint``: the settings that would have kept what a restart
        needed, for that message."""
        self.device = device
        self.staging = host_staging
        self.wire = torch.device("cpu") if host_staging else device  # where the bytes are when they are sent
        self.pin = host_staging and device.type == "cuda"
        self.peer_timeout = peer_timeout_s
        self.startup_timeout = startup_timeout_s
        self.max_in_flight, self.prefetch = max_in_flight, prefetch
        self.recoverable, self.store, self.rank, self.label = recoverable, store, rank, label
        self.on_fatal, self.replay_hint = on_fatal, replay_hint
        self._closed = threading.Event()

        def log_for(peer: int) -> ReplayLog:
            if callable(replay) and not isinstance(replay, ReplayLog):
                return replay(peer)
            if replay is not None:
                return replay
            return ReplayLog(memory_bytes=1 << 62, spill_path=Path(os.devnull), keep=False)

        self.senders = [_Sender(self, r, log_for(r.link.peer)) for r in _routes(next)]
        self.receivers = [_Receiver(self, r) for r in _routes(prev)]
        self.send_wait_s = 0.0
        self.recv_wait_s = 0.0

    # ---- figures, summed over the routes -----------------------------------------------------------------
    @property
    def bytes_sent(self) -> int:
        return sum(s.bytes_sent for s in self.senders)

    @property
    def bytes_received(self) -> int:
        return sum(r.bytes_received for r in self.receivers)

    @property
    def replayed(self) -> int:
        return sum(s.replayed for s in self.senders)

    @property
    def in_flight(self) -> int:
        return sum(s.in_flight for s in self.senders)

    @property
    def replay_bytes(self) -> int:
        return sum(s.log.bytes for s in self.senders)

    @property
    def delivered(self) -> int:
        """The newest step every next-stage peer has been sent (it may not have consumed it yet)."""
        return min((s.delivered for s in self.senders), default=-1)

    @property
    def next_restartable(self) -> bool | None:
        flags = [s.restartable for s in self.senders if s.restartable is not None]
        return all(flags) if flags else None

    @property
    def sent_messages(self) -> int:
        return sum(s.sent_messages for s in self.senders)

    @property
    def dropped(self) -> int:
        return sum(r.dropped for r in self.receivers)

    # ---- starting --------------------------------------------------------------------------------------------
    def start_sending(self) -> None:
        """Connect to the next stage's peers (each says which step it needs first) and start their sender threads."""
        for s in self.senders:
            s.start()

    def next_stage_needs(self) -> int | None:
        """The first step the next stage asked for (the earliest over its peers; waits for the handshakes); None
        without a next stage."""
        needs = [s.needs() for s in self.senders]
        return min(needs) if needs else None

    def start_receiving(self, first_step: int) -> None:
        """Connect to the previous stage's peers, ask each for ``first_step`` onwards, start the receiver threads."""
        for r in self.receivers:
            r.start(first_step)

    # ---- public API (compute thread) ----------------------------------------------------------------------
    def send(self, msg: Message) -> None:
        """Queue ``msg`` (cut by rows) for the next stage's peers; blocks only while ``max_in_flight`` sends are
        pending on a route. Tensors after the row tensors (the live monitor's) go on the first route only."""
        assert self.senders, "the last stage has no next stage"
        ready = None
        if self.device.type == "cuda":  # the sender threads wait for the producing kernels, not the host
            ready = torch.cuda.Event()
            ready.record()
        t0 = time.perf_counter()
        try:
            for i, s in enumerate(self.senders):
                s.put(_cut(msg, s.rows, extras=i == 0), ready)
        finally:
            self.send_wait_s += time.perf_counter() - t0

    def recv(self) -> Message:
        """This rank's rows of the next message, from every previous-stage peer (prefetched), or PeerError."""
        assert self.receivers, "stage 0 receives nothing"
        t0 = time.perf_counter()
        try:
            pieces = [r.get() for r in self.receivers]
        finally:
            self.recv_wait_s += time.perf_counter() - t0
        if len(pieces) == 1:
            return pieces[0]
        first = pieces[0]
        if any((p.kind, p.step) != (first.kind, first.step) for p in pieces):
            got = [(p.kind, p.step) for p in pieces]
            raise PeerError(f"the previous stage's replicas sent different steps for one batch: {got}")
        if first.kind == END:
            return first
        tensors = [torch.cat([p.tensors[i] for p in pieces]) for i in range(ROW_TENSORS)]
        extras = next((p.tensors[ROW_TENSORS:] for p in pieces if len(p.tensors) > ROW_TENSORS), [])
        return Message(first.kind, first.step, tensors + extras, first.reason)

    def close(self) -> None:
        """Deliver every queued send (bounded by the peer timeout), then stop the sender threads."""
        self._closed.set()
        for s in self.senders:
            s.close()

    # ---- shared by the threads ----------------------------------------------------------------------------
    def recover(self, link: Any, e: BaseException, what: str) -> None:
        """A neighbour failed: when its supervisor restarts it, wait for it and rebuild the link; else raise."""
        if not self.recoverable:
            raise PeerError(f"{what} {link.peer_label} failed: {_short(e)}") from None
        log.warning("%s %s failed (%s); waiting up to %.0f s for it to be restarted", what, link.peer_label,
                    _short(e), self.peer_timeout)
        link.wait_for_restart(timeout_s=self.peer_timeout)
        log.warning("reconnected to %s (incarnation %s)", link.peer_label, link.incarnations[link.peer_index])

    @property
    def ends_kept(self) -> bool:
        """The two ends of a link stay for each other at the end of the stream (recovery is on)."""
        return self.recoverable and self.rank is not None


def _cut(msg: Message, rows: tuple[int, int] | None, *, extras: bool) -> Message:
    """The part of ``msg`` one route carries: its rows of the row tensors (views), and the rest on one route."""
    if msg.kind != DATA or (rows is None and extras):
        return msg
    row = msg.tensors[:ROW_TENSORS] if rows is None else [t[rows[0] : rows[1]] for t in msg.tensors[:ROW_TENSORS]]
    return Message(msg.kind, msg.step, row + (msg.tensors[ROW_TENSORS:] if extras else []), msg.reason)


class _Sender:
    """One route to a next-stage peer: its thread, its bounded outbox and its replay log."""

    def __init__(self, t: Transport, route: Route, replay: ReplayLog):
        self.t, self.link, self.rows, self.log = t, route.link, route.rows, replay
        self.outbox: queue.Queue[tuple[Message, Any] | None] = queue.Queue(maxsize=t.max_in_flight)
        self.error: BaseException | None = None
        self.in_flight = 0
        self.lock = threading.Lock()
        self.need: int | None = None  # the peer's first wanted step, from the handshake
        self.need_known = threading.Event()
        self.thread: threading.Thread | None = None
        self.progress = time.monotonic()  # the last send, reconnect or start of the wait at the end
        self.peer_done = False  # the peer finished before this end connected: nothing to send it
        self.restart_point: int | None = None  # the peer's, as last read from the store
        self.restartable: bool | None = None  # whether the log still holds what a restart of the peer needs
        self.alone_refresh = 0.0
        self.delivered = -1  # newest step the peer has been sent
        self.bytes_sent = self.sent_messages = self.replayed = 0

    # ---- the compute thread's side ------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="bimdist-send", daemon=True)
        self.thread.start()

    def needs(self) -> int:
        if not self.need_known.wait(self.t.startup_timeout + 5.0):
            raise PeerError(f"{self.link.peer_label} did not say which step it needs within "
                            f"{self.t.startup_timeout:.0f} s")
        self._raise()
        assert self.need is not None
        return self.need

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, msg: Message, ready: Any) -> None:
        self._raise()
        with self.lock:
            self.in_flight += 1
        self._put((msg, ready), what="accepted no message")

    def _put(self, item: tuple[Message, Any] | None, *, what: str) -> None:
        """Queue for the sender thread; fail as soon as it failed, or after the peer timeout (twice that when the
        peer may be restarting: its restart, then its catching up)."""
        t = self.t
        deadline = time.monotonic() + t.peer_timeout * (2 if t.recoverable else 1)
        while True:
            self._raise()
            try:
                self.outbox.put(item, timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                return
            except queue.Full:
                if time.monotonic() >= deadline:
                    raise PeerError(f"{self.link.peer_label} {what} for {t.peer_timeout:.0f} s "
                                    "(stalled or dead; pipeline.peer_timeout_s)") from None

    def close(self) -> None:
        t = self.t
        if self.thread is not None:
            self._put(None, what="did not drain the last messages")
            # the thread may still replay to a restarted peer, or wait for it to finish: bounded by the time since
            # it last made progress, not by a total
            bound = t.peer_timeout * (2 if t.recoverable else 1) + 5.0
            while self.thread.is_alive() and time.monotonic() - self.progress < bound:
                self.thread.join(timeout=1.0)
            if self.thread.is_alive():
                raise PeerError(f"{self.link.peer_label} did not receive the last messages within "
                                f"{t.peer_timeout:.0f} s")
            self._raise()
        self.log.close()

    # ---- the thread ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        link = self.link
        try:
            next_step = self._open()
        except Exception as e:  # noqa: BLE001
            self.error = e if isinstance(e, PeerError) else PeerError(
                f"connecting to {link.peer_label} failed: {_short(e)}")
            self.need_known.set()
            return
        self.need = next_step
        self.need_known.set()
        closing = False
        while True:
            try:
                if self.peer_done:
                    self._discard_until_closed()
                    return
                next_step, ended = self._drain(next_step)
                if ended and self.t.recoverable:
                    self._linger()
                if ended or closing:
                    self._leave()
                    return
                item = self.outbox.get()
                if item is None:  # close(): every queued message is in the log; send what is left, then stop
                    closing = True
                    continue
                msg, ready = item
                if ready is not None:
                    ready.synchronize()
                header, payload = pack(msg, self.t.wire, pin=self.t.pin)
                host = payload if payload.device.type == "cpu" else payload.cpu()
                self.log.append(msg.step, header.cpu(), host)
                self._publish_restartable()  # the disk cap may have dropped what a restart needs
                with self.lock:
                    self.in_flight -= 1
            except Unfeedable as e:
                self.error = e
                log.error("%s", e)
                if self.t.on_fatal is not None:
                    self.t.on_fatal(str(e))
                return
            except Exception as e:  # noqa: BLE001 - any failure here means the peer link is gone
                try:
                    self.t.recover(link, e, "sending to")
                    self.progress = time.monotonic()
                    before = next_step
                    next_step = self._handshake(link)
                    self.replayed += max(0, before - next_step)
                except Exception as fatal:  # noqa: BLE001
                    self.error = fatal if isinstance(fatal, PeerError) else PeerError(_short(fatal))
                    log.error("%s", self.error)
                    return

    def _handshake(self, link: Any) -> int:
        need = torch.zeros(1, dtype=torch.int64, device=self.t.wire)
        link.group.recv([need], link.peer_index, TAG_HANDSHAKE).wait(timedelta(seconds=self.t.startup_timeout))
        return int(need.item())

    def _open(self) -> int:
        """Connect to the peer and learn the first step it needs; a peer that already finished (this stage was
        restarted at the very end) needs nothing."""
        link, store = self.link, self.link.store
        if self.t.ends_kept:
            if link.connect(timeout_s=self.t.startup_timeout, give_up=lambda: peer_done(store, link.peer) is not None):
                return self._handshake(link)
            done = peer_done(store, link.peer)
            assert done is not None
            self.peer_done = True
            log.info("%s already finished at step %d: nothing to send it", link.peer_label, done[0])
            return done[0] + 1
        link.connect(timeout_s=self.t.startup_timeout)
        return self._handshake(link)

    def _discard_until_closed(self) -> None:
        """The peer has everything: take what the compute thread sends without sending it, until close()."""
        while self.outbox.get() is not None:
            with self.lock:
                self.in_flight -= 1
        self.delivered = max(self.delivered, self.need or 0)

    def _linger(self) -> None:
        """After END: stay until the peer says it finished, so that if it dies in its last steps its restart is fed
        from the log (``_PeerRestarted`` sends this thread back to the replay). Bounded: twice the peer timeout
        after the last message went out."""
        link = self.link
        store, deadline = link.store, time.monotonic() + 2 * self.t.peer_timeout
        self.progress = time.monotonic()
        known = link.incarnations[link.peer_index]
        while time.monotonic() < deadline:
            try:
                if peer_done(store, link.peer, strict=True) is not None:
                    return
            except Exception:  # noqa: BLE001 - no store, no supervisor: nothing will come back to be fed
                return
            if peer_incarnation(store, link.peer) > known:
                raise _PeerRestarted(f"{link.peer_label} was restarted after the end of the stream")
            time.sleep(0.2)
        log.warning("%s did not say it finished within %.0f s of the end of the stream; not waiting longer",
                    link.peer_label, 2 * self.t.peer_timeout)

    def _leave(self) -> None:
        """Say this sender stopped waiting: a restart of the peer can no longer be fed from here."""
        if self.t.ends_kept:
            try:
                self.link.store.set(f"left/{self.t.rank}", "1")
            except Exception:  # noqa: BLE001
                pass

    def _drain(self, next_step: int) -> tuple[int, bool]:
        """Send every logged message from ``next_step`` on; (the next step to send, whether END went out)."""
        link = self.link
        oldest = self.log.oldest()
        if oldest is not None and oldest > next_step:
            if self.log.keep:
                capped = self.log.capped_below is not None and self.log.capped_below > next_step
                raise Unfeedable(
                    f"{link.peer_label} cannot restart alone: it needs step {next_step}, but {self.t.label} keeps "
                    f"steps from {oldest} on in its replay log"
                    + (" (its disk cap was reached)" if capped else "")
                    + (f"; {self.t.replay_hint}" if self.t.replay_hint else ""))
            log.warning("pipeline.replay is off: %s missed steps %d..%d, which are gone; it resumes at step %d",
                        link.peer_label, next_step, oldest - 1, oldest)
            next_step = oldest
        while self.log.has(next_step):
            entry = self.log.get(next_step, timeout_s=0.0)
            assert entry is not None
            header, payload = entry
            kind = int(header[2])
            if self.t.wire.type != "cpu":
                header, payload = header.to(self.t.wire), payload.to(self.t.wire)
            timeout = timedelta(seconds=self.t.peer_timeout)
            works = [link.group.send([header], link.peer_index, TAG_DATA)]
            if payload.numel():
                works.append(link.group.send([payload], link.peer_index, TAG_DATA))
            for w in works:
                w.wait(timeout)
            self.bytes_sent += header.numel() * 8 + payload.numel()
            self.progress = time.monotonic()
            self.sent_messages += 1
            self.delivered = next_step
            self.log.sent(next_step)
            self._prune()
            next_step += 1
            if kind == END:
                return next_step, True
        return next_step, False

    def _prune(self) -> None:
        """Drop what the peer can no longer ask for: everything before its published restart point."""
        if self.t.store is None or not self.log.keep:
            return
        key, store = f"rp/{self.link.peer}", self.link.store  # the link's own store connection: this thread's
        try:
            if store.check([key]):
                self.restart_point = int(store.get(key))
                self.log.prune(self.restart_point)
        except Exception:  # noqa: BLE001 - a store hiccup only delays pruning
            pass
        self._publish_restartable()

    def _publish_restartable(self) -> None:
        """``alone/PEER/RANK`` in the job's store: "1" while the log holds every step from the peer's restart point
        on, else "0 RESTART_POINT OLDEST_KEPT HINT" (refreshed every second while so); the peer's supervisor then
        ends the job instead of restarting it."""
        t = self.t
        if t.store is None or not self.log.keep:
            return
        point = self.restart_point if self.restart_point is not None else 0
        ok = self.log.restartable(point)
        now = time.monotonic()
        if ok == self.restartable and (ok or now < self.alone_refresh):
            return
        peer = self.link.peer_label
        if ok != self.restartable:
            if not ok:
                log.warning("%s can no longer restart alone: its restart point is step %d but the replay log keeps "
                            "steps from %s on (its disk cap was reached); until its next checkpoint a dead %s ends "
                            "the job (%s)", peer, point, self.log.oldest(), peer, t.replay_hint)
            elif self.restartable is False:
                log.info("%s can restart alone again (restart point step %d)", peer, point)
        self.restartable, self.alone_refresh = ok, now + 1.0
        value = "1" if ok else f"0 {point} {self.log.oldest()} {t.replay_hint}"
        try:
            self.link.store.set(f"alone/{self.link.peer}/{t.rank}", value)
        except Exception:  # noqa: BLE001
            pass


class _Receiver:
    """One route from a previous-stage peer: its thread and its bounded inbox."""

    def __init__(self, t: Transport, route: Route):
        self.t, self.link, self.rows = t, route.link, route.rows
        self.inbox: queue.Queue[Message | BaseException] = queue.Queue(maxsize=t.prefetch)
        self.got_first = False
        self.bytes_received = self.dropped = 0

    def start(self, first_step: int) -> None:
        threading.Thread(target=self._loop, args=(first_step,), name="bimdist-recv", daemon=True).start()

    def get(self) -> Message:
        t = self.t
        timeout = t.peer_timeout if self.got_first else t.startup_timeout
        if t.recoverable:  # the peer may be restarting: a restart and a replay fit in another timeout
            timeout += t.peer_timeout
        try:
            item = self.inbox.get(timeout=timeout + 5.0)  # the receiver thread times out first
        except queue.Empty:
            raise PeerError(f"{self.link.peer_label} sent nothing for {timeout:.0f} s (silent or dead)") from None
        if isinstance(item, BaseException):
            raise item
        self.got_first = True
        return item

    def _loop(self, first_step: int) -> None:
        t, link = self.t, self.link
        expected, first = first_step, True
        try:
            if not self._open(expected):
                return
        except Exception as e:  # noqa: BLE001
            if isinstance(e, Unfeedable) and t.on_fatal is not None:
                log.error("%s", e)
                t.on_fatal(str(e))
            self.inbox.put(e if isinstance(e, PeerError) else PeerError(f"connecting to {link.peer_label} "
                                                                        f"failed: {_short(e)}"))
            return
        while True:
            wait = timedelta(seconds=t.startup_timeout if first else t.peer_timeout)
            header = torch.empty(HEADER_LEN, dtype=torch.int64, device=t.wire)
            try:
                link.group.recv([header], link.peer_index, TAG_DATA).wait(wait)
                kind, step, reason, specs, nbytes = parse_header(header)
                payload = torch.empty(nbytes, dtype=torch.uint8, device=t.wire, pin_memory=t.pin)
                if nbytes:
                    link.group.recv([payload], link.peer_index, TAG_DATA).wait(timedelta(seconds=t.peer_timeout))
            except PeerError as e:
                self.inbox.put(e)
                return
            except Exception as e:  # noqa: BLE001
                try:
                    t.recover(link, e, "receiving from")
                    self._handshake(expected)
                    continue
                except Exception as fatal:  # noqa: BLE001
                    self.inbox.put(fatal if isinstance(fatal, PeerError) else PeerError(_short(fatal)))
                    return
            first = False
            self.bytes_received += header.numel() * 8 + payload.numel()
            if step < expected:  # the peer replays from its log: this one is here already
                self.dropped += 1
                continue
            expected = step + 1
            tensors = unpack(specs, payload)
            if t.staging:  # host -> device, queued on the stream the compute thread uses, so it runs first
                tensors = [x.to(t.device, non_blocking=t.pin, copy=True) for x in tensors]
            self.inbox.put(Message(kind=kind, step=step, reason=reason, tensors=tensors))
            if kind == END:
                if t.recoverable:
                    self._linger(expected)
                return

    def _handshake(self, need: int) -> None:
        x = torch.tensor([need], dtype=torch.int64, device=self.t.wire)
        self.link.group.send([x], self.link.peer_index, TAG_HANDSHAKE).wait(timedelta(seconds=self.t.startup_timeout))

    def _open(self, first_step: int) -> bool:
        """Connect to the peer and ask for ``first_step`` on. A peer that has already left (this stage was restarted
        at the very end) can still end the stream here when this stage's checkpoint is at its end; otherwise the
        steps this stage needs are gone (``Unfeedable``). False when nothing is to be received."""
        link, store = self.link, self.link.store
        if not self.t.ends_kept:
            link.connect(timeout_s=self.t.startup_timeout)
            self._handshake(first_step)
            return True
        if link.connect(timeout_s=self.t.startup_timeout, give_up=lambda: peer_left(store, link.peer)):
            self._handshake(first_step)
            return True
        done = peer_done(store, link.peer)
        if done is not None and done[0] == first_step:
            log.info("%s already finished at step %d, where this stage resumes: the stream ends here",
                     link.peer_label, first_step)
            self.inbox.put(Message(kind=END, step=first_step, reason=done[1]))
            return False
        raise Unfeedable(f"this stage restarted at step {first_step} but {link.peer_label} has already left "
                         f"(finished at step {done[0] if done else '?'}): the steps in between cannot be recomputed")

    def _linger(self, expected: int) -> None:
        """After END, until this stage closes: answer a restarted peer's handshake (it needs nothing more from here
        than to learn that this stage has the whole stream)."""
        link = self.link
        known = link.incarnations[link.peer_index]
        while not self.t._closed.wait(0.2):
            if peer_incarnation(link.store, link.peer) > known:
                try:
                    link.wait_for_restart(timeout_s=self.t.peer_timeout)
                    self._handshake(expected)
                except Exception as e:  # noqa: BLE001 - this stage has its stream; the other end decides its fate
                    log.warning("a restart of %s after the end of the stream could not connect: %s",
                                link.peer_label, _short(e))
                    return
                known = link.incarnations[link.peer_index]


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
