"""A dead stage restarts alone: the others keep their processes, and the run stays exact. Also: a stage that keeps
dying ends the job, a replica comes back into its group, and no rank outlives its supervisor."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, TINY, alive, cli, ranks_of, same_weights, start_cli, wait_for

STEPS = 240
COMMON = [str(TINY), f"--run.steps={STEPS}", "--pipeline.stages=4", "--pipeline.threads=1", "--checkpoint.every=40",
          "--run.log_every=40", "--pipeline.peer_timeout_s=60", "--pipeline.replay_memory_mb=1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = cli("train", *COMMON, f"--run.dir={run_dir}", timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def finish(job: subprocess.Popen, timeout: float) -> int:
    try:
        return job.wait(timeout=timeout)
    finally:
        if job.poll() is None:
            job.kill()


# The edge stages: stage 0 (the data, no upstream) and the last (no downstream). A middle stage's kill, and kills of
# stages 2, 0 and 3 in one run, are checked bit for bit by benchmarks/recovery.py (tests/integration/test_benchmarks).
@pytest.mark.parametrize("stage", [0, 3])
def test_kill_9_of_a_stage_restarts_it_alone_and_the_weights_match(reference, tmp_path, stage):
    log = tmp_path / "job.log"
    job = start_cli("train", *COMMON, f"--run.dir={tmp_path / 'run'}", log_path=log)
    try:
        saved = f"checkpoint stage={stage} replica=0 step=80 "
        assert wait_for(lambda: saved in log.read_text(), 240), log.read_text()[-3000:]
        before = ranks_of(job.pid)
        assert sorted(before) == [0, 1, 2, 3]
        os.kill(before[stage], signal.SIGKILL)
        assert wait_for(lambda: f"recovery stage={stage} " in log.read_text(), 120), log.read_text()[-3000:]
        after = ranks_of(job.pid)
        assert after[stage] != before[stage]
        assert {r: p for r, p in after.items() if r != stage} == {r: p for r, p in before.items() if r != stage}
        code = finish(job, 300)
    finally:
        if job.poll() is None:
            job.kill()
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert f"rank {stage} (stage {stage}, replica 0) was killed by SIGKILL; restarting it alone (restart 1 of 3" in text
    line = re.search(rf"recovery stage={stage} replica=0 incarnation=1 resumed_at_step=(\d+) "
                     r"first_step_s_after_death=([\d.]+)", text)
    assert line and int(line.group(1)) >= 80 and float(line.group(2)) < 60
    assert same_weights(reference, tmp_path / "run", STEPS), "weights differ from the uninterrupted run"
    assert not list((tmp_path / "run" / "replay").glob("*.log"))  # every replay log closed and removed


def test_a_stage_that_keeps_dying_ends_the_job_naming_it(tmp_path):
    log = tmp_path / "job.log"
    job = start_cli("train", *COMMON[:-2], "--run.steps=100000", "--pipeline.stages=2", "--pipeline.stage_restarts=2",
                    "--pipeline.peer_timeout_s=30", f"--run.dir={tmp_path / 'run'}", log_path=log)
    killed: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while len(killed) < 3 and time.monotonic() < deadline:  # kill rank 1 each time it (re)appears
            pid = ranks_of(job.pid).get(1)
            if pid is not None and pid not in killed:
                time.sleep(1.0)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.2)
        code = finish(job, 200)
    finally:
        if job.poll() is None:
            job.kill()
    text = log.read_text()
    assert len(killed) == 3 and code == 3, text[-3000:]
    assert "stage 1 (replica 0, rank 1) died 3 times (exit codes [-9, -9, -9]), more than pipeline.stage_restarts=2" \
        in text


def test_a_lost_replica_comes_back_into_its_group(tmp_path):
    log = tmp_path / "job.log"
    job = start_cli("train", str(TINY), "--run.steps=200", "--pipeline.stages=2", "--pipeline.replicas=2",
                    "--pipeline.threads=1", "--checkpoint.every=40", "--run.log_every=40",
                    "--pipeline.peer_timeout_s=60", f"--run.dir={tmp_path / 'run'}", log_path=log)
    try:
        assert wait_for(lambda: "checkpoint stage=1 replica=1 step=80 " in log.read_text(), 240), log.read_text()
        os.kill(ranks_of(job.pid)[3], signal.SIGKILL)
        code = finish(job, 300)
    finally:
        if job.poll() is None:
            job.kill()
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert re.search(r"stage 1 lost replica rank\(s\) \[3\] during step \d+", text)
    assert re.search(r"stage 1 replica 1 rejoined its replicas at step \d+", text)
    assert "finished at step 200 (step limit)" in text


def test_ranks_stop_by_themselves_when_the_launcher_is_killed(tmp_path):
    log = tmp_path / "job.log"
    job = start_cli("train", *COMMON[:-2], "--run.steps=100000", "--pipeline.stages=2",
                    "--pipeline.peer_timeout_s=20", f"--run.dir={tmp_path / 'run'}", log_path=log)
    kill_supervisor(job, log, what="ranks outlived their launcher")
    text = log.read_text()
    for rank in (0, 1):
        assert re.search(rf"\[rank={rank} .*the process that started this rank \(pid {job.pid}\) is gone: "
                         "checkpointing and stopping", text), text[-3000:]


def test_ranks_stop_by_themselves_when_the_torchrun_agent_is_killed(tmp_path):
    log = tmp_path / "job.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    with open(log, "w") as f:
        job = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bimdist",
             "train", *COMMON[:-2], "--run.steps=100000", "--pipeline.stages=2", "--pipeline.peer_timeout_s=20",
             f"--run.dir={tmp_path / 'run'}"], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    assert sorted(kill_supervisor(job, log, what="workers outlived their agent")) == [0, 1]
    text = log.read_text()
    assert text.count("is gone: checkpointing and stopping") == 2, text[-3000:]


def kill_supervisor(job: subprocess.Popen, log, *, what: str) -> dict[int, int]:
    """Once stage 1 trains, kill -9 ``job`` (a launcher or torchrun agent); its ranks must exit within 20 s
    (``what`` fails the test otherwise). Returns the ranks it had, {RANK: pid}."""
    try:
        assert wait_for(lambda: "progress stage=1" in log.read_text(), 180), log.read_text()[-3000:]
        ranks = ranks_of(job.pid)
        os.kill(job.pid, signal.SIGKILL)
        job.wait(timeout=10)
        assert wait_for(lambda: not any(alive(p) for p in ranks.values()), 20), what
        return ranks
    finally:
        if job.poll() is None:
            job.kill()
