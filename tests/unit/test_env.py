"""CPU threads and core binding for local processes (``pipeline.threads``, ``pipeline.bind_cores``)."""

import json
import os
import subprocess
import sys

from bimdist.distributed.env import core_slice
from tests.conftest import ROOT


def test_core_slices_are_disjoint_while_cores_last_then_round_robin():
    cores = [0, 1, 2, 3, 4, 5, 6, 7]
    assert [core_slice(cores, r, 2) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [core_slice(cores, r, 3) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]  # 6, 7 left unused
    assert [core_slice([4, 9], r, 4) for r in range(4)] == [[4], [9], [4], [9]]
    assert core_slice([3], 0, 1) == [3]


def _child_json(code: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (binding changes the whole process) and parse its last line."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _threads_in_child(*args: str) -> dict:
    code = ("import json, os, sys, torch; from bimdist.distributed.env import set_cpu_threads; "
            "t, c = set_cpu_threads(int(sys.argv[1]), None, local_rank=int(sys.argv[2]), bind=sys.argv[3] == '1'); "
            "print(json.dumps({'threads': t, 'cores': c, 'torch': torch.get_num_threads(), "
            "'affinity': sorted(os.sched_getaffinity(0))}))")
    return _child_json(code, *args)


def test_binding_pins_the_process_and_sizes_torch_threads_to_its_slice():
    cores = sorted(os.sched_getaffinity(0))
    last = len(cores) - 1 if len(cores) > 1 else 0
    got = _threads_in_child(str(len(cores)), str(last), "1")
    assert got["affinity"] == got["cores"] == [cores[last]]
    assert got["threads"] == got["torch"] == 1
    free = _threads_in_child("1", "0", "0")  # unbound: the whole mask stays, threads = cores / processes
    assert free["affinity"] == cores and free["threads"] == free["torch"] == len(cores)


def test_baselines_bind_by_the_launchers_local_rank_under_srun():
    """The baselines use the trainer's launcher detection: an srun task has no LOCAL_RANK, only SLURM_LOCALID."""
    cores = sorted(os.sched_getaffinity(0))
    code = ("import json, os, torch; from bimdist.config import load_config; "
            "from bimdist.baselines.common import set_threads; "
            "set_threads(load_config('fmnist-tiny', ['--pipeline.bind_cores=true'])); "
            "print(json.dumps({'affinity': sorted(os.sched_getaffinity(0)), 'torch': torch.get_num_threads()}))")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(SLURM_STEP_ID="0", SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="1",
               SLURM_STEP_TASKS_PER_NODE="2", MASTER_ADDR="127.0.0.1")
    got = _child_json(code, env=env)
    assert got["affinity"] == core_slice(cores, 1, 2)
    assert got["torch"] == len(got["affinity"])
