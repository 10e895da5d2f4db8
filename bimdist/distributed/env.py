"""Who am I? Rank information from torchrun, the deepspeed launcher, srun, or bimdist's own spawner.

torchrun, the deepspeed launcher and bimdist's spawner all export RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT. Under ``srun`` (one task per GPU) the same facts come from SLURM_* variables.
With none of these, the process is standalone and ``bimdist train`` spawns its own stage processes.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class LaunchError(RuntimeError):
    pass


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | deepspeed | slurm | bimdist | env


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        raise LaunchError(f"environment variable {key}={env.get(key)!r} is missing or not an integer") from None


def _first_int(text: str) -> int:
    m = re.match(r"\d+", text or "")
    return int(m.group()) if m else 1


def slurm_master(env: Mapping[str, str]) -> str:
    """First host of the step's node list, expanded by ``scontrol show hostnames``."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    if not nodelist:
        raise LaunchError("SLURM_JOB_NODELIST is empty; export MASTER_ADDR before srun")
    if "[" not in nodelist and "," not in nodelist:
        return nodelist
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise LaunchError(f"cannot expand SLURM node list {nodelist!r} ({e}); export MASTER_ADDR before srun") from None
    return out.split()[0]


def detect(env: Mapping[str, str] | None = None, *, local_rank_arg: int | None = None) -> RankEnv | None:
    """Rank info of this process, or None when no launcher started it (standalone)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        if "TORCHELASTIC_RUN_ID" in env:
            launcher = "torchrun"
        elif env.get("BIMDIST_SPAWNED") == "1":
            launcher = "bimdist"
        elif local_rank_arg is not None or "CROSS_RANK" in env:
            launcher = "deepspeed"
        else:
            launcher = "env"
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else (local_rank_arg or 0)
        world = _int(env, "WORLD_SIZE")
        return RankEnv(
            rank=_int(env, "RANK"), world_size=world, local_rank=local,
            local_world_size=_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", "29500")),
            launcher=launcher,
        )
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    if in_step and "SLURM_PROCID" in env and _first_int(env.get("SLURM_NTASKS", "1")) > 1:
        job = _int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
        return RankEnv(
            rank=_int(env, "SLURM_PROCID"), world_size=_first_int(env["SLURM_NTASKS"]),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            local_world_size=_first_int(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE", "1")),
            master_addr=env.get("MASTER_ADDR") or slurm_master(env),
            master_port=int(env.get("MASTER_PORT", str(20000 + job % 20000))),
            launcher="slurm",
        )
    return None


def usable_cores() -> list[int]:
    """The CPU cores this process may run on (its affinity mask, e.g. a Slurm or taskset allocation)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def core_slice(cores: list[int], local_rank: int, local_processes: int) -> list[int]:
    """This local rank's share of ``cores``: consecutive and disjoint from the other local ranks' shares while
    there are enough cores; with more processes than cores, one core each, round robin."""
    per = max(1, len(cores) // max(1, local_processes))
    start = (local_rank * per) % len(cores)
    return cores[start : start + per]


def pick_device(choice: str, local_rank: int) -> torch.device:
    import torch  # here, not at the top: the standalone launcher reads the environment without torch

    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise LaunchError("pipeline.device is 'cuda' but no CUDA device is visible; use pipeline.device=cpu")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def pick_backend(choice: str, device: torch.device, *, local_ranks: int = 1) -> str:
    """NCCL for one GPU per rank, gloo on CPUs and when local ranks outnumber the GPUs (NCCL refuses two ranks on
    one GPU: "duplicate GPU")."""
    import torch

    shared = device.type == "cuda" and local_ranks > torch.cuda.device_count()
    if choice == "auto":
        return "nccl" if device.type == "cuda" and not shared else "gloo"
    if choice == "nccl" and device.type != "cuda":
        raise LaunchError("pipeline.backend 'nccl' needs CUDA devices; use gloo on CPU")
    if choice == "nccl" and shared:
        raise LaunchError(f"{local_ranks} local ranks share {torch.cuda.device_count()} GPU(s) and NCCL needs one GPU "
                          "per rank; use pipeline.backend=gloo (or auto), or start one rank per GPU")
    return choice


def host_staging(choice: bool | str, device: torch.device, backend: str) -> bool:
    """Whether activations cross through host buffers: ``True``/``False``, or ``auto``: CUDA tensors over gloo."""
    if choice == "auto":
        return device.type == "cuda" and backend == "gloo"
    return bool(choice)


def set_cpu_threads(local_processes: int, requested: int | None, *, local_rank: int = 0,
                    bind: bool = False) -> tuple[int, list[int]]:
    """Keep local processes x torch threads within the cores, or a CPU pipeline thrashes.

    With ``bind`` the process is pinned to its own slice of the cores before any thread starts, so its torch,
    data and communication threads all inherit that slice (a stage's data work then costs its own cores, not a
    neighbour's). Returns the torch thread count and the cores this process may use."""
    import torch

    cores = usable_cores()
    if bind:
        if not hasattr(os, "sched_setaffinity"):
            raise LaunchError("pipeline.bind_cores needs Linux CPU affinity, which this OS lacks; "
                              "set pipeline.bind_cores=false")
        cores = core_slice(cores, local_rank, local_processes)
        os.sched_setaffinity(0, cores)
        threads = requested or len(cores)
    else:
        threads = requested or max(1, len(cores) // max(1, local_processes))
    torch.set_num_threads(threads)
    return threads, cores


def route_address(target: str) -> str:
    """This host's address on the route to ``target`` (a UDP socket's source address; nothing is sent)."""
    import socket

    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((target, 9))  # a UDP "connect" only picks the route
        return s.getsockname()[0]


def interface_of(address: str) -> str | None:
    """The network interface that holds ``address`` (Linux), or None."""
    import fcntl
    import socket
    import struct

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == address:
                return name
    return None


def gloo_interface(master_addr: str) -> tuple[str, str] | None:
    """(interface, address) gloo should use to reach the other ranks: the one on the route to the job's store.

    gloo otherwise takes the address the host name resolves to, which on many machines (and in a network
    namespace) is a loopback address: a peer on another node would then be told to connect to 127.0.0.1."""
    try:
        address = route_address(master_addr)
    except OSError:
        return None
    name = interface_of(address)
    return (name, address) if name else None


def use_gloo_interface(master_addr: str) -> tuple[str, str] | None:
    """Point gloo at the interface on the route to the job's store (GLOO_SOCKET_IFNAME), unless the user did.
    Returns that (interface, address), or None where none is found."""
    import logging
    import os

    found = gloo_interface(master_addr)
    if found is not None and not os.environ.get("GLOO_SOCKET_IFNAME"):
        os.environ["GLOO_SOCKET_IFNAME"] = found[0]
        logging.getLogger("bimdist").debug("gloo uses %s (%s), the route to the job's store at %s", found[0],
                                           found[1], master_addr)
    return found
