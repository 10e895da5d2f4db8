"""What happens to a dead stage, from the config alone: the restart point, the replay log's needs, the line users
read at start-up and in the doctor, and the control board's abort that ends every rank."""

import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from bimdist.config import load_config
from bimdist.distributed.control import ControlBoard, StoreUnreachable, bounded
from bimdist.distributed.restart_plan import lag_steps, message_bytes, restart_plan
from bimdist.train.loop import restart_point
from tests.conftest import TINY


def test_the_restart_point_is_the_newest_checkpoint_that_can_feed_the_next_stage_else_the_start():
    assert restart_point([1000, 500], need=1003) == 1000
    assert restart_point([1000, 500], need=999) == 500  # 1000 is past what the next stage still needs
    assert restart_point([1000, 500], need=None) == 1000  # the last stage: nothing downstream
    assert restart_point([], need=240) == 0  # no checkpoint yet: the run's start, never the current step
    assert restart_point([500], need=20) == 0


def test_message_bytes_count_tokens_order_and_pixels():
    cfg = load_config(str(TINY), ["--pipeline.stages=4"])
    # stage 0 sends block 1's visible tokens: 16 patches, half masked, 25% of those dropped -> 6, plus the class
    assert message_bytes(cfg, 0) == 16 * (1 + 6) * 32 * 4 + 16 * 16 * 2 + 16 * 16 * 16
    bf16 = load_config(str(TINY), ["--pipeline.stages=4", "--pipeline.wire_dtype=bf16"])
    assert message_bytes(bf16, 0) == message_bytes(cfg, 0) - 16 * 7 * 32 * 2


def test_the_defaults_restart_a_dead_stage_alone_and_say_from_where():
    plan = restart_plan(load_config("fmnist-tiny", ["--pipeline.stages=4", "--run.steps=100000"]), supervised=True)
    assert plan.alone and plan.fits and plan.needed_steps == 500 + lag_steps(load_config("fmnist-tiny"))
    assert "restarts alone (up to 3 times) from its newest checkpoint (every 500 steps) or the run's start" in plan.line
    assert plan.log_steps >= plan.needed_steps


def test_a_log_too_small_for_the_interval_is_said_with_the_fix():
    cfg = load_config("fmnist-tiny", ["--pipeline.stages=4", "--run.steps=100000", "--pipeline.replay_disk_mb=100"])
    plan = restart_plan(cfg, supervised=True)
    assert plan.alone and not plan.fits and plan.log_steps < plan.needed_steps
    assert "a dead stage ends the job (exit 3)" in plan.line
    every = int(plan.line.split("checkpoint.every <= ")[1].split()[0])
    disk = int(plan.line.split("pipeline.replay_disk_mb >= ")[1].split()[0])
    assert restart_plan(load_config("fmnist-tiny", ["--pipeline.stages=4", "--run.steps=100000",
                                                    "--pipeline.replay_disk_mb=100", f"--checkpoint.every={every}"]),
                        supervised=True).fits
    assert restart_plan(load_config("fmnist-tiny", ["--pipeline.stages=4", "--run.steps=100000",
                                                    f"--pipeline.replay_disk_mb={disk}"]), supervised=True).fits


def test_without_a_supervisor_of_single_ranks_a_dead_stage_ends_the_job():
    cfg = load_config("fmnist-tiny", ["--pipeline.stages=4"])
    assert "no per-stage restart under torchrun" in restart_plan(cfg, supervised=False, launcher="torchrun").line
    off = load_config("fmnist-tiny", ["--pipeline.stages=4", "--pipeline.stage_restarts=0"])
    assert not restart_plan(off, supervised=True).alone
    ds = load_config("fmnist-tiny", ["--pipeline.stages=4", "--pipeline.engine=deepspeed"])
    assert "DeepSpeed" in restart_plan(ds, supervised=True).line


def test_an_abort_reaches_every_watcher_once_with_the_first_reason():
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=10), wait_for_workers=False)
    seen: list[str] = []
    done = threading.Event()

    def on_abort(message: str) -> None:
        seen.append(message)
        done.set()

    watcher = ControlBoard(store)
    watcher.watch(on_abort, interval_s=0.05)
    board = ControlBoard(store)
    assert board.aborted() is None and not watcher.stop_requested()
    board.request_stop("SIGTERM")
    assert wait(lambda: watcher.stop_requested(), 5)  # the flag the training loop reads, from the board's thread
    time.sleep(0.2)
    assert not seen
    board.abort("stage 2 (rank 2) cannot restart alone")
    board.abort("a later reason")
    assert done.wait(5) and seen == ["stage 2 (rank 2) cannot restart alone"]
    assert board.aborted() == "stage 2 (rank 2) cannot restart alone"
    watcher.close()


def test_a_store_call_that_does_not_answer_is_given_up_and_the_board_stops_asking():
    gate = threading.Event()
    with pytest.raises(StoreUnreachable, match="no answer from the job's store within 0 s"):
        bounded(lambda: gate.wait(10), timeout_s=0.2, what="a stuck call")
    gate.set()
    board = ControlBoard(dist.HashStore(), timeout_s=0.2)
    board.store = type("Stuck", (), {"add": lambda *_: gate.clear() or threading.Event().wait(10)})()
    t0 = time.monotonic()
    board.report_failure("rank 1", "link cut")  # gives up after 0.2 s
    assert board.dead and board.first_failure() is None and time.monotonic() - t0 < 2  # no second wait


def wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False
