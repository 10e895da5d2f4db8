"""Shared helpers: run the real CLI in subprocesses with hard timeouts, small configs, real data assets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "tests" / "assets"
TINY = ASSETS / "tiny.yaml"
FMNIST_MINI = ASSETS / "fmnist-mini"


def cli(*args: str, timeout: float = 300, env: dict | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m bimdist ...``; a hang fails the test instead of stalling CI."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        if not env or key not in env:
            full_env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "bimdist", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or ROOT)


def load_block(run_dir: Path, step: int, block: int) -> dict[str, torch.Tensor]:
    path = Path(run_dir) / "checkpoints" / f"step_{step:08d}" / f"block_{block:02d}.pt"
    return torch.load(path, weights_only=True)["model"]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def fmnist_mini_args() -> list[str]:
    return [f"--data.train_shards={FMNIST_MINI}/train-{{000000..000003}}.tar",
            f"--data.test_shards={FMNIST_MINI}/test-{{000000..000001}}.tar"]


def same_weights(a: Path, b: Path, step: int, blocks: int = 4) -> bool:
    """Bit-identical weights of every block of two runs at ``step``."""
    for block in range(blocks):
        x, y = load_block(a, step, block), load_block(b, step, block)
        if not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


SEQ_STEPS = 8


@pytest.fixture(scope="session")
def sequential(tmp_path_factory) -> Path:
    """The reference run: tiny config, SEQ_STEPS steps, one process with one thread (float reductions depend on
    the thread count, so every exact comparison runs its side with one thread per process too)."""
    run_dir = tmp_path_factory.mktemp("seq") / "run"
    proc = cli("train", str(TINY), f"--run.dir={run_dir}", f"--run.steps={SEQ_STEPS}", "--pipeline.threads=1")
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 2 MiB tmpfs: a real full disk."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def start_cli(*args: str, log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """Start ``python -m bimdist ...`` in the background, output to ``log_path``."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        if not env or key not in env:
            full_env.pop(key, None)
    log = open(log_path, "w")  # noqa: SIM115 - owned by the child
    return subprocess.Popen([sys.executable, "-m", "bimdist", *args], stdout=log, stderr=subprocess.STDOUT,
                            env=full_env, cwd=ROOT)


def ranks_of(pid: int) -> dict[int, int]:
    """{RANK: pid} of the processes below ``pid`` that carry a RANK variable (torchrun or bimdist children). A
    rank's own children (its data workers) inherit the variable; they are not ranks."""
    found: dict[int, tuple[int, int]] = {}  # pid -> (rank, parent pid)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        ancestors = {ppid}
        try:
            grand = int((Path("/proc") / str(ppid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
            ancestors.add(grand)
        except (OSError, ValueError):
            pass
        if pid in ancestors:
            for item in environ:
                if item.startswith(b"RANK="):
                    found[int(proc.name)] = (int(item[5:]), ppid)
    return {rank: p for p, (rank, ppid) in found.items() if found.get(ppid, (None,))[0] != rank}


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(predicate, timeout: float, interval: float = 0.5) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
