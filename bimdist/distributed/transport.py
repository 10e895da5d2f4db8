"""The only point-to-point code: messages to the next stage and from the previous one.

A message is a fixed-size int64 header (kind, step, and dtype + shape of each tensor) followed by one uint8
payload holding every tensor's bytes, so the receiver allocates exactly and nothing is pickled. A sender
thread and a receiver thread drive the requests (gloo requests only complete inside ``wait()``), with bounded
queues on both sides: at most ``max_in_flight`` sends are pending before ``send`` blocks (backpressure), and
up to ``prefetch`` received messages wait for the compute loop. Every wait has a timeout; a dead or silent
peer becomes a ``PeerError`` that names it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("bimdist.transport")

MAGIC = 0x42494D44  # "BIMD"
VERSION = 1
HEADER_LEN = 64
SLOTS_PER_TENSOR = 8  # dtype code, ndim, up to 6 dims
MAX_TENSORS = (HEADER_LEN - 6) // SLOTS_PER_TENSOR
ALIGN = 16

DATA, END = 1, 2
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
        prev: tuple[int, Any, str] | None,  # (global rank, process group, name) of the upstream peer
        next: tuple[int, Any, str] | None,  # same for the downstream peer
        max_in_flight: int,
        prefetch: int,
        peer_timeout_s: float,
        startup_timeout_s: float,
        host_staging: bool = False,
    ):
        """``host_staging``: tensors cross through host buffers (pinned on a GPU), for a backend that cannot send
        device tensors: gloo between ranks that share a GPU."""
        self.device = device
        self.staging = host_staging
        self.wire = torch.device("cpu") if host_staging else device  # where the bytes are when they are sent
        self.pin = host_staging and device.type == "cuda"
        self.prev, self.next = prev, next
        self.peer_timeout = peer_timeout_s
        self.startup_timeout = startup_timeout_s
        self.bytes_sent = 0
        self.bytes_received = 0
        self.send_wait_s = 0.0
        self.recv_wait_s = 0.0
        self.sent_messages = 0
        self._outbox: queue.Queue[tuple[Message, Any] | None] = queue.Queue(maxsize=max_in_flight)
        self._inbox: queue.Queue[Message | BaseException] = queue.Queue(maxsize=prefetch)
        self._send_error: BaseException | None = None
        self._in_flight = 0
        self._lock = threading.Lock()
        self._got_first = False
        self._threads = []
        if next is not None:
            self._threads.append(threading.Thread(target=self._send_loop, name="bimdist-send", daemon=True))
        if prev is not None:
            self._threads.append(threading.Thread(target=self._recv_loop, name="bimdist-recv", daemon=True))
        for t in self._threads:
            t.start()

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
        """Queue for the sender thread; fail as soon as the sender failed, or after the peer timeout."""
        assert self.next is not None
        deadline = time.monotonic() + self.peer_timeout
        while True:
            self._raise_send_error()
            try:
                self._outbox.put(item, timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                return
            except queue.Full:
                if time.monotonic() >= deadline:
                    raise PeerError(f"{self.next[2]} {what} for {self.peer_timeout:.0f} s "
                                    "(stalled or dead; pipeline.peer_timeout_s)") from None

    def recv(self) -> Message:
        """The next message from the previous stage (prefetched), or PeerError after the timeout."""
        assert self.prev is not None, "stage 0 receives nothing"
        timeout = self.peer_timeout if self._got_first else self.startup_timeout
        t0 = time.perf_counter()
        try:
            item = self._inbox.get(timeout=timeout + 5.0)  # the receiver thread times out first
        except queue.Empty:
            raise PeerError(f"{self.prev[2]} sent nothing for {timeout:.0f} s (silent or dead)") from None
        finally:
            self.recv_wait_s += time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise item
        self._got_first = True
        return item

    def close(self) -> None:
        """Deliver every queued send (bounded by the peer timeout), then stop the sender thread."""
        if self.next is not None:
            self._put(None, what="did not drain the last messages")
            self._threads[0].join(timeout=self.peer_timeout + 5.0)
            if self._threads[0].is_alive():
                raise PeerError(f"{self.next[2]} did not receive the last messages within {self.peer_timeout:.0f} s")
            self._raise_send_error()

    # ---- communication threads ----------------------------------------------------------------------------
    def _raise_send_error(self) -> None:
        if self._send_error is not None:
            raise self._send_error

    def _send_loop(self) -> None:
        assert self.next is not None
        rank, group, name = self.next
        timeout = timedelta(seconds=self.peer_timeout)
        while True:
            item = self._outbox.get()
            if item is None:
                return
            msg, ready = item
            try:
                if ready is not None:
                    ready.synchronize()
                header, payload = pack(msg, self.wire, pin=self.pin)
                works = [dist.isend(header, rank, group=group)]
                if payload.numel():
                    works.append(dist.isend(payload, rank, group=group))
                for w in works:
                    w.wait(timeout)
            except Exception as e:  # noqa: BLE001 - any failure here means the peer link is gone
                self._send_error = PeerError(f"sending step {msg.step} to {name} failed: {_short(e)}")
                log.error("%s", self._send_error)
                return
            self.bytes_sent += header.numel() * 8 + payload.numel()
            self.sent_messages += 1
            with self._lock:
                self._in_flight -= 1

    def _recv_loop(self) -> None:
        assert self.prev is not None
        rank, group, name = self.prev
        first = True
        while True:
            wait = timedelta(seconds=self.startup_timeout if first else self.peer_timeout)
            header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.wire)
            try:
                dist.irecv(header, rank, group=group).wait(wait)
                kind, step, reason, specs, nbytes = parse_header(header)
                payload = torch.empty(nbytes, dtype=torch.uint8, device=self.wire, pin_memory=self.pin)
                if nbytes:
                    dist.irecv(payload, rank, group=group).wait(timedelta(seconds=self.peer_timeout))
            except Exception as e:  # noqa: BLE001
                err = e if isinstance(e, PeerError) else PeerError(f"receiving from {name} failed: {_short(e)}")
                self._inbox.put(err)
                return
            first = False
            self.bytes_received += header.numel() * 8 + payload.numel()
            tensors = unpack(specs, payload)
            if self.staging:  # host -> device, queued on the stream the compute thread uses, so it runs first
                tensors = [t.to(self.device, non_blocking=self.pin, copy=True) for t in tensors]
            self._inbox.put(Message(kind=kind, step=step, reason=reason, tensors=tensors))
            if kind == END:
                return


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
