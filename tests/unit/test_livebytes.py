"""The live-tensor-bytes counter: exact bytes for allocations, frees, views and tensors made outside it."""

from __future__ import annotations

import threading

import torch

from bimdist.telemetry.livebytes import LiveTensorBytes

MB = 2**20


def test_counts_allocations_frees_and_peak():
    with LiveTensorBytes() as live:
        a = torch.zeros(MB // 4)  # 1 MiB of float32
        b = torch.zeros(MB // 2)  # 2 MiB
        assert live.live == 3 * MB
        del a
        assert live.live == 2 * MB
        c = torch.ones(MB // 4)
        assert live.live == 3 * MB
        view = b[: MB // 4].view(-1, 4)  # a view shares b's storage: no new bytes
        assert live.live == 3 * MB
        del b
        assert live.live == 3 * MB  # the view still holds b's storage
        del view, c
    assert live.live == 0 and live.peak == 3 * MB


def test_autograd_graph_counts_until_backward_frees_it():
    w = torch.randn(64, 64, requires_grad=True)  # made outside: counts from the first op that touches it
    with LiveTensorBytes() as live:
        y = (torch.randn(256, 64) @ w).relu()  # saves the input and the relu output for backward
        held = live.live
        assert held >= 256 * 64 * 4 * 2 + 64 * 64 * 4
        y.sum().backward()
        del y
        assert live.live < held
    assert live.peak >= held


def test_other_threads_count_when_touched():
    made: list[torch.Tensor] = []
    with LiveTensorBytes() as live:
        t = threading.Thread(target=lambda: made.append(torch.zeros(MB // 4)))
        t.start()
        t.join(timeout=30)
        assert live.live == 0  # a dispatch mode is per thread
        made[0].add_(1)  # in-place: the same storage, now counted
        assert live.live == MB
