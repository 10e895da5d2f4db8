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
import torch

from tests.conftest import ROOT, TINY, alive, cli, load_block, ranks_of, same_weights, start_cli, wait_for

STEPS = 240
COMMON = [str(TINY), f"--run.steps={STEPS}", "--pipeline.stages=4", "--pipeline.threads=1", "--checkpoint.every=40",
          "--run.log_every=40", "--pipeline.peer_timeout_s=60", "--pipeline.replay_memory_mb=1"]

# The shipped defaults: tiny.yaml's model and batch, but every pipeline, checkpoint and replay setting as bimdist ships
# it (tiny.yaml shortens the timeouts: they are set back here). A batch of 64 paces the run at about 50 steps/s here,
# so that a kill lands where the test means it to (before or after the step-500 checkpoint, checkpoint.every's
# default).
DEFAULT_STEPS = 1200
DEFAULTS = [str(TINY), f"--run.steps={DEFAULT_STEPS}", "--pipeline.stages=4", "--data.batch_size=64",
            "--run.log_every=20", "--pipeline.peer_timeout_s=120", "--pipeline.startup_timeout_s=600"]


@pytest.fixture(scope="module")
def default_reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref-defaults") / "run"
    proc = cli("train", *DEFAULTS, f"--run.dir={run_dir}", timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checkpoint stage=3 replica=0 step=500 " in proc.stderr  # the default cadence checkpoints mid-run
    return run_dir


def finish(job: subprocess.Popen, timeout: float) -> int:
    try:
        return job.wait(timeout=timeout)
    finally:
        if job.poll() is None:
            job.kill()


def recoveries(text: str) -> list[tuple[int, int, float]]:
    """(stage, resumed at step, seconds from the death to its first step) of every recovery line."""
    return [(int(s), int(r), float(t)) for s, r, t in re.findall(
        r"recovery stage=(\d+) replica=0 incarnation=\d+ resumed_at_step=(\d+) first_step_s_after_death=([\d.]+)",
        text)]


def test_with_the_defaults_any_stage_killed_before_or_after_the_first_checkpoint_restarts_alone_and_stays_exact(
        default_reference, tmp_path):
    """kill -9 of a middle stage, the first and the last, each before the first checkpoint (the stage restarts from
    the run's start and its upstream replays every step since) and after it, then the last stage once more as the
    stream ends. Every restart trains again within 30 s, and the run ends with the uninterrupted run's weights."""
    log = tmp_path / "job.log"
    job = start_cli("train", *DEFAULTS, f"--run.dir={tmp_path / 'run'}", log_path=log)
    seen: set[int] = set()
    kills = [(2, "progress stage=2 replica=0 step=40/"), (0, "progress stage=3 replica=0 step=80/"),
             (3, "progress stage=3 replica=0 step=120/"),
             (2, "checkpoint stage=3 replica=0 step=500 "), (0, "progress stage=3 replica=0 step=700/"),
             (3, "progress stage=3 replica=0 step=800/")]
    try:
        for stage, mark in kills:
            assert wait_for(lambda m=mark: m in log.read_text(), 240), log.read_text()[-3000:]
            before = ranks_of(job.pid)
            seen.update(before.values())
            done = len(recoveries(log.read_text()))
            os.kill(before[stage], signal.SIGKILL)
            assert wait_for(lambda d=done: len(recoveries(log.read_text())) > d, 60), log.read_text()[-3000:]
        # the end of the stream: stage 0 has run its last step while the last stage is a few steps behind
        assert wait_for(lambda: f"progress stage=0 replica=0 step={DEFAULT_STEPS}/" in log.read_text(), 240)
        end = ranks_of(job.pid)
        seen.update(end.values())
        if 3 in end:
            os.kill(end[3], signal.SIGKILL)
        code = finish(job, 300)
    finally:
        if job.poll() is None:
            job.kill()
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "a dead stage restarts alone (up to 3 times) from its newest checkpoint (every 500 steps)" in text
    lines = recoveries(text)
    assert [s for s, _, _ in lines[:6]] == [2, 0, 3, 2, 0, 3], lines
    assert [r for _, r, _ in lines[:3]] == [0, 0, 0], lines  # before the first checkpoint: from the run's start
    assert [r for _, r, _ in lines[3:6]] == [500, 500, 500], lines
    assert all(t < 30 for _, _, t in lines), lines
    assert "the replay log starts at" not in text and "cannot restart alone" not in text
    assert same_weights(default_reference, tmp_path / "run", DEFAULT_STEPS), "weights differ from the uninterrupted run"
    assert not list((tmp_path / "run" / "replay").glob("*.log"))  # every replay segment closed and removed
    assert not [p for p in seen if alive(p)], "a rank outlived the job"


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_past_the_replay_disk_cap_a_killed_stage_ends_the_job_at_once_naming_it(default_reference, tmp_path, stage):
    """The replay log over its disk cap (1 MB here, about 11 steps of these messages) before the first checkpoint:
    stages 2 and 3 can no longer be fed, so their death ends every rank within 15 s with one line that names the
    stage, the step it needed, the oldest step kept and the setting; stage 0 reads its own data, so it restarts
    alone and the run stays exact."""
    log = tmp_path / "job.log"
    job = start_cli("train", *DEFAULTS, "--pipeline.replay_memory_mb=1", "--pipeline.replay_disk_mb=1",
                    f"--run.dir={tmp_path / 'run'}", log_path=log)
    try:
        assert wait_for(lambda: "progress stage=3 replica=0 step=100/" in log.read_text(), 240), log.read_text()
        ranks = ranks_of(job.pid)
        os.kill(ranks[stage], signal.SIGKILL)
        killed_at = time.monotonic()
        code = finish(job, 300 if stage == 0 else 60)
        ended_in = time.monotonic() - killed_at
    finally:
        if job.poll() is None:
            job.kill()
    text = log.read_text()
    if stage == 0:
        assert code == 0 and re.search(r"recovery stage=0 replica=0 incarnation=1 resumed_at_step=0 ", text), text
        assert same_weights(default_reference, tmp_path / "run", DEFAULT_STEPS)
    else:
        assert code == 3, text[-3000:]
        assert ended_in < 15, f"the job took {ended_in:.1f} s to end"
        line = re.search(rf"job failed: rank {stage} \(stage {stage}, replica 0\) was killed by SIGKILL and cannot "
                         rf"restart alone: it would resume at step 0 .* but stage {stage - 1} keeps steps from "
                         r"(\d+) on in its replay log .*raise pipeline.replay_disk_mb \(now 1\) or checkpoint more "
                         r"often \(checkpoint.every=500\)", text)
        assert line and int(line.group(1)) > 0, text[-3000:]
        assert f"stage {stage} (replica 0, rank {stage}) can no longer be restarted alone" in text  # said before
        assert text.count("] bimdist: job ended: ") == 3  # every other rank says why it ends
    assert not [p for p in ranks.values() if alive(p)], "a rank outlived the job"


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


UNEVEN = [str(TINY), "--run.steps=300", "--pipeline.stages=2", "--pipeline.replicas=[2,1]", "--pipeline.threads=1",
          "--run.log_every=20", "--pipeline.peer_timeout_s=120", "--pipeline.startup_timeout_s=600"]


@pytest.mark.parametrize("killed", ["replica", "stage"])
def test_with_uneven_counts_a_killed_rank_restarts_and_the_run_stays_exact(tmp_path, killed):
    """replicas [2, 1], the shipped restart settings. A killed stage-0 replica takes its sibling with it (a step's
    gradients cannot be averaged without it): both restart from their common checkpoint or the run's start, stage 1
    keeps its process and its inputs are replayed. A killed stage 1 is fed by both stage-0 replicas' logs. Either
    way the run ends with the uninterrupted run's weights, bit for bit."""
    ref = cli("train", *UNEVEN, f"--run.dir={tmp_path / 'ref'}", timeout=400)
    assert ref.returncode == 0, ref.stderr[-2000:]
    log = tmp_path / "job.log"
    job = start_cli("train", *UNEVEN, f"--run.dir={tmp_path / 'run'}", log_path=log)
    rank = 2 if killed == "replica" else 1  # ranks: 0 = stage 0 replica 0, 1 = stage 1, 2 = stage 0 replica 1
    try:
        assert wait_for(lambda: "progress stage=1 replica=0 step=100/" in log.read_text(), 240), log.read_text()
        before = ranks_of(job.pid)
        os.kill(before[rank], signal.SIGKILL)
        stage = 0 if killed == "replica" else 1
        assert wait_for(lambda: f"recovery stage={stage} " in log.read_text(), 120), log.read_text()[-3000:]
        after = ranks_of(job.pid)
        code = finish(job, 300)
    finally:
        if job.poll() is None:
            job.kill()
    text = log.read_text()
    assert code == 0, text[-3000:]
    restarted = sorted({int(s) for s in re.findall(r"recovery stage=(\d+) replica=\d+ incarnation=1 ", text)})
    if killed == "replica":
        assert re.search(r"rank 0 \(stage 0, replica 0\) exited with 76; restarting it alone", text), text[-3000:]
        assert "a replica of this stage was lost" in text and restarted == [0]
        assert after.get(1) == before[1], "stage 1 was restarted too"
    else:
        assert restarted == [1] and "exited with 76" not in text
    for block in range(4):
        want, got = load_block(tmp_path / "ref", 300, block), load_block(tmp_path / "run", 300, block)
        assert all(torch.equal(want[k], got[k]) for k in want), f"block {block} differs from the uninterrupted run"


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
