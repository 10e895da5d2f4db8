"""The sbatch scripts on a real single-node Slurm cluster: requeue mid-run -> resumed, completed, nothing lost."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys

import pytest
import torch

from bimdist.telemetry.losslog import read_losses
from tests.conftest import ROOT, TINY, alive, cli, load_block, wait_for
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
    cluster.start_requeued_now(job)
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


# The shipped pipeline and checkpoint settings (tiny.yaml shortens the timeouts: set back here).
DEFAULTS = ["--pipeline.peer_timeout_s=120", "--pipeline.startup_timeout_s=600"]


def test_per_task_script_restarts_a_killed_task_alone_and_stays_exact(cluster, reference, tmp_path):
    """With the defaults, kill -9 of one rank before the first checkpoint: its task's own loop starts it again from
    the run's start, the other task keeps its process and replays every step since, and the run ends with the
    uninterrupted run's weights (the job's store lives in the batch step, not in a rank)."""
    out, run_dir = tmp_path / "job.out", tmp_path / "run"
    job = cluster.sbatch(ROOT / "launch" / "slurm" / "bimdist-per-task.sbatch", *COMMON, *DEFAULTS,
                         f"--run.dir={run_dir}", options=[f"--output={out}", "--ntasks-per-node=2"], env=ENV, cwd=ROOT)
    assert wait_for(lambda: out.exists() and "progress stage=1 replica=0 step=200/" in out.read_text(), 240), (
        (out.read_text() if out.exists() else "") + cluster.logs())
    ranks = {task: pid for task, pid in slurm_ranks().items()}
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)
    assert cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 300) == "COMPLETED", out.read_text()[-3000:]
    text = out.read_text()
    assert "a dead stage: a dead stage restarts alone (up to 3 times) from its newest checkpoint (every 500" in text
    assert "task 1 (rank) exited with 137; restarting it alone (1 of 3)" in text
    assert re.search(r"recovery stage=1 replica=0 incarnation=1 resumed_at_step=0 ", text), text[-3000:]
    assert "restarting it alone" not in text.replace("task 1 (rank) exited with 137; restarting it alone", "")
    for block in range(4):
        want, got = load_block(reference, STEPS, block), load_block(run_dir, STEPS, block)
        assert all(torch.equal(want[k], got[k]) for k in want), f"block {block} differs from the uninterrupted run"


def test_per_task_script_ends_a_job_whose_restart_cannot_be_fed_and_requeues_it(cluster, reference, tmp_path):
    """The replay log past its disk cap, then kill -9 of the last stage: no supervisor here knows the log is short,
    so the task restarts it, and stage 0 finds the step it asks for gone. That ends every task at once (exit 3),
    naming the stage; the batch script requeues the job, which resumes from the newest common checkpoint and ends
    with the uninterrupted run's weights."""
    out, run_dir = tmp_path / "job.out", tmp_path / "run"
    job = cluster.sbatch(ROOT / "launch" / "slurm" / "bimdist-per-task.sbatch", *COMMON, *DEFAULTS,
                         "--pipeline.replay_memory_mb=1", "--pipeline.replay_disk_mb=1", f"--run.dir={run_dir}",
                         options=[f"--output={out}", "--ntasks-per-node=2"], env=ENV, cwd=ROOT)
    assert wait_for(lambda: out.exists() and "progress stage=1 replica=0 step=700/" in out.read_text(), 240), (
        (out.read_text() if out.exists() else "") + cluster.logs())
    ranks = slurm_ranks()
    os.kill(ranks[1], signal.SIGKILL)
    assert wait_for(lambda: "srun finished with exit code 3" in out.read_text(), 60), out.read_text()[-3000:]
    text = out.read_text()
    line = re.search(r"\[rank=0 [^\n]*job ended: stage 1 \(rank 1\) cannot restart alone: it needs step (\d+), but "
                     r"stage 0 \(rank 0\) keeps steps from (\d+) on in its replay log \(its disk cap was reached\); "
                     r"raise pipeline.replay_disk_mb \(now 1\)", text)
    assert line and int(line.group(2)) > int(line.group(1)) == 500, text[-3000:]
    assert not [p for p in ranks.values() if alive(p)], "a rank outlived the job"
    assert f"requeueing job {job} to resume from the newest common checkpoint (job restart 1 of 1)" in text
    cluster.wait_state(job, {"PENDING", "RUNNING", "COMPLETED"}, 60)
    cluster.start_requeued_now(job)
    assert cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 300) == "COMPLETED", out.read_text()[-3000:]
    text = out.read_text()
    assert re.search(r"resumed stage 1 from .*\(step 500\)", text), text[-3000:]
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


@pytest.mark.parametrize("script", ["bimdist.sbatch", "bimdist-per-task.sbatch"])
def test_both_scripts_run_a_finetuning_job(cluster, reference, tmp_path, script):
    """BIMDIST_VERB=finetune: the same scripts start a 2-rank data-parallel fine-tuning of a finished run."""
    out = tmp_path / "job.out"
    job = cluster.sbatch(ROOT / "launch" / "slurm" / script, str(reference), "--depth", "2",
                         "--finetune.init=pretrained", "--finetune.epochs=1", "--finetune.batch_size=32",
                         f"--finetune.dir={tmp_path / 'ft'}", "--data.source=synthetic",
                         options=[f"--output={out}", "--ntasks-per-node=2" if "per-task" in script else
                                  "--ntasks-per-node=1"],
                         env=dict(ENV, BIMDIST_VERB="finetune", NPROC_PER_NODE="2"), cwd=ROOT)
    assert cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 300) == "COMPLETED", out.read_text()[-3000:]
    text = out.read_text()
    assert "finetune rank 1 of 2" in text and "finetune result: top1=" in text
    result = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert result["ranks"] == 2 and result["depth"] == 2 and result["init"] == "pretrained"
