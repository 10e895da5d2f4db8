"""Nothing learned is lost: preemption, kill -9 under torchrun restarts, corrupt and full-disk checkpoints."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, TINY, cli, ranks_of, same_weights, start_cli, wait_for

STEPS = 400
COMMON = [str(TINY), f"--run.steps={STEPS}", "--pipeline.stages=2", "--pipeline.threads=1", "--run.log_every=50"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = cli("train", *COMMON, f"--run.dir={run_dir}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def assert_same_weights(reference, run_dir):
    assert same_weights(reference, run_dir, STEPS), "weights differ from the uninterrupted run"


def test_sigterm_then_resume_equals_an_uninterrupted_run(reference, tmp_path):
    log = tmp_path / "first.log"
    job = start_cli("train", *COMMON, f"--run.dir={tmp_path / 'run'}", log_path=log)
    try:
        assert wait_for(lambda: "progress stage=1 replica=0 step=150/" in log.read_text(), 180), log.read_text()
        job.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = job.wait(timeout=120)
        stopped_in = time.monotonic() - t0
    finally:
        if job.poll() is None:
            job.kill()
    text = log.read_text()
    assert code == 75, text[-3000:]
    assert stopped_in < 60
    stops = [int(s) for s in re.findall(r"finished at step (\d+) \(signal\)", text)]
    assert len(stops) == 2 and stops[0] == stops[1] and 150 <= stops[0] < STEPS
    again = cli("train", *COMMON, f"--run.dir={tmp_path / 'run'}", timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(step {stops[0]})" in again.stderr
    assert_same_weights(reference, tmp_path / "run")


def test_kill_9_under_torchrun_restarts_and_matches(reference, tmp_path):
    log = tmp_path / "torchrun.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    with open(log, "w") as f:
        job = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
             "-m", "bimdist", "train", *COMMON, f"--run.dir={tmp_path / 'run'}", "--checkpoint.every=50"],
            stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        # Kill once both stages have logged their step-200 checkpoint (logged after it is complete), not on the
        # step-200 progress line: that one comes before the checkpoint is written, so a kill there could resume at 150.
        saved = [f"checkpoint stage={s} replica=0 step=200 " for s in (0, 1)]
        assert wait_for(lambda: all(m in log.read_text() for m in saved), 180), log.read_text()
        ranks = ranks_of(job.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGKILL)
        code = job.wait(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    text = log.read_text()
    assert code == 0, text[-3000:]
    resumed = re.findall(r"resumed stage 1 from .*\(step (\d+)\)", text)
    assert resumed and int(resumed[-1]) >= 200 and int(resumed[-1]) % 50 == 0, text[-3000:]
    assert f"finished at step {STEPS} (step limit)" in text
    assert_same_weights(reference, tmp_path / "run")


def test_corrupt_newest_checkpoint_falls_back_and_still_matches(reference, tmp_path):
    run = tmp_path / "run"
    first = cli("train", *COMMON, f"--run.dir={run}", "--run.stop_at=200", "--checkpoint.every=100",
                "--checkpoint.keep=3", timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    newest = run / "checkpoints" / "step_00000200" / "block_02.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 3] ^= 0x55
    newest.write_bytes(bytes(data))
    again = cli("train", *COMMON, f"--run.dir={run}", timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoint step 200 is unusable: block_02.pt does not match its recorded size/sha256" in again.stderr
    assert "(step 100)" in again.stderr
    assert_same_weights(reference, run)


def test_full_disk_fails_clearly_and_keeps_the_last_checkpoint(tiny_disk):
    proc = cli("train", *COMMON, f"--run.dir={tiny_disk / 'run'}", "--checkpoint.every=20", "--checkpoint.keep=50",
               timeout=300)
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert "checkpoint error: cannot write" in proc.stderr and "No space left on device" in proc.stderr
    from bimdist.runs import load_units, run_config, store_for

    cfg = run_config(tiny_disk / "run")
    store = store_for(cfg, tiny_disk / "run")
    complete = [s for s in store.steps_on_disk() if store.is_complete(s)]  # every block file and its sidecar
    assert complete, "at least one checkpoint fitted before the disk filled"
    units, step = load_units(cfg, tiny_disk / "run")
    assert step == max(complete) and len(units) == 4 and store.verify(step) is None
