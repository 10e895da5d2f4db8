"""The training step reads no tensor value on the host except when a log window is flushed: on a GPU every such
read would stall the host while the next kernels could be queued. Checked on the CPU by patching the Tensor methods
that read a value, and failing when step code calls one outside the loop's flush (or a checkpoint)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

from bimdist.config import load_config
from bimdist.train.loop import StageLoop
from bimdist.train.signals import StopFlag
from tests.conftest import TINY

READERS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")
ALLOWED = {"_flush", "checkpoint", "_resume"}  # the loop's only places that may read the device's numbers
STEP_CODE = ("bimdist/train/", "bimdist/model/")


@pytest.fixture
def host_reads(monkeypatch):
    """Every value read made by step code on the main thread, outside the allowed places: (method, where)."""
    seen: list[tuple[str, str]] = []
    main = threading.main_thread()

    def guard(name, original):  # noqa: ANN001, ANN202
        def read(self, *args, **kwargs):  # noqa: ANN001, ANN202
            if threading.current_thread() is main:
                frame, stack = sys._getframe(1), []
                while frame is not None:
                    stack.append((frame.f_code.co_filename, frame.f_code.co_name))
                    frame = frame.f_back
                in_step = [f"{Path(f).name}:{fn}" for f, fn in stack if any(p in f for p in STEP_CODE)]
                if in_step and not any(fn in ALLOWED for _, fn in stack):
                    seen.append((name, in_step[0]))
            return original(self, *args, **kwargs)

        return read

    for name in READERS:
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    return seen


def test_steps_read_nothing_on_the_host_between_log_steps(host_reads, tmp_path):
    cfg = load_config(str(TINY), ["--run.steps=8", "--run.log_every=4", "--optim.clip_grad=1.0",
                                  f"--run.dir={tmp_path}"])
    records = []

    class Collect:
        def on_start(self, start_step: int) -> None: ...

        def on_step(self, rec) -> None:  # noqa: ANN001
            records.append(rec)

        def on_end(self, result) -> None: ...  # noqa: ANN001

    loop = StageLoop(cfg, tmp_path, comm=None, device=torch.device("cpu"), stop=StopFlag(), observers=[Collect()])
    result = loop.run()
    assert result.steps_done == 8 and not host_reads, f"host reads inside steps: {host_reads}"
    # the numbers still arrive, a window at a time: every step's losses, and the gradient norm at log steps
    assert [r.step for r in records] == list(range(8))
    assert all(len(r.losses) == 4 and all(x > 0 for x in r.losses) for r in records)
    assert [r.grad_norm is not None for r in records] == [False, False, False, True] * 2


def test_the_guard_catches_a_read_inside_a_step(host_reads):
    """The check can fail: a loss read the old way, from step code, is caught."""
    from bimdist.train import worker

    code = compile("float(torch.ones(()))", str(Path(worker.__file__)), "eval")
    eval(code, {"torch": torch})  # noqa: S307 - runs as if it were a line of bimdist/train/worker.py
    assert host_reads and host_reads[0][0] == "__float__"
