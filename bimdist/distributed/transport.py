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
already has. The sender keeps training until its send window is full, then waits.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
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


class Transport:
    def __init__(
        self,
        *,
        device: torch.device,
        prev: Any = None,  # groups.Link to the previous stage
        next: Any = None,  # groups.Link to the next stage
        max_in_flight: int,
        prefetch: int,
        peer_timeout_s: float,
        startup_timeout_s: float,
        host_staging: bool = False,
        recoverable: bool = False,
        replay: ReplayLog | None = None,
        store: Any = None,
    ):
        """``host_staging``: tensors cross through host buffers (pinned on a GPU), for a backend that cannot send
        device tensors: gloo between ranks that share a GPU. ``recoverable``: a dead neighbour is waited for (its
        supervisor restarts it). ``replay``: the log of sent messages (None: kept only until sent). ``store``: the
        job's store, where the next stage publishes the restart point that prunes the log."""
        self.device = device
        self.staging = host_staging
        self.wire = torch.device("cpu") if host_staging else device  # where the bytes are when they are sent
        self.pin = host_staging and device.type == "cuda"
        self.prev, self.next = prev, next
        self.peer_timeout = peer_timeout_s
        self.startup_timeout = startup_timeout_s
        self.recoverable, self.store = recoverable, store
        self.log = replay or ReplayLog(memory_bytes=1 << 62, spill_path=Path(os.devnull), keep=False)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.send_wait_s = 0.0
        self.recv_wait_s = 0.0
        self.sent_messages = 0
        self.replayed = 0  # messages sent again after the next stage came back
        self.reconnects = 0
        self.delivered = -1  # newest step the next stage has been sent (it may not have consumed it yet)
        self.dropped = 0  # messages received again and dropped by step number
        self._outbox: queue.Queue[tuple[Message, Any] | None] = queue.Queue(maxsize=max_in_flight)
        self._inbox: queue.Queue[Message | BaseException] = queue.Queue(maxsize=prefetch)
        self._send_error: BaseException | None = None
        self._in_flight = 0
        self._lock = threading.Lock()
        self._got_first = False
        self._need: int | None = None  # the next stage's first wanted step, from the handshake
        self._need_known = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sender: threading.Thread | None = None

    # ---- starting --------------------------------------------------------------------------------------------
    def start_sending(self) -> None:
        """Connect to the next stage (it says which step it needs first) and start the sender thread."""
        if self.next is not None:
            self._sender = threading.Thread(target=self._send_loop, name="bimdist-send", daemon=True)
            self._sender.start()
            self._threads.append(self._sender)

    def next_stage_needs(self) -> int | None:
        """The first step the next stage asked for (waits for the handshake); None without a next stage."""
        if self.next is None:
            return None
        if not self._need_known.wait(self.startup_timeout + 5.0):
            raise PeerError(f"{self.next.peer_label} did not say which step it needs within "
                            f"{self.startup_timeout:.0f} s")
        self._raise_send_error()
        return self._need

    def start_receiving(self, first_step: int) -> None:
        """Connect to the previous stage, ask for ``first_step`` onwards, and start the receiver thread."""
        if self.prev is not None:
            t = threading.Thread(target=self._recv_loop, args=(first_step,), name="bimdist-recv", daemon=True)
            t.start()
            self._threads.append(t)

    # ---- public API (compute thread) ----------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return self._in_flight

    def send(self, msg: Message) -> None:
        """Queue ``msg`` for the next stage; blocks only while ``max_in_flight`` sends are pending."""
        assert self.next is not None, "the last stage has no next stage"
        self._raise_send_error()
        ready = None
        if self.device.type == "cuda":  # the sender thread waits for the producing kernels, not the host
            ready = torch.cuda.Event()
            ready.record()
        t0 = time.perf_counter()
        with self._lock:
            self._in_flight += 1
        try:
            self._put((msg, ready), what="accepted no message")
        finally:
            self.send_wait_s += time.perf_counter() - t0

    def _put(self, item: tuple[Message, Any] | None, *, what: str) -> None:
        """Queue for the sender thread; fail as soon as the sender failed, or after the peer timeout (twice that
        when the next stage may be restarting: its restart, then its catching up)."""
        assert self.next is not None
        deadline = time.monotonic() + self.peer_timeout * (2 if self.recoverable else 1)
        while True:
            self._raise_send_error()
            try:
                self._outbox.put(item, timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                return
            except queue.Full:
                if time.monotonic() >= deadline:
                    raise PeerError(f"{self.next.peer_label} {what} for {self.peer_timeout:.0f} s "
                                    "(stalled or dead; pipeline.peer_timeout_s)") from None

    def recv(self) -> Message:
        """The next message from the previous stage (prefetched), or PeerError after the timeout."""
        assert self.prev is not None, "stage 0 receives nothing"
        timeout = self.peer_timeout if self._got_first else self.startup_timeout
        if self.recoverable:  # the previous stage may be restarting: a restart and a replay fit in another timeout
            timeout += self.peer_timeout
        t0 = time.perf_counter()
        try:
            item = self._inbox.get(timeout=timeout + 5.0)  # the receiver thread times out first
        except queue.Empty:
            raise PeerError(f"{self.prev.peer_label} sent nothing for {timeout:.0f} s (silent or dead)") from None
        finally:
            self.recv_wait_s += time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise item
        self._got_first = True
        return item

    def close(self) -> None:
        """Deliver every queued send (bounded by the peer timeout), then stop the sender thread."""
        if self._sender is not None:
            self._put(None, what="did not drain the last messages")
            self._sender.join(timeout=self.peer_timeout * (2 if self.recoverable else 1) + 5.0)
            if self._sender.is_alive():
                raise PeerError(f"{self.next.peer_label} did not receive the last messages within "
                                f"{self.peer_timeout:.0f} s")
            self._raise_send_error()
        self.log.close()

    # ---- communication threads ----------------------------------------------------------------------------
    def _raise_send_error(self) -> None:
        if self._send_error is not None:
            raise self._send_error

    def _recover(self, link: Any, e: BaseException, what: str) -> None:
        """A neighbour failed: when its supervisor restarts it, wait for it and rebuild the link; else raise."""
        if not self.recoverable:
            raise PeerError(f"{what} {link.peer_label} failed: {_short(e)}") from None
        log.warning("%s %s failed (%s); waiting up to %.0f s for it to be restarted", what, link.peer_label,
                    _short(e), self.peer_timeout)
        link.wait_for_restart(timeout_s=self.peer_timeout)
        self.reconnects += 1
        log.warning("reconnected to %s (incarnation %s)", link.peer_label, link.incarnations[link.peer_index])

    def _handshake_recv(self, link: Any) -> int:
        need = torch.zeros(1, dtype=torch.int64, device=self.wire)
        link.group.recv([need], link.peer_index, TAG_HANDSHAKE).wait(timedelta(seconds=self.startup_timeout))
        return int(need.item())

    def _send_loop(self) -> None:
        link = self.next
        try:
            link.connect(timeout_s=self.startup_timeout)
            self._need = self._handshake_recv(link)
        except Exception as e:  # noqa: BLE001
            self._send_error = e if isinstance(e, PeerError) else PeerError(
                f"connecting to {link.peer_label} failed: {_short(e)}")
            self._need_known.set()
            return
        self._need_known.set()
        next_step, closing = self._need, False
        while True:
            try:
                next_step, done = self._drain(link, next_step)
                if done or closing:
                    return
                item = self._outbox.get()
                if item is None:  # close(): every queued message is in the log; send what is left, then stop
                    closing = True
                    continue
                msg, ready = item
                if ready is not None:
                    ready.synchronize()
                header, payload = pack(msg, self.wire, pin=self.pin)
                host = payload if payload.device.type == "cpu" else payload.cpu()
                self.log.append(msg.step, header.cpu(), host)
                with self._lock:
                    self._in_flight -= 1
            except Exception as e:  # noqa: BLE001 - any failure here means the peer link is gone
                try:
                    self._recover(link, e, "sending to")
                    before = next_step
                    next_step = self._handshake_recv(link)
                    self.replayed += max(0, before - next_step)
                except Exception as fatal:  # noqa: BLE001
                    self._send_error = fatal if isinstance(fatal, PeerError) else PeerError(_short(fatal))
                    log.error("%s", self._send_error)
                    return

    def _drain(self, link: Any, next_step: int) -> tuple[int, bool]:
        """Send every logged message from ``next_step`` on; (the next step to send, whether END went out)."""
        oldest = self.log.oldest()
        if oldest is not None and oldest > next_step:
            if self.log.keep:
                raise PeerError(f"{link.peer_label} needs step {next_step} but the replay log starts at {oldest}")
            log.warning("pipeline.replay is off: %s missed steps %d..%d, which are gone; it resumes at step %d",
                        link.peer_label, next_step, oldest - 1, oldest)
            next_step = oldest
        while self.log.has(next_step):
            entry = self.log.get(next_step, timeout_s=0.0)
            assert entry is not None
            header, payload = entry
            kind = int(header[2])
            if self.wire.type != "cpu":
                header, payload = header.to(self.wire), payload.to(self.wire)
            timeout = timedelta(seconds=self.peer_timeout)
            works = [link.group.send([header], link.peer_index, TAG_DATA)]
            if payload.numel():
                works.append(link.group.send([payload], link.peer_index, TAG_DATA))
            for w in works:
                w.wait(timeout)
            self.bytes_sent += header.numel() * 8 + payload.numel()
            self.sent_messages += 1
            self.delivered = next_step
            self.log.sent(next_step)
            self._prune()
            next_step += 1
            if kind == END:
                return next_step, True
        return next_step, False

    def _prune(self) -> None:
        """Drop what the next stage can no longer ask for: everything before its published restart point."""
        if self.store is None or not self.log.keep:
            return
        key, store = f"rp/{self.next.peer}", self.next.store  # the link's own store connection: this thread's
        try:
            if store.check([key]):
                self.log.prune(int(store.get(key)))
        except Exception:  # noqa: BLE001 - a store hiccup only delays pruning
            pass

    def _recv_loop(self, first_step: int) -> None:
        link = self.prev
        expected, first = first_step, True
        try:
            link.connect(timeout_s=self.startup_timeout)
            self._handshake_send(link, expected)
        except Exception as e:  # noqa: BLE001
            self._inbox.put(e if isinstance(e, PeerError) else PeerError(f"connecting to {link.peer_label} "
                                                                         f"failed: {_short(e)}"))
            return
        while True:
            wait = timedelta(seconds=self.startup_timeout if first else self.peer_timeout)
            header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.wire)
            try:
                link.group.recv([header], link.peer_index, TAG_DATA).wait(wait)
                kind, step, reason, specs, nbytes = parse_header(header)
                payload = torch.empty(nbytes, dtype=torch.uint8, device=self.wire, pin_memory=self.pin)
                if nbytes:
                    link.group.recv([payload], link.peer_index, TAG_DATA).wait(timedelta(seconds=self.peer_timeout))
            except PeerError as e:
                self._inbox.put(e)
                return
            except Exception as e:  # noqa: BLE001
                try:
                    self._recover(link, e, "receiving from")
                    self._handshake_send(link, expected)
                    continue
                except Exception as fatal:  # noqa: BLE001
                    self._inbox.put(fatal if isinstance(fatal, PeerError) else PeerError(_short(fatal)))
                    return
            first = False
            self.bytes_received += header.numel() * 8 + payload.numel()
            if step < expected:  # the previous stage replays from its log: this one is here already
                self.dropped += 1
                continue
            expected = step + 1
            tensors = unpack(specs, payload)
            if self.staging:  # host -> device, queued on the stream the compute thread uses, so it runs first
                tensors = [t.to(self.device, non_blocking=self.pin, copy=True) for t in tensors]
            self._inbox.put(Message(kind=kind, step=step, reason=reason, tensors=tensors))
            if kind == END:
                return

    def _handshake_send(self, link: Any, need: int) -> None:
        t = torch.tensor([need], dtype=torch.int64, device=self.wire)
        link.group.send([t], link.peer_index, TAG_HANDSHAKE).wait(timedelta(seconds=self.startup_timeout))


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
