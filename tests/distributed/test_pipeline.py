"""The stage pipeline for real: several processes on gloo, hard timeouts, compared with the sequential trainer."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from bimdist.config import load_config
from bimdist.model.unit import build_unit
from tests.conftest import (
    ROOT,
    SEQ_STEPS,
    TINY,
    cli,
    fmnist_mini_args,
    load_block,
    max_abs_diff,
    ranks_of,
    same_weights,
    start_cli,
    wait_for,
)

STEPS = SEQ_STEPS


def _assert_clean_drain(proc, world):
    assert proc.returncode == 0, proc.stderr[-3000:]
    finished = re.findall(r"stage (\d) replica (\d) finished at step (\d+) \(step limit\)", proc.stderr)
    assert len(finished) == world and {int(s) for _, _, s in finished} == {STEPS}


@pytest.mark.parametrize("stages,host_staging", [(2, True), (4, False)])
def test_pipeline_equals_sequential_exactly(sequential, tmp_path, stages, host_staging):
    """With stages bound to cores (round robin when there are more stages than cores): binding moves no bit.
    At S=2 the transport takes single-GPU mode's path (activations through host buffers, as gloo between ranks
    sharing a GPU needs), forced on the CPU; at S=4 the direct one. Both equal the sequential trainer bit for bit."""
    proc = cli("train", str(TINY), f"--run.dir={tmp_path}", f"--run.steps={STEPS}", f"--pipeline.stages={stages}",
               "--pipeline.threads=1", "--pipeline.bind_cores=true", f"--pipeline.host_staging={host_staging}",
               timeout=240)
    _assert_clean_drain(proc, stages)
    assert "1 torch threads" in proc.stderr
    bound = [int(c) for c in re.findall(r"bound to cores \[(\d+)\]", proc.stderr)]
    cores = sorted(os.sched_getaffinity(0))
    assert len(bound) == stages and set(bound) == set(cores[:stages]), proc.stderr[-3000:]
    assert same_weights(sequential, tmp_path, STEPS), f"weights differ at S={stages}"


@pytest.mark.parametrize("chunks", [1, 3])
def test_two_stages_two_replicas_match_the_global_batch(sequential, tmp_path, chunks):
    """DDP over replicas; with decoder_chunks=3 the recomputed decoder must still hand DDP one gradient per
    parameter and match the unchunked sequential run.

    DDP sums in another order than one process does, and AdamW turns a sign flip of a gradient that is rounding
    noise into a full step of lr, so a few parameters may differ by up to 2 lr per step on some CPUs. The checks
    therefore hold on any correct run: the replicas' weights sit close to the global-batch run's relative to how
    far that run moved (whole-block L2 norms), and every block moved from its initial weights by more than the
    peak learning rate, which one AdamW step moves every parameter that has a gradient."""
    proc = cli("train", str(TINY), f"--run.dir={tmp_path}", f"--run.steps={STEPS}", "--pipeline.stages=2",
               "--pipeline.replicas=2", "--pipeline.threads=1", f"--model.decoder_chunks={chunks}", timeout=240)
    _assert_clean_drain(proc, 4)
    cfg = load_config(str(TINY), [f"--run.steps={STEPS}"])
    for block in range(4):
        init = build_unit(cfg, block).state_dict()
        want, got = load_block(sequential, STEPS, block), load_block(tmp_path, STEPS, block)
        moved = l2(want, init)
        assert l2(got, want) < 0.05 * moved, f"block {block}: replicas are {l2(got, want):.2e} from the " \
            f"global-batch run, which moved {moved:.2e}"
        assert max_abs_diff(got, init) > cfg.lr, f"block {block} did not train (peak lr {cfg.lr:.2e})"


def l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """L2 norm of the difference of two state dicts, over every floating tensor."""
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a if a[k].is_floating_point()) ** 0.5


def test_uneven_replica_counts_train_the_global_batch_one_replica_per_stage_does(tmp_path):
    """replicas [2, 1] on real shards: only stage 0's two ranks read the data, each its rows of one global stream;
    stage 0's replicas send stage 1 their rows, which it puts back together. The weights sit next to the [1, 1]
    run's (the same global batch: only sums run in another order), and every block trained."""
    common = [str(TINY), "--data.source=shards", *fmnist_mini_args(), "--model.img_size=28", "--data.batch_size=16",
              "--run.steps=6", "--pipeline.stages=2", "--pipeline.threads=1", "--masking.extra_drop=null"]
    uneven = cli("train", *common, "--pipeline.replicas=[2,1]", f"--run.dir={tmp_path / 'uneven'}",
                 env={"BIMDIST_LOG_LEVEL": "DEBUG"}, timeout=240)
    assert uneven.returncode == 0, uneven.stderr[-3000:]
    assert "rank layout (rank=stage/replica[rows of the global batch]): 0=s0r0[0:8] 1=s1r0[0:16] 2=s0r1[8:16]" \
        in uneven.stderr
    opened: dict[int, set[str]] = {}
    for rank, shard in re.findall(r"\[rank=(\d) stage=\d replica=\d\] bimdist.data: replica \d opens shard (\S+)",
                                  uneven.stderr):
        opened.setdefault(int(rank), set()).add(os.path.basename(shard))
    assert set(opened) == {0, 2}, f"ranks that opened shards: {sorted(opened)} (stage 0 is ranks 0 and 2)"
    even = cli("train", *common, f"--run.dir={tmp_path / 'even'}", timeout=240)
    assert even.returncode == 0, even.stderr[-3000:]
    cfg = load_config(str(TINY), ["--run.steps=6", "--masking.extra_drop=null", "--model.img_size=28"])
    for block in range(4):
        init = build_unit(cfg, block).state_dict()
        want, got = load_block(tmp_path / "even", 6, block), load_block(tmp_path / "uneven", 6, block)
        moved = l2(want, init)
        assert l2(got, want) < 0.05 * moved, f"block {block}: {l2(got, want):.2e} from [1, 1], which moved {moved:.2e}"
        assert max_abs_diff(got, init) > cfg.lr, f"block {block} did not train"


def test_wrong_world_size_fails_before_training(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", "--standalone", "-m", "bimdist",
         "train", str(TINY), f"--run.dir={tmp_path}", "--pipeline.stages=2"],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "the launcher started 3 processes" in line]
    assert lines, proc.stderr[-2000:]  # torchrun may stop the other ranks before they print theirs
    assert all("ERROR" in line and "TopologyError" in line for line in lines)
    assert "pipeline.stages x pipeline.replicas = 2 x 1 = 2" in lines[0]
    assert "progress" not in proc.stderr and not (tmp_path / "checkpoints").exists()


def test_torchrun_launch_matches_sequential(sequential, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "bimdist",
         "train", str(TINY), f"--run.dir={tmp_path}", f"--run.steps={STEPS}", "--pipeline.stages=2",
         "--pipeline.threads=1"], capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert same_weights(sequential, tmp_path, STEPS)


def test_srun_style_environment_is_understood(sequential, tmp_path):
    """Two processes started with only SLURM_* variables (as srun sets them) form the pipeline."""
    port = str(29000 + os.getpid() % 1000)
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_"))}
        env.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2", SLURM_STEP_ID="0",
                   SLURM_JOB_ID="42", SLURM_STEP_TASKS_PER_NODE="2", SLURM_JOB_NODELIST="localhost",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bimdist", "train", str(TINY), f"--run.dir={tmp_path}", f"--run.steps={STEPS}",
             "--pipeline.stages=2", "--pipeline.threads=1"], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "[rank=1 stage=1 replica=0]" in outs[1]
    assert same_weights(sequential, tmp_path, STEPS)


def test_kill_9_of_a_middle_stage_ends_every_rank_naming_it_without_stage_restarts(tmp_path):
    timeout = 15
    log = tmp_path / "job.log"
    job = start_cli("train", str(TINY), f"--run.dir={tmp_path / 'run'}", "--run.steps=100000",
                    "--pipeline.stages=4", f"--pipeline.peer_timeout_s={timeout}", "--run.log_every=10",
                    "--pipeline.stage_restarts=0", log_path=log)
    try:
        assert wait_for(lambda: "progress stage=3" in log.read_text(), 180), log.read_text()[-3000:]
        ranks = ranks_of(job.pid)
        assert sorted(ranks) == [0, 1, 2, 3]
        os.kill(ranks[2], signal.SIGKILL)
        killed_at = time.monotonic()
        code = job.wait(timeout=timeout * 3 + 30)
        elapsed = time.monotonic() - killed_at
    finally:
        if job.poll() is None:
            job.kill()
    text = log.read_text()
    assert code == 3, text[-3000:]
    assert elapsed < timeout * 3, f"ranks took {elapsed:.0f} s to stop"
    assert "rank 2 (stage 2, replica 0) was killed by SIGKILL" in text
    for rank in (0, 1, 3):
        line = next(ln for ln in text.splitlines() if f"[rank={rank} " in ln and "peer failure" in ln)
        assert "stage 2 (rank 2)" in line or "stage 1 (rank 1)" in line, line
    assert re.search(r"\[rank=3 .*peer failure: receiving from stage 2 \(rank 2\) failed", text)
    assert re.search(r"\[rank=0 .*first failure in the job: rank \d: .*stage 2 \(rank 2\)", text), text[-3000:]
    assert "exit codes by rank: [3, 3, -9, 3]" in text


def test_the_live_monitor_scores_every_block_as_an_offline_knn_would_and_changes_no_weight(sequential, tmp_path):
    """eval.monitor_every on a 4-stage pipeline: every block logs a kNN top-1 at every monitor step; at a checkpoint
    step it equals the kNN of that checkpoint's features on the same set (within one query image: another thread
    count may round a feature differently), and the run ends with the weights of the run without the monitor."""
    every, samples = 4, 120
    proc = cli("train", str(TINY), f"--run.dir={tmp_path}", f"--run.steps={STEPS}", "--pipeline.stages=4",
               "--pipeline.threads=1", f"--eval.monitor_every={every}", f"--eval.monitor_samples={samples}",
               "--checkpoint.every=4", "--checkpoint.keep=5", timeout=240)
    _assert_clean_drain(proc, 4)
    logged = {(int(s), int(b), int(step)): float(v) for s, step, b, v in re.findall(
        r"monitor stage=(\d) step=(\d+) knn_top1_b(\d)=([\d.]+)", proc.stderr)}
    assert sorted({(s, step) for s, _, step in logged}) == [(s, t) for s in range(4) for t in range(0, STEPS, every)]
    assert same_weights(sequential, tmp_path, STEPS), "the monitor changed the training"
    from bimdist.evaluate import depth_features, knn
    from bimdist.model.backbone import Backbone
    from bimdist.runs import load_units, run_config
    from bimdist.train.monitor import load_monitor_set

    cfg = run_config(tmp_path)
    ms = load_monitor_set(cfg)
    assert ms.n_bank == samples and len(ms.labels) == samples + samples // 2
    units, _ = load_units(cfg, tmp_path, step=every)
    feats = depth_features(Backbone(cfg, units).eval(), ms.images, batch=len(ms.images), pool="avg")
    for block, f in enumerate(feats):
        want = knn(f[: ms.n_bank], ms.labels[: ms.n_bank], f[ms.n_bank :], ms.labels[ms.n_bank :], k=cfg.eval.knn_k)
        assert abs(logged[(block, block, every)] - want) <= 100 / (samples // 2) + 1e-9, (block, want)


def test_a_run_resumes_on_another_layout_at_the_next_sample(tmp_path):
    """Checkpointed as 2 stages x 1 replica, resumed as replicas [2, 1] and as 4 stages: the data position is global
    and the checkpoint is per block, so both end where an uninterrupted run does: 4 stages bit for bit (the same
    arithmetic per block), [2, 1] within the rounding of averaging two replicas' gradients."""
    common = [str(TINY), "--run.steps=16", "--pipeline.threads=1", "--data.batch_size=16"]
    ref = cli("train", *common, "--pipeline.stages=2", f"--run.dir={tmp_path / 'ref'}", timeout=240)
    assert ref.returncode == 0, ref.stderr[-2000:]
    for name, layout in (("four", ["--pipeline.stages=4"]), ("uneven", ["--pipeline.stages=2",
                                                                        "--pipeline.replicas=[2,1]"])):
        first = cli("train", *common, "--pipeline.stages=2", "--run.stop_at=8", f"--run.dir={tmp_path / name}",
                    timeout=240)
        assert first.returncode == 0, first.stderr[-2000:]
        again = cli("train", *common, *layout, f"--run.dir={tmp_path / name}", timeout=240)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "(step 8)" in again.stderr and "finished at step 16 (step limit)" in again.stderr
    assert same_weights(tmp_path / "ref", tmp_path / "four", 16), "4 stages resumed from 2 differ"
    cfg = load_config(str(TINY), ["--run.steps=16"])
    for block in range(4):
        init = build_unit(cfg, block).state_dict()
        want, got = load_block(tmp_path / "ref", 16, block), load_block(tmp_path / "uneven", 16, block)
        assert l2(got, want) < 0.05 * l2(want, init), f"block {block}: [2, 1] resumed drifted"


def test_torchrun_runs_replicas_auto_with_the_counts_rank_0_chose(tmp_path):
    """pipeline.replicas=auto under a launcher: rank 0 measures the stages and chooses counts for the world size
    torchrun gives; every rank reads them, and the layout is printed."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", "--standalone", "-m", "bimdist",
         "train", str(TINY), f"--run.dir={tmp_path}", f"--run.steps={STEPS}", "--pipeline.stages=2",
         "--pipeline.replicas=auto", "--pipeline.threads=1"], capture_output=True, text=True, timeout=300, env=env,
        cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen = re.search(r"pipeline.replicas=auto for 3 devices: replicas \[(\d), (\d)\]", proc.stderr)
    assert chosen, proc.stderr[-3000:]
    counts = [int(chosen.group(1)), int(chosen.group(2))]
    assert sorted(counts) == [1, 2] and proc.stderr.count("pipeline.replicas=auto for 3 devices") == 1
    assert "rank layout (rank=stage/replica[rows of the global batch]): 0=s0r0" in proc.stderr
    assert proc.stderr.count(f"finished at step {STEPS} (step limit)") == 3
