"""A real single-node Slurm cluster (Debian slurm-wlm + munge) with every file under one temp folder."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bimdist.distributed.launch import free_port

CONF = """\
ClusterName=bimdisttest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={munge}/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=60
MinJobAge=600
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        for d in ("state", "spool", "log"):
            (root / d).mkdir(parents=True, exist_ok=True)
        # munged runs as the munge user and must reach its folder: keep it outside pytest's private temp tree
        self.munge = Path(tempfile.mkdtemp(prefix="bimdist-munge-"))
        self.munge.chmod(0o755)
        shutil.chown(self.munge, "munge", "munge")
        self.conf = root / "slurm.conf"
        self.conf.write_text(CONF.format(host=socket.gethostname().split(".")[0], root=root, munge=self.munge,
                                         cpus=os.cpu_count(),
                                          ctld_port=free_port(), slurmd_port=free_port()))
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for key in list(self.env):
            if key.startswith("SLURM_") and key != "SLURM_CONF":
                del self.env[key]

    def start(self) -> None:
        m = self.munge
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={m}/munge.socket",
                        f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/seed"],
                       check=True, timeout=30)
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env, timeout=30)
        subprocess.run(["slurmd", "-f", str(self.conf)], check=True, env=self.env, timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-o", "%T").stdout.strip()
            if out in ("idle", "mixed"):
                return
            time.sleep(1)
        raise RuntimeError(f"slurm node never became idle: {self.logs()}")

    def stop(self) -> None:
        self.run("scancel", "--full", "--user=root", check=False)
        self.run("scontrol", "shutdown", check=False)
        time.sleep(1)
        for pidfile in (self.root / "slurmd.pid", self.root / "slurmctld.pid", self.munge / "munged.pid"):
            try:
                os.kill(int(pidfile.read_text()), 15)
            except (OSError, ValueError):
                pass
        shutil.rmtree(self.munge, ignore_errors=True)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, env=self.env, timeout=60, check=check)

    def sbatch(self, script: Path, *script_args: str, options: list[str], env: dict | None = None,
               cwd: Path | None = None) -> int:
        """Submit ``script`` with sbatch ``options``; ``script_args`` are passed to the script itself."""
        proc = subprocess.run(["sbatch", "--parsable", *options, str(script), *script_args], capture_output=True,
                              text=True, env={**self.env, **(env or {})}, timeout=60, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def start_requeued_now(self, job_id: int) -> None:
        """Skip Slurm's requeue hold-off. Not within the second of the requeue: slurmd compares the new launch
        credential with the revocation of the old one at one-second granularity and kills a launch made in the same
        second ("Job credential revoked")."""
        time.sleep(2.0)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def wait_state(self, job_id: int, states: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job(job_id).get("JobState", "")
            if state in states:
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {state!r} after {timeout:.0f} s, wanted {states}")

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in (self.root / "log").glob("*.log"))
