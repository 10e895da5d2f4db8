"""``bimdist finetune`` through the real CLI on real Fashion-MNIST shards: results, the shared label subset, data
parallelism equal to one rank, preemption and an exact resume, and bad input."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from bimdist.finetune.data import LabelIndex, label_subset
from tests.conftest import TINY, cli, fmnist_mini_args, start_cli, wait_for

PRETRAIN = [str(TINY), "--data.source=shards", *fmnist_mini_args(), "--model.img_size=28", "--masking.extra_drop=null",
            "--data.mean=[0.286]", "--data.std=[0.353]", "--data.batch_size=32", "--run.steps=20"]
# deterministic in the model (no mixup, no drop path) so that 2 ranks can be compared with 1; the data
# augmentation (crop, flip, RandAugment, erasing) stays on: it is seeded per sample
EXACT = ["--finetune.batch_size=32", "--finetune.epochs=8", "--finetune.mixup=0", "--finetune.cutmix=0",
         "--finetune.drop_path=0", "--finetune.eval_every=16", "--finetune.log_every=4", "--pipeline.threads=1"]
STEPS = 64  # 8 epochs of 256 labels at batch 32


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pre") / "run"
    proc = cli("train", *PRETRAIN, f"--run.dir={run_dir}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


@pytest.fixture(scope="module")
def reference(run: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ft"
    proc = cli("finetune", str(run), "--depth", "4", *EXACT, f"--finetune.dir={out}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def weights(out: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / f"step_{step:08d}" / "block_00.pt", weights_only=True)["model"]


def test_pretrained_and_scratch_train_on_the_same_label_subset_and_write_results(run):
    common = ["--depth", "4", "--finetune.labels=0.5", "--finetune.batch_size=32", "--finetune.epochs=1"]
    a = cli("finetune", str(run), *common, timeout=300)
    b = cli("finetune", str(run), *common, "--finetune.init=scratch", "--finetune.seed=1", timeout=300)
    assert a.returncode == 0, a.stderr[-3000:]
    assert b.returncode == 0, b.stderr[-3000:]
    da, db = run / "finetune-depth4-labels0.5", run / "finetune-depth4-scratch-labels0.5-seed1"
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (da, db))
    assert (da / "train-labels.txt").read_text() == (db / "train-labels.txt").read_text()
    keys = (da / "train-labels.txt").read_text().split()
    assert ra["train_labels_sha256"] == rb["train_labels_sha256"] and ra["train_labels"] == len(set(keys))
    assert 120 <= len(keys) <= 136  # half of each class of the 256 mini images, rounded per class
    assert ra["init"] == "pretrained" and rb["init"] == "scratch" and ra["depth"] == 4 and ra["layers"] == 4
    assert ra["pretrain_step"] == 20 and ra["steps"] == len(keys) // 32 and ra["test_images"] == 128
    assert 0 <= ra["top1"] <= ra["top5"] <= 100 and ra["history"][-1]["top1"] == ra["top1"]
    assert "finetune result: top1=" in a.stderr and "fine-tuning pretrained:" in a.stderr


def test_the_subset_file_matches_the_class_balanced_subset_of_the_shards(run):
    keys = (run / "finetune-depth4-labels0.5" / "train-labels.txt").read_text().split()
    from bimdist.data.stream import DataStats
    from bimdist.finetune.data import label_index
    from bimdist.runs import run_config

    index = label_index(run_config(run), DataStats())
    assert set(keys) == label_subset(LabelIndex(index.keys, index.labels), 0.5, seed=0)
    per = {}
    for k, y in zip(index.keys, index.labels):
        if k in set(keys):
            per[y] = per.get(y, 0) + 1
    counts = index.counts()
    assert all(per[y] == round(0.5 * counts[y]) for y in counts)


def test_two_data_parallel_ranks_train_the_global_batch_one_rank_does(run, reference, tmp_path):
    proc = cli("finetune", str(run), "--depth", "4", *EXACT, "--finetune.replicas=2", f"--finetune.dir={tmp_path}",
               timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "spawned 2 local ranks" in proc.stderr and "finetune rank 1 of 2" in proc.stderr
    want, got = weights(reference), weights(tmp_path)
    init = weights_init(run)
    moved = l2(want, init)
    assert l2(got, want) < 0.02 * moved, f"2 ranks are {l2(got, want):.2e} from 1 rank, which moved {moved:.2e}"
    one, two = (json.loads((d / "result.json").read_text()) for d in (reference, tmp_path))
    assert abs(one["top1"] - two["top1"]) <= 100 / 128 * 2  # at most two test images apart


def weights_init(run: Path) -> dict[str, torch.Tensor]:
    from bimdist.finetune.model import build, from_run
    from bimdist.runs import run_config

    return build(from_run(run_config(run), run, 4, weights=True), num_classes=10, drop_path=0.0,
                 input_size=None).state_dict()


def l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    keys = [k for k in a if a[k].is_floating_point() and not k.startswith("head.")]  # the head starts from a seed
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys) ** 0.5


def test_sigterm_then_resume_equals_an_uninterrupted_run(run, reference, tmp_path):
    log = tmp_path / "first.log"
    job = start_cli("finetune", str(run), "--depth", "4", *EXACT, f"--finetune.dir={tmp_path / 'ft'}", log_path=log)
    try:
        assert wait_for(lambda: "finetune step=8/" in log.read_text(), 120), log.read_text()[-3000:]
        job.send_signal(signal.SIGTERM)
        code = job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    text = log.read_text()
    assert code == 75, text[-3000:]
    stopped = int(re.search(r"stopping at step (\d+) \(SIGTERM\)", text).group(1))
    assert 8 <= stopped < STEPS
    again = cli("finetune", str(run), "--depth", "4", *EXACT, f"--finetune.dir={tmp_path / 'ft'}", timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed fine-tuning from {tmp_path / 'ft'}/checkpoints/step_{stopped:08d} (step {stopped})" in again.stderr
    want, got = weights(reference), weights(tmp_path / "ft")
    assert all(torch.equal(want[k], got[k]) for k in want), "the resumed run's weights differ"
    one, two = (json.loads((d / "result.json").read_text()) for d in (reference, tmp_path / "ft"))
    assert one["top1"] == two["top1"] and [h["top1"] for h in one["history"]] == [h["top1"] for h in two["history"]]


@pytest.mark.parametrize("args,message", [
    (["{missing}", "--depth", "4"], "run folder {missing} does not exist"),
    (["{run}", "--depth", "5"], "--depth 5 is out of range: the run has blocks 1..4"),
    (["{run}"], "--depth K is required for a run folder"),
    (["{run}", "--depth", "4", "--finetune.labels=0"], "config error: finetune.labels: Input should be greater than 0"),
    (["{run}", "--depth", "4", "--finetune.labels=1.5"], "finetune.labels: Input should be less than or equal to 1"),
    (["{run}", "--depth", "4", "--model.depth=8"], "change the model's shape"),
    (["{run}.safetensors"], "is an export; give a CONFIG"),
])
def test_bad_input_exits_2_with_one_line(run, tmp_path, args, message):
    t0 = time.monotonic()
    filled = [a.format(run=run, missing=tmp_path / "nothing") for a in args]
    proc = cli("finetune", *filled, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message.format(missing=tmp_path / "nothing") in lines[0], proc.stderr
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_launchers_start_the_same_data_parallel_job(run, reference, tmp_path, launcher):
    """torchrun and the deepspeed launcher (which appends --local_rank) start 2 ranks of the same job."""
    import os
    import shutil
    import subprocess
    import sys

    from bimdist.distributed.launch import free_port
    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    if launcher == "torchrun":
        start = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    else:
        deepspeed = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
        start = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "--module"]
    proc = subprocess.run([*start, "bimdist", "finetune", str(run), "--depth", "4", *EXACT,
                           f"--finetune.dir={tmp_path}"], capture_output=True, text=True, timeout=400, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finetune rank 1 of 2" in proc.stderr
    want, got, init = weights(reference), weights(tmp_path), weights_init(run)
    assert l2(got, want) < 0.02 * l2(want, init)
