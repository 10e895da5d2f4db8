"""The sbatch scripts on a real single-node Slurm cluster: requeue mid-run -> resumed, completed, nothing lost."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys

import pytest
import torch

from bimdist.telemetry.losslog import read_losses
from tests.conftest import ROOT, TINY, cli, load_block, wait_for
from tests.integration.slurm_cluster import SlurmCluster

STEPS = 800
COMMON = [f"--run.steps={STEPS}", "--pipeline.stages=2", "--run.log_every=100"]
ENV = {"BIMDIST_CONFIG": str(TINY), "BIMDIST_PYTHON": sys.executable}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for binary in ("slurmctld", "slurmd", "sbatch", "munged"):
        if not (shutil.which(binary) or shutil.which(binary, path="/usr/sbin")):
            pytest.fail(f"{binary} is missing: install slurm-wlm and munge (launch/setup.sh does)")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same training without interruption, at the same thread count (1 per process)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = cli("train", str(TINY), *COMMON, f"--run.dir={run_dir}", "--pipeline.threads=1", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def test_requeue_resumes_and_completes_without_lost_steps(cluster, reference, tmp_path):
    out, run_dir = tmp_path / "job.out", tmp_path / "run"
    job = cluster.sbatch(ROOT / "launch" / "slurm" / "bimdist.sbatch", *COMMON, f"--run.dir={run_dir}",
                         "--checkpoint.every=200", options=[f"--output={out}"], env=dict(ENV, NPROC_PER_NODE="2"),
                         cwd=ROOT)
    midway = re.compile(r"progress stage=1 replica=0 step=(3|4|5)00/")
    assert wait_for(lambda: out.exists() and midway.search(out.read_text()), 240), (
        (out.read_text() if out.exists() else "") + cluster.logs())
    cluster.run("scontrol", "requeue", str(job))
    cluster.wait_state(job, {"PENDING"}, 120)
    text = out.read_text()
    preempted = [int(s) for s in re.findall(r"stage \d replica 0 finished at step (\d+) \(signal\)", text)]
    assert len(preempted) == 2 and preempted[0] == preempted[1], text[-3000:]  # both stages, one agreed step
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")  # skip Slurm's requeue hold-off
    assert cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 300) == "COMPLETED", out.read_text()[-3000:]
    text = out.read_text()
    assert f"job {job} restart 1" in text
    assert re.search(rf"resumed stage 0 from .*\(step {preempted[0]}\)", text)
    assert re.search(rf"resumed stage 1 from .*\(step {preempted[0]}\)", text)
    assert f"finished at step {STEPS} (step limit)" in text
    for stage, blocks in ((0, "01"), (1, "23")):
        rows = read_losses(run_dir / "losses" / f"stage{stage}_r0.csv")
        for block in blocks:
            assert [int(r["step"]) for r in rows if r["block"] == block] == list(range(STEPS))  # each step once
    for block in range(4):
        want, got = load_block(reference, STEPS, block), load_block(run_dir, STEPS, block)
        assert all(torch.equal(want[k], got[k]) for k in want), f"block {block} differs from the uninterrupted run"


def test_one_task_per_rank_script_runs_end_to_end(cluster, reference, tmp_path):
    out, run_dir = tmp_path / "job.out", tmp_path / "run"
    job = cluster.sbatch(ROOT / "launch" / "slurm" / "bimdist-per-task.sbatch", *COMMON, f"--run.dir={run_dir}",
                         options=[f"--output={out}", "--ntasks-per-node=2"], env=ENV, cwd=ROOT)
    assert cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 300) == "COMPLETED", out.read_text()[-3000:]
    text = out.read_text()
    assert "[rank=1 stage=1 replica=0]" in text and "srun finished with exit code 0" in text
    for block in range(4):
        want, got = load_block(reference, STEPS, block), load_block(run_dir, STEPS, block)
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_per_task_script_restarts_a_killed_task_alone_and_stays_exact(cluster, reference, tmp_path):
    """kill -9 of one rank: its task's own loop starts it again, the other task keeps its process, the run ends
    with the uninterrupted run's weights (the job's store lives in the batch step, not in a rank)."""
    out, run_dir = tmp_path / "job.out", tmp_path / "run"
    job = cluster.sbatch(ROOT / "launch" / "slurm" / "bimdist-per-task.sbatch", *COMMON, f"--run.dir={run_dir}",
                         "--checkpoint.every=100", "--pipeline.peer_timeout_s=60",
                         options=[f"--output={out}", "--ntasks-per-node=2"], env=ENV, cwd=ROOT)
    assert wait_for(lambda: out.exists() and "checkpoint stage=1 replica=0 step=200 " in out.read_text(), 240), (
        (out.read_text() if out.exists() else "") + cluster.logs())
    ranks = {task: pid for task, pid in slurm_ranks().items()}
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)
    assert cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 300) == "COMPLETED", out.read_text()[-3000:]
    text = out.read_text()
    assert "task 1 (rank) exited with 137; restarting it alone (1 of 3)" in text
    assert re.search(r"recovery stage=1 replica=0 incarnation=1 resumed_at_step=\d+", text)
    assert "restarting it alone" not in text.replace("task 1 (rank) exited with 137; restarting it alone", "")
    for block in range(4):
        want, got = load_block(reference, STEPS, block), load_block(run_dir, STEPS, block)
        assert all(torch.equal(want[k], got[k]) for k in want), f"block {block} differs from the uninterrupted run"


def slurm_ranks() -> dict[int, int]:
    """{SLURM_PROCID: pid} of the python processes running `bimdist train` under srun."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"bimdist" in cmdline and b"train" in cmdline and b"python" in os.path.basename(cmdline[0]):
            for item in environ:
                if item.startswith(b"SLURM_PROCID="):
                    out[int(item.split(b"=")[1])] = int(entry)
    return out
